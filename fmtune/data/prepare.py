"""From a data config to train / validation / test datasets for a task and a model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import train_test_split

from fmtune.data import tabular
from fmtune.data.readers import (
    SPLIT_COLUMNS,
    USUAL_TEXT,
    dataset_dict_splits,
    free_text_columns,
    label_named_columns,
    label_names_beside,
    media_folder,
    media_path_columns,
    media_template,
    media_templates,
    repeating_columns,
    require_column,
    require_text_column,
    rows_of_split,
    split_column,
    split_files,
    split_folders,
    split_lists,
    split_roles,
    table_base,
    usual_columns,
    usual_pair,
)
from fmtune.errors import ConfigError, DataError
from fmtune.tasks import Task, task_class


@dataclass
class Frames:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame | None
    val_from_train: bool
    val_is_train: bool = False  # few labels: no split was made; validation reads the training rows
    fewest: int | None = None  # training rows of the rarest label (None: no labels to count)
    typical: int | None = None  # training rows of the median label: what the split and --strategy auto go by
    settled: dict[str, Any] | None = None  # data.* options read from the training table (settle_columns)


def label_counts(labels: list[list[str]] | None) -> pd.Series | None:
    """Rows per label, from each row's labels (None: the task has no labels to count)."""
    if not labels:
        return None
    return pd.Series([lab for row in labels for lab in row], dtype=object).value_counts()


def _stratify_on(df: pd.DataFrame, column: str, task: type[Task]) -> pd.Series | None:
    y = task.stratify_values(df, column)
    if y is None:
        return None
    counts = y.value_counts()
    return y if counts.min() >= 2 else None


def _subset(df: pd.DataFrame, n: int, column: str, task: type[Task], seed: int) -> pd.DataFrame:
    if n >= len(df):
        return df
    strat = _stratify_on(df, column, task)
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


INPUT_COLUMNS = {"text": ("text_column", "text"), "image": ("image_column", "image path"),
                 "audio": ("audio_column", "audio path")}


def input_column(kind: str, data_cfg: Any) -> tuple[str, str, str]:
    """(column, what it holds, its config key) of the inputs a model of ``kind`` reads."""
    attr, what = INPUT_COLUMNS[kind]
    return getattr(data_cfg, attr), what, f"data.{attr}"


def _require_input(df: pd.DataFrame, data_cfg: Any, task: type[Task]) -> None:
    """A table must hold the text column or the image column (whichever the model reads); an
    audio task's, the audio column."""
    if task.modality == "audio":
        require_column(df, *input_column("audio", data_cfg))
        return
    if data_cfg.text_column not in df.columns and data_cfg.image_column not in df.columns:
        require_text_column(df, data_cfg.text_column, getattr(data_cfg, "text_pair_column", None))  # (or images)


def _unset(data_cfg: Any, attr: str, df: pd.DataFrame) -> bool:
    """data.``attr`` is left at its default and names no column of ``df``."""
    from fmtune.config import DataConfig

    value = getattr(data_cfg, attr)
    return value == DataConfig.__dataclass_fields__[attr].default and value not in df.columns


