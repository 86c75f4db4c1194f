"""Single-label classification: a pooled vector -> one of K labels (softmax, cross-entropy)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from fmtune import plots
from fmtune.data.readers import row_label
from fmtune.errors import DataError
from fmtune.tasks.base import (
    TASKS,
    Task,
    check_numeric_labels,
    missing_values,
    one_hot_labels,
    warn_look_alike_labels,
    zero_one_columns,
)
from fmtune.tasks.probe import logreg, scaled, unscaled


def label_scores(probabilities: dict[str, float], parameters: dict[str, Any], function: str) -> list[dict[str, Any]]:
    """[{label, score}] most probable first (the Inference API's classification answer), the first
    ``top_k``; ``function_to_apply`` may only name how this model's scores are made."""
    asked = parameters.get("function_to_apply")
    if asked is not None and asked != function:
        raise DataError(f"parameters.function_to_apply: {asked!r}; this model's scores are its {function}")
    top_k = parameters.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise DataError(f"parameters.top_k must be a whole number >= 1, got {top_k!r}")
    ranked = sorted(probabilities.items(), key=lambda kv: -kv[1])
    return [{"label": k, "score": v} for k, v in ranked[:top_k]]


def _ones_a_row(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    """How many of the 0/1 ``columns`` are 1 in each row."""
    return df[columns].astype(str).apply(lambda c: c.str.strip().isin(("1", "1.0"))).sum(axis=1)


@TASKS.register("classification")
class Classification(Task):
    name = "classification"
    scalar_targets = True
    description = "one label per example (softmax)"
    default_metric = "accuracy"
    metric_names = ("accuracy", "macro_f1", "loss")
    hf_problem_type = "single_label_classification"
    capabilities = frozenset({"stratified_split", "mistakes", "attacks", "continual", "transfer", "explain", "embed",
                              "robustness", "fairness", "pseudo_labels", "usual_columns"})

    @classmethod
    def usual_label_columns(cls, df: pd.DataFrame, inputs: set[str]) -> list[str] | None:
        """One-hot class columns of a table without a label column (plant-pathology's healthy, multiple_diseases,
        rust, scab; ISIC 2018's MEL, NV ... as 0.0 / 1.0): two or more 0/1 columns with exactly one 1 a row."""
        found = zero_one_columns(df, inputs)
        if len(found) < 2:
            return None
        return found if (_ones_a_row(df, found) == 1).all() else None

    @classmethod
    def require_targets(cls, df: pd.DataFrame, data_cfg: Any) -> None:
        """As every task's; a table without its label column whose 0/1 columns mark several a row (GoEmotions' raw
        CSV) is told it is multi-label."""
        column = cls.target_column(data_cfg)
        if column not in df.columns and not data_cfg.label_columns:
            from fmtune.data.readers import text_columns

            found = zero_one_columns(df, set(text_columns(data_cfg)))
            if len(found) >= 2:
                ones = _ones_a_row(df, found)
                if (ones > 1).any():
                    i = int(np.flatnonzero((ones > 1).to_numpy())[0])
                    raise DataError(f"{row_label(df, i)}: no label column {column!r}, and the table's 0/1 columns "
                                    f"{', '.join(found)} mark {int(ones.iat[i])} labels on this row: a multi-label "
                                    "table; --task multilabel reads them")
        super().require_targets(df, data_cfg)

    @classmethod
    def labelled(cls, df: pd.DataFrame, data_cfg: Any) -> pd.DataFrame:
        if data_cfg.label_columns:  # one-hot columns: each row's one class
            df = one_hot_labels(df, data_cfg)
            column = data_cfg.label_column
            if column in df.columns and df[column].map(lambda v: isinstance(v, list)).all():
                counts = df[column].map(len).to_numpy()
                bad = np.flatnonzero(counts != 1)
                if len(bad):
                    i = int(bad[0])
                    raise DataError(f"{row_label(df, i)}: data.label_columns marks {counts[i]} classes "
                                    f"({', '.join(df[column].iloc[i]) or 'none'}); a single-label run needs exactly "
                                    "one a row (--task multilabel reads several)")
                df[column] = [v[0] for v in df[column]]
        return super().labelled(df, data_cfg)

    @classmethod
    def stratify_values(cls, df: pd.DataFrame, column: str) -> pd.Series | None:
        return df[column].astype(str) if column in df.columns else None

    def label_counts(self, df: pd.DataFrame, column: str) -> dict[str, int] | None:
        return df[column].astype(str).value_counts().sort_index().to_dict()

    @classmethod
    def row_labels(cls, df: pd.DataFrame, data_cfg: Any) -> list[list[str]] | None:
        column = cls.target_column(data_cfg)
        return [[v] for v in df[column].astype(str)] if column in df.columns else None

    @classmethod
    def from_train(cls, values: pd.Series, df: pd.DataFrame, column: str = "label",
                   class_weights: bool = False, **kw: Any) -> Classification:
        missing_values(df, values, column)
        check_numeric_labels(df, values, column)
        warn_look_alike_labels(df, values, column)
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
        missing_values(df, values, column)
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

    def loss(self, logits, targets, weights=None):
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        if weights is None:
            return F.cross_entropy(logits.float(), targets, weight=w, ignore_index=-100)
        each = F.cross_entropy(logits.float(), targets, weight=w, ignore_index=-100, reduction="none")
        return (each * weights).sum() / weights[targets != -100].sum().clamp(min=1e-12)

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

    def postprocess(self, logits, ds=None):
        probs = logits.float().softmax(-1)
        top = probs.argmax(-1)
        return [{"label": self.labels[int(t)], "score": float(p[t]),
                 "probabilities": {n: float(x) for n, x in zip(self.labels, p)}} for t, p in zip(top, probs)]

    def prediction_columns(self) -> list[str]:
        return ["label", "score"] + [f"prob_{k}" for k in self.labels]

    hf_parameters, hf_list_of_one = ("top_k", "function_to_apply"), True
    hf_function = "softmax"  # how the scores come from the logits (the API's function_to_apply)

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        return label_scores(record["probabilities"], parameters, self.hf_function)

    def flatten(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"label": record["label"], "score": record["score"],
                **{f"prob_{k}": v for k, v in record["probabilities"].items()}}

    def outcomes(self, logits, targets):
        return {"kind": "labels", "true": targets.numpy(), "pred": logits.argmax(-1).numpy(),
                "proba": logits.float().softmax(-1).numpy()}

    # --- the test report ---------------------------------------------------------------------
    def text_report(self, logits, targets) -> str:
        y, pred = targets.numpy(), logits.argmax(-1).numpy()
        known = y >= 0
        text = skm.classification_report(y[known], pred[known], labels=list(range(len(self.labels))),
                                         target_names=self.labels, zero_division=0, digits=4)
        if (~known).any():
            text += f"\n{int((~known).sum())} example(s) with labels unseen in training counted as errors in accuracy\n"
        pairs = self.most_confused(self.confusion(logits, targets))
        if pairs:
            text += "\nmost confused (true -> predicted: test examples)\n" + "".join(
                f"  {p['true']} -> {p['predicted']}: {p['count']}\n" for p in pairs)
        return text

    def most_confused(self, cm: np.ndarray, k: int = 10) -> list[dict[str, Any]]:
        """The ``k`` largest off-diagonal cells of a confusion matrix, largest first: with many classes
        the matrix is too big to read, and these are what to look at."""
        off = cm.copy()
        np.fill_diagonal(off, 0)
        cells = [(int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))]
        cells.sort(key=lambda c: (-c[0], c[1], c[2]))
        return [{"true": self.labels[i], "predicted": self.labels[j], "count": n} for n, i, j in cells[:k]]

    def confusion(self, logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """Counts of (true, predicted) over the examples whose label was seen in training."""
        y, pred = targets.numpy(), logits.argmax(-1).numpy()
        return skm.confusion_matrix(y[y >= 0], pred[y >= 0], labels=list(range(len(self.labels))))

    def report_files(self, logits, targets, folder: Path, title: str) -> dict[str, Any]:
        cm = self.confusion(logits, targets)
        path = plots.confusion_matrix(cm, self.labels, folder / "confusion_matrix.png",
                                      f"{title}: test confusion matrix")
        return {"confusion_matrix": path.name, "most_confused": self.most_confused(cm)}

    def mistake_positions(self, logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
        """(position, predicted class, score) of the ``k`` most confident wrong predictions."""
        score, pred = logits.float().softmax(-1).max(-1)
        wrong = torch.nonzero((pred != targets) & (targets >= 0)).flatten()
        order = wrong[score[wrong].argsort(descending=True)][:k].tolist()
        return [(i, int(pred[i]), float(score[i])) for i in order]

    def mistakes(self, logits, targets, ds, bundle, png, k=8):
        """The ``k`` wrong predictions made with the highest confidence: position in the split, true
        and predicted label, score, and the input (text as the model read it; images drawn into ``png``)."""
        if not len(targets):
            return []
        out = [{"position": i, "true": self.labels[int(targets[i])], "predicted": self.labels[p],
                "score": round(score, 4)} for i, p, score in self.mistake_positions(logits, targets, k)]
        if bundle.kind == "text":
            for rec in out:
                rec["input"] = ds.text(rec["position"], bundle.tokenizer)[:400]
        elif bundle.kind == "audio":
            for rec in out:
                rec["input"] = ds.names[rec["position"]] if ds.names else ""
        elif out:
            plots.image_gallery([ds.raw([r["position"]])[0] for r in out],
                                [f"true {r['true']}\npred {r['predicted']} {r['score']:.2f}" for r in out], png)
        return out

    # --- baseline ----------------------------------------------------------------------------
    def fit_probe(self, x, targets, seed):
        known = targets.numpy() >= 0
        with warnings.catch_warnings():  # scikit-learn announces changes of LogisticRegressionCV defaults
            warnings.simplefilter("ignore", FutureWarning)
            y = targets.numpy()[known]
            counts = np.unique(y, return_counts=True)[1]
            return scaled(logreg(seed, int(counts.min()) if len(counts) else 0)).fit(x[known], y)

    def head_from_probe(self, probe, num_features):
        w, b = unscaled(probe, probe[-1].coef_, probe[-1].intercept_)
        weight, bias = np.zeros((len(self.labels), num_features)), np.zeros(len(self.labels))
        classes = probe.classes_
        if len(classes) == 2 and len(w) == 1:  # binary: P(second class) = sigmoid(w.x + b)
            weight[classes[1]], bias[classes[1]] = w[0], b[0]
        else:
            weight[classes], bias[classes] = w, b
        missing = np.setdiff1d(np.arange(len(self.labels)), classes)
        bias[missing] = -30.0  # a label the probe never saw: never predicted, as in probe_logits
        return weight, bias

    def probe_logits(self, probe, x):
        proba = np.full((len(x), len(self.labels)), 1e-12)
        proba[:, probe.classes_] = probe.predict_proba(x)
        return torch.from_numpy(np.log(proba)).float()
