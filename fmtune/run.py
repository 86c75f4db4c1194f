"""The run directory: create it (refusing to overwrite), and open a finished one.

    runs/<name>/
      config.yaml   fully resolved config      labels.json   task + label names
      model/        best checkpoint            state/        resume checkpoint
      metrics.jsonl training log               eval.json     test metrics (+ baseline)
      run.json      parameters, hardware, timing, data sizes
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtune import config as config_mod
from fmtune.errors import RunDirError
from fmtune.fsutil import read_json, write_json
from fmtune.models import build
from fmtune.tasks import Task, task_from_state

CONFIG_FILE, LABELS_FILE, EVAL_FILE, INFO_FILE = "config.yaml", "labels.json", "eval.json", "run.json"


def default_name(cfg: config_mod.Config) -> str:
    model = Path(cfg.model.name).name or "model"
    return f"{model}-{cfg.strategy.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def planned_dir(cfg: config_mod.Config) -> Path:
    """Where a run of ``cfg`` goes: ``out``, else runs/<name> (default name: <model>-<strategy>-<time>)."""
    return Path(cfg.out) if cfg.out else Path("runs") / (cfg.name or default_name(cfg))


def require_free(run_dir: Path, overwrite: bool, resumable: bool = True) -> bool:
    """Whether ``run_dir`` is taken (a file, or a folder with something in it); taken without
    ``overwrite`` is a RunDirError saying what to do."""
    taken = run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))
    if taken and not overwrite:
        resume = f"--resume {run_dir} to continue it, " if resumable else ""
        raise RunDirError(f"run directory {run_dir} already exists; pass --overwrite to replace it, "
                          f"{resume}or --out with another folder")
    return taken


def new_run_dir(cfg: config_mod.Config, overwrite: bool) -> Path:
    """Resolve and create the run directory; an existing non-empty one needs ``overwrite``."""
    if cfg.name is None:
        cfg.name = Path(cfg.out).name if cfg.out else default_name(cfg)
    run_dir = planned_dir(cfg)
    if require_free(run_dir, overwrite):
        if run_dir.is_dir():
            shutil.rmtree(run_dir)
        else:
            run_dir.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.out = str(run_dir)
    return run_dir


def write_start(run_dir: Path, cfg: config_mod.Config, task: Task) -> None:
    cfg.save(run_dir / CONFIG_FILE)
    write_json(run_dir / LABELS_FILE, task.state())


@dataclass
class OpenRun:
    dir: Path
    config: config_mod.Config
    task: Task
    bundle: build.Bundle

    def info(self) -> dict[str, Any]:
        p = self.dir / INFO_FILE
        return json.loads(p.read_text()) if p.exists() else {}


def read_config(run_dir: Path) -> config_mod.Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(f"{run_dir} is not an fmtune run directory ({CONFIG_FILE} missing)")
    return config_mod.load(run_dir / CONFIG_FILE)


def read_task(run_dir: Path) -> Task:
    p = Path(run_dir) / LABELS_FILE
    if not p.is_file():
        raise RunDirError(f"{run_dir}: {LABELS_FILE} missing; the run did not get past its start")
    return task_from_state(json.loads(p.read_text()))


def open_run(run_dir: str | Path) -> OpenRun:
    """Load a trained run: its config, task and best model, with the same preprocessing."""
    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    task = read_task(run_dir)
    if not (run_dir / "model" / build.META_FILE).is_file():
        raise RunDirError(f"{run_dir}: no trained model yet (model/ missing); train it or --resume it first")
    return OpenRun(run_dir, cfg, task, build.load(run_dir / "model"))


def exported_from(folder: Path) -> str | None:
    """The version of the run's model an export folder (RUN/export/...) was made from (None: no usable export)."""
    return read_json(folder / "export.json", {}).get("model_version")
