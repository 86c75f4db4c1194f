"""Atomic writes: a crash or SIGKILL never leaves a half-written file or folder behind."""

from __future__ import annotations

import json
import os
import shutil
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
