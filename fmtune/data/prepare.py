"""From a data config to train / validation / test datasets for a task and a model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from fmtune.data.dataset import image_dataset, text_dataset
from fmtune.data.readers import read_any, require_column
from fmtune.errors import ConfigError, DataError
from fmtune.tasks import TASKS, Task


@dataclass
class Frames:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame | None
    val_from_train: bool


def _stratify_on(df: pd.DataFrame, column: str, task_type: str) -> pd.Series | None:
    if task_type != "classification" or column not in df.columns:
        return None
    y = df[column].astype(str)
    counts = y.value_counts()
    return y if counts.min() >= 2 else None


def _subset(df: pd.DataFrame, n: int, column: str, task_type: str, seed: int) -> pd.DataFrame:
    if n >= len(df):
        return df
    strat = _stratify_on(df, column, task_type)
    try:
        part, _ = train_test_split(df, train_size=n, random_state=seed, stratify=strat)
    except ValueError:  # too few rows of some class for a stratified draw
        part, _ = train_test_split(df, train_size=n, random_state=seed)
    return _keep_source(part, df)


def _keep_source(part: pd.DataFrame, whole: pd.DataFrame) -> pd.DataFrame:
    # row numbers in messages refer to the file, so keep the original positions in the index
    part = part.sort_index()
    part.attrs = dict(whole.attrs)
    return part


def read_frames(data_cfg: Any, task_type: str, seed: int) -> Frames:
    """Read the files named in the config; split validation off train when none is given."""
    if not data_cfg.train:
        raise ConfigError("data.train: no training data given (--data FILE or data.train in the config)")
    train = read_any(data_cfg.train, data_cfg.encoding)
    train = train.reset_index(drop=True)
    require_column(train, data_cfg.label_column, "label", "data.label_column")
    if data_cfg.max_train_samples:
        train = _subset(train, data_cfg.max_train_samples, data_cfg.label_column, task_type, seed)
    if data_cfg.val:
        val, from_train = read_any(data_cfg.val, data_cfg.encoding).reset_index(drop=True), False
    else:
        if len(train) < 4:
            raise DataError(f"{data_cfg.train}: {len(train)} rows is too few to split off a validation set; "
                            "give --val FILE")
        strat = _stratify_on(train, data_cfg.label_column, task_type)
        n_val = max(1, round(len(train) * data_cfg.val_fraction))
        if strat is not None:
            n_val = max(n_val, strat.nunique())
        try:
            tr, va = train_test_split(train, test_size=n_val, random_state=seed, stratify=strat)
        except ValueError:
            tr, va = train_test_split(train, test_size=n_val, random_state=seed)
        train, val, from_train = _keep_source(tr, train), _keep_source(va, train), True
    test = read_any(data_cfg.test, data_cfg.encoding).reset_index(drop=True) if data_cfg.test else None
    return Frames(train, val, test, from_train)


def make_task(task_cfg: Any, data_cfg: Any, train: pd.DataFrame) -> Task:
    cls = TASKS.get(task_cfg.type, "task.type")
    kw: dict[str, Any] = {"column": data_cfg.label_column, "class_weights": task_cfg.class_weights}
    if task_cfg.type == "multilabel":
        kw.update(separator=data_cfg.label_separator, threshold=task_cfg.threshold)
    return cls.from_train(train[data_cfg.label_column], train, **kw)


def make_dataset(df: pd.DataFrame, bundle: Any, task: Task | None, data_cfg: Any, with_targets: bool = True,
                 allow_unknown: bool = False) -> tuple[torch.utils.data.Dataset, np.ndarray]:
    """Dataset of one split. Returns it with the row positions kept (images may drop bad files)."""
    targets = None
    if with_targets:
        require_column(df, data_cfg.label_column, "label", "data.label_column")
        targets = task.encode(df[data_cfg.label_column], df, data_cfg.label_column, allow_unknown)
    if bundle.kind == "text":
        ds = text_dataset(df, data_cfg.text_column, bundle.tokenizer, bundle.max_length, targets)
        return ds, np.arange(len(df))
    return image_dataset(df, data_cfg.image_column, bundle.image, targets, data_cfg.max_bad_fraction)
