"""Batch size at a task's defaults: how many optimizer steps a small dataset needs.

    .venv/bin/python bench/batch_size.py [--dataset wnut16-ner --task ner --model minilm-l6]
                                         [--batches 32,16,8 --seeds 0,1 --sizes 300,200,1000] > result.json

For each batch size and seed, ``fmtune train`` on the offline dataset's train/val/test split with
every other setting at its default (epochs, learning rates, early stopping, precision;
``train.min_steps`` off, so each batch size is the one asked for): the
number of optimizer steps, the step of the best validation score, the test metrics and the
training time. This is what chose ``Task.default_train`` for named entities (WNUT-2016, 1,695
tweets: entity F1 at batches of 32 / 16 / 8) and ``train.min_steps`` (rotten-tomatoes and
tweet-sentiment at 300 and 1,000 training rows: ``--task classification --sizes 300,200,1000``).
Prints one JSON document; progress on stderr.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import fmtune  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="wnut16-ner")
    ap.add_argument("--task", default="ner")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--batches", default="32,16,8")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sizes", default=None, help="train,val,test rows (default: the dataset's own split)")
    a = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fmtune-bench-batch-"))
    sizes = tuple(int(x) for x in a.sizes.split(",")) if a.sizes else None
    files = export(a.dataset, root / "data", sizes=sizes, seed=0)
    rows = []
    for batch in map(int, a.batches.split(",")):
        for seed in map(int, a.seeds.split(",")):
            out = root / f"run-{batch}-{seed}"
            train = {"seed": seed, "batch_size": batch, "min_steps": None}
            cfg = {"model": {"name": a.model}, "task": {"type": a.task}, "train": train,
                   "data": {k: str(v) for k, v in files.items()}, "out": str(out)}
            began = time.perf_counter()
            summary = fmtune.train(cfg, overwrite=True, quiet=True, report=False)
            fit = json.loads((out / "run.json").read_text())["fit"]
            wall = time.perf_counter() - began
            rows.append({"batch_size": batch, "seed": seed, "steps": fit["steps"], "best_step": fit["best_step"],
                         "best_val": round(fit["best"], 4), "test": summary["eval"]["test"],
                         "train_seconds": round(fit["seconds"], 1), "wall_seconds": round(wall, 1)})
            print(f"[bench] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__},
                      "dataset": a.dataset, "sizes": a.sizes, "task": a.task, "model": a.model, "runs": rows},
                     indent=2))


if __name__ == "__main__":
    main()
