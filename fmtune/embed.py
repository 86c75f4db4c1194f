"""What did fine-tuning do to the representation? The penultimate (pooled) features of the
pretrained backbone and of the fine-tuned model, projected to 2-D and coloured by label.

    fmtune embed RUN --data test.csv      # -> RUN/embed/embed.png (before | after), embed.json

Projections: PCA always; t-SNE (scikit-learn) by default too; UMAP with ``--method umap`` when
umap-learn is installed. embed.json holds two numbers per model that do not depend on the
projection: the silhouette score of the labels in feature space (cosine; higher: classes lie
apart) and the accuracy of a 5-nearest-neighbour classifier, cross-validated.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from fmtune import ui
from fmtune.data.prepare import make_dataset, read_data
from fmtune.errors import ConfigError, DataError
from fmtune.fsutil import atomic_dir, check_output_dir
from fmtune.training.infer import infer

METHODS = ("pca", "tsne", "umap")


def project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(x)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=min(30.0, max(2.0, (len(x) - 1) / 3), len(x) - 1), init="pca",
                    random_state=seed).fit_transform(x)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ConfigError("--method umap needs umap-learn: pip install umap-learn") from None
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    raise ConfigError(f"--method {method!r}: choose from {', '.join(METHODS)}")


def separation(x: np.ndarray, y: np.ndarray, seed: int) -> dict[str, float]:
    """Silhouette (cosine) of the labels and 5-NN cross-validated accuracy, in feature space."""
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    out: dict[str, float] = {}
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        return out
    if len(classes) < len(x):  # (a silhouette needs a label shared by two points at least)
        out["silhouette_cosine"] = round(float(silhouette_score(x, y, metric="cosine",
                                                                sample_size=min(len(x), 2000), random_state=seed)), 4)
    folds = int(min(5, counts.min()))
    if folds >= 2:
        fitted = len(x) - -(-len(x) // folds)  # the fewest rows a fold's neighbours are drawn from
        knn = KNeighborsClassifier(n_neighbors=max(1, min(5, fitted)), metric="cosine")
        out["knn5_accuracy_cv"] = round(float(cross_val_score(knn, x, y, cv=folds).mean()), 4)
    return out


def embed(run: str | Path, data: str | Path | None = None, *, methods: tuple[str, ...] = ("pca", "tsne"),
          out: str | Path | None = None, limit: int | None = 1000, seed: int = 0,
          quiet: bool = False) -> dict[str, Any]:
    from fmtune.models import build
    from fmtune.predictor import Predictor

    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--method {m!r}: choose from {', '.join(METHODS)}")
    pred = Predictor(run)
    pred.task.require("embed", "fmtune embed")
    cfg, task = pred.config, pred.task
    target = Path(out) if out else pred.run_dir / "embed"
    check_output_dir(target, "embed.json")  # before the work, not after
    source = data or cfg.data.test or cfg.data.val
    if source is None:
        raise DataError(f"{run}: no test data configured; pass --data FILE")
    df = read_data(Path(source), task, cfg.data)
    if limit and len(df) > limit:
        df = df.sample(n=limit, random_state=seed).sort_index()
    ds, _ = make_dataset(df, pred.bundle, task, cfg.data)
    if len(ds) < 2:
        raise DataError(f"{source}: {len(ds)} usable row(s); a map of the features needs 2 at least")
    pretrained = build.create(dataclasses.replace(cfg.model, init="pretrained"), task).model
    feats = {}
    with ui.CountProgress("features (pretrained, fine-tuned)", 2 * len(ds), quiet) as bar:
        feats["pretrained"] = infer(pretrained, ds, pred.batch_size, features=True, progress=bar)[0].numpy()
        feats["fine-tuned"] = infer(pred.model, ds, pred.batch_size, features=True, progress=bar)[0].numpy()
    targets = ds.targets.numpy()
    if not task.labels:  # a number per example: coloured by value, no classes to separate
        colour, y = targets.reshape(len(targets), -1)[:, 0], None
    elif targets.ndim == 2:  # several labels per example: coloured by the first
        colour, y = targets.argmax(1), targets.argmax(1)
    else:
        colour, y = targets, targets
    summary: dict[str, Any] = {"data": str(source), "rows": len(ds), "methods": list(methods)}
    if y is not None:
        summary["separation"] = {k: separation(v, y, seed) for k, v in feats.items()}
    with ui.CountProgress("projecting", len(methods) * 2, quiet) as bar:
        points = {}
        for m in methods:
            for k, v in feats.items():
                points[(m, k)] = project(v, m, seed)
                bar(1)

    def write(tmp: Path) -> None:
        _plot(points, colour, task, summary, methods, tmp / "embed.png", pred.run_dir.name)
        (tmp / "embed.json").write_text(json.dumps(summary, indent=1))

    atomic_dir(target, write)
    summary["out"] = str(target)
    return summary


def _plot(points: dict, colour: np.ndarray, task: Any, summary: dict, methods: tuple[str, ...], path: Path,
          title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(methods), 2, figsize=(10, 4.6 * len(methods)), squeeze=False)
    labels = task.labels or None
    for r, m in enumerate(methods):
        for c, k in enumerate(("pretrained", "fine-tuned")):
            ax = axes[r][c]
            xy = points[(m, k)]
            if labels:
                cmap = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
                for i, name in enumerate(labels):
                    sel = colour == i
                    if sel.any():
                        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=name)
            else:
                sc = ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.7, c=colour, cmap="viridis")
                fig.colorbar(sc, ax=ax)
            sep = summary.get("separation", {}).get(k, {})
            extra = ", ".join(f"{a} {b}" for a, b in sep.items())
            ax.set_title(f"{k} ({m.upper()})" + (f"\n{extra}" if extra else ""), fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if labels and len(labels) <= 20:
        axes[0][1].legend(fontsize=7, markerscale=2, loc="best")
    fig.suptitle(f"{title}: penultimate features, before vs after fine-tuning ({summary['rows']} rows)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
