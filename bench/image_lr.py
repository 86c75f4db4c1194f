"""Image classification, full fine-tuning: which learning rate should be the default? fmtune's
`--strategy full` at several train.lr values, every other setting fmtune's default (3 epochs,
batch 32 with train.min_steps, the head started from the linear probe and kept unless fine-tuning
does better on validation), on ImageNet CNNs and three real image sets.

    .venv/bin/python bench/image_lr.py [--models efficientnet-lite0,mobilenet-v2]
        [--datasets digits,mnist-5k,fashion-mnist] [--lrs 5e-5,2e-4,1e-3,2e-3] [--seeds 1] > result.json

Data: fmtune's zoo exports, 1,200 training / 300 validation / 1,000 test rows (digits: 1,200 / 200 /
397); fashion-mnist needs Debian's dataset-fashion-mnist. Images at 64 px (model.image_size; the
backbones' own 224 px costs 12x the time on 2 cores). Each row: test accuracy, the linear probe's
(train.baseline, the pretrained backbone), whether the run's model is that probe (`kept_as_is`:
fine-tuning never beat it on validation), and the training seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(model: str, files: dict, lr: float, seed: int, out: Path) -> dict:
    import fmtune

    cfg = {"model": {"name": model, "image_size": 64}, "strategy": {"name": "full"},
           "data": {k: str(files[k]) for k in ("train", "val", "test")}, "out": str(out),
           "train": {"seed": seed, "lr": lr, "baseline": True}}
    started = time.perf_counter()
    s = fmtune.train(cfg, overwrite=True, quiet=True, report=False)
    init = s.get("head_init", {})
    return {"seed": seed, "accuracy": round(s["eval"]["test"]["accuracy"], 4),
            "probe_accuracy": round(s["eval"]["baseline"]["accuracy"], 4), "kept_as_is": init.get("kept_as_is"),
            "train_s": round(s["seconds"] + init.get("seconds", 0.0), 1), "best_step": s["best_step"],
            "wall_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    import numpy as np
    from common import start

    from fmtune.zoo.datasets import export

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientnet-lite0,mobilenet-v2")
    ap.add_argument("--datasets", default="digits,mnist-5k,fashion-mnist")
    ap.add_argument("--lrs", default="5e-5,2e-4,1e-3,2e-3")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    a = ap.parse_args()
    work, result = start(a.out, "fmtune-image-lr-bench-")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        for name in a.datasets.split(","):
            sizes = (1200, 200, 397) if name == "digits" else (1200, 300, 1000)
            files = export(name, work / "data" / name, sizes=sizes, seed=0)
            for model in a.models.split(","):
                case = f"{model} {name}"
                result["results"][case] = {}
                for lr in a.lrs.split(","):
                    runs = []
                    for seed in range(a.seeds):
                        log(f"{case} lr {lr} seed {seed} ...")
                        runs.append(run(model, files, float(lr), seed, work / "runs" / f"{model}-{name}-{lr}"))
                        log(f"  {runs[-1]}")
                    result["results"][case][lr] = {
                        "accuracy_mean": round(float(np.mean([r["accuracy"] for r in runs])), 4), "runs": runs}
                log("RESULT " + json.dumps({case: result["results"][case]}))
    print(json.dumps(result, indent=2), file=real_stdout)


if __name__ == "__main__":
    main()
