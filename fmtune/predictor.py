"""``fmtune.load(RUN)``: a trained run loaded once, predicting new inputs.

    predictor = fmtune.load("runs/my-run")
    predictor.predict(["a great film", "dull and long"])   # -> [{"label": ..., "score": ..., ...}, ...]
    predictor.predict("photo.jpg")                          # image runs: paths, PIL images or bytes
    predictor.predict("clip.wav")                           # audio runs: paths or bytes

The same preprocessing as in training (tokenizer and max length, or image size and
normalisation) and the same postprocessing as ``fmtune predict``. Used by ``fmtune predict``
and ``fmtune serve``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtune.data.dataset import ImageData, TextData
from fmtune.errors import ConfigError, DataError
from fmtune.fairness import read_thresholds
from fmtune.fsutil import folder_digest, read_json
from fmtune.run import EVAL_FILE, exported_from, open_run
from fmtune.training.hardware import inference_autocast, precision_name
from fmtune.training.infer import infer, model_device


class Predictor:
    """A trained run's model with its preprocessing; ``predict`` takes raw inputs."""

    def __init__(self, run: str | Path, batch_size: int | None = None, backend: str = "torch",
                 precision: str | None = None):
        """``precision``: what the torch model predicts in, auto / fp32 / bf16 (default: the run's
        ``train.precision``; auto is bf16 on a CPU with AMX, else fp32: ``hardware.inference_autocast``)."""
        opened = open_run(run)
        if opened.task.level == "lm" and opened.task.modality != "audio":
            raise ConfigError(f"{run} is a text generation run: answer prompts with  fmtune generate {run} --prompt "
                              "TEXT  (or --file FILE), or serve it (fmtune serve: POST /generate)")
        self.run_dir = opened.dir
        self.config, self.task, self.bundle = opened.config, opened.task, opened.bundle
        self.kind = self.bundle.kind
        self.pair_column = getattr(self.config.data, "text_pair_column", None)  # a run on pairs of texts
        self.batch_size = batch_size or self.config.train.eval_batch_size
        self.backend = backend
        if self.task.level == "lm" and backend != "torch":
            raise ConfigError(f"{run}: a {self.task.name} run transcribes with its torch model; backend {backend!r} "
                              "is for classifiers and taggers")
        # per-group decision thresholds fitted by fmtune fairness --fit-thresholds (None: the model decides)
        self.thresholds = read_thresholds(self.run_dir) if self.task.supports("fairness") else None
        if backend == "torch":
            self.model = self.bundle.model.eval()
            self.version = folder_digest(self.run_dir / "model")
        elif backend in ("onnx", "onnx-int8"):
            from fmtune.exporter import export
            from fmtune.onnx_export import MODEL_FILE, OnnxModel

            folder = self.run_dir / "export" / backend
            if exported_from(folder) != folder_digest(self.run_dir / "model"):  # none yet, or of older weights
                export(self.run_dir, format=backend, overwrite=True, quiet=True)
            self.model = OnnxModel(folder / MODEL_FILE)
            self.version = folder_digest(folder)
            if self.kind == "text":
                self.bundle.uses_segments()  # decided on the torch model, which goes now
            self.bundle.model = None  # the torch weights are not needed beside onnxruntime's
        else:
            raise ConfigError(f"backend {backend!r} is not one of torch, onnx, onnx-int8")
        torch_predicts = backend == "torch" and self.task.level != "lm"  # (onnxruntime, a transcribing run: fp32)
        self.autocast = inference_autocast(precision or self.config.train.precision,
                                           model_device(self.model).type if torch_predicts else None)

    @property
    def labels(self) -> list[str]:
        return list(self.task.labels or [])

    def metadata(self) -> dict[str, Any]:
        metrics = read_json(self.run_dir / EVAL_FILE, {}).get("test")
        return {"run": self.run_dir.name, "model_version": self.version, "backend": self.backend,
                "model": self.config.model.name,
                "kind": self.kind, "task": self.task.name, "labels": self.labels,
                "precision": precision_name(self.autocast),
                # multi-label: the probability above which each label is predicted; detection: the score from which
                # a box is returned (per class); None elsewhere
                "thresholds": self.task.decision_thresholds(),
                "strategy": self.config.strategy.name, "max_length": self.bundle.max_length if self.kind == "text"
                else None, "image_size": self.bundle.image.get("size"), "test_metrics": metrics}

    # --- inputs -> a dataset ------------------------------------------------------------------
    def check_text(self, value: Any, where: str) -> str | tuple[str, str]:
        if self.pair_column:  # a run on pairs: two texts, as (first, second)
            if not (isinstance(value, (list, tuple)) and len(value) == 2):
                raise DataError(f"{where}: this run reads pairs of texts ({self.config.data.text_column}, "
                                f"{self.pair_column}): give two texts, e.g. [\"first\", \"second\"]")
            return tuple(self._one_text(v, f"{where} (text {k + 1})") for k, v in enumerate(value))
        return self._one_text(value, where)

    def _one_text(self, value: Any, where: str) -> Any:
        if value is None or (isinstance(value, float) and value != value):  # missing (NaN) cell
            raise DataError(f"{where}: the text is empty")
        if self.task.accepts_word_lists and isinstance(value, (list, tuple, np.ndarray)):  # words already split
            value = list(value)  # a Parquet list cell is an array
            if not value or not all(isinstance(w, str) and w.strip() for w in value):
                raise DataError(f"{where}: expected a non-empty list of words")
            return value
        if not isinstance(value, str):
            raise DataError(f"{where}: expected text, got {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{where}: the text is empty")
        return value

    def text_data(self, texts: list[str]) -> TextData:
        return self.task.inputs(texts, self.bundle)

    def decode(self, value: Any, where: str) -> Any:
        """One image from a path, bytes or a PIL image -> uint8 (3, size, size); one audio clip from a
        path or bytes -> its mono waveform at the model's rate. DataError if it is not one. A Hugging
        Face Parquet cell ({"bytes": ..., "path": ...}) is its bytes."""
        from fmtune.data.readers import embedded, file_like

        value = embedded(value) or (value.get("path") if isinstance(value, dict) else value)
        if self.kind == "audio":
            from fmtune.data.audio import load_audio

            return load_audio(value, int(self.bundle.audio["sampling_rate"]), where)
        source = file_like(value)
        if isinstance(value, (str, Path)) and not Path(value).is_file():
            raise DataError(f"{where}: no such image file: {value}")
        try:
            return self.task.image_input(source, self.bundle)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for non-images and truncated files
            raise DataError(f"{where}: not a readable image ({e.__class__.__name__}: {e})") from None

    def image_data(self, images: list[torch.Tensor]) -> ImageData:
        return self.task.inputs(images, self.bundle)

    # --- predictions --------------------------------------------------------------------------
    def predict_items(self, items: list[Any]) -> list[dict[str, Any]]:
        """Predictions for checked texts (``check_text``) or decoded images (``decode``)."""
        ds = self.task.inputs(items, self.bundle)
        if self.task.level == "lm":  # a model that generates (speech recognition): the task decodes
            from fmtune.generation import lm_net

            return self.task.generate_records(lm_net(self.bundle), ds, self.batch_size, model_device(self.model))
        logits, _ = infer(self.model, ds, self.batch_size, autocast_dtype=self.autocast)
        return self.task.postprocess(logits, ds)

    def embed(self, texts: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(pooled embeddings, probabilities) of ``texts`` (of (first, second) pairs for a run on
        pairs) in one pass: the head is applied to the features (active learning ranks by both,
        self-training reads the probabilities)."""
        from fmtune.adapters import base_model

        if self.backend != "torch":
            raise ConfigError(f"embeddings come from the torch model, not the {self.backend} export")
        ds = self.text_data([self.check_text(t, f"row {i}") for i, t in enumerate(texts)])
        feats, _ = infer(self.model, ds, self.batch_size, features=True, autocast_dtype=self.autocast)
        with torch.no_grad():
            logits = base_model(self.model).classify(feats.to(model_device(self.model))).float().cpu()
        return feats.numpy(), logits.softmax(-1).numpy()

    def predict(self, inputs: Any) -> list[dict[str, Any]] | dict[str, Any]:
        """Predict one input or a list of them (texts, or (first, second) pairs of texts for a run
        on pairs; or image paths, bytes or PIL images). One input gives one dict, a list gives a list."""
        single = isinstance(inputs, (str, bytes, Path)) or not isinstance(inputs, (list, tuple)) or (
            bool(self.pair_column) and isinstance(inputs, tuple) and len(inputs) == 2
            and all(isinstance(v, str) for v in inputs))  # one pair of texts
        items = [inputs] if single else list(inputs)
        if not items:
            return []
        check = self.check_text if self.kind == "text" else self.decode
        out = self.predict_items([check(v, f"input {i}") for i, v in enumerate(items)])
        return out[0] if single else out


def load(run: str | Path, batch_size: int | None = None, backend: str = "torch",
         precision: str | None = None) -> Predictor:
    return Predictor(run, batch_size, backend, precision)
