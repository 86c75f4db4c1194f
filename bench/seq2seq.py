"""Encoder-decoder generation benchmark: fmtune against transformers' Seq2SeqTrainer, side by side in one run.

    .venv/bin/python bench/seq2seq.py [--train 240 --val 32 --test 48 --epochs 3] > result.json

No seq2seq weights ship offline, so the model is the BERT2BERT recipe on real weights: MiniLM-L6 (all-MiniLM-L6-v2)
as encoder and as decoder, composed by transformers' ``EncoderDecoderModel`` (fresh cross-attention), saved once as
a folder both tools load. Same real data (Python standard-library functions -> the first sentence of their
docstring, split by module), full fine-tuning, same learning rate, linear schedule with 6% warm-up, weight decay,
batch size, epochs, seed and input length (the function's end cut, its [SEP] kept).

Runs:
1. ``fmtune train --task generation`` (defaults: length-bucketed batches, validation answers scored at step 0 and
   after each epoch; the best checkpoint by ROUGE-L);
2. Seq2SeqTrainer, the standard recipe of transformers' summarisation guide: ``tokenizer(text_target=...)``
   labels, ``DataCollatorForSeq2Seq``, Seq2SeqTrainingArguments' defaults (fp32, random batches);
3. Seq2SeqTrainer as an expert would set it here: bf16 autocast where the CPU has native bf16 (fmtune's rule),
   batches grouped by length.

Every trained model is then scored by the same code: ROUGE-L / ROUGE-1 / exact match of greedy answers to the test
functions (batched, KV cache, at most ``--max-new-tokens``), and the loss on the test targets as fmtune writes them
(the summary and [SEP] after the decoder's [CLS]; the guide's labels start with a second [CLS], which the Trainer's
models learn to write first: their loss here counts that). Prints one JSON document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fmtune import api, config  # noqa: E402
from fmtune.fsutil import read_jsonl  # noqa: E402
from fmtune.models import build, causal_lm  # noqa: E402
from fmtune.tasks.generation import Generation, GenerationSettings, read_rows  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402
from fmtune.zoo.models import resolve  # noqa: E402

COLUMNS = {"input_column": "code", "target_column": "summary"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def bert2bert(folder: Path) -> Path:
    from transformers import AutoTokenizer, EncoderDecoderModel

    path = str(resolve("minilm-l6")[1])
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    tok = AutoTokenizer.from_pretrained(path)
    model.config.decoder_start_token_id, model.config.pad_token_id = tok.cls_token_id, tok.pad_token_id
    model.config.eos_token_id = tok.sep_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def score(model: torch.nn.Module, tokenizer, files: dict[str, Path], args: argparse.Namespace) -> dict:
    """Test loss on fmtune's targets and ROUGE of greedy answers: one code for every run."""
    task = Generation(truncate=True)
    task.settings = GenerationSettings(args.max_new_tokens, args.test, 32)
    data_cfg = config.from_dict({"data": COLUMNS}).data
    causal_lm.set_pad(tokenizer, model)
    bundle = build.Bundle(model, "text", causal_lm.SEQ2SEQ_FAMILY, "none", tokenizer=tokenizer,
                          max_length=args.max_length)
    test = task.dataset(read_rows(files["test"], data_cfg), bundle, data_cfg)[0]
    started = time.perf_counter()
    t = task.evaluate_model(causal_lm.Seq2SeqLogits(model, tokenizer), test, 32, "cpu",
                            sample=list(range(len(test))))
    return {"test_loss": round(t["loss"], 4), "test_rougeL": round(t["rougeL"], 4),
            "test_rouge1": round(t["rouge1"], 4), "test_exact_match": round(t["exact_match"], 4),
            "scoring_seconds": round(time.perf_counter() - started, 1),
            "examples": [{"reference": r, "answer": a} for r, a in zip(test.references[:3], task.last_answers[:3])]}


