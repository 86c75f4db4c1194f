"""strategy.freeze_embeddings: full fine-tuning with a text encoder's token embeddings trained vs kept
as pretrained, MiniLM-L6, on this machine.

    .venv/bin/python bench/freeze_embeddings.py [--parts step,ner --seeds 0 1] > result.json

- step: training steps on rotten-tomatoes sentences at batches of 10 and 32, the embeddings trained and
  frozen in turn (5 interleaved rounds of 30 steps each, same batches; AdamW fused, gradient clipping,
  as fmtune trains), median ms per step.
- ner: `fmtune train --task ner` with its defaults on the WNUT-2016 export (2,000 / 300 / 1,000
  sentences), strategy full, strategy.freeze_embeddings true / false, per seed: training seconds,
  best validation and test entity F1.

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
    rows = []
    for seed in seeds:
        for frozen in (True, False):
            out = work / f"ner-s{seed}-{frozen}"
            s = fmtune.train({"model": {"name": "minilm-l6"}, "task": {"type": "ner"}, "out": str(out),
                              "strategy": {"name": "full", "freeze_embeddings": frozen},
                              "data": {k: str(v) for k, v in files.items()}, "train": {"seed": seed}},
                             quiet=True, overwrite=True)
            rows.append({"seed": seed, "freeze_embeddings": frozen, "train_seconds": round(s["seconds"], 1),
                         "test_entity_f1": round(s["eval"]["test"]["entity_f1"], 4), "best_val_entity_f1":
                         round(s["best"], 4)})
            log(str(rows[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="step,ner")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    hw = hardware.choose()
    work = Path(tempfile.mkdtemp(prefix="fmtune-freeze-emb-"))
    result: dict = {"machine": {"threads": hw.threads, "fmtune_default": hw.describe(), "torch": torch.__version__},
                    "settings": vars(args)}
    if "step" in args.parts:
        result["step"] = [steps(work, b) for b in (10, 32)]
        log(str(result["step"]))
    if "ner" in args.parts:
        result["ner"] = ner(work, args.seeds)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
