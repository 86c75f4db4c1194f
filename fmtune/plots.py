"""Small matplotlib figures that tasks write beside a run's test results (Agg backend, PNG)."""

from __future__ import annotations

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
    """A count matrix as a heat map with the counts written in (up to 30 classes)."""
    plt = pyplot()
    xnames = xnames if xnames is not None else names
    k, kx = len(names), len(xnames)
    side = min(2 + 0.45 * max(k, kx), 16)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(kx), labels=xnames, rotation=45 if kx > 4 else 0, ha="right" if kx > 4 else "center")
    ax.set_yticks(range(k), labels=names)
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
