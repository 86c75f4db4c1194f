"""What is inside a peft wrapper, and generation through it: a leaf module (no fmtune imports but errors),
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


def encoder_decoder(model: nn.Module) -> bool:
    """Whether a model (peft-wrapped or not) is an encoder-decoder (T5, BART, Whisper ...)."""
    return bool(getattr(plain(model).config, "is_encoder_decoder", False))


def decoder_start(model: nn.Module) -> int:
    """The token an encoder-decoder's decoder starts from (T5: the padding token; BART: the end-of-sequence)."""
    from fmtune.errors import ModelError

    lm = plain(model)
    start = getattr(getattr(lm, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        start = getattr(lm.config, "decoder_start_token_id", None)
    if start is None:
        raise ModelError(f"the {lm.config.model_type} model has no decoder_start_token_id (config.json or "
                         "generation_config.json): the token its decoder starts from; set it in config.json")
    return int(start)


def generate_new(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
    """``model.generate`` on padded prompts (a causal LM: on the left): the new tokens only (an
    encoder-decoder's output without the decoder's start token). A prompt-tuned model gets its
    virtual tokens put before the prompts' embeddings here, as in training, and the base model
    generates from the embeddings: peft's own generate loses the positions of models that count
    them from the attention mask (OPT, BLOOM: a shape error at the first new token)."""
    if not prompt_tuned(model):
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        return out[:, 1:] if encoder_decoder(model) else out[:, ids.shape[1]:]
    base = plain(model)
    embeds = base.get_input_embeddings()(ids)
    virtual = model.get_prompt(ids.shape[0]).to(device=embeds.device, dtype=embeds.dtype)
    mask = torch.cat([torch.ones(virtual.shape[:2], dtype=mask.dtype, device=mask.device), mask], 1)
    return base.generate(inputs_embeds=torch.cat([virtual, embeds], 1), attention_mask=mask, **kw)
