"""Small matplotlib figures that tasks write beside a run's test results (Agg backend, PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(cm: np.ndarray, names: list[str], path: Path, title: str, xnames: list[str] | None = None,
                     xlabel: str = "predicted", ylabel: str = "true") -> Path:
    """A count matrix as a heat map with the counts written in (up to 30 classes). Beyond 30 the
    figure grows (up to 28 inches) and the class names shrink so that each stays on its own row."""
    plt = pyplot()
    xnames = xnames if xnames is not None else names
    k, kx = len(names), len(xnames)
    most = max(k, kx)
    side = min(2 + 0.45 * most, 16) if most <= 30 else min(4 + 0.16 * most, 28)
    # points of height per row, about 70% of the figure being the matrix; the names take 3/4 of it
    fontsize = float(min(10.0, max(2.0, 0.75 * side * 0.85 * 72 * 0.7 / most)))
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(kx), labels=xnames, rotation=45 if kx > 4 else 0, ha="right" if kx > 4 else "center",
                  fontsize=fontsize)
    ax.set_yticks(range(k), labels=names, fontsize=fontsize)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title or "confusion matrix")
    if max(k, kx) <= 30:
        for i in range(k):
            for j in range(kx):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_gallery(images: list[Any], titles: list[str], path: Path) -> Path:
    """Images (uint8 CHW tensors) side by side with a title each."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(images), figsize=(2.2 * len(images), 2.6), squeeze=False)
    for ax, img, title in zip(axes[0], images, titles):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fairness(result: dict[str, Any], path: Path, metric: str) -> Path:
    """One panel per grouping: each group's ``metric`` (``fairness.key_metric``: the selection rate for two labels,
    else accuracy; regression: MAE; speech recognition: WER) per model, with its confidence interval; too-small
    groups hatched."""
    plt = pyplot()
    models = list(result["models"])
    names = list(result["models"][models[0]])
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.2 + 0.35 * sum(
        len(result["models"][models[0]][n]["groups"]) for n in names)), squeeze=False)
    height = 0.8 / len(models)
    for ax, name in zip(axes[:, 0], names):
        groups = result["models"][models[0]][name]["groups"]
        y = np.arange(len(groups))
        for j, model in enumerate(models):
            rows = result["models"][model][name]["groups"]
            vals = [g["metrics"][metric]["value"] or 0.0 for g in rows]
            lo = [v - (g["metrics"][metric]["ci"][0] if g["metrics"][metric]["ci"][0] is not None else v)
                  for v, g in zip(vals, rows)]
            hi = [(g["metrics"][metric]["ci"][1] if g["metrics"][metric]["ci"][1] is not None else v) - v
                  for v, g in zip(vals, rows)]
            bars = ax.barh(y + j * height, vals, height, xerr=[lo, hi], capsize=2, label=model)
            for b, g in zip(bars, rows):
                if g["too_small"]:
                    b.set_hatch("//")
        ax.set_yticks(y + height * (len(models) - 1) / 2,
                      labels=[f"{g['group']} (n={g['n']})" for g in groups], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{metric.replace('_', ' ')} by {name}", fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def active_learning(curves: dict[str, list[dict[str, Any]]], path: Path, metric: str = "accuracy") -> Path:
    """fmtune select --simulate: test ``metric`` against labels used, one line per strategy."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p["labels"] for p in points], [p[metric] for p in points], marker="o",
                linestyle="--" if name == "random" else "-", label=name)
    ax.set_xlabel("labelled rows")
    ax.set_ylabel(f"test {metric}")
    ax.set_title("active learning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_atomic(fig, path)


def save_atomic(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Write ``fig`` as ``path`` (temp file + rename: a reader never sees half a PNG) and close it. The
    temp file is this process's own: two search workers write one study's plots."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)
    tmp.replace(path)
    return path
