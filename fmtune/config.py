"""Typed config: sections as dataclasses, YAML load/save, dotted overrides, validation.

Every field carries its help text in ``metadata["help"]`` (one place); ``fmtune train --help``
and ``fmtune config`` print it. Unknown keys and wrong types are ConfigErrors naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from fmtune.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    name: str = _f("minilm-l6", "zoo name (see `fmtune models`), a local Hugging Face model folder, a GGUF file "
                   "or a CTranslate2 Whisper folder")
    tower: Literal["auto", "vision", "text"] = _f(
        "auto", "a model of two towers (CLIP, SigLIP ...): the one that is the backbone; auto: the one that reads "
        "the training data (images or texts)")
    pooling: Literal["auto", "mean", "cls", "last", "pooler"] = _f(
        "auto", "how the head reads the backbone: auto = what the backbone was trained with (mean for "
        "sentence-transformers encoders, the last token for causal decoders such as GPT-2, Llama or Qwen, else cls)"
    )
    max_length: int | None = _f(None, "text: tokens kept per example (longer texts are truncated; default 128, "
                                "or, for one prediction per text, the length that keeps 95% of the training texts "
                                "whole, up to 256; ner: the window; generation: prompt + completion, default 512)")
    image_size: int | None = _f(None, "images: side length fed to the backbone (default: the backbone's; "
                                "segmentation and detection on a CNN: 320)")
    audio_window: float | None = _f(None, "audio: seconds the encoder reads at once (default: the model's own "
                                    "window: 30 s for Whisper, wav2vec2-style, Speech2Text and Parakeet models, "
                                    "max_length frames for an "
                                    "AST); longer clips are cut into windows, averaged")
    head_dropout: float = _f(0.1, "dropout before the linear head")
    dropout: float | None = _f(None, "while training, every dropout of the model (the backbone's hidden states and "
                               "attention probabilities, and the head's) set to this; default: the model's own and "
                               "model.head_dropout (0 was measured for regression: better on one set, worse on "
                               "another; README, Train on your data)")
    init: Literal["pretrained", "random"] = _f(
        "pretrained", "backbone weights: pretrained, or random (same architecture from scratch: the control of "
        "`fmtune transfer`)")

    def __post_init__(self) -> None:
        _check(self.max_length is None or self.max_length >= 8, "model.max_length", "must be at least 8")
        _check(self.image_size is None or self.image_size >= 16, "model.image_size", "must be at least 16")
        _check(0.0 <= self.head_dropout < 1.0, "model.head_dropout", "must be in [0, 1)")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _check(self.audio_window is None or self.audio_window >= 1.0, "model.audio_window", "must be at least 1 s")


@dataclass
class DataConfig:
    train: str | None = _f(None, "training data: CSV/JSONL/Parquet file, or a folder of class sub-folders")
    val: str | None = _f(None, "validation data (default: split off the training data)")
    test: str | None = _f(None, "test data, evaluated with the best checkpoint at the end")
    split_column: str = _f("auto", "a column naming each row's split (train / validation / test): of a training "
                           "table, the rows of validation and test validate and test where --val / --test are not "
                           "given, and evaluation reads a table's test rows. auto: a column named split, set, subset "
                           "or partition whose every value names a split; none: no such column")
    text_column: str = _f("text", "column holding the text (a table without 'text': its one column of a usual name, "
                          "sentence, review, content, tweet ...; else its columns of free text, written as one with "
                          "data.text_template)")
    text_pair_column: str | None = _f(None, "sentence pairs (entailment, paraphrase, question and answer): the "
                                      "column of each row's second text. The model reads both as one input, joined "
                                      "by its separator token, with segment ids where it has them; the longer text "
                                      "is cut first. Unset: one text per row")
    text_columns: str | None = _f(None, "tabular data: write these columns (comma-separated, or 'all' but the label) "
                                  "as the text, 'col: value, col: value', for a text encoder to read")
    text_template: str | None = _f(None, "tabular data: the text as a format string over column names, e.g. "
                                   "'{age} year old {sex}, works as {occupation}' (instead of text_columns)")
    image_column: str = _f("image", "column holding image paths (relative to the file) in a CSV/JSONL/Parquet, or a "
                           "template over columns: 'train/{id}.jpg' (a table without 'image': its one column of "
                           "image file paths)")
    audio_column: str = _f("audio", "column holding audio file paths (relative to the file) in a CSV/JSONL/Parquet, "
                           "or a template over columns: 'fold{fold}/{slice_file_name}' (a table without 'audio': its "
                           "one column of audio file paths)")
    label_column: str = _f("label", "column holding the label (or the numeric target for regression; a table without "
                           "'label': its one column of a usual name, labels, intent, category, class, sentiment ...; "
                           "else one named so in more words, airline_sentiment, 'Class Index'; for classes a "
                           "rating's, Score, stars; else its one column of values that repeat)")
    label_columns: str | None = _f(None, "labels held as one 0/1 column each (comma-separated names, e.g. "
                                   "toxic,obscene,insult, as Jigsaw's and GoEmotions' CSVs have them): a row has the "
                                   "labels whose column is 1 (or true); classification: one-hot columns, exactly "
                                   "one 1 a row. The columns are not read as text. A table without a label column: "
                                   "its 0/1 columns")
    mask_column: str = _f("mask", "segmentation: column holding mask PNG paths (relative to the file) in a table (a "
                          "table without 'mask': its other column of images, e.g. scene_parse_150's annotation)")
    image_root: str | None = _f(None, "detection: the folder COCO file_names are relative to (default: the JSON "
                                "file's folder)")
    media_root: str | None = _f(None, "the folder that relative image / audio paths in a table are read from "
                                "(default: the table's own folder, else the one folder near it that holds them), e.g. "
                                "Common Voice's clips/, ESC-50's audio/")
    box_format: Literal["xywh", "xyxy"] = _f(
        "xywh", "detection, boxes in a table (a Hugging Face dataset's objects.bbox): xywh = x, y, width, height "
        "in pixels (COCO, cppe-5), xyxy = the corners x0, y0, x1, y1")
    yolo_split: str = _f("train", "detection: the split of a YOLO dataset YAML that --data reads (its val and test "
                         "splits validate and test unless --val / --test are given; data.yaml:val names one)")
    input_column: str | None = _f(None, "generation: column of a table holding the input (default: prompt, else "
                                  "data.text_column)")
    target_column: str | None = _f(None, "generation: column of a table holding the target text (default: "
                                   "completion); speech-recognition: the transcript (default: the first of text, "
                                   "transcript, transcription, sentence)")
    label_separator: str = _f("|", "multi-label: separator between labels in one cell (a cell written as a list, "
                              "[\"a\", \"b\"] or ['a', 'b'], is read as that list)")
    label_pattern: str | None = _f(None, "a folder of files without class sub-folders: a regular expression over "
                                   "each file's name, its first group the file's class (e.g. '^(\\d+)_' reads "
                                   "0_jackson_0.wav as 0); unset: the name without its number at the end "
                                   "(Abyssinian_12.jpg: Abyssinian; cat.0.jpg: cat)")
    label_names: list[str] | None = _f(None, "names of labels stored as numbers, comma-separated in id order (id 0 "
                                 "first): the label column of a table, or a ner file's tags (e.g. "
                                 "O,B-PER,I-PER,...), as a Hugging Face dataset saved as JSON/CSV holds them; -1 is "
                                 "no label. Parquet files written by Hugging Face datasets carry the names and need "
                                 "none")
    encoding: str = _f("utf-8", "text encoding of CSV/TSV/TXT/JSONL files. UTF-8 (the default): a file that is not "
                       "is read in the encoding found for it (cp1252, cp1251 ...; a byte-order mark: UTF-16), said in "
                       "a warning; another given (latin-1 ...): that one")
    format: Literal["auto", "conll", "jsonl", "table"] = _f(
        "auto", "ner: how the files are read: auto (by suffix: .jsonl/.json are JSONL or a JSON array, "
        ".conll/.bio/.txt CoNLL, a .csv / .tsv whose header names a word and a sentence column a table (a .tsv "
        "otherwise CoNLL), .parquet Parquet), conll (word and tag per line), jsonl ({tokens, tags or ner_tags} or "
        "{text, entities} per line), table (one word a row: word, sentence and tag columns, e.g. Kaggle's Sentence #, "
        "Word, Tag)")
    val_fraction: float = _f(0.1, "share of training rows split off as validation when no val set is given")
    min_val_per_class: int = _f(5, "classification: when the split would leave fewer validation rows than this of "
                                "the median class (and per label on average), none is split off: every row trains, "
                                "a step budget decides when to stop, and validation is measured on the training rows "
                                "(0: always split; -1: never). Rows of a label seen once always stay in training")
    max_train_samples: int | None = _f(None, "use at most this many training rows (seeded, stratified)")
    unknown_labels: Literal["error", "unknown"] = _f(
        "error", "a val/test label unseen in training: fail, or map it to 'unknown' (never predicted)"
    )
    max_bad_fraction: float = _f(0.05, "rows left out with a warning, up to this share, where their image or "
                                "audio file cannot be read, or their text or label is empty; more fails, listing "
                                "them")

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 0.9, "data.val_fraction", "must be in (0, 0.9)")
        _check(self.min_val_per_class >= -1, "data.min_val_per_class", "must be >= -1")
        _check(0.0 <= self.max_bad_fraction <= 1.0, "data.max_bad_fraction", "must be in [0, 1]")
        _check(self.max_train_samples is None or self.max_train_samples > 0, "data.max_train_samples", "must be > 0")
        _check(not (self.text_columns and self.text_template), "data.text_template",
               "give text_columns or text_template, not both")
        _check(not (self.text_pair_column and (self.text_columns or self.text_template)), "data.text_pair_column",
               "reads a second text column as it is; it does not combine with text_columns / text_template")
        _check(self.text_pair_column != self.text_column, "data.text_pair_column",
               "must name another column than data.text_column")
        _check(self.label_names is None or all(self.label_names), "data.label_names",
               "must be names separated by commas, none empty")
        if self.text_template:
            from fmtune.data.tabular import template_columns

            template_columns(self.text_template)
        if self.label_pattern:
            import re

            try:
                re.compile(self.label_pattern)
            except re.error as e:
                raise ConfigError(f"data.label_pattern: {self.label_pattern!r} is not a regular expression: {e}") \
                    from None


@dataclass
class TaskConfig:
    type: str = _f("classification", "what the model predicts: a task of `fmtune tasks` (classification, multilabel, "
                   "regression, ner ...)")
    class_weights: bool = _f(False, "weight the loss by inverse class frequency (imbalanced data)")
    threshold: float = _f(0.5, "multilabel: probability above which a label is predicted; detection: the score "
                          "from which predict and serve return a box (both: task.thresholds=fixed, or where "
                          "validation cannot choose)")
    thresholds: Literal["auto", "fixed"] = _f(
        "auto", "multilabel: auto chooses the decision thresholds on the validation rows after training, for "
        "train.metric (macro_f1: one per label with 5 positive and 5 negative validation rows, the best F1 of each "
        "among thresholds flagging at most 5x the label's positive rows, kept only if better than flagging every "
        "row; micro_f1 / accuracy: one for all) and saves them with the run, and scores every validation during "
        "training at the thresholds that checkpoint would get (the best checkpoint is the best once thresholded); "
        "detection: auto chooses the score from which predict and serve return a box, the one of the best F1 of "
        "boxes on the validation images (a box is right where it overlaps a true box of its class by IoU 0.5; needs "
        "5 true boxes), and leaves mAP as it is (it scores every box above task.score_threshold); "
        "fixed: task.threshold for every label. Not chosen without a validation split")
    label_all_subtokens: bool = _f(False, "ner: train on every sub-token of a word (default: its first sub-token "
                                   "only); predictions and metrics always read the first")
    group_weights: str | None = _f(None, "fairness: re-weigh training examples so each group x label cell of "
                                   "these columns (comma-separated, intersected) counts as if group and label were "
                                   "independent (Kamiran & Calders; regression: each group counts equally)")
    window_stride: float = _f(0.25, "ner: a sentence longer than model.max_length is read in windows that overlap by "
                              "this share of the window; every word is predicted from the window where it has "
                              "the most context")

    instruction: str | None = _f(None, "generation: text put before every input (e.g. 'Summarise this function in "
                                 "one sentence.')")
    train_on_prompt: bool = _f(False, "generation: also train on the prompt tokens (default: the loss is on the "
                               "completion only)")
    chat_template: Literal["auto", "on", "off"] = _f(
        "auto", "generation: wrap prompts in the tokenizer's chat template (auto: when the tokenizer has one)")
    language: str | None = _f(None, "speech-recognition: the spoken language for a multilingual Whisper (e.g. "
                              "english, french; default english); English-only models need none")
    wer_normalizer: Literal["basic", "english"] = _f(
        "basic", "speech-recognition: the text normaliser before WER/CER: basic (lower case, punctuation and symbols "
        "as spaces; any language) or english (Whisper's English normaliser, as its papers score: also numbers as "
        "digits, 'mister' = 'mr', British spellings as American, fillers dropped)")
    classes: str | None = _f(None, "segmentation: class names, comma-separated, in mask-value order (value 0 = the "
                             "first); default: classes.txt beside images/ and masks/, else the values seen in the "
                             "training masks (0/255 masks: background, foreground); detection: the class names "
                             "(default: the dataset's categories / names, else those seen in training)")
    mask_format: Literal["auto", "index", "binary"] = _f(
        "auto", "segmentation: how mask pixels are read: index (value = class, task.ignore_index = not scored), "
        "binary (0 = background, above 127 = foreground), auto (binary when the masks hold only 0 and 255)")
    ignore_index: int = _f(255, "segmentation: the mask value of pixels neither trained nor scored (-1: none)")
    score_threshold: float = _f(0.05, "detection: boxes scoring below this are dropped before mAP is scored "
                                "(scores: class probability x centre-ness); predict and serve return those from "
                                "task.threshold")
    nms_iou: float = _f(0.6, "detection: a box overlapping a better one of its class by more than this IoU is dropped")
    max_detections: int = _f(100, "detection: boxes kept per image, best first")
    truncate: bool = _f(False, "generation: an example longer than model.max_length loses the start of its prompt "
                        "(then the end of its completion) with a warning, instead of being an error")

    def __post_init__(self) -> None:
        from fmtune.tasks import TASKS  # the registry is the list of tasks

        TASKS.get(self.type, "task.type")
        _check(0.0 <= self.window_stride <= 0.5, "task.window_stride", "must be in [0, 0.5]")
        _check(-1 <= self.ignore_index <= 255, "task.ignore_index", "must be a mask value 0-255, or -1 for none")
        _check(0 <= self.score_threshold < 1, "task.score_threshold", "must be in [0, 1)")
        _check(0 < self.nms_iou <= 1, "task.nms_iou", "must be in (0, 1]")
        _check(self.max_detections >= 1, "task.max_detections", "must be at least 1")


INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")  # what --precision takes (training.hardware.inference_autocast)
STRATEGY_NAMES = ("full", "head", "last_n", "lora", "dora", "ia3", "prompt", "bitfit", "contrastive", "auto")
# strategies whose head is the probe solved on frozen features (not trained by gradient steps)
SOLVED_HEAD = ("head", "contrastive")
# train.lr when it is not set: what each strategy needs to move in a few epochs. Adapters start at
# zero (LoRA/DoRA) or one (IA3) and are small, so they take much larger steps than full weights.
DEFAULT_LR = {"full": 5e-5, "head": 5e-5, "last_n": 5e-5, "lora": 5e-4, "dora": 5e-4, "ia3": 3e-3,
              "prompt": 3e-2, "bitfit": 1e-3, "contrastive": 3e-5}
CONTRASTIVE_LORA_LR = 1e-3  # strategy contrastive with strategy.encoder=lora
# full / last_n on a convolutional net normalised by BatchNorm (zoo.models.batchnorm_cnn): at 5e-5 and 2e-4,
# EfficientNet-Lite0 and MobileNetV2 beat their linear-probe start in 1 of 12 runs (3 epochs, three image sets)
# (bench/image_lr.py); at 1e-3 they beat it in all six model x data pairs, by 0.8 to 9.1 points
CNN_LR = 1e-3
LORA_DROPOUT, GENERATION_LORA_DROPOUT = 0.1, 0.0  # strategy.dropout unless set (see its help)


def lora_dropout(strategy: Any) -> float:
    return LORA_DROPOUT if strategy.dropout is None else strategy.dropout
# Every other default learning rate lives here too. The head (fresh, small) takes larger steps
# than the weights under it: train.head_lr, unless set, is HEAD_LR_FACTOR x lr, at most HEAD_LR_MAX.
HEAD_LR_FACTOR, HEAD_LR_MAX = 20, 1e-2
PROBE_LR = 1e-2  # fmtune transfer's probe (a head on the frozen backbone) unless train.head_lr is set


# train.head_init probe, for a head that goes on training with its body: the probe it starts from reads a seeded
# sample of PROBE_INIT_PER_LABEL rows per label or one training row in PROBE_INIT_SHARE, whichever is more (at least
# PROBE_INIT_MIN_ROWS, at most PROBE_INIT_ROWS): a start, not the final head, at a cost bounded to a small share of
# an epoch (a forward pass over those rows, about 1/24 of an epoch's forward and backward, and a cross-validated fit).
# MiniLM full fine-tuning, 2,000 rows, 1 epoch, 3 seeds: 256 rows instead of 1,000 took the start from 7-11 s to
# 2.5-3 s, test accuracy 0.797 vs 0.796 (rotten-tomatoes), 0.743 vs 0.732 (tweet-sentiment); README, head starts
PROBE_INIT_PER_LABEL, PROBE_INIT_SHARE, PROBE_INIT_MIN_ROWS, PROBE_INIT_ROWS = 64, 8, 256, 10_000


def probe_init_rows(n: int, labels: int) -> int:
    return min(n, PROBE_INIT_ROWS, max(PROBE_INIT_MIN_ROWS, PROBE_INIT_PER_LABEL * labels, n // PROBE_INIT_SHARE))


# train.head_init auto: the probe start, except for LoRA / DoRA on a binary single-label task (fewer than
# RANDOM_HEAD_ADAPTERS_BELOW classes). The adapters (zero at the start) learn from the head's gradients, and a
# head that already separates two classes left them less to learn: MiniLM LoRA, 2,000 rows, 1 epoch, 3 seeds,
# test accuracy from a random head / the probe: rotten-tomatoes (2 classes) 0.781 / 0.750 (2 epochs, 2 seeds:
# -2.7 / -0.4 points), tweet-sentiment (3 classes) 0.693 / 0.695; 40 classes (1 seed): the probe +2.2 points
# (bench/results-2026-12-04-probe-rows-2core.json, results-2026-12-03-head-init-2core.json)
RANDOM_HEAD_ADAPTERS, RANDOM_HEAD_ADAPTERS_BELOW = ("lora", "dora"), 3


def head_start(train: Any, strategy: str, single_label_classes: int | None) -> str:
    """"probe" or "random": the head start train.head_init asks for (auto decided here).
    ``single_label_classes``: the classes of a single-label classification task, else None."""
    if train.head_init != "auto":
        return train.head_init
    few = single_label_classes is not None and single_label_classes < RANDOM_HEAD_ADAPTERS_BELOW
    return "random" if strategy in RANDOM_HEAD_ADAPTERS and few else "probe"


def enough_steps(cfg: Config, n: int) -> tuple[Config, str | None]:
    """train.min_steps: a training set too small to give that many optimizer steps in its epochs at
    train.batch_size trains on smaller batches (down to MIN_STEPS_BATCH) instead; says why. Every
    task's training applies it to the config before the run is written, so config.yaml holds the
    batch trained."""
    train = cfg.train
    if (train.min_steps is None or train.max_steps is not None or cfg.strategy.name in SOLVED_HEAD
            or train.batch_size <= MIN_STEPS_BATCH):
        return cfg, None

    def steps(batch: int) -> int:
        return train.epochs * math.ceil(math.ceil(n / batch) / train.grad_accum)

    if steps(train.batch_size) >= train.min_steps:
        return cfg, None
    fits = train.epochs * n // (train.min_steps * train.grad_accum)  # the largest batch that gives min_steps
    batch = max(MIN_STEPS_BATCH, min(train.batch_size, fits))
    why = (f"{n} training rows, {train.epochs} epochs of batches of {train.batch_size}: {steps(train.batch_size)} "
           f"optimizer steps, under train.min_steps {train.min_steps}; batches of {batch} instead ({steps(batch)} "
           "steps)")
    return dataclasses.replace(cfg, train=dataclasses.replace(train, batch_size=batch)), why


def resolve_max_length(requested: int | None, default: int, limit: int | None, model: str) -> int:
    """model.max_length: as set, else ``default`` cut to ``limit`` (the most tokens the model reads,
    None if unknown); a setting beyond the limit is a ConfigError that says the limit."""
    if requested is None:
        return min(default, limit) if limit else default
    if limit is not None and requested > limit:
        raise ConfigError(f"model.max_length {requested} is more than {model} reads: {limit} tokens; use at most "
                          f"{limit}")
    return requested


def default_lr(strategy: Any, task_type: str | None = None, model: str | None = None) -> float:
    """train.lr unless set: per strategy, or the task's own where it has one (``Task.default_lrs``), or
    CNN_LR for full / last_n fine-tuning of a BatchNorm convolutional net (``model``: a zoo name or folder)."""
    if strategy.name == "contrastive" and strategy.encoder == "lora":
        return CONTRASTIVE_LORA_LR
    whole = _whole_model(task_type, model) if task_type is not None and model is not None else None
    if whole is not None and strategy.name in ("full", "last_n", "head"):  # (an adapter's, bitfit's: as below)
        from fmtune.models.whole import LRS

        return LRS[whole][0]
    if task_type is not None:
        from fmtune.tasks import task_class

        own = task_class(task_type).default_lrs
        if strategy.name in own:
            return own[strategy.name]
    if model is not None and strategy.name in ("full", "last_n"):
        from fmtune.zoo.models import batchnorm_cnn

        if batchnorm_cnn(model):
            return CNN_LR
    return DEFAULT_LR[strategy.name]


# train.epochs, train.batch_size and train.eval_batch_size when they are not set, unless the task has its own
# (Task.default_train)
DEFAULT_EPOCHS, DEFAULT_BATCH_SIZE, DEFAULT_EVAL_BATCH_SIZE = 3, 32, 128
MIN_STEPS, MIN_STEPS_BATCH = 200, 8  # train.min_steps, and the smallest batch it lowers train.batch_size to


def _whole_model(task_type: str, model: str) -> str | None:
    """The kind of whole transformers model (a detector, a segmenter: ``fmtune.models.whole``) ``model`` is for this
    task, or None: such a run takes its own recipes' learning rates."""
    from fmtune.tasks import task_class
    from fmtune.zoo.models import whole_model

    head = task_class(task_type).dense_head
    return whole_model(model, head) if head else None