def settle_columns(df: pd.DataFrame, data_cfg: Any, task: type[Task]) -> dict[str, Any]:
    """The data.* options a training table answers itself. For a task that reads tables (capability
    ``usual_columns``): a text / image / audio / label column left at its default name that the table lacks is read
    from the one column well-known datasets keep it in (``readers.USUAL_TEXT``, the task's ``usual_labels``; images
    and audio: the one column of such file paths), where the table holds exactly one (more: the error lists them);
    class ids named by a column beside them (label_text: ``label_names_beside``) are read as those names
    (data.label_names). For every task: relative media paths (``Task.media_column``) not beside the table but under
    one folder near it (ESC-50's meta/ + audio/, Common Voice's clips/) are read from that folder (data.media_root).
    Set in ``data_cfg`` (config.yaml keeps them, so evaluate, predict and serve read the same) and returned,
    {option: value}, to be said before training."""
    settled: dict[str, Any] = {}
    media = "audio" if task.modality == "audio" else "image"
    if task.supports("usual_columns"):
        settled.update(_usual_columns(df, data_cfg, task, media))
    if data_cfg.media_root is None and "media_root" not in settled:
        attr = f"{media}_column"
        column = settled.get(attr, task.media_column(data_cfg))
        root = _media_root(df, column)
        if root is not None:
            settled["media_root"] = root
        elif column == settled.get(attr, getattr(data_cfg, attr)) and _missing_media(df, column):  # (UrbanSound8K's
            # files named by a value, in folders named from other columns; not a reader's own column: speech's)
            settled.update(_found_template(df, media, column))
    for key, value in settled.items():
        setattr(data_cfg, key, value)
    if "media_root" in settled:
        df.attrs["media_root"] = settled["media_root"]
    column = task.media_column(data_cfg)
    if "{" in column and column not in df.columns:
        media_templates(df, data_cfg)  # (the column the template writes, of the rows read before it was found)
    return settled


def _found_template(df: pd.DataFrame, media: str, column: str | None = None) -> dict[str, str]:
    """``readers.media_template`` as the data.* options it sets: {"image_column" / "audio_column": the template,
    "media_root": the folder it is relative to, where not the table's}; {} where none is found."""
    found = media_template(df, media, column)
    if found is None:
        return {}
    out = {f"{media}_column": found[0]}
    if found[1].resolve() != table_base(df).resolve():
        out["media_root"] = str(found[1].resolve())
    return out


def _missing_media(df: pd.DataFrame, column: str) -> bool:
    """``column`` holds relative file names of which the first is not under the table's folder."""
    if column not in df.columns or not Path(df.attrs.get("source", "")).is_file():
        return False
    first = next((v.strip() for v in df[column].head(5) if isinstance(v, str) and v.strip()), None)
    return first is not None and not Path(first).is_absolute() and not (table_base(df) / first).exists()


def _usual_columns(df: pd.DataFrame, data_cfg: Any, task: type[Task], media: str) -> dict[str, Any]:
    """``settle_columns``' columns (and class names) of a task that reads tables."""
    settled: dict[str, Any] = {}
    attr = f"{media}_column"
    if (media == "audio" or data_cfg.text_column not in df.columns) and _unset(data_cfg, attr, df):
        found = usual_input(df, media)  # (a text table's column of pictures is not its input)
        if found:
            settled[attr] = found
    tabular_text = data_cfg.text_columns or data_cfg.text_template  # (the label is named, not guessed: never text)
    if media == "image" and attr not in settled and data_cfg.image_column not in df.columns and not tabular_text \
            and _unset(data_cfg, "text_column", df):
        pair = usual_pair(df) if data_cfg.text_pair_column is None else None
        found = None if pair else usual_input(df, "text")
        if pair:  # (before the one text: QNLI's question and sentence are a pair, not a sentence)
            settled["text_column"], settled["text_pair_column"] = pair
        elif found:
            settled["text_column"] = found
    if attr not in settled and "text_column" not in settled and _unset(data_cfg, attr, df) and not tabular_text \
            and (media == "audio" or data_cfg.text_column not in df.columns):  # files named by a value (Kaggle's id)
        settled.update(_found_template(df, media))
        if media == "image" and attr not in settled and "text_pair_column" not in settled \
                and _unset(data_cfg, "text_column", df):  # (no files: its columns of free text are its text)
            settled.update(_free_text(df, data_cfg))
    if not (data_cfg.label_columns or tabular_text) and _unset(data_cfg, "label_column", df):
        inputs = {settled.get(a, getattr(data_cfg, a)) for a in ("text_column", "text_pair_column", attr)}
        inputs |= set(tabular.template_columns(settled["text_template"]) if "text_template" in settled
                      else tabular.split_names(settled.get("text_columns")))  # (its free text's columns)
        found = usual_label(df, task, inputs)
        columns = None if found else task.usual_label_columns(df, inputs)
        if found:
            settled["label_column"] = found
        elif columns:  # (multi-label: one 0/1 column a label)
            settled["label_columns"] = ",".join(columns)
    if task.hf_problem_type == "single_label_classification" and data_cfg.label_names is None:
        names = label_names_beside(df, settled.get("label_column", data_cfg.label_column))
        if names:
            settled["label_names"] = names
    return settled


