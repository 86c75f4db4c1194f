"""Does pre-training help on this data, and how much? ``fmtune transfer``.

    fmtune transfer --model minilm-l6 --data train.csv --test test.csv --sizes 8,32,128,all

For every training-set size (examples per class, drawn class-balanced and seeded from the
training data) the same architecture is trained three ways with the same budget of optimizer
steps: ``scratch`` (random initialisation, everything trained), ``probe`` (a linear head on the
frozen pretrained backbone, learning rate 1e-2 unless ``train.head_lr`` is set) and ``finetune``
(the pretrained backbone fine-tuned with the configured strategy). Every run is an ordinary run
directory under ``OUT/runs/``; the validation set is the same for all of them (``--val``, or
split once off the training data), and each is scored on ``--test`` with its best checkpoint.
OUT gets ``transfer.json``, ``transfer.csv`` and ``transfer.png`` (test metric against examples
per class).
"""

from __future__ import annotations

import csv
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmtune import config as config_mod
from fmtune import ui
from fmtune.data.prepare import read_frames
from fmtune.data.readers import absolute_paths
from fmtune.errors import ConfigError
from fmtune.fsutil import check_output_dir, write_json
from fmtune.tasks import task_class

METHODS = ("scratch", "probe", "finetune")
REPORT = "transfer.json"


