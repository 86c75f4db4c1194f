"""strategy.freeze_embeddings: full fine-tuning with a text encoder's token embeddings trained vs kept
as pretrained, MiniLM-L6, on this machine.

    .venv/bin/python bench/freeze_embeddings.py [--parts step,ner,manyclass,regression --seeds 0 1] > result.json

- step: training steps on rotten-tomatoes sentences at batches of 10 and 32, the embeddings trained and
  frozen in turn (5 interleaved rounds of 30 steps each, same batches; AdamW fused, gradient clipping,
  as fmtune trains), median ms per step.
- ner: `fmtune train --task ner` with its defaults on the WNUT-2016 export (2,000 / 300 / 1,000
  sentences), strategy full, strategy.freeze_embeddings true / false, per seed: training seconds,
  best validation entity F1 and the test metrics (entity F1 ...).
- manyclass: `fmtune train` (strategy full, its defaults) on a set of 40 classes, built as bench/fewshot.py's
  `package-modules-40 --min-module-rows 140` (a docstring's one-line summary -> its module in the installed
  packages; the whole pool, about 8,000 rows here, fmtune's own validation split; 1,200 test rows), embeddings kept /
  trained, per seed: training seconds, best validation and test accuracy.
- regression: `fmtune train --task regression` (strategy full, its defaults) on two sets of 2,000 / 300 / 1,000
  rows: the zoo's compas-deciles export (a defendant's record written out -> the COMPAS decile score, 1-10;
  results of 2026-12-04 were on an earlier split of the same table, charge degree written F / M) and Adult census
  rows written out without the hours worked -> hours worked per week: test RMSE, MAE and R², best validation
  RMSE, training seconds.

Text classification's whole-run comparison is bench/time_to_accuracy.py (`--variants` cannot turn a
strategy setting, so run it once per setting).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import fmtune  # noqa: E402
from fmtune.config import ModelConfig, TrainConfig  # noqa: E402
from fmtune.models import build  # noqa: E402
from fmtune.tasks import Classification  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.training.optim import make_optimizer  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def steps(work: Path, batch: int, rounds: int = 5, n: int = 30) -> dict:
    files = export("rotten-tomatoes", work / "rt", sizes=(2000, 300, 1000), seed=0)
    df = pd.read_csv(files["train"])
    torch.manual_seed(0)
    bundle = build.create(ModelConfig(name="minilm-l6", max_length=128),
                          Classification(sorted(df["label"].astype(str).unique())))
    model, tok, texts = bundle.model, bundle.tokenizer, df["text"].tolist()
    emb = model.backbone.get_input_embeddings().weight
    model.train()
    ms: dict[bool, list[float]] = {False: [], True: []}
    for rnd in range(rounds):
        for frozen in ((False, True) if rnd % 2 == 0 else (True, False)):
            emb.requires_grad_(not frozen)
            opt = make_optimizer(model, TrainConfig(lr=1e-6))
            t0 = time.perf_counter()
            for i in range(n):
                start = (i * batch) % (len(texts) - batch)
                enc = tok(texts[start:start + batch], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
                logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
                torch.nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long)).backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            ms[frozen].append(round((time.perf_counter() - t0) / n * 1000, 1))
    trained, kept = statistics.median(ms[False]), statistics.median(ms[True])
    return {"batch": batch, "trained_ms": ms[False], "frozen_ms": ms[True], "median_trained_ms": trained,
            "median_frozen_ms": kept, "speedup": round(trained / kept, 3)}


def ner(work: Path, seeds: list[int]) -> list[dict]:
    files = export("wnut16-ner", work / "wnut", sizes=(2000, 300, 1000), seed=0)
    return [r for seed in seeds for r in _run({"model": {"name": "minilm-l6"}, "task": {"type": "ner"},
                                               "out": str(work / f"ner-s{seed}"),
                                               "data": {k: str(v) for k, v in files.items()}, "train": {"seed": seed}})]


def _run(cfg: dict) -> list[dict]:
    """`fmtune.train` on ``cfg`` (its data with a test file) with the embeddings kept, then trained: per run
    the seconds, the best validation metric and the test metrics."""
    rows = []
    for frozen in (True, False):
        s = fmtune.train({**cfg, "out": cfg["out"] + f"-{frozen}",
                          "strategy": {"name": "full", "freeze_embeddings": frozen}},
                         quiet=True, overwrite=True, report=False)
        rows.append({"seed": cfg["train"]["seed"], "freeze_embeddings": frozen, "train_seconds": round(s["seconds"], 1),
                     "best_val": round(s["best"], 4), "test": {k: round(v, 4) for k, v in s["eval"]["test"].items()
                                                                 if isinstance(v, float)}})
        log(str(rows[-1]))
    return rows


def manyclass(work: Path, seeds: list[int]) -> dict:
    from fewshot import package_modules

    pool, test = package_modules(work / "package-modules", classes=40, min_rows=140)  # reads every package: minutes
    pool.to_csv(work / "pm-train.csv", index=False)
    test.to_csv(work / "pm-test.csv", index=False)
    data = {"train": str(work / "pm-train.csv"), "test": str(work / "pm-test.csv")}
    runs = [r for seed in seeds for r in _run({"model": {"name": "minilm-l6"}, "out": str(work / f"pm-s{seed}"),
                                              "data": data, "train": {"seed": seed}})]
    return {"classes": int(pool["label"].nunique()), "pool_rows": len(pool), "test_rows": len(test), "runs": runs}


def regression_sets(work: Path) -> dict[str, tuple[dict[str, str], str]]:
    """Two real text regressions, 2,000 / 300 / 1,000 rows: the zoo's compas-deciles (the COMPAS decile score from a
    defendant's record) and Adult census rows written out without the hours worked -> hours worked per week; per
    set its files and what the target is."""
    from fmtune.zoo.datasets import ADULT_TEXT, _adult

    files = {k: str(v) for k, v in export("compas-deciles", work / "compas", sizes=(2000, 300, 1000), seed=0).items()}
    adult = _adult()
    text = [c for c in ADULT_TEXT if c != "hours_per_week"]
    adult = pd.DataFrame({"text": [", ".join(f"{c}: {v}" for c, v in zip(text, row))
                                   for row in adult[text].itertuples(index=False)],
                          "label": adult["hours_per_week"].astype(float)}).sample(n=3300, random_state=0)
    hours = {}
    for name, part in (("train", adult[:2000]), ("val", adult[2000:2300]), ("test", adult[2300:])):
        part.to_csv(work / f"adult-hours-{name}.csv", index=False)
        hours[name] = str(work / f"adult-hours-{name}.csv")
    return {"compas-deciles": (files, "COMPAS decile score (1-10)"), "adult-hours": (hours, "hours worked per week")}


def regression(work: Path, seeds: list[int]) -> dict:
    out = {}
    for name, (data, target) in regression_sets(work).items():
        test = pd.read_csv(data["test"])
        runs = [r for seed in seeds for r in _run({"model": {"name": "minilm-l6"}, "task": {"type": "regression"},
                                                  "out": str(work / f"{name}-s{seed}"), "data": data,
                                                  "train": {"seed": seed}})]
        out[name] = {"target": target, "test_label_std": round(float(test["label"].std()), 4), "runs": runs}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="step,ner")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", help="working folder (default: a temporary one); manyclass reuses the set built there")
    args = p.parse_args()
    hw = hardware.choose()
    work = Path(args.out or tempfile.mkdtemp(prefix="fmtune-freeze-emb-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": {"threads": hw.threads, "fmtune_default": hw.describe(), "torch": torch.__version__},
                    "settings": vars(args)}
    if "step" in args.parts:
        result["step"] = [steps(work, b) for b in (10, 32)]
        log(str(result["step"]))
    if "ner" in args.parts:
        result["ner"] = ner(work, args.seeds)
    if "manyclass" in args.parts:
        result["manyclass"] = manyclass(work, args.seeds)
    if "regression" in args.parts:
        result["regression"] = regression(work, args.seeds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
