"""Multi-label classification: a pooled vector -> any subset of K labels (sigmoid per label)."""

from __future__ import annotations

import ast
import copy
import json
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
from fmtune.tasks.base import TASKS, Task, one_hot_labels, zero_one_columns
from fmtune.tasks.probe import logreg, scaled, unscaled

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)
MIN_POSITIVES = 5  # validation rows a label needs on each side (positive, negative) for a threshold of its own
MAX_FLAGGED = 5  # a label's threshold flags at most this many times as many validation rows as it has positives


def _best(grid: np.ndarray, score: Any, prefer: float) -> float:
    """The grid value of the highest score; ties go to the value nearest ``prefer``."""
    return float(max(grid, key=lambda t: (round(float(score(t)), 12), -abs(t - prefer))))


def _exact(y: np.ndarray, pred: np.ndarray) -> float:
    return float((pred == y).all(1).mean())


def choose_thresholds(y: np.ndarray, probs: np.ndarray, metric: str = "macro_f1", fallback: float = 0.5,
                      min_positives: int = MIN_POSITIVES) -> np.ndarray | None:
    """Per-label decision thresholds chosen on held-out rows for ``metric`` (``y`` 0/1 and ``probs`` the
    predicted probabilities, rows x labels), or None where the rows cannot tell (no label with
    ``min_positives`` positive and as many negative rows; a metric thresholds do not move).

    macro_f1 is a mean over labels: each label that has the rows gets the threshold of its best F1 among those
    that flag at most ``MAX_FLAGGED`` times as many rows as it has positives, unless that F1 is no better than
    flagging the label on every row. F1 rewards flagging a label the model ranks poorly on most inputs (once
    seen: a type of entity on 62% of tweets, at 8% precision); those labels, and labels without the rows, keep
    ``fallback``. micro_f1 and accuracy (every label right) count all labels together: one
    threshold for all, the best on that metric. Ties go to the value nearest ``fallback``."""
    pos = y.sum(0)
    enough = (pos >= min_positives) & (len(y) - pos >= min_positives)
    if not enough.any() or metric not in ("macro_f1", "micro_f1", "accuracy"):
        return None
    if metric != "macro_f1":
        def shared(t: float) -> float:
            pred = (probs > t).astype(int)
            return _exact(y, pred) if metric == "accuracy" else skm.f1_score(y, pred, average="micro",
                                                                              zero_division=0)

        return np.full(y.shape[1], _best(THRESHOLD_GRID, shared, fallback))
    out = np.full(y.shape[1], fallback)
    for j in np.flatnonzero(enough):
        yj, pj = y[:, j], probs[:, j]
        grid = np.array([t for t in THRESHOLD_GRID if (pj > t).sum() <= MAX_FLAGGED * pos[j]])
        if not len(grid):
            continue

        def f1(t: float, yj: np.ndarray = yj, pj: np.ndarray = pj) -> float:
            return skm.f1_score(yj, pj > t, zero_division=0)

        t = _best(grid, f1, fallback)
        if f1(t) > 2 * pos[j] / (len(y) + pos[j]):  # better than flagging every row
            out[j] = t
    return out


def _list_literal(text: str) -> list | None:
    """The list a cell spells as a JSON or Python literal (a list column written to CSV by pandas or json), else None;
    parsed as literals only (json / ast.literal_eval), never evaluated."""
    text = text.strip()
    if len(text) < 2 or text[0] != "[" or text[-1] != "]":
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and all(isinstance(x, (str, int)) for x in value):
            return value
    return None


def _other_separator(cells: list[str], separator: str) -> str | None:
    """The character that looks like the labels' separator in these cells where ``separator`` is in none: one of
    ',' ';' in a tenth of them or more (a label name may hold one, so this is a hint, not a rule)."""
    if not cells or any(separator in c for c in cells):
        return None
    counts = {sep: sum(sep in c for c in cells) for sep in (",", ";") if sep != separator}
    sep, n = max(counts.items(), key=lambda kv: kv[1], default=(None, 0))
    return sep if n and n >= len(cells) / 10 else None


