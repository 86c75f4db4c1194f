"""Few labels, a selection study (issue 20): after fmtune's contrastive phase, which linear head,
how many contrastive steps, which pair loss? On validation samples only: seeds 10-14 (the bench,
bench/fewshot.py, uses 0-4), scored on 500 training-split rows outside each sample, never the test
split.

    .venv/bin/python bench/fewshot_heads.py [SIZES=8,16] [OTHER_STEPS=30] [ALPHAS] [--losses cosine]
        [--datasets rotten-tomatoes,tweet-sentiment] > result.json

For each dataset, rows per class, contrastive step count (fmtune's default, then each of
OTHER_STEPS) and pair loss (`--losses`: cosine = SetFit's, the default; supcon or supcon@T = the
supervised contrastive loss at temperature T), fmtune trains `--strategy contrastive` with its
defaults otherwise and the tuned encoder embeds the sample and the validation rows; heads compared:
`cv-scaled (now)` (fmtune's: LogisticRegressionCV over standardised features), `C=1 normalised
(setfit)` (SetFit's: LogisticRegression(C=1) on L2-normalised embeddings), `cv normalised`
(LogisticRegressionCV, fmtune's grid of C, on L2-normalised embeddings), `centroid` (nearest class
mean by cosine) and `run` (the run's own head after its epochs). With ALPHAS (e.g. 0,0.5), also
`cv-scaled, alpha=A`: fmtune's head on an encoder whose weights are interpolated between the
pretrained (A=0: the plain probe) and the contrastively tuned ones (A=1), as WiSE-FT (Wortsman et
al., 2022) does, and `ensemble of alphas`: the mean of those heads' class probabilities (an output
ensemble; with 0,1 the plain probe's and the contrastive head's). Mean validation accuracy over
the 5 samples (and fmtune's head per sample); progress lines on stdout, then one JSON document.

    .venv/bin/python bench/fewshot_heads.py 8,16 "" 0,0.25,0.5,0.75
    .venv/bin/python bench/fewshot_heads.py 8,16 "" 0,1
    .venv/bin/python bench/fewshot_heads.py 8,16 "" --losses cosine,supcon@0.1,supcon@0.05
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402

import fmtune  # noqa: E402
from fmtune.data.prepare import make_dataset  # noqa: E402
from fmtune.models import build  # noqa: E402
from fmtune.run import open_run  # noqa: E402
from fmtune.tasks.probe import logreg, scaled  # noqa: E402
from fmtune.training.infer import infer  # noqa: E402
from fmtune.transfer import per_class  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fewshot import MANY_CLASSES, stdlib_modules  # noqa: E402  (bench/fewshot.py: the many-class set)

HEADS = ("cv-scaled (now)", "C=1 normalised (setfit)", "cv normalised", "centroid", "run")


def embed(run, df: pd.DataFrame, model=None) -> tuple[np.ndarray, np.ndarray]:
    ds, _ = make_dataset(df, run.bundle, run.task, run.config.data)
    x, y = infer(model or run.bundle.model, ds, 128, features=True)
    return x.numpy(), y.numpy()


def interpolated(model, pretrained: dict, tuned: dict, alpha: float):
    """``model`` loaded with floating-point weights (1 - alpha) pretrained + alpha tuned (state dicts)."""
    model.load_state_dict({k: (v + alpha * (tuned[k] - v)) if v.is_floating_point() else tuned[k]
                           for k, v in pretrained.items()})
    return model


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sizes", nargs="?", default="8,16", help="rows per class, comma-separated")
    ap.add_argument("other_steps", nargs="?", default="30",
                    help="contrastive step counts tried besides the default, comma-separated ('' for none)")
    ap.add_argument("alphas", nargs="?", default="", help="WiSE-FT interpolations, comma-separated")
    ap.add_argument("--losses", default="cosine",
                    help="pair losses, comma-separated: cosine, supcon or supcon@T (temperature T)")
    ap.add_argument("--strategy-json", default="{}",
                    help='more strategy settings for every run, e.g. \'{"freeze_embeddings": false}\'')
    ap.add_argument("--datasets", default="rotten-tomatoes,tweet-sentiment",
                    help=f"comma-separated: zoo text sets, or {MANY_CLASSES} (bench/fewshot.py's many-class set)")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="fmtune-fewshot-heads-"))
    sizes = [int(s) for s in args.sizes.split(",")]
    steps_options = [None] + [int(s) for s in args.other_steps.split(",") if s]
    alphas = [float(a) for a in args.alphas.split(",") if a]
    losses = args.losses.split(",")
    extra = json.loads(args.strategy_json)
    heads = HEADS + tuple(f"cv-scaled, alpha={a:g}" for a in alphas) + (("ensemble of alphas",) if alphas else ())
    out = {}
    for name in args.datasets.split(","):
        train_all = (stdlib_modules(work / name)[0] if name == MANY_CLASSES
                     else pd.read_csv(export(name, work / name, seed=0)["train"]))
        for size in sizes:
            for steps, loss in itertools.product(steps_options, losses):
                acc: dict[str, list[float]] = {h: [] for h in heads}
                pair_seconds: list[float] = []
                for seed in range(10, 15):
                    sample = per_class(train_all, "label", size, seed)
                    val = train_all.drop(sample.index).sample(500, random_state=seed)
                    sample.to_csv(work / "t.csv", index=False)
                    val.to_csv(work / "v.csv", index=False)
                    strategy = {"name": "contrastive", **extra, **loss_setting(loss),
                                **({"contrastive_steps": steps} if steps else {})}
                    cfg = {"model": {"name": "minilm-l6"}, "strategy": strategy, "train": {"seed": seed},
                           "data": {"train": str(work / "t.csv"), "test": str(work / "v.csv")},
                           "out": str(work / "run")}
                    summary = fmtune.train(cfg, overwrite=True, quiet=True, report=False)
                    acc["run"].append(summary["eval"]["test"]["accuracy"])
                    info = json.loads((work / "run" / "run.json").read_text())
                    pair_seconds.append(info["few_labels"]["contrastive"]["seconds"])
                    run = open_run(work / "run")
                    (xt, yt), (xv, yv) = embed(run, sample), embed(run, val)
                    probe = scaled(logreg(seed)).fit(xt, yt)
                    acc["cv-scaled (now)"].append(float((probe.predict(xv) == yv).mean()))
                    setfit = LogisticRegression(C=1.0, max_iter=3000).fit(unit(xt), yt)
                    acc["C=1 normalised (setfit)"].append(float((setfit.predict(unit(xv)) == yv).mean()))
                    both = logreg(seed).fit(unit(xt), yt)
                    acc["cv normalised"].append(float((both.predict(unit(xv)) == yv).mean()))
                    classes = np.unique(yt)
                    centroids = unit(np.stack([unit(xt[yt == c]).mean(0) for c in classes]))
                    acc["centroid"].append(float((classes[(unit(xv) @ centroids.T).argmax(1)] == yv).mean()))
                    if alphas:  # the pretrained model built once per run; each alpha loads into it
                        model = build.create(run.config.model, run.task).model.eval()
                        pretrained = {k: v.clone() for k, v in model.state_dict().items()}
                        tuned = run.bundle.model.state_dict()
                    proba = []
                    for a in alphas:
                        interpolated(model, pretrained, tuned, a)
                        (xt, yt), (xv, yv) = embed(run, sample, model), embed(run, val, model)
                        probe = scaled(logreg(seed)).fit(xt, yt)
                        acc[f"cv-scaled, alpha={a:g}"].append(float((probe.predict(xv) == yv).mean()))
                        proba.append(probe.predict_proba(xv))
                    if alphas:
                        votes = probe.classes_[np.mean(proba, axis=0).argmax(axis=1)]
                        acc["ensemble of alphas"].append(float((votes == yv).mean()))
                key = f"{name} {size} steps={steps or 'default'} loss={loss}" + (f" {extra}" if extra else "")
                out[key] = {k: round(float(np.mean(v)), 4) for k, v in acc.items()}
                out[key]["per_seed_cv-scaled"] = [round(v, 4) for v in acc["cv-scaled (now)"]]
                out[key]["per_seed_run"] = [round(v, 4) for v in acc["run"]]
                out[key]["contrastive_seconds_mean"] = round(float(np.mean(pair_seconds)), 2)
                print(key, out[key], flush=True)
    print(json.dumps(out, indent=1))


def loss_setting(text: str) -> dict:
    """'cosine', 'supcon' or 'supcon@0.05' as strategy settings."""
    name, _, temp = text.partition("@")
    return {"pair_loss": name, **({"temperature": float(temp)} if temp else {})}


if __name__ == "__main__":
    main()
