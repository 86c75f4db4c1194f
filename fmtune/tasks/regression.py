"""Regression: a pooled vector -> one number. Targets are standardised with the training
mean/std for the loss; the head predicts in target units."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from sklearn.linear_model import RidgeCV

from fmtune.data.readers import USUAL_TARGETS, row_label
from fmtune.errors import DataError
from fmtune.tasks.base import TASKS, Task, missing_values
from fmtune.tasks.probe import scaled, unscaled


@TASKS.register("regression")
class Regression(Task):
    name = "regression"
    scalar_targets = True
    description = "one number per example (MSE on standardised targets)"
    default_metric = "rmse"
    metric_names = ("mae", "rmse", "r2", "loss")
    hf_problem_type = "regression"
    capabilities = frozenset({"embed", "explain", "robustness", "fairness", "recentre", "usual_columns"})
    usual_labels = USUAL_TARGETS
    baseline_method = "ridge regression (scikit-learn) on the frozen pretrained backbone's pooled features"

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
        missing_values(df, values, column)
        num = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(num))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{row_label(df, i)}: regression target {values.iloc[i]!r} in column {column!r} "
                            f"is not a finite number ({len(bad)} such row(s))")
        return num

    def encode(self, values, df, column, allow_unknown=False):
        return torch.tensor(self._numbers(values, df, column), dtype=torch.float32)

    def output_affine(self):
        return self.target_stats.get("std", 1.0), self.target_stats.get("mean", 0.0)

    # The model outputs target units (its head carries the training mean/std as a fixed affine),
    # so the loss divides by the variance to stay on the scale of standardised targets.
    def loss(self, logits, targets, weights=None):
        if weights is None:
            return F.mse_loss(logits.float().view(-1), targets) / self.target_stats["std"] ** 2
        each = F.mse_loss(logits.float().view(-1), targets, reduction="none")
        return (each * weights).sum() / weights.sum().clamp(min=1e-12) / self.target_stats["std"] ** 2

    def metrics(self, logits, targets):
        p, y = logits.float().view(-1).numpy(), targets.numpy()
        return {"mae": float(skm.mean_absolute_error(y, p)), "rmse": float(np.sqrt(skm.mean_squared_error(y, p))),
                "r2": float(skm.r2_score(y, p)) if len(y) > 1 else math.nan,
                "loss": float(self.loss(logits, targets).item())}

    def outcomes(self, logits, targets):
        return {"kind": "values", "true": targets.numpy().astype(np.float64),
                "pred": logits.float().view(-1).numpy().astype(np.float64)}

    def postprocess(self, logits, ds=None):
        return [{"value": float(v)} for v in logits.float().view(-1)]

    def prediction_columns(self):
        return ["prediction"]

    hf_list_of_one = True

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        # as transformers' text-classification pipeline answers a regression head: the value as the score
        return [{"label": "value", "score": record["value"]}]

    def flatten(self, record):
        return {"prediction": record["value"]}

    def text_report(self, logits, targets) -> str:
        m = self.metrics(logits, targets)
        return f"MAE {m['mae']:.4f}   RMSE {m['rmse']:.4f}   R² {m['r2']:.4f}   (n={len(targets)})"

    def fit_probe(self, x, targets, seed):
        return scaled(RidgeCV(alphas=np.logspace(-2, 4, 7))).fit(x, targets.numpy())

    def head_from_probe(self, probe, num_features):
        w, b = unscaled(probe, probe[-1].coef_, probe[-1].intercept_)
        scale, shift = self.output_affine()  # the head's output is mapped by * scale + shift
        return w / scale, (b - shift) / scale

    def probe_logits(self, probe, x):
        return torch.from_numpy(probe.predict(x)).float().view(-1, 1)
