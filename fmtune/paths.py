"""Checks of the paths a user names, before any work: each failure is one DataError that names
the path and what is wrong with it (missing, a folder where a file is expected or the reverse,
unreadable, or not writable)."""

from __future__ import annotations

import os
import re
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


# a dataset on the Hugging Face Hub: the files a dataset's splits are read from (not its scripts, images or audio
# archives: those datasets are read from their Parquet conversion, which the hub's own files are for most)
HUB_DATA_FILES = ["*.parquet", "*.csv", "*.tsv", "*.json", "*.jsonl", "*.txt", "*.conll", "README.md"]


def hub_dataset(value: str) -> Path | None:
    """The local folder of the Hugging Face dataset ``value`` names (``stanfordnlp/imdb``; ``owner/name/config``:
    that configuration's folder) where no such path exists: the hub cache's snapshot of its data files, downloaded
    once where the hub is reached, else (HF_HUB_OFFLINE=1) as the cache holds it; its folder of split files
    (``readers.split_files``: train-00000-of-00001.parquet ...), or of its one configuration that has them. None
    where ``value`` is a path, or not such an id; a DataError where the id's dataset cannot be had or read so."""
    if Path(value).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)?", value) or \
            Path(value).suffix.lower() in {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".txt"}:
        return None
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from fmtune.data.readers import split_named_files
    from fmtune.fsutil import hub_snapshot

    parts = value.split("/")
    repo_id, config = "/".join(parts[:2]), parts[2] if len(parts) == 3 else None
    try:
        root = hub_snapshot(repo_id, HUB_DATA_FILES, "dataset")
    except (LocalEntryNotFoundError, RepositoryNotFoundError):
        return None  # (not in the cache, nor on the hub: "does not exist", as any path)
    except (HfHubHTTPError, OSError) as e:
        raise DataError(f"{value}: cannot download the dataset from the hub ({type(e).__name__}: {e})") from None
    if config is not None:
        folder = root / config
        if not folder.is_dir():
            raise DataError(f"{value}: the dataset {repo_id} has no configuration {config!r} in its files ({root})")
        return folder
    if split_named_files(root):
        return root
    configs = sorted({f.parent for f in root.rglob("*") if f.is_file() and f.parent != root
                      and split_named_files(f.parent)})
    if len(configs) == 1:
        return configs[0]
    if not configs:
        raise DataError(f"{value}: the dataset {repo_id}'s files ({root}) hold no split files (train, validation, "
                        "test) fmtune reads; give its files as --data / --val / --test")
    names = ", ".join(str(c.relative_to(root)) for c in configs[:6])
    raise DataError(f"{value}: the dataset {repo_id} has several configurations ({names}); name one: "
                    f"--data {repo_id}/{configs[0].relative_to(root).as_posix()}")


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
