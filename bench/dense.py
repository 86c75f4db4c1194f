"""Segmentation and detection: what each strategy buys, and how fast training and prediction are.

    make bench-dense                 # writes bench/results-dense-<date>.json
    .venv/bin/python bench/dense.py [--epochs 4[,12]] [--batch-size 8] [--tasks segmentation,detection] > result.json

On the demo data (digit-scenes: 400 / 60 / 100 scenes of 192 x 192, real MNIST digits on two
real photos; 11 classes for segmentation, 10 for detection) with MobileNetV2 (ImageNet) at 192 px,
each strategy (head: the decoder on the frozen backbone; last_n: the backbone's last 4 blocks
too; full) trains with the task's default learning rates, batch 8, random crops and flips, for
the same number of epochs; the best validation checkpoint is scored on the test scenes. Training
images/s is the fit's own figure (validation excluded); prediction images/s is ``fmtune.load(run)
.predict(paths)`` on the 100 test files (decoding included), after one warm-up call.

``head`` here keeps the crops and flips (``train.augment.geometric: true``, so nothing is
cached); ``head-cached`` is the head on the frozen backbone as it trains by default: without the
crops and flips, its maps computed once and cached (``train.feature_cache``), for each number of
epochs in --cached-epochs; its ``wall_seconds`` include computing the cache (a fresh cache
folder per run).

No side-by-side tool: torchvision's and timm's segmentation and detection models do not install
with torch 2.13 here, and no package ships segmenter or detector weights. Prints one JSON
document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fmtune import api  # noqa: E402
from fmtune.predictor import Predictor  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402

STRATEGIES = ("head", "head-cached", "last_n", "full")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_one(task: str, strategy: str, files: dict[str, Path], out: Path, epochs: int,
            batch_size: int = 8) -> dict[str, Any]:
    data = {k: str(v / "annotations.json") if task == "detection" else str(v) for k, v in files.items()}
    cached = strategy == "head-cached"
    train = {"epochs": epochs, "batch_size": batch_size, "patience": None, "seed": 0}
    if cached:  # the default for a frozen backbone (train.augment.geometric: auto)
        os.environ["FMTUNE_CACHE_DIR"] = str(out.parent / f"cache-{out.name}")
    else:
        train["augment"] = {"geometric": True}
    cfg = {"model": {"name": "mobilenet-v2", "image_size": 192}, "task": {"type": task},
           "strategy": {"name": "head" if cached else strategy, "n": 4},
           "data": {"train": data["train"], "val": data["val"], "test": data["test"]},
           "train": train, "out": str(out)}
    started = time.perf_counter()
    summary = api.train(cfg, overwrite=True, quiet=True, report=False)
    wall = time.perf_counter() - started
    info = json.loads((out / "run.json").read_text())
    fit = info["fit"]
    metric = "map" if task == "detection" else "miou"
    curve = [round(r[metric], 4) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("type") == "eval" and metric in r]
    pred = Predictor(out)
    images = sorted(str(p) for p in (files["test"] / "images").iterdir())
    pred.predict(images[:8])  # warm-up
    t = time.perf_counter()
    pred.predict(images)
    predict_s = time.perf_counter() - t
    return {"task": task, "strategy": strategy, "epochs": epochs, "batch_size": batch_size,
            "steps": fit.get("steps"), "val_curve": curve, "test": summary["eval"]["test"],
            "trainable_params": info["params"]["trainable_params"], "train_seconds": round(fit["seconds"], 1),
            "train_images_per_s": round(fit["samples_per_s"], 2), "wall_seconds": round(wall, 1),
            "predict_images_per_s": round(len(images) / predict_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", default="4", help="comma-separated epoch counts, each run in turn")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--tasks", default="segmentation,detection")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="of head, head-cached, last_n, full")
    ap.add_argument("--cached-epochs", default=None,
                    help="head-cached: comma-separated epoch counts (default: --epochs)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fmtune-bench-dense-"))
    files = export("digit-scenes", root / "data", sizes=(400, 60, 100), seed=0)
    rows = []
    for task in a.tasks.split(","):
        for strategy in a.strategies.split(","):
            counts = (a.cached_epochs if strategy == "head-cached" and a.cached_epochs else a.epochs).split(",")
            for epochs in map(int, counts):
                log(f"{task} {strategy} {epochs} epochs of batch {a.batch_size} ...")
                rows.append(run_one(task, strategy, files, root / f"{task}-{strategy}-{epochs}", epochs,
                                    a.batch_size))
                log(json.dumps(rows[-1]))
    print(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(), "threads":
                                  torch.get_num_threads(), "torch": torch.__version__},
                      "data": "digit-scenes 400/60/100, 192 px", "model": "mobilenet-v2 (ImageNet)",
                      "epochs": a.epochs, "batch_size": a.batch_size, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
