"""``fmtune export``: a trained run's model as a folder that other tools load.

- plain runs (full, head, last_n, bitfit): the run's model folder, a transformers model
  (``AutoModelFor...Classification.from_pretrained(dir, trust_remote_code=True)``);
- adapter runs (lora, dora, ia3, prompt): the peft adapter folder (``PeftModel.from_pretrained``
  on the base model), or with ``merge`` the plain model with the adapter folded into its
  weights, loadable without peft;
- ``onnx`` / ``onnx-int8``: ``model.onnx`` (dynamic batch and sequence axes; int8: dynamic
  quantisation by onnxruntime) with ``preprocessing.json`` and the tokenizer (a whole RT-DETR-like
  detector: one image per run, ``onnx_export._export_set_model``); a decoder-only generation run:
  ``prefill.onnx`` and ``decode.onnx`` (``onnx_export.export_generation``), checked on greedy answers.

Every export is loaded back and compared with the run's model on real rows of the run's data;
a difference above ``tolerance`` (int8: a drop of the test metric above ``max_drop``) fails the
export and nothing is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from fmtune import adapters, ui
from fmtune.data.prepare import make_dataset, read_data, read_frames
from fmtune.errors import ConfigError, DataError, ModelError, RunDirError
from fmtune.fairness import THRESHOLDS_FILE, read_thresholds
from fmtune.fsutil import atomic_dir, folder_digest, read_json
from fmtune.models import build
from fmtune.models.whole import DETECTOR
from fmtune.onnx_export import MODEL_FILE, OnnxModel, export_onnx, quantize_int8, write_preprocessing
from fmtune.run import open_run
from fmtune.training.infer import infer

CHECK_ROWS = 64


def check_rows(opened: Any) -> Any:
    """Up to CHECK_ROWS real inputs from the run's data (test, else val, else train), as a dataset."""
    cfg = opened.config
    for source in (cfg.data.test, cfg.data.val, cfg.data.train):
        if source and Path(source).exists():
            df = read_data(Path(source), opened.task, cfg.data, split=None)  # (any rows: their inputs are read)
            return make_dataset(df.head(CHECK_ROWS), opened.bundle, opened.task, cfg.data, with_targets=False)[0]
    raise DataError(f"{opened.dir}: none of the run's data files exist any more ({cfg.data.test}, {cfg.data.val}, "
                    f"{cfg.data.train}); the export cannot be checked against real inputs")


def output_difference(task: Any, a: torch.nn.Module, b: torch.nn.Module, ds: Any) -> float:
    """How far the two models' outputs on ``ds`` are apart, as the task measures it (``Task.output_difference``)."""
    if not len(ds):
        return 0.0
    return task.output_difference(infer(a, ds, 32)[0], infer(b, ds, 32)[0])


FORMATS = ("hf", "onnx", "onnx-int8")


def _plain(opened: Any) -> Any:
    """A freshly loaded copy of the run's model with any adapter merged in (prompt tuning cannot be)."""
    bundle = build.load(opened.dir / "model")
    if bundle.adapter:
        bundle = dataclasses.replace(bundle, model=adapters.merge(bundle.model, bundle.adapter), adapter=None)
    return bundle


def _metric_split(opened: Any) -> tuple[Any, str]:
    """The run's labelled test split, else its validation split (the same seeded split as in
    training when it was split off the training data), for the int8 metric check."""
    cfg = opened.config
    if cfg.data.test:  # the training file is read (and split again) only when there is no test file
        df, source = read_data(Path(cfg.data.test), opened.task, cfg.data), cfg.data.test
    else:
        frames = read_frames(cfg.data, cfg.task.type, cfg.train.seed)
        df, source = frames.val, cfg.data.val or f"validation split of {cfg.data.train}"
    ds = make_dataset(df, opened.bundle, opened.task, cfg.data, allow_unknown=cfg.data.unknown_labels == "unknown")[0]
    return ds, str(source)


