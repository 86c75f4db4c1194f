"""A transformers backbone + pooling + linear head, as a PreTrainedModel.

This file is self-contained (torch + transformers only): fmtune copies it into every saved
run as ``model/modeling_fmtune.py`` so that the model loads without fmtune:

    AutoModelForSequenceClassification.from_pretrained(run / "model", trust_remote_code=True)
    AutoModelForImageClassification.from_pretrained(run / "model", trust_remote_code=True)

Its config.json has model type ``fmtune`` (FmtuneConfig): without ``trust_remote_code`` the load
fails with transformers' error, never silently gives a stock model with random weights.

(token-level runs are saved in transformers' own ``*ForTokenClassification`` layout instead, and load
with ``AutoModelForTokenClassification.from_pretrained(run / "model")``.)

The head reads the representation the backbone was trained to give (``config.fmtune_pooling``):
``mean`` (masked mean of the last hidden states: sentence-transformers encoders), ``cls`` (the
first token), ``last`` (the last real token: a causal decoder, whose other positions have not read
the whole text), or ``pooler`` (the model's own pooled output: global pooling for CNNs). A token-level
head (``config.fmtune_level == "tokens"``: named entities) reads every token's last hidden state.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput, TokenClassifierOutput


def build_backbone(config: PreTrainedConfig, pooling: str, path: str | None = None) -> nn.Module:
    """AutoModel from ``path`` (pretrained) or from ``config`` (random init), without an unused pooler; of an
    encoder-decoder (Whisper, T5, BART), its encoder."""
    config = backbone_config(config)  # a saved model's FmtuneConfig: its backbone's own config class
    if getattr(config, "model_type", None) == "whisper":  # audio: the encoder of the encoder-decoder
        from transformers import WhisperModel
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if path is None:
            return WhisperEncoder(copy.deepcopy(config))
        return WhisperModel.from_pretrained(path, config=config).encoder
    if getattr(config, "is_encoder_decoder", False):  # a text encoder-decoder (T5, BART ...): its encoder reads
        if path is None:
            return AutoModel.from_config(copy.deepcopy(config)).get_encoder()
        return AutoModel.from_pretrained(path, config=config).get_encoder()
    kwargs = {} if pooling == "pooler" else {"add_pooling_layer": False}
    auto = AutoModel
    if type(config) not in AutoModel._model_mapping:  # a tower AutoModel does not map (SigLIP's text tower)
        import transformers

        auto = getattr(transformers, type(config).__name__.replace("Config", "Model"), AutoModel)
    for kw in (kwargs, {}):  # not every architecture takes add_pooling_layer
        try:
            if path is None:  # a copy: from_config settles the attention implementation on the config it gets
                if auto is AutoModel:
                    return AutoModel.from_config(copy.deepcopy(config), **kw)
                return auto._from_config(copy.deepcopy(config), **kw)
            return auto.from_pretrained(path, config=config, **kw)
        except TypeError:
            continue
    raise RuntimeError("unreachable")


def image_kwargs(backbone: nn.Module, pixel_values: torch.Tensor) -> dict[str, bool]:
    """What a transformers image model needs to read images of another size than its own: ViT,
    DeiT, CLIP and SigLIP interpolate their position embeddings only when asked."""
    import inspect

    own = getattr(getattr(backbone, "config", None), "image_size", None)
    if own is None or tuple(pixel_values.shape[-2:]) == ((own, own) if isinstance(own, int) else tuple(own)):
        return {}
    try:
        takes = "interpolate_pos_encoding" in inspect.signature(backbone.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"interpolate_pos_encoding": True} if takes else {}


def pool(outputs, attention_mask: torch.Tensor | None, mode: str, skip: int = 0) -> torch.Tensor:
    """Reduce backbone outputs to one feature vector per example, leaving out the first ``skip``
    positions (virtual tokens that prompt tuning put before the text)."""
    if mode == "pooler":
        out = getattr(outputs, "pooler_output", None)
        if out is not None:  # (a map, TextNet's: its mean, as its classifier pools it)
            return out.mean(dim=(2, 3)) if out.dim() == 4 else out.flatten(1)
        # a CNN-like model without a pooled output (SegFormer's encoder): the mean of its last map, as its classifier
    hidden = outputs.last_hidden_state if "last_hidden_state" in outputs else outputs.feature_maps[-1]  # (a backbone)
    if hidden.dim() == 4:  # a feature map (B, C, H, W): CNNs, and ViTDet, whose tokens come back as a map
        return hidden.mean(dim=(2, 3))
    if skip:
        hidden = hidden[:, skip:]
        attention_mask = attention_mask[:, skip:] if attention_mask is not None else None
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":  # the last position the mask keeps (padding on either side)
        if attention_mask is None:
            return hidden[:, -1]
        at = (attention_mask.long() * torch.arange(1, hidden.shape[1] + 1, device=hidden.device)).argmax(1)
        return hidden.gather(1, at[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def guard_group_norm(model: nn.Module) -> None:
    """torch 2.13's GroupNorm backward on the CPU crashes the process (a segmentation fault) when its input is
    channels_last and needs no gradient while its weight or bias does: the first trainable normalisation after
    frozen layers (last_n, bitfit) of a model that normalises with GroupNorm (PoolFormer, BiT, MobileViTv2 ...),
    fed fmtune's channels_last images. Such an input is made contiguous first (one copy, only there)."""
    for m in model.modules():
        if isinstance(m, nn.GroupNorm) and _contiguous_input not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_contiguous_input)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    x = args[0]
    if (torch.is_grad_enabled() and not x.requires_grad and x.dim() == 4 and not x.is_contiguous()
            and any(p.requires_grad for p in module.parameters(recurse=False))):
        return (x.contiguous(), *args[1:])
    return None


