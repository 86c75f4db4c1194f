"""Experiment trackers besides TensorBoard (which every run writes to ``tb/``): MLflow (a local
file store beside the runs unless $MLFLOW_TRACKING_URI says otherwise) and Weights & Biases
(offline mode unless $WANDB_MODE says otherwise). Both are optional packages: asking for one
that is not installed is a clear error before training starts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmtune.errors import ConfigError


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _require(module: str, tracker: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"train.tracker={tracker}: the {module} package is not installed here "
                          f"(pip install {module}); TensorBoard logs are written to the run's tb/ in any case"
                          ) from None


class MLflow:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        self.mlflow = _require("mlflow", "mlflow")
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # mlflow 3 refuses its local file store unless told it may use it (the store is in
            # maintenance mode, not gone; a database backend needs sqlalchemy, which mlflow-skinny
            # lacks): a file store beside the runs works with every mlflow and `mlflow ui`
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.mlflow.set_tracking_uri((run_dir.resolve().parent / "mlruns").as_uri())
        self.mlflow.set_experiment("fmtune")
        self.mlflow.start_run(run_name=run_dir.name)
        self.mlflow.log_params({k: str(v)[:500] for k, v in _flat(config).items()})

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandB:
    def __init__(self, run_dir: Path, config: dict[str, Any]):
        self.wandb = _require("wandb", "wandb")
        os.environ.setdefault("WANDB_MODE", "offline")
        self.run = self.wandb.init(project="fmtune", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"mlflow": MLflow, "wandb": WandB}


def check(name: str) -> None:
    if name != "tensorboard":
        _require(name, name)


def make(name: str, run_dir: Path, config: dict[str, Any]) -> list[Any]:
    """The trackers named by ``train.tracker`` (``tensorboard`` alone: none besides the tb/ logs)."""
    return [] if name == "tensorboard" else [TRACKERS[name](run_dir, config)]
