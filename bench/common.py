"""What the benches share: the working folder and the header of the result they print; a command's time and
memory."""

from __future__ import annotations

import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def start(out: str | None, prefix: str) -> tuple[Path, dict[str, Any]]:
    """The working folder (``out``, else a new temporary one) and the result's header: the machine, torch's
    threads and the versions of fmtune and torch, with an empty ``results``."""
    import torch

    import fmtune

    work = Path(out or tempfile.mkdtemp(prefix=prefix))
    return work, {"machine": cpu_name(), "threads": torch.get_num_threads(),
                  "versions": {"fmtune": fmtune.__version__, "torch": torch.__version__}, "results": {}}


def measured(cmd: list[str], env: dict[str, str], cwd: Path, check: bool = False) -> dict[str, Any]:
    """Run ``cmd``; its wall time, exit status (-9: killed, as the kernel kills a process out of memory) and the
    peaks of its resident memory (anonymous; file-backed and shared), sampled every 0.3 s. ``check``: a failure
    raises, with the end of its stderr."""
    began = time.perf_counter()
    # (run from the working folder: python puts the current folder before PYTHONPATH, and this repository's fmtune
    # there would shadow the version asked for)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"RssAnon": 0, "RssFile": 0}

    def poll() -> None:
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                              if ":" in line)
            except OSError:
                break
            kb = {k: int(fields.get(k, "0 kB").split()[0]) for k in ("RssAnon", "RssFile", "RssShmem")}
            peaks["RssAnon"] = max(peaks["RssAnon"], kb["RssAnon"])
            peaks["RssFile"] = max(peaks["RssFile"], kb["RssFile"] + kb["RssShmem"])
            time.sleep(0.3)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, err = proc.communicate()
    watcher.join()
    if proc.returncode and check:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - began, 1), "returncode": proc.returncode,
            "peak_anonymous_mb": round(peaks["RssAnon"] / 1024), "peak_file_mb": round(peaks["RssFile"] / 1024),
            **({"stderr_tail": err[-1500:]} if proc.returncode else {})}
