"""Atomic writes: a crash or SIGKILL never leaves a half-written file or folder behind. Scratch space on disk for
outputs too large for memory (``output_tensor``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh sibling folder, then swap it in place of ``target``."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def atomic_file(target: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a sibling temporary file, then rename it to ``target`` (its folder made): an interrupted
    write leaves nothing at ``target``, and processes writing it at once (ranks of a distributed run) each rename a
    whole file. Returns ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return target


def files_digest(files: list[Path]) -> str:
    """A short digest of where ``files`` are, their sizes and when they changed: the key of what the cache holds made
    from them (a file replaced in place gets a new one)."""
    import hashlib

    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    return hashlib.sha1(stamp.encode()).hexdigest()[:12]


def hub_offline() -> bool:
    """Whether the Hugging Face Hub is not to be reached (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE") == "1"


def hub_snapshot(repo_id: str, patterns: list[str], repo_type: str = "model") -> Path:
    """The Hugging Face cache's snapshot folder of the hub repository ``repo_id``: the files matching ``patterns``,
    downloaded once where the hub is reached, else (``hub_offline``) as the cache holds them, a snapshot an earlier
    download left incomplete included. huggingface_hub's LocalEntryNotFoundError where the cache has none and the
    hub is not reached; its other errors (no such repository ...) as it raises them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=patterns,
                                      local_files_only=hub_offline()))
    except IncompleteSnapshotError as e:  # (the cache holds what an earlier download fetched: read that)
        return Path(e.snapshot_path)


def check_output_dir(target: Path, marker: str) -> None:
    """Refuse an output folder that holds something other than an earlier output of the same
    verb (recognised by its ``marker`` file): ``atomic_dir`` would replace it whole."""
    if target.exists() and any(target.iterdir()) and not (target / marker).is_file():
        from fmtune.errors import ConfigError

        raise ConfigError(f"--out {target} exists and holds other files; give a new folder")


def read_json(path: Path, default: Any = None) -> Any:
    """The JSON in ``path``, or ``default`` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def read_jsonl(path: Path) -> list[Any]:
    """One record per non-empty line of ``path`` (a log such as metrics.jsonl); [] when it is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")


def folder_digest(folder: Path, suffixes: tuple[str, ...] = (".safetensors", ".json", ".onnx")) -> str:
    """A short content hash of the files of ``folder`` with these suffixes: a model's version."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in suffixes and f.name != "export.json":
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:12]

def cache_dir() -> Path:
    """Where fmtune keeps what it computes once: features of frozen backbones, datasets read from another format
    (``$FMTUNE_CACHE_DIR``, default ``~/.cache/fmtune/features``)."""
    return Path(os.environ.get("FMTUNE_CACHE_DIR", Path.home() / ".cache" / "fmtune" / "features"))


SCRATCH_ENV = "FMTUNE_SCRATCH"  # the folder for outputs too large for memory (default: /var/tmp, else the temp folder)


def spill_bytes() -> int:
    """Outputs above this many bytes go to disk: a quarter of the memory available now (at least 256 MiB)."""
    import psutil

    return max(256 << 20, psutil.virtual_memory().available // 4)


def scratch_dir() -> Path:
    """$FMTUNE_SCRATCH, else /var/tmp (on disk by convention; /tmp is memory on many systems), else the temp folder."""
    named = os.environ.get(SCRATCH_ENV)
    if named:
        return Path(named).expanduser()
    var = Path("/var/tmp")
    return var if var.is_dir() and os.access(var, os.W_OK) else Path(tempfile.gettempdir())


def output_tensor(shape: tuple[int, ...], dtype: Any = None) -> Any:
    """Zeros of ``shape``: in memory, or above ``spill_bytes`` backed by a file in ``scratch_dir`` (removed at once:
    the mapping lives as long as the tensor) where that disk has room; a tensor like any other to its readers."""
    import torch

    dtype = dtype or torch.float32
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    folder = scratch_dir()
    if nbytes <= spill_bytes() or not folder.is_dir() or shutil.disk_usage(folder).free < nbytes * 1.1:
        return torch.zeros(shape, dtype=dtype)
    fd, path = tempfile.mkstemp(prefix="fmtune-outputs-", dir=folder)
    try:
        os.ftruncate(fd, nbytes)  # sparse: zeros, written as the batches come
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)
    finally:
        os.close(fd)
        os.unlink(path)
