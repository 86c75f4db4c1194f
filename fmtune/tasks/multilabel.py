"""Multi-label classification: a pooled vector -> any subset of K labels (sigmoid per label)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from sklearn.multiclass import OneVsRestClassifier

from fmtune.data.readers import row_label
from fmtune.errors import DataError
from fmtune.tasks.base import TASKS, Task
from fmtune.tasks.probe import logreg, scaled, unscaled


@TASKS.register("multilabel")
class MultiLabel(Task):
    name = "multilabel"
    description = "any number of labels per example, joined by data.label_separator in one cell (sigmoid)"
    default_metric = "macro_f1"
    metric_names = ("macro_f1", "micro_f1", "accuracy", "loss")
    hf_problem_type = "multi_label_classification"
    capabilities = frozenset({"embed", "explain", "robustness"})

    def _split(self, v: Any) -> list[str]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return []
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x).strip() for x in v if str(x).strip()]
        return [s.strip() for s in str(v).split(self.separator) if s.strip()]

    @classmethod
    def options_from(cls, task_cfg, data_cfg):
        return {**super().options_from(task_cfg, data_cfg), "separator": data_cfg.label_separator,
                "threshold": task_cfg.threshold}

    @classmethod
    def row_labels(cls, df, data_cfg):
        column = cls.target_column(data_cfg)
        if column not in df.columns:
            return None
        split = cls([], separator=data_cfg.label_separator)._split
        return [split(v) for v in df[column]]

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

    def _predicted(self, logits: torch.Tensor) -> np.ndarray:
        return (logits.float().sigmoid() > self.threshold).numpy().astype(int)

    def metrics(self, logits, targets):
        pred = self._predicted(logits)
        y = targets.numpy().astype(int)
        return {
            "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
            "micro_f1": float(skm.f1_score(y, pred, average="micro", zero_division=0)),
            "accuracy": float((pred == y).all(1).mean()),  # exact match
            "loss": float(F.binary_cross_entropy_with_logits(logits.float(), targets).item()),
        }

    def postprocess(self, logits, ds=None):
        probs = logits.float().sigmoid()
        return [{"labels": [n for n, x in zip(self.labels, p) if x > self.threshold],
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p)}} for p in probs]

    def prediction_columns(self) -> list[str]:
        return ["labels"] + [f"prob_{k}" for k in self.labels]

    def flatten(self, record):
        return {"labels": self.separator.join(record["labels"]),
                **{f"prob_{k}": v for k, v in record["probabilities"].items()}}

    def text_report(self, logits, targets) -> str:
        return skm.classification_report(targets.int().numpy(), self._predicted(logits), target_names=self.labels,
                                         zero_division=0, digits=4)

    def fit_probe(self, x, targets, seed):
        y = targets.numpy().astype(int)
        keep = (y.min(0) != y.max(0))  # a label that is always on/off in training cannot be fitted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return scaled(OneVsRestClassifier(logreg(seed))).fit(x, y[:, keep]), keep

    def head_from_probe(self, probe, num_features):
        model, keep = probe
        weight, bias = np.zeros((len(self.labels), num_features)), np.full(len(self.labels), -20.0)
        for j, est in zip(np.flatnonzero(keep), model[-1].estimators_):
            w, b = unscaled(model, est.coef_, est.intercept_)
            weight[j], bias[j] = w[0], b[0]
        return weight, bias

    def probe_logits(self, probe, x):
        model, keep = probe
        full = np.full((len(x), len(self.labels)), -20.0)
        full[:, keep] = model.decision_function(x).reshape(len(x), -1)
        return torch.from_numpy(full).float()
