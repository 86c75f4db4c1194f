"""What is trainable. Every strategy is a function (model, config) -> names of trainable
parameters, applied by the one helper ``apply_strategy``; the head is always trained.

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
    blocks (``encoder.layer`` of BERT, ``layers`` of ViT and Llama-like models ...)."""
    best: tuple[nn.Module, str] | None = None
    size = 0
    for _, parent in backbone.named_modules():
        for attr, mod in parent.named_children():
            if isinstance(mod, nn.ModuleList) and len(mod) > size:
                best, size = (parent, attr), len(mod)
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


def _names_of(model: nn.Module, modules: list[nn.Module]) -> set[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


@STRATEGIES.register("full")
def _full(model: nn.Module, cfg: Any) -> set[str]:
    return {n for n, _ in model.named_parameters()}


@STRATEGIES.register("head")
def _head(model: nn.Module, cfg: Any) -> set[str]:
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
    after, seen_last = set(), False
    for n, p in model.backbone.named_parameters():
        seen_last = seen_last or id(p) in last_ids
        if seen_last and id(p) not in in_blocks:
            after.add("backbone." + n)
    return chosen | after | _names_of(model, [model.head])


def apply_strategy(model: nn.Module, cfg: Any) -> dict[str, int]:
    """Freeze everything the strategy does not train. Returns trainable / total parameter counts."""
    fn = STRATEGIES.get(cfg.name, "strategy.name")
    trainable = fn(model, cfg) | _names_of(model, [model.head])
    total = n_train = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in trainable)
        total += p.numel()
        n_train += p.numel() if p.requires_grad else 0
    return {"trainable_params": n_train, "total_params": total}


WHOLE_BACKBONE = -1


def frozen_prefix(model: nn.Module) -> int:
    """How much of the backbone is a fixed function of the input: ``WHOLE_BACKBONE`` when nothing
    in it trains, else the number ``k`` of leading blocks that are frozen with nothing trainable
    before them (0: none). This part runs in eval mode, and its output can be cached."""
    backbone = model.backbone
    trainable = {id(p) for p in backbone.parameters() if p.requires_grad}
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
    no dropout noise) and norm layers whose parameters are all frozen stay in eval mode."""
    model.train()
    k = frozen_prefix(model)
    if k == WHOLE_BACKBONE:
        model.backbone.eval()
    elif k:
        for m in prefix_modules(model, k):
            m.eval()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()
