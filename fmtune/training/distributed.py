"""Data-parallel training over several processes (DDP through accelerate), launched by torchrun.

``fmtune train --num-processes 2`` re-runs itself under ``torch.distributed.run``; running
``torchrun -m fmtune train ...`` or ``accelerate launch -m fmtune train ...`` directly works too.
Every rank walks the same seeded batches and takes its slice of each, so ``train.batch_size``
stays the global batch and a run matches a 1-process run with that batch. Only rank 0 writes
the run directory; validation is sharded and gathered, so every rank takes the same
early-stopping decision; the time budget is rank 0's clock, broadcast.
"""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

import numpy as np
import torch

from fmtune.data.dataset import Rows
from fmtune.training.infer import infer


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init(cpu: bool) -> Any:
    """The process group of a launched run (gloo on CPU: ``cpu=True``, else each rank may stay in
    a world of its own); None for a single process."""
    if world_size() <= 1:
        return None
    import atexit

    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    atexit.register(finish)  # also on an error or Ctrl-C, while the interpreter is still whole
    return state


def finish() -> None:
    """Leave the process group of a launched run. A rank that exits with the group alive can abort
    in gloo's worker threads at interpreter shutdown ("terminate called without an active
    exception", SIGABRT), failing a run that trained fine; idempotent."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a rank of a launched run, its work done, without the interpreter's shutdown. Once FSDP
    has sharded a model, torch keeps the gloo group referenced after ``destroy_process_group`` (it
    outlives the model, and torch's DTensor caches when emptied), so the group was torn down during
    interpreter finalization, where it aborted the rank now and then ("terminate called without an
    active exception", SIGABRT) after the run had trained and written everything: a 2-process FSDP
    script on a loaded 2-core machine failed 7 of 40 times so, 0 of 40 when ending this way.
    Everything this process writes is closed by then; its streams are flushed here."""
    import logging

    finish()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader gone
            pass
    os._exit(code)


@contextlib.contextmanager
def same_layers(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """LayerDrop off while several processes train ``model``: each rank would skip other layers
    (its random draws follow its own batches), and the ranks then wait on each other forever (DDP
    for gradients a skipped layer never makes, FSDP for its gathers; wav2vec2-base's 0.1 hung both).
    The modules that draw read a copy of their config with ``*layerdrop`` at 0 (or their own
    attribute), so the model's config, which checkpoints save, keeps the user's value; all restored
    on leaving. Yields what was turned off, ``{name: probability}``."""
    from transformers import PreTrainedModel

    def drops(obj: Any) -> dict[str, float]:
        return {k: v for k, v in vars(obj).items() if k.endswith("layerdrop") and isinstance(v, float) and v > 0}

    undo, off = [], {}
    for module in model.modules():
        own = drops(module)
        for k, v in own.items():
            undo.append((module, k, v))
            setattr(module, k, 0.0)
        config = getattr(module, "config", None)
        if config is not None and not isinstance(module, PreTrainedModel) and drops(config):
            off.update(drops(config))
            undo.append((module, "config", config))
            module.config = copy.copy(config)
            for k in drops(config):
                setattr(module.config, k, 0.0)
        off.update(own)
    try:
        yield off
    finally:
        for obj, k, v in reversed(undo):
            setattr(obj, k, v)


def is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def shard(idx: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous slice of a global batch."""
    return [int(i) for i in np.array_split(np.asarray(idx), world)[rank]]


def gathered_infer(model: torch.nn.Module, ds: Any, batch_size: int, device: Any, accelerator: Any,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``infer`` with the examples split over the ranks and the outputs gathered back, in order,
    each example once. Every shard is padded to one length (repeating an example), so every
    rank runs as many forward passes (FSDP needs it: each one is collective); the padding is
    trimmed after the gather."""
    world, rank = accelerator.num_processes, accelerator.process_index
    parts = np.array_split(np.arange(len(ds)), world)
    width = max(len(p) for p in parts)
    own = parts[rank]
    keep = np.concatenate([own, np.full(width - len(own), own[-1] if len(own) else 0, dtype=own.dtype)])
    padded, _ = infer(model, Rows(ds, keep), batch_size, device, padding_cut=False)  # as many batches per rank
    lengths = getattr(ds, "lengths", None)
    if padded.dim() == 3 and lengths is not None:  # per-token outputs: every rank pads to the longest example
        longest = int(np.max(lengths))  # of the whole set (a detector's fixed queries need none)
        padded = torch.nn.functional.pad(padded, (0, 0, 0, longest - padded.shape[1]))
    everything = accelerator.gather(padded.to(accelerator.device)).cpu().view(world, width, *padded.shape[1:])
    out = torch.cat([everything[r, : len(parts[r])] for r in range(world)])
    return out, ds.targets


def broadcast_flag(flag: bool, accelerator: Any) -> bool:
    """Rank 0's value of ``flag`` on every rank."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def params_in_sync(model: torch.nn.Module, accelerator: Any) -> bool:
    """Whether every rank holds the same trained weights (a checksum per tensor, gathered)."""
    sums = torch.stack([p.detach().double().sum() for p in model.parameters() if p.requires_grad])
    everything = accelerator.gather(sums.to(accelerator.device)[None]).cpu()
    return bool(torch.allclose(everything, everything[:1].expand_as(everything), rtol=0, atol=1e-9))


def launch(argv: list[str], processes: int, machines: int = 1, machine_rank: int = 0,
           main_ip: str | None = None, main_port: int = 29500) -> int:
    """Run ``fmtune <argv>`` under torchrun with ``processes`` per machine; returns its exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}"]
    if machines > 1:
        if not main_ip:
            from fmtune.errors import ConfigError

            raise ConfigError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
        cmd += [f"--nnodes={machines}", f"--node-rank={machine_rank}", f"--master-addr={main_ip}",
                f"--master-port={main_port}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "fmtune", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)
