"""A time budget that cuts training short: the schedule fitted to it (fmtune's default since 2026-12-04)
against the run cut off where the budget ends (the learning rate still near its height, as before).

    .venv/bin/python bench/time_budget.py [--demos text,ner --seeds 0 1 2 --share 0.5] > result.json

For each demo (`fmtune demo`'s own data, model and settings) and seed: the demo without a budget (its
planned schedule; the ceiling), then with `train.max_minutes` set to `--share` of that run's training
seconds, once with the schedule fitted to the budget and once cut off at it (`loop.BUDGET_FIT_AFTER` set
beyond the run, so the fit never happens). The test metric (accuracy; named entities: entity F1), the steps
trained and the training seconds of each, with the pretrained baseline the demo reports.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import start  # noqa: E402

import fmtune  # noqa: E402
from fmtune import demos  # noqa: E402
from fmtune.training import loop  # noqa: E402

METRIC = {"ner": "entity_f1"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(task: str, seed: int, out: Path, minutes: float | None, fit: bool) -> dict:
    spec = demos.DEMOS[task]
    saved, fit_after = copy.deepcopy(spec), loop.BUDGET_FIT_AFTER
    spec["config"]["train"]["max_minutes"] = minutes
    loop.BUDGET_FIT_AFTER = fit_after if fit else 10 ** 9
    try:
        s = fmtune.demo(task, out=out, seed=seed, quiet=True)
    finally:
        demos.DEMOS[task], loop.BUDGET_FIT_AFTER = saved, fit_after
    info = json.loads((out / "run.json").read_text())["fit"]
    metric = METRIC.get(task, "accuracy")
    return {"test": round(s["eval"]["test"][metric], 4), "baseline": round(s["eval"]["baseline"][metric], 4),
            "steps": info["steps"], "planned_steps": info.get("planned_steps"),
            "train_seconds": round(info["seconds"], 1), "out_of_time": info["out_of_time"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demos", default="text,ner")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--share", type=float, default=0.5, help="the budget, as a share of the unbudgeted run's training")
    p.add_argument("--out", help="working folder (default: a new temporary one)")
    args = p.parse_args()
    work, result = start(args.out, "fmtune-budget-")
    result["settings"] = vars(args)
    for task in args.demos.split(","):
        rows = []
        for seed in args.seeds:
            tag = f"{task}-s{seed}"
            whole = run(task, seed, work / f"{tag}-whole", None, True)
            minutes = round(args.share * whole["train_seconds"] / 60, 3)
            row = {"seed": seed, "max_minutes": minutes, "whole": whole,
                   "fitted": run(task, seed, work / f"{tag}-fitted", minutes, True),
                   "cut": run(task, seed, work / f"{tag}-cut", minutes, False)}
            rows.append(row)
            log(f"{tag}: " + ", ".join(f"{k} {row[k]['test']} ({row[k]['steps']} steps, {row[k]['train_seconds']} s)"
                                       for k in ("whole", "fitted", "cut")) + f", baseline {whole['baseline']}")
        result["results"][task] = {
            "runs": rows,
            "mean_test": {k: round(float(np.mean([r[k]["test"] for r in rows])), 4)
                          for k in ("whole", "fitted", "cut")},
            "fitted_minus_cut_per_seed": [round(r["fitted"]["test"] - r["cut"]["test"], 4) for r in rows]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
