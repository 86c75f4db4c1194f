"""Tasks own the targets, the loss, the metrics and the post-processing.

The training loop never asks which task it runs: it calls ``task.loss(logits, targets)`` and
``task.metrics(logits, targets)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from fmtune.data.readers import row_label
from fmtune.errors import DataError
from fmtune.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")
UNKNOWN = "unknown"


class Task:
    """Base class. ``labels`` is the ordered list of label names (empty for regression)."""

    name = ""
    default_metric = ""
    metric_names: tuple[str, ...] = ()

    def __init__(self, labels: list[str] | None = None, class_weights: torch.Tensor | None = None,
                 threshold: float = 0.5, separator: str = "|", target_stats: dict | None = None):
        self.labels = list(labels or [])
        self.class_weights = class_weights
        self.threshold = threshold
        self.separator = separator
        self.target_stats = target_stats or {}

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    def greater_is_better(self, metric: str) -> bool:
        return metric not in {"loss", "mae", "rmse", "mse"}

    # --- set-up from the training data -------------------------------------------------
    @classmethod
    def from_train(cls, values: pd.Series, df: pd.DataFrame, **kw: Any) -> Task:
        raise NotImplementedError

    def encode(self, values: pd.Series, df: pd.DataFrame, column: str, allow_unknown: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def postprocess(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """One dict per example: the prediction and its scores, for predict/serve."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What must be saved with a run to rebuild this task (labels.json)."""
        return {"task": self.name, "labels": self.labels, "threshold": self.threshold,
                "separator": self.separator, "target_stats": self.target_stats}


def _missing(df: pd.DataFrame, values: pd.Series, column: str) -> None:
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        raise DataError(f"{row_label(df, int(bad[0]))}: empty {column!r} value "
                        f"({len(bad)} row(s) in all); fill or drop those rows")


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    default_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1", "loss")

    @classmethod
    def from_train(cls, values: pd.Series, df: pd.DataFrame, column: str = "label",
                   class_weights: bool = False, **kw: Any) -> Classification:
        _missing(df, values, column)
        labels = sorted({str(v) for v in values})
        if len(labels) < 2:
            raise DataError(f"{df.attrs.get('source')}: column {column!r} holds a single label {labels}; "
                            "classification needs at least two")
        task = cls(labels, **kw)
        if class_weights:
            ids = task.encode(values, df, column)
            counts = torch.bincount(ids, minlength=len(labels)).float()
            task.class_weights = counts.sum() / (len(labels) * counts.clamp(min=1))
        return task

    def encode(self, values, df, column, allow_unknown=False):
        _missing(df, values, column)
        index = {name: i for i, name in enumerate(self.labels)}
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values.astype(str)):
            if v in index:
                out[i] = index[v]
            elif allow_unknown:
                out[i] = -100  # ignored by the loss, counted as wrong by the metrics
            else:
                raise DataError(f"{row_label(df, i)}: label {v!r} in column {column!r} was not seen in training "
                                f"(known: {', '.join(self.labels[:20])}); fix the row or pass "
                                "--set data.unknown_labels=unknown")
        return torch.from_numpy(out)

    def loss(self, logits, targets):
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(logits.float(), targets, weight=w, ignore_index=-100)

    def metrics(self, logits, targets):
        pred = logits.argmax(-1).numpy()
        y = targets.numpy()
        known = y >= 0
        out = {"accuracy": float((pred == y).mean())}
        # the classes that occur (true or predicted): a class absent from both, say from a test set of
        # new classes after continual learning, would count as F1 0 and drag the mean down
        labels = np.union1d(y[known], pred[known])
        out["macro_f1"] = float(skm.f1_score(y[known], pred[known], labels=labels, average="macro", zero_division=0)) \
            if known.any() else 0.0
        out["loss"] = float(F.cross_entropy(logits.float()[torch.from_numpy(known)],
                                            targets[torch.from_numpy(known)]).item()) if known.any() else math.nan
        return out

    def postprocess(self, logits):
        probs = logits.float().softmax(-1)
        top = probs.argmax(-1)
        return [{"label": self.labels[int(t)], "score": float(p[t]),
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p)}} for t, p in zip(top, probs)]


