"""Causal language models (text generation): build one for a run, choose what trains, save it to
a run's ``model/`` folder and load it back.

A run's model is a plain transformers folder (``AutoModelForCausalLM`` loads it, tokenizer
included) or, for the peft strategies, a peft adapter folder over the source model. Training
feeds batches to ``TargetLogits``: the decoder's hidden states, and the output layer applied only
where the next token is a target (the completion), so the vocabulary-sized logits of the prompt
are never computed.

Text encoder-decoders (T5, BART ...: ``SEQ2SEQ_FAMILY``) are built, adapted, saved and loaded here too; their
batches go to ``Seq2SeqLogits``.

SmolLM2 ships as a GGUF file: ``fmtune.zoo.models`` converts it once into a plain folder.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtune.config import resolve_max_length
from fmtune.errors import ConfigError, ModelError, brief
from fmtune.models.wrapped import decoder_start, plain, prompt_tuned

FAMILY = "causal-lm"
SPEECH_FAMILY = "speech-seq2seq"  # fmtune.models.speech: saved, loaded and adapted as causal LMs are
CTC_FAMILY = "speech-ctc"  # fmtune.models.ctc: wav2vec2-style encoders with a CTC head, likewise
# text encoder-decoders (T5, Flan-T5, BART, mT5, Pegasus, Marian ...): the prompt is the encoder's input, the
# completion the decoder's (fmtune.tasks.generation.Seq2SeqData, Seq2SeqLogits here)
SEQ2SEQ_FAMILY = "seq2seq-lm"
FAMILIES = (FAMILY, SPEECH_FAMILY, CTC_FAMILY, SEQ2SEQ_FAMILY)
TEXT_FAMILIES = (FAMILY, SEQ2SEQ_FAMILY)
DEFAULT_MAX_LENGTH = 512  # model.max_length of generation: prompt + completion (an encoder-decoder: each)
LM_STRATEGIES = ("lora", "dora", "ia3", "prompt", "last_n", "full")
# Modules adapted by default, per architecture: (lora/dora targets, ia3 targets, ia3 feed-forward
# subset). Llama-like blocks: every attention and MLP projection (QLoRA's finding: adapting all of
# them matters more than the rank). Others: every linear layer inside the repeated blocks.
LM_TARGETS: dict[str, tuple[list[str], list[str], list[str]]] = {
    arch: (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           ["k_proj", "v_proj", "down_proj"], ["down_proj"])
    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "smollm3")
}
# Whisper (and Speech2Text): the attention and feed-forward projections of encoder and decoder blocks (self- and
# cross-attention)
LM_TARGETS["whisper"] = (["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], ["k_proj", "v_proj", "fc2"],
                         ["fc2"])
LM_TARGETS["speech_to_text"] = LM_TARGETS["whisper"]
LM_TARGETS["moonshine"] = (["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"], ["k_proj", "v_proj", "fc2"],
                           ["fc2"])  # (the same, its attention output named o_proj)
# T5 and its kin (Flan-T5, mT5, UL2): every projection of the self-, cross-attention and feed-forward layers of
# encoder and decoder (wi for T5 v1.0, wi_0 / wi_1 gated from v1.1 on: the ones a model lacks are left out); IA3 as
# peft's own defaults for T5 (keys, values and the feed-forward output)
for _arch in ("t5", "mt5", "umt5", "longt5", "switch_transformers"):
    LM_TARGETS[_arch] = (["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"], ["k", "v", "wo"], ["wo"])
# BART and its kin: the attention and feed-forward projections, as Whisper's
for _arch in ("bart", "mbart", "pegasus", "pegasus_x", "marian", "m2m_100", "blenderbot", "blenderbot-small", "plbart",
              "led", "mvp", "bigbird_pegasus", "nllb-moe"):
    LM_TARGETS[_arch] = LM_TARGETS["whisper"]
# wav2vec2-style CTC models: the attention and feed-forward projections of the encoder blocks
for _arch in ("wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "unispeech-sat"):
    LM_TARGETS[_arch] = (["q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense"],
                         ["k_proj", "v_proj", "output_dense"], ["output_dense"])
LM_TARGETS["wav2vec2-conformer"] = (["linear_q", "linear_k", "linear_v", "linear_out", "intermediate_dense",
                                     "output_dense"], ["linear_k", "linear_v", "output_dense"], ["output_dense"])
# Parakeet's FastConformer blocks: the attention projections and both feed-forward layers
LM_TARGETS["parakeet_ctc"] = (["q_proj", "k_proj", "v_proj", "o_proj", "linear1", "linear2"],
                              ["k_proj", "v_proj", "linear2"], ["linear2"])


def ctc_head(model: nn.Module) -> str:
    """The attribute of a ``*ForCTC`` model's head, trained under every strategy (saved beside an adapter):
    ``lm_head`` (wav2vec2 and its kin), ``ctc_head`` (Parakeet)."""
    return "lm_head" if hasattr(model, "lm_head") else "ctc_head"


PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|endoftext|>", "<unk>")
# A batch whose rows all start with at least this many identical tokens runs them once (TargetLogits)
MIN_SHARED_PREFIX = 8


def is_causal_lm(config: Any) -> bool:
    """Whether a transformers config describes a model that generates text left to right."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)