def whisper_states(encoder: nn.Module, input_features: torch.Tensor,
                   frame_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Whisper's encoder over log-mel windows of any length up to its own (30 s): the positions
    are sliced to the input's length and padded frames are masked out of attention (transformers'
    WhisperEncoder accepts exactly 3,000 frames: a 1-second clip would cost 30 seconds of compute).
    Returns the last hidden states and the mask of real positions."""
    x = nn.functional.gelu(encoder.conv1(input_features))
    x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)
    n = x.shape[1]
    if n > encoder.embed_positions.num_embeddings:
        raise ValueError(f"{input_features.shape[-1]} frames is longer than the encoder's window "
                         f"({2 * encoder.embed_positions.num_embeddings} frames)")
    x = x + encoder.embed_positions.weight[:n]
    mask = None if frame_mask is None else frame_mask[:, ::2][:, :n]
    bias = None
    # (exporting: always the mask, a graph cannot branch on the data)
    if mask is not None and (torch.compiler.is_exporting() or not bool(mask.all())):
        bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        bias = bias.masked_fill(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
    for layer in encoder.layers:
        x = layer(x, bias)
    return encoder.layer_norm(x), mask


def stacked_input(encoder: nn.Module) -> bool:
    """Whether ``encoder`` reads stacked filterbank frames (w2v-BERT: ``input_features``, windows x frames x
    features), as a wav2vec2 reads the waveform."""
    return hasattr(encoder.config, "feature_projection_input_dim")


def encodes_in_groups(config: object) -> bool:
    """Whether a raw-waveform encoder of ``config`` reads a batch's windows in groups of equal length
    (``waveform_states``): those normalising their first convolution over the whole window."""
    return getattr(config, "feat_extract_norm", "layer") != "layer"


def waveform_states(encoder: nn.Module, input_values: torch.Tensor, sample_mask: torch.Tensor | None = None,
                    grouped: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A raw-waveform encoder (wav2vec2, HuBERT, WavLM ...) over zero-padded windows: the last hidden
    states and the mask of frames that cover real samples. w2v-BERT's stacked filterbank frames (windows x
    frames x features, ``sample_mask`` over frames) are read the same way (it is trained with the mask).

    Models trained with an attention mask (``feat_extract_norm: layer``) get it. The others
    (wav2vec2-base and its group-norm kin) normalise their first convolution over the whole window,
    padding included, so a padded window would read differently from the same window alone: their
    windows run in groups of equal length, unpadded, and a prediction never depends on its batch; so do those of
    ``grouped`` (Moonshine's encoder: its first convolution's group norm spans the window; Speech2Text's: its second
    strided convolution reads what the first made of the padding)."""
    lengths = None if sample_mask is None else sample_mask.sum(-1)
    if (not encodes_in_groups(encoder.config) and not grouped) or lengths is None:
        hidden = encoder(input_values, attention_mask=sample_mask).last_hidden_state
    elif torch.compiler.is_exporting() or bool((lengths == input_values.shape[-1]).all()):
        hidden = encoder(input_values).last_hidden_state  # (an ONNX graph: its runner groups by length)
    else:
        parts = [(rows, encoder(input_values[rows, :n]).last_hidden_state) for rows, n in length_groups(sample_mask)]
        width = max(h.shape[1] for _, h in parts)
        hidden = parts[0][1].new_zeros((input_values.shape[0], width, parts[0][1].shape[-1]))
        for rows, h in parts:
            hidden[rows, : h.shape[1]] = h
    if lengths is None:
        return hidden, None
    frames = output_frames(encoder, lengths)
    return hidden, (torch.arange(hidden.shape[1], device=hidden.device)[None, :] < frames[:, None]).long()


