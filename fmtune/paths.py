"""Checks of the paths a user names, before any work: each failure is one DataError that names
the path and what is wrong with it (missing, a folder where a file is expected or the reverse,
unreadable, or not writable)."""

from __future__ import annotations

import os
from pathlib import Path

from fmtune.errors import DataError

KINDS = ("input", "input-file", "run", "output-file", "output-dir")


def _readable(p: Path) -> bool:
    try:
        if p.is_dir():
            os.listdir(p)
        else:
            with p.open("rb"):
                pass
    except OSError:
        return False
    return True


def _first_existing(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def looks_like_path(value: str) -> bool:
    """Whether a command-line value means a file: it exists, or it has a data file's suffix, or
    it has a folder separator and no space ("data/test"). Anything else is a text ("a dull film")."""
    p = Path(value).expanduser()
    if p.exists():
        return True
    if "\n" in value:
        return False
    from fmtune.data.conll import CONLL_SUFFIXES  # the readers' own lists (imported here: pandas is slow to load)
    from fmtune.data.readers import (
        AUDIO_SUFFIXES,
        COMPRESSED_SUFFIXES,
        IMAGE_SUFFIXES,
        PARALLEL_SUFFIXES,
        TABLE_SUFFIXES,
    )

    known = TABLE_SUFFIXES | IMAGE_SUFFIXES | AUDIO_SUFFIXES | CONLL_SUFFIXES | COMPRESSED_SUFFIXES | {".yaml", ".yml"}
    known |= set(PARALLEL_SUFFIXES)
    if p.suffix.lower() in known:
        return True
    return " " not in value.strip() and os.sep in value


def check(path: str | Path, kind: str, what: str = "") -> Path:
    """``path`` checked as ``kind``: an ``input`` (a file or folder to read), an ``input-file``, a
    ``run`` folder, an ``output-file`` (its folder must exist) or an ``output-dir`` (made when
    missing). ``what`` names the argument in the message (e.g. ``--data``)."""
    assert kind in KINDS, kind
    p = Path(path).expanduser()
    name = f"{what} {p}" if what else str(p)
    if kind in ("input", "input-file", "run"):
        if not p.exists():
            raise DataError(f"{name} does not exist" + (" (expected a run directory)" if kind == "run" else ""))
        if kind == "input-file" and p.is_dir():
            raise DataError(f"{name}: is a folder; expected a file")
        if kind == "run" and not p.is_dir():
            raise DataError(f"{name}: is a file; expected a run directory (made by fmtune train)")
        if not _readable(p):
            raise DataError(f"{name}: cannot be read (permission denied)")
        return p
    if kind == "output-file":
        if p.is_dir():
            raise DataError(f"{name}: is a folder; expected a file to write")
        parent = p.absolute().parent
        if not parent.is_dir():
            raise DataError(f"{name}: cannot be written: the folder {parent} does not exist")
        if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
            raise DataError(f"{name}: cannot be written (permission denied)")
        return p
    if p.exists() and not p.is_dir():
        raise DataError(f"{name}: is a file; expected a folder to write into")
    base = _first_existing(p)
    if not base.is_dir():
        raise DataError(f"{name}: cannot be made: {base} is a file")
    if not os.access(base, os.W_OK):
        raise DataError(f"{name}: cannot be written (permission denied on {base})")
    return p
