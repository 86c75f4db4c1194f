"""fmtune: fine-tune a pretrained foundation model for one task, test it against the
pretrained baseline, and use it.

    import fmtune
    summary = fmtune.train({"model": {"name": "minilm-l6"}, "data": {"train": "train.csv", "test": "test.csv"}})
    fmtune.evaluate(summary["run_dir"], "test.csv")
    fmtune.predict(summary["run_dir"], "new.csv", "preds.csv")
    fmtune.load(summary["run_dir"]).predict(["a text", "another"])    # [{"label": ..., "score": ...}, ...]
    fmtune.export(summary["run_dir"], "exported/", merge=True)   # LoRA/DoRA/IA3 runs: adapter folded in
    fmtune.continue_run(summary["run_dir"], "new.csv", test="new_test.csv", method="replay", out="runs/next")
    fmtune.train_from(summary["run_dir"], "train_with_more_labels.csv")   # fmtune train --resume-from RUN
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["train", "evaluate", "predict", "export", "load", "demo", "load_config", "explain", "robustness",
           "continue_run", "train_from", "transfer"]


def train(config: Any, **kw: Any) -> dict:
    from fmtune.api import train as _train

    return _train(config, **kw)


def evaluate(run: Any, data: Any = None, **kw: Any) -> dict:
    from fmtune.api import evaluate as _evaluate

    return _evaluate(run, data, **kw)


def predict(run: Any, inputs: Any, output: Any = None, **kw: Any):
    from fmtune.api import predict as _predict

    return _predict(run, inputs, output, **kw)


def export(run: Any, out: Any = None, **kw: Any) -> dict:
    from fmtune.exporter import export as _export

    return _export(run, out, **kw)


def explain(run: Any, inputs: Any = None, **kw: Any) -> dict:
    """Attributions for ``inputs`` or the run's most confident mistakes (see fmtune.explain)."""
    from fmtune.explain import explain as _explain

    return _explain(run, inputs, **kw)


def robustness(runs: Any, data: Any, **kw: Any) -> dict:
    """Metric under noise, corruptions and attacks, per severity (see fmtune.robustness)."""
    from fmtune.robustness import robustness as _robustness

    return _robustness(runs, data, **kw)


def continue_run(run: Any, data: Any, **kw: Any) -> dict:
    """Train the finished ``run`` on new data without forgetting the old (see fmtune.continual)."""
    from fmtune.api import continue_run as _continue

    return _continue(run, data, **kw)


def train_from(run: Any, data: Any = None, **kw: Any) -> dict:
    """Train the finished ``run``'s model further on ``data`` (default: its own training file, read
    again), e.g. with rows labelled since (``fmtune train --resume-from``; see fmtune.api.train_from)."""
    from fmtune.api import train_from as _train_from

    return _train_from(run, data, **kw)


def transfer(config: Any, **kw: Any) -> dict:
    """From scratch vs linear probe vs fine-tuned at several training-set sizes (see fmtune.transfer)."""
    from fmtune import config as config_mod
    from fmtune.transfer import transfer as _transfer

    return _transfer(config_mod.coerce(config), **kw)


def load(run: Any, batch_size: int | None = None, backend: str = "torch", precision: str | None = None):
    """A trained run as a predictor: ``fmtune.load(run).predict(["some text", ...])``; backend torch,
    onnx or onnx-int8 (exported into RUN/export/ on first use, checked, then reused); precision auto, fp32 or bf16
    (the torch model's; default: the run's train.precision, auto: bf16 on a CPU with AMX, else fp32)."""
    from fmtune.predictor import load as _load

    return _load(run, batch_size, backend, precision)


def demo(task: str = "text", **kw: Any) -> dict:
    from fmtune.demos import demo as _demo

    return _demo(task, **kw)


def load_config(path: Any = None, overrides: list[str] | None = None):
    from fmtune.config import load

    return load(path, overrides)


class _Package(types.ModuleType):
    """The package keeps its verbs: importing the submodule of the same name (fmtune/explain.py, robustness.py,
    transfer.py; anything inside fmtune may) would otherwise replace ``fmtune.explain`` the function by the module,
    and a user's next ``fmtune.explain(...)`` fail with "'module' object is not callable". The submodules stay in
    sys.modules (``from fmtune.explain import ...`` reads them there)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and callable(self.__dict__.get(name)):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
