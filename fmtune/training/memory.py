"""Batches that fit in memory: the activation memory of a transformer's forward pass, estimated per
example from the model's shape and the example's length, against a share of the memory available.

A batch of 32 is nothing for 64-token sentences and far too much for 30-s clips: training wav2vec2-base
keeps about 4 GB of activations per 30-s clip (measured, 2 cores, fp32: 445 MB at 5 s, 926 MB at 10 s),
Whisper-small 1.4 GB, BERT-base 880 MB per 512-token text. On a CPU such a batch is not an error but the
kernel's out-of-memory killer. Where the configured batch would not fit, training runs it as micro-batches
whose gradients add up to the same step (``train.batch_size`` down to a divisor of it, ``train.grad_accum``
up by as much: as many examples per optimizer step; the plan says so, run.json's ``micro_batches`` and
config.yaml keep it), and evaluation or prediction reads fewer examples a forward pass (the same outputs).

The estimate (``Shape``) counts, per position and layer, what a transformer layer keeps for its backward
pass (16 vectors of its width and 3 of its feed-forward width, 4 bytes each), the attention
probabilities where they are materialised (eager attention, or attention dropout in training, which takes
PyTorch's math kernel), and the transient of a raw-waveform model's first convolution. Against peak
resident memory measured on random weights of the real shapes (2 cores, fp32, training batches of 2-8;
MiB per example, estimated / measured): MiniLM-L6 512 tokens 342 / 350, 128 tokens 45 / 51; BERT-base
512 tokens 936 / 881; wav2vec2-base 5 s 441 / 445, 10 s 1,089 / 926, 30 s 5,741 / 3,986; Whisper-small's
encoder 30 s 1,477 / 1,371; ViT-B/16 at 224 px 194 / 137, at 384 px 568 / 402. Inference keeps one
layer's working set at a time: wav2vec2-base 30 s 633 / 471, Whisper-small 70 / 69. So within 12 % below
and 45 % above (bf16 autocast keeps less: fmtune measured 606 MiB a 10-s clip of wav2vec2-base).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FLOAT_BYTES = 4
# LoRA / DoRA keep the dropped input of every adapted layer too: MiniLM-L6 at 256 tokens kept 127 MiB an example
# in full fine-tuning, 147 with LoRA on its attention and dense layers (measured as the module doc says)
ADAPTER_EXTRA = {"lora": 1.25, "dora": 1.25}
TRAIN_SHARE = 0.5  # of the memory available when training starts, for the activations of one micro-batch
INFER_SHARE = 0.25  # of the memory available, for one forward pass without gradients (as fsutil.spill_bytes)


@dataclass(frozen=True)
class Shape:
    """What sets a transformer encoder's activation memory."""
    hidden: int
    layers: int
    ffn: int
    heads: int
    attention_dropout: float = 0.0
    eager: bool = False
    stem_channels: int = 0  # a raw-waveform model's first convolution: output channels ...
    stem_stride: int = 1  # ... and stride over the samples
    patch: int = 0  # a vision transformer's patch side: an image of side s is (s / patch)^2 + 1 positions

    def example_bytes(self, tokens: Any, longest: Any, samples: Any = 0.0, train: bool = True,
                      trained_layers: int | None = None) -> Any:
        """Bytes of activations for examples (numbers or arrays) of ``tokens`` positions in sequences of at
        most ``longest`` (the attention matrices grow with the sequence, not the example: an audio clip of
        several windows attends within each), ``samples`` of waveform read by the stem."""
        stem = 3 * self.stem_channels * np.asarray(samples, dtype=float) / self.stem_stride * FLOAT_BYTES
        tokens = np.asarray(tokens, dtype=float)
        scores = self.heads * tokens * np.minimum(longest, tokens) * FLOAT_BYTES
        if not train:
            return stem + tokens * (8 * self.hidden + 2 * self.ffn) * FLOAT_BYTES + (2 * scores if self.eager else 0.0)
        layers = self.layers if trained_layers is None else trained_layers
        kept = tokens * (16 * self.hidden + 3 * self.ffn) * FLOAT_BYTES
        if self.eager or self.attention_dropout > 0:
            kept = kept + 3 * scores  # probabilities, dropped probabilities, dropout mask (as floats, a bound)
        return stem + layers * kept


def _first(config: Any, *names: str) -> Any:
    for n in names:
        v = getattr(config, n, None)
        if v:
            return v
    return None


def shape_of(model: torch.nn.Module) -> Shape | None:
    """The shape of the first Hugging Face transformer inside ``model`` (an encoder-decoder: its
    encoder, which reads the long input; a model whose own config holds no shape, Parakeet's CTC model: the first
    inside it that does); None for anything else (a CNN, a model with several towers)."""
    from transformers import PretrainedConfig

    seen: set[int] = set()
    for m in model.modules():
        config = getattr(m, "config", None)
        if not isinstance(config, PretrainedConfig) or id(config) in seen:
            continue
        if getattr(config, "text_config", None) is not None:
            return None
        seen.add(id(config))
        shape = _shape(config)
        if shape is not None:
            return shape
    return None


