"""The task interface and its registry.

A task owns what differs between what a model is fine-tuned for: how targets are read, encoded
and collated; which features its head reads from the backbone (``level``); the loss; the metrics
and the default selection metric; post-processing into output records and predict columns; its
test-report sections; its pretrained baseline; and what it supports. The training loop, the
feature cache, inference, predict, serve, export and report ask the task; nothing outside
``fmtune/tasks/`` branches on a task's name. A task is one module that registers itself:

    @TASKS.register("my-task")
    class MyTask(Task): ...
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fmtune.data.readers import USUAL_LABELS, name_labels, read_any, row_label, saved_dataset, unpacked
from fmtune.errors import DataError
from fmtune.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")
UNKNOWN = "unknown"

# What a task may support beyond train / evaluate / predict / serve / export:
#   stratified_split  validation split and subsets stratified by label
#   mistakes          a gallery of the most confident mistakes in the test report
#   attacks           white-box attacks and adversarial training (single-label: the loss of a label)
#   continual         fmtune continue (new labels extend the head)
#   transfer          fmtune transfer (examples per class)
#   explain           fmtune explain (attributions towards a predicted label)
#   embed             fmtune embed (pooled features coloured by target); a served text run's POST /v1/embeddings
#   robustness        fmtune robustness (metrics under perturbed inputs)
#   fairness          fmtune fairness (metrics per group; task.group_weights; per-group thresholds)
#   save_images       fmtune predict --save-images (predictions drawn or written as image files: write_files)
#   recentre          after fine-tuning, the head's output moved so its mean on the training rows is theirs
#   thresholds        decision thresholds chosen on the validation rows after training (choose_thresholds)
#   split_lists       a class folder's validation_list.txt / testing_list.txt are its validation and test splits
#   transcribe        records with a "transcript": a served run answers POST /v1/audio/transcriptions
#   usual_columns     a table lacking the default-named text / image / audio / label column is read from the one
#                     column well-known datasets keep it in (prepare.settle_columns; the names: usual_labels)
CAPABILITIES = ("stratified_split", "mistakes", "attacks", "continual", "transfer", "explain", "embed", "robustness",
                "fairness", "pseudo_labels", "save_images", "recentre", "thresholds", "split_lists", "transcribe",
                "usual_columns")


class Task:
    """Base class of sequence-level tasks (a pooled vector -> a linear head).

    ``labels`` is the ordered list of label names (empty for regression).
    """

    name = ""
    default_metric = ""
    metric_names: tuple[str, ...] = ()
    level = "pooled"  # what the head reads from the backbone: "pooled" (one vector) or "tokens" (one per token)
    hf_problem_type = ""  # transformers' config.problem_type for this head
    capabilities: frozenset[str] = frozenset()
    description = ""
    accepts_word_lists = False  # predict takes a list of words (already split) as well as a text
    modality = ""  # "audio": reads audio files; "" reads what the model reads (text or images)
    scalar_targets = False  # one label (or number) a row, in the target column: a row with it empty is unlabelled
    usual_labels = USUAL_LABELS  # capability usual_columns: the names a table's label column goes by
    default_lrs: dict[str, float] = {}  # train.lr by strategy where this task needs other than config.DEFAULT_LR
    default_head_lr: float | None = None  # train.head_lr unless set (None: config.default_head_lr of train.lr)
    default_train: dict[str, int] = {}  # train.epochs / batch_size / eval_batch_size unless set (else config.DEFAULT_*)
    dense_head = ""  # level "dense": the head on the backbone's feature maps (fmtune.models.dense.HEADS)
    probe_baseline = True  # train.baseline: a linear probe (else the head trained on the frozen backbone, a run)
    # POST / of a served run in the Hugging Face Inference API's format (fmtune.serve): the request
    # parameters this task takes there (others are refused), and whether a text request of one input
    # is answered as a list of one answer (text-classification's [[...]]; token-classification's [...])
    hf_parameters: tuple[str, ...] = ()
    hf_list_of_one = False

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        """One prediction record (``postprocess``'s) as the Hugging Face Inference API answers it for
        this task; NotImplementedError where the API has no such task."""
        raise NotImplementedError

    def __init__(self, labels: list[str] | None = None, class_weights: torch.Tensor | None = None,
                 threshold: float = 0.5, separator: str = "|", target_stats: dict | None = None, **options: Any):
        self.labels = list(labels or [])
        self.class_weights = class_weights
        self.threshold = threshold
        self.separator = separator
        self.target_stats = target_stats or {}
        self.options = options  # task-specific settings saved with the run (labels.json)

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @classmethod
    def supports(cls, capability: str) -> bool:
        assert capability in CAPABILITIES, capability
        return capability in cls.capabilities

    @classmethod
    def require(cls, capability: str, what: str) -> None:
        """A ConfigError naming ``what`` unless this task supports ``capability``."""
        from fmtune.errors import ConfigError

        if not cls.supports(capability):
            able = ", ".join(n for n in TASKS.names() if capability in TASKS.get(n).capabilities)
            raise ConfigError(f"{what} is not available for {cls.name} runs (only for: {able or 'none yet'})")

    def greater_is_better(self, metric: str) -> bool:
        return metric not in {"loss", "mae", "rmse", "mse"}

    # --- reading data --------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | Path, data_cfg: Any) -> pd.DataFrame:
        """A data file (or folder) as a DataFrame with one row per example, as the task reads it
        (``read_file``); a Hugging Face dataset saved to disk is read as its Parquet (``saved_dataset``), a
        compressed file as the file inside (``unpacked``)."""
        inside = unpacked(path)
        df = cls.read_file(saved_dataset(path) or inside or path, data_cfg)
        if inside is not None:  # (messages and run.json name the user's file)
            df.attrs["source"] = str(path)
        return df

    @classmethod
    def read_file(cls, path: str | Path, data_cfg: Any) -> pd.DataFrame:
        """What ``read`` reads, per task (this one: a table, or a folder of class sub-folders of images);
        labels stored as numbers named by data.label_names."""
        return cls.labelled(read_any(path, data_cfg.encoding, data_cfg.text_column, data_cfg), data_cfg)

    @classmethod
    def usual_label_columns(cls, df: pd.DataFrame, inputs: set[str]) -> list[str] | None:
        """Capability usual_columns: the columns of ``df`` (not ``inputs``) that hold its labels one a column, as
        well-known datasets keep them (multi-label: Jigsaw's 0/1 columns), where it has no label column; None."""
        return None

    @classmethod
    def labelled(cls, df: pd.DataFrame, data_cfg: Any) -> pd.DataFrame:
        """A table's labels as data.* say to read them: class ids named (data.label_names); labels held a 0/1 column
        each (data.label_columns) as the task's labels. Readers apply it, and training to a frame read before
        ``prepare.settle_columns`` chose those options."""
        return cls.with_label_names(df, data_cfg)

    @classmethod
    def with_label_names(cls, df: pd.DataFrame, data_cfg: Any) -> pd.DataFrame:
        """``df`` with the ids of its target column named by data.label_names, when set."""
        names = data_cfg.label_names
        return df if names is None else name_labels(df, {cls.target_column(data_cfg): names}, digits=True)

    @classmethod
    def target_column(cls, data_cfg: Any) -> str:
        return data_cfg.label_column

    @classmethod
    def media_column(cls, data_cfg: Any) -> str:
        """The column of a training frame holding image / audio paths as its table writes them (relative ones not
        beside the table are looked for near it: ``prepare.settle_columns``, data.media_root)."""
        return data_cfg.audio_column if cls.modality == "audio" else data_cfg.image_column

    @classmethod
    def without_unlabelled(cls, df: pd.DataFrame, data_cfg: Any) -> pd.DataFrame:
        """``df`` (labelled data) without its rows whose label cell is empty (a task of one label a row:
        ``scalar_targets``), left out with a warning naming them up to data.max_bad_fraction of its rows, as rows
        without a text are (``skip_bad``); more is a DataError listing them. Row positions (messages) are kept."""
        from fmtune.data.dataset import skip_bad

        column = cls.target_column(data_cfg)
        if not cls.scalar_targets or column not in df.columns:
            return df
        values = df[column]
        bad = np.flatnonzero((values.isna() | values.astype(str).str.strip().eq("")).to_numpy())
        if not len(bad):
            return df
        skip_bad([f"{row_label(df, int(i))}: no {column!r} value" for i in bad], len(df),
                 df.attrs.get("source", "the data"), data_cfg.max_bad_fraction, "rows have no label",
                 "row(s) without a label", "; fill or drop those rows (unlabelled rows to learn from: "
                 "fmtune train --unlabeled FILE)")
        out = df.iloc[np.setdiff1d(np.arange(len(df)), bad)]  # (by position: an index label may repeat)
        out.attrs = dict(df.attrs)
        return out

    @classmethod
    def require_targets(cls, df: pd.DataFrame, data_cfg: Any) -> None:
        """A DataError naming what is missing when ``df`` (labelled data) has no targets."""
        from fmtune.data.readers import require_column, text_columns

        require_column(df, cls.target_column(data_cfg), "label", "data.label_column", tuple(text_columns(data_cfg)))

    @classmethod
    def stratify_values(cls, df: pd.DataFrame, column: str) -> pd.Series | None:
        """Per-row values to stratify splits on (None: a plain random split)."""
        return None

    @classmethod
    def row_labels(cls, df: pd.DataFrame, data_cfg: Any) -> list[list[str]] | None:
        """Each row's labels (None: the task has no labels to count), for the rows per label that
        decide the validation split and ``--strategy auto``."""
        return None

    @classmethod
    def options_from(cls, task_cfg: Any, data_cfg: Any) -> dict[str, Any]:
        """The keyword arguments of ``from_train`` taken from the config."""
        return {"column": data_cfg.label_column, "class_weights": task_cfg.class_weights}

    @classmethod
    def from_train(cls, values: pd.Series, df: pd.DataFrame, **kw: Any) -> Task:
        raise NotImplementedError

    def encode(self, values: pd.Series, df: pd.DataFrame, column: str, allow_unknown: bool = False) -> Any:
        raise NotImplementedError

    def dataset(self, df: pd.DataFrame, bundle: Any, data_cfg: Any, with_targets: bool = True,
                allow_unknown: bool = False) -> tuple[torch.utils.data.Dataset, np.ndarray]:
        """The dataset of one split, and the positions (into ``df``) of the rows kept."""
        from fmtune.data.dataset import image_dataset, text_dataset

        targets = None
        if with_targets:
            column = self.target_column(data_cfg)
            self.require_targets(df, data_cfg)
            targets = self.encode(df[column], df, column, allow_unknown)
        if bundle.kind == "text":
            return text_dataset(df, data_cfg.text_column, bundle, targets,
                                getattr(data_cfg, "text_pair_column", None), data_cfg.max_bad_fraction)
        if bundle.kind == "audio":
            from fmtune.data.audio import AudioSpec, audio_dataset

            return audio_dataset(df, data_cfg.audio_column, AudioSpec.from_dict(bundle.audio), targets,
                                 data_cfg.max_bad_fraction)
        return image_dataset(df, data_cfg.image_column, bundle.image, targets, data_cfg.max_bad_fraction)

    def training_set(self, ds: Any) -> Any:
        """The rows of the training split's dataset that train (speech recognition leaves out clips longer than
        the model's window)."""
        return ds

    def inputs(self, items: list[Any], bundle: Any) -> torch.utils.data.Dataset:
        """A dataset of raw inputs to predict: checked texts (tokenised as in training), decoded images,
        or decoded audio waveforms (``fmtune.data.audio.load_audio``)."""
        from fmtune.data.dataset import ImageData

        if bundle.kind == "text":
            return bundle.text_data(items)
        if bundle.kind == "audio":
            from fmtune.data.audio import AudioData, AudioSpec, features_of

            spec = AudioSpec.from_dict(bundle.audio)
            return AudioData(features_of(items, spec), None, spec)
        return ImageData(torch.stack(list(items)), None, bundle.image)

    def image_input(self, source: Any, bundle: Any) -> Any:
        """One image (a path, file object or PIL image) as ``inputs`` takes it: uint8 (3, size, size),
        shorter side resized and centre-cropped as in training."""
        from fmtune.data.dataset import decode_image

        return decode_image(source, int(bundle.image["size"]))

    def notes(self) -> list[str]:
        """How the data was read, for the plan printed before training (e.g. which mask value is what)."""
        return []

    def predict_source(self, path: Path) -> Path:
        """What ``fmtune predict`` reads of the file or folder ``path`` (all of it, by default)."""
        return path

    def input_column(self, df: pd.DataFrame, default: str) -> str:
        """The column of a table to predict from."""
        return default

    def label_counts(self, df: pd.DataFrame, column: str) -> dict[str, int] | None:
        """Examples per label, for run.json (None where labels are not counted)."""
        return None

    # --- training and evaluation -----------------------------------------------------------------
    def output_affine(self) -> tuple[float, float]:
        """(scale, shift) the head's output is mapped by (regression predicts in target units)."""
        return 1.0, 0.0

    def loss(self, logits: torch.Tensor, targets: Any, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss; ``weights`` (one per example, tasks with capability "fairness"):
        the weighted mean over the batch (task.group_weights)."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: Any) -> dict[str, float]:
        raise NotImplementedError

    def validation_metrics(self, logits: torch.Tensor, targets: Any, metric: str) -> dict[str, float]:
        """The metrics of a validation during training (what picks the best checkpoint): ``metrics``, except where
        a task decides with settings chosen on validation after training (multi-label thresholds)."""
        return self.metrics(logits, targets)

    def outcomes(self, logits: torch.Tensor, targets: Any) -> dict[str, Any]:
        """What a fairness audit compares across groups (capability "fairness"): ``kind`` "labels"
        with ``true``/``pred`` class ids and ``proba`` (N x K), or "values" with ``true``/``pred``."""
        raise NotImplementedError

    def output_difference(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """How far two models' outputs on the same inputs are apart (an export checked against its run): the
        largest difference, absolute, or relative to the output where it is larger than 1 (a detector's box
        coordinates are pixels: 200 +- 2e-4 is the same float32 agreement as a logit of 2 +- 2e-6)."""
        return float(((a - b).abs() / a.abs().clamp(min=1.0)).max()) if a.numel() else 0.0

    # --- output ------------------------------------------------------------------------------
    def postprocess(self, logits: torch.Tensor, ds: Any = None) -> list[dict[str, Any]]:
        """One dict per example: the prediction and its scores, for predict/serve."""
        raise NotImplementedError

    def prediction_columns(self) -> list[str]:
        """The columns ``fmtune predict`` adds for each row, in order."""
        raise NotImplementedError

    def flatten(self, record: dict[str, Any]) -> dict[str, Any]:
        """One ``postprocess`` record as the row of ``prediction_columns``."""
        raise NotImplementedError

    def write_files(self, out: pd.DataFrame, column: str, base: Path, folder: Path, taken: set[str]) -> pd.DataFrame:
        """Capability "save_images": write what ``out`` (predicted rows; inputs in ``column``, relative to
        ``base``) holds as files into ``folder``; the rows naming the files. ``taken``: the file
        names written so far by this ``fmtune predict`` (it reads a large input in chunks)."""
        raise NotImplementedError

    # --- the test report ---------------------------------------------------------------------
    def text_report(self, logits: torch.Tensor, targets: Any) -> str:
        raise NotImplementedError

    def report_files(self, logits: torch.Tensor, targets: Any, folder: Path, title: str) -> dict[str, Any]:
        """Plots (and other results) of the test split written into ``folder``; what eval.json records."""
        return {}

    def mistakes(self, logits: torch.Tensor, targets: Any, ds: Any, bundle: Any, png: Path,
                 k: int = 8) -> list[dict[str, Any]]:
        return []

    # --- the pretrained baseline: a linear probe on frozen features -----------------------------
    def fit_probe(self, x: np.ndarray, targets: Any, seed: int) -> Any:
        raise NotImplementedError

    def probe_logits(self, probe: Any, x: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    baseline_method = "linear probe (scikit-learn) on the frozen pretrained backbone's pooled features"

    def head_from_probe(self, probe: Any, num_features: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The fitted probe as the weight and bias of the task's linear head (outputs before the
        head's fixed output affine), or None where a probe cannot be one."""
        return None

    @classmethod
    def splits_of(cls, train: Path) -> dict[str, str]:
        """The held-out splits the training data names for itself in a way only this task reads (a YOLO dataset
        YAML's val and test): {"val": path, "test": path}, used where data.val / data.test are unset."""
        return {}

    thresholds_unchosen = ""  # capability "thresholds": why choose_thresholds may return None (said when it does)

    def choose_thresholds(self, logits: torch.Tensor, targets: Any, metric: str) -> dict[str, Any] | None:
        """Capability "thresholds": set the decision thresholds that score best on ``metric`` on these
        (validation) outputs; returns what was chosen, or None where the rows cannot tell."""
        return None

    def decision_thresholds(self) -> dict[str, float] | None:
        """Capability "thresholds": the probability above which each label is predicted (None elsewhere)."""
        return None

    def state(self) -> dict[str, Any]:
        """What must be saved with a run to rebuild this task (labels.json)."""
        return {"task": self.name, "labels": self.labels, "threshold": self.threshold,
                "separator": self.separator, "target_stats": self.target_stats, **self.options}


TRUE_WORDS, FALSE_WORDS = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no"}


def one_hot_labels(df: Any, data_cfg: Any) -> Any:
    """``data.label_columns`` (one 0/1 column per label) as the list of labels of each row in ``data.label_column``,
    the 0/1 columns dropped (so that nothing reads them as text). A table with none of them is left as it is (rows
    to predict); one with some but not all, a cell that is not 0/1 (or true/false, yes/no), or a label column of its
    own beside them is a DataError naming it."""
    from fmtune.data.tabular import split_names

    names, target, src = split_names(data_cfg.label_columns), data_cfg.label_column, df.attrs.get("source", "the data")
    present = [c for c in names if c in df.columns]
    if not present:
        return df
    if len(present) < len(names):
        missing = next(c for c in names if c not in df.columns)
        raise DataError(f"{src}: no column {missing!r} (data.label_columns); columns are: "
                        f"{', '.join(map(str, df.columns))}")
    if target in df.columns and target not in names:
        raise DataError(f"{src}: data.label_columns gives the labels, but the table has a {target!r} column "
                        "(data.label_column) too; name the column the labels go to with --set data.label_column=NAME")
    on = np.zeros((len(df), len(names)), bool)
    for j, c in enumerate(names):
        words = df[c].astype(str).str.strip().str.lower()
        bad = np.flatnonzero(~words.isin(TRUE_WORDS | FALSE_WORDS).to_numpy())
        if len(bad):
            raise DataError(f"{row_label(df, int(bad[0]))}: column {c!r} holds {df[c].iloc[bad[0]]!r}; "
                            "data.label_columns are 0/1 columns (or true / false)")
        on[:, j] = words.isin(TRUE_WORDS).to_numpy()
    out = df.drop(columns=names)
    out[target] = [[n for n, flag in zip(names, row) if flag] for row in on]
    out.attrs = dict(df.attrs)
    return out


def zero_one_columns(df: pd.DataFrame, inputs: set[str]) -> list[str]:
    """The columns of ``df`` (not ``inputs``) whose every cell is 0 or 1: labels held a column each (true / false
    columns are not counted: GoEmotions' example_very_unclear is a flag, not an emotion)."""
    found = []
    for c in df.columns:
        if c in inputs or not isinstance(c, str) or df[c].dtype == bool or df[c].isna().any():
            continue
        if df[c].astype(str).str.strip().isin(("0", "1", "0.0", "1.0")).all():
            found.append(c)
    return found


def warn_look_alike_labels(df: pd.DataFrame, values: pd.Series, column: str) -> None:
    """Warn when labels differ only in case or surrounding spaces ('pos' / 'Pos' / 'pos '): they
    train as separate classes, which is seldom what a table meant."""
    text = values.astype(str)
    counts, cells = text.value_counts(), text.to_numpy()
    groups: dict[str, list[str]] = {}
    for lab in counts.index:  # most rows first
        groups.setdefault(lab.strip().casefold(), []).append(lab)
    for same in (g for g in groups.values() if len(g) > 1):
        where = [f"{lab!r} ({counts[lab]} row(s), first {row_label(df, int(np.flatnonzero(cells == lab)[0]))})"
                 for lab in same[1:]]
        warnings.warn(f"column {column!r}: label {same[0]!r} ({counts[same[0]]} rows) and {', '.join(where)} differ "
                      "only in case or surrounding spaces; they are trained as different classes (fix the rows if "
                      "they are one)", UserWarning, stacklevel=3)


NUMERIC_CLASSES_MAX = 20  # a label column of numbers with more distinct values is checked for a quantity


def check_numeric_labels(df: pd.DataFrame, values: pd.Series, column: str) -> None:
    """A label column of numbers with many distinct values is most likely a quantity to predict:
    an error when most of them occur in one row only (such classes cannot be learned), a warning
    when some are fractional (class ids seldom are). Class ids (0..K-1 or 1..K) pass."""
    text = values.astype(str)
    counts = text.value_counts()
    if len(counts) <= NUMERIC_CLASSES_MAX:
        return
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        return
    fractional = bool((numbers % 1 != 0).any())
    ids = not fractional and set(numbers.unique()) in ({float(i) for i in range(start, start + len(counts))}
                                                         for start in (0, 1))
    if ids:  # 0..K-1 or 1..K: class ids, even with one row each
        return
    once = int((counts == 1).sum())
    what = f"column {column!r} holds {len(counts):,} different numbers ({numbers.min():g} to {numbers.max():g}"
    if once:
        first = row_label(df, int(np.flatnonzero(text.to_numpy() == counts.index[-1])[0]))
        what += f"; {once:,} of them in one row only, e.g. {counts.index[-1]!r} in {first}"
    what += ")"
    if once * 2 > len(counts):
        raise DataError(f"{what}: a quantity to predict, not classes; pass "
                        "--task regression, or name the label column with --set data.label_column=NAME")
    if fractional:
        warnings.warn(f"{what}: they are trained as {len(counts):,} separate classes; if they are a quantity, "
                      "pass --task regression", UserWarning, stacklevel=3)


def missing_values(df: pd.DataFrame, values: pd.Series, column: str) -> None:
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        raise DataError(f"{row_label(df, int(bad[0]))}: empty {column!r} value "
                        f"({len(bad)} row(s) in all); fill or drop those rows")


def task_from_state(state: dict[str, Any]) -> Task:
    cls = TASKS.get(state["task"])
    extra = {k: v for k, v in state.items() if k not in ("task", "labels", "threshold", "separator", "target_stats")}
    return cls(state.get("labels"), threshold=state.get("threshold", 0.5), separator=state.get("separator", "|"),
               target_stats=state.get("target_stats"), **extra)


def task_class(name: str, key: str = "task.type") -> type[Task]:
    """The registered task class named ``name``; an unknown name is a ConfigError listing the known ones."""
    return TASKS.get(name, key)
