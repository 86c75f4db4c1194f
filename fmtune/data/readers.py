"""Read a table (CSV, JSONL, Parquet) or an image folder into a DataFrame, with errors that
name the file, row and column at fault. Row numbers are 1-based data rows (the header is not
counted); for CSV and JSONL the file line is given too."""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmtune.errors import DataError

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _check_encoding(path: Path, encoding: str) -> None:
    """Decode the file incrementally and name the first line that is not valid ``encoding``."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {lineno} (row {lineno - 1}) is not valid {encoding} "
                    f"(byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}); re-save the file "
                    f"as UTF-8 or pass --set data.encoding=latin-1 (or the file's encoding)"
                ) from None


def read_table(path: str | Path, encoding: str = "utf-8") -> pd.DataFrame:
    """Read CSV/TSV, JSONL or Parquet; every cell of CSV/JSONL is kept as read (no type guessing for text)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl or .parquet, "
                        "or a folder of class sub-folders for images")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if suffix in (".parquet", ".pq"):
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises many types
            raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    elif suffix in (".jsonl", ".json"):
        df = _read_jsonl(path, encoding)
    else:
        _check_encoding(path, encoding)
        sep = "\t" if suffix == ".tsv" else ","
        try:
            df = pd.read_csv(path, sep=sep, encoding=encoding, dtype=str, keep_default_na=False,
                             na_values=[""], quoting=csv.QUOTE_MINIMAL)
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: the file is empty") from None
        except pd.errors.ParserError as e:
            raise DataError(f"{path}: malformed CSV: {e}") from None
    if len(df) == 0:
        raise DataError(f"{path}: no data rows (only a header?)")
    df.attrs["source"] = str(path)
    return df


def _read_jsonl(path: Path, encoding: str) -> pd.DataFrame:
    _check_encoding(path, encoding)
    text = path.read_text(encoding=encoding)
    if text.lstrip().startswith("["):  # a plain JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        records = []
        for lineno, line in enumerate(io.StringIO(text), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}: line {lineno} is not a JSON object")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: the file is empty")
    return pd.DataFrame.from_records(records)


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted."""
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def read_image_folder(path: Path) -> pd.DataFrame:
    """A folder of class sub-folders -> rows (image path, label = sub-folder name)."""
    rows = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        rows += [(str(f), sub.name) for f in list_images(sub)]
    if not rows:
        raise DataError(f"{path}: no images found; expected class sub-folders (e.g. {path}/cat/1.png) "
                        f"holding {', '.join(sorted(IMAGE_SUFFIXES))} files")
    df = pd.DataFrame(rows, columns=["image", "label"])
    df.attrs["source"] = str(path)
    return df


def read_any(path: str | Path, encoding: str = "utf-8") -> pd.DataFrame:
    """A table file, or an image folder of class sub-folders."""
    p = Path(path)
    if p.is_dir():
        return read_image_folder(p)
    return read_table(p, encoding)


def require_column(df: pd.DataFrame, column: str, what: str, option: str) -> None:
    if column not in df.columns:
        src = df.attrs.get("source", "the data")
        raise DataError(f"{src}: no {what} column {column!r}; columns are: {', '.join(map(str, df.columns))}. "
                        f"Name the right one with --set {option}=COLUMN")


def row_label(df: pd.DataFrame, i: int) -> str:
    """Human name of positional row ``i`` (0-based) for messages.

    Frames keep their file row positions in the index (splits do not renumber), so the message
    points at the row in the file even after a train/validation split.
    """
    src = df.attrs.get("source", "")
    idx = df.index[i]
    i = int(idx) if isinstance(idx, (int, np.integer)) else i
    if src.endswith((".csv", ".tsv")):
        return f"{src}: row {i + 1} (line {i + 2})"
    return f"{src}: row {i + 1}"
