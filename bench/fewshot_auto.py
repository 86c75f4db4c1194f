"""Few labels, a selection study (issue 20): does `--strategy auto`'s check (contrastive tuning
scored against the plain probe on two halves of the training rows; `strategy.auto_check`) pick the
better of the two? On validation samples only: seeds 10-14 (bench/fewshot.py uses 0-4), scored on
500 training-split rows outside each sample, never the test split.

    .venv/bin/python bench/fewshot_auto.py [--cells rotten-tomatoes:8,...] > result.json

For every cell (dataset:rows per class; the datasets of bench/fewshot.py, stdlib-modules included)
and seed, fmtune trains `--strategy contrastive`, `--strategy head` and `--strategy auto`, all with
their defaults otherwise; the JSON has each one's mean validation accuracy and training seconds,
and what auto's check chose per seed. Progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import fmtune  # noqa: E402
from fmtune.transfer import per_class  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from fewshot import MANY_CLASSES, stdlib_modules  # noqa: E402

CELLS = ("rotten-tomatoes:8,rotten-tomatoes:16,tweet-sentiment:8,tweet-sentiment:16,"
         f"{MANY_CLASSES}:8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default=CELLS, help="dataset:rows per class, comma-separated")
    ap.add_argument("--seeds", default="10,11,12,13,14")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="fmtune-fewshot-auto-"))
    pools: dict[str, pd.DataFrame] = {}
    out = {}
    for cell in args.cells.split(","):
        name, size = cell.split(":")
        if name not in pools:
            pools[name] = (stdlib_modules(work / name)[0] if name == MANY_CLASSES
                           else pd.read_csv(export(name, work / name, seed=0)["train"]))
        acc: dict[str, list[float]] = {"contrastive": [], "head": [], "auto": []}
        secs: dict[str, list[float]] = {k: [] for k in acc}
        checks = []
        for seed in (int(s) for s in args.seeds.split(",")):
            sample = per_class(pools[name], "label", int(size), seed)
            val = pools[name].drop(sample.index).sample(500, random_state=seed)
            sample.to_csv(work / "t.csv", index=False)
            val.to_csv(work / "v.csv", index=False)
            for strategy in acc:
                cfg = {"model": {"name": "minilm-l6"}, "strategy": {"name": strategy}, "train": {"seed": seed},
                       "data": {"train": str(work / "t.csv"), "test": str(work / "v.csv")}, "out": str(work / "run")}
                started = time.perf_counter()
                summary = fmtune.train(cfg, overwrite=True, quiet=True, report=False)
                secs[strategy].append(time.perf_counter() - started)
                acc[strategy].append(summary["eval"]["test"]["accuracy"])
                if strategy == "auto":
                    info = json.loads((work / "run" / "run.json").read_text())["few_labels"]["auto"]
                    checks.append({"seed": seed, "chosen": info["strategy"], **info.get("check", {})})
            print(f"{cell} seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in acc.items())
                  + f"; auto chose {checks[-1]['chosen']}", file=sys.stderr, flush=True)
        out[cell] = {"mean_validation_accuracy": {k: round(float(np.mean(v)), 4) for k, v in acc.items()},
                     "per_seed": {k: [round(x, 4) for x in v] for k, v in acc.items()},
                     "train_s": {k: round(float(np.mean(v)), 1) for k, v in secs.items()}, "auto_check": checks}
        print(cell, out[cell]["mean_validation_accuracy"], out[cell]["train_s"], file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
