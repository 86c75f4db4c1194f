"""Long clips within memory: the time and peak memory of ``fmtune train`` on a base-size wav2vec2 and clips of
several seconds, with fmtune as it is here and (``--ref``) as it was before batches were fitted to memory.

    make bench-audio-memory          # writes bench/results-audio-memory-<date>.json
    .venv/bin/python bench/audio_memory.py [--clips 32] [--seconds 10] [--ref GIT_REF] > result.json

The model is wav2vec2-base's shape (12 layers of 768, the 7-convolution feature encoder of 512 channels: 95 M
parameters) with random weights: memory and time depend on the shape, not the weights (no wav2vec2 weights ship
offline). The data are ``--clips`` training clips of ``--seconds`` of tones in three pitches (16 kHz), 6 for
validation and 6 for test. Each version runs ``fmtune train --task audio-classification`` for one epoch with every
other setting at its default (a batch of 32) except ``train.min_steps`` off: on a training set of thousands of
clips it leaves the batch at 32, and that batch is what is measured here (on ``--clips`` alone it would cut the
batch to 8 to give more steps), in a process of its own; a thread samples its resident memory (see
``common.measured``); a process the kernel kills for memory shows as returncode -9. Also reported: fmtune's own
estimate per clip and the micro-batches it chose (run.json ``micro_batches``), and the test accuracy (chance:
random weights and one epoch; not the point here).

No side-by-side tool: this measures fmtune against its own earlier self. Prints one JSON document on stdout;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import add_version_options, fmtune_versions, log, measured, start  # noqa: E402

PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}


def make_data(root: Path, clips: int, seconds: float) -> None:
    import soundfile as sf

    rng = np.random.default_rng(0)
    rate = 16000
    for split, n in (("train", clips), ("val", 6), ("test", 6)):
        for i in range(n):
            label = list(PITCHES)[i % 3]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            t = np.arange(int(seconds * rate)) / rate
            wave = 0.3 * np.sin(2 * np.pi * PITCHES[label] * t) + 0.01 * rng.standard_normal(len(t))
            sf.write(root / split / label / f"{i:03d}.wav", wave.astype(np.float32), rate)


def make_model(folder: Path) -> None:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    torch.manual_seed(0)
    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
         "padding_value": 0.0, "do_normalize": True, "return_attention_mask": False}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=32, help="training clips (default 32: one batch)")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds a clip (default 10)")
    add_version_options(ap, "train", "b8991b3")
    args = ap.parse_args()

    work, result = start(args.out, "fmtune-bench-audio-memory-")
    import psutil

    result.update(clips=args.clips, seconds=args.seconds, memory_total_mb=psutil.virtual_memory().total >> 20,
                  memory_available_mb_at_start=psutil.virtual_memory().available >> 20)
    log(f"data and model in {work}")
    make_data(work / "data", args.clips, args.seconds)
    make_model(work / "wav2vec2-base-random")
    with fmtune_versions(work, args.ref) as versions:
        for name, source in versions.items():
            run = work / f"run-{name}"
            log(f"train with fmtune {name}")
            cmd = [sys.executable, "-m", "fmtune", "train", "-q", "--task", "audio-classification", "--model",
                   str(work / "wav2vec2-base-random"), "--data", str(work / "data" / "train"), "--val",
                   str(work / "data" / "val"), "--test", str(work / "data" / "test"), "--epochs", "1", "--no-report",
                   "--out", str(run), "--overwrite", "--set", "train.min_steps=null"]
            # (run from the working folder: python puts the current folder before PYTHONPATH)
            row = measured(cmd, {**os.environ, "PYTHONPATH": str(source)}, work)
            if row["returncode"] == 0:
                info = json.loads((run / "run.json").read_text())
                row["micro_batches"] = info.get("micro_batches")
                row["steps"] = info["fit"]["steps"]
                row["test_accuracy"] = json.loads((run / "eval.json").read_text())["test"]["accuracy"]
            elif row["returncode"] == -9:
                row["outcome"] = "killed (out of memory)"
            result["results"][name] = row
            log(json.dumps(row))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
