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
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from fmtune.errors import ModelError, brief

MODEL_FILE, PREP_FILE = "model.onnx", "preprocessing.json"


class TextLogits(nn.Module):
    """Tensors in, logits out: the graph ONNX exports, and what captum attributes (fmtune.explain)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        segments = {} if token_type_ids is None else {"token_type_ids": token_type_ids}  # pairs of texts
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **segments).logits


class _ImageLogits(TextLogits):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.model(pixel_values=pixel_values).logits


class _WindowLogits(TextLogits):
    """Audio: the logits of every window (log-mel features, or the waveform: ``key``). The head is
    linear, so a clip's logits are the mean of its windows' (what the torch model computes from the
    mean of their features)."""

    def __init__(self, model: nn.Module, key: str):
        super().__init__(model)
        self.key = key

    def forward(self, windows: torch.Tensor, frame_mask: torch.Tensor | None = None  # type: ignore[override]
                ) -> torch.Tensor:
        return self.model(**{self.key: windows}, frame_mask=frame_mask).logits


def input_names(kind: str, audio: dict[str, Any] | None = None, segments: bool = False) -> list[str]:
    """The graph's inputs: a text model's ids and mask (and segment ids, for pairs of texts read by
    a model that has them), an image model's pixels, an audio model's windows (log-mel features or
    waveform samples, ``bundle.audio``) and their mask (a filterbank's windows have the model's fixed
    size: no mask)."""
    if kind == "audio":
        from fmtune.data.audio import FBANK, AudioSpec

        spec = AudioSpec.from_dict(audio or {})
        return [spec.input_key] if spec.frontend == FBANK else [spec.input_key, "frame_mask"]
    if kind == "text":
        return ["input_ids", "attention_mask", *(["token_type_ids"] if segments else [])]
    return ["pixel_values"]


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter logs each stage and warns about optional torchvision ops."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                               "transformers.exporters")]
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


def export_onnx(model: nn.Module, kind: str, sample: dict[str, torch.Tensor], path: Path,
                audio: dict[str, Any] | None = None) -> int | None:
    """Export a plain (adapter-free) task model to ``path`` with dynamic batch (and sequence) axes. Returns the
    graph's fixed batch size where it has one (``_export_set_model``), else None."""
    from fmtune.data.audio import STACKED

    if getattr(model, "set_prediction", False):
        return _export_set_model(model, sample["pixel_values"], path)
    names = input_names(kind, audio, "token_type_ids" in sample)
    args = tuple(sample[n] for n in names)
    batch = torch.export.Dim("batch", min=1)
    if kind == "text":
        seq = torch.export.Dim("seq", min=1)
        shapes: Any = {n: {0: batch, 1: seq} for n in names}
    elif names == ["input_values"]:  # filterbank windows of the model's fixed size
        shapes = {"input_values": {0: batch}}
    elif names[0] == "input_values":  # waveform windows of any length (in samples)
        samples = torch.export.Dim("samples", min=800)
        shapes = {"input_values": {0: batch, 1: samples}, "frame_mask": {0: batch, 1: samples}}
    elif kind == "audio" and (audio or {}).get("frontend") == STACKED:  # w2v-BERT: (windows, frames, 160)
        frames = torch.export.Dim("frames", min=2)
        shapes = {"input_features": {0: batch, 1: frames}, "frame_mask": {0: batch, 1: frames}}
    elif kind == "audio":  # windows of any length up to the encoder's (plus the two frames of padding)
        half = torch.export.Dim("half_frames", min=2, max=2 * model.config.max_source_positions)
        shapes = {"input_features": {0: batch, 2: 2 * half}, "frame_mask": {0: batch, 1: 2 * half}}
    else:
        shapes = {"pixel_values": {0: batch}}
    wrapper = (_WindowLogits(model, names[0]) if kind == "audio" else
               TextLogits(model) if kind == "text" else _ImageLogits(model)).eval()
    try:
        with _quiet_exporter(), torch.no_grad():
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["logits"], dynamo=True,
                              dynamic_shapes=tuple(shapes[n] for n in names), external_data=False, verbose=False)
    except Exception as e:  # the exporter raises many kinds
        raise ModelError(export_failure(model, e)) from None
    return None


