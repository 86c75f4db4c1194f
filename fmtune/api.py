"""The verbs, as Python functions: train, evaluate, predict. The CLI only parses arguments and
calls these."""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from accelerate.utils import set_seed

from fmtune import config as config_mod
from fmtune import evaluation, paths, ui
from fmtune.data import tabular
from fmtune.data.conll import is_word_table, sentence_chunks
from fmtune.data.dataset import Rows, auto_max_length, epoch_batches, long_texts, long_texts_line, model_texts
from fmtune.data.prepare import (
    columns_of,
    columns_read_line,
    input_column,
    make_dataset,
    make_task,
    media_elsewhere,
    read_data,
    read_frames,
    split_lists_unset,
    usual_input,
)
from fmtune.data.readers import (
    CONLL_PREDICT_SUFFIXES,
    count_rows,
    embedded,
    held_out_test,
    iter_chunks,
    media_cell,
    media_templates,
    require_column,
    row_label,
    saved_dataset,
    table_base,
    unpacked,
)
from fmtune.errors import ConfigError, DataError, FmtuneError, PeerError
from fmtune.fsutil import write_json, write_text_atomic
from fmtune.models import build
from fmtune.run import (
    EVAL_FILE,
    INFO_FILE,
    LABELS_FILE,
    OpenRun,
    new_run_dir,
    open_run,
    read_config,
    read_task,
    write_start,
)
from fmtune.strategies import WHOLE_BACKBONE, apply_strategy, frozen_prefix
from fmtune.tasks import task_class
from fmtune.training import cache, checkpoint, distributed, hardware, memory, optim, trackers
from fmtune.training.dropout import set_dropout
from fmtune.training.infer import infer, model_device
from fmtune.training.loop import TB_DIR, fit, resolve_metric


def _datasets(cfg: config_mod.Config, bundle: build.Bundle, task: Any, frames: Any) -> dict[str, Any]:
    allow = cfg.data.unknown_labels == "unknown"
    out = {"train": make_dataset(frames.train, bundle, task, cfg.data)[0],
           "val": make_dataset(frames.val, bundle, task, cfg.data, allow_unknown=allow)[0]}
    if frames.test is not None:
        out["test"] = make_dataset(frames.test, bundle, task, cfg.data, allow_unknown=allow)[0]
    return out


def _rows(ds: Any) -> int:
    """Examples of a dataset as the user counts them (sentences, not the windows they are read in)."""
    return getattr(ds, "n_rows", len(ds))


def _split_size(ds: Any) -> str:
    return f"{_rows(ds)}" + (f" ({len(ds)} windows)" if _rows(ds) != len(ds) else "")


def _summary(frames: Any, cfg: config_mod.Config, task: Any, data: dict[str, Any]) -> dict[str, Any]:
    col = task.target_column(cfg.data)
    out: dict[str, Any] = {"val_split_from_train": frames.val_from_train, "val_is_train": frames.val_is_train}
    for name in ("train", "val", "test"):
        df = getattr(frames, name)
        if df is None:
            continue
        out[name] = {"rows": _rows(data[name]), "source": df.attrs.get("source")}
        if _rows(data[name]) != len(data[name]):  # sentences read in several windows
            out[name]["model_inputs"] = len(data[name])
        counts = task.label_counts(df, col) if col in df.columns else None
        if counts is not None:
            out[name]["label_counts"] = counts
    return out


def train(cfg: config_mod.Config | dict | str | Path, *, overwrite: bool = False, resume: str | Path | None = None,
          quiet: bool = False, report: bool = True, on_eval: Any = None) -> dict[str, Any]:
    """Fine-tune as configured; returns the run summary (run dir, best metric, test metrics).
    Writes ``report.html`` into the run directory at the end unless ``report`` is False.
    ``on_eval(record)`` is called after every validation (``fmtune search`` prunes trials there).

    ``cfg`` is a Config, a dict, or a YAML path. ``resume`` continues an interrupted run
    from its last checkpoint (its saved config is used).
    """
    cfg, run_dir = _config_and_dir(cfg, resume)
    if run_dir is None:
        cfg = _with_split_lists(cfg)
    if task_class(cfg.task.type).level == "lm":  # a model that generates (fmtune.generation)
        from fmtune import generation

        return generation.train(cfg, run_dir, overwrite=overwrite, quiet=quiet, report=report, on_eval=on_eval)
    if cfg.semi.unlabeled:  # self-training: rounds of ordinary runs (fmtune.semi)
        from fmtune import semi

        if resume is not None:
            raise ConfigError("--resume: a self-training run is not resumed; run it again (its rounds are ordinary "
                              "runs in OUT/rounds)")
        return semi.self_train(cfg, train, overwrite=overwrite, quiet=quiet, report=report)
    hw = hardware.choose(cfg.train.device, cfg.train.precision, cfg.train.num_threads, cfg.train.loader_threads)
    dist = distributed.init(cpu=hw.device == "cpu")  # a launched multi-process run: join its process group
    main = dist is None or dist.is_main_process
    if not main:  # rank 0 speaks and writes for everyone
        quiet, report = True, False
    trackers.check(cfg.train.tracker)  # a tracker that is not installed stops us before any work
    set_seed(cfg.train.seed)
    cont = _continual(cfg, run_dir)
    frames, task, new_rows = _frames_and_task(cfg, run_dir, cont)
    cfg, bundle, data, counts, few = _model_and_data(cfg, task, frames, cont, hw)
    if resume is None and dist is None:  # (a resumed run replays its own batches; ranks would each measure)
        headed = hasattr(bundle.model, "backbone") and hasattr(bundle.model, "head")
        frozen = frozen_prefix(bundle.model) if headed else 0
        cfg, fit = memory.fit_training(cfg, bundle.model, data["train"], hw.device, frozen=frozen)
        if fit:
            few["micro_batches"] = fit
    run_dir = _run_dir(cfg, run_dir, task, cont, overwrite, dist)
    if not quiet:
        _print_plan(cfg, bundle, task, counts, frames, data, run_dir, few)
    if cfg.strategy.name == "contrastive":  # the encoder first (a resumed run does it again: its state is the head's)
        from fmtune import fewshot

        few["contrastive"] = fewshot.contrastive(bundle, task, data["train"], cfg.strategy, cfg.train, hw.device,
                                                 quiet)
    with dist.main_process_first() if dist is not None else contextlib.nullcontext():  # one rank fills the cache
        net, train_ds, val_ds, cache_note = _with_cache(cfg, bundle, data, quiet, hw)
    if dist is None:
        hw = _gpu_precision(cfg, hw, task, net or bundle.model, train_ds)
    if not quiet:
        ui.console.print(f"  {hw.describe()}" + (f"  resuming from {run_dir}/state" if resume else ""))
        ui.console.print(f"  feature cache: {cache_note}")
    train_ds = _group_weighted(cfg, task, frames.train, train_ds, quiet)
    penalty = None
    if cont is not None:
        train_ds, penalty = cont.penalty(bundle.model, data["train"], train_ds, hw.device, quiet)
    solved = None if resume is not None or cont is not None else _head_from_probe(cfg, bundle, task, train_ds,
                                                                                   data["train"], quiet, hw)
    tracked = trackers.make(cfg.train.tracker, run_dir, cfg.to_dict()) if main else []
    try:
        summary = _fit_and_test(cfg, bundle, task, data, frames, counts, hw, run_dir, resume, quiet, net,
                                train_ds, val_ds, tracked, on_eval, penalty, solved, few)
    finally:
        for t in tracked:
            t.close()
    if cont is not None and main:
        build.load_weights(bundle, run_dir / "model")
        summary["continual"] = cont.report(run_dir, bundle, task, new_rows, quiet)
    if main and cfg.train.baseline and not task.probe_baseline and "eval" in summary:
        summary["eval"] = _head_baseline(cfg, run_dir, summary["eval"], quiet)
    if report:
        from fmtune.report import write_report

        summary["report"] = str(write_report(run_dir))
        if not quiet:
            ui.console.print(f"report: {summary['report']}")
    return summary


BASELINE_DIR = "baseline"
HEAD_BASELINE = "the head trained on the frozen pretrained backbone (strategy head), with the same data and settings"


