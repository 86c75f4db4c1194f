"""Named entities: `fmtune train --task ner` against the Hugging Face Trainer, side by side in one run.

    .venv/bin/python bench/ner.py [--epochs 3 --seeds 1] > result.json

Same model (all-MiniLM-L6-v2 from the offline package), same real data (WNUT-2016 tweets,
`fmtune datasets --export wnut16-ner`: 1,695 train / 200 val / 400 test), same epochs, batch
size and learning rate, scored the same way (seqeval entity F1 over every word of the test
split, at each word's first sub-token):

- trainer-standard: the `run_ner.py` recipe: first-sub-token labels, batch 16, lr 5e-5, 3 epochs,
  every example padded to max length (128), fp32.
- trainer-expert: the same with what an expert turns on: dynamic padding
  (DataCollatorForTokenClassification), group_by_length, bf16 where the CPU/GPU runs it natively.
  (Pitfall met on the way: in transformers 5, group_by_length also reorders the batches of
  `Trainer.predict`, whose rows then come back shuffled: scored naively, entity F1 0.004.)
- fmtune: `fmtune train --task ner --strategy full` with the recipe's batch size, lr and epochs
  (its defaults otherwise: length-bucketed batches, padding to the batch, precision by hardware,
  validation every epoch and the best checkpoint kept, the report written).

Each is timed as a whole process (python start, imports, model load, tokenisation, training,
test predictions), one after the other on an otherwise idle machine. Prints one JSON document.
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


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def trainer_child(a: argparse.Namespace) -> dict:
    """The Trainer with the run_ner.py recipe (or the expert's settings); entity F1 on the test split."""
    import contextlib

    import numpy as np
    import torch
    from seqeval.metrics import f1_score
    from transformers import (
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    from fmtune.data.conll import read_tokens
    from fmtune.training.hardware import choose
    from fmtune.zoo.models import MODELS

    expert = a.child == "trainer-expert"
    path = MODELS.get("minilm-l6").path()
    frames = {k: read_tokens(Path(a.data) / f"{k}.conll") for k in ("train", "test")}
    labels = sorted({t for tags in frames["train"]["tags"] for t in tags})
    label_id = {t: i for i, t in enumerate(labels)}
    tok = AutoTokenizer.from_pretrained(path)

    def encode(df):
        enc = tok(list(map(list, df["tokens"])), is_split_into_words=True, truncation=True, max_length=128,
                  padding=False if expert else "max_length")
        rows = []
        for i, tags in enumerate(df["tags"]):
            prev, lab = None, []
            for w in enc.word_ids(i):
                lab.append(-100 if w is None or w == prev else label_id.get(tags[w], -100))
                prev = w
            rows.append({"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": lab})
        return rows

    train, test = encode(frames["train"]), encode(frames["test"])
    torch.manual_seed(a.seed)
    model = AutoModelForTokenClassification.from_pretrained(path, num_labels=len(labels),
                                                            id2label=dict(enumerate(labels)), label2id=label_id)
    bf16 = expert and choose("auto", "auto", None).precision == "bf16"
    targs = TrainingArguments(
        output_dir=a.out, num_train_epochs=a.epochs, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=128, learning_rate=a.lr, weight_decay=0.0, lr_scheduler_type="linear",
        save_strategy="no", eval_strategy="no", report_to=[], seed=a.seed, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if expert else "random", dataloader_num_workers=0,
        disable_tqdm=True, logging_steps=50, bf16=bf16)
    collator = DataCollatorForTokenClassification(tok) if expert else default_data_collator
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    train_s = time.perf_counter() - t0
    # transformers 5 also groups the *evaluation* batches by length when group_by_length is on
    # (Trainer._get_eval_sampler): predict() then returns the rows shuffled. Predict in order.
    trainer.args.train_sampling_strategy = "random"
    out = trainer.predict(test)
    pred = np.asarray(out.predictions).argmax(-1)
    gold_tags, pred_tags = [], []
    for r, row in enumerate(test):
        keep = [j for j, y in enumerate(row["labels"]) if y != -100]
        pred_tags.append([labels[int(pred[r, j])] for j in keep])
        gold_tags.append(list(frames["test"]["tags"].iloc[r])[: len(keep)])  # words past max length: dropped
    dropped = sum(len(t) for t in frames["test"]["tags"]) - sum(len(t) for t in gold_tags)
    # words the recipe dropped count as missed entities: score against the full gold tags
    full_pred = [p + ["O"] * (len(g) - len(p)) for p, g in zip(pred_tags, frames["test"]["tags"])]
    return {"train_seconds": round(train_s, 2), "bf16": bf16,
            "test_entity_f1": round(float(f1_score([list(t) for t in frames["test"]["tags"]], full_pred)), 4),
            "test_words_dropped_by_truncation": int(dropped)}


def fmtune_child(a: argparse.Namespace) -> dict:
    import fmtune

    d = Path(a.data)
    s = fmtune.train({"model": {"name": "minilm-l6", "max_length": 128}, "task": {"type": "ner"}, "out": a.out,
                      "data": {"train": str(d / "train.conll"), "val": str(d / "val.conll"),
                               "test": str(d / "test.conll")},
                      "train": {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed,
                                "patience": None, "min_steps": None}}, quiet=True, overwrite=True)
    info = json.loads((Path(a.out) / "run.json").read_text())
    return {"train_seconds": round(s["seconds"], 2), "hardware": info["hardware"],
            "test_entity_f1": round(s["eval"]["test"]["entity_f1"], 4), "best_val_entity_f1": round(s["best"], 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", type=int, default=1, help="repeat every run with seeds 0..N-1")
    p.add_argument("--runs", default="trainer-standard,trainer-expert,fmtune")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        res = fmtune_child(a) if a.child == "fmtune" else trainer_child(a)
        print(json.dumps(res))
        return
    from fmtune.training.hardware import choose
    from fmtune.zoo.datasets import export

    tmp = Path(tempfile.mkdtemp(prefix="fmtune-bench-ner-"))
    data = export("wnut16-ner", tmp / "data", sizes=(None, 200, 400), seed=0)["train"].parent
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    result = {"what": "WNUT-2016 NER, all-MiniLM-L6-v2, whole-process wall time and test entity F1",
              "cpu": cpu, "cores": os.cpu_count(), "hardware": choose("auto", "auto", None).describe(),
              "epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "runs": []}
    for seed in range(a.seeds):
        for name in a.runs.split(","):
            log(f"{name}, seed {seed}")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", name, "--data", str(data), "--out",
                                   str(tmp / f"{name}-{seed}"), "--seed", str(seed), "--epochs", str(a.epochs),
                                   "--batch-size", str(a.batch_size), "--lr", str(a.lr)],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            result["runs"].append({"run": name, "seed": seed, "wall_seconds": round(wall, 2), **res})
            log(json.dumps(result["runs"][-1]))
    by = {}
    for r in result["runs"]:
        by.setdefault(r["run"], []).append(r)
    summary = {k: {"wall_seconds": round(sum(r["wall_seconds"] for r in v) / len(v), 2),
                   "test_entity_f1": round(sum(r["test_entity_f1"] for r in v) / len(v), 4)} for k, v in by.items()}
    if "fmtune" in summary:
        ours = summary["fmtune"]["wall_seconds"]
        for k in [k for k in summary if k != "fmtune"]:
            summary[f"fmtune_speedup_vs_{k}"] = round(summary[k]["wall_seconds"] / ours, 2)
    result["summary"] = summary
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