def usual_label(df: pd.DataFrame, task: type[Task] | Task, inputs: set[str], guess: bool = True) -> str | None:
    """The one column of ``df`` that is not one of ``inputs`` named as the task's labels go (``Task.usual_labels``; of
    two that name one label, ids and names, ESC-50's target and category: the names);
    else the one named for a label in more words (``readers.label_named_columns``: airline_sentiment, "Class
    Index"; for classes also a rating's name: Amazon's Score, Yelp's stars) that holds labels (classes: values that
    repeat; regression: numbers); else, for single-label classes and where ``guess`` (a training table, not one
    evaluated: its labels are the run's), the one column of values that repeat (the SMS Spam Collection's v1, Spooky
    Author's author, APTOS' diagnosis); else None (none, or more than one at the first step that finds any)."""
    found = [c for c in usual_columns(df, task.usual_labels) if c not in inputs]
    classes = task.hf_problem_type == "single_label_classification"
    if classes and len(found) == 2 and _one_label_named_twice(df, *found):
        found = [c for c in found if not df[c].astype(str).str.strip().str.fullmatch(r"-?\d+").all()]
    if found:
        return found[0] if len(found) == 1 else None
    inputs = inputs | set(usual_columns(df, SPLIT_COLUMNS))  # (train / test: the split, not a label)
    repeating = set(repeating_columns(df, inputs)) if classes else set()
    if classes:
        names = set(task.usual_labels) | {"score", "rating", "stars"}
        named = [c for c in usual_columns(df, ("score", "rating", "stars")) + label_named_columns(df, names, inputs)
                 if c in repeating]
    elif task.hf_problem_type == "regression":
        named = [c for c in label_named_columns(df, set(task.usual_labels) - {"y"}, inputs)
                 if pd.to_numeric(df[c].head(1000), errors="coerce").notna().mean() >= 0.9]
    else:
        return None
    if named:
        return named[0] if len(set(named)) == 1 else None
    return next(iter(repeating)) if guess and len(repeating) == 1 else None


def _one_label_named_twice(df: pd.DataFrame, a: str, b: str) -> bool:
    """Columns ``a`` and ``b`` hold one label, one as class ids, the other as names, each id always with the same
    name (ESC-50's target and category): filled in every row, in one-to-one correspondence, one of whole numbers."""
    pairs = df[[a, b]].astype(str).apply(lambda s: s.str.strip())
    if df[[a, b]].isna().any().any() or pairs[a].str.fullmatch(r"-?\d+").all() == pairs[b].str.fullmatch(
            r"-?\d+").all():
        return False
    return len(pairs.drop_duplicates()) == pairs[a].nunique() == pairs[b].nunique()


def _free_text(df: pd.DataFrame, data_cfg: Any) -> dict[str, str]:
    """The data.* options that read a table's text from its columns of free text (``readers.free_text_columns``)
    where it has no text column of a usual name: {"text_column": the one}, {"text_template": "{Title}. {Description}"}
    for several (data.text_columns where a name cannot be a template's field); {} where none."""
    found = free_text_columns(df, {data_cfg.label_column})
    if len(found) == 1:
        return {"text_column": found[0]}
    if not found:
        return {}
    template = ". ".join("{" + c + "}" for c in found)
    try:
        tabular.template_columns(template)
    except ConfigError:
        return {"text_columns": ",".join(found)}
    return {"text_template": template}


def usual_input(df: pd.DataFrame, kind: str) -> str | None:
    """The one column of ``df`` holding inputs of ``kind`` (text: a usual name, ``readers.USUAL_TEXT``; image,
    audio: file paths of that kind), else None (none, or more than one)."""
    found = usual_columns(df, USUAL_TEXT) if kind == "text" else media_path_columns(df, kind)
    return found[0] if len(found) == 1 else None