def _head_baseline(cfg: config_mod.Config, run_dir: Path, result: dict[str, Any], quiet: bool) -> dict[str, Any]:
    """train.baseline for a task without a linear probe (detection): the head trained on the frozen
    pretrained backbone with the same data and settings, as a run of its own in RUN/baseline; its
    test metrics join eval.json as the baseline row."""
    values = cfg.to_dict()
    values["strategy"]["name"] = "head"
    values["train"].update(baseline=False, lr=None)  # lr None: the head strategy's own default
    values.update(out=str(run_dir / BASELINE_DIR), name=f"{run_dir.name}-{BASELINE_DIR}")
    base = config_mod.from_dict(values)
    if not quiet:
        ui.console.print(f"\n[bold]baseline[/]: the head on the frozen pretrained backbone ({run_dir / BASELINE_DIR})")
    summary = train(base, overwrite=True, quiet=True, report=False)
    result = {**result, "baseline": summary["eval"]["test"], "baseline_run": str(run_dir / BASELINE_DIR),
              "baseline_label": "head on the frozen backbone", "baseline_method": HEAD_BASELINE}
    write_json(run_dir / EVAL_FILE, result)
    if not quiet:
        print_comparison(result)
    return result


def _hub_datasets(cfg: config_mod.Config) -> None:
    """A config's data files named as Hugging Face dataset ids (``data.train: stanfordnlp/imdb``, in a YAML file or
    a dict, as ``--data`` takes them on the command line) as the folders of their files in the hub cache."""
    from fmtune import paths

    for section, key in (("data", "train"), ("data", "val"), ("data", "test"), ("semi", "unlabeled")):
        value = getattr(getattr(cfg, section), key)
        if isinstance(value, str) and (folder := paths.hub_dataset(value)) is not None:
            setattr(getattr(cfg, section), key, str(folder))


def _config_and_dir(cfg: Any, resume: str | Path | None) -> tuple[config_mod.Config, Path | None]:
    """A fresh run's config (its folder is made later, once everything is checked); a resumed
    run's saved config and folder."""
    if resume is None:
        cfg = config_mod.coerce(cfg)
        _hub_datasets(cfg)
        return cfg, None
    run_dir = Path(resume)
    cfg = read_config(run_dir)
    checkpoint.require_state(run_dir)
    return cfg, run_dir


def _with_split_lists(cfg: config_mod.Config) -> config_mod.Config:
    """A class folder that ships its held-out splits (Speech Commands) validates and tests on them unless the config
    names other files: data.val / data.test set to the lists, said in a warning (the run's config keeps them). So
    does a Hugging Face DatasetDict saved to disk, its train split training."""
    unset = split_lists_unset(cfg.data, cfg.task.type)
    if not unset:
        return cfg
    given = cfg.data.train
    cfg = copy.deepcopy(cfg)
    for key, path in unset.items():
        setattr(cfg.data, key, path)
    said = "; ".join(f"data.{k} = {p}" for k, p in unset.items())
    warnings.warn(f"{given} ships its held-out splits: {said} (give --val / --test to choose others)",
                  UserWarning, stacklevel=3)
    return cfg


def _continual(cfg: config_mod.Config, run_dir: Path | None) -> Any:
    """fmtune continue (see fmtune.continual): what starting from a finished run needs; None for
    an ordinary run."""
    if not cfg.continual.source:
        return None
    from fmtune import continual

    return continual.Setup(cfg, run_dir)


def _frames_and_task(cfg: config_mod.Config, run_dir: Path | None, cont: Any) -> tuple[Any, Any, int]:
    """The splits (a continued run's memory mixed in), the task (a resumed run's own; a continued
    run's grown from its source's), and how many training rows are new."""
    frames = read_frames(cfg.data, cfg.task.type, cfg.train.seed)
    new_rows = len(frames.train)
    if cont is not None:
        frames = cont.with_memory(frames)
    if run_dir is not None:
        task = read_task(run_dir)
    else:
        task = cont.task(frames.train) if cont is not None else make_task(cfg.task, cfg.data, frames.train)
    resolve_metric(task, cfg.train)
    return frames, task, new_rows


