"""Dropout on a CPU without torch's per-element Bernoulli draws.

Profiled on a 2-core CPU, a MiniLM-L6 training step spent 15% of its time in ``aten::bernoulli_``:
torch draws one random number per element, and dropout (20 calls a step: embeddings, attention
probabilities, two per block, the head) costs more than the block's layer norms, GELU and
softmax together. Here a mask comes from random 64-bit integers read as four 16-bit lanes (15
random bits each, so one draw serves four elements): a 32x36x384 mask in 0.45 ms instead of
2.9 ms. The keep probability is ``1 - p`` to 1/32768, kept values are scaled by ``1/(1-p)`` as
torch does, and the draws come from torch's generator, so a seeded run and a resumed one draw
the same masks.

``fast_dropout(model)`` is used by the training loop on CPUs only (CUDA's dropout is fused
already): it swaps the model's ``nn.Dropout`` layers (peft's LoRA dropout included) for
``FastDropout`` and, while training, routes transformers' ``sdpa`` attention through
``attention()`` when it would drop attention probabilities on the CPU (where SDPA then leaves its
fused kernel for the plain math path anyway); both are put back on exit.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

_LANE_BITS = 0x7FFF  # the low 15 bits of each 16-bit lane: random in every lane of a non-negative int64


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask, True with probability ``1 - p`` (to 1/32768), four elements per random draw."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()  # [0, 2**63)
    lanes = words.view(torch.int16)[:n].view(shape)
    return (lanes & _LANE_BITS) >= round(p * (_LANE_BITS + 1))


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x * ctx.scale, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad * ctx.scale, 0), None


def drop(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout`` with the mask from ``keep_mask``."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """nn.Dropout drawing its mask with ``keep_mask``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop(x, self.p, self.training)


def attention(original: Any) -> Any:
    """transformers' ``sdpa`` attention function, computed here when it would drop attention
    probabilities on a CPU (the plain form: scores, mask, softmax, dropout, values) and handed to
    ``original`` otherwise: no dropout, another device, grouped key/value heads, a position bias,
    a soft cap."""

    def forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        plain = (dropout > 0.0 and query.device.type == "cpu" and getattr(module, "num_key_value_groups", 1) == 1
                 and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
                 and not kwargs.get("output_attentions", False) and key.shape[2] == query.shape[2])
        if not plain:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                            is_causal=is_causal, **kwargs)
        # as sdpa_attention_forward decides: causal only without a mask, over more than one query
        causal = query.shape[2] > 1 and attention_mask is None and (
            is_causal if is_causal is not None else getattr(module, "is_causal", True))
        scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
        if causal:
            t = query.shape[2]
            attention_mask = torch.ones(t, t, dtype=torch.bool, device=query.device).tril()
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + attention_mask
        probs = drop(torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype), dropout)
        return torch.matmul(probs, value).transpose(1, 2).contiguous(), None

    return forward


@contextlib.contextmanager
def fast_dropout(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: the model's ``nn.Dropout`` layers draw masks with ``keep_mask`` and transformers'
    ``sdpa`` attention drops probabilities the same way on a CPU. Restored on exit."""
    if not enabled:
        yield
        return
    swapped = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
                swapped.append((parent, name, child))
    from transformers.modeling_utils import AttentionInterface

    mapping = AttentionInterface._global_mapping
    original = mapping.get("sdpa")
    if original is not None:
        mapping["sdpa"] = attention(original)
    try:
        yield
    finally:
        if original is not None:
            mapping["sdpa"] = original
        for parent, name, child in swapped:
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)


# float attributes attention modules keep their dropout probability in (Whisper, Llama ... read them while training)
_FLOAT_DROPOUTS = ("dropout", "attention_dropout", "activation_dropout", "attn_dropout", "dropout_p", "dropout_prob")


def set_dropout(model: nn.Module, p: float) -> int:
    """Every dropout of ``model`` (``nn.Dropout`` layers, and the probabilities attention modules keep as
    floats) set to ``p``; returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
            n += 1
        for name in _FLOAT_DROPOUTS:
            if type(getattr(m, name, None)) is float:
                setattr(m, name, p)
                n += 1
    return n
