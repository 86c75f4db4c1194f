"""Test-set report, confusion matrix, and the pretrained baseline (a linear probe on the
frozen pretrained backbone, fitted with scikit-learn on its pooled features)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm
from sklearn.linear_model import LogisticRegressionCV, RidgeCV
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fmtune.training.infer import infer


def text_report(task: Any, logits: torch.Tensor, targets: torch.Tensor) -> str:
    """Per-class precision/recall/F1 with macro and weighted averages; MAE/RMSE/R² for regression."""
    if task.name == "regression":
        m = task.metrics(logits, targets)
        return f"MAE {m['mae']:.4f}   RMSE {m['rmse']:.4f}   R² {m['r2']:.4f}   (n={len(targets)})"
    names = list(task.labels)
    if task.name == "multilabel":
        pred = (logits.sigmoid() > task.threshold).int().numpy()
        return skm.classification_report(targets.int().numpy(), pred, target_names=names, zero_division=0, digits=4)
    y, pred = targets.numpy(), logits.argmax(-1).numpy()
    known = y >= 0
    text = skm.classification_report(y[known], pred[known], labels=list(range(len(names))), target_names=names,
                                     zero_division=0, digits=4)
    if (~known).any():
        text += f"\n{int((~known).sum())} example(s) with labels unseen in training counted as errors in accuracy\n"
    return text


def confusion_png(task: Any, logits: torch.Tensor, targets: torch.Tensor, path: Path, title: str = "") -> Path | None:
    """Save a confusion-matrix PNG (single-label classification only)."""
    if task.name != "classification":
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y, pred = targets.numpy(), logits.argmax(-1).numpy()
    k = len(task.labels)
    cm = skm.confusion_matrix(y[y >= 0], pred[y >= 0], labels=list(range(k)))
    side = min(2 + 0.45 * k, 16)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), labels=task.labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center")
    ax.set_yticks(range(k), labels=task.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def linear_probe(model: torch.nn.Module, task: Any, train_ds: Any, eval_sets: dict[str, Any], batch_size: int,
                 seed: int = 0, progress: Any = None) -> dict[str, dict[str, float]]:
    """Fit a linear model (regularisation chosen by cross-validation) on frozen pooled features of
    ``train_ds``; score it on each eval set.

    Returns task metrics per eval set, computed exactly as for the fine-tuned model.
    """
    x_train, y_train = infer(model, train_ds, batch_size, features=True, progress=progress)
    x_train = x_train.numpy()
    with warnings.catch_warnings():  # scikit-learn announces changes of LogisticRegressionCV defaults
        warnings.simplefilter("ignore", FutureWarning)
        probe, keep = _fit_probe(task, x_train, y_train, seed)
    out = {}
    for name, ds in eval_sets.items():
        x, y = infer(model, ds, batch_size, features=True, progress=progress)
        out[name] = task.metrics(_as_logits(probe, task, x.numpy(), keep), y)
    return out


def _fit_probe(task: Any, x_train: np.ndarray, y_train: torch.Tensor, seed: int) -> tuple[Any, np.ndarray | None]:
    keep = None
    if task.name == "regression":
        probe = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 7)))
        probe.fit(x_train, y_train.numpy())
    elif task.name == "multilabel":
        probe = make_pipeline(StandardScaler(), OneVsRestClassifier(_logreg(seed)))
        y = y_train.numpy().astype(int)
        keep = (y.min(0) != y.max(0))  # a label that is always on/off in training cannot be fitted
        probe.fit(x_train, y[:, keep])
    else:
        probe = make_pipeline(StandardScaler(), _logreg(seed))
        known = y_train.numpy() >= 0
        probe.fit(x_train[known], y_train.numpy()[known])
    return probe, keep


def _logreg(seed: int) -> LogisticRegressionCV:
    # The regularisation strength is chosen by 3-fold cross-validation on the training split:
    # a fixed C overfits a few hundred examples of 384+ features and understates the baseline.
    return LogisticRegressionCV(Cs=np.logspace(-4, 2, 7), cv=3, max_iter=3000, random_state=seed)


def _as_logits(probe: Any, task: Any, x: np.ndarray, keep: np.ndarray | None) -> torch.Tensor:
    if task.name == "regression":
        return torch.from_numpy(probe.predict(x)).float().view(-1, 1)
    if task.name == "multilabel":
        full = np.full((len(x), len(task.labels)), -20.0)
        full[:, keep] = probe.decision_function(x).reshape(len(x), -1)
        return torch.from_numpy(full).float()
    proba = np.full((len(x), len(task.labels)), 1e-12)
    proba[:, probe.classes_] = probe.predict_proba(x)
    return torch.from_numpy(np.log(proba)).float()


def mistake_positions(task: Any, logits: torch.Tensor, targets: torch.Tensor, k: int) -> list[tuple[int, int, float]]:
    """(position, predicted class, score) of the ``k`` most confident wrong predictions."""
    score, pred = logits.float().softmax(-1).max(-1)
    wrong = torch.nonzero((pred != targets) & (targets >= 0)).flatten()
    order = wrong[score[wrong].argsort(descending=True)][:k].tolist()
    return [(i, int(pred[i]), float(score[i])) for i in order]


def confident_mistakes(task: Any, logits: torch.Tensor, targets: torch.Tensor, ds: Any, bundle: Any,
                       png: Path, k: int = 8) -> list[dict[str, Any]]:
    """The ``k`` wrong predictions made with the highest confidence (single-label classification):
    position in the split, true and predicted label, score, and the input (text as the model read
    it; images drawn into ``png``)."""
    if task.name != "classification" or not len(targets):
        return []
    out = [{"position": i, "true": task.labels[int(targets[i])], "predicted": task.labels[p],
            "score": round(score, 4)} for i, p, score in mistake_positions(task, logits, targets, k)]
    if bundle.kind == "text":
        for rec in out:
            text = bundle.tokenizer.decode(ds.input_ids[rec["position"]], skip_special_tokens=True)
            rec["input"] = text[:400]
    elif out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(out), figsize=(2.2 * len(out), 2.6), squeeze=False)
        for ax, rec in zip(axes[0], out):
            img = ds.raw([rec["position"]])[0]
            ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_title(f"true {rec['true']}\npred {rec['predicted']} {rec['score']:.2f}", fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(png, dpi=90)
        plt.close(fig)
    return out