def _model_and_data(cfg: config_mod.Config, task: Any, frames: Any, cont: Any, hw: hardware.Hardware
                    ) -> tuple[config_mod.Config, build.Bundle, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The model with its strategy applied (a continued run: its source's weights), every split
    encoded and checked before any training, and the parameter counts. The config comes back with
    the few-label choices made (strategy auto; the step budget when no validation split was made),
    which are also returned, with why, for run.json."""
    set_seed(cfg.train.seed)
    if cfg.model.tower == "auto" and build.model_has_two_towers(cfg.model.name):  # the tower that reads the data
        images = cfg.data.image_column in frames.train.columns and cfg.data.text_column not in frames.train.columns
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tower="vision" if images else "text"))
    bundle = build.create(cfg.model, task)
    if cfg.model.dropout is not None:
        set_dropout(bundle.model, cfg.model.dropout)
    cfg, few = _few_labels(cfg, bundle, task, frames)
    if frames.settled:
        few["columns_read"] = frames.settled
    cfg, enough = config_mod.enough_steps(cfg, len(frames.train))
    if enough:
        few["small_training_set"] = enough
    _check_robust_training(cfg.train, bundle.kind, task)
    _check_pairs(cfg, bundle, task)
    texts, auto = model_texts(frames.train, cfg.data), None
    if cfg.model.max_length is None and bundle.kind == "text" and task.level == "pooled" and cont is None:
        auto = auto_max_length(bundle, texts, bundle.max_length, cfg.train.seed)
        if auto:  # long texts: read more of them; config.yaml keeps the length chosen
            bundle.max_length = auto["max_length"]
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_length=auto["max_length"]))
            few["max_length_auto"] = auto
    data = _datasets(cfg, bundle, task, frames)
    cut = long_texts(data["train"], bundle, texts, cfg.train.seed, auto["tokens_p95"] if auto else None)
    if cut:
        few["long_texts"] = cut
    counts = apply_strategy(bundle, cfg.strategy)
    if cont is not None:
        cont.start_from_source(bundle)
    counts.update(optim.memory_note(counts, cfg.train))
    bundle.model.to(hw.device)  # the feature cache, training, test and baseline all run there
    return cfg, bundle, data, counts, few


def _check_pairs(cfg: config_mod.Config, bundle: build.Bundle, task: Any) -> None:
    """data.text_pair_column: for one prediction per pair of texts, with what reads pairs."""
    if not cfg.data.text_pair_column:
        return
    if bundle.kind != "text" or task.level != "pooled":
        raise ConfigError(f"data.text_pair_column: pairs of texts are read by text models predicting one "
                          f"{'label' if task.labels is not None else 'value'} per pair (classification, multilabel, "
                          f"regression), not by {task.name} on a {bundle.kind} model")
    if cfg.strategy.name == "prompt":
        raise ConfigError("data.text_pair_column: prompt tuning does not read sentence pairs (its virtual tokens "
                          "do not carry segment ids); use lora or full")


def _few_labels(cfg: config_mod.Config, bundle: build.Bundle, task: Any,
                frames: Any) -> tuple[config_mod.Config, dict[str, Any]]:
    """strategy auto resolved; with no validation split (few labels), no early stopping and a step
    budget for strategies trained by gradient."""
    from fmtune import fewshot

    few: dict[str, Any] = {"fewest_per_label": frames.fewest, "median_per_label": frames.typical}
    if cfg.strategy.name == "auto":
        n_params = sum(p.numel() for p in bundle.model.parameters())
        name, why = fewshot.choose_strategy(cfg, bundle.kind, n_params, frames.typical, task)
        strategy = dataclasses.replace(cfg.strategy, name=name,
                                       encoder="lora" if n_params > fewshot.LARGE_MODEL else cfg.strategy.encoder)
        lr = cfg.train.lr
        if lr is None:
            lr = config_mod.default_lr(strategy, cfg.task.type, cfg.model.name)
        cfg = dataclasses.replace(cfg, strategy=strategy, train=dataclasses.replace(cfg.train, lr=lr))
        few["auto"] = {"strategy": name, "why": why}
    if frames.val_is_train:
        train = cfg.train
        n = len(frames.train)
        why = ("no validation split (data.min_val_per_class -1)" if cfg.data.min_val_per_class == -1 else
               f"no validation split: {frames.typical} rows per label (the median) x data.val_fraction "
               f"{cfg.data.val_fraction:g} is under data.min_val_per_class {cfg.data.min_val_per_class}")
        why += "; every row trains, no early stopping, the last weights are kept"
        changes: dict[str, Any] = {"patience": None}
        if cfg.strategy.name not in config_mod.SOLVED_HEAD and train.max_steps is None:
            batch = min(train.batch_size, max(4, n // 4))
            steps = max(train.epochs * math.ceil(n / batch), fewshot.FEW_MIN_STEPS)
            changes.update(batch_size=batch, max_steps=steps)
            why += f"; a step budget of {steps} steps of {batch} rows"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(train, **changes))
        few["no_validation_split"] = why
    return cfg, few


def _run_dir(cfg: config_mod.Config, run_dir: Path | None, task: Any, cont: Any, overwrite: bool,
             dist: Any) -> Path:
    """A fresh run's folder, made by rank 0 and told to the others."""
    main = dist is None or dist.is_main_process
    failure = None
    if run_dir is None and main:
        try:
            run_dir = new_run_dir(cfg, overwrite)
            write_start(run_dir, cfg, task)
            if cont is not None:
                cont.write_memory(run_dir)
        except FmtuneError as e:  # (the folder exists, say): the other ranks are told, not left waiting
            if dist is None:
                raise
            failure = e
    if dist is not None:
        from accelerate.utils import broadcast_object_list

        where, failed = broadcast_object_list([(str(run_dir), failure is not None) if main else None])[0]
        if failure is not None:
            raise failure
        if failed:
            raise PeerError("rank 0 could not start the run")
        run_dir = Path(where)
    return run_dir


def _print_plan(cfg: config_mod.Config, bundle: build.Bundle, task: Any, counts: dict[str, Any], frames: Any,
                data: dict[str, Any], run_dir: Path, few: dict[str, Any]) -> None:
    out = ui.console
    out.print(f"[bold]fmtune train[/] -> {run_dir}")
    labels = f" with {len(task.labels)} labels" if task.labels else ""
    out.print(f"  model {cfg.model.name} ({bundle.kind}, pooling={bundle.pooling})  task {task.name}{labels}"
              f"  strategy {cfg.strategy.name}")
    out.print(f"  trainable {counts['trainable_params']:,} of {counts['total_params']:,} parameters "
              f"({100 * counts['trainable_params'] / counts['total_params']:.2f}%); optimizer state "
              f"{counts['optimizer_state_mib']:.1f} MiB (full fine-tuning: "
              f"{counts['full_finetune_optimizer_state_mib']:.1f} MiB)")
    if getattr(bundle.model, "whole", False):
        how = ", trained with its own loss (Hungarian matching)" if bundle.model.kind == "detector" else ""
        out.print(f"  a whole {type(bundle.model.net).__name__}: a new classifier for the run's classes{how}; head lr "
                  "for all but its backbone")
    if counts.get("frozen_embedding_params"):
        out.print(f"  token embeddings ({counts['frozen_embedding_params']:,} parameters) kept as pretrained "
                  "(strategy.freeze_embeddings=false trains them too)")
    for note in task.notes():
        out.print(f"  {note}")
    if "columns_read" in few:
        out.print(f"  {columns_read_line(few['columns_read'])}")
    if "auto" in few:
        out.print(f"  strategy auto -> {few['auto']['strategy']}: {few['auto']['why']}")
    out.print(f"  lr {cfg.train.lr:g}, head lr {optim.head_lr(cfg.train):g}")
    if "no_validation_split" in few:
        out.print(f"  few labels: {few['no_validation_split']}")
    if "small_training_set" in few:
        out.print(f"  small training set: {few['small_training_set']}")
    if "max_length_auto" in few:
        auto = few["max_length_auto"]
        out.print(f"  long texts: model.max_length {auto['max_length']} (95% of the training texts fit in "
                  f"{auto['tokens_p95']} tokens); --set model.max_length={auto['default']} trains faster and reads "
                  "less of each")
    if "long_texts" in few:
        out.print(f"  {long_texts_line(few['long_texts'])}")
    if few.get("micro_batches"):
        out.print(f"  memory: {few['micro_batches']['why']}")
    out.print(f"  data: train {_split_size(data['train'])}, val "
              + ("= the training rows" if frames.val_is_train else _split_size(data['val']))
              + f"{' (split off train)' if frames.val_from_train else ''}"
              f"{', test ' + _split_size(data['test']) if 'test' in data else ''}")


def _group_weighted(cfg: config_mod.Config, task: Any, train: pd.DataFrame, train_ds: Any, quiet: bool) -> Any:
    """task.group_weights: the training set with per-example loss weights (fmtune.fairness.reweighing)."""
    if not cfg.task.group_weights:
        return train_ds
    from fmtune import fairness
    from fmtune.data.dataset import WithAux
    from fmtune.training.loop import WEIGHT_KEY

    task.require("fairness", "task.group_weights")
    groups = fairness.group_columns(train, tabular.split_names(cfg.task.group_weights))
    if len(groups) != len(train_ds):
        raise ConfigError(f"task.group_weights: {len(train)} training rows but {len(train_ds)} examples were made of "
                          "them; group weights need one example per row")
    target = train[task.target_column(cfg.data)].to_numpy()
    weights = fairness.reweighing(groups, target if task.labels else None)
    if not quiet:
        ui.console.print(f"  group weights ({cfg.task.group_weights}): {weights.min():.3f} .. {weights.max():.3f} "
                         f"per example (re-weighing)")
    return WithAux(train_ds, {WEIGHT_KEY: torch.from_numpy(weights)})


def _gpu_precision(cfg: config_mod.Config, hw: hardware.Hardware, task: Any, net: Any,
                   train_ds: Any) -> hardware.Hardware:
    """bf16 is not always faster on a GPU (MiniLM at batch 32 on an H200: 2.3x slower): time both on
    this model. Not on CPUs: EfficientNet-Lite0 trains 1.6x faster in fp32 there, but reached 1-2
    points lower test accuracy on digits than bf16 in 3 of 3 seeds, so the CPU keeps the native-bf16
    rule. Not for a launched multi-process run (the ranks would have to agree)."""
    if hw.device != "cuda" or cfg.train.precision != "auto" or hw.precision == "no":
        return hw
    first = epoch_batches(len(train_ds), cfg.train.batch_size, cfg.train.seed, 0,
                          getattr(train_ds, "lengths", None))[0]
    return hardware.probe_precision(hw, net, train_ds.collate(first), task.loss)


def _fit_and_test(cfg: config_mod.Config, bundle: build.Bundle, task: Any, data: dict[str, Any], frames: Any,
                  counts: dict[str, Any], hw: Any, run_dir: Path, resume: Any, quiet: bool, net: Any,
                  train_ds: Any, val_ds: Any, tracked: list[Any], on_eval: Any = None,
                  penalty: Any = None, solved: dict[str, Any] | None = None,
                  few: dict[str, Any] | None = None) -> dict[str, Any]:
    out = ui.console
    few = few or {}
    # no validation split: the last weights are kept; a head solved on every row is final as it is
    final = solved is not None and frames.val_is_train and cfg.strategy.name in config_mod.SOLVED_HEAD
    if task.supports("thresholds"):  # the best checkpoint: the best once its thresholds are chosen on validation
        task.select_thresholded = cfg.task.thresholds == "auto" and not frames.val_is_train
    result = fit(bundle, task, train_ds, val_ds, cfg.train, run_dir, hardware=hw,
                 resume=resume is not None, save_best=lambda: build.save(bundle, run_dir / "model"),
                 progress=ui.FitProgress(quiet), net=net, trackers=tracked, on_eval=on_eval, penalty=penalty,
                 eval_first=solved is not None, keep_last=frames.val_is_train, steps=0 if final else None)
    distributed.finish()  # the ranks are in step here (fit ends on a gather); the rest is rank 0's alone
    summary: dict[str, Any] = {"run_dir": str(run_dir), "metric": result.metric, "best": result.best,
                               "best_step": result.best_step, "stopped_early": result.stopped_early,
                               "seconds": result.seconds, "processes": result.processes}
    if not distributed.is_main():
        return summary  # the test, the baseline and the files are rank 0's
    if not quiet:
        stop = "stopped early" if result.stopped_early else (
            f"stopped at the time budget of {cfg.train.max_minutes} min" if result.out_of_time else "finished")
        out.print(f"  {stop} after {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.0f}s, "
                  f"{result.samples_per_s:.1f} samples/s; best val {result.metric} "
                  + (f"{result.best:.4f} at step {result.best_step}" if result.best is not None else "never finite"))
    dist_keys = ("processes", "params_in_sync", "weights_per_rank_mib")
    fit_info = {k: v for k, v in vars(result).items() if k not in ("history", *dist_keys)}
    if result.processes > 1:
        fit_info["distributed"] = {"processes": result.processes, "mode": cfg.train.distributed,
                                   "params_in_sync": result.params_in_sync,
                                   "weights_per_rank_mib": result.weights_per_rank_mib}
    info = {"params": counts, "hardware": hw.describe(), "data": _summary(frames, cfg, task, data), "fit": fit_info,
            "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    if solved is not None:
        info["head_init"] = summary["head_init"] = {
            **solved, "kept_as_is": result.best_step == 0 and result.steps > 0 and not frames.val_is_train}
        if info["head_init"]["kept_as_is"] and cfg.strategy.name not in config_mod.SOLVED_HEAD:
            if not quiet:
                out.print("  training never did better on validation than the probe it started from: the run's model "
                          "is that probe on the untrained backbone (its best is step 0)")
            if solved["rows"] < len(data["train"]):
                again = info["head_init"]["every_row"] = _probe_on_every_row(cfg, bundle, task, data, run_dir, result,
                                                                             quiet, hw)
                if again.get("kept"):
                    summary["best"] = again[f"val_{result.metric}"]
    ends_on_probe = solved is not None and info["head_init"]["kept_as_is"]
    if task.supports("recentre") and result.steps > 0 and result.best is not None and not ends_on_probe and \
            cfg.strategy.name not in config_mod.SOLVED_HEAD:
        info["recentred"] = summary["recentred"] = _recentre(cfg, bundle, task, data, run_dir, result, quiet, hw)
        if info["recentred"]["kept"]:
            summary["best"] = info["recentred"][f"val_{result.metric}"]
    if task.supports("thresholds") and cfg.task.thresholds == "auto" and result.best is not None:
        info["thresholds"] = summary["thresholds"] = _choose_thresholds(cfg, bundle, task, data["val"], run_dir,
                                                                        result, frames.val_is_train, quiet, hw)
        if info["thresholds"].get("metric") == result.metric:
            summary["best"] = info["thresholds"][f"val_{result.metric}"]
    for note in ("small_training_set", "long_texts", "max_length_auto", "columns_read", "micro_batches"):
        # (apart from the few-label notes)
        if few.get(note):
            info[note] = summary[note] = few.pop(note)
    if few.get("auto") or few.get("no_validation_split") or few.get("contrastive"):
        info["few_labels"] = few
        summary["few_labels"] = {k: v for k, v in few.items() if k != "contrastive"}
    write_json(run_dir / INFO_FILE, info)
    if "test" in data:
        build.load_weights(bundle, run_dir / "model")
        summary["eval"] = _evaluate_run(OpenRun(run_dir, cfg, task, bundle), data["test"],
                                        cfg.train.baseline and task.probe_baseline, quiet, source=cfg.data.test,
                                        train_ds=data["train"], val_ds=None if frames.val_is_train else data["val"],
                                        split_column=frames.test.attrs.get("split_column"))
    test = summary.get("eval", {}).get("test", {})
    _log_hparams(run_dir, cfg, result, test)
    for t in tracked:
        t.log({f"test/{k}": v for k, v in test.items()}, result.steps)
    return summary


def continue_run(source: str | Path, data: str | Path, *, val: str | Path | None = None,
                 test: str | Path | None = None, method: str = "replay", out: str | Path | None = None,
                 overrides: list[str] | None = None, overwrite: bool = False, quiet: bool = False,
                 report: bool = True) -> dict[str, Any]:
    """Train a new run from the finished run ``source`` on new data (``fmtune continue``); see
    ``fmtune.continual.continue_config``. Returns the training summary, with ``continual``
    (continual.json)."""
    from fmtune.continual import continue_config

    cfg = continue_config(source, data, val=val, test=test, method=method, out=out, overrides=overrides)
    return train(cfg, overwrite=overwrite, quiet=quiet, report=report)


def train_from(source: str | Path, data: str | Path | None = None, *, val: str | Path | None = None,
               test: str | Path | None = None, out: str | Path | None = None, overrides: list[str] | None = None,
               overwrite: bool = False, quiet: bool = False, report: bool = True) -> dict[str, Any]:
    """``fmtune train --resume-from RUN``: a new run that starts from the finished run ``source``'s
    fine-tuned model (its model, task, strategy and settings; labels new in ``data`` extend the
    head) and trains it on ``data``, all of it (no replay: the data is taken to hold the old rows
    too, as after adding the rows ``fmtune select`` picked). ``data``, ``val`` and ``test``
    default to ``source``'s own files (read again). ``source`` is only read; the new run's
    continual.json scores ``source``'s model and the new one on the test file."""
    from fmtune.continual import continue_config

    src = Path(source)
    old = read_config(src).data
    overrides = list(overrides or [])
    if out is None and not any(o.startswith("name=") for o in overrides):
        overrides.append(f"name={src.name}-continued-{time.strftime('%Y%m%d-%H%M%S')}")
    cfg = continue_config(src, data if data is not None else old.train, val=val if val is not None else old.val,
                          test=test if test is not None else old.test, method="naive", out=out, overrides=overrides)
    return train(cfg, overwrite=overwrite, quiet=quiet, report=report)


def _log_hparams(run_dir: Path, cfg: config_mod.Config, result: Any, test: dict[str, float]) -> None:
    """The run's settings against its results, for TensorBoard's hyper-parameter view."""
    from torch.utils.tensorboard import SummaryWriter

    hp = {"model": cfg.model.name, "strategy": cfg.strategy.name, "lr": cfg.train.lr,
          "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs, "weight_decay": cfg.train.weight_decay,
          "seed": cfg.train.seed}
    metrics = {f"hparam/val_{result.metric}": result.best if result.best is not None else float("nan"),
               **{f"hparam/test_{k}": v for k, v in test.items()}}
    with SummaryWriter(str(run_dir / TB_DIR)) as w:
        w.add_hparams(hp, metrics, run_name="hparams")


def _check_robust_training(cfg: Any, kind: str, task: Any) -> None:
    aug = cfg.augment
    if kind == "audio" and (aug.text_on() or aug.image_on()):
        raise ConfigError("train.augment.noise / corruptions / typos / word_drop perturb images or text, and this "
                          "model reads audio; use train.augment.snr, shift, gain or speed")
    if kind != "audio" and aug.audio_on():
        raise ConfigError(f"train.augment.snr / shift / gain / speed perturb audio, and this model reads {kind}")
    if kind == "text" and aug.image_on():
        raise ConfigError("train.augment.noise / corruptions perturb images, and this model reads text; "
                          "use train.augment.typos or word_drop")
    if kind == "image" and aug.text_on():
        raise ConfigError("train.augment.typos / word_drop perturb text, and this model reads images; "
                          "use train.augment.noise or corruptions")
    if cfg.adversarial != "none" and kind != "image":
        raise ConfigError("train.adversarial attacks pixels: image models only; for text, make training "
                          "robust with train.augment.typos and word_drop")
    if cfg.adversarial != "none" and not task.supports("attacks"):
        raise ConfigError(f"train.adversarial needs a single-label classification task, not {task.name}")


def _head_from_probe(cfg: config_mod.Config, bundle: build.Bundle, task: Any, train_ds: Any, plain: Any,
                     quiet: bool, hw: hardware.Hardware) -> dict[str, Any] | None:
    """train.head_init probe, or auto where config.head_start says so (pooled tasks): set the head to the
    task's linear probe solved on the training features of the model as training starts (a convex
    problem, solved to convergence in seconds). strategy head / contrastive: that is the head (a few
    epochs of SGD under-train it).
    Every other strategy: linear probing, then fine-tuning (LP-FT, Kumar et al. 2022): the body's
    first steps follow a head that already separates the classes instead of a random one's
    gradients; on 40 classes of 64 rows full fine-tuning went from 0.52 to 0.66 test accuracy.
    Features come from the cache, else are computed once (for a head that goes on training, on
    ``config.probe_init_rows`` of the rows), under the run's mixed precision as the cache is (a start, or
    the head of a body that trains in that precision). Returns what was done (run.json ``head_init``),
    or None."""
    if task.level != "pooled":
        return None
    single = len(task.labels) if getattr(task, "hf_problem_type", None) == "single_label_classification" else None
    if config_mod.head_start(cfg.train, cfg.strategy.name, single) != "probe":
        if cfg.train.head_init == "auto" and not quiet:
            ui.console.print(f"  head: a random start ({cfg.strategy.name} on {single} classes, train.head_init auto: "
                             "on two classes its adapters learned more from a random head than from the probe; see "
                             "the help of train.head_init)")
        return None
    started = time.perf_counter()
    if getattr(train_ds, "field", "") == "features":
        x, targets = np.asarray(train_ds.data, dtype=np.float32), train_ds.targets
    else:  # no cache of the pooled features (the body trains, augmentation ...): computed here
        rows = plain if cfg.strategy.name in config_mod.SOLVED_HEAD else _seeded_sample(
            plain, config_mod.probe_init_rows(len(plain), len(task.labels or ())), cfg.train.seed)
        with ui.CountProgress("probe for the head", len(rows), quiet) as bar:
            feats, targets = infer(bundle.model, rows, cfg.train.eval_batch_size, features=True, progress=bar,
                                   autocast_dtype=hardware.autocast_dtype(hw.precision))
        x = feats.numpy()
    if not _solve_head(bundle, task, x, targets, cfg.train.seed):
        return None
    done = {"from": "linear probe", "rows": len(x), "seconds": round(time.perf_counter() - started, 2)}
    if not quiet:
        then = ("" if cfg.strategy.name in config_mod.SOLVED_HEAD else
                "; fine-tuning from it is kept only where it does better on validation")
        ui.console.print(f"  head: started from the linear probe solved on {len(x)} training rows' features "
                         f"({done['seconds']:.1f}s); validated before the first epoch{then}")
    return done


def _seeded_sample(rows: Any, n: int, seed: int) -> Any:
    """``rows``, or a seeded sample of ``n`` of them (in their order) where there are more."""
    if n >= len(rows):
        return rows
    return Rows(rows, np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False)))


def _solve_head(bundle: build.Bundle, task: Any, x: np.ndarray, targets: Any, seed: int) -> bool:
    """Set the model's head to the task's linear probe solved on features ``x``; False where the task has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's convergence and deprecation notes
        probe = task.fit_probe(x, targets, seed)
    solved = task.head_from_probe(probe, x.shape[1])
    if solved is None:
        return False
    linear = build.head_linear(bundle.model)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(solved[0], dtype=linear.weight.dtype))
        linear.bias.copy_(torch.as_tensor(solved[1], dtype=linear.bias.dtype))
    return True


def _probe_on_every_row(cfg: config_mod.Config, bundle: build.Bundle, task: Any, data: dict[str, Any],
                        run_dir: Path, result: Any, quiet: bool, hw: hardware.Hardware) -> dict[str, Any]:
    """Fine-tuning never did better on validation than its start, the untrained body with a head solved on a
    sample of the training rows (a start, cheap, not a final head): solve the head again on every training row
    (the pretrained baseline's probe) and keep it where validation does not say it is worse."""
    build.load_weights(bundle, run_dir / "model")  # the step-0 checkpoint
    before = _head_state(bundle)
    dtype = hardware.autocast_dtype(hw.precision)
    with ui.CountProgress("probe on every training row", len(data["train"]) + len(data["val"]), quiet) as bar:
        feats, targets = infer(bundle.model, data["train"], cfg.train.eval_batch_size, features=True, progress=bar,
                               autocast_dtype=dtype)
        if not _solve_head(bundle, task, feats.numpy(), targets, cfg.train.seed):
            return {}
        value, kept = _keep_head_unless_worse(cfg, bundle, task, data["val"], run_dir, result, before, bar, dtype)
    if not quiet:
        ui.console.print(f"  the head solved again on all {len(data['train']):,} training rows: val {result.metric} "
                         f"{value:.4f} against {result.best:.4f} from the sample; "
                         + ("the run's model now" if kept else "kept the sample's (validation says it is better)"))
    return {"rows": len(data["train"]), f"val_{result.metric}": round(value, 6), "kept": kept}


def _head_state(bundle: build.Bundle) -> tuple[torch.Tensor, torch.Tensor]:
    linear = build.head_linear(bundle.model)
    return linear.weight.detach().clone(), linear.bias.detach().clone()


def _keep_head_unless_worse(cfg: config_mod.Config, bundle: build.Bundle, task: Any, val: Any, run_dir: Path,
                            result: Any, before: tuple[torch.Tensor, torch.Tensor], bar: Any,
                            dtype: Any) -> tuple[float, bool]:
    """After a change to the best checkpoint's head: its validation metric, and whether it is kept (saved as the
    run's model) because validation does not say it is worse than the best; else the head goes back to ``before``."""
    logits, y = infer(bundle.model, val, cfg.train.eval_batch_size, progress=bar, autocast_dtype=dtype)
    value = float(task.validation_metrics(logits, y, result.metric)[result.metric])
    worse = value < result.best if task.greater_is_better(result.metric) else value > result.best
    if worse:
        linear = build.head_linear(bundle.model)
        with torch.no_grad():
            linear.weight.copy_(before[0])
            linear.bias.copy_(before[1])
    else:
        build.save(bundle, run_dir / "model")
    return value, not worse


RECENTRE_ROWS = 2_000  # training rows the mean prediction is measured on (a seeded sample beyond)


def _recentre(cfg: config_mod.Config, bundle: build.Bundle, task: Any, data: dict[str, Any], run_dir: Path,
              result: Any, quiet: bool, hw: hardware.Hardware) -> dict[str, Any]:
    """Regression: move the best checkpoint's head bias so that its mean prediction on the training rows (in eval
    mode, as it predicts) is their mean target; kept unless validation says worse. Fine-tuning leaves it off by a
    fraction of a standard deviation (MiniLM-L6, 2,000 rows, 12 runs: -1.6 to +0.4 hours a week, -0.37 to +0.32
    COMPAS deciles), and moving it lowered test RMSE in 10 of the 12 (README, Train on your data)."""
    build.load_weights(bundle, run_dir / "model")
    rows = _seeded_sample(data["train"], RECENTRE_ROWS, cfg.train.seed)
    before = _head_state(bundle)
    dtype = hardware.autocast_dtype(hw.precision)
    with ui.CountProgress("mean prediction on the training rows", len(rows) + len(data["val"]), quiet) as bar:
        pred, y = infer(bundle.model, rows, cfg.train.eval_batch_size, progress=bar, autocast_dtype=dtype)
        shift = float((y.double() - pred.double().view(-1)).mean())
        with torch.no_grad():  # the head's output is mapped by * scale + shift
            build.head_linear(bundle.model).bias += shift / task.output_affine()[0]
        value, kept = _keep_head_unless_worse(cfg, bundle, task, data["val"], run_dir, result, before, bar, dtype)
    if not quiet:
        ui.console.print(f"  recentred: mean target - mean prediction on {len(rows):,} training rows {shift:+.4g}, "
                         f"added to the head's output; val {result.metric} {result.best:.4f} -> {value:.4f}"
                         + ("" if kept else ": not kept (validation says worse)"))
    return {"rows": len(rows), "shift": round(shift, 6), f"val_{result.metric}": round(value, 6), "kept": kept}


def _choose_thresholds(cfg: config_mod.Config, bundle: build.Bundle, task: Any, val: Any, run_dir: Path, result: Any,
                       val_is_train: bool, quiet: bool, hw: hardware.Hardware) -> dict[str, Any]:
    """task.thresholds=auto: the best checkpoint's decision thresholds chosen on the validation rows for the run's
    metric and saved with the run (labels.json); not on training rows (no validation split: they would flatter)."""
    task.threshold = cfg.task.threshold  # (a resumed run's labels.json may hold the ones chosen before)

    def not_chosen(why: str) -> dict[str, Any]:
        write_json(run_dir / LABELS_FILE, task.state())
        if not quiet:
            ui.console.print(f"  decision thresholds not chosen: {why}")
        return {"chosen": False, "why": why}

    if val_is_train:
        return not_chosen(f"no validation split: task.threshold {task.threshold:g} for every label")
    build.load_weights(bundle, run_dir / "model")
    with ui.CountProgress("decision thresholds on validation", len(val), quiet) as bar:
        logits, y = infer(bundle.model, val, cfg.train.eval_batch_size, progress=bar,
                          autocast_dtype=hardware.autocast_dtype(hw.precision))
    chosen = task.choose_thresholds(logits, y, result.metric)
    if chosen is None:
        return not_chosen(f"the {len(y):,} validation rows cannot tell ({task.thresholds_unchosen}): task.threshold "
                          f"{task.threshold:g} for every label")
    write_json(run_dir / LABELS_FILE, task.state())
    if not quiet:
        metric, before = chosen["metric"], chosen["before"]
        values = sorted(set(chosen["thresholds"].values()))
        ui.console.print(f"  {chosen.get('what', 'decision thresholds')} chosen on {chosen['rows']:,} validation "
                         f"{chosen.get('unit', 'rows')} for {metric}: "
                         + (f"{values[0]:.4g} for every label" if len(values) == 1 else
                            f"{values[0]:g} to {values[-1]:g} by label")
                         + f"; val {metric} {before[f'val_{metric}']:.4f} at {before['threshold']:g} -> "
                         f"{chosen[f'val_{metric}']:.4f}")
    return {"chosen": True, **chosen}


def _with_cache(cfg: config_mod.Config, bundle: build.Bundle, data: dict[str, Any],
                quiet: bool, hw: hardware.Hardware) -> tuple[Any, Any, Any, str]:
    """Swap train/val for their cached frozen-prefix outputs where the strategy allows it."""
    aug = cfg.train.augment
    moves = hasattr(data["train"], "with_augment")  # crops and flips that move masks / boxes too
    if moves and (aug.geometric if aug.geometric != "auto" else frozen_prefix(bundle.model) != WHOLE_BACKBONE):
        data = {**data, "train": data["train"].with_augment(cfg.train.seed)}
        if not aug.image_on():
            return None, data["train"], data["val"], "not used: train.augment.geometric crops and flips every image"
    if aug.text_on() or aug.image_on() or aug.audio_on():
        from fmtune.training.perturb import Augmented

        train = Augmented(data["train"], aug, cfg.train.seed, bundle)
        return None, train, data["val"], "not used: train.augment perturbs the inputs of every batch"
    if cfg.train.adversarial != "none":
        return None, data["train"], data["val"], "not used: train.adversarial attacks the whole model every batch"
    if distributed.world_size() > 1 and cfg.train.distributed == "fsdp":
        return None, data["train"], data["val"], "not used: FSDP shards the whole model over the processes"
    if cfg.train.feature_cache == "off":
        return None, data["train"], data["val"], "off (train.feature_cache=off)"
    split, why = cache.plan(bundle)
    if split is None:
        return None, data["train"], data["val"], f"not used: {why}"
    wrong = cache.verify(bundle.model, split, data["train"])
    if wrong:
        return None, data["train"], data["val"], f"not used: {wrong}"
    autocast, storage = cache.precision(cfg.train, hw)
    big = cache.too_big(bundle.model, split, len(data["train"]) + len(data["val"]), storage)
    if big:
        return None, data["train"], data["val"], f"not used: {big}"
    started = time.perf_counter()
    with ui.CountProgress("caching frozen features", len(data["train"]) + len(data["val"]), quiet) as bar:
        digest = cache.weights_digest(bundle.model)
        kw = {"progress": bar, "digest": digest, "storage": storage, "autocast": autocast}
        train_ds, r1 = cache.build(bundle, split, data["train"], cfg.train.eval_batch_size, **kw)
        val_ds, r2 = cache.build(bundle, split, data["val"], cfg.train.eval_batch_size, **kw)
    how = "reused from" if r1 and r2 else f"computed in {time.perf_counter() - started:.1f}s into"
    stored = "fp16" if train_ds.data.dtype.name == "float16" else "fp32"
    if storage == "fp16" and stored == "fp32":
        stored = "fp32: values beyond fp16's range"
    return (cache.CachedForward(bundle.model, split), train_ds, val_ds,
            f"{why} ({how} {cache.cache_dir()}, stored as {stored})")


def _thresholds_chosen(task: Any) -> bool:
    """Whether the run's decision thresholds were chosen on its validation rows (task.thresholds=auto)."""
    return task.supports("thresholds") and isinstance(task.threshold, list)


def _evaluate_run(run: OpenRun, ds: Any, baseline: bool, quiet: bool, source: Any, train_ds: Any = None,
                  val_ds: Any = None, precision: str | None = None, split_column: str | None = None) -> dict:
    """The run's model scored on ``ds`` in the precision it predicts in (``precision``, default the run's
    train.precision: ``hardware.inference_autocast``), so that eval.json says what fmtune predict gives.
    ``split_column``: ``source``'s column that marked the rows of ``ds`` test."""
    cfg, task = run.config, run.task
    dtype = hardware.inference_autocast(precision or cfg.train.precision, model_device(run.bundle.model).type)
    with ui.CountProgress("evaluate", len(ds), quiet) as bar:
        logits, targets = infer(run.bundle.model, ds, cfg.train.eval_batch_size, progress=bar, autocast_dtype=dtype)
    # (scoring can take a while: a segmenter's logits resized to every mask of a large test set)
    with contextlib.nullcontext() if quiet else ui.console.status(f"scoring {_rows(ds)} test examples"):
        result: dict[str, Any] = {"test": task.metrics(logits, targets), "n_test": _rows(ds), "data": str(source),
                                  "precision": hardware.precision_name(dtype)}
        if split_column:
            result["data_rows"] = f"the rows its {split_column!r} column marks test"
        result["test"].pop("loss", None)
        report = task.text_report(logits, targets)
        (run.dir / "classification_report.txt").write_text(report)
        extra = task.report_files(logits, targets, run.dir, run.dir.name)  # plots, and what eval.json adds
        png = run.dir / extra.pop("confusion_matrix") if "confusion_matrix" in extra else None
        result.update(extra)
        result["mistakes"] = task.mistakes(logits, targets, ds, run.bundle, run.dir / "mistakes.png")
    if baseline:
        if train_ds is None:
            frames = read_frames(cfg.data, cfg.task.type, cfg.train.seed)
            train_ds = make_dataset(frames.train, run.bundle, task, cfg.data)[0]
            if _thresholds_chosen(task) and not frames.val_is_train:
                val_ds = make_dataset(frames.val, run.bundle, task, cfg.data)[0]
        pre = build.create(dataclasses.replace(cfg.model, init="pretrained"), task)  # the pretrained backbone
        pre.model.to(model_device(run.bundle.model))
        # decision thresholds chosen on validation for the model: the probe's are chosen on the same rows
        sets = {"test": ds, **({"val": val_ds} if val_ds is not None and _thresholds_chosen(task) else {})}
        with ui.CountProgress("baseline (frozen features)", sum(map(len, (train_ds, *sets.values()))), quiet) as bar:
            outputs = evaluation.probe_outputs(pre.model, task, train_ds, sets, cfg.train.eval_batch_size,
                                               cfg.train.seed, progress=bar, autocast_dtype=dtype)
        judge, method = task, task.baseline_method
        if "val" in outputs:
            judge = copy.copy(task)
            judge.threshold = cfg.task.threshold
            if judge.choose_thresholds(*outputs["val"], resolve_metric(task, cfg.train)) is not None:
                method += "; its decision thresholds chosen on the validation rows, as the fine-tuned model's"
        result["baseline"] = {k: v for k, v in judge.metrics(*outputs["test"]).items() if k != "loss"}
        result["baseline_method"] = method
    write_json(run.dir / EVAL_FILE, result)
    if not quiet:
        rows = f": {result['data_rows']}" if split_column else ""
        ui.console.print(f"\n[bold]test[/] ({_rows(ds)} examples, {source}{rows})\n{report}")
        if png:
            ui.console.print(f"confusion matrix: {png}")
        print_comparison(result)
        ui.console.print(f"eval: {run.dir / EVAL_FILE}")
    return result


def print_comparison(result: dict[str, Any]) -> None:
    keys = [k for k in result["test"] if k != "loss"]
    rows = [["fine-tuned", *[result["test"][k] for k in keys]]]
    if "baseline" in result:
        rows.insert(0, [result.get("baseline_label", "pretrained baseline (linear probe)"),
                        *[result["baseline"].get(k, float("nan")) for k in keys]])
    ui.console.print(ui.table("test metrics", ["model", *keys], rows))


def evaluate(run: str | Path, data: str | Path | None = None, *, baseline: bool = False,
             quiet: bool = False, precision: str | None = None) -> dict[str, Any]:
    """Score a trained run on ``data`` (default: its configured test file); writes eval.json. ``precision``: auto,
    fp32 or bf16 (default: the run's train.precision; auto is bf16 on a CPU with AMX, as fmtune predict)."""
    opened = open_run(run)
    cfg = opened.config
    source = data or cfg.data.test
    if source is None:
        raise DataError(f"{run}: no test data configured; pass --data FILE")
    source = held_out_test(Path(source)) or source  # a saved DatasetDict's or a folder of splits' test split
    if opened.task.level == "lm":  # a model that generates: scored on its answers (fmtune.generation)
        from fmtune import generation

        return generation.evaluate(opened, source, baseline, quiet)
    df = read_data(Path(source), opened.task, cfg.data)
    data_cfg = columns_of(df, cfg.data, opened.task, opened.bundle.kind)  # (a table of another layout than training's)
    df = opened.task.without_unlabelled(df, data_cfg)
    ds, _ = make_dataset(df, opened.bundle, opened.task, data_cfg, allow_unknown=cfg.data.unknown_labels == "unknown")
    opened.bundle.model.to(hardware.choose(cfg.train.device, "fp32", cfg.train.num_threads).device)
    return _evaluate_run(opened, ds, baseline, quiet, source, precision=precision,
                         split_column=df.attrs.get("split_column"))


PREDICT_CHUNK_ROWS = 1024


def _predict_chunk(pred: Any, df: pd.DataFrame, problems: dict[int, str], strict: bool,
                   data_cfg: Any = None) -> pd.DataFrame:
    """Prediction columns for one chunk of input rows; a row that cannot be predicted gets an
    ``error`` (or, with ``strict``, stops everything with a DataError naming it). ``data_cfg``: how the file's rows
    are read (default: as the run's data.*)."""
    task, data_cfg = pred.task, data_cfg or pred.config.data
    if pred.kind == "text":
        df = tabular.render(df, data_cfg)  # a tabular run reads its rows written out as text
    else:
        df = media_templates(df, data_cfg)  # (file paths built from other columns: data.image_column '{id}.jpg')
    column, what, key = input_column(pred.kind, data_cfg)
    column = task.input_column(df, column)
    if column not in df.columns and task.supports("usual_columns"):  # (a file of another layout than training's)
        column = usual_input(df, pred.kind) or column
    require_column(df, column, what, key)
    pair = pred.pair_column if pred.kind == "text" else None
    if pair:
        require_column(df, pair, "second text", "data.text_pair_column")
        seconds = df[pair].tolist()
    base = table_base(df)
    errors: list[str | None] = [None] * len(df)
    ok, items = [], []
    for i, value in enumerate(df[column].tolist()):
        if i in problems:  # the reader could not make a row of this line
            if strict:
                raise DataError(problems[i])
            errors[i] = problems[i]
            continue
        where = row_label(df, i)
        try:
            if pair:
                items.append(pred.check_text((value, seconds[i]), f"{where}: columns {column!r}, {pair!r}"))
            elif pred.kind == "text":
                items.append(pred.check_text(value, f"{where}: column {column!r}"))
            else:  # a path, or an image / clip embedded in the table (a Hugging Face Parquet)
                source, _ = media_cell(value, base)
                if source is None:
                    raise DataError(f"{where}: column {column!r} is empty")
                items.append(pred.decode(source, where))
        except DataError as e:
            if strict:
                raise
            errors[i] = str(e)
            continue
        ok.append(i)
    results: list[dict[str, Any]] = [{} for _ in range(len(df))]
    if ok:
        records = pred.predict_items(items)
        if pred.thresholds is not None:
            from fmtune import fairness

            fairness.require_group_columns(pred.thresholds, df, pred.run_dir)
            unseen = fairness.threshold_records(pred.thresholds, records, df.iloc[ok], items)
            if unseen:
                ui.console.print("[yellow]warning:[/] " + fairness.no_rule_warning(unseen))
        for i, r in zip(ok, records):
            results[i] = task.flatten(r)
    columns = task.prediction_columns()
    out = pd.DataFrame(results, columns=columns)
    # an input column of the same name (a `label` column of a labelled file) is kept as it is
    out.columns = [f"predicted_{c}" if c in df.columns else c for c in out.columns]
    out["error"] = errors
    return pd.concat([df.reset_index(drop=True), out], axis=1)


def _plain_json(value: Any) -> Any:
    """numpy arrays and numbers (cells read from Parquet, nested in lists and dicts) as JSON values."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _rows_text(df: pd.DataFrame, header: bool, jsonl: bool = False) -> str:
    """Predictions as text: JSON lines, or CSV rows in which a list or mapping (the entities of a
    sentence) is written as JSON."""
    media = [c for c in df.columns if df[c].map(lambda v: embedded(v) is not None).any()]
    if media:  # an image / clip embedded in the input table is written as its name, not its bytes
        df = df.assign(**{c: [media_cell(v, Path("."))[1] if embedded(v) is not None else v for v in df[c]]
                          for c in media})
    if jsonl:
        return df.to_json(orient="records", lines=True, force_ascii=False)  # a newline after every object
    kinds = (list, dict, np.ndarray)  # an array: a list cell read from Parquet
    nested = [c for c in df.columns if df[c].map(lambda v: isinstance(v, kinds)).any()]
    if nested:
        df = df.assign(**{c: df[c].map(lambda v: json.dumps(v, ensure_ascii=False, default=_plain_json)
                                       if isinstance(v, kinds) else v) for c in nested})
    return df.to_csv(header=header, index=False)


def _write_rows(df: pd.DataFrame, dest: Any, header: bool, jsonl: bool = False) -> None:
    """Append predictions to ``dest``: a path, or a stream (stdout)."""
    text = _rows_text(df, header, jsonl)
    if hasattr(dest, "write"):
        dest.write(text)
    else:
        with open(dest, "a", encoding="utf-8", newline="") as fh:
            fh.write(text)


def predict(run: str | Path, inputs: str | Path, output: str | Path | None = None, *, quiet: bool = False,
            batch_size: int | None = None, strict: bool = False, chunk_rows: int = PREDICT_CHUNK_ROWS,
            save_images: str | Path | None = None, media_root: str | Path | None = None,
            precision: str | None = None) -> pd.DataFrame | dict[str, Any]:
    """Predict every row of ``inputs`` (CSV/TSV/JSONL/Parquet, a .txt file of one text per line, a
    CoNLL file of one word per line (each sentence a row: text, line, and the file's tags if it has
    them), an image or audio folder or file).

    Columns added to the input's: what the task predicts (``fmtune tasks``: label, score and
    prob_<label> for classification; labels for multi-label; prediction for regression; entities
    and tags for ner), each prefixed ``predicted_`` where the input already has a column of that
    name, and ``error``: why a row got no prediction (empty text, unreadable image, malformed
    line). With ``strict`` the first bad row stops it instead. ``output`` ending in ``.jsonl``
    is written as JSON lines (entities as lists), else as CSV (lists as JSON text).

    The input is read and predicted in chunks of ``chunk_rows``. With ``output`` the CSV is
    written chunk by chunk (constant memory, however large the input; the file appears complete
    or not at all) and a summary is returned; ``output="-"`` streams the CSV to stdout. Without
    it, the predictions are returned as a DataFrame.

    ``save_images``: a folder for what the predictions look like (segmentation: each mask as a PNG of
    class indices and an overlay on its image, named in ``mask_file`` instead of ``mask_png``;
    detection: each image with its boxes drawn, named in ``image_file``).

    ``media_root``: the folder relative image / audio paths of a table are read from (default: the run's
    ``data.media_root``, else the table's own folder).

    ``precision``: what the model predicts in, auto / fp32 / bf16 (default: the run's train.precision; auto is
    bf16 on a CPU with AMX, else fp32).
    """
    from fmtune.predictor import Predictor

    inputs = paths.check(inputs, "input")
    if output is not None and str(output) != "-":
        paths.check(output, "output-file", "-o")
    pred = Predictor(run, batch_size, precision=precision)
    inputs = held_out_test(inputs) or inputs  # a saved DatasetDict's or a folder of splits' test split
    inputs = saved_dataset(inputs) or pred.task.predict_source(inputs)  # (a dataset saved to disk: its Parquet)
    if save_images is not None:
        pred.task.require("save_images", "--save-images")
        save_images = paths.check(save_images, "output-dir", "--save-images")
        save_images.mkdir(parents=True, exist_ok=True)
    written: set[str] = set()  # names of the files --save-images wrote, over every chunk
    rows = bad = 0
    first_error: str | None = None
    frames: list[pd.DataFrame] = []
    to_stdout = str(output) == "-"
    target = Path(output) if output is not None and not to_stdout else None
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}") if target is not None else None
    media = pred.kind if pred.kind in ("audio", "text") else "image"  # what a folder (or a lone file) is read for
    enc, text = pred.config.data.encoding, pred.config.data.text_column
    source = unpacked(inputs) or inputs  # (train.csv.gz: the table inside)
    if source.is_file() and (source.suffix.lower() in CONLL_PREDICT_SUFFIXES or (
            pred.task.accepts_word_lists and is_word_table(source, enc))):  # (sentences of a word a line / row)
        chunks, total = sentence_chunks(source, enc, chunk_rows, text), None  # (sentences: not counted up front)
    else:  # (a compressed table itself: its rows' relative media paths are read beside it)
        chunks = iter_chunks(inputs, enc, chunk_rows, input_column(media, pred.config.data)[0], text, media)
        total = count_rows(source, media)
    try:
        with ui.CountProgress("predict", total or 0, quiet) as bar:
            root, data_cfg = media_root or pred.config.data.media_root, None
            for df, problems in chunks:
                if root and inputs.is_file():
                    df.attrs["media_root"] = str(Path(root).expanduser())
                if data_cfg is None and not media_root and inputs.is_file():  # (the first chunk: where its files are)
                    data_cfg = media_elsewhere(df, pred.config.data, pred.kind)
                if data_cfg is not None and data_cfg.media_root != pred.config.data.media_root:
                    df.attrs["media_root"] = data_cfg.media_root
                out = _predict_chunk(pred, df, problems, strict, data_cfg)
                if save_images is not None:
                    column = pred.task.input_column(df, input_column(media, pred.config.data)[0])
                    out = pred.task.write_files(out, column, table_base(df), Path(save_images), written)
                rows += len(out)
                errs = out["error"].dropna()
                bad += len(errs)
                first_error = first_error or (errs.iloc[0] if len(errs) else None)
                if tmp is not None:
                    _write_rows(out, tmp, header=rows == len(out), jsonl=target.suffix.lower() == ".jsonl")
                elif to_stdout:
                    _write_rows(out, sys.stdout, header=rows == len(out))
                    sys.stdout.flush()
                else:
                    frames.append(out)
                bar(len(df))
        if tmp is not None:
            if rows == 0:
                raise DataError(f"{inputs}: no rows to predict")
            os.replace(tmp, target)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    if bad:
        warnings.warn(f"{inputs}: {bad} of {rows} row(s) got no prediction; the error column says why"
                      + (f" (first: {first_error})" if first_error else ""), UserWarning, stacklevel=2)
    if to_stdout:
        return {"rows": rows, "errors": bad, "output": "-"}
    if target is not None:
        if not quiet:
            ui.console.print(f"wrote {rows} predictions to {target}" + (f" ({bad} rows with an error)" if bad else ""))
        return {"rows": rows, "errors": bad, "output": str(target)}
    if not frames:
        raise DataError(f"{inputs}: no rows to predict")
    return pd.concat(frames, ignore_index=True)


def predict_files(run: str | Path, files: list[str | Path], output: str | Path | None = None,
                  **kw: Any) -> pd.DataFrame | dict[str, Any]:
    """``predict`` on several image or audio files given one by one (``fmtune predict RUN clips/*.wav``), in that
    order: one row each, its path in the run's input column. Anything else among them (a table, a folder, stdin) is
    a ConfigError: those are predicted one at a time."""
    from fmtune.data.readers import AUDIO_SUFFIXES, IMAGE_SUFFIXES

    others = [str(f) for f in files if str(f) == "-" or Path(f).suffix.lower() not in IMAGE_SUFFIXES | AUDIO_SUFFIXES
              or not Path(f).is_file()]
    if others:
        raise ConfigError(f"one input at a time: {', '.join(others[:3])} among {len(files)} inputs (several image "
                          "or audio files can be given together; a table, a folder or - alone)")
    kinds = {"image" if Path(f).suffix.lower() in IMAGE_SUFFIXES else "audio" for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"images and audio files together ({', '.join(map(str, files[:3]))} ...): a run reads one "
                          "kind")
    kind = kinds.pop()
    column = input_column(kind, read_config(paths.check(run, "run")).data)[0]
    with tempfile.TemporaryDirectory(prefix="fmtune-predict-") as d:
        table = Path(d) / "inputs.csv"
        pd.DataFrame({column: [str(Path(f).resolve()) for f in files]}).to_csv(table, index=False)
        return predict(run, table, output, **kw)


def predict_texts(run: str | Path, texts: list[str], output: str | Path | None = None, *,
                  batch_size: int | None = None, quiet: bool = False, precision: str | None = None) -> pd.DataFrame:
    """Predict texts given directly (``fmtune predict RUN "a text"``; image runs: image paths):
    a DataFrame of the inputs and the task's prediction columns, also written to ``output``."""
    from fmtune.predictor import Predictor

    if output is not None:
        paths.check(output, "output-file", "-o")
    pred = Predictor(run, batch_size, precision=precision)
    column = input_column(pred.kind, pred.config.data)[0]
    if pred.kind != "text":
        missing = [t for t in texts if not Path(t).is_file()]
        if missing:
            raise DataError(f"{missing[0]}: no such {pred.kind} file (this run reads {pred.kind})")
    df = pd.DataFrame({column: texts})
    df.attrs["source"] = "the command line"
    out = _predict_chunk(pred, df, {}, strict=True)
    if output is not None:
        target = Path(output)
        write_text_atomic(target, _rows_text(out, header=True, jsonl=target.suffix.lower() == ".jsonl"))
        if not quiet:
            ui.console.print(f"wrote {len(out)} predictions to {target}")
    return out


def predict_stdin(run: str | Path, stream: Any, output: str | Path = "-", *, fmt: str = "auto",
                  **kw: Any) -> dict[str, Any] | pd.DataFrame:
    """``fmtune predict RUN -``: stdin (one text per line, CSV/TSV with a header, or JSONL; ``fmt``
    auto tells them apart by the first line) predicted like a file of that kind. It is spooled to
    a temporary file first (constant memory), then read in chunks as a file is."""
    import shutil
    import tempfile

    from fmtune.run import read_config

    cfg = read_config(Path(run))
    head = stream.read(1 << 16)
    if fmt == "auto":
        first = next((ln for ln in head.splitlines() if ln.strip()), "")
        fields = next(csv.reader([first], delimiter="\t" if "\t" in first else ","), [])
        names = {cfg.data.text_column, cfg.data.image_column}
        fmt = ("jsonl" if first.lstrip().startswith("{") else
               ("tsv" if "\t" in first else "csv") if names & {f.strip() for f in fields} else "lines")
    suffix = {"lines": ".txt", "csv": ".csv", "tsv": ".tsv", "jsonl": ".jsonl"}[fmt]
    folder = Path(tempfile.mkdtemp(prefix="fmtune-stdin-"))
    spooled = folder / f"stdin{suffix}"
    try:
        with spooled.open("w", encoding=cfg.data.encoding) as fh:
            fh.write(head)
            shutil.copyfileobj(stream, fh)
        if spooled.stat().st_size == 0:
            raise DataError("stdin: nothing to predict (no input was piped in)")
        return predict(run, spooled, output, **kw)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def models() -> list[dict[str, str]]:
    from fmtune.zoo.models import MODELS

    return [{"name": n, "kind": MODELS.get(n).kind, "package": MODELS.get(n).package,
             "description": MODELS.get(n).description} for n in MODELS.names()]


def datasets() -> list[dict[str, str]]:
    from fmtune.zoo.datasets import DATASETS

    return [{"name": n, "kind": DATASETS.get(n).kind, "package": DATASETS.get(n).package,
             "description": DATASETS.get(n).description} for n in DATASETS.names()]


def report(run: str | Path, quiet: bool = False) -> Path:
    """Write (again) ``RUN/report.html`` from the run directory."""
    from fmtune.report import write_report

    path = write_report(run)
    if not quiet:
        ui.console.print(f"report: {path}")
    return path


def compare(runs: list[str | Path], output: str | Path = "compare.html", quiet: bool = False) -> Path:
    """Compare runs side by side: prints a table, writes ``output`` (HTML)."""
    from fmtune.report import compare as _compare

    path, header, rows = _compare(runs, output)
    if not quiet:
        def short(i: int, v: Any) -> str:
            if i == 1:
                return Path(str(v)).name  # a model path: its folder name
            if isinstance(v, int):
                return f"{v:,}"
            if isinstance(v, float):
                return f"{v:.1f}" if header[i] in ("train s", "epochs") else f"{v:.4f}"
            return str(v)

        ui.console.print(ui.table("runs", header, [[short(i, v) for i, v in enumerate(r)] for r in rows]))
        ui.console.print(f"compare: {path}")
    return path


def read_eval(run: str | Path) -> dict[str, Any]:
    return json.loads((Path(run) / EVAL_FILE).read_text())