def _export_set_model(model: nn.Module, pixels: torch.Tensor, path: Path) -> int | None:
    """A whole transformers detector (``fmtune.models.whole.SetDetector``: its queries' class logits and boxes, the
    layout fmtune's detection task decodes) or mask classifier (``MaskSegmenter``: its semantic map; Mask2Former's
    deformable attention too) through transformers' own ONNX exporter, whose graph rewrites make
    RT-DETRv2 and D-FINE exportable (torch.onnx alone has no lowering for their finite-value checks). With a dynamic
    batch where the model allows it (DETR, Conditional DETR, YOLOS); RT-DETR and its successors take the batch size
    with ``len()`` of a tensor, which fixes it in any torch.export graph: these are exported for one image at a time
    (returns 1; ``OnnxModel`` runs a batch image by image)."""
    import onnx_ir

    exporters = _transformers_exporter(f"a whole {model.kind}")
    OnnxConfig, OnnxExporter = exporters.OnnxConfig, exporters.OnnxExporter  # noqa: N806

    wrapper = _ImageLogits(model).eval()
    attempts = [(pixels, OnnxConfig(dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}}), None),
                (pixels[:1], OnnxConfig(), 1)]
    error: BaseException | None = None
    for x, config, fixed in attempts:
        try:
            with _quiet_exporter(), torch.no_grad():
                program, _ = OnnxExporter().export_program(wrapper, {"pixel_values": x}, config)
        except Exception as e:  # noqa: PERF203  (torch.export raises many kinds; the next attempt may pass)
            error = e
            continue
        program.graph.outputs[0].name = "logits"
        onnx_ir.save(program, str(path))  # one file: the weights inside (as torch.onnx's external_data=False)
        return fixed
    raise ModelError(export_failure(model, error))


def export_failure(model: nn.Module, error: BaseException) -> str:
    """What to tell a user whose model torch.export cannot trace: the root cause in a line (the exporter's own
    message is pages of advice to torch developers, in colour), and what to do instead."""
    import re

    root = error
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    why = re.sub(r"\x1b\[[0-9;]*m", "", brief(root, 300)).replace("\n", " ")
    arch = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return (f"ONNX export failed: torch.export cannot trace this {arch} model ({type(root).__name__}: {why}); "
            "export the run as a transformers folder instead (fmtune export RUN), which needs no tracing")


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of the weights of MatMul/Gemm (and Conv) nodes, a scale per output
    channel: on a probe-started head over the real MiniLM (rotten-tomatoes, 400 test rows) one scale
    per tensor cost 2.75 points of accuracy, one per channel 1.0 (23.2 vs 23.3 MB)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name("prepared.onnx")
    with _quiet_exporter():
        quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # graph clean-up, as onnxruntime advises
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8, per_channel=True)
    prepared.unlink()


