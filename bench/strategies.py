"""Strategy benchmark: every fine-tuning strategy on the same real model, data and time budget.

    .venv/bin/python bench/strategies.py [--minutes 2 --train 2000 --test 1000] > result.json

MiniLM-L6 on rotten-tomatoes (seeded split), each strategy with its default settings
(learning rate, rank, targets ...) run by `fmtune train` in its own process, with the same
training-time budget (train.max_minutes) and enough epochs that the budget binds. Reported per
strategy: trainable parameters, optimizer-state memory, peak resident memory of the process,
training samples/s, epochs done, wall time, best validation and test accuracy.

Prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STRATEGIES = ["full", "head", "last_n", "lora", "dora", "ia3", "prompt", "bitfit"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_strategy(strategy: str, files: dict, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / strategy
    cmd = [sys.executable, "-m", "fmtune", "train", "--model", args.model, "--data", str(files["train"]),
           "--val", str(files["val"]), "--test", str(files["test"]), "--strategy", strategy,
           "--epochs", str(args.max_epochs), "--out", str(run_dir), "-q",
           "--set", f"train.max_minutes={args.minutes}", "--set", "train.patience=null",
           "--set", f"model.max_length={args.max_length}", "--set", f"train.batch_size={args.batch_size}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak memory
    stderr = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"strategy": strategy, "error": stderr[-2000:]}
    info = json.loads((run_dir / "run.json").read_text())
    ev = json.loads((run_dir / "eval.json").read_text())
    cfg_lr = next((ln.split(":", 1)[1].strip() for ln in (run_dir / "config.yaml").read_text().splitlines()
                   if ln.strip().startswith("lr:")), None)
    fit = info["fit"]
    return {"strategy": strategy, "lr": cfg_lr, "trainable_params": info["params"]["trainable_params"],
            "total_params": info["params"]["total_params"],
            "optimizer_state_mib": info["params"]["optimizer_state_mib"],
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "samples_per_s": round(fit["samples_per_s"], 2),
            "epochs": round(fit["epochs"], 2), "train_seconds": round(fit["seconds"], 1),
            "out_of_time": fit["out_of_time"], "wall_seconds": round(wall, 1), "best_val_accuracy": fit["best"],
            "test_accuracy": ev["test"]["accuracy"], "test_macro_f1": ev["test"]["macro_f1"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--dataset", default="rotten-tomatoes")
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=300)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--minutes", type=float, default=2.0, help="training-time budget per strategy")
    ap.add_argument("--max-epochs", type=int, default=20, help="epochs cap (the budget should bind first)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from fmtune.zoo.datasets import export

    with tempfile.TemporaryDirectory(prefix="fmtune-bench-") as tmp:
        out = Path(tmp)
        files = export(args.dataset, out / "data", seed=args.seed,
                       sizes=(args.train, args.val, args.test))
        rows = []
        for s in args.strategies.split(","):
            log(f"{s}: training for up to {args.minutes} min")
            rows.append(run_strategy(s, files, args, out))
            log(json.dumps(rows[-1]))
    result = {"benchmark": "strategies", "date": time.strftime("%Y-%m-%d"), "model": args.model,
              "dataset": args.dataset, "sizes": {"train": args.train, "val": args.val, "test": args.test},
              "budget_minutes": args.minutes, "max_length": args.max_length, "batch_size": args.batch_size,
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch": torch.__version__},
              "results": rows}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
