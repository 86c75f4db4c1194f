"""Self-training on unlabelled rows: ``fmtune train --data few.csv --unlabeled pool.csv``.

Round 0 is the ordinary run on the labelled rows. Every later round labels the pool with the
previous round's model, keeps the rows it is most sure of (probability at least
``semi.threshold``; class-balanced: the same number ``k`` of the most confident rows of every
class, ``k`` growing by ``semi.per_round`` a round, so a class the model favours cannot take
over), and trains again from the pretrained weights on the labelled rows plus those
pseudo-labelled ones (a fresh start, so a round's mistakes are not fine-tuned on top of
themselves). The validation rows are never pseudo-labelled ones: a validation split is made once,
from the labelled rows, and kept for every round.

The last round is the run (``OUT``); the earlier ones are kept in ``OUT/rounds/round-K`` as
ordinary runs. ``OUT/selftrain.json`` has, per round, the pseudo-labels used, how many of them
were right where the pool has a label column (it is never used for training), and the test
metrics when a test set is given.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmtune import config as config_mod
from fmtune import ui
from fmtune.data.dataset import model_texts
from fmtune.data.prepare import read_data, read_frames
from fmtune.data.readers import require_text_column, text_columns
from fmtune.errors import DataError
from fmtune.fsutil import write_json
from fmtune.run import planned_dir, require_free

REPORT = "selftrain.json"
ROUNDS_DIR = "rounds"


def _final_dir(cfg: config_mod.Config, overwrite: bool) -> Path:
    """Where the last round goes, as new_run_dir would place it; checked before round 0 starts (a
    self-training run is not resumed: it is run again)."""
    out = planned_dir(cfg)
    require_free(out, overwrite, resumable=False)
    return out


def _pool(cfg: config_mod.Config) -> tuple[pd.DataFrame, np.ndarray | None]:
    """The unlabelled rows (their text), and their labels where the file has a label column (used
    only to say how many pseudo-labels were right)."""
    path = cfg.semi.unlabeled
    df = read_data(path, cfg.task.type, cfg.data, split=None)
    columns = require_text_column(df, cfg.data.text_column, cfg.data.text_pair_column)
    with_text = [df[c].notna() & df[c].astype(str).str.strip().astype(bool) for c in columns]
    df = df[np.logical_and.reduce(with_text)].reset_index(drop=True)
    if df.empty:
        raise DataError(f"{path}: no rows with text to pseudo-label")
    truth = None
    if cfg.data.label_column in df.columns:
        truth = df[cfg.data.label_column].astype(str).to_numpy()
    return df, truth


def select(labels: list[str], probs: np.ndarray, k: int, threshold: float) -> np.ndarray:
    """Positions of the pool rows to pseudo-label: for every class its ``k`` most probable rows
    among those predicted as it with probability at least ``threshold``; every class gets as many
    as the class with the fewest such rows (class balance)."""
    top = probs.argmax(1)
    conf = probs.max(1)
    per_class = []
    for c in range(len(labels)):
        rows = np.flatnonzero((top == c) & (conf >= threshold))
        per_class.append(rows[np.argsort(-conf[rows], kind="stable")])
    take = min(k, *(len(r) for r in per_class)) if per_class else 0
    return np.sort(np.concatenate([r[:take] for r in per_class])) if take else np.array([], dtype=int)


def self_train(cfg: config_mod.Config, train: Callable[..., dict[str, Any]], *, overwrite: bool = False,
               quiet: bool = False, report: bool = True) -> dict[str, Any]:
    """Self-training as configured in ``cfg.semi``; ``train`` is ``fmtune.api.train`` (one round)."""
    from fmtune.predictor import Predictor
    from fmtune.tasks import task_class

    task_class(cfg.task.type).require("pseudo_labels", "--unlabeled (self-training on single-label classes)")
    sc = cfg.semi
    final = _final_dir(cfg, overwrite)
    pool, truth = _pool(cfg)
    work = final.parent / f".{final.name}.selftrain-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    frames = read_frames(cfg.data, cfg.task.type, cfg.train.seed)
    text, label = text_columns(cfg.data), cfg.data.label_column
    labelled = frames.train
    data = dataclasses.replace(cfg.data)
    if frames.val_from_train:  # one split, of labelled rows only, for every round
        val_path = work / "data" / "val.csv"
        frames.val.to_csv(val_path, index=False)
        data = dataclasses.replace(data, val=str(val_path))
    elif frames.val_is_train:  # no split for the labelled rows: none when pseudo-labelled rows are added
        data = dataclasses.replace(data, min_val_per_class=-1)
    fewest = frames.fewest or 1
    step = sc.per_round or max(2 * fewest, 8)
    rounds: list[dict[str, Any]] = []
    pseudo = pd.DataFrame(columns=[*text, label])
    summary: dict[str, Any] = {}
    try:
        for r in range(sc.rounds + 1):
            last = r == sc.rounds
            train_path = work / "data" / f"train-round-{r}.csv"
            pd.concat([labelled[[*text, label]], pseudo[[*text, label]]], ignore_index=True).to_csv(train_path,
                                                                                                  index=False)
            out = final if last else work / ROUNDS_DIR / f"round-{r}"
            round_cfg = dataclasses.replace(
                cfg, out=str(out), name=final.name if last else f"{final.name}-round-{r}",
                data=dataclasses.replace(data, train=str(train_path)),
                semi=dataclasses.replace(sc, unlabeled=None))
            if not quiet:
                ui.console.rule(f"self-training round {r}: {len(labelled)} labelled + {len(pseudo)} pseudo-labelled "
                                "rows")
            summary = train(round_cfg, overwrite=last and overwrite, quiet=quiet, report=False)
            rec: dict[str, Any] = {"round": r, "labelled": len(labelled), "pseudo_labelled": len(pseudo),
                                   "run_dir": str(out if last else final / ROUNDS_DIR / f"round-{r}")}
            if len(pseudo) and truth is not None:
                rec["pseudo_right"] = int(np.sum(pseudo["_truth"].to_numpy() == pseudo[label].to_numpy()))
            test = summary.get("eval", {}).get("test")
            if test:
                rec["test"] = test
            rounds.append(rec)
            if last:
                break
            pred = Predictor(out)
            labels = pred.labels
            _, probs = pred.embed(model_texts(pool[text].astype(str), cfg.data).tolist())  # texts, or pairs
            chosen = select(labels, probs, step * (r + 1), sc.threshold)
            pseudo = pool[text].iloc[chosen].reset_index(drop=True).assign(
                **{label: [labels[i] for i in probs[chosen].argmax(1)]})
            if truth is not None:
                pseudo["_truth"] = truth[chosen]
            rounds[-1]["pool_confident"] = int((probs.max(1) >= sc.threshold).sum())
            if truth is not None:
                rounds[-1]["pool_accuracy"] = float(np.mean(np.asarray(labels)[probs.argmax(1)] == truth))
            if pseudo.empty and not quiet:
                ui.console.print(f"[yellow]warning:[/] some class has no pool row predicted with probability "
                                 f"{sc.threshold} or more; the next round trains on the labelled rows alone")
        if (work / ROUNDS_DIR).exists():
            shutil.move(str(work / ROUNDS_DIR), str(final / ROUNDS_DIR))
        shutil.move(str(work / "data"), str(final / "selftrain-data"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"unlabeled": str(sc.unlabeled), "pool_rows": len(pool), "threshold": sc.threshold,
              "per_round": step, "rounds": rounds}
    write_json(final / REPORT, result)
    summary["selftrain"] = result
    if not quiet:
        _print(result)
    if report:
        from fmtune.report import write_report

        summary["report"] = str(write_report(final))
        if not quiet:
            ui.console.print(f"report: {summary['report']}")
    return summary


def _print(result: dict[str, Any]) -> None:
    from fmtune.report import selftrain_table

    header, rows = selftrain_table(result)
    rows = [[f"{v:.4f}" if isinstance(v, float) else v for v in row] for row in rows]
    ui.console.print(ui.table("self-training", header, rows))