def write_preprocessing(bundle: Any, task: Any, folder: Path, pairs: bool = False, batch: int | None = None) -> None:
    segments = pairs and bundle.kind == "text" and bundle.uses_segments()
    prep = {"kind": bundle.kind, **task.state(), "inputs": input_names(bundle.kind, bundle.audio, segments),
            "output": "logits"}
    if batch is not None:  # the graph's batch size is fixed: run it on that many inputs at a time
        prep["batch_size"] = batch
    if bundle.kind == "text":
        prep["max_length"] = bundle.max_length
        if pairs:  # the tokenizer called on (first, second), truncation longest_first
            prep["text_pairs"] = True
        bundle.tokenizer.save_pretrained(folder)
    elif bundle.kind == "audio":
        # mono at sampling_rate, cut into windows of window_seconds, Whisper's log-mel of each window's own
        # frames plus two frames at its minimum (frontend log-mel), or the clip's samples normalised to zero mean
        # and unit variance if normalize, zero-padded (frontend waveform); frame_mask 1 on real frames (samples);
        # or (frontend fbank) ASTFeatureExtractor's filterbank of each window, (windows, frames, n_mels);
        # or (frontend stacked-fbank) SeamlessM4TFeatureExtractor's features of each window, (windows, frames,
        # n_mels * stride), zero-padded, frame_mask 1 on real frames;
        # a clip's logits: the mean of its windows' logits
        prep["audio"] = bundle.audio
        prep["output"] = "logits per window"
    else:
        prep["image"] = bundle.image  # RGB, shorter side resized to size, centre crop, /255, (x - mean) / std
    (folder / PREP_FILE).write_text(json.dumps(prep, indent=2))


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime behind the interface of a task model: ``model(**batch).logits``."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        import onnxruntime as ort

        from fmtune.training.hardware import physical_cores

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or physical_cores()
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]
        first = self.session.get_inputs()[0].shape[0]
        self.batch = first if isinstance(first, int) else None  # a graph made for a fixed batch size (one image)

    def forward(self, **batch: torch.Tensor) -> SequenceClassifierOutput:
        if "frame_mask" in self.names and "input_values" in self.names:  # waveform windows: unpadded, in groups
            # of equal length (as in torch)
            from fmtune.models.hf_remote import length_groups

            mask = batch["frame_mask"].cpu()
            logits = None
            for rows, n in length_groups(mask):
                feeds = {"input_values": batch["input_values"][rows, :n].cpu().numpy(),
                         "frame_mask": mask[rows, :n].numpy()}
                part = torch.from_numpy(self.session.run(["logits"], feeds)[0])
                logits = part.new_zeros((mask.shape[0], part.shape[1])) if logits is None else logits
                logits[rows] = part
        else:
            feeds = {n: batch[n].cpu().numpy() for n in self.names}
            rows = len(next(iter(feeds.values())))
            if self.batch is None or rows <= self.batch:
                logits = torch.from_numpy(self.session.run(["logits"], feeds)[0])
            else:  # a graph of a fixed batch size: the batch in slices of that size
                logits = torch.cat([torch.from_numpy(self.session.run(
                    ["logits"], {n: v[i:i + self.batch] for n, v in feeds.items()})[0])
                    for i in range(0, rows, self.batch)])
        if "clip_index" in batch:  # audio: one row per window; a clip's logits are its windows' mean
            from fmtune.models.hf_remote import per_clip

            logits = per_clip(logits, batch["clip_index"].cpu())
        return SequenceClassifierOutput(logits=logits)


# --- generation: transformers' exporter writes a causal LM as two graphs, prefill and decode, the KV cache their
# inputs and outputs; ``OnnxCausalLM`` runs them behind transformers' ``generate`` (greedy, sampled, streamed)


def _transformers_exporter(what: str) -> Any:
    try:
        from transformers import exporters
    except ImportError as e:
        raise ModelError(f"ONNX export of {what} uses transformers' exporter (transformers.exporters, in transformers "
                         f"5.25 and later; {brief(e, 120)}): pip install -U 'transformers<6'") from None
    return exporters


def export_generation(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, folder: Path) -> None:
    """A plain (adapter-free) causal LM as prefill.onnx and decode.onnx (each with its ``.data`` weights) and
    transformers' manifest (``export.json``), which ``transformers.exporters.ExportedModel.from_pretrained`` loads:
    every axis dynamic (batch, prompt length, cache length), traced from ``ids``/``mask`` (left-padded prompts)."""
    exporters = _transformers_exporter("generation")
    try:
        with _quiet_exporter(), torch.no_grad():
            exported = exporters.OnnxExporter().export_for_generation(
                model.eval(), {"input_ids": ids, "attention_mask": mask}, exporters.OnnxConfig(dynamic=True))
            exported.save_pretrained(folder)
    except Exception as e:  # the exporter raises many kinds
        raise ModelError(export_failure(model, e)) from None


class OnnxCausalLM(PreTrainedModel, GenerationMixin):
    """The two graphs of ``export_generation`` on onnxruntime (transformers' runners) as a model ``generate``
    drives: the prompt through prefill, each next token through decode with the cache the last step returned."""

    main_input_name = "input_ids"

    def __init__(self, folder: Path):
        from transformers import GenerationConfig

        exported = _transformers_exporter("generation").ExportedModel.from_pretrained(str(folder), device="cpu")
        super().__init__(exported.config)
        self.exported = exported
        # generate reads the device and dtype from a parameter: the graphs run on the CPU in float32
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.generation_config = GenerationConfig.from_model_config(exported.config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: Any = None, **_: Any) -> Any:
        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is None:  # (generate leaves it out where no row is padded) every position, the cache's too
            attention_mask = torch.ones((input_ids.shape[0], past + input_ids.shape[1]), dtype=torch.long)
        if position_ids is None:  # left padding: a row's positions count its real tokens
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if cache is not None:  # (empty at the prompt; a sliding-window model's holds its window there too)
            inputs["cache"] = cache
        return self.exported.runners["prefill" if past == 0 else "decode"](**inputs)
