"""Active learning: how many labels each strategy needs to reach 95% of the full pool's accuracy.

    make bench-active
    .venv/bin/python bench/active.py [--pool 2000 --test 600 --start 4 -n 32 --rounds 8 --seeds 0,1,2] > result.json

Data: `fmtune datasets --export rotten-tomatoes` (split seed 0); the pool is --pool rows of its
training split, the test --test rows of its test split (both drawn once, seed 0). The reference is
the model trained on every pool row with its label (--train-strategy, default head: the linear
probe on frozen all-MiniLM-L6-v2, solved; the same in every round). Then, per seed,
`fmtune select --simulate`: --start rows per class labelled, and --rounds rounds of -n rows picked
by each strategy (random, mix, margin, kcenter), the model trained again each round and scored on
the test rows. Printed: the accuracy per label count (mean and std over seeds) and, per strategy,
the first label count whose mean accuracy reaches 95% of the reference (null if none within the
rounds run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fmtune import api, config  # noqa: E402
from fmtune.active import simulate  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=__import__("sys").stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="rotten-tomatoes")
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--start", type=int, default=4)
    p.add_argument("-n", type=int, default=32)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--train-strategy", default="head")
    p.add_argument("--strategies", default="random,mix,margin,kcenter")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = tuple(args.strategies.split(","))
    out: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
                 "settings": vars(args), "seeds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = export(args.dataset, tmp / "data")
        pool = pd.read_csv(files["train"]).sample(args.pool, random_state=0)
        test = pd.read_csv(files["test"]).sample(args.test, random_state=0)
        pool.to_csv(tmp / "pool.csv", index=False)
        test.to_csv(tmp / "test.csv", index=False)
        cfg = config.from_dict({"model": {"name": "minilm-l6"}, "strategy": {"name": args.train_strategy},
                                "data": {"train": str(tmp / "pool.csv"), "test": str(tmp / "test.csv")},
                                "out": str(tmp / "full")})
        started = time.perf_counter()
        full = api.train(cfg, overwrite=True, quiet=True, report=False)["eval"]["test"]["accuracy"]
        out["full_pool"] = {"labels": args.pool, "accuracy": full, "seconds": round(time.perf_counter() - started, 1)}
        log(f"full pool ({args.pool} labels): accuracy {full:.4f}")
        for seed in seeds:
            started = time.perf_counter()
            res = simulate(cfg, tmp / "pool.csv", tmp / "test.csv", tmp / f"sim{seed}", start=args.start,
                           step=args.n, rounds=args.rounds, strategies=strategies, seed=seed, quiet=True)
            out["seeds"][seed] = {s: [[c["labels"], c["accuracy"]] for c in pts] for s, pts in res["curves"].items()}
            log(f"seed {seed}: {time.perf_counter() - started:.0f} s")
    target = 0.95 * out["full_pool"]["accuracy"]
    summary = {}
    for s in strategies:
        curves = [out["seeds"][seed][s] for seed in seeds]
        labels = [pt[0] for pt in curves[0]]
        acc = np.array([[pt[1] for pt in c] for c in curves])
        mean, std = acc.mean(0), acc.std(0)
        reach = next((n for n, m in zip(labels, mean) if m >= target), None)
        summary[s] = {"labels": labels, "mean": [round(float(m), 4) for m in mean],
                      "std": [round(float(x), 4) for x in std], "labels_to_95pct_of_full": reach}
    out["target_accuracy"] = round(target, 4)
    out["summary"] = summary
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
