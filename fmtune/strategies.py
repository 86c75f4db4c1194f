"""What is trainable. ``apply_strategy`` is the one helper every strategy goes through: the
strategies written here (full, head, last_n, bitfit) are functions (model, config) -> names of
trainable parameters; the peft ones (lora, dora, ia3, prompt) wrap the model with an adapter
first (``fmtune.adapters``). The head is always trained.

Frozen BatchNorm layers stay in eval mode (``set_train_mode``): their running statistics
would otherwise drift with the new data although their weights are frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from fmtune.errors import ConfigError
from fmtune.registry import Registry

STRATEGIES: Registry[Callable[[nn.Module, Any], set[str]]] = Registry("strategy")


def block_list(backbone: nn.Module) -> tuple[nn.Module, str] | None:
    """(parent, attribute) of the longest ModuleList in a transformers backbone: its repeated
    blocks (``encoder.layer`` of BERT, ``layers`` of ViT and Llama-like models ...). Lists of
    blocks with linear layers come first: a small wav2vec2 has more feature convolutions than
    transformer layers."""
    from fmtune.adapters import is_linear

    best: tuple[nn.Module, str] | None = None
    rank = (False, 0)
    for _, parent in backbone.named_modules():
        for attr, mod in parent.named_children():
            if isinstance(mod, nn.ModuleList):
                r = (any(is_linear(m) for m in mod.modules()), len(mod))
                if r > rank:
                    best, rank = (parent, attr), r
    return best


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The backbone's repeated blocks, in order: ``blocks`` if it defines them, else the longest
    ModuleList."""
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    loc = block_list(backbone)
    if loc is None:
        raise ConfigError(f"strategy last_n: cannot find repeated blocks in {type(backbone).__name__}")
    return list(getattr(*loc))


