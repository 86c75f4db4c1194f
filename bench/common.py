"""What the benches share: the working folder and the header of the result they print; a command's time and
memory."""

from __future__ import annotations

import contextlib
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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


def add_version_options(ap: Any, verb: str, example_ref: str) -> None:
    """``--ref`` (the earlier fmtune to compare with, ``fmtune_versions``) and ``--out`` (the working folder)."""
    ap.add_argument("--ref", default=None, help=f"also {verb} with fmtune at this git commit (e.g. {example_ref})")
    ap.add_argument("--out", default=None, help="working folder (default: a new temporary one)")


@contextlib.contextmanager
def fmtune_versions(work: Path, ref: str | None) -> Iterator[dict[str, Path]]:
    """{name: source folder} of the fmtune versions a bench compares: this repository's ("this"), and with
    ``ref`` the one at that git commit (a worktree under ``work``, removed at the end). Run each from outside the
    repository with PYTHONPATH at its folder: python puts the current folder before PYTHONPATH."""
    versions = {"this": ROOT}
    if ref:
        tree = work / f"fmtune-{ref}"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
        versions[ref] = tree
    try:
        yield versions
    finally:
        if ref:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(versions[ref])],
                           capture_output=True)