def columns_of(df: pd.DataFrame, data_cfg: Any, task: type[Task] | Task, kind: str) -> Any:
    """``data_cfg`` for a labelled table of another layout than the run trained on (``fmtune evaluate``): an input
    column (``kind``: text, image, audio) or label column it names that the table lacks is read from the table's one
    column of that kind (``usual_input``; labels: the task's ``usual_labels``); files not where the run's template
    puts them, where ``media_elsewhere`` finds them."""
    import dataclasses

    data_cfg = media_elsewhere(df, data_cfg, kind)
    if not task.supports("usual_columns"):
        return data_cfg
    attr, changes = INPUT_COLUMNS[kind][0], {}
    if getattr(data_cfg, attr) not in df.columns:
        found = usual_input(df, kind)
        if found:
            changes[attr] = found
    if not data_cfg.label_columns and data_cfg.label_column not in df.columns:
        found = usual_label(df, task, {changes.get(attr, getattr(data_cfg, attr))}, guess=False)
        if found:
            changes["label_column"] = found
    return dataclasses.replace(data_cfg, **changes) if changes else data_cfg


def media_elsewhere(df: pd.DataFrame, data_cfg: Any, kind: str) -> Any:
    """``data_cfg`` for a table other than training's whose files are not where the run's template puts them
    (Kaggle's test.csv beside test_images/, the run trained on train.csv beside train_images/): the template
    ``readers.media_template`` finds for the column the run's names its files by, said in a warning, ``df`` given
    its column; else ``data_cfg``."""
    import dataclasses
    import string

    attr = f"{kind}_column"
    template = getattr(data_cfg, attr, None) if kind in ("image", "audio") else None
    if not template or "{" not in template:
        return data_cfg
    names = [k for _, k, _, _ in string.Formatter().parse(Path(template).name) if k]
    if len(names) != 1 or names[0] not in df.columns:
        return data_cfg
    try:
        head = media_templates(df.head(5).copy(), data_cfg)
        if head[template].notna().any() and not _missing_media(head, template):
            return data_cfg
    except DataError:  # (the template names a column the table lacks)
        pass
    found = media_template(df, kind, names[0])
    if found is None:
        return data_cfg
    out = dataclasses.replace(data_cfg, **{attr: found[0], "media_root": str(found[1].resolve())})
    warnings.warn(f"{df.attrs.get('source', 'the data')}: its files are not where data.{attr} {template!r} puts "
                  f"them; read as {found[0]!r} under {out.media_root}", UserWarning, stacklevel=3)
    df.attrs["media_root"] = out.media_root
    media_templates(df, out)
    return out


def columns_read_line(settled: dict[str, Any]) -> str:
    """``settle_columns``' choices as the line said before training."""
    said = [f"data.{k}={v}" if isinstance(v, str) else
            f"data.{k}={','.join(v[:5])}{' ...' if len(v) > 5 else ''} (from the column beside the ids)"
            for k, v in settled.items()]
    return f"read as the table holds them: {', '.join(said)} (--set another to choose)"


def _media_root(df: pd.DataFrame, column: str) -> str | None:
    """The folder the relative file paths of ``column`` are under where none of its first ones is beside the table
    (``readers.media_folder``), else None."""
    if column not in df.columns or not Path(df.attrs.get("source", "")).is_file():
        return None
    base = table_base(df)
    rel = [Path(v.strip()) for v in df[column].head(5) if isinstance(v, str) and v.strip()]
    rel = [p for p in rel if not p.is_absolute()]
    if not rel or any((base / p).exists() for p in rel):
        return None
    found = media_folder([base / p for p in rel], base)
    return str(found.resolve()) if found is not None else None