def output_frames(model: nn.Module, lengths: torch.Tensor) -> torch.Tensor:
    """The frames a speech encoder (or a model holding one) gives inputs of ``lengths`` (samples, or feature
    frames): transformers' own count, ``_get_feat_extract_output_lengths`` (wav2vec2 and its kin, Speech2Text,
    Moonshine: one number at a time) or ``_get_subsampling_output_length`` (Parakeet)."""
    count = getattr(model, "_get_feat_extract_output_lengths", None) or model._get_subsampling_output_length
    try:
        frames = count(lengths)
    except (RuntimeError, ValueError):
        frames = None
    if not isinstance(frames, torch.Tensor):  # (Moonshine's count takes one number, not a tensor)
        frames = torch.tensor([int(count(int(n))) for n in lengths.tolist()], device=lengths.device)
    return frames.long()


def length_groups(mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """(rows, length) of each group of equal-length rows of a padded batch."""
    lengths = mask.sum(-1)
    return [((lengths == n).nonzero().flatten(), int(n)) for n in lengths.unique().tolist()]


def per_clip(pooled: torch.Tensor, clip_index: torch.Tensor | None) -> torch.Tensor:
    """The mean of the pooled features of each clip's windows (one row per clip)."""
    if clip_index is None:
        return pooled
    n = int(clip_index.max()) + 1
    sums = torch.zeros((n, pooled.shape[1]), dtype=pooled.dtype, device=pooled.device).index_add(0, clip_index, pooled)
    counts = torch.bincount(clip_index, minlength=n).to(pooled.dtype)
    return sums / counts[:, None]


def token_states(outputs, skip: int = 0) -> torch.Tensor:
    """Every token's last hidden state, leaving out the first ``skip`` (prompt tuning's virtual tokens)."""
    hidden = outputs.last_hidden_state
    return hidden[:, skip:] if skip else hidden


FMTUNE_MODEL_TYPE = "fmtune"
KEPT_OUT = ("name_or_path", "attn_implementation", "experts_implementation", "output_attentions",
            "transformers_version")


class FmtuneConfig(PreTrainedConfig):
    """The config.json of a saved pooled model. Its model type is fmtune's own, so loading the
    folder without ``trust_remote_code`` fails with an error instead of building a stock,
    randomly initialised model of the backbone's type; the backbone's settings are kept as they
    are, with its model type in ``fmtune_backbone_model_type``."""

    model_type = FMTUNE_MODEL_TYPE

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # what PreTrainedConfig drops: a backbone's settings named like generation parameters (AST's max_length,
        # the frames its position embeddings cover), kept for backbone_config
        self.fmtune_backbone_kept = {k: v for k, v in kwargs.items()
                                     if not hasattr(self, k) and k not in KEPT_OUT and not k.startswith("_")}


def backbone_config(config: PreTrainedConfig) -> PreTrainedConfig:
    """The backbone's own config class (BertConfig, ViTConfig, ...) for an FmtuneConfig; any other
    config as it is."""
    if getattr(config, "model_type", None) != FMTUNE_MODEL_TYPE:
        return config
    return config_from_values(config.to_dict())


def config_from_values(values: dict) -> PreTrainedConfig:
    """The backbone's config class built from the values of an fmtune config.json."""
    from transformers import AutoConfig

    values = {k: v for k, v in values.items() if k not in ("model_type", "transformers_version")}
    values.update(values.pop("fmtune_backbone_kept", None) or {})
    return AutoConfig.for_model(values.pop("fmtune_backbone_model_type"), **values)


class FmtuneClassifier(PreTrainedModel):
    """Backbone -> pooling -> dropout -> linear. Serves classification, multi-label and regression;
    with ``fmtune_level: tokens``, backbone -> token states -> dropout -> linear per token."""

    base_model_prefix = "fmtune"
    supports_gradient_checkpointing = True
    config_class = FmtuneConfig

    def __init__(self, config: PreTrainedConfig, backbone: nn.Module | None = None):
        super().__init__(backbone_config(config))
        config = self.config
        self.pooling = getattr(config, "fmtune_pooling", "mean")
        self.level = getattr(config, "fmtune_level", "pooled")
        self.backbone = backbone if backbone is not None else build_backbone(config, self.pooling)
        guard_group_norm(self.backbone)
        self.head = nn.Sequential(
            nn.Dropout(getattr(config, "fmtune_head_dropout", 0.1)),
            nn.Linear(config.fmtune_num_features, config.num_labels),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # Only the head is ever created here without pretrained weights worth keeping.
        if module is getattr(self, "head", None):
            lin = module[1]
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def features(self, input_ids=None, attention_mask=None, pixel_values=None, input_features=None,
                 frame_mask=None, clip_index=None, input_values=None, **kwargs) -> torch.Tensor:
        if input_values is not None and input_values.dim() == 3:  # a filterbank (AST): (windows, frames, mel bins)
            return per_clip(pool(self.backbone(input_values=input_values), None, self.pooling), clip_index)
        if input_features is not None or input_values is not None:  # audio windows, averaged per clip
            # (transformers' feature extractors call the mask attention_mask)
            mask = frame_mask if frame_mask is not None else attention_mask
            if input_features is not None and stacked_input(self.backbone):  # w2v-BERT's stacked filterbank
                hidden, mask = waveform_states(self.backbone, input_features, mask)
            elif input_features is not None:  # log-mel (Whisper)
                hidden, mask = whisper_states(self.backbone, input_features, frame_mask)
            else:  # the waveform (wav2vec2 and its kin)
                hidden, mask = waveform_states(self.backbone, input_values, mask)
            return per_clip(pool(BaseModelOutput(last_hidden_state=hidden), mask, self.pooling), clip_index)
        if pixel_values is not None:
            outputs = self.backbone(pixel_values=pixel_values, **image_kwargs(self.backbone, pixel_values), **kwargs)
        else:
            outputs = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # prompt tuning (peft) feeds the virtual tokens first; the head reads the text's positions
        skip = getattr(self.config, "fmtune_virtual_tokens", 0) if input_ids is None else 0
        if self.level == "tokens":
            return token_states(outputs, skip)
        return pool(outputs, attention_mask, self.pooling, skip)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features -> outputs. Regression heads predict in target units: a standardised
        output mapped back by a fixed affine (the training targets' std and mean)."""
        logits = self.head(features)
        scale = getattr(self.config, "fmtune_output_scale", 1.0)
        shift = getattr(self.config, "fmtune_output_shift", 0.0)
        if scale != 1.0 or shift != 0.0:
            logits = logits * scale + shift
        return logits

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        kwargs.pop("return_dict", None)
        logits = self.classify(self.features(input_ids, attention_mask, pixel_values, **kwargs))
        loss = None
        if self.level == "tokens":
            if labels is not None:
                loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            return TokenClassifierOutput(loss=loss, logits=logits)
        if labels is not None:
            if self.config.problem_type == "regression":
                loss = nn.functional.mse_loss(logits.view(-1), labels.float().view(-1))
            elif self.config.problem_type == "multi_label_classification":
                loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
