"""Speech recognition benchmark: fmtune against the Hugging Face Seq2SeqTrainer, side by side in one run.

    make bench-speech            # writes bench/results-speech-<date>.json (needs Debian's espeak-ng)
    .venv/bin/python bench/speech.py [--train 200 --epochs 1 --batch-size 16] > result.json

Same model (Whisper tiny.en, converted from the offline CTranslate2 weights, fp32), same data
(espeak-sentences: real sentences read by 48 espeak-ng voices with noise at 0-20 dB SNR, split by
voice), same adapter (LoRA r=8, alpha=16, no dropout, on q/k/v/out_proj/fc1/fc2 of every encoder
and decoder block), same optimiser (AdamW, learning rate 5e-4, linear decay, no warm-up), batch
size, epochs and seed.

Runs:
1. ``fmtune train --task speech-recognition --strategy lora`` (clips in 5-second buckets; the time
   of its validation passes is reported apart and left out of ``train_seconds``, as is the time
   spent decoding the clips and computing their features before training);
2. the Seq2SeqTrainer's standard recipe (the Hugging Face Whisper fine-tuning blog, with peft's
   LoRA): ``WhisperFeatureExtractor`` features computed before training (``dataset.map``), padded
   to Whisper's 30 s as its encoder requires (their time is ``feature_seconds``, apart), labels
   padded with -100, no evaluation while training;
3. the Seq2SeqTrainer as an expert sets it on this CPU: the same, plus batches grouped by transcript
   length (``train_sampling_strategy="group_by_length"``) and ``dataloader_num_workers=1``. The 30 s
   padding stays: transformers' Whisper encoder refuses any other length.

Every model's test WER (transformers' BasicTextNormalizer, jiwer) is measured on the same test clips
outside the timed part: fmtune by its own decoder, the Trainer runs by ``model.generate`` (greedy,
batch 16) as their recipe does; decoding time and real-time factor are reported for each. Prints
one JSON document on stdout; progress goes to stderr.
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

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fmtune import api  # noqa: E402
from fmtune.data.audio import load_audio  # noqa: E402
from fmtune.tasks.speech import error_rates  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402
from fmtune.zoo.models import resolve  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from audio import log, parser, side_by_side  # noqa: E402  (bench/audio.py)

TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def clips(table: Path) -> tuple[list[np.ndarray], list[str]]:
    df = pd.read_csv(table)
    return [load_audio(table.parent / p, 16000) for p in df["audio"]], df["text"].tolist()


def run_fmtune(files: dict[str, Path], args: argparse.Namespace, out: Path, audio_seconds: float) -> dict:
    cfg = {"model": {"name": "whisper-tiny-en"}, "task": {"type": "speech-recognition"},
           "strategy": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, "out": str(out),
           "data": {"train": str(files["train"]), "val": str(files["val"]), "test": str(files["test"])},
           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.0,
                     "patience": None, "seed": args.seed, "num_threads": args.threads},
           "eval": {"samples": 16, "test_samples": args.test}}
    started = time.perf_counter()
    summary = api.train(cfg, quiet=True, report=False)
    whole = time.perf_counter() - started
    fit = json.loads((out / "run.json").read_text())["fit"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    eval_seconds = sum(r.get("eval_seconds", 0.0) for r in evals if r["type"] == "eval")
    ev = summary["eval"]
    return {"name": "fmtune", "train_seconds": round(fit["seconds"] - eval_seconds, 1),
            "validation_seconds": round(eval_seconds, 1), "whole_command_seconds": round(whole, 1),
            "test_wer": round(ev["test"]["wer"], 4), "test_cer": round(ev["test"]["cer"], 4),
            "zero_shot_wer": round(ev["baseline"]["wer"], 4),
            "decode_seconds": ev["seconds"]["fine_tuned"],
            "real_time_factor": round(ev["seconds"]["fine_tuned"] / audio_seconds, 4)}


def run_trainer(name: str, data: dict, args: argparse.Namespace, out: Path, expert: bool) -> dict:
    import peft
    from transformers import (
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    _, path = resolve("whisper-tiny-en")
    fe = WhisperFeatureExtractor.from_pretrained(path)
    tok = WhisperTokenizerFast.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = WhisperForConditionalGeneration.from_pretrained(path)
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    waves, texts = data["train"]

    prep_started = time.perf_counter()
    # the recipe's dataset.map: features and label ids once, before training (a datasets.Dataset, as there)
    rows = [{"input_features": fe(w, sampling_rate=16000, return_tensors="np").input_features[0],
             "labels": tok(" " + t).input_ids} for w, t in zip(waves, texts)]

    from datasets import Dataset

    train = Dataset.from_dict({"input_features": [r["input_features"] for r in rows],
                               "labels": [r["labels"] for r in rows],
                               "length": [len(r["labels"]) for r in rows]}).with_format("numpy")

    def collate(batch: list[dict]) -> dict:  # the blog's DataCollatorSpeechSeq2SeqWithPadding
        feats = torch.as_tensor(np.stack([b["input_features"] for b in batch]))
        width = max(len(b["labels"]) for b in batch)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, b in enumerate(batch):
            labels[i, : len(b["labels"])] = torch.as_tensor(b["labels"])
        if bool((labels[:, 0] == model.config.decoder_start_token_id).all()):
            labels = labels[:, 1:]  # the model puts the start token back in front
        return {"input_features": feats, "labels": labels}

    targs = Seq2SeqTrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, seed=args.seed, report_to=[],
        save_strategy="no", eval_strategy="no", logging_steps=10, use_cpu=True, remove_unused_columns=False,
        label_names=["labels"], train_sampling_strategy="group_by_length" if expert else "random",
        length_column_name="length",
        dataloader_num_workers=1 if expert else 0)
    prep = time.perf_counter() - prep_started
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=train, data_collator=collate)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs: stdout is the JSON result
        trainer.train()
    seconds = time.perf_counter() - started
    model.eval()
    tw, tt = data["test"]
    hyps: list[str] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tw), 16):
            feats = torch.tensor(fe(tw[i:i + 16], sampling_rate=16000, return_tensors="np").input_features)
            out_ids = model.generate(input_features=feats, max_new_tokens=128)
            hyps += tok.batch_decode(out_ids, skip_special_tokens=True)
    decode = time.perf_counter() - started
    rates = error_rates(hyps, tt)
    return {"name": name, "train_seconds": round(seconds, 1), "feature_seconds": round(prep, 1),
            "test_wer": round(rates["wer"], 4),
            "test_cer": round(rates["cer"], 4), "decode_seconds": round(decode, 1),
            "real_time_factor": round(decode / (sum(len(w) for w in tw) / 16000), 4)}


def main() -> None:
    ap = parser(__doc__.split("\n")[0], 5e-4)
    ap.add_argument("--train", type=int, default=200, help="training clips")
    ap.add_argument("--test", type=int, default=100, help="test clips")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = export("espeak-sentences", tmp / "data", sizes=(args.train, 50, args.test), seed=0)
        data = {"train": clips(files["train"]), "test": clips(files["test"])}
        audio_seconds = sum(len(w) for w in data["test"][0]) / 16000
        log(f"data: {len(data['train'][0])} training clips, {len(data['test'][0])} test clips "
            f"({audio_seconds:.0f} s of test audio)")
        runs = side_by_side(args, lambda: run_fmtune(files, args, tmp / "fmtune", audio_seconds),
                            lambda name, expert: run_trainer(name, data, args, tmp / name, expert))
    best = min(r["train_seconds"] for r in runs if r["name"].startswith("trainer"))
    ours = runs[0]["train_seconds"]
    print(json.dumps({"bench": "speech-recognition", "model": "whisper-tiny-en, LoRA r=8 on encoder and decoder",
                      "data": f"espeak-sentences {args.train}/50/{args.test}, split by voice", "epochs": args.epochs,
                      "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "test_audio_seconds": round(audio_seconds, 1), "runs": runs,
                      "train_speedup_vs_best_trainer": round(best / ours, 2)}, indent=2))


if __name__ == "__main__":
    main()
