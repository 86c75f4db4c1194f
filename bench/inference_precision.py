"""Inference precision: each demo's run scored on its test split in fp32 and under bf16 autocast (what
``hardware.inference_autocast`` picks for ``train.precision: auto`` on a CPU with AMX), side by side: seconds
(median of 3), the test metrics of both, and how often the two agree (the argmax of every row, or of every
token; regression: the largest difference in target units).

    .venv/bin/python bench/inference_precision.py [--tasks text,image,ner,regression] [--out DIR] > result.json

Each demo is trained first into DIR/<task> (about a minute each on 2 cores), or reused from there.
Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import start  # noqa: E402

from fmtune.api import make_dataset  # noqa: E402
from fmtune.data.prepare import read_data  # noqa: E402
from fmtune.demos import demo  # noqa: E402
from fmtune.run import open_run  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.training.infer import infer  # noqa: E402


def measure(run_dir: Path) -> dict:
    run = open_run(run_dir)
    cfg = run.config
    df = read_data(Path(cfg.data.test), run.task, cfg.data)
    ds, _ = make_dataset(df, run.bundle, run.task, cfg.data)
    model = run.bundle.model.eval()
    out: dict = {"rows": len(ds), "model": cfg.model.name, "trained_in": json.loads(
        (run_dir / "run.json").read_text())["hardware"].split(" (")[0]}
    logits = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        infer(model, ds, cfg.train.eval_batch_size, autocast_dtype=dtype)  # warm-up
        secs = []
        for _ in range(3):
            t0 = time.perf_counter()
            logits[name], targets = infer(model, ds, cfg.train.eval_batch_size, autocast_dtype=dtype)
            secs.append(time.perf_counter() - t0)
        metrics = run.task.metrics(logits[name], targets)
        metrics.pop("loss", None)
        out[name] = {"seconds": round(float(np.median(secs)), 3), "all_seconds": [round(s, 3) for s in secs],
                     "test": {k: round(float(v), 4) for k, v in metrics.items() if isinstance(v, (int, float))}}
    out["bf16_speedup"] = round(out["fp32"]["seconds"] / out["bf16"]["seconds"], 2)
    a, b = logits["fp32"], logits["bf16"]
    axis = {"classification": -1, "ner": -1, "audio-classification": -1, "segmentation": 1}.get(run.task.name)
    if axis is not None:  # one class per row (token, pixel): how often both pick the same
        same = a.argmax(axis) == b.argmax(axis)
        keep = a.abs().sum(axis) > 0  # (per token: the padding positions past each example are zeros in both)
        out["same_class_share"] = round(float(same[keep].float().mean()), 5)
    else:  # scores (multi-label logits, regression outputs, boxes and their logits): the largest difference
        out["max_abs_difference"] = round(float((a - b).abs().max()), 5)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="text,image,ner,regression", help="demos (fmtune demo --task), comma-separated")
    p.add_argument("--out", help="folder for the demo runs (default: a new temporary one); runs there are reused")
    args = p.parse_args()
    work, result = start(args.out, "fmtune-precision-")
    result["cpu_has_amx"] = hardware.inference_autocast("auto", "cpu") is not None
    for task in args.tasks.split(","):
        run_dir = work / task
        if not (run_dir / "eval.json").is_file():
            print(f"[bench] fmtune demo --task {task}", file=sys.stderr)
            demo(task, run_dir, quiet=True, overwrite=True)
        print(f"[bench] {task}: fp32 against bf16", file=sys.stderr)
        result["results"][task] = measure(run_dir)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