def default_head_lr(lr: float) -> float:
    return min(lr * HEAD_LR_FACTOR, HEAD_LR_MAX)


def scratch_lr(finetune_lr: float) -> float:
    """fmtune transfer's from-scratch runs need a larger step than fine-tuning: 10x, within [1e-4, 2e-3]."""
    return float(min(max(10 * finetune_lr, 1e-4), 2e-3))


StrategyName = Literal["full", "head", "last_n", "lora", "dora", "ia3", "prompt", "bitfit", "contrastive", "auto"]


@dataclass
class StrategyConfig:
    name: StrategyName | None = _f(
        None, "what is trained (default: full; generation: lora): full = everything (but a text encoder's token "
        "embeddings: strategy.freeze_embeddings), head = linear probe, "
        "last_n = last N blocks + head, lora/dora/ia3 = peft adapters + head, prompt = prompt tuning (text) + head, "
        "bitfit = biases + head, "
        "contrastive = SetFit-style pair training of a text encoder, then a linear head (few labels), "
        "auto = chosen from the labels per class, the number of classes, the model's size and train.max_minutes "
        "(run.json says why)"
    )
    n: int = _f(2, "last_n: number of final backbone blocks to train")
    freeze_embeddings: bool = _f(
        True, "full (and contrastive's pair phase), on a pretrained text encoder: keep its token-embedding matrix "
        "(vocabulary x width: half of MiniLM-L6's weights) as pretrained; position embeddings, norms, every block "
        "and the head still train. "
        "A MiniLM step is 1.13x faster at 10 sentences, 1.14x at 32 (no dense gradient, clipping and AdamW update "
        "over the whole vocabulary), a run 4-17% shorter at the same accuracy (1 epoch of 2,000 rows, 3 seeds, "
        "test accuracy trained / kept: rotten-tomatoes 0.797 / 0.797, tweet-sentiment 0.743 / 0.742, adult "
        "0.841 / 0.841; WNUT-2016 named entities, 2 seeds: entity F1 0.392 / 0.395; contrastive at 8 / 16 rows per "
        "class: the same accuracy within 0.2 point), but a little lower on 40 topic classes (0.647 / 0.643), where it "
        "saves 5%; text regression: RMSE 2.068 / 2.079 on one COMPAS split, equal on two more sets (COMPAS split by "
        "record, Adult hours a week). false: train it too")
    r: int = _f(8, "lora/dora: rank of the weight update")
    alpha: float = _f(16.0, "lora/dora: scaling of the update (alpha / r)")
    dropout: float | None = _f(None, "lora/dora: dropout on the adapter's input (default 0.1; generation: 0, as "
                               "peft draws a mask per adapted layer: 20% of a SmolLM2 LoRA step on a CPU)")
    targets: str | None = _f(
        None, "lora/dora/ia3: modules to adapt, comma-separated names (as printed in errors) or all-linear "
        "(default: per architecture: query,value for BERT-like, q_proj,v_proj for ViT, 1x1/plain convs for CNNs)")
    virtual_tokens: int = _f(20, "prompt: trainable virtual tokens put before every text")
    encoder: Literal["full", "lora"] = _f("full", "contrastive: what the pair training tunes: the whole encoder, or "
                                          "a LoRA adapter (strategy.r, alpha, targets) folded into it afterwards")
    pairs_batch: int = _f(32, "contrastive: rows embedded per step; every pair among them is scored "
                          "(32 rows = 496 pairs), so the cost of a step does not grow with the classes")
    contrastive_steps: int | None = _f(None, "contrastive: steps of pair training (default: each row in about "
                                       "15 batches, 15 to 400 steps; at least 30 from 16 rows per class on)")
    pair_loss: Literal["cosine", "supcon"] = _f("cosine", "contrastive: cosine = SetFit's (squared error of "
                                                "each pair's cosine similarity to 1 same label, 0 different); "
                                                "supcon = supervised contrastive (softmax over the batch)")
    temperature: float = _f(0.1, "contrastive with pair_loss=supcon: softmax temperature of the similarities")

    def __post_init__(self) -> None:
        _check(self.n >= 1, "strategy.n", "must be at least 1")
        _check(self.r >= 1, "strategy.r", "must be at least 1")
        _check(self.alpha > 0, "strategy.alpha", "must be > 0")
        _check(self.dropout is None or 0.0 <= self.dropout < 1.0, "strategy.dropout", "must be in [0, 1)")
        _check(self.virtual_tokens >= 1, "strategy.virtual_tokens", "must be at least 1")
        _check(self.pairs_batch >= 4, "strategy.pairs_batch", "must be at least 4")
        _check(self.temperature > 0, "strategy.temperature", "must be > 0")
        _check(self.contrastive_steps is None or self.contrastive_steps >= 1, "strategy.contrastive_steps",
               "must be at least 1")
        _check(self.targets is None or bool(self.targets.strip(" ,")), "strategy.targets",
               "must name at least one module (or leave it unset for the default)")


