"""Few-label multi-label runs have no validation split, so they decide every label at task.threshold (0.5). Would
thresholds chosen without one do better? Each run here is fmtune's default on a few-label sample of the zoo's
wnut16-entity-types (tweets -> the entity types each mentions, 10 types; MiniLM-L6, strategy auto -> contrastive,
or the probe), scored on 600 other tweets at 0.5, against thresholds chosen by the same rule as a validation split
gets (``choose_thresholds``, macro-F1) on
  - ``oof``: out-of-fold probabilities of the run's head: the probe refitted on 4/5 of the training rows' features
    (of the run's own encoder) and read on the fifth, 5 folds (at least 5 / 3 / 2 positive rows a label);
  - ``on_train``: the run's own probabilities of its training rows (at least 3 positive rows);
  - ``oracle``: the test rows themselves (an upper bound, not a method).
Two ways to sample: ``label`` (N rows per entity type, plus 2N tweets without one: per-label prevalence far above
the test's) and ``random`` (N random tweets: the test's prevalence).

    .venv/bin/python bench/fewshot_multilabel_thresholds.py label:8:0:auto random:300:0:auto ... > result.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn import metrics as skm  # noqa: E402
from sklearn.model_selection import KFold  # noqa: E402

import fmtune  # noqa: E402
from fmtune.data.prepare import make_dataset, read_data  # noqa: E402
from fmtune.predictor import Predictor  # noqa: E402
from fmtune.tasks.multilabel import choose_thresholds  # noqa: E402
from fmtune.training.infer import infer  # noqa: E402
from fmtune.zoo import datasets as zoo  # noqa: E402


def sample(mode: str, n: int, seed: int):
    df = zoo._wnut16_entity_types().fillna("")
    test = df.sample(n=600, random_state=1000)
    pool = df.drop(test.index)
    if mode == "random":
        return pool.sample(n=n, random_state=seed), test
    rng = np.random.default_rng(seed)
    idx: set[int] = set()
    for lab in sorted({x for v in pool.label for x in v.split("|") if x}):
        cand = [i for i in pool.index if lab in pool.label[i].split("|")]
        idx.update(rng.choice(cand, min(n, len(cand)), replace=False).tolist())
    idx.update(rng.choice(pool.index[pool.label == ""], 2 * n, replace=False).tolist())
    return pool.loc[sorted(idx)], test


def one(mode: str, n: int, seed: int, strategy: str, folder: Path) -> dict:
    train, test = sample(mode, n, seed)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    fmtune.train({"model": {"name": "minilm-l6"}, "task": {"type": "multilabel"}, "strategy": {"name": strategy},
                  "out": str(folder / "run"), "data": {"train": str(folder / "train.csv"),
                                                       "test": str(folder / "test.csv")},
                  "train": {"seed": seed}}, quiet=True, overwrite=True, report=False)
    pred = Predictor(folder / "run")
    task, cfg = pred.task, pred.config

    def outputs(path: Path):
        ds, _ = make_dataset(read_data(path, task, cfg.data), pred.bundle, task, cfg.data)
        logits, y = infer(pred.model, ds, 64)
        return infer(pred.model, ds, 64, features=True)[0].numpy(), y.numpy().astype(int), logits.sigmoid().numpy()

    x, y, p_train = outputs(folder / "train.csv")
    _, yt, pt = outputs(folder / "test.csv")
    oof = np.zeros(y.shape)
    for a, b in KFold(5, shuffle=True, random_state=seed).split(x):
        probe = task.fit_probe(x[a], torch.from_numpy(y[a]).float(), seed)
        oof[b] = task.probe_logits(probe, x[b]).sigmoid().numpy()

    def scores(t) -> dict:
        pred_ = (pt > (0.5 if t is None else t)).astype(int)
        return {"macro_f1": round(float(skm.f1_score(yt, pred_, average="macro", zero_division=0)), 4),
                "micro_f1": round(float(skm.f1_score(yt, pred_, average="micro", zero_division=0)), 4),
                "exact": round(float((pred_ == yt).all(1).mean()), 4)}

    out = {"mode": mode, "n": n, "seed": seed, "strategy": strategy, "rows": len(train),
           "positives": y.sum(0).tolist(), "at_0.5": scores(None)}
    for k in (5, 3, 2):
        out[f"oof_min{k}"] = scores(choose_thresholds(y, oof, "macro_f1", 0.5, min_positives=k))
    out["on_train_min3"] = scores(choose_thresholds(y, p_train, "macro_f1", 0.5, min_positives=3))
    out["oracle"] = scores(choose_thresholds(yt, pt, "macro_f1", 0.5, min_positives=3))
    return out


def main() -> None:
    runs = []
    for spec in sys.argv[1:] or ["label:8:0:auto", "random:300:0:auto"]:
        mode, n, seed, strategy = spec.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(one(mode, int(n), int(seed), strategy, Path(tmp)))
        print(f"[bench] {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    deltas = {}
    for way in ("oof_min5", "on_train_min3"):
        for mode in ("label", "random"):
            rs = [r for r in runs if r["mode"] == mode]
            if rs:
                deltas[f"{way} - 0.5, {mode}"] = {m: [round(r[way][m] - r["at_0.5"][m], 4) for r in rs]
                                                 for m in ("macro_f1", "micro_f1", "exact")}
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "runs": runs,
                      "differences": deltas}, indent=1))


if __name__ == "__main__":
    main()