def export(run: str | Path, out: str | Path | None = None, *, format: str = "hf", merge: bool = False,
           overwrite: bool = False, tolerance: float = 1e-4, max_drop: float = 0.01,
           quiet: bool = False) -> dict[str, Any]:
    """Write the run's model to ``out`` (default ``RUN/export/<kind>``) and check it against the run's
    model on real rows of its data; returns what was written and what was measured (also saved as
    ``export.json`` in the folder).

    ``format``: ``hf`` (the model folder, or with ``merge`` the adapter folded in), ``onnx``
    (outputs within ``tolerance``), ``onnx-int8`` (dynamic int8; refused when the run's main test
    metric drops by more than ``max_drop``)."""
    if format not in FORMATS:
        raise ConfigError(f"--format: {format!r} is not one of {', '.join(FORMATS)}")
    opened = open_run(run)
    bundle = opened.bundle
    if format != "hf":
        kind = format
    else:
        kind = "merged" if merge and bundle.adapter else ("adapter" if bundle.adapter else "model")
    target = Path(out) if out is not None else opened.dir / "export" / kind
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise RunDirError(f"{target} already exists; pass --overwrite to replace it, or -o another folder")
    if opened.task.level == "lm":  # generation: a transformers folder or ONNX graphs, checked on generated answers
        if format == "onnx-int8":
            raise ConfigError("--format onnx-int8: a generation run exports as a Hugging Face folder (--format hf; "
                              "--merge folds a LoRA/DoRA/IA3 adapter in) or as ONNX (--format onnx), not int8")
        from fmtune.generation import export_run

        return export_run(opened, target, kind, quiet)
    ds = check_rows(opened)
    reference = bundle
    result: dict[str, Any] = {"run": str(opened.dir), "model_version": folder_digest(opened.dir / "model"),
                              "out": str(target), "format": format, "kind": kind,
                              "strategy": bundle.adapter or opened.config.strategy.name, "checked_rows": len(ds)}
    if kind in ("merged", "model"):
        plain = _plain(opened) if kind == "merged" else bundle

        def write(tmp: Path) -> None:
            if kind == "merged":
                build.save(plain, tmp)
            else:
                shutil.copytree(opened.dir / "model", tmp, dirs_exist_ok=True)
            # the encoder alone, where sentence-transformers users expect it
            result["sentence_transformers"] = build.ST_FOLDER if build.sentence_transformer_layout(
                plain, tmp / build.ST_FOLDER) else None

        exported = lambda tmp: build.load(tmp).model  # noqa: E731
    elif kind == "adapter":
        write = lambda tmp: shutil.copytree(opened.dir / "model", tmp, dirs_exist_ok=True)  # noqa: E731
        exported = lambda tmp: build.load(tmp).model  # noqa: E731
    else:
        if bundle.adapter == "prompt":
            raise ConfigError("--format onnx: prompt-tuned runs cannot be exported to ONNX (the virtual tokens are "
                              "not part of the weights); serve them with the torch backend")
        plain = _plain(opened)
        sample = ds.collate([i % len(ds) for i in range(max(2, min(len(ds), 4)))])  # >1 row: a dynamic batch axis

        def write(tmp: Path) -> None:
            fp32 = tmp / MODEL_FILE if kind == "onnx" else tmp / "fp32.onnx"
            fixed = export_onnx(plain.model, plain.kind, sample, fp32, plain.audio)
            if fixed is not None:  # (RT-DETR and its successors: one image at a time)
                result["batch_size"] = fixed
            if kind == "onnx-int8":
                quantize_int8(fp32, tmp / MODEL_FILE)
                fp32.unlink()
            write_preprocessing(plain, opened.task, tmp, bool(opened.config.data.text_pair_column), fixed)

        exported = lambda tmp: OnnxModel(tmp / MODEL_FILE)  # noqa: E731

    cut = opened.task.decision_thresholds()
    if cut is not None:  # multi-label: a label is predicted above its threshold; detection: a box is returned from
        # its class's score (task.thresholds=auto: chosen on validation)
        result["label_thresholds"] = {k: round(v, 6) for k, v in cut.items()}
    rules = read_thresholds(opened.dir) if opened.task.supports("fairness") else None
    if rules is not None:  # fmtune fairness --fit-thresholds: the decision rule travels with the model
        result["decision_thresholds"] = {
            "file": THRESHOLDS_FILE, "columns": rules["columns"], "constraint": rules["constraint"],
            "rule": f"per group of {', '.join(rules['columns'])}: predict {rules['positive']!r} when its probability "
                    "is above threshold0 (operator0) for a share p0 of inputs, else above threshold1; the share is "
                    "drawn from the first 8 bytes of sha256(input text) as a number in [0, 1) "
                    "(fmtune.fairness.apply_thresholds); a group without a rule: the most probable label"}

    def build_and_check(tmp: Path) -> None:
        write(tmp)
        if rules is not None:
            shutil.copyfile(opened.dir / THRESHOLDS_FILE, tmp / THRESHOLDS_FILE)
        model = exported(tmp)
        diff = output_difference(opened.task, reference.model, model, ds)
        result["max_abs_diff"] = diff
        if kind == "onnx-int8":
            _check_metric(opened, reference.model, model, max_drop, result)
        elif not diff <= tolerance:
            why = (" (this detector picks its queries by a top-k of scores: where they tie to float precision, as a "
                   "barely trained detector's can, onnxruntime may pick other locations)"
                   if getattr(adapters.base_model(bundle.model), "kind", None) == DETECTOR else "")
            raise ModelError(f"export check failed: the exported model's outputs differ from the run's by {diff:.3g} "
                             f"(> {tolerance:g}) on {len(ds)} rows of the run's data{why}; nothing was written")
        (tmp / "export.json").write_text(json.dumps(result, indent=2))

    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.nullcontext() if quiet else ui.console.status(f"export {kind}: writing and checking"):
        atomic_dir(target, build_and_check)
    if not quiet:
        loader = ("transformers (trust_remote_code=True; without it transformers refuses, it never loads a stock model)"
                  if bundle.family == "hf" else "fmtune.load")
        if read_json(target / build.META_FILE, {}).get("layout") == build.TOKEN_LAYOUT:
            loader = "transformers' AutoModelForTokenClassification (no remote code)"
        if getattr(adapters.base_model(bundle.model), "whole", False):  # (models.whole: the model's own class)
            loader = f"transformers' {type(adapters.base_model(bundle.model).net).__name__} (no remote code)"
        how = {"merged": f"adapter merged into the weights; loads with {loader}, no peft needed",
               "adapter": "peft adapter folder: PeftModel.from_pretrained on the base model",
               "model": f"loads with {loader}" + ("; nothing to merge" if merge else ""),
               "onnx": "onnxruntime; preprocessing.json says how to prepare inputs",
               "onnx-int8": "onnxruntime, int8 weights; preprocessing.json says how to prepare inputs"}[kind]
        ui.console.print(f"exported {opened.dir} -> {target} ({how}); max |difference| to the run's model "
                         f"{result['max_abs_diff']:.2e} on {len(ds)} rows")
        if result.get("batch_size"):
            ui.console.print(f"  the graph's batch size is fixed at {result['batch_size']} (torch.export cannot "
                             "keep this model's batch dynamic): run it on one image at a time, as fmtune's onnx "
                             "backend does")
        if result.get("sentence_transformers"):
            ui.console.print(f"  the encoder alone, for sentence-transformers: {target / build.ST_FOLDER} "
                             "(SentenceTransformer(folder) embeds as the head reads; no remote code)")
        if rules is not None:
            ui.console.print(f"  with the run's per-group decision thresholds ({THRESHOLDS_FILE}; export.json says "
                             "how to apply them)")
        if "metric" in result:
            m = result["metric"]
            ui.console.print(f"  {m['name']} on {m['data']}: {m['torch']:.4f} -> {m['exported']:.4f} with int8 "
                             f"(change {m['exported'] - m['torch']:+.4f}; refused beyond -{max_drop:g})")
    return result


def _check_metric(opened: Any, reference: torch.nn.Module, model: torch.nn.Module, max_drop: float,
                  result: dict[str, Any]) -> None:
    task = opened.task
    split, source = _metric_split(opened)
    name = task.default_metric
    ref_logits, targets = infer(reference, split, 64)
    new_logits, _ = infer(model, split, 64)
    a, b = task.metrics(ref_logits, targets)[name], task.metrics(new_logits, targets)[name]
    drop = round((a - b) if task.greater_is_better(name) else (b - a), 9)  # 0.7225 - 0.7125 is 0.010000000000000009
    result["metric"] = {"name": name, "data": source, "rows": len(split), "torch": a, "exported": b, "drop": drop}
    if drop > max_drop:
        raise ModelError(f"int8 export refused: test {name} on {source} drops from {a:.4f} to {b:.4f} "
                         f"(by {drop:.4f}, more than --max-drop {max_drop:g}); nothing was written. Use --format onnx, "
                         "or allow a larger drop")
