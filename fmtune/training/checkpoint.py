"""The resume checkpoint (``state/``): everything needed to continue a run bit for bit.

Written atomically (a temp folder swapped in by rename), so a run killed while saving keeps
its previous checkpoint. Loaded with safetensors and ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fmtune.errors import RunDirError
from fmtune.fsutil import atomic_dir

STATE_DIR = "state"
BEST_FILE = "best.safetensors"


def _frozen(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def changing_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and all buffers: frozen weights never change, and resume rebuilds
    them from the same pretrained model, so the checkpoint of a head or last_n run stays small."""
    frozen = _frozen(model)
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
               progress: dict[str, Any], rng: dict[str, Any] | None = None,
               weights: dict[str, torch.Tensor] | None = None, optimizer_state: dict[str, Any] | None = None,
               best: dict[str, torch.Tensor] | None = None) -> None:
    """``rng``: the generators' state at the step boundary ``progress`` describes (default: now).
    ``weights`` and ``optimizer_state``: whole states gathered from a sharded (FSDP) model; the
    optimizer's then names its parameters (``fsdp`` in optim.pt says so). ``best``: the best
    weights so far, when the loop keeps them in memory instead of writing model/ each time."""
    def write(tmp: Path) -> None:
        frozen = _frozen(model)
        changing = changing_state(model) if weights is None else {
            k: v.contiguous() for k, v in weights.items() if k not in frozen}
        save_file(changing, str(tmp / "model.safetensors"))
        if best is not None:
            save_file(best, str(tmp / BEST_FILE))
        opt = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": opt, "scheduler": scheduler.state_dict(), "fsdp": optimizer_state is not None},
                   tmp / "optim.pt")
        torch.save(rng or rng_state(), tmp / "rng.pt")
        (tmp / "trainer.json").write_text(json.dumps(progress, indent=2))

    atomic_dir(run_dir / STATE_DIR, write)


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE_DIR / "trainer.json").is_file()


def saved_step(run_dir: Path) -> int | None:
    try:
        return json.loads((run_dir / STATE_DIR / "trainer.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return None


def load_best(run_dir: Path) -> dict[str, torch.Tensor] | None:
    """The best weights a resume point carries (head-like strategies), or None."""
    path = run_dir / STATE_DIR / BEST_FILE
    return load_file(str(path)) if path.is_file() else None


def require_state(run_dir: Path) -> None:
    if not has_state(run_dir):
        raise RunDirError(f"{run_dir}: no resume checkpoint ({run_dir / STATE_DIR}/trainer.json missing); "
                          "the run stopped before its first checkpoint: start it again with --overwrite")


def load_state(run_dir: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any,
               sharded: Any = None) -> dict[str, Any]:
    """Restore a resume checkpoint; ``sharded(model, optimizer, weights, optimizer_state)`` loads
    whole states into a sharded (FSDP) model instead (``fsdp.load_full``)."""
    state = run_dir / STATE_DIR
    require_state(run_dir)
    weights = load_file(str(state / "model.safetensors"))
    names = set(model.state_dict())
    missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
    lacking = sorted(set(missing) - _frozen(model))
    if unexpected or lacking:
        raise RunDirError(f"{state}: the checkpoint does not fit the model (missing {lacking[:3]}, "
                          f"unexpected {unexpected[:3]}); was the config or the model changed?")
    opt = torch.load(state / "optim.pt", weights_only=True)
    if bool(opt.get("fsdp")) != (sharded is not None):
        how = "with FSDP over several processes" if opt.get("fsdp") else "without FSDP"
        raise RunDirError(f"{state}: this checkpoint was written {how}; resume it the same way "
                          "(train.distributed and --num-processes as before)")
    if sharded is not None:
        sharded(model, getattr(optimizer, "optimizer", optimizer), weights, opt["optimizer"])
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(state / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((state / "trainer.json").read_text())