@dataclass
class AugmentConfig:
    noise: float = _f(0.0, "images: Gaussian noise on training images, std drawn per image from 0 to this, pixel "
                      "units (e.g. 0.1)")
    corruptions: float = _f(0.0, "images: share of training images given one random corruption of `fmtune "
                            "robustness` (noise, blur, brightness, contrast, JPEG, occlusion) at severity 1-3")
    typos: float = _f(0.0, "text: share of letters hit by a typo in every training text (e.g. 0.05)")
    word_drop: float = _f(0.0, "text: share of words dropped from every training text (e.g. 0.1)")
    snr: float | None = _f(None, "audio: white noise added to every training clip at a signal-to-noise ratio drawn "
                           "between this and 40 dB (e.g. 10); null: none")
    shift: float = _f(0.0, "audio: every training clip starts up to this many seconds later (silence before it)")
    gain: float = _f(0.0, "audio: every training clip louder or quieter by up to this many dB (e.g. 6)")
    geometric: Literal["auto", True, False] = _f(
        "auto", "segmentation and detection: every training image cropped or zoomed and flipped at random, its mask "
        "or boxes with it; auto: on, except when the whole backbone is frozen (strategy head, the baseline run): "
        "then its maps are computed once and cached (digit-scenes, MobileNetV2, 4 epochs: test mIoU 0.220 -> "
        "0.241, mAP 0.068 -> 0.122, training 1.7-2.5x faster)")
    speed: float = _f(0.0, "audio: every training clip played at a speed drawn in [1 - this, 1 + this] (pitch moves "
                      "with it, as in Kaldi's speed perturbation; e.g. 0.1)")

    def __post_init__(self) -> None:
        _check(0 <= self.noise <= 1, "train.augment.noise", "must be in [0, 1]")
        for name in ("corruptions", "typos", "word_drop"):
            _check(0 <= getattr(self, name) < 1, f"train.augment.{name}", "must be in [0, 1)")
        _check(self.snr is None or -10 <= self.snr < 40, "train.augment.snr", "must be in [-10, 40) dB")
        _check(0 <= self.shift <= 10, "train.augment.shift", "must be in [0, 10] seconds")
        _check(0 <= self.gain <= 30, "train.augment.gain", "must be in [0, 30] dB")
        _check(0 <= self.speed < 0.5, "train.augment.speed", "must be in [0, 0.5)")

    def text_on(self) -> bool:
        return bool(self.typos or self.word_drop)

    def image_on(self) -> bool:
        return bool(self.noise or self.corruptions)

    def audio_on(self) -> bool:
        return bool(self.snr is not None or self.shift or self.gain or self.speed)