@TASKS.register("multilabel")
class MultiLabel(Task):
    name = "multilabel"
    description = "any number of labels per example, joined by data.label_separator in one cell (sigmoid)"
    default_metric = "macro_f1"
    metric_names = ("macro_f1", "micro_f1", "accuracy", "loss")
    hf_problem_type = "multi_label_classification"
    capabilities = frozenset({"embed", "explain", "robustness", "thresholds", "usual_columns"})
    select_thresholded = False  # set for a run that chooses its thresholds on validation (``validation_metrics``)
    thresholds_unchosen = "too few positive or negative rows of every label"

    def _split(self, v: Any) -> list[str]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return []
        listed = _list_literal(v) if isinstance(v, str) else None
        if listed is not None:  # '["a", "b"]' or "['a', 'b']": a list column written out to a CSV
            v = listed
        if isinstance(v, (list, tuple, np.ndarray)):
            return [str(x).strip() for x in v if str(x).strip()]
        return [s.strip() for s in str(v).split(self.separator) if s.strip()]

    @classmethod
    def usual_label_columns(cls, df, inputs):
        """The 0/1 columns of a table without a label column (Jigsaw's toxic ... identity_hate, GoEmotions' raw CSV's
        28 emotions), where it has two or more (``zero_one_columns``)."""
        found = zero_one_columns(df, inputs)
        return found if len(found) >= 2 else None

    @classmethod
    def labelled(cls, df, data_cfg):
        return super().labelled(one_hot_labels(df, data_cfg) if data_cfg.label_columns else df, data_cfg)

    @classmethod
    def require_targets(cls, df, data_cfg):
        if data_cfg.label_columns and data_cfg.label_column not in df.columns:
            from fmtune.data.tabular import split_names

            first = split_names(data_cfg.label_columns)[0]
            raise DataError(f"{df.attrs.get('source', 'the data')}: no column {first!r} (data.label_columns); columns "
                            f"are: {', '.join(map(str, df.columns))}")
        super().require_targets(df, data_cfg)

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
        cells = [v for v in values if isinstance(v, str) and v.strip() and _list_literal(v) is None]
        other = _other_separator(cells, separator)
        if other is not None:
            n = sum(other in c for c in cells)
            first, example = next((i, v) for i, v in enumerate(values) if isinstance(v, str) and other in v)
            warnings.warn(f"{row_label(df, first)}: column {column!r}: no cell holds the label separator "
                          f"{separator!r} (data.label_separator), but {n} of {len(cells)} hold {other!r}, e.g. "
                          f"{example!r}; each such cell is read as one label. If {other!r} separates "
                          f"labels, pass --set data.label_separator={other}", UserWarning, stacklevel=3)
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

    def _cut(self) -> torch.Tensor:
        """The decision threshold of every label (one for all, or one each: task.thresholds=auto)."""
        return torch.as_tensor(self.threshold, dtype=torch.float32).expand(len(self.labels))

    def _predicted(self, logits: torch.Tensor) -> np.ndarray:
        return (logits.float().sigmoid() > self._cut()).numpy().astype(int)

    def decision_thresholds(self) -> dict[str, float]:
        return dict(zip(self.labels, self._cut().tolist()))

    def choose_thresholds(self, logits: torch.Tensor, targets: torch.Tensor, metric: str) -> dict[str, Any] | None:
        """Set the decision thresholds that score best on ``metric`` on these (validation) rows (see
        ``choose_thresholds``); what was chosen and the metric before / after, or None where the rows cannot
        tell (the thresholds are left as they were)."""
        if metric not in ("macro_f1", "micro_f1", "accuracy"):  # the loss: thresholds do not move it
            metric = self.default_metric
        before = self.metrics(logits, targets)[metric]
        fallback = round(float(self._cut().mean()), 6)  # (float32: 0.4 is 0.4000000059...)
        chosen = choose_thresholds(targets.numpy().astype(int), logits.float().sigmoid().numpy(), metric, fallback)
        if chosen is None:
            return None
        self.threshold = [float(t) for t in chosen]
        return {"metric": metric, "rows": len(targets), "thresholds": dict(zip(self.labels, self.threshold)),
                "before": {"threshold": fallback, f"val_{metric}": round(before, 6)},
                f"val_{metric}": round(self.metrics(logits, targets)[metric], 6)}

    def validation_metrics(self, logits, targets, metric):
        """With ``select_thresholded`` (task.thresholds=auto and a validation split): the metrics at the thresholds
        ``choose_thresholds`` would set on these rows, so the best checkpoint is the one that is best once its
        thresholds are chosen (at 0.5 a rare label scores 0 until its probabilities cross it)."""
        if not self.select_thresholded:
            return self.metrics(logits, targets)
        judge = copy.copy(self)
        judge.choose_thresholds(logits, targets, metric)
        return judge.metrics(logits, targets)

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
        probs, cut = logits.float().sigmoid(), self._cut().tolist()
        return [{"labels": [n for n, x, t in zip(self.labels, p, cut) if x > t],
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p)}} for p in probs]

    def prediction_columns(self) -> list[str]:
        return ["labels"] + [f"prob_{k}" for k in self.labels]

    hf_parameters, hf_list_of_one = ("top_k", "function_to_apply"), True

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        from fmtune.tasks.classification import label_scores

        return label_scores(record["probabilities"], parameters, "sigmoid")

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
            sides = np.minimum(y[:, keep].sum(0), len(y) - y[:, keep].sum(0))  # each label's rarer side, in rows
            rarest = int(sides.min()) if len(sides) else 0
            return scaled(OneVsRestClassifier(logreg(seed, rarest))).fit(x, y[:, keep]), keep

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
