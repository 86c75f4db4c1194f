"""Which rows to label next: ``fmtune select RUN --pool pool.csv -n 50``.

Every pool row is read once by the run's model (its pooled embedding and the head's
probabilities), then ranked by one of:

- ``entropy``: the most uncertain predictions first (entropy of the probabilities);
- ``margin``: the smallest gap between the two most probable labels first;
- ``kcenter``: diversity, greedy k-center on the (L2-normalised) embeddings: each pick is the row
  farthest from everything labelled so far (the run's training rows) and picked before it;
- ``mix`` (default): the 3n most uncertain by margin, then k-center among them (uncertain and
  not alike).

``simulate`` runs the loop on a labelled set with its labels hidden: it starts from a few labelled
rows per class, and every round each strategy (and ``random``) picks rows, their labels are
revealed and a run is trained again on all labels so far, scored on the test set. It writes
the accuracy against labels used (JSON, CSV, PNG).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmtune import ui
from fmtune.data.dataset import model_texts
from fmtune.data.prepare import read_data
from fmtune.data.readers import require_column, require_text_column, row_label
from fmtune.errors import ConfigError, DataError
from fmtune.fsutil import check_output_dir, write_json, write_text_atomic

STRATEGIES = ("mix", "entropy", "margin", "kcenter", "random")


def uncertainty(probs: np.ndarray, how: str) -> np.ndarray:
    """Higher = less certain."""
    if how == "entropy":
        return -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    return -(top2[:, 1] - top2[:, 0])  # margin: a small gap is uncertain


def kcenter(emb: np.ndarray, n: int, centres: np.ndarray | None = None, candidates: np.ndarray | None = None,
            seed: int = 0) -> list[int]:
    """Greedy k-center: ``n`` positions of ``emb`` (among ``candidates``), each the farthest (cosine)
    from ``centres`` and the ones picked before it."""
    e = emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    cand = np.arange(len(e)) if candidates is None else np.asarray(candidates)
    if centres is not None and len(centres):
        c = centres / np.clip(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12, None)
        dist = 1 - (e[cand] @ c.T).max(1)
    else:  # nothing labelled: start from a random row
        dist = np.zeros(len(cand))
        dist[np.random.default_rng(seed).integers(len(cand))] = 1.0
    picked: list[int] = []
    for _ in range(min(n, len(cand))):
        j = int(np.argmax(dist))
        picked.append(int(cand[j]))
        dist = np.minimum(dist, 1 - e[cand] @ e[cand[j]])
        dist[j] = -np.inf
    return picked


def rank(strategy: str, emb: np.ndarray, probs: np.ndarray, n: int, labelled: np.ndarray | None,
         seed: int = 0) -> list[int]:
    """The ``n`` pool positions ``strategy`` would label next, best first."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    n = min(n, len(emb))
    if strategy == "random":
        return np.random.default_rng(seed).permutation(len(emb))[:n].tolist()
    if strategy in ("entropy", "margin"):
        return np.argsort(-uncertainty(probs, strategy), kind="stable")[:n].tolist()
    if strategy == "kcenter":
        return kcenter(emb, n, labelled, seed=seed)
    shortlist = np.argsort(-uncertainty(probs, "margin"), kind="stable")[: 3 * n]
    return kcenter(emb, n, labelled, candidates=shortlist, seed=seed)