def is_text_seq2seq(config: Any) -> bool:
    """Whether a transformers config describes an encoder-decoder that writes text from text (T5, BART ...; not a
    speech model, whose encoder reads audio)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return (bool(getattr(config, "is_encoder_decoder", False)) and kind in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
            and kind not in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES)


def is_decoder_only(config: Any) -> bool:
    """Whether a transformers config describes a causal decoder (GPT-2, Llama, Qwen ...), whatever head it was
    saved with: each position reads only the positions before it."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    if is_causal_lm(config):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)  # (BERT's kin have a causal-LM head too, but are encoders)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def set_pad(tokenizer: Any, model: nn.Module | None = None) -> None:
    """A padding token distinct from the end-of-sequence token. Where the two are one token,
    tools that mask padding in the labels also mask every EOS, and the model never learns to
    stop (TRL #1623, #2059). Padding is masked here by position, never by id, but a distinct id
    keeps an exported model safe in those tools too."""
    if tokenizer.eos_token_id is None and getattr(tokenizer, "sep_token", None) is not None:
        tokenizer.eos_token = tokenizer.sep_token  # a WordPiece tokenizer (a BERT-initialised encoder-decoder): [SEP]
        for where in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            if where is not None:  # (what plain transformers stops at too, once exported)
                where.eos_token_id = tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no end-of-sequence token; a generation model needs one to stop (set "
                         "eos_token in the model folder's tokenizer_config.json)")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == eos:
        vocab = tokenizer.get_vocab()
        pick = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != eos), None)
        if pick is None:
            pick = next(t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i != eos)
        tokenizer.pad_token = pick
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def create(model_cfg: Any, task: Any) -> tuple[nn.Module, Any, int, str]:
    """The pretrained model that generates named by ``model_cfg.name`` (a zoo name or a local folder: a causal LM,
    or a text encoder-decoder such as T5 or BART), its tokenizer, the tokens kept per example (a causal LM: prompt
    and completion together; an encoder-decoder: each of them) and its family (FAMILY or SEQ2SEQ_FAMILY)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from fmtune.zoo.models import resolve

    family, path = resolve(model_cfg.name)
    if family not in ("hf", FAMILY):
        raise ModelError(f"task {task.name} needs a model that generates text; {model_cfg.name} is an image model "
                         "(use smollm2-135m, or a local folder of a *ForCausalLM or T5/BART-like model)")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(f"cannot read the model config at {path}: {e}") from None
    seq2seq = is_text_seq2seq(config)
    if getattr(config, "is_encoder_decoder", False) and not seq2seq:
        raise ModelError(f"task {task.name} needs a model that generates text from text; {model_cfg.name} is a "
                         f"{config.model_type} encoder-decoder whose encoder does not read text (a speech model: "
                         "--task speech); use smollm2-135m, a local folder of a *ForCausalLM model, a T5/BART-like "
                         "model or a GGUF file")
    if not seq2seq and not is_causal_lm(config):
        raise ModelError(f"task {task.name} needs a model that generates text; {model_cfg.name} is a "
                         f"{config.model_type} model that does not (architectures: "
                         f"{', '.join(getattr(config, 'architectures', None) or ['?'])}); use smollm2-135m or a "
                         "local folder of a *ForCausalLM or T5/BART-like (*ForConditionalGeneration) model")
    model, tokenizer = load_pretrained(path, config, model_cfg.init, AutoModelForSeq2SeqLM if seq2seq
                                       else AutoModelForCausalLM)
    set_pad(tokenizer, model)
    if seq2seq:
        decoder_start(model)  # (an error now, not at the first batch)
    # T5 counts relative positions and holds no table (its n_positions: the length it was trained at)
    context = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
               or DEFAULT_MAX_LENGTH)
    return (model, tokenizer, resolve_max_length(model_cfg.max_length, DEFAULT_MAX_LENGTH, context, model_cfg.name),
            SEQ2SEQ_FAMILY if seq2seq else FAMILY)


def load_pretrained(path: Path | str, config: Any, init: str, auto: Any) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a transformers folder through ``auto`` (an AutoModelFor... class):
    its pretrained weights, or ``config`` freshly initialised (``model.init: random``), in fp32."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if init == "pretrained":
            model = auto.from_pretrained(path, dtype=torch.float32)
        else:
            model = auto.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"cannot load the pretrained model at {path}: {brief(e)}") from None
    return model, tokenizer


# --- what trains -----------------------------------------------------------------------------------

def _linear_names(model: nn.Module) -> list[str]:
    from fmtune.adapters import is_linear

    out = model.get_output_embeddings()
    return [n for n, m in model.named_modules() if is_linear(m) and m is not out]


def _targets(model: nn.Module, cfg: Any) -> tuple[list[str], list[str]]:
    """(targets, ia3 feed-forward subset) as module-name suffixes, checked against the model."""
    arch = getattr(model.config, "model_type", "")
    names = _linear_names(model)
    if cfg.targets is None:
        if arch in LM_TARGETS:  # (the names this model has: T5 v1.0 has wi, v1.1 wi_0 and wi_1)
            short = {n.split(".")[-1] for n in names}
            lora, ia3, ff = ([t for t in group if t in short] for group in LM_TARGETS[arch])
            return (ia3, ff) if cfg.name == "ia3" else (lora, [])
        from fmtune.strategies import block_list

        if getattr(model.config, "is_encoder_decoder", False):  # the blocks of encoder and decoder alike
            inside = {id(m) for top in (model.get_encoder(), model.get_decoder()) for m in top.modules()}
        else:
            loc = block_list(model)
            inside = {id(m) for m in getattr(*loc).modules()} if loc else set()
        wanted = sorted({n.split(".")[-1] for n, m in model.named_modules() if id(m) in inside and n in names})
        if {"q_proj", "v_proj"} <= set(wanted):  # a Llama-like block of an unlisted model: its projections (not an
            lora, ia3, ff = LM_TARGETS["llama"]  # MoE router, which returns its choices too)
            return [t for t in (ia3 if cfg.name == "ia3" else lora) if t in wanted], [t for t in ff if t in wanted]
        if cfg.name != "ia3":
            from fmtune.adapters import not_lora

            wanted = [w for w in wanted if w not in not_lora(arch)]
        return wanted, ([w for w in wanted if "down" in w or "fc2" in w or "c_proj" in w] if cfg.name == "ia3" else [])
    wanted = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    if wanted == ["all-linear"]:
        wanted = sorted({n.split(".")[-1] for n in names})
    short = sorted({n.split(".")[-1] for n in names})
    for t in wanted:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ConfigError(f"strategy.targets: {t!r} matches no linear layer of this "
                              f"{type(model).__name__}; valid targets: {', '.join(short)}")
    ff = [t for t in wanted if t in LM_TARGETS.get(arch, ([], [], []))[2]]
    return wanted, ff


def apply_strategy(bundle: Any, cfg: Any) -> dict[str, int]:
    """Make ``bundle.model`` train what strategy ``cfg`` says (peft strategies wrap it). Returns
    the parameter counts, as ``fmtune.strategies.apply_strategy`` does. A CTC model's head always
    trains and its convolutional feature encoder never does (as in wav2vec2's own recipe)."""
    model = bundle.model
    base = sum(p.numel() for p in model.parameters())
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    ctc = bundle.family == CTC_FAMILY
    allowed = tuple(s for s in LM_STRATEGIES if not ((seq2seq or ctc) and s == "prompt"))
    if cfg.name not in allowed:
        what = ("speech recognition" if bundle.kind == "audio" else "an encoder-decoder (virtual tokens go before "
                "a decoder-only model's prompt)" if cfg.name == "prompt" else "text generation")
        why = "" if cfg.name == "prompt" else " (there is no separate head)"
        raise ConfigError(f"strategy {cfg.name} does not apply to {what}{why}; use one of: {', '.join(allowed)} "
                          "(lora is the default)")
    from fmtune import adapters

    if adapters.is_peft(cfg.name):
        import peft

        for p in model.parameters():
            p.requires_grad_(False)
        # (speech models: no task type, peft's seq2seq wrapper expects text)
        task_type = (None if bundle.kind == "audio" else peft.TaskType.SEQ_2_SEQ_LM if seq2seq
                     else peft.TaskType.CAUSAL_LM)
        extra = {"modules_to_save": [ctc_head(model)]} if ctc else {}
        if cfg.name == "prompt":
            pc = peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=cfg.virtual_tokens)
        else:
            targets, ff = _targets(model, cfg)
            extra.update(adapters.transposed(model, targets))
            if cfg.name == "ia3":
                pc = peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=ff, **extra)
            else:
                pc = peft.LoraConfig(task_type=task_type, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                     target_modules=targets, use_dora=cfg.name == "dora", **extra)
        pc.base_model_name_or_path = adapters.base_path(bundle.source)
        with adapters._quiet():
            bundle.model = peft.get_peft_model(model, pc, adapter_name=adapters.ADAPTER_NAME)
        bundle.adapter = cfg.name
    else:
        trainable = {n for n, _ in model.named_parameters()}
        if cfg.name == "last_n":
            from fmtune.strategies import backbone_blocks

            top = model if ctc else model.get_decoder()  # an encoder-decoder's last blocks are the decoder's
            # (T5's blocks by name: a small T5's longest list of modules is the 3 layers inside a decoder block)
            blocks = list(top.block) if isinstance(getattr(top, "block", None), nn.ModuleList) else backbone_blocks(top)
            if cfg.n > len(blocks):
                raise ConfigError(f"strategy.n: {cfg.n} is more than the {len(blocks)} blocks of this model")
            ids = {id(p) for b in blocks[-cfg.n:] for p in b.parameters()}
            norm = next((m for m in (getattr(top, a, None) for a in ("norm", "final_layernorm", "layer_norm",
                                                                       "final_layer_norm")) if m is not None), None)
            ids |= {id(p) for p in (norm.parameters() if norm is not None else [])}
            if ctc:
                ids |= {id(p) for p in getattr(model, ctc_head(model)).parameters()}
            trainable = {n for n, p in model.named_parameters() if id(p) in ids}
        if ctc:  # the convolutional feature encoder stays as pretrained
            from fmtune.strategies import waveform_convs

            trainable -= waveform_convs(model)
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
    total = sum(p.numel() for p in bundle.model.parameters())
    n_train = sum(p.numel() for p in bundle.model.parameters() if p.requires_grad)
    return {"trainable_params": n_train, "total_params": total, "base_params": base}


