"""Audio classification benchmark: fmtune against the Hugging Face Trainer, side by side in one run.

    make bench-audio             # writes bench/results-audio-<date>.json (needs Debian's espeak-ng)
    .venv/bin/python bench/audio.py [--epochs 1 --batch-size 16] > result.json

Same model (Whisper tiny.en's encoder, converted from the offline CTranslate2 weights, fp32), same
data (espeak-commands: 20 spoken words, 48 synthetic voices, noise at 0-20 dB SNR, split by voice:
660 / 100 / 200 clips), same optimiser (AdamW, learning rate 5e-5, linear decay, no warm-up),
batch size, epochs and seed; full fine-tuning.

Runs:
1. ``fmtune train --task audio-classification --strategy full`` (the encoder reads the clip's own
   frames, padding masked; the head's learning rate is fmtune's default, 20x the encoder's);
2. the Trainer's standard recipe: ``WhisperForAudioClassification`` (encoder, projector, mean
   pooling, classifier) on ``WhisperFeatureExtractor`` features, padded to Whisper's 30 s as the
   encoder requires, ``TrainingArguments`` defaults otherwise;
3. the Trainer as an expert sets it on this CPU: the same, plus ``dataloader_num_workers=1`` and the
   features computed once before training (no per-step extraction); the 30 s padding stays:
   transformers' Whisper encoder refuses any other length.

Each model's test accuracy is measured on the same 200 clips (never in the timed part). Prints one
JSON document on stdout; progress goes to stderr.
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fmtune import api  # noqa: E402
from fmtune.data.audio import load_audio  # noqa: E402
from fmtune.data.readers import AUDIO_SUFFIXES, read_class_folder  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402
from fmtune.zoo.models import resolve  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def split(folder: Path, labels: list[str] | None = None) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    df = read_class_folder(folder, AUDIO_SUFFIXES, "audio", "", "audio files")
    labels = labels or sorted(df["label"].unique())
    waves = [load_audio(p, 16000) for p in df["audio"]]
    return waves, np.array([labels.index(v) for v in df["label"]]), labels


def run_fmtune(files: dict[str, Path], args: argparse.Namespace, out: Path) -> dict:
    cfg = {"model": {"name": "whisper-tiny-en"}, "task": {"type": "audio-classification"},
           "strategy": {"name": "full"}, "out": str(out),
           "data": {"train": str(files["train"]), "val": str(files["val"]), "test": str(files["test"])},
           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup_ratio": 0.0,
                     "patience": None, "seed": args.seed, "num_threads": args.threads,
                     "min_steps": None}}  # the Trainer's batch size, as given
    started = time.perf_counter()
    summary = api.train(cfg, quiet=True, report=False)
    fit = json.loads((out / "run.json").read_text())["fit"]
    return {"name": "fmtune", "train_seconds": round(fit["seconds"], 1),
            "whole_command_seconds": round(time.perf_counter() - started, 1),
            "test_accuracy": round(summary["eval"]["test"]["accuracy"], 4)}


def run_trainer(name: str, data: dict, args: argparse.Namespace, out: Path, expert: bool) -> dict:
    from transformers import Trainer, TrainingArguments, WhisperFeatureExtractor, WhisperForAudioClassification

    _, path = resolve("whisper-tiny-en")
    fe = WhisperFeatureExtractor.from_pretrained(path)
    waves, y, labels = data["train"]
    torch.manual_seed(args.seed)
    model = WhisperForAudioClassification.from_pretrained(path, num_labels=len(labels))

    def features(ws: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(fe(ws, sampling_rate=16000, return_tensors="np").input_features)

    class Clips(torch.utils.data.Dataset):
        def __init__(self, ws: list[np.ndarray], ys: np.ndarray, precomputed: bool):
            self.ws, self.ys = ws, ys
            self.feats = features(ws) if precomputed else None

        def __len__(self) -> int:
            return len(self.ws)

        def __getitem__(self, i: int) -> dict:
            x = self.feats[i] if self.feats is not None else features([self.ws[i]])[0]
            return {"input_features": x, "labels": int(self.ys[i])}

    started = time.perf_counter()
    train = Clips(waves, y, precomputed=expert)
    targs = TrainingArguments(output_dir=str(out), num_train_epochs=args.epochs,
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                              lr_scheduler_type="linear", warmup_steps=0, seed=args.seed, report_to=[],
                              save_strategy="no", logging_steps=10, use_cpu=True,
                              dataloader_num_workers=1 if expert else 0)
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs: stdout is the JSON result
        Trainer(model=model, args=targs, train_dataset=train).train()
    seconds = time.perf_counter() - started
    model.eval()
    tw, ty, _ = data["test"]
    correct = 0
    with torch.no_grad():
        for i in range(0, len(tw), 32):
            correct += int((model(input_features=features(tw[i:i + 32])).logits.argmax(-1).numpy()
                            == ty[i:i + 32]).sum())
    return {"name": name, "train_seconds": round(seconds, 1), "test_accuracy": round(correct / len(tw), 4)}


def parser(description: str, lr: float) -> argparse.ArgumentParser:
    """The options the audio benches share (bench/speech.py too)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip-standard", action="store_true", help="leave out the Trainer's standard recipe")
    return ap


def side_by_side(args: argparse.Namespace, ours: Any, trainer: Any) -> list[dict]:
    """fmtune's run, then the Trainer's standard recipe (unless --skip-standard) and its expert
    configuration, one after the other (never at the same time: they would share the cores)."""
    runs = []
    log("fmtune")
    runs.append(ours())
    log(json.dumps(runs[-1]))
    for name, expert in (("trainer-standard", False), ("trainer-expert", True)):
        if name == "trainer-standard" and args.skip_standard:
            continue
        log(name)
        runs.append(trainer(name, expert))
        log(json.dumps(runs[-1]))
    return runs


def main() -> None:
    args = parser(__doc__.split("\n")[0], 5e-5).parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = export("espeak-commands", tmp / "data", sizes=(None, 100, 200), seed=0)
        train = split(files["train"])
        data = {"train": train, "test": split(files["test"], train[2])}
        log(f"data: {len(train[0])} training clips, {len(data['test'][0])} test clips")
        runs = side_by_side(args, lambda: run_fmtune(files, args, tmp / "fmtune"),
                            lambda name, expert: run_trainer(name, data, args, tmp / name, expert))
    best = min(r["train_seconds"] for r in runs if r["name"].startswith("trainer"))
    ours = runs[0]["train_seconds"]
    print(json.dumps({"bench": "audio-classification", "model": "whisper-tiny-en (encoder), full fine-tuning",
                      "data": "espeak-commands 660/100/200, split by voice", "epochs": args.epochs,
                      "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
                      "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                      "runs": runs, "speedup_vs_best_trainer": round(best / ours, 2)}, indent=2))


if __name__ == "__main__":
    main()