def _texts(df: pd.DataFrame, data_cfg: Any, where: str) -> list[Any]:
    """The rows' texts (``data.text_column``), or (first, second) pairs for a run on pairs of texts
    (``data.text_pair_column``); a row without text is a DataError naming it."""
    columns = require_text_column(df, data_cfg.text_column, data_cfg.text_pair_column)
    for column in columns:
        bad = [i for i, t in enumerate(df[column].tolist()) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise DataError(f"{row_label(df, bad[0])}: no text in column {column!r} (a pool row needs one)")
    return model_texts(df, data_cfg).tolist()


def select(run: str | Path, pool: str | Path, n: int, *, strategy: str = "mix", output: str | Path | None = None,
           seed: int = 0, quiet: bool = False) -> pd.DataFrame:
    """Rank ``pool``'s rows for labelling; write the ``n`` best (all their columns, plus
    ``select_rank``, ``select_score`` and the model's ``predicted`` label) to ``output``."""
    from fmtune.predictor import Predictor

    pred = Predictor(run)
    cfg, task = pred.config, pred.task
    task.require("pseudo_labels", "fmtune select (it ranks rows by their predicted label)")
    if pred.kind != "text":
        raise ConfigError(f"fmtune select ranks texts; {run} reads {pred.kind}s")
    if n < 1:
        raise ConfigError("-n: choose at least one row")
    df = read_data(pool, task, cfg.data, split=None)
    emb, probs = pred.embed(_texts(df, cfg.data, str(pool)))
    labelled = None
    if strategy in ("kcenter", "mix") and cfg.data.train:
        train = read_data(cfg.data.train, task, cfg.data, split="train")
        labelled, _ = pred.embed(_texts(train, cfg.data, str(cfg.data.train)))
    order = rank(strategy, emb, probs, n, labelled, seed)
    out = df.iloc[order].copy()
    out.insert(0, "select_rank", np.arange(1, len(order) + 1))
    out["select_score"] = uncertainty(probs[order], "margin" if strategy != "entropy" else "entropy").round(6)
    out["predicted"] = [task.labels[i] for i in probs[order].argmax(1)]
    if cfg.data.label_column not in out.columns:
        out[cfg.data.label_column] = ""  # for the labeller to fill in
    if output is not None:
        write_text_atomic(Path(output), out.to_csv(index=False))
        if not quiet:
            ui.console.print(f"wrote the {len(out)} rows to label next ({strategy}) to {output}; fill in their "
                             f"{cfg.data.label_column!r} column, add them to the training data, and continue this "
                             f"run's model on it: fmtune train --resume-from {run} --data TRAINING_FILE")
    return out


def simulate(cfg: Any, pool: str | Path, test: str | Path, out: str | Path, *, start: int = 4, step: int = 16,
             rounds: int = 4, strategies: tuple[str, ...] = ("random", "mix", "margin", "kcenter"),
             seed: int = 0, quiet: bool = False) -> dict[str, Any]:
    """Active learning on ``pool`` with its labels hidden: ``start`` labelled rows per class, then
    ``rounds`` rounds of ``step`` rows picked by each strategy; every round trains ``cfg`` again on
    the labels so far and scores it on ``test``."""
    from fmtune import api
    from fmtune.predictor import Predictor
    from fmtune.tasks import task_class
    from fmtune.transfer import per_class

    out = Path(out)
    check_output_dir(out, "active.json")
    (out / "data").mkdir(parents=True, exist_ok=True)
    task = task_class(cfg.task.type)
    df = read_data(pool, task, cfg.data, split="train")
    require_column(df, cfg.data.label_column, "label", "data.label_column")
    _texts(df, cfg.data, str(pool))
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ConfigError(f"--strategies: {bad[0]!r} is not one of {', '.join(STRATEGIES)}")
    first = per_class(df, cfg.data.label_column, start, seed)
    curves: dict[str, list[dict[str, Any]]] = {}
    for strategy in strategies:
        chosen = list(first.index)
        curves[strategy] = []
        for r in range(rounds + 1):
            train_csv = out / "data" / f"{strategy}-round-{r}.csv"
            df.loc[chosen].to_csv(train_csv, index=False)
            run_dir = out / "runs" / f"{strategy}-round-{r}"
            run_cfg = dataclasses.replace(cfg, out=str(run_dir), name=run_dir.name, data=dataclasses.replace(
                cfg.data, train=str(train_csv), test=str(test), val=None))
            summary = api.train(run_cfg, overwrite=True, quiet=True, report=False)
            test_metrics = summary["eval"]["test"]
            curves[strategy].append({"round": r, "labels": len(chosen), **test_metrics})
            if not quiet:
                ui.console.print(f"  {strategy} round {r}: {len(chosen)} labels, accuracy "
                                 f"{test_metrics['accuracy']:.4f}")
            if r == rounds:
                break
            rest = df.drop(index=chosen)
            pred = Predictor(run_dir)
            emb, probs = pred.embed(_texts(rest, cfg.data, str(pool)))
            labelled = None
            if strategy in ("kcenter", "mix"):
                labelled, _ = pred.embed(_texts(df.loc[chosen], cfg.data, str(pool)))
            picked = rank(strategy, emb, probs, step, labelled, seed + r)
            chosen += list(rest.index[picked])
            shutil.rmtree(run_dir / "model", ignore_errors=True)  # read; only the last round's model is kept
    result = {"pool": str(pool), "test": str(test), "start_per_class": start, "step": step, "rounds": rounds,
              "strategy": cfg.strategy.name, "curves": curves}
    write_json(out / "active.json", result)
    rows = [{"strategy": s, **p} for s, pts in curves.items() for p in pts]
    pd.DataFrame(rows).to_csv(out / "active.csv", index=False)
    from fmtune import plots

    plots.active_learning(curves, out / "active.png")
    return result
