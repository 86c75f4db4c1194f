"""ONNX export (torch.onnx, dynamo exporter) with dynamic batch and sequence axes, dynamic int8
quantisation (onnxruntime), and an onnxruntime-backed model that fmtune's inference loop runs
like the torch one.

An export folder holds ``model.onnx`` and what is needed to use it without fmtune:
``preprocessing.json`` (kind, task, labels, text max length or image size / mean / std) and the
tokenizer files for text models.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fmtune.errors import ModelError

MODEL_FILE, PREP_FILE = "model.onnx", "preprocessing.json"


class TextLogits(nn.Module):
    """Tensors in, logits out: the graph ONNX exports, and what captum attributes (fmtune.explain)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


class _ImageLogits(TextLogits):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(pixel_values=pixel_values).logits


def input_names(kind: str) -> list[str]:
    return ["input_ids", "attention_mask"] if kind == "text" else ["pixel_values"]


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs each stage and warns about optional torchvision ops."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    loggers.append(logging.getLogger())  # onnxruntime.quantization logs to the root logger
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(model: nn.Module, kind: str, sample: dict[str, torch.Tensor], path: Path) -> None:
    """Export a plain (adapter-free) task model to ``path`` with dynamic batch (and sequence) axes."""
    names = input_names(kind)
    args = tuple(sample[n] for n in names)
    batch = torch.export.Dim("batch", min=1)
    if kind == "text":
        seq = torch.export.Dim("seq", min=1)
        shapes: Any = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    else:
        shapes = {"pixel_values": {0: batch}}
    wrapper = (TextLogits(model) if kind == "text" else _ImageLogits(model)).eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["logits"], dynamo=True,
                              dynamic_shapes=shapes, external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many kinds
        raise ModelError(f"ONNX export failed for {type(model).__name__}: {e.__class__.__name__}: {e}") from None


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights of MatMul/Gemm (and Conv) nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name("prepared.onnx")
    with _quiet_exporter():
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # graph clean-up, as onnxruntime advises
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
    prepared.unlink()


def write_preprocessing(bundle: Any, task: Any, folder: Path) -> None:
    prep = {"kind": bundle.kind, **task.state(), "inputs": input_names(bundle.kind), "output": "logits"}
    if bundle.kind == "text":
        prep["max_length"] = bundle.max_length
        bundle.tokenizer.save_pretrained(folder)
    else:
        prep["image"] = bundle.image  # RGB, shorter side resized to size, centre crop, /255, (x - mean) / std
    (folder / PREP_FILE).write_text(json.dumps(prep, indent=2))


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime behind the interface of a task model: ``model(**batch).logits``."""

    def __init__(self, path: Path, kind: str, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        from fmtune.training.hardware import physical_cores

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = input_names(kind)

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        feeds = {n: batch[n].cpu().numpy() for n in self.names}
        return SequenceClassifierOutput(logits=torch.from_numpy(self.session.run(["logits"], feeds)[0]))