def run_fmtune(model: Path, files: dict[str, Path], out: Path, args: argparse.Namespace) -> dict:
    cfg = config.from_dict({
        "model": {"name": str(model), "max_length": args.max_length}, "task": {"type": "generation", "truncate": True},
        "data": {"train": str(files["train"]), "val": str(files["val"]), **COLUMNS},
        "strategy": {"name": "full"},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "seed": args.seed,
                  "warmup_ratio": 0.06, "weight_decay": 0.01, "patience": None},
        "eval": {"samples": args.val_answers, "max_new_tokens": args.max_new_tokens}, "out": str(out)})
    started = time.perf_counter()
    summary = api.train(cfg, overwrite=True, quiet=True, report=False)
    wall = time.perf_counter() - started
    info = json.loads((out / "run.json").read_text())
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("type") == "eval"]
    validation = sum(e.get("eval_seconds", 0) for e in evals)
    bundle = build.load(out / "model")
    return {"train_seconds": round(info["fit"]["seconds"], 1), "process_seconds_to_trained": round(wall, 1),
            "validation_seconds_inside_fit": round(validation, 1),
            "train_seconds_without_validation": round(info["fit"]["seconds"] - validation, 1),
            "steps": info["fit"]["steps"], "evaluations": len(evals), "best_step": summary["best_step"],
            **score(bundle.model, bundle.tokenizer, files, args)}


def run_trainer(model_dir: Path, files: dict[str, Path], out: Path, args: argparse.Namespace, expert: bool) -> dict:
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32)
    rows = []
    for r in read_jsonl(files["train"]):
        enc = tok(r["code"], max_length=args.max_length, truncation=True)
        enc["labels"] = tok(text_target=r["summary"], max_length=args.max_length, truncation=True)["input_ids"]
        rows.append(dict(enc))
    changes = ({"bf16": hardware.choose("auto", "auto", None).precision == "bf16",
                "train_sampling_strategy": "group_by_length"} if expert else {})
    targs = Seq2SeqTrainingArguments(output_dir=str(out), num_train_epochs=args.epochs,
                                     per_device_train_batch_size=args.batch, learning_rate=args.lr,
                                     lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.01,
                                     logging_steps=10, save_strategy="no", eval_strategy="no", report_to="none",
                                     seed=args.seed, use_cpu=True, dataloader_num_workers=0, **changes)
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=rows, processing_class=tok,
                             data_collator=DataCollatorForSeq2Seq(tok, model=model))
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines; stdout is the JSON
        result = trainer.train()
    seconds = time.perf_counter() - started
    settings = {"bf16": targs.bf16, "train_sampling_strategy": targs.train_sampling_strategy}
    return {"settings": settings, "train_seconds": round(seconds, 1), "steps": result.global_step,
            "train_loss": round(result.training_loss, 4), **score(trainer.model.eval(), tok, files, args)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=240)
    p.add_argument("--val", type=int, default=32)
    p.add_argument("--test", type=int, default=48)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--val-answers", type=int, default=16, help="fmtune: validation rows answered per evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma-separated: fmtune, trainer, trainer-expert")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "hardware": hardware.choose("auto", "auto", None).describe(),
                                 "torch": torch.__version__},
                     "model": "BERT2BERT from all-MiniLM-L6-v2 (EncoderDecoderModel, fresh cross-attention)",
                     "settings": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = export("stdlib-docstrings", tmp / "data", sizes=(args.train, args.val, args.test), seed=args.seed)
        model = bert2bert(tmp / "bert2bert")
        plan = [("fmtune", "fmtune", lambda: run_fmtune(model, files, tmp / "fmtune", args)),
                ("trainer", "seq2seq_trainer_standard", lambda: run_trainer(model, files, tmp / "t0", args, False)),
                ("trainer-expert", "seq2seq_trainer_expert", lambda: run_trainer(model, files, tmp / "t1", args,
                                                                                  True))]
        for key, name, run in plan:
            if key in skip:
                continue
            log(name)
            results["runs"][name] = run()
            log(f"RESULT {name} {json.dumps(results['runs'][name])}")
    runs = results["runs"]
    if "fmtune" in runs:
        ours, bare = runs["fmtune"]["train_seconds"], runs["fmtune"]["train_seconds_without_validation"]
        results["speedup"] = {k: {"train_seconds_with_fmtune_validation": round(v["train_seconds"] / ours, 2),
                                  "train_seconds_without": round(v["train_seconds"] / bare, 2)}
                              for k, v in runs.items() if k.startswith("seq2seq_trainer")}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
