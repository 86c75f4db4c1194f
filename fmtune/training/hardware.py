"""Choose device, precision and threads by what the hardware can do, and say what was chosen."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Hardware:
    device: str
    precision: str  # "no" | "bf16" | "fp16", as accelerate names it
    threads: int
    why: str

    def describe(self) -> str:
        prec = {"no": "fp32"}.get(self.precision, self.precision)
        return f"device={self.device} precision={prec} threads={self.threads} ({self.why})"


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


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose(device: str = "auto", precision: str = "auto", threads: int | None = None) -> Hardware:
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        from fmtune.errors import ConfigError

        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    dev = "cuda" if use_cuda else "cpu"
    if precision == "auto":
        if use_cuda and torch.cuda.is_bf16_supported():
            prec, why = "bf16", "GPU runs bf16 natively"
        elif not use_cuda and cpu_has_native_bf16():
            prec, why = "bf16", "CPU has native bf16 (AMX/AVX512-BF16)"
        else:
            prec, why = "no", "no native bf16 on this " + ("GPU" if use_cuda else "CPU") + ": fp32 is faster"
    else:
        prec, why = {"fp32": "no"}.get(precision, precision), "as configured"
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return Hardware(dev, prec, n, why)