def token_embeddings(backbone: nn.Module) -> nn.Embedding | None:
    """A text backbone's token-embedding matrix (one row per vocabulary entry), else None (an image
    or audio backbone's input layer is a convolution, not a lookup)."""
    get = getattr(backbone, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:
        return None
    return emb if isinstance(emb, nn.Embedding) else None


def keep_token_embeddings(bundle: Any, backbone: nn.Module, cfg: Any) -> int:
    """Freeze ``backbone``'s token-embedding matrix where ``strategy.freeze_embeddings`` asks and it
    applies (a text encoder with pretrained weights); returns how many weights were frozen (0: none)."""
    embeddings = token_embeddings(backbone)
    if not (cfg.freeze_embeddings and embeddings is not None and bundle.pretrained):
        return 0
    embeddings.weight.requires_grad_(False)
    return embeddings.weight.numel()


def _names_of(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def waveform_convs(model: nn.Module) -> set[str]:
    """The parameters of the convolutional feature encoder of every raw-waveform audio encoder
    (wav2vec2, HuBERT, WavLM ...) inside ``model``: they stay as pretrained under every strategy, as
    in these models' own fine-tuning recipes."""
    convs = [m.feature_extractor for m in model.modules()
             if hasattr(m, "_get_feat_extract_output_lengths") and isinstance(getattr(m, "feature_extractor", None),
                                                                              nn.Module)]
    return _names_of(model, convs)


@STRATEGIES.register("full")
def _full(model: nn.Module, cfg: Any) -> set[str]:
    """Every parameter, except a raw-waveform encoder's convolutional feature encoder (``waveform_convs``)."""
    return {n for n, _ in model.named_parameters()} - waveform_convs(model)


@STRATEGIES.register("head")
def _head(model: nn.Module, cfg: Any) -> set[str]:
    return _names_of(model, [model.head])


@STRATEGIES.register("contrastive")
def _contrastive(model: nn.Module, cfg: Any) -> set[str]:
    """The head, once fmtune.fewshot.contrastive has tuned the encoder (before training starts)."""
    return _names_of(model, [model.head])


@STRATEGIES.register("last_n")
def _last_n(model: nn.Module, cfg: Any) -> set[str]:
    blocks = backbone_blocks(model.backbone)
    if cfg.n > len(blocks):
        raise ConfigError(f"strategy.n: {cfg.n} is more than the {len(blocks)} blocks of this backbone")
    chosen = _names_of(model, blocks[-cfg.n:])
    # Parameters registered after the last block (final norm, pooler, head conv) belong to the top.
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    last_ids = {id(p) for p in blocks[-1].parameters()}
    from fmtune.adapters import backbone_name

    after, seen_last, prefix = set(), False, backbone_name(model)
    for n, p in model.backbone.named_parameters():
        seen_last = seen_last or id(p) in last_ids
        if seen_last and id(p) not in in_blocks:
            after.add(f"{prefix}.{n}")
    return chosen | after | _names_of(model, [model.head])


@STRATEGIES.register("bitfit")
def _bitfit(model: nn.Module, cfg: Any) -> set[str]:
    """BitFit (Ben Zaken et al., 2022): the backbone's bias terms, plus the head."""
    from fmtune.adapters import backbone_name

    prefix = backbone_name(model)
    return {f"{prefix}.{n}" for n, _ in model.backbone.named_parameters() if n.endswith("bias")}


# what a whole detector or segmenter trains with (models.whole); an adapter adapts its backbone, the rest (its head)
# trains and is saved with the adapter
WHOLE_MODEL_STRATEGIES = ("full", "head", "last_n", "bitfit", "lora", "dora", "ia3")


def apply_strategy(bundle: Any, cfg: Any) -> dict[str, int]:
    """Make ``bundle.model`` train what strategy ``cfg`` says and nothing else (wrapping it with a
    peft adapter for lora/dora/ia3/prompt). Returns the parameter counts: trainable, total, and
    ``base_params`` (the plain model's, which full fine-tuning would train)."""
    from fmtune import adapters

    model = bundle.model
    if getattr(model, "whole", False) and cfg.name not in WHOLE_MODEL_STRATEGIES:
        raise ConfigError(f"strategy {cfg.name}: a whole {model.kind} ({type(model.net).__name__}) trains with "
                          f"{', '.join(WHOLE_MODEL_STRATEGIES)} (head: all but its backbone, which stays frozen)")
    base = sum(p.numel() for p in model.parameters())
    frozen_embeddings = 0
    if adapters.is_peft(cfg.name):
        for p in model.parameters():
            p.requires_grad_(False)
        bundle.model = adapters.wrap(bundle, cfg)  # trains the adapter and (modules_to_save) the head
        bundle.adapter = cfg.name
    else:
        if cfg.name == "bitfit" and not any(n.endswith("bias") for n, _ in model.backbone.named_parameters()):
            raise ConfigError(f"strategy bitfit: the {type(model.backbone).__name__} backbone has no bias terms "
                              "to train; use lora, ia3 or last_n")
        trainable = STRATEGIES.get(cfg.name, "strategy.name")(model, cfg) | _names_of(model, [model.head])
        for n, p in model.named_parameters():
            p.requires_grad_(n in trainable)
        if cfg.name == "full":
            frozen_embeddings = keep_token_embeddings(bundle, model.backbone, cfg)
    total = n_train = 0
    for n, p in bundle.model.named_parameters():
        if ".original_module." in n:  # peft keeps the untrained head beside the trained copy
            continue
        total += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    counts = {"trainable_params": n_train, "total_params": total, "base_params": base}
    return counts | ({"frozen_embedding_params": frozen_embeddings} if frozen_embeddings else {})


WHOLE_BACKBONE = -1


def frozen_prefix(model: nn.Module) -> int:
    """How much of the backbone is a fixed function of the input: ``WHOLE_BACKBONE`` when nothing
    in it trains, else the number ``k`` of leading blocks that are frozen with nothing trainable
    before them (0: none). This part runs in eval mode, and its output can be cached."""
    backbone = model.backbone
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
    known = trainable | {id(p) for p in model.head.parameters()}
    if any(p.requires_grad and id(p) not in known for p in model.parameters()):
        return 0  # something trained outside backbone and head feeds the backbone (prompt tuning)
    if not trainable:
        return WHOLE_BACKBONE
    try:
        blocks = backbone_blocks(backbone)
    except ConfigError:
        return 0
    for k, block in enumerate(blocks):
        if any(id(p) in trainable for p in block.parameters()):
            first = {id(p) for p in block.parameters()}
            for p in backbone.parameters():  # registration order: is anything before block k trained?
                if id(p) in first:
                    return k
                if id(p) in trainable:
                    return 0
    return 0


def prefix_modules(model: nn.Module, k: int) -> list[nn.Module]:
    """The backbone's modules that run before block ``k`` (embeddings/stem and blocks < k)."""
    stop = {id(p) for p in backbone_blocks(model.backbone)[k].parameters()}
    out = []
    for m in model.backbone.modules():  # registration order
        own = {id(p) for p in m.parameters()}
        if own & stop:
            if own <= stop:
                break  # block k itself starts here
            continue  # a container of block k
        out.append(m)
    return out


def set_train_mode(model: nn.Module) -> None:
    """``model.train()``, except the frozen prefix of the backbone (a fixed feature extractor:
    no dropout noise) and BatchNorm layers whose scale is frozen stay in eval mode, so their
    running statistics do not drift (BitFit trains their shift only)."""
    model.train()
    if not hasattr(model, "backbone"):  # a model without a separate head (a causal LM): no frozen prefix
        return
    k = frozen_prefix(model)
    if k == WHOLE_BACKBONE:
        model.backbone.eval()
    elif k:
        for m in prefix_modules(model, k):
            m.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None and not m.weight.requires_grad:
                m.eval()  # frozen scale (head, last_n below the top, adapters, bitfit): statistics stay