def read_data(path: Any, task: str | Task | type[Task], data_cfg: Any, split: str | None = "test") -> pd.DataFrame:
    """One data file (or folder) read the way ``task`` reads its data. Of a table whose column names each row's split
    (``readers.split_column``, data.split_column), its ``split`` rows (train, val; default test: what is evaluated of
    it), at their positions in the file; ``split=None``: every row, ``attrs["split_column"]`` naming the column."""
    cls = task_class(task) if isinstance(task, str) else task
    df = cls.read(path, data_cfg)
    column = split_column(df, getattr(data_cfg, "split_column", "none"))
    df = tabular.render(df, data_cfg, exclude=(column,) if column else ()).reset_index(drop=True)
    if column is None:
        return df
    df.attrs["split_column"] = column
    return rows_of_split(df, column, split) if split else df


def split_by_column(train: pd.DataFrame, data_cfg: Any) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """A training table read whole (``read_data(..., split=None)``) whose column names each row's split: its train
    rows, and {"val": rows, "test": rows} for the splits it marks that data.val / data.test do not name (those set to
    the table, so evaluation reads its test rows again; data.split_column set to the column); the rows of a split
    given as a file of its own are left out (never trained on). Said in a warning. A table without such a column:
    itself and {}."""
    column = train.attrs.get("split_column")
    if column is None:
        return train, {}
    roles = split_roles(train[column])
    counts = roles.value_counts()
    parts = {k: rows_of_split(train, column, k) for k in ("val", "test") if counts.get(k)}
    said, aside, known = [], [], data_cfg.split_column == column  # (known: a run's config read again, not said)
    for key, part in list(parts.items()):
        given = getattr(data_cfg, key)
        if given is None or str(given) == str(data_cfg.train):
            known = known and given is not None
            setattr(data_cfg, key, str(data_cfg.train))
            said.append(f"{len(part):,} {key}")
        else:
            aside.append(f"its {len(part):,} {key} rows are left out (data.{key} = {given})")
            del parts[key]
    data_cfg.split_column = column
    if not known:
        warnings.warn(f"{data_cfg.train}: its {column!r} column marks each row's split: {int(counts['train']):,} "
                      f"train{''.join(f', {s}' for s in said)} rows{'; ' if aside else ''}{'; '.join(aside)} "
                      f"(data.split_column={column}; --set data.split_column=none to read every row as training "
                      "data)", UserWarning, stacklevel=3)
    return rows_of_split(train, column, "train"), parts


def split_lists_unset(data_cfg: Any, task_type: str) -> dict[str, str]:
    """The split lists (``readers.SPLIT_LISTS``: Speech Commands' validation_list.txt and testing_list.txt) of a
    class folder given as training data, for a task that reads them, where data.val / data.test are unset:
    {"val": path, "test": path}. Training then validates and tests on the speakers the folder holds out. A
    DatasetDict saved to disk gives its splits the same way: {"train": its train split, "val", "test"}; and so do the
    splits a task reads from the training file itself (``Task.splits_of``: a YOLO dataset YAML's val and test), and a
    folder whose sub-folders are its splits (``readers.split_folders``: train/, val/, test/) or whose files are
    (``readers.split_files``: train.csv, dev.csv, test.csv; a Hugging Face dataset's Parquet files)."""
    train = Path(data_cfg.train) if data_cfg.train else None
    if train is not None and train.is_file():
        return {k: p for k, p in task_class(task_type).splits_of(train).items() if getattr(data_cfg, k) is None}
    if train is None or not train.is_dir():
        return {}
    # a DatasetDict saved to disk, or a folder of splits (sub-folders or files): its train split trains
    saved = dataset_dict_splits(train) or split_folders(train) or split_files(train)
    if saved:
        return {k: str(p) for k, p in saved.items() if k == "train" or getattr(data_cfg, k) is None}
    if not task_class(task_type).supports("split_lists"):
        return {}
    return {k: str(p) for k, p in split_lists(train).items() if getattr(data_cfg, k) is None}