def _cache_arg(decoder: nn.Module) -> str:
    """The keyword a transformers decoder takes its KV cache by (``cache`` since 5.2x, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _repeatable(cache: Any) -> bool:
    """Whether a cache can be repeated for every row of a batch (transformers' recurrent layers cannot)."""
    return hasattr(cache, "batch_repeat_interleave") and all(
        hasattr(layer, "batch_repeat_interleave") for layer in getattr(cache, "layers", []))


def check_packing(bundle: Any) -> None:
    """``train.packing`` runs a batch's examples as one sequence, attention kept within each by restarting the
    position ids: a model whose layers carry a state along the sequence (Mamba's, RWKV's, a convolution's) would
    read each example after the ones before it. Checked on the model: the second of two packed runs of tokens must
    read as it does alone."""
    lm = plain(bundle.model)
    if getattr(lm.config, "is_encoder_decoder", False):
        raise ConfigError(f"train.packing: {bundle.source} is an encoder-decoder ({lm.config.model_type}); packing "
                          "runs a decoder-only model's examples as one sequence; leave train.packing off")
    decoder = lm.get_decoder()
    device = next(lm.parameters()).device
    ids = (torch.arange(5, 15, device=device) % lm.config.vocab_size)[None]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            alone = decoder(input_ids=ids[:, 5:], use_cache=False)[0]
            positions = torch.arange(5, device=device).repeat(2)[None]
            packed = decoder(input_ids=ids, position_ids=positions, use_cache=False)[0][:, 5:]
    finally:
        lm.train(was_training)
    tol = 1e-3 if next(lm.parameters()).dtype == torch.float32 else 3e-2  # (half-precision weights: their rounding)
    if not torch.allclose(alone.float(), packed.float(), rtol=tol, atol=tol * 0.1):
        raise ConfigError(f"train.packing: {bundle.source} reads a packed batch as one text (its "
                          f"{lm.config.model_type} layers carry a state from one example into the next); "
                          "leave train.packing off")


# Activations a training step keeps per token, decoder layer and hidden unit. Measured: SmolLM2-135M (30 layers,
# hidden 576), LoRA, bf16 autocast on a CPU, 8 rows x 256 tokens: 6.05 GB peak above the model = 171 bytes.
ACTIVATION_BYTES = 171


def _width_times_layers(config: Any) -> int:
    """Hidden size x layers of a model, every layer of an encoder-decoder counted (T5's num_decoder_layers, BART's
    decoder_layers; a composed EncoderDecoderModel's two configs)."""
    parts = [c for c in (getattr(config, "encoder", None), getattr(config, "decoder", None)) if hasattr(c, "to_dict")]
    if parts:
        return sum(c.hidden_size * c.num_hidden_layers for c in parts)
    layers = config.num_hidden_layers
    if getattr(config, "is_encoder_decoder", False):
        layers += getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or layers
    return config.hidden_size * layers


def checkpointing(bundle: Any, train: Any, lengths: np.ndarray, device: str) -> str | None:
    """``train.gradient_checkpointing`` for a causal LM: turn it on (true; auto: when the largest
    batch, ``train.batch_size`` rows of the longest example, would keep more than half the memory
    available) and say why; None when it stays off."""
    lm = plain(bundle.model)
    setting = train.gradient_checkpointing
    if setting is False or not getattr(lm, "supports_gradient_checkpointing", False) or not len(lengths):
        return None
    rows, longest = min(train.batch_size, len(lengths)), int(np.max(lengths))
    need = ACTIVATION_BYTES * _width_times_layers(lm.config) * rows * longest
    from fmtune.training.memory import available_bytes

    available = available_bytes(device)
    if setting == "auto" and need <= available / 2:
        return None
    lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if setting is True:
        return "on (train.gradient_checkpointing=true): each layer recomputed in the backward pass"
    return (f"on: the largest batch ({rows} rows x {longest} tokens) would keep about {need / 2**30:.1f} GiB of "
            f"activations, more than half the {available / 2**30:.1f} GiB available; each layer is recomputed in "
            "the backward pass instead (slower: +53% a step measured on SmolLM2)")


class TargetLogits(nn.Module):
    """What training batches are fed to: the logits at the positions listed in ``target_index``
    (flat indices into batch x length) only. The output layer of a 49k-token vocabulary is a
    fifth of a small model's compute and most of its activation memory; prompts, padding and
    the last position never need it."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer  # what evaluation generates with
        self.shares_prefix = True  # the rows' shared first tokens run once (False once its cache cannot be repeated)

    def forward(self, input_ids: torch.Tensor, target_index: torch.Tensor, attention_mask: torch.Tensor | None = None,
                prefix: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> types.SimpleNamespace:
        if prompt_tuned(self.model):  # peft puts the virtual tokens in front: through its own forward
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits[:, -input_ids.shape[1]:].flatten(0, 1).index_select(0, target_index)
            return types.SimpleNamespace(logits=logits)
        lm = plain(self.model)
        decoder = lm.get_decoder()
        shared = int(prefix) if prefix is not None else 0
        rows = input_ids.shape[0]
        if position_ids is not None:  # packed examples (no mask: transformers masks by restarting positions)
            hidden = decoder(input_ids=input_ids, position_ids=position_ids, use_cache=False)[0]
        elif (shared >= MIN_SHARED_PREFIX and rows > 1 and not (lm.training and lm.is_activation_checkpointing)
              and self.shares_prefix):
            # the tokens every row starts with (chat template, system prompt, instruction) run once: their
            # keys and values are repeated for every row, and the gradients of all rows flow back through them
            head = decoder(input_ids=input_ids[:1, :shared], use_cache=True)
            cache = _cache_of(head)
            self.shares_prefix = _repeatable(cache)
            if self.shares_prefix:
                cache.batch_repeat_interleave(rows)
                rest = decoder(input_ids=input_ids[:, shared:], attention_mask=attention_mask, use_cache=True,
                               **{_cache_arg(decoder): cache})[0]
                hidden = torch.cat([head[0].expand(rows, -1, -1), rest], dim=1)
            else:  # a recurrent state (Mamba's) this transformers cannot repeat per row: the whole rows
                hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        else:
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
        picked = hidden.flatten(0, 1).index_select(0, target_index)
        return types.SimpleNamespace(logits=lm.get_output_embeddings()(picked))


class Seq2SeqLogits(nn.Module):
    """What training batches of an encoder-decoder (T5, BART ...) are fed to: the prompt through the encoder, the
    completion shifted right through the decoder (teacher forcing), and the logits at the positions listed in
    ``target_index`` (flat into batch x decoder length: every completion token, no padding). The model's own forward
    (T5 scales the decoder's output before its tied output layer), through a peft adapter alike."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer  # what evaluation generates with

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                decoder_attention_mask: torch.Tensor, target_index: torch.Tensor) -> types.SimpleNamespace:
        out = plain(self.model)(input_ids=input_ids, attention_mask=attention_mask,
                                decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
                                use_cache=False)
        return types.SimpleNamespace(logits=out.logits.flatten(0, 1).index_select(0, target_index))


# --- save and load ---------------------------------------------------------------------------------

def write(bundle: Any, folder: Path) -> None:
    """The model (or its adapter) and tokenizer into ``folder`` (``fmtune.models.build.save`` makes
    it atomic and adds fmtune.json)."""
    if bundle.adapter:
        from fmtune import adapters

        adapters.save(bundle.model, folder)
    else:
        bundle.model.save_pretrained(folder, safe_serialization=True)
    bundle.tokenizer.save_pretrained(folder)


def auto_class(family: str | None) -> Any:
    """The transformers class a saved folder of this family loads with."""
    if family == SEQ2SEQ_FAMILY:
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM
    if family == SPEECH_FAMILY:  # (Whisper, Moonshine, Speech2Text)
        from transformers import AutoModelForSpeechSeq2Seq

        return AutoModelForSpeechSeq2Seq
    if family == CTC_FAMILY:
        from transformers import AutoModelForCTC

        return AutoModelForCTC
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def load(model_dir: Path, meta: dict[str, Any]) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a folder written by ``write``; ``meta``: its fmtune.json."""
    from transformers import AutoTokenizer

    auto = auto_class(meta.get("family"))
    adapter = meta.get("adapter")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if adapter:
            from transformers import AutoConfig

            from fmtune import adapters
            from fmtune.zoo.models import resolve_base

            _, path = resolve_base(meta["source"], meta.get("converted"))
            config = AutoConfig.from_pretrained(path)
            head = {}
            if meta.get("family") == CTC_FAMILY and not any(a.endswith("ForCTC") for a in config.architectures or []):
                # an encoder without a CTC head (wav2vec2-base, w2v-BERT 2.0): the run built its vocabulary and head
                # (models.ctc.create); the base gets a head of that size, which the adapter's saved head replaces
                config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
                head = {"ignore_mismatched_sizes": True}
            base = auto.from_pretrained(path, config=config, dtype=torch.float32, **head)
            model = adapters.load(base, model_dir)
        else:
            model = auto.from_pretrained(model_dir, dtype=torch.float32)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load the generation model in {model_dir}: {e}") from None
    if meta.get("family") in TEXT_FAMILIES:  # speech models' padding ids stay as trained (CTC: the blank)
        set_pad(tokenizer, plain(model))
    model.eval()
    return model, tokenizer


def load_weights(bundle: Any, model_dir: Path) -> None:
    """The weights saved in ``model_dir`` into the bundle's (already built) model."""
    if bundle.adapter:
        from fmtune import adapters

        adapters.load_weights(bundle.model, model_dir)
        return
    # transformers reads the folder: it renames the keys of architectures whose saved names differ
    # from their modules' (GPT-NeoX saves its output layer as embed_out, its module is lm_head) and ties
    # an output layer stored once
    try:
        saved = type(bundle.model).from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:
        raise ModelError(f"{model_dir}: cannot read the saved weights: {e}") from None
    missing, unexpected = bundle.model.load_state_dict(saved.state_dict(), strict=False)
    if missing or unexpected:
        raise ModelError(f"{model_dir}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")


def merged(bundle: Any) -> nn.Module:
    """The plain transformers model, with a LoRA/DoRA/IA3 adapter folded into its weights."""
    if not bundle.adapter:
        return bundle.model
    from fmtune import adapters

    return adapters.merge(bundle.model, bundle.adapter)