@TASKS.register("multilabel")
class MultiLabel(Task):
    name = "multilabel"
    default_metric = "macro_f1"
    metric_names = ("macro_f1", "micro_f1", "accuracy", "loss")

    def _split(self, v: Any) -> list[str]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return []
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x).strip() for x in v if str(x).strip()]
        return [s.strip() for s in str(v).split(self.separator) if s.strip()]

    @classmethod
    def from_train(cls, values, df, column="label", class_weights=False, separator="|", **kw):
        probe = cls([], separator=separator)
        labels = sorted({lab for v in values for lab in probe._split(v)})
        if not labels:
            raise DataError(f"{df.attrs.get('source')}: column {column!r} holds no labels")
        task = cls(labels, separator=separator, **kw)
        if class_weights:  # positive weight per label: negatives / positives
            y = task.encode(values, df, column)
            pos = y.sum(0)
            task.class_weights = ((len(y) - pos) / pos.clamp(min=1)).clamp(max=100)
        return task

    def encode(self, values, df, column, allow_unknown=False):
        index = {name: i for i, name in enumerate(self.labels)}
        out = torch.zeros(len(values), len(self.labels))
        for i, v in enumerate(values):
            for lab in self._split(v):
                if lab in index:
                    out[i, index[lab]] = 1.0
                elif not allow_unknown:
                    raise DataError(f"{row_label(df, i)}: label {lab!r} in column {column!r} was not seen in "
                                    "training; fix the row or pass --set data.unknown_labels=unknown")
        return out

    def loss(self, logits, targets):
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=w)

    def metrics(self, logits, targets):
        pred = (logits.float().sigmoid() > self.threshold).numpy().astype(int)
        y = targets.numpy().astype(int)
        return {
            "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
            "micro_f1": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
            "accuracy": float((pred == y).all(1).mean()),  # exact match
            "loss": float(F.binary_cross_entropy_with_logits(logits.float(), targets).item()),
        }

    def postprocess(self, logits):
        probs = logits.float().sigmoid()
        return [{"labels": [n for n, x in zip(self.labels, p) if x > self.threshold],
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p)}} for p in probs]


@TASKS.register("regression")
class Regression(Task):
    """Targets are standardised with the training mean/std; predictions are mapped back."""

    name = "regression"
    default_metric = "rmse"
    metric_names = ("mae", "rmse", "r2", "loss")

    @property
    def num_outputs(self) -> int:
        return 1

    @classmethod
    def from_train(cls, values, df, column="label", class_weights=False, **kw):
        probe = cls([])
        y = probe._numbers(values, df, column)
        std = float(y.std()) if len(y) > 1 and y.std() > 0 else 1.0
        return cls([], target_stats={"mean": float(y.mean()), "std": std}, **kw)

    @staticmethod
    def _numbers(values: pd.Series, df: pd.DataFrame, column: str) -> np.ndarray:
        _missing(df, values, column)
        num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(num))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{row_label(df, i)}: regression target {values.iloc[i]!r} in column {column!r} "
                            f"is not a finite number ({len(bad)} such row(s))")
        return num

    def encode(self, values, df, column, allow_unknown=False):
        return torch.tensor(self._numbers(values, df, column), dtype=torch.float32)

    # The model outputs target units (its head carries the training mean/std as a fixed affine),
    # so the loss divides by the variance to stay on the scale of standardised targets.
    def loss(self, logits, targets):
        return F.mse_loss(logits.float().view(-1), targets) / self.target_stats["std"] ** 2

    def metrics(self, logits, targets):
        p, y = logits.float().view(-1).numpy(), targets.numpy()
        return {"mae": float(skm.mean_absolute_error(y, p)), "rmse": float(np.sqrt(skm.mean_squared_error(y, p))),
                "r2": float(skm.r2_score(y, p)) if len(y) > 1 else math.nan,
                "loss": float(self.loss(logits, targets).item())}

    def postprocess(self, logits):
        return [{"value": float(v)} for v in logits.float().view(-1)]


def task_from_state(state: dict[str, Any]) -> Task:
    cls = TASKS.get(state["task"])
    return cls(state.get("labels"), threshold=state.get("threshold", 0.5), separator=state.get("separator", "|"),
               target_stats=state.get("target_stats"))