def read_frames(data_cfg: Any, task_type: str, seed: int) -> Frames:
    """Read the files named in the config; split validation off train when none is given."""
    if not data_cfg.train:
        raise ConfigError("data.train: no training data given (--data FILE or data.train in the config)")
    task = task_class(task_type)
    train = read_data(data_cfg.train, task, data_cfg, split=None)
    settled = {**train.attrs.get("columns_read", {}), **settle_columns(train, data_cfg, task)}  # (a reader's own)
    if {"label_column", "label_names", "label_columns"} & set(settled):
        train = task.labelled(train, data_cfg)  # (read before the options were known: ids, 0/1 columns)
    if {"text_template", "text_columns"} & set(settled):  # (its columns of free text, written as its text)
        train = tabular.render(train, data_cfg, exclude=(train.attrs.get("split_column"),))
    train, parts = split_by_column(train, data_cfg)  # (settled first: its validation and test rows read the same)
    column = task.target_column(data_cfg)
    _require_input(train, data_cfg, task)  # the columns first: a missing one is the problem, whatever the size
    task.require_targets(train, data_cfg)
    train = task.without_unlabelled(train, data_cfg)
    parts = {k: task.without_unlabelled(v, data_cfg) for k, v in parts.items()}
    if data_cfg.max_train_samples:
        train = _subset(train, data_cfg.max_train_samples, column, task, seed)
    labels = task.row_labels(train, data_cfg)
    counts = label_counts(labels)
    fewest, typical = (None, None) if counts is None or not len(counts) else (int(counts.min()),
                                                                            int(counts.median()))
    # A split of a few rows per class says nothing and costs training data: then every row trains. It is
    # judged by the median label, not the rarest, so one rare class does not take a large set's split away,
    # and by the rows per label on average too, so many rare labels (multi-label) do not take a large set's.
    no_split = not data_cfg.val and typical is not None and (
        data_cfg.min_val_per_class == -1
        or (typical * data_cfg.val_fraction < data_cfg.min_val_per_class
            and len(train) * data_cfg.val_fraction < data_cfg.min_val_per_class * len(counts)))
    if "val" in parts:
        val, from_train = parts["val"], False
    elif data_cfg.val:
        val, from_train = task.without_unlabelled(read_data(data_cfg.val, task, data_cfg, split="val"), data_cfg), False
    elif no_split:
        val, from_train = train, False
    else:
        if len(train) < 4:
            raise DataError(f"{data_cfg.train}: {len(train)} rows is too few to split off a validation set; "
                            "give --val FILE")
        # rows of a label seen once stay in training: split off, the label would be unknown to the model
        once = set(counts[counts < 2].index) if counts is not None else set()
        kept = np.array([bool(once.intersection(row)) for row in labels]) if once else np.zeros(len(train), bool)
        pool = train[~kept] if len(train) - kept.sum() >= 4 else train
        strat = _stratify_on(pool, column, task)
        n_val = max(1, round(len(pool) * data_cfg.val_fraction))
        if strat is not None:
            n_val = max(n_val, strat.nunique())
        try:
            tr, va = train_test_split(pool, test_size=n_val, random_state=seed, stratify=strat)
        except ValueError:
            tr, va = train_test_split(pool, test_size=n_val, random_state=seed)
        if pool is not train:
            tr = pd.concat([tr, train[kept]])
        train, val, from_train = _keep_source(tr, train), _keep_source(va, train), True
    test = parts["test"] if "test" in parts else read_data(data_cfg.test, task, data_cfg) if data_cfg.test else None
    test = task.without_unlabelled(test, data_cfg) if test is not None else None
    return Frames(train, val, test, from_train, val_is_train=no_split, fewest=fewest, typical=typical,
                  settled=settled)


def make_task(task_cfg: Any, data_cfg: Any, train: pd.DataFrame) -> Task:
    cls = task_class(task_cfg.type)
    column = cls.target_column(data_cfg)
    return cls.from_train(train[column], train, **cls.options_from(task_cfg, data_cfg))


def make_dataset(df: pd.DataFrame, bundle: Any, task: Task, data_cfg: Any, with_targets: bool = True,
                 allow_unknown: bool = False) -> tuple[torch.utils.data.Dataset, np.ndarray]:
    """Dataset of one split, as the task makes it. Returns it with the positions (into ``df``) of
    the rows kept (images may drop bad files)."""
    return task.dataset(df, bundle, data_cfg, with_targets=with_targets, allow_unknown=allow_unknown)
