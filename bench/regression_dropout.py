"""model.dropout for regression: MiniLM-L6 full fine-tuning (fmtune's defaults otherwise) with every dropout at 0
against the model's own 0.1, on two real text regressions (bench/freeze_embeddings.py's:
the zoo's compas-deciles and Adult hours per week, 2,000 / 300 / 1,000 rows), per seed: test RMSE / MAE / R²,
the test mean prediction against the mean target, best validation RMSE and its step, training seconds.

    .venv/bin/python bench/regression_dropout.py [--seeds 0 1] [--out DIR] > result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import fmtune  # noqa: E402
from fmtune.training import hardware  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    from freeze_embeddings import regression_sets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    p.add_argument("--out", help="working folder (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="fmtune-reg-dropout-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"threads": hardware.choose().threads, "torch": torch.__version__},
                    "settings": vars(args), "sets": {}}
    for name, (data, target) in regression_sets(work).items():
        test = pd.read_csv(data["test"])
        rows = []
        for seed in args.seeds:
            for dropout in args.dropouts:
                out = work / f"{name}-s{seed}-d{dropout}"
                s = fmtune.train({"model": {"name": "minilm-l6", "dropout": dropout}, "task": {"type": "regression"},
                                  "out": str(out), "data": data, "train": {"seed": seed}},
                                 quiet=True, overwrite=True, report=False)
                pred = fmtune.predict(out, data["test"], quiet=True)["prediction"]
                rows.append({"seed": seed, "dropout": dropout, "train_seconds": round(s["seconds"], 1),
                             "best_val": round(s["best"], 4), "best_step": s["best_step"],
                             "test": {k: round(v, 4) for k, v in s["eval"]["test"].items() if isinstance(v, float)},
                             "test_mean_prediction": round(float(pred.mean()), 4)})
                log(f"{name} {rows[-1]}")
        result["sets"][name] = {"target": target, "test_mean_target": round(float(test["label"].mean()), 4),
                                "test_label_std": round(float(test["label"].std()), 4), "runs": rows}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