@dataclass
class TrainConfig:
    epochs: int | None = _f(None, f"passes over the training data (default: {DEFAULT_EPOCHS}, or the task's own: "
                            "detection and segmentation 12)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides epochs)")
    min_steps: int | None = _f(
        MIN_STEPS, "at least this many optimizer steps (every task): a training set too small to give them in "
        f"train.epochs at train.batch_size trains on smaller batches instead (down to {MIN_STEPS_BATCH}); the plan "
        "line says so (null: off). 1,000 rows, 3 epochs: batches of 32 (96 steps) test accuracy 0.791 / 0.727 on "
        "rotten-tomatoes / tweet-sentiment, batches of 15 (201 steps) 0.800 / 0.747")
    max_minutes: float | None = _f(None, "time budget: evaluate, keep the best and stop once training took this long")
    batch_size: int | None = _f(None, f"examples per optimizer step, per accumulation micro-step (default: "
                                f"{DEFAULT_BATCH_SIZE}, or the task's own: named entities, text generation, "
                                "detection and segmentation 8). A batch of the longest training examples whose "
                                "activations would take more than half the memory available (long audio clips, "
                                "long texts on a large model, large images on a vision transformer) trains as "
                                "micro-batches of a divisor of it, grad_accum raised to keep the examples per step; "
                                "the plan says so and config.yaml keeps both")
    eval_batch_size: int | None = _f(None, "examples per forward pass when evaluating or predicting, at most "
                                     f"(default: {DEFAULT_EVAL_BATCH_SIZE}; detection and segmentation 8: a dense "
                                     "model holds 150-250 MB of activations an image at 512 px, and no more images a "
                                     "second on a CPU above 4 an image batch); on a CPU a batch of texts sorted by "
                                     "length is cut where its padding would pass 5% of its tokens; fewer where that "
                                     "many of the longest examples would take more than a quarter of the memory "
                                     "available (30-s clips on a wav2vec2: about 0.6 GB each)")
    optimizer: Literal["adamw", "sgd"] = _f("adamw", "optimizer")
    lr: float | None = _f(None, "learning rate of what trains besides the head (default: per strategy: "
                          + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                          + f"; full and last_n on a BatchNorm CNN (efficientnet-lite0, mobilenet-v2, a ResNet / "
                          f"EfficientNet / MobileNet folder) {CNN_LR:g})")
    head_lr: float | None = _f(None, f"learning rate of the head (default: {HEAD_LR_FACTOR}x lr, at most "
                                   f"{HEAD_LR_MAX:g})")
    head_init: Literal["auto", "probe", "random"] = _f(
        "auto", "probe: start the head from the linear probe solved to convergence on the training features of the "
        "model "
        "as training starts (logistic / ridge regression, regularisation by cross-validation, as the baseline). "
        "Where the body trains too (linear probing, then fine-tuning: LP-FT) the probe reads a sample of "
        f"{PROBE_INIT_PER_LABEL} rows per label or one training row in {PROBE_INIT_SHARE}, whichever is more, "
        f"{PROBE_INIT_MIN_ROWS:,} to {PROBE_INIT_ROWS:,} rows, and is a start, "
        "not the head. It is validated "
        "before the first epoch, so the run keeps it unless training does better on validation. Full fine-tuning "
        "of MiniLM, 40 classes x 64 rows: test accuracy 0.52 from a random head, 0.66 from the probe (2 seeds). "
        f"random: a fresh head. auto: the probe, but a random head for {' and '.join(RANDOM_HEAD_ADAPTERS)} on a "
        "binary single-label task (their adapters learned less from a probe start: MiniLM LoRA on rotten-tomatoes, "
        "3 seeds, test accuracy 0.750 from the probe, 0.781 from a random head; level on 3 classes, the probe "
        "ahead on 40)")
    weight_decay: float = _f(0.01, "decoupled weight decay (not applied to biases and norms)")
    layer_lr_decay: float | None = _f(None, "layer-wise learning-rate decay: the backbone's last block trains at "
                                      "lr x this, each block below at this factor more, the embeddings below the "
                                      "first block at one more (the head at its own head_lr; null: every layer at lr; "
                                      "an error on a model without repeated blocks, such as a causal LM). "
                                      "Off by default: "
                                      "MiniLM full fine-tuning, 1 epoch of 2,000 rows, 3 seeds, test accuracy "
                                      "rotten-tomatoes 0.797 off, 0.793 at 0.9, 0.795 at 0.8 with lr 1e-4; "
                                      "tweet-sentiment 0.743, 0.736, 0.739")
    momentum: float = _f(0.9, "sgd: momentum")
    scheduler: Literal["linear", "cosine", "constant"] = _f("linear", "learning-rate decay after warm-up")
    warmup_ratio: float = _f(0.06, "share of steps spent warming the learning rate up from 0")
    grad_clip: float | None = _f(1.0, "clip the gradient norm to this value (null: no clipping)")
    grad_accum: int = _f(1, "accumulate gradients over this many batches per optimizer step")
    packing: bool = _f(False, "text generation: a batch's examples run as one sequence, end to end, with attention "
                       "kept within each example and positions restarting: no padding at all (prompt tuning, and "
                       "models that would read one example into the next, OPT, BLOOM, Mamba: refused)")
    gradient_checkpointing: Literal["auto", True, False] = _f(
        "auto", "text generation: recompute each decoder layer in the backward pass instead of keeping its "
        "activations (SmolLM2-135M, 8 x 256 tokens: 6.0 -> 1.6 GB, +53% step time); auto: on when the largest "
        "training batch would hold more than half the memory available")
    eval_every: int | None = _f(None, "evaluate every K optimizer steps (default: every epoch)")
    metric: str = _f("auto", "validation metric for early stopping and the best checkpoint (auto: per task)")
    patience: int | None = _f(3, "stop after this many evaluations without improvement (null: never)")
    min_delta: float = _f(0.0, "smallest change of the metric that counts as an improvement")
    save_every_minutes: float = _f(5.0, "also write the resume checkpoint (state/) this often between evaluations")
    save_every_steps: int | None = _f(None, "also write the resume checkpoint every K optimizer steps")
    log_every: int = _f(10, "log train loss, learning rate and throughput every K optimizer steps")
    baseline: bool = _f(False, "with a test set: also score the pretrained baseline (linear probe, frozen backbone)")
    seed: int = _f(42, "seed for data splits, order, initialisation and dropout")
    tracker: Literal["tensorboard", "mlflow", "wandb"] = _f(
        "tensorboard", "also log to MLflow (local file store runs/mlruns) or Weights & Biases (offline); "
        "TensorBoard logs (tb/) are always written")
    feature_cache: Literal["auto", "fp32", "fp16", "off"] = _f(
        "auto", "compute the frozen part of the backbone once and train only the rest (head, last_n); "
        "auto stores it as fp16 when the run trains in bf16/fp16 on this hardware (half the disk and "
        "memory; values beyond fp16's range keep fp32), else fp32; fp32/fp16 force the storage")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = _f(
        "auto", "training: auto = bf16 on CPUs with native bf16 (AMX / AVX512-BF16), fp32 on the others; on "
        "GPUs that have bf16, kept where a timed training batch says it is faster; prediction, evaluation and "
        "serving of the run: auto = bf16 on a CPU with AMX, else fp32 (--precision on predict, evaluate, fairness "
        "and serve overrides it)"
    )
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where to train")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    adversarial: Literal["none", "fgsm", "pgd"] = _f(
        "none", "images: add adversarial copies of every batch to it: fgsm (from a random start, step 1.25 eps) "
        "or pgd (3 steps of eps/2)")
    adversarial_eps: float = _f(0.0078, "images: L-inf budget of the adversarial copies, pixel units (2/255)")
    num_threads: int | None = _f(None, "CPU threads (default: physical cores)")
    fast_dropout: bool = _f(True, "on a CPU, dropout masks drawn four elements per random number (keep probability "
                            "exact to 1/32768) instead of torch's per-element Bernoulli; false: torch's dropout")
    loader_threads: int | None = _f(
        None, "background threads that collate the next batches while the model computes (default: none on a "
        "CPU, whose cores all compute; on a GPU up to 4, with pinned memory); 0 = collate inline")
    distributed: Literal["ddp", "fsdp"] = _f(
        "ddp", "several processes (--num-processes): ddp = a whole model per process; fsdp = weights, gradients "
        "and optimizer state sharded over them (torch FSDP2, one unit per backbone block), for models too big "
        "for one device")

    def __post_init__(self) -> None:
        _check(self.epochs is None or self.epochs >= 1, "train.epochs", "must be at least 1")
        _check(self.max_steps is None or self.max_steps >= 1, "train.max_steps", "must be at least 1")
        _check(self.min_steps is None or self.min_steps >= 1, "train.min_steps", "must be at least 1 or null")
        _check(self.max_minutes is None or self.max_minutes > 0, "train.max_minutes", "must be > 0")
        _check(self.batch_size is None or self.batch_size >= 1, "train.batch_size", "must be at least 1")
        _check(self.eval_batch_size is None or self.eval_batch_size >= 1, "train.eval_batch_size",
               "must be at least 1")
        _check(self.loader_threads is None or self.loader_threads >= 0, "train.loader_threads", "must be >= 0")
        _check(self.lr is None or self.lr > 0, "train.lr", "must be > 0")
        _check(self.head_lr is None or self.head_lr > 0, "train.head_lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(self.layer_lr_decay is None or 0 < self.layer_lr_decay <= 1, "train.layer_lr_decay", "must be in (0, 1]")
        _check(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be > 0 or null")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be at least 1")
        _check(self.eval_every is None or self.eval_every >= 1, "train.eval_every", "must be at least 1")
        _check(self.patience is None or self.patience >= 1, "train.patience", "must be at least 1 or null")
        _check(0 < self.adversarial_eps <= 1, "train.adversarial_eps", "must be in (0, 1]")


@dataclass
class ContinualConfig:
    source: str | None = _f(None, "the finished run this one continues from (set by `fmtune continue`): its model, "
                            "labels and old data")
    method: Literal["replay", "ewc", "lwf", "naive"] = _f(
        "replay", "against forgetting: replay = old examples (the memory) mixed into training, ewc = elastic "
        "weight consolidation, lwf = distillation from the previous model, naive = plain fine-tuning")
    memory: int = _f(1000, "old examples kept in the run directory (class-balanced; replay trains on them, ewc "
                     "estimates the Fisher on them, later runs inherit them)")
    ewc_lambda: float | None = _f(None, "ewc: strength of the penalty (default: old examples / new examples, "
                                  "the Laplace approximation's weight)")
    fisher_samples: int = _f(256, "ewc: memory examples the Fisher information is estimated on")
    lwf_alpha: float = _f(1.0, "lwf: weight of the distillation loss")
    lwf_temperature: float = _f(2.0, "lwf: softmax temperature of the distillation")
    task_name: str | None = _f(None, "name of the new task in continual.json (default: the training file's name)")

    def __post_init__(self) -> None:
        _check(self.memory >= 0, "continual.memory", "must be >= 0")
        _check(self.ewc_lambda is None or self.ewc_lambda >= 0, "continual.ewc_lambda", "must be >= 0")
        _check(self.fisher_samples >= 1, "continual.fisher_samples", "must be at least 1")
        _check(self.lwf_alpha >= 0, "continual.lwf_alpha", "must be >= 0")
        _check(self.lwf_temperature > 0, "continual.lwf_temperature", "must be > 0")


@dataclass
class SemiConfig:
    unlabeled: str | None = _f(None, "self-training: a CSV/JSONL/Parquet of unlabelled texts (a label column, if "
                               "any, is only used to say how many pseudo-labels were right)")
    rounds: int = _f(2, "self-training: rounds after the first run, each trained again on the labelled rows plus "
                     "the pseudo-labelled ones")
    threshold: float = _f(0.0, "self-training: smallest predicted probability of a pseudo-label (0: none; the most "
                          "probable rows of every class are taken in any case)")
    per_round: int | None = _f(None, "self-training: pseudo-labelled rows added per class and round (default: twice "
                               "the labelled rows of the rarest class, at least 8)")

    def __post_init__(self) -> None:
        _check(self.rounds >= 1, "semi.rounds", "must be at least 1")
        _check(0.0 <= self.threshold < 1.0, "semi.threshold", "must be in [0, 1)")
        _check(self.per_round is None or self.per_round >= 1, "semi.per_round", "must be at least 1")


@dataclass
class EvalConfig:
    max_new_tokens: int = _f(64, "generation: most tokens generated per answer when evaluating")
    samples: int = _f(48, "generation: validation rows answered (greedy, batched, KV cache) at every evaluation "
                      "and scored with ROUGE / exact match (a fixed, seeded sample; loss and perplexity use every row)")
    test_samples: int | None = _f(200, "generation: test rows answered at the end, by the baseline and the fine-tuned "
                                  "model (null: all)")

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be at least 1")
        _check(self.samples >= 1, "eval.samples", "must be at least 1")
        _check(self.test_samples is None or self.test_samples >= 1, "eval.test_samples", "must be at least 1")


@dataclass
class Config:
    name: str | None = _f(None, "run name (default: <model>-<strategy>-<timestamp>)")
    out: str | None = _f(None, "run directory (default: runs/<name>)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: dict[str, Any] = _f({}, "fmtune search: the space, {dotted key: {type: float|int|categorical, low, high, "
                                "log, step, choices}}; e.g. train.lr: {type: float, low: 1e-5, high: 1e-3, log: true}")

    def __post_init__(self) -> None:
        from fmtune.tasks import task_class

        generates = task_class(self.task.type).level == "lm"  # defaults that depend on the task
        if self.strategy.name is None:  # a causal LM is tuned with LoRA
            self.strategy.name = "lora" if generates else "full"
        if self.strategy.dropout is None:
            self.strategy.dropout = GENERATION_LORA_DROPOUT if generates else LORA_DROPOUT
        _check(not (self.model.init == "random" and self.strategy.name in ("lora", "dora", "ia3", "prompt")),
               "model.init", "random: an adapter keeps the backbone frozen at its pretrained weights and is saved "
               "without them; train a random backbone with strategy full")
        _check(not self.train.packing or (generates and task_class(self.task.type).modality != "audio"),
               "train.packing", "packs the token sequences of text generation; this task does not train on them")
        _check(not (self.train.packing and self.strategy.name == "prompt"), "train.packing",
               "prompt tuning puts its virtual tokens before each row: they cannot be packed; drop one of the two")
        if self.train.lr is None and self.strategy.name != "auto":  # resolved here, so config.yaml says it
            self.train.lr = default_lr(self.strategy, self.task.type, self.model.name)
        own = task_class(self.task.type).default_train
        if self.train.epochs is None:
            self.train.epochs = own.get("epochs", DEFAULT_EPOCHS)
        if self.train.batch_size is None:
            self.train.batch_size = own.get("batch_size", DEFAULT_BATCH_SIZE)
        if self.train.eval_batch_size is None:
            self.train.eval_batch_size = own.get("eval_batch_size", DEFAULT_EVAL_BATCH_SIZE)
        whole = _whole_model(self.task.type, self.model.name) if self.train.head_lr is None else None
        if whole is not None:
            from fmtune.models.whole import LRS

            self.train.head_lr = LRS[whole][1]
        if self.train.head_lr is None and task_class(self.task.type).default_head_lr is not None:
            self.train.head_lr = task_class(self.task.type).default_head_lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return value
    if origin is list:  # a YAML list, or its items in one comma-separated string
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ConfigError(f"{key}: expected a list (or comma-separated values), got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_convert(v.strip() if isinstance(v, str) else v, inner, key) for v in items]
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {type(value).__name__}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "3e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def from_dict(data: dict[str, Any] | None) -> Config:
    """Build a validated Config from a (possibly partial) nested dict."""
    return _build(Config, data or {})


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c = value`` in a nested dict, creating sections as needed."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (numbers, true/false, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.lr=3e-5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict[str, Any] | None = None) -> Config:
    """Load a YAML config (optional), apply ``base`` then ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping of config sections at the top level")
        data = loaded or {}
    for k, v in (base or {}).items():
        set_dotted(data, k, v)
    for text in overrides or []:
        set_dotted(data, *parse_override(text))
    return from_dict(data)


def coerce(cfg: Config | dict[str, Any] | str | Path) -> Config:
    """A Config as given, built from a dict, or loaded from a YAML path."""
    if isinstance(cfg, Config):
        return cfg
    return from_dict(cfg) if isinstance(cfg, dict) else load(cfg)


def describe() -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every setting; used by `fmtune config`."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            if cls is Config and f.name in _SECTIONS:
                walk(_SECTIONS[f.name], key + ".")
                continue
            if f.name == "augment":
                walk(AugmentConfig, key + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((key, yaml.safe_dump(default).strip().removesuffix("...").strip(), f.metadata.get("help", "")))

    walk(Config, "")
    return rows


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "task": TaskConfig, "continual": ContinualConfig,
             "strategy": StrategyConfig, "train": TrainConfig, "semi": SemiConfig, "eval": EvalConfig}