def _shape(config: Any) -> Shape | None:
    hidden = _first(config, "d_model", "hidden_size", "n_embd")
    layers = _first(config, "encoder_layers", "encoder_num_hidden_layers", "num_hidden_layers", "num_layers",
                    "n_layer")
    heads = _first(config, "encoder_attention_heads", "encoder_num_attention_heads", "num_attention_heads",
                   "num_heads", "n_head")
    if not (isinstance(hidden, int) and isinstance(layers, int) and isinstance(heads, int)):
        return None
    ffn = _first(config, "encoder_ffn_dim", "intermediate_size", "d_ff", "n_inner") or 4 * hidden
    dropout = _first(config, "attention_dropout", "attention_probs_dropout_prob", "attn_pdrop") or 0.0
    convs, strides = getattr(config, "conv_dim", None), getattr(config, "conv_stride", None)
    stem = {"stem_channels": int(convs[0]), "stem_stride": int(strides[0])} if convs and strides else {}
    patch = getattr(config, "patch_size", None)
    return Shape(int(hidden), int(layers), int(ffn), int(heads), float(dropout),
                 getattr(config, "_attn_implementation", None) == "eager", **stem,
                 patch=patch if isinstance(patch, int) else 0)


def available_bytes(device: Any = "cpu") -> int:
    """Memory available now on ``device`` (a CUDA device: free on it; else the host's)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _worst(shape: Shape, ds: Any, train: bool, trained_layers: int | None = None) -> float | None:
    """Bytes of the costliest example of ``ds`` (None: ``ds`` says nothing of its lengths). A dataset tells
    its lengths by ``memory_profile()``: (positions per example, longest sequence of each, waveform samples of
    each or None); an image dataset its side (``image_side``), which a vision transformer reads as patches."""
    profile = getattr(ds, "memory_profile", None)
    prof = profile() if callable(profile) else None
    side = getattr(ds, "image_side", None)
    if prof is None and side and shape.patch and len(ds):  # images, all read at one size
        positions = np.array([(side // shape.patch) ** 2 + 1])
        prof = (positions, positions, None)
    if prof is None or not len(prof[0]):
        return None
    tokens, longest, samples = prof
    return float(np.max(shape.example_bytes(tokens, longest, 0.0 if samples is None else samples, train,
                                            trained_layers)))


def fit_training(cfg: Any, model: torch.nn.Module, train_ds: Any, device: Any = "cpu", budget: int | None = None,
                 frozen: int = 0) -> tuple[Any, dict[str, Any] | None]:
    """``cfg`` with train.batch_size cut to micro-batches that fit (grad_accum raised so an optimizer
    step sees as many examples), and why; ``(cfg, None)`` when the batch fits or nothing is known of it.
    ``budget``: bytes for one micro-batch's activations (default: TRAIN_SHARE of what is available,
    less the gradients and optimizer state still to come; the processes of a CPU run share it, as they share
    each batch). ``frozen``: leading blocks that keep nothing for the backward pass (``strategies.frozen_prefix``;
    negative: the whole backbone, whose features a head trains on: nothing to fit)."""
    shape = shape_of(model)
    if shape is None:
        return cfg, None
    layers = 0 if frozen < 0 else max(1, shape.layers - frozen)
    worst = _worst(shape, train_ds, True, layers) if layers else None  # (none: the backbone runs as in inference)
    if worst is None or worst <= 0:
        return cfg, None
    worst *= ADAPTER_EXTRA.get(cfg.strategy.name, 1.0)
    train = cfg.train
    if budget is None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        budget = max(0, int((available_bytes(device) - 3 * trainable * FLOAT_BYTES) * TRAIN_SHARE))
    fits = max(1, int(budget // worst))
    if fits >= train.batch_size:
        return cfg, None
    micro = max(d for d in range(1, fits + 1) if train.batch_size % d == 0)
    accum = train.grad_accum * (train.batch_size // micro)
    note = {"batch_size": train.batch_size, "micro_batch": micro, "grad_accum": accum,
            "estimate_mib_per_example": round(worst / 2**20, 1), "budget_mib": round(budget / 2**20),
            "why": f"a batch of {train.batch_size} of the longest training examples would hold about "
                   f"{worst * train.batch_size / 2**30:.1f} GiB of activations, over the {budget / 2**30:.1f} GiB "
                   f"free for them: micro-batches of {micro}, gradients accumulated over {accum} "
                   f"({micro * accum} examples an optimizer step, as configured)"}
    return dataclasses.replace(cfg, train=dataclasses.replace(train, batch_size=micro, grad_accum=accum)), note


def inference_batch(model: torch.nn.Module, ds: Any, batch_size: int, device: Any = "cpu",
                    budget: int | None = None) -> int:
    """``batch_size``, or fewer examples a forward pass where that many of ``ds``'s longest would not fit in
    ``budget`` bytes (default: INFER_SHARE of what is available)."""
    shape = shape_of(model)
    worst = None if shape is None else _worst(shape, ds, False)
    if not worst:
        return batch_size
    if budget is None:
        budget = int(available_bytes(device) * INFER_SHARE)
    return max(1, min(batch_size, int(budget // worst)))

