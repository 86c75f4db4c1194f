"""What is inside a peft wrapper, and generation through it: a leaf module (no fmtune imports),
so the generation task can decode without importing the model builders."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def plain(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (adapter layers injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def prompt_tuned(model: nn.Module) -> bool:
    cfg = getattr(model, "peft_config", None)
    return bool(cfg) and any(getattr(c, "is_prompt_learning", False) for c in cfg.values())


def generate_new(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``model.generate`` on left-padded prompts: the new tokens only. A prompt-tuned model gets its
    virtual tokens put before the prompts' embeddings here, as in training, and the base model
    generates from the embeddings: peft's own generate loses the positions of models that count
    them from the attention mask (OPT, BLOOM: a shape error at the first new token)."""
    if not prompt_tuned(model):
        return model.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    base = plain(model)
    embeds = base.get_input_embeddings()(ids)
    virtual = model.get_prompt(ids.shape[0]).to(device=embeds.device, dtype=embeds.dtype)
    mask = torch.cat([torch.ones(virtual.shape[:2], dtype=mask.dtype, device=mask.device), mask], 1)
    return base.generate(inputs_embeds=torch.cat([virtual, embeds], 1), attention_mask=mask, **kw)
