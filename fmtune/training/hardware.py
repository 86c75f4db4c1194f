"""Choose device, precision and threads by what the hardware can do, and say what was chosen."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fmtune.config import INFERENCE_PRECISIONS
from fmtune.training.prefetch import INLINE, Loader


def local_world_size() -> int:
    """Processes of a launched run on this machine (1 when not launched)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


@dataclass
class Hardware:
    device: str
    precision: str  # "no" | "bf16" | "fp16", as accelerate names it
    threads: int
    why: str
    loader: Loader = INLINE

    def describe(self) -> str:
        prec = {"no": "fp32"}.get(self.precision, self.precision)
        return f"device={self.device} precision={prec} threads={self.threads} ({self.why}); {self.loader.describe()}"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a run's precision ("bf16", "fp16"; None for "no": fp32)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def physical_cores() -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count() or 1
    try:
        import psutil

        phys = psutil.cpu_count(logical=False) or available
    except ImportError:
        phys = available
    return max(1, min(phys, available))


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    flags = _cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def inference_autocast(precision: str, device_type: str | None) -> torch.dtype | None:
    """The autocast dtype a run's model predicts in where a user reads its outputs (predict, serve, evaluate, the
    test split after training, the fairness audit, and the pretrained baseline's features beside them), from its
    ``train.precision`` or a ``--precision`` given there.
    fp32: None. bf16 (fp16) as given (fp16 on a GPU only). auto: bf16 on a CPU with AMX, fp32 elsewhere. Measured on
    the eight demo runs' test splits (2-core Xeon with AMX, bench/inference_precision.py): bf16 1.6-2.8x faster than
    fp32 (text, NER, multi-label, regression, image, segmentation, detection, audio), the same class for 99.5-100 %
    of rows, tokens and pixels, every test metric within 0.005 of fp32's. Not measured: GPUs (fp32 there, with TF32
    matmuls) and CPUs with AVX512-BF16 but no AMX (fp32). The ONNX export check, attributions, attacks, image
    corruptions (scored on the ONNX export), continual learning's before/after scores and decoding (generation, speech
    recognition) stay in fp32. ``device_type`` None: no torch model (onnxruntime runs it, fp32)."""
    if precision not in (*INFERENCE_PRECISIONS, "fp16"):
        from fmtune.errors import ConfigError

        raise ConfigError(f"precision {precision!r} is not one of {', '.join(INFERENCE_PRECISIONS)}")
    if precision == "fp32" or device_type is None:
        return None
    if precision == "auto":
        return torch.bfloat16 if device_type == "cpu" and "amx_bf16" in _cpu_flags() else None
    dtype = autocast_dtype(precision)
    return None if dtype == torch.float16 and device_type == "cpu" else dtype


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32 / bf16 / fp16: what an autocast dtype (None: none) computes in, as configs name it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")  # type: ignore[arg-type]


def loader_for(device: str, threads: int | None = None) -> Loader:
    """How batches are collated: inline on a CPU, whose cores all compute (a background thread
    competes with them: EfficientNet-Lite0 fine-tuning from images decoded per batch took 1.22x
    longer with one, 2-core Zen 4, bench/speed.py); on a GPU, where the host only feeds it, up to
    4 background threads and pinned memory."""
    workers = threads if threads is not None else 0 if device == "cpu" else max(1, min(4, physical_cores() - 1))
    return Loader(workers, pin=device == "cuda" and workers > 0)


def choose(device: str = "auto", precision: str = "auto", threads: int | None = None,
           loader_threads: int | None = None) -> Hardware:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        from fmtune.errors import ConfigError

        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    dev = "cuda" if use_cuda else "cpu"
    if use_cuda:
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
    if precision == "auto":
        if use_cuda and torch.cuda.is_bf16_supported():
            prec, why = "bf16", "GPU runs bf16 natively"  # measured on the model by probe_precision
        elif not use_cuda and cpu_has_native_bf16():
            prec, why = "bf16", "CPU has native bf16 (AMX/AVX512-BF16)"
        else:
            prec, why = "no", "no native bf16 on this " + ("GPU" if use_cuda else "CPU") + ": fp32 is faster"
    else:
        prec, why = {"fp32": "no"}.get(precision, precision), "as configured"

    n = threads or max(1, physical_cores() // local_world_size())  # processes on this machine share its cores
    torch.set_num_threads(n)
    return Hardware(dev, prec, n, why, loader_for(dev, loader_threads))


def probe_precision(hw: Hardware, net: torch.nn.Module, batch: dict[str, torch.Tensor], loss_fn: Any,
                    steps: int = 5, min_gain: float = 1.1) -> Hardware:
    """Time forward+backward steps of ``net`` on ``batch`` in fp32 and bf16; keep bf16 only where it is
    at least ``min_gain`` times faster.

    Native bf16 is not always faster: on a GPU a small model at a small batch is bound by kernel
    launches and autocast's casts add more (MiniLM-L6, batch 32, H200: bf16 2.3x slower). Gradients
    and random state are left as they were.
    """
    device = torch.device(hw.device)
    batch = {k: v.to(device) for k, v in batch.items()}
    targets = batch.pop("labels")
    was_training = net.training
    net.train()
    timings = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for name, dtype in (("no", None), ("bf16", torch.bfloat16)):
            times = []
            for i in range(steps + 2):
                _sync(device)
                t0 = time.perf_counter()
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss = loss_fn(net(**batch).logits, targets)
                loss.backward()
                _sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            timings[name] = sorted(times)[len(times) // 2]
    for p in net.parameters():
        p.grad = None
    net.train(was_training)
    fp32, bf16 = timings["no"] * 1e3, timings["bf16"] * 1e3
    prec = "bf16" if fp32 >= min_gain * bf16 else "no"
    why = f"measured on a training batch: fp32 {fp32:.1f} ms/step, bf16 {bf16:.1f} ms/step"
    return dataclasses.replace(hw, precision=prec, why=why)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
