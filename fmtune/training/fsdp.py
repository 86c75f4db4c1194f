"""``train.distributed: fsdp``: the model's parameters, gradients and optimizer state sharded over
the processes of a launched run (torch's FSDP2, ``fully_shard``), instead of a whole copy per
rank (DDP).

One FSDP unit per backbone block (plus the root: embeddings, norms, head), so a rank holds the
full weights of one block at a time. accelerate's FSDP plugin is not used: it does nothing on CPU
(accelerate falls back to DDP there), and FSDP2 runs the same on CPU (gloo) and GPU (NCCL).

Every forward and backward is collective: every rank runs the same number of them (the loop's
batches and ``distributed.gathered_infer`` see to that). Checkpoints are written whole (the
full state gathered to rank 0): ``model/`` loads like any run's, and ``state/`` resumes on any
number of processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fmtune.errors import ConfigError
from fmtune.strategies import backbone_blocks

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard(model: torch.nn.Module) -> int:
    """Shard ``model`` in place: each backbone block a unit, then the rest. Returns the number of
    block units. Parameters become DTensors: build the optimizer after this."""
    from torch.distributed.fsdp import fully_shard

    from fmtune import adapters
    from fmtune.models.hf_remote import encodes_in_groups

    grouped = {getattr(m.config, "model_type", type(m).__name__) for m in model.modules()
               if encodes_in_groups(getattr(m, "config", None))}
    if grouped:  # every forward of a unit is collective: the ranks would wait on each other for good
        raise ConfigError(f"train.distributed=fsdp: a {sorted(grouped)[0]} model reads each batch's clips in groups of "
                          "equal length (its first convolution normalises over the whole clip), so each process "
                          "would run its encoder a different number of times, and FSDP needs every process to run "
                          "the same passes; use train.distributed=ddp")

    base = adapters.base_model(model)
    blocks = backbone_blocks(base.backbone) if hasattr(base, "backbone") else []
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return len(blocks)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (on CPU), an empty dict elsewhere. Collective."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer's state, parameters named, whole on rank 0 (CPU). Collective."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full(model: torch.nn.Module, optimizer: Any, model_state: dict[str, torch.Tensor],
              optimizer_state: dict[str, Any]) -> None:
    """Load whole states (as ``full_state`` / ``full_optimizer_state`` gave them; every rank
    passes the same) into the sharded model and its optimizer. Collective."""
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)