def parse_sizes(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in str(text).split(","):
        part = part.strip()
        if part == "all":
            out.append("all")
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise ConfigError(f"--sizes: {part!r} is neither a positive number of examples per class nor 'all'")
    if not out:
        raise ConfigError("--sizes: give at least one size, e.g. 8,32,128,all")
    return out


def per_class(df: pd.DataFrame, column: str, n: int | str, seed: int) -> pd.DataFrame:
    """``n`` rows of every label (all of a label's rows when it has fewer; all rows for 'all')."""
    if n == "all":
        return df
    rng = np.random.default_rng(seed)
    labels = df[column].astype(str).to_numpy()
    keep = [rng.permutation(np.flatnonzero(labels == k))[: int(n)] for k in sorted(set(labels))]
    return df.iloc[np.sort(np.concatenate(keep))]


def transfer(cfg: config_mod.Config, *, sizes: list[int | str], out: str | Path, methods: tuple[str, ...] = METHODS,
             seeds: int = 1, min_steps: int = 30, lr_scratch: float | None = None, keep_models: bool = False,
             quiet: bool = False) -> dict[str, Any]:
    """Train ``methods`` at every size of ``sizes`` (examples per class) with ``seeds`` seeds;
    ``cfg`` gives the model, data and training settings (its strategy is the fine-tuned one)."""
    from fmtune import api

    task_class(cfg.task.type).require("transfer", "fmtune transfer (it counts examples per class)")
    if not cfg.data.test:
        raise ConfigError("fmtune transfer scores every run on test data: give --test FILE")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ConfigError(f"--methods: unknown {bad[0]!r}; choose from {', '.join(METHODS)}")
    out = Path(out)
    check_output_dir(out, REPORT)
    (out / "data").mkdir(parents=True, exist_ok=True)
    frames = read_frames(cfg.data, "classification", cfg.train.seed)
    label, kind_col = cfg.data.label_column, None
    if cfg.data.image_column in frames.train.columns and cfg.data.text_column not in frames.train.columns:
        kind_col = cfg.data.image_column  # image paths: written elsewhere, so made absolute
    fix = (lambda d: absolute_paths(d, kind_col)) if kind_col else (lambda d: d)
    val_path = out / "data" / "val.csv"
    fix(frames.val).to_csv(val_path, index=False, quoting=csv.QUOTE_NONNUMERIC)  # texts quoted whole
    pool = fix(frames.train)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    plan = [(seed, n, m) for seed in range(cfg.train.seed, cfg.train.seed + seeds) for n in sizes for m in methods]
    ft_lr = cfg.train.lr
    for k, (seed, n, method) in enumerate(plan, 1):
        train = per_class(pool, label, n, seed)
        tag = f"{n}" + (f"-seed{seed}" if seeds > 1 else "")
        train_path = out / "data" / f"train-{tag}.csv"
        train.to_csv(train_path, index=False, quoting=csv.QUOTE_NONNUMERIC)
        steps = max(min_steps, cfg.train.epochs * math.ceil(len(train) / cfg.train.batch_size))
        run_cfg = cfg.to_dict()
        run_cfg.update(name=None, out=str(out / "runs" / f"{method}-{tag}"), search={})
        run_cfg["data"].update(train=str(train_path), val=str(val_path), max_train_samples=None)
        run_cfg["train"].update(seed=seed, max_steps=steps, eval_every=max(1, steps // 10), patience=None,
                                baseline=False)
        if method == "scratch":
            run_cfg["model"]["init"] = "random"
            run_cfg["strategy"]["name"] = "full"
            run_cfg["train"].update(lr=lr_scratch or config_mod.scratch_lr(ft_lr), head_lr=None)
        elif method == "probe":  # a linear model on fixed features: a large step converges in the same budget
            run_cfg["strategy"]["name"] = "head"
            run_cfg["train"]["head_lr"] = cfg.train.head_lr or config_mod.PROBE_LR
        if not quiet:
            ui.console.print(f"[{k}/{len(plan)}] {method}, {n} per class ({len(train)} examples), {steps} steps"
                             + (f", seed {seed}" if seeds > 1 else ""))
        t0 = time.perf_counter()
        summary = api.train(config_mod.from_dict(run_cfg), overwrite=True, quiet=True, report=False)
        test = summary["eval"]["test"]
        rows.append({"method": method, "per_class": n, "examples": len(train), "seed": seed, "steps": steps,
                     "lr": run_cfg["train"]["lr"], "seconds": round(time.perf_counter() - t0, 1),
                     "run": summary["run_dir"], **{k2: v for k2, v in test.items()}})
        run_dir = Path(summary["run_dir"])
        shutil.rmtree(run_dir / "state", ignore_errors=True)
        if not keep_models:
            shutil.rmtree(run_dir / "model", ignore_errors=True)
        if not quiet:
            ui.console.print(f"    test accuracy {test['accuracy']:.4f} in {rows[-1]['seconds']:.0f}s")
    table = pd.DataFrame(rows)
    metric = "accuracy"
    summary_rows = (table.groupby(["per_class", "method"], sort=False)
                    .agg(examples=("examples", "mean"), mean=(metric, "mean"), std=(metric, "std"),
                         seconds=("seconds", "mean")).reset_index())
    result = {"model": cfg.model.name, "strategy": cfg.strategy.name, "train": cfg.data.train, "test": cfg.data.test,
              "metric": metric, "sizes": [str(s) for s in sizes], "methods": list(methods), "seeds": seeds,
              "runs": rows, "summary": summary_rows.replace({np.nan: None}).to_dict("records"),
              "seconds": round(time.perf_counter() - started, 1)}
    result["gain_over_scratch"] = _gains(summary_rows, "scratch")
    table.to_csv(out / "transfer.csv", index=False)
    _plot(summary_rows, out / "transfer.png", cfg.model.name, metric)
    write_json(out / REPORT, result)
    if not quiet:
        ui.console.print(ui.table(f"transfer: test {metric} by examples per class ({cfg.model.name})",
                                  ["per class", *methods],
                                  [[n, *[_cell(summary_rows, n, m) for m in methods]] for n in sizes]))
        ui.console.print(f"transfer: {out / REPORT}, {out / 'transfer.png'}")
    return result


def _cell(summary: pd.DataFrame, n: Any, method: str) -> str:
    row = summary[(summary["per_class"].astype(str) == str(n)) & (summary["method"] == method)]
    if row.empty:
        return ""
    mean, std = row["mean"].iloc[0], row["std"].iloc[0]
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std == std and std is not None else "")


def _gains(summary: pd.DataFrame, base: str) -> dict[str, dict[str, float]]:
    """Per size: each method's metric minus the from-scratch one's."""
    out: dict[str, dict[str, float]] = {}
    for n, part in summary.groupby("per_class", sort=False):
        ref = part[part["method"] == base]["mean"]
        if ref.empty:
            continue
        out[str(n)] = {m: float(v - ref.iloc[0]) for m, v in zip(part["method"], part["mean"]) if m != base}
    return out


def _plot(summary: pd.DataFrame, path: Path, model: str, metric: str) -> None:
    from fmtune import plots

    fig, ax = plots.pyplot().subplots(figsize=(6, 4))
    for method, part in summary.groupby("method", sort=False):
        x = part["examples"].to_numpy(dtype=float)
        y = part["mean"].to_numpy(dtype=float)
        err = part["std"].fillna(0).to_numpy(dtype=float)
        order = np.argsort(x)
        ax.errorbar(x[order], y[order], yerr=err[order], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training examples (log scale)")
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{model}: from scratch vs pretrained")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plots.save_atomic(fig, path)
