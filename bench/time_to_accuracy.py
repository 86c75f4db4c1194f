"""Time to accuracy: how long each of fmtune and the expert-configured Trainer trains to reach a given
test accuracy, over epochs and seeds (issue 22: "at equal accuracy ... 1.5x faster").

    .venv/bin/python bench/time_to_accuracy.py [--datasets rotten-tomatoes,tweet-sentiment --epochs 1 2 3
                                               --seeds 0 1 2 --strategy full --tools trainer_expert,fmtune
                                               --fmtune-epochs 1 2 --variants '{"NAME": {"lr": 1e-4}}'] > result.json

For every dataset, seed and epoch count, the Trainer as bench/speed.py's `expert_trainer` sets it up
(group_by_length, dynamic padding, fused AdamW with fmtune's parameter groups, linear schedule with the
same warm-up, no evaluation) and `fmtune train` with its defaults for the strategy (its probe start,
validation each epoch, no early stopping, train.min_steps off), same model (MiniLM-L6), data (2,000 /
300 / 1,000 rows of the export, seeded split), batch 32, max 128 tokens. Each run is a whole schedule
of that many epochs (warm-up and linear decay to zero fitted to it), not a cut of a longer one. The tool
`fmtune_defaults` is fmtune with its own train.min_steps (200): a short run trains smaller batches (1 epoch
of 2,000 rows: batches of 10), as a user's run with the defaults does; each of its rows says its batch
and its best validation accuracy (choose settings on that, not on the test). `--variants` adds
fmtune_defaults with other train settings, a tool each (fmtune_defaults+NAME).

`summary.<dataset>.to_trainer_accuracy`: for each of the Trainer's epoch counts, the fewest epochs after
which fmtune's mean test accuracy is at least the Trainer's mean there, and the ratio of the two mean
training times (fmtune's include its probe start and its validation passes). No tolerance is applied:
the per-seed accuracies and standard deviations are in the file to judge the noise by.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fmtune.config import DEFAULT_LR, MIN_STEPS  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def summarise(rows: list[dict]) -> dict:
    """Mean / std of accuracy and seconds per (tool, epochs), and fmtune's epochs to each Trainer accuracy."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["tool"], r["epochs"]), []).append(r)
    table = {f"{tool}@{ep}": {"epochs": ep, "seeds": len(rs),
                              "accuracy_mean": round(float(np.mean([r["test_accuracy"] for r in rs])), 4),
                              "accuracy_std": round(float(np.std([r["test_accuracy"] for r in rs])), 4),
                              "seconds_mean": round(float(np.mean([r["seconds"] for r in rs])), 2)}
             for (tool, ep), rs in sorted(cells.items())}
    reach: dict = {}
    for tool in sorted({t for t, _ in cells} - {"trainer_expert"}):
        ours = sorted((v for k, v in table.items() if k.startswith(f"{tool}@")), key=lambda v: v["epochs"])
        for key, ref in table.items():
            if not key.startswith("trainer_expert@"):
                continue
            hit = next((v for v in ours if v["accuracy_mean"] >= ref["accuracy_mean"]), None)
            reach.setdefault(tool, {})[key] = (
                {"trainer_accuracy": ref["accuracy_mean"], "fmtune_epochs": hit["epochs"],
                 "fmtune_accuracy": hit["accuracy_mean"],
                 "speedup": round(ref["seconds_mean"] / hit["seconds_mean"], 2)}
                if hit else {"trainer_accuracy": ref["accuracy_mean"], "fmtune_epochs": None})
    return {"cells": table, "to_trainer_accuracy": reach}


def main() -> None:
    from speed import expert_trainer, fmtune_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="rotten-tomatoes,tweet-sentiment", help="zoo text exports, comma-separated")
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 2, 3], help="the Trainer's epoch counts")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategy", default="full", choices=["full", "lora"])
    p.add_argument("--tools", default="trainer_expert,fmtune,fmtune_defaults",
                   help="fmtune: min_steps off (the Trainer's batch of 32 throughout); fmtune_defaults: fmtune's own "
                        "train.min_steps, which trains a short run on smaller batches")
    p.add_argument("--fmtune-epochs", type=int, nargs="+", help="fmtune's epoch counts (default: --epochs)")
    p.add_argument("--variants", default="{}",
                   help='JSON {"NAME": {train setting: value}}: each also runs as the tool fmtune_defaults+NAME, '
                        'fmtune_defaults with those train settings, e.g. {"llrd": {"layer_lr_decay": 0.8}}')
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--model", default="minilm-l6")
    args = p.parse_args()
    variants = json.loads(args.variants)
    tools = args.tools.split(",") + [f"fmtune_defaults+{v}" for v in variants]
    hw = hardware.choose()
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": hw.threads,
                                "fmtune_default": hw.describe(), "torch": torch.__version__},
                    "settings": vars(args), "runs": [], "summary": {}}
    work = Path(tempfile.mkdtemp(prefix="fmtune-tta-"))
    os.environ.setdefault("FMTUNE_CACHE_DIR", str(work / "cache"))
    # one untimed run of each first: the first training in a process pays one-time set-up
    small = export("rotten-tomatoes", work / "warm", sizes=(64, 32, 32), seed=0)
    warm = argparse.Namespace(model=args.model, max_length=args.max_length, batch_size=args.batch_size, epochs=1)
    expert_trainer(small, warm, "full", 0, work / "warm-hf")
    fmtune_run(small, args.model, work / "warm-ft", "full", 1, 5e-5, args.batch_size, args.max_length)
    for name in args.datasets.split(","):
        files = export(name, work / name, sizes=(args.train, 300, 1000), seed=0)
        rows = []
        for seed in args.seeds:
            for epochs in sorted(set(args.epochs) | set(args.fmtune_epochs or [])):
                tag = f"{name}-s{seed}-e{epochs}"
                if "trainer_expert" in tools and epochs in args.epochs:
                    log(f"{tag}: Trainer (expert)")
                    ns = argparse.Namespace(model=args.model, max_length=args.max_length,
                                            batch_size=args.batch_size, epochs=epochs)
                    r = expert_trainer(files, ns, args.strategy, seed, work / f"hf-{tag}")
                    rows.append({"tool": "trainer_expert", "dataset": name, "seed": seed, "epochs": epochs,
                                 "seconds": r["seconds"], "test_accuracy": r["test_accuracy"]})
                ours = [t for t in tools if t.startswith("fmtune") and epochs in (args.fmtune_epochs or args.epochs)]
                for tool in ours:
                    log(f"{tag}: {tool}")
                    own = {"min_steps": MIN_STEPS} if tool.startswith("fmtune_defaults") else {}
                    own = {"lr": DEFAULT_LR[args.strategy], **own, **variants.get(tool.partition("+")[2], {})}
                    r = fmtune_run(files, args.model, work / f"{tool}-{tag}", args.strategy, epochs,
                                   batch_size=args.batch_size, max_length=args.max_length, seed=seed, **own)
                    rows.append({"tool": tool, "dataset": name, "seed": seed, "epochs": epochs,
                                 "seconds": r["train_seconds"], "test_accuracy": r["test_accuracy"],
                                 "best_val_accuracy": round(r["best_val"], 4),
                                 "head_init_seconds": r["head_init_seconds"], "batch_size": r["batch_size"]})
                log(f"{tag}: " + ", ".join(f"{x['tool']} {x['test_accuracy']:.4f} in {x['seconds']:.1f} s"
                                           for x in rows if x["seed"] == seed and x["epochs"] == epochs))
        result["runs"] += rows
        result["summary"][name] = summarise(rows)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
