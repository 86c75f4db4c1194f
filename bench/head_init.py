"""Where the head starts: fmtune's fine-tuning from a random head against fine-tuning from the linear
probe (train.head_init random / probe, LP-FT), same data, seeds and every other setting.

    .venv/bin/python bench/head_init.py [--cases rotten-full,tweet-full,rotten-lora,digits-full,modules-full,
                                        modules-lora --seeds 2 --inits random,probe --epochs N] > result.json

`--inits`: random, probe (fmtune's default sample for the probe start), probe:N (the sample's minimum
set to N rows, config.PROBE_INIT_MIN_ROWS, e.g. probe:1000 for the rule before 2026-12-04).

Cases (model, data, epochs; everything else fmtune's defaults for the strategy, no early stopping,
train.min_steps off):
- rotten-full / rotten-lora / tweet-full: MiniLM-L6 (max 128 tokens), 2,000 / 300 / 1,000 rows of the
  rotten-tomatoes (2 classes) or tweet-sentiment (3 classes) export, 2 epochs;
- digits-full: EfficientNet-Lite0 at 64 px, 1,200 / 200 / 397 digits, 2 epochs;
- modules-full / modules-lora: MiniLM-L6, 40 classes x 64 rows of bench/fewshot.py's package-modules set
  (docstring summary -> its module; modules with >= 140 summaries), 3 epochs, fmtune's default 10%
  validation split made from them, 1,200 test rows.
`train_s` is the fit plus the probe the head starts from (`init_s`, solved before the fit); `wall_s` is
the whole `fmtune.train` (model load and test included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmtune.config import PROBE_INIT_MIN_ROWS as DEFAULT_MIN_ROWS  # noqa: E402

CASES = ("rotten-full", "tweet-full", "rotten-lora", "digits-full", "modules-full", "modules-lora")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def data(case: str, work: Path) -> dict:
    from fmtune.zoo.datasets import export

    name = case.split("-")[0]
    if name == "modules":
        from fewshot import package_modules

        from fmtune.transfer import per_class

        pool, test = package_modules(work / "data" / "package-modules", 40, 140)
        test.to_csv(work / "modules-test.csv", index=False)
        return {"pool": pool, "test": work / "modules-test.csv", "per_class": per_class}
    if name == "digits":
        return export("digits", work / "digits", sizes=(1200, 200, 397), seed=0)
    return export({"rotten": "rotten-tomatoes", "tweet": "tweet-sentiment"}[name], work / name,
                  sizes=(2000, 300, 1000), seed=0)


def run(case: str, files: dict, seed: int, init: str, work: Path, epochs: int | None) -> dict:
    import fmtune
    from fmtune import config

    name, strategy = case.split("-")
    model = {"name": "efficientnet-lite0", "image_size": 64} if name == "digits" else {"name": "minilm-l6"}
    kind, _, least = init.partition(":")
    config.PROBE_INIT_MIN_ROWS = int(least) if least else DEFAULT_MIN_ROWS
    train = {"seed": seed, "head_init": kind, "patience": None, "min_steps": None, "epochs": 2}
    if name == "modules":
        rows = files["per_class"](files["pool"], "label", 64, seed)
        rows.to_csv(work / f"modules-train-{seed}.csv", index=False)
        dataset = {"train": str(work / f"modules-train-{seed}.csv"), "test": str(files["test"])}
        train["epochs"] = 3
    else:
        model["max_length"] = 128 if name != "digits" else None
        dataset = {k: str(files[k]) for k in ("train", "val", "test")}
    train["epochs"] = epochs or train["epochs"]
    model = {k: v for k, v in model.items() if v is not None}
    out = work / "runs" / f"{case}-{init.replace(':', '-')}"
    cfg = {"model": model, "strategy": {"name": strategy}, "data": dataset, "out": str(out), "train": train}
    started = time.perf_counter()
    s = fmtune.train(cfg, overwrite=True, quiet=True, report=False)
    start = s.get("head_init", {})
    init_s = start.get("seconds", 0.0)
    return {"seed": seed, "accuracy": round(s["eval"]["test"]["accuracy"], 4),
            "train_s": round(s["seconds"] + init_s, 1), "init_s": init_s, "init_rows": start.get("rows"),
            "wall_s": round(time.perf_counter() - started, 1), "best_step": s["best_step"],
            "steps": json.loads((out / "run.json").read_text())["fit"]["steps"]}


def main() -> None:
    import contextlib

    import numpy as np
    from common import start

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--inits", default="random,probe", help="head starts compared: random, probe, probe:N")
    ap.add_argument("--epochs", type=int, help="epochs of every case (default: 2, modules 3)")
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    a = ap.parse_args()
    work, result = start(a.out, "fmtune-head-init-bench-")
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        for case in a.cases.split(","):
            files = data(case, work)
            rows: dict[str, list[dict]] = {init: [] for init in a.inits.split(",")}
            for seed in range(a.seeds):
                for init in rows:
                    log(f"{case} seed {seed}: head_init {init} ...")
                    rows[init].append(run(case, files, seed, init, work, a.epochs))
                    log(f"  {rows[init][-1]}")
            result["results"][case] = {
                init: {"accuracy_mean": round(float(np.mean([r["accuracy"] for r in runs])), 4),
                       "train_s_mean": round(float(np.mean([r["train_s"] for r in runs])), 1), "runs": runs}
                for init, runs in rows.items()}
            if "probe" in rows and "random" in rows:
                result["results"][case]["probe_minus_random"] = [
                    round(p["accuracy"] - r["accuracy"], 4) for p, r in zip(rows["probe"], rows["random"])]
            log("RESULT " + json.dumps({case: result["results"][case]}))
    print(json.dumps(result, indent=2), file=real_stdout)


if __name__ == "__main__":
    main()
