"""Read a table (CSV, JSONL, Parquet) or an image folder into a DataFrame, with errors that
name the file, row and column at fault. Row numbers are 1-based data rows (the header is not
counted); for CSV and JSONL the file line is given too."""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import os
import re
import string
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmtune.errors import DataError

# spreadsheets: Excel's workbooks (.xlsx by openpyxl; the old .xls, as UCI's datasets ship, and .xlsb by calamine) and
# OpenDocument's (.ods, by calamine)
EXCEL_SUFFIXES = {".xlsx", ".xlsm", ".xls", ".xlsb", ".ods"}
TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq", ".txt"} | EXCEL_SUFFIXES  # .txt: a text a line
COMPRESSED_SUFFIXES = {".zip", ".gz", ".bz2", ".xz", ".zst", ".7z", ".tar", ".tgz", ".rar"}
# word-per-line files: `fmtune predict` reads each sentence as a text (fmtune.data.conll.sentence_chunks)
CONLL_PREDICT_SUFFIXES = {".conll", ".bio", ".iob", ".iob2", ".iobes"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au"}  # what soundfile reads
# audio in containers libsndfile does not open (AAC in M4A / MP4 from phones and podcasts, WebM from browsers, WMA,
# AMR): decoded by FFmpeg's libraries through PyAV (``data.audio.load_audio``)
FFMPEG_AUDIO_SUFFIXES = {".m4a", ".m4b", ".aac", ".mp4", ".webm", ".weba", ".wma", ".amr", ".3gp", ".mka"}
AUDIO_SUFFIXES = SOUNDFILE_SUFFIXES | FFMPEG_AUDIO_SUFFIXES
MEDIA_SUFFIXES = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES}  # files a model reads one per example


def check_encoding(path: Path, encoding: str) -> None:
    """Decode the file incrementally and name the first line that is not valid ``encoding``."""
    bad = _first_undecodable(path, encoding)
    if bad is not None:
        line, byte, column = bad
        raise DataError(f"{path}: line {line} (row {line - 1}) is not valid {encoding} (byte {byte!r} at column "
                        f"{column}); re-save the file as UTF-8 or pass --set data.encoding=latin-1 (or the file's "
                        f"encoding)")


def _first_undecodable(path: Path, encoding: str) -> tuple[int, bytes, int] | None:
    """The line, byte and column where ``path`` is first not valid ``encoding``, else None."""
    decoder = codecs.getincrementaldecoder(encoding)()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as e:
                return lineno, raw[e.start:e.start + 1], e.start + 1
    return None


_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def file_encoding(path: Path, encoding: str) -> str:
    """The encoding ``path`` is read in. Another than UTF-8 given (data.encoding): that one, a line not valid in it a
    DataError naming the line. UTF-8, the default: a file that starts with a byte-order mark in its encoding (Excel's
    "CSV UTF-8": utf-8-sig; its "Unicode Text": UTF-16); one that is not UTF-8 (Kaggle's SMS Spam Collection and
    Financial PhraseBank are Windows-1252, CoNLL-2002's Spanish and Dutch Latin-1) in the encoding found for it
    (``_found_encoding``), said in a warning naming its first line that is not UTF-8."""
    if codecs.lookup(encoding).name != "utf-8":
        check_encoding(path, encoding)
        return encoding
    with path.open("rb") as fh:
        head = fh.read(4)
    bom = next((name for mark, name in _BOMS if head.startswith(mark)), None)
    if bom is not None:
        return bom
    bad = _first_undecodable(path, encoding)
    if bad is None:
        return encoding
    found = _found_encoding(path)
    warnings.warn(f"{path}: not UTF-8 (line {bad[0]}, byte {bad[1]!r}): read as {found}; if its text reads wrong, "
                  f"give its encoding: --set data.encoding=ENCODING", UserWarning, stacklevel=3)
    return found


# the encodings a table that is not UTF-8 is found in: Windows' and ISO's of Europe's scripts, the East Asian ones.
# Not the rarer ones charset-normalizer may rank first for a Western file with a few accents or mojibake (mac_latin2,
# hp_roman8, cp1258 ...): such a file is read as cp1252, which is what it nearly always is.
KNOWN_ENCODINGS = {"cp1250", "cp1251", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "iso8859_2", "iso8859_5",
                   "iso8859_7", "iso8859_9", "koi8_r", "koi8_u", "cp932", "shift_jis", "euc_jp", "gb2312", "gbk",
                   "gb18030", "big5", "cp949", "euc_kr", "cp874", "tis_620"}


def _found_encoding(path: Path) -> str:
    """The encoding of a file that is not UTF-8: charset-normalizer's best guess over its lines that are not ASCII
    where that is one of ``KNOWN_ENCODINGS``, reads its bytes otherwise than cp1252 and better (Polish, Cyrillic,
    Greek, Shift-JIS ...); else cp1252 (Windows' Western European, the usual one), or latin-1 (which reads any
    byte) where cp1252 cannot read it."""
    from charset_normalizer import from_bytes

    ascii_bytes = bytes(range(128))
    sample, high = bytearray(), set()
    with path.open("rb") as fh:
        for raw in fh:
            rest = raw.translate(None, ascii_bytes)
            if rest:
                high.update(rest)
                if len(sample) < 1 << 20:
                    sample += raw
    others = bytes(sorted(high))

    def reads(name: str) -> str | None:
        try:
            return others.decode(name)
        except (UnicodeDecodeError, LookupError):
            return None

    western, results = reads("cp1252"), from_bytes(bytes(sample))
    best = results.best()
    tied = best is not None and any(  # (a few accents read as well in cp1252 as in cp1250: cp1252)
        "cp1252" in m.could_be_from_charset for m in results
        if m.percent_chaos <= best.percent_chaos and m.percent_coherence >= best.percent_coherence)
    if best is not None and best.encoding in KNOWN_ENCODINGS and not tied and (western is None
                                                                               or reads(best.encoding) != western):
        return best.encoding
    return "cp1252" if western is not None else "latin-1"


def csv_separator(path: Path, encoding: str) -> str:
    """A .tsv file's tab; a .csv file's comma, unless its header has none but a semicolon, tab or
    bar (spreadsheets in many locales save "CSV" with semicolons)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    with path.open(encoding=encoding, errors="replace") as fh:
        header = fh.readline()
    if "," not in header:
        for sep in (";", "\t", "|"):
            if sep in header:
                return sep
    return ","


# one-file compressions read in place (unpacked once into the cache), and the archive that holds one file
STREAMS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
_UNPACKED: dict[str, Path] = {}  # an unpacked copy -> the compressed file it came from (this process's)


def unpacked(path: str | Path) -> Path | None:
    """The table inside a compressed file (``train.csv.gz``, ``.bz2``, ``.xz``; a ``.zip`` of one file, or of
    several one of which is named as the archive is without .zip: Kaggle's ``train.csv.zip``), unpacked once into
    the cache (``$FMTUNE_CACHE_DIR/unpacked/<archive name>-<digest>/<its name>``: a file replaced in place is
    unpacked again) and read from there; None for anything else (a tar archive, 7z, zstd ...: an error asks to
    unpack it). Tables read from it name the compressed file as their source, so relative image and audio paths
    are read beside it."""
    import shutil
    import zipfile

    p = Path(path)
    suffix = p.suffix.lower()
    if not p.is_file() or suffix not in (".zip", *STREAMS) or p.name.lower().endswith(".tar" + suffix):
        return None
    member = None
    try:
        if suffix == ".zip":
            with zipfile.ZipFile(p) as z:
                files = [m for m in z.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")
                         and not Path(m.filename).name.startswith(".")]
            named = [m for m in files if Path(m.filename).name == p.stem]
            if len(files) != 1 and len(named) != 1:
                shown = ", ".join(m.filename for m in files[:5]) + (" ..." if len(files) > 5 else "")
                raise DataError(f"{p}: a zip archive of {len(files)} files ({shown or 'none'}); fmtune reads a zip "
                                "of one table in place: unpack this one (unzip) and give the file or folder to read")
            member = (named or files)[0]
            inner = Path(member.filename).name
        else:
            inner = p.stem
    except zipfile.BadZipFile as e:
        raise DataError(f"{p}: not a readable zip archive ({e})") from None
    from fmtune import ui
    from fmtune.fsutil import atomic_file, cache_dir, files_digest

    def unpack(tmp: Path) -> None:
        if member is not None:
            with zipfile.ZipFile(p) as z, z.open(member) as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        else:
            import importlib

            with importlib.import_module(STREAMS[suffix]).open(p, "rb") as src, tmp.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)

    target = cache_dir() / "unpacked" / f"{p.name}-{files_digest([p])}" / inner
    if not target.is_file():
        ui.console.print(f"  unpacking {p} once into {target.parent}")
        try:
            atomic_file(target, unpack)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise DataError(f"{p}: cannot unpack it, the file is damaged or not {suffix[1:]} data "
                            f"({type(e).__name__}: {e})") from None
    _UNPACKED[str(target)] = p
    return target


def packed_source(path: str | Path) -> Path:
    """The compressed file an unpacked copy came from (``unpacked``), else ``path``."""
    return _UNPACKED.get(str(path), Path(path))


# line-aligned files of inputs and their targets, one example a line: the suffix of each source and of its target
# (seq2seq sets as Hugging Face's summarisation examples ship them: train.source / train.target)
PARALLEL_SUFFIXES = {".source": ".target", ".src": ".tgt"}


def parallel_file(path: Path) -> Path | None:
    """The file whose lines are the targets of ``path``'s lines, where there is one beside it: TweetEval's
    ``train_text.txt`` -> ``train_labels.txt``, a seq2seq set's ``train.source`` -> ``train.target``; else None."""
    suffix = path.suffix.lower()
    if suffix in PARALLEL_SUFFIXES:
        candidates = [path.with_suffix(PARALLEL_SUFFIXES[suffix])]
    elif suffix == ".txt" and "text" in path.stem:
        candidates = [path.with_name(path.name.replace("text", w, 1)) for w in ("labels", "label")]
    else:
        return None
    return next((c for c in candidates if c.is_file() and c != path), None)


def _lines(path: Path, encoding: str) -> list[str]:
    """A file's lines (its trailing empty ones dropped), in the encoding found (``file_encoding``)."""
    lines = path.read_text(encoding=file_encoding(path, encoding)).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def read_parallel(path: Path, targets: Path, encoding: str, text_column: str) -> pd.DataFrame:
    """Line-aligned files (``parallel_file``) as one table, row N of line N of each: a text and its label (class ids
    named by a ``mapping.txt`` of "id<TAB>name" lines beside them, TweetEval's), or a seq2seq ``source`` and
    ``target``; a DataError where their lines are not as many."""
    inputs, outputs = _lines(path, encoding), _lines(targets, encoding)
    if len(inputs) != len(outputs):
        raise DataError(f"{path} has {len(inputs):,} lines and {targets} {len(outputs):,}: line-aligned files of "
                        "examples and their targets must hold as many")
    if path.suffix.lower() in PARALLEL_SUFFIXES:
        df = pd.DataFrame({"source": inputs, "target": outputs})
    else:
        labels: list[Any] = [v.strip() for v in outputs]
        mapping = path.parent / "mapping.txt"
        if mapping.is_file():
            names = dict(re.split(r"\s+", x.strip(), maxsplit=1) for x in _lines(mapping, encoding)
                         if len(x.split()) >= 2)
            if names and all(v in names for v in labels):
                labels = [names[v] for v in labels]
        df = pd.DataFrame({text_column: inputs, "label": labels})
    df.attrs["header"] = False  # (row N is line N: messages say so)
    return df


def _check_table(path: Path, alternatives: str) -> str:
    """The lower-case suffix of a non-empty table file (a seq2seq ``.source`` file's: .txt, one text a line); a
    DataError otherwise."""
    suffix = ".txt" if path.suffix.lower() in PARALLEL_SUFFIXES else path.suffix.lower()
    if not suffix and path.is_file():  # (a text file without a suffix: UCI's SMSSpamCollection; not a photo's bytes)
        with path.open("rb") as fh:
            suffix = ".txt" if b"\0" not in fh.read(8192) else suffix
    if suffix in COMPRESSED_SUFFIXES:  # (read in place by ``unpacked``: .gz, .bz2, .xz, a zip of one table)
        raise DataError(f"{path}: a compressed file ({suffix}) fmtune does not read in place; unpack it first "
                        f"(tar -x, unzstd, 7z x ...) and give the {''.join(Path(path.stem).suffixes) or 'table'} file "
                        "or folder it holds")
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .parquet, .xlsx / .xls / "
                        f".ods or .txt (one text per line), {alternatives}")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    return suffix


def text_table_separator(path: Path, encoding: str) -> str | None:
    """The separator of a text file (.txt, or no suffix) that is a table without being named one: every one of its
    first 200 lines that are not empty split by a tab, or by a semicolon, into the same fields, one of which (not the
    longest) repeats its values (a label: the Emotion dataset's ``i didnt feel humiliated;sadness``, UCI's SMS Spam
    Collection's ``ham<TAB>Go until jurong point ...``); None for one text a line."""
    with path.open(encoding=encoding, errors="replace", newline="") as fh:
        lines = [x.rstrip("\r\n") for x in itertools.islice((x for x in fh if x.strip()), 200)]
    for sep in ("\t", ";"):
        counts = {x.count(sep) for x in lines}
        if len(lines) < 2 or len(counts) != 1 or 0 in counts:
            continue
        columns = list(zip(*(x.split(sep) for x in lines)))
        longest = int(np.argmax([np.mean([len(v) for v in c]) for c in columns]))
        if any(j != longest and len(set(c)) <= len(c) / 2 for j, c in enumerate(columns)):
            return sep
    return None


def _text_layout(path: Path, suffix: str, encoding: str) -> tuple[str, str | None]:
    """The encoding a CSV, TSV or text file is read in (``file_encoding``) and its separator (``csv_separator``; a text
    file's ``text_table_separator``: None for one text a line), found once for the readers of its rows."""
    encoding = file_encoding(path, encoding)
    return encoding, text_table_separator(path, encoding) if suffix == ".txt" else csv_separator(path, encoding)


def read_table(path: str | Path, encoding: str = "utf-8", text_column: str = "text",
               media: Any = None) -> pd.DataFrame:
    """Read CSV/TSV, JSONL, Parquet or plain text (one text per line, into ``text_column``; empty
    lines skipped); every cell of CSV/JSONL is kept as read (no type guessing for text). With ``media`` (the data
    config), relative image / audio paths in it are read from ``data.media_root`` when set, else from the table's
    folder, and path columns given as templates are built (``media_templates``)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    path = unpacked(path) or path
    suffix = _check_table(path, "or a folder of class sub-folders for images")
    if suffix in (".parquet", ".pq"):
        df = read_parquet(path)
    elif suffix in EXCEL_SUFFIXES:
        df = read_excel(path)
    elif suffix in (".jsonl", ".json"):
        df = _read_jsonl(path, encoding)
    elif suffix == ".txt" and (targets := parallel_file(path)) is not None:
        df = read_parallel(path, targets, encoding, text_column)
    elif (layout := _text_layout(path, suffix, encoding))[1] is None:
        df = pd.concat([chunk for chunk, _ in _txt_chunks(path, layout[0], 1 << 30, text_column)] or [pd.DataFrame()])
    else:
        encoding, sep = layout
        df = _read_csv(path, sep, encoding)
        names = headerless_names(path, [str(c) for c in df.columns], df.head(200).values.tolist())
        if names is not None:  # its first line is data: read again without a header
            df = _read_csv(path, sep, encoding, names)
        df.attrs["header"] = names is None
        df = _without_written_index(df)
    if len(df) == 0:
        raise DataError(f"{path}: no data rows (only a header?)")
    df.attrs["source"] = str(packed_source(path))
    if media is None:
        return df
    if media.media_root:
        df.attrs["media_root"] = str(Path(media.media_root).expanduser())
    return media_templates(df, media)


def read_excel(path: Path) -> pd.DataFrame:
    """A spreadsheet's first sheet (``EXCEL_SUFFIXES``) as a table of text cells (its first row the header; rows
    left empty are not rows); a sheet with a header only, or a file its format does not read, is a DataError."""
    engine = "openpyxl" if path.suffix.lower() in (".xlsx", ".xlsm") else "calamine"
    what = "an OpenDocument spreadsheet" if path.suffix.lower() == ".ods" else "an Excel workbook"
    try:
        df = pd.read_excel(path, sheet_name=0, dtype=str, engine=engine)
    except ImportError as e:
        raise DataError(f"{path}: reading {path.suffix} needs python-calamine ({e}): pip install python-calamine"
                        ) from None
    except Exception as e:  # (openpyxl, calamine and zipfile raise many types)
        raise DataError(f"{path}: cannot read as {what}: {e}") from None
    df = df.dropna(how="all").reset_index(drop=True)
    df.columns = [str(c) for c in df.columns]
    df = _without_written_index(df)
    df.attrs["source"] = str(path)
    return df


def _quoting(path: Path) -> int:
    """How a table's cells are quoted: as CSV's are; a text file read as a table not at all (an SMS's ``"`` is text)."""
    return csv.QUOTE_NONE if path.suffix.lower() in (".txt", "") else csv.QUOTE_MINIMAL


def _read_csv(path: Path, sep: str, encoding: str, names: list[str] | None = None) -> pd.DataFrame:
    """A CSV / TSV as text cells (its header's names, or ``names`` for a file without a header)."""
    try:
        return pd.read_csv(path, sep=sep, encoding=encoding, dtype=str, keep_default_na=False, na_values=[""],
                           quoting=_quoting(path), header=None if names else "infer", names=names)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None


def _read_jsonl(path: Path, encoding: str) -> pd.DataFrame:
    check_encoding(path, encoding)
    text = path.read_text(encoding=encoding)
    if text.lstrip().startswith("["):  # a plain JSON array of records
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        try:  # one object, perhaps over many lines (pandas' to_json(indent=...))
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        splits = _json_splits(whole)
        if splits is not None:
            return splits
        records = [whole] if isinstance(whole, dict) else [rec for _, rec in jsonl_records(path, text)]
        if isinstance(whole, dict) and len(whole) == 1 and _records(next(iter(whole.values()))):
            records = next(iter(whole.values()))  # ({"data": [{...}, ...]}: the records under one key)
        columns = _json_columns(records)
        if columns is not None:
            return columns
    if not records:
        raise DataError(f"{path}: the file is empty")
    if all(label_studio_task(r) for r in records):
        records = label_studio_rows(records, str(path))
    return pd.DataFrame.from_records(records)


def _records(value: Any) -> bool:
    """``value`` is a list of JSON objects (rows), not empty."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _json_splits(whole: Any) -> pd.DataFrame | None:
    """One JSON object of splits, each a list of rows (CLINC150's data_full.json: {"train": [["what is the word for
    ...", "translate"], ...], "val": [...], "test": [...], "oos_train": [...]}; rows as pairs of text and label, or as
    objects) as one table with a ``split`` column naming each row's split (a key's last word that names one:
    oos_train -> train), read as a table's split column is (``split_column``); None for another object."""
    if not isinstance(whole, dict) or len(whole) < 2:
        return None
    parts = []
    for key, rows in whole.items():
        words = re.findall(r"[a-z]+", str(key).lower())
        split = next((SPLIT_OF[w] for w in reversed(words) if w in SPLIT_OF), None)
        if split is None or not isinstance(rows, list) or not rows:
            return None
        if all(isinstance(r, list) and len(r) == 2 for r in rows):
            longer = int(np.mean([len(str(r[1])) for r in rows]) > np.mean([len(str(r[0])) for r in rows]))
            part = pd.DataFrame({"text": [r[longer] for r in rows], "label": [r[1 - longer] for r in rows]})
        elif _records(rows):
            part = pd.DataFrame.from_records(rows)
        else:
            return None
        parts.append(part.assign(split=split))
    if "train" not in {p["split"].iat[0] for p in parts}:
        return None
    return pd.concat(parts, ignore_index=True)


def _one_object(path: Path, encoding: str) -> bool:
    """``path`` holds one JSON object (not JSON lines)."""
    try:
        return isinstance(json.loads(path.read_text(encoding=encoding)), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _json_columns(records: list[dict]) -> pd.DataFrame | None:
    """One JSON object of columns (pandas' ``to_json`` default, orient=columns: {"text": {"0": ..., "1": ...},
    "label": {...}}; or of lists: {"text": [...], "label": [...]}) as its table, else None."""
    if len(records) != 1 or not records[0]:
        return None
    cells = list(records[0].values())
    lengths = {len(v) for v in cells if isinstance(v, (dict, list))}
    if len(lengths) != 1 or not all(isinstance(v, (dict, list)) for v in cells) or lengths == {0}:
        return None
    if all(isinstance(v, dict) for v in cells) and len({tuple(v) for v in cells}) != 1:
        return None  # (columns of other rows: not a table)
    return pd.DataFrame({k: list(v.values()) if isinstance(v, dict) else v for k, v in records[0].items()})


# Label Studio's JSON export: a list of tasks {data: {text / image ...}, annotations: [{result: [...], was_cancelled}]}
def label_studio_task(rec: Any) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("data"), dict) and isinstance(rec.get("annotations", []), list)


def label_studio_annotation(rec: dict) -> dict | None:
    """A Label Studio task's first annotation that was not cancelled, else None."""
    return next((a for a in rec.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")), None)


def annotated_tasks(records: list[Any], where: str) -> list[bool]:
    """Which of ``records`` to read: all, except Label Studio tasks not yet annotated where others are (its export
    holds them too; said in a warning); where none is annotated, all of them (inputs to predict)."""
    bare = [label_studio_task(r) and label_studio_annotation(r) is None for r in records]
    if any(bare) and not all(bare):
        warnings.warn(f"{where}: {sum(bare)} Label Studio task(s) without an annotation left out", UserWarning,
                      stacklevel=3)
        return [not b for b in bare]
    return [True] * len(records)


def label_studio_rows(records: list[dict], where: str) -> list[dict]:
    """Label Studio tasks as table rows: the task's data (text, image ...) and ``label``, the choice its annotation
    made (a list where it made several: multi-label); tasks not yet annotated as ``annotated_tasks`` says."""
    rows = []
    for rec, keep in zip(records, annotated_tasks(records, where)):
        if not keep:
            continue
        row = {k: label_studio_file(v) for k, v in rec["data"].items()}
        done = label_studio_annotation(rec)
        if done is not None:
            chosen = [c for r in done.get("result") or [] if isinstance(r, dict) and isinstance(r.get("value"), dict)
                      for c in r["value"].get("choices") or []]
            if chosen:
                row["label"] = chosen[0] if len(chosen) == 1 else chosen
        rows.append(row)
    return rows


def label_studio_export(path: Path, kinds: tuple[str, ...]) -> list[dict] | None:
    """The tasks of a Label Studio JSON export of images (``[{data: {image}, annotations: [{result: [...]}]}]``), or
    of its JSON-MIN form whose objects are of ``kinds`` (``[{image, label: [{..., rectanglelabels}]}]``), else None
    (a COCO file ...)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, list) or not data or not all(isinstance(r, dict) for r in data):
        return None
    if all(label_studio_task(r) for r in data) or all(_min_objects(r, kinds) is not None for r in data):
        return data
    return None


def _min_objects(rec: dict, kinds: tuple[str, ...]) -> list | None:
    """A JSON-MIN task's objects of ``kinds`` (its one list of objects each holding one of those keys; none where it
    has no list and an image), else None."""
    lists = [v for v in rec.values() if isinstance(v, list) and v and all(isinstance(o, dict) for o in v)]
    found = [v for v in lists if all(any(k in o for k in kinds) for o in v)]
    return found[0] if len(found) == 1 else ([] if not lists and _ls_image_value(rec) is not None else None)


def _ls_image_value(data: dict) -> str | None:
    """A Label Studio task's image: its ``image`` value, else its one value naming an image file or upload."""
    if isinstance(data.get("image"), str):
        return data["image"]
    found = [v for v in data.values() if isinstance(v, str) and (v.startswith(("/data/", "http://", "https://"))
                                                                  or Path(v).suffix.lower() in IMAGE_SUFFIXES)]
    return found[0] if len(found) == 1 else None


def label_studio_images(path: Path, tasks: list[dict], kinds: tuple[str, ...]):
    """Per task of a Label Studio export of images (``label_studio_export``) to read: (where: the task named for
    messages, its image file: the upload or local-storage path as the user's copy names it, found beside the export
    or below it by its name, its objects of ``kinds``: their ``value`` with the ``original_width`` /
    ``original_height`` Label Studio saw, None for a task not annotated, the image's (width, height) Label Studio
    saw: None where it says not, ``masks.label_studio_size`` reads them). Tasks not annotated are left out, said,
    where others are (``annotated_tasks``)."""
    index: dict[str, list[str]] | None = None
    for i, (rec, keep) in enumerate(zip(tasks, annotated_tasks(tasks, str(path)))):
        if not keep:
            continue
        where = f"{path}: task {i + 1}" + (f" (id {rec['id']})" if "id" in rec else "")
        full = label_studio_task(rec)
        value = _ls_image_value(rec["data"] if full else rec)
        if value is None:
            raise DataError(f"{where}: no image (data.image, or one value naming an image file)")
        name = label_studio_file(value)
        file = Path(name) if Path(name).is_absolute() else path.parent / name
        if not file.is_file():
            index = _media_files(path.parent, IMAGE_SUFFIXES) if index is None else index
            found = index.get(Path(name).name, [])
            file = path.parent / found[0] if len(found) == 1 else file
        if full:
            done = label_studio_annotation(rec)
            results = [r for r in (done or {}).get("result") or [] if isinstance(r, dict)
                       and isinstance(r.get("value"), dict) and any(k in r["value"] for k in kinds)]
            objects = None if done is None else [
                dict(r["value"], original_width=r.get("original_width"), original_height=r.get("original_height"))
                for r in results]
        else:
            objects = _min_objects(rec, kinds) or []
        w = next((o["original_width"] for o in objects or [] if o.get("original_width")), None)
        h = next((o["original_height"] for o in objects or [] if o.get("original_height")), None)
        yield where, file, objects, (w, h)


def label_studio_file(value: Any) -> Any:
    """A Label Studio task's file as the user's copy names it: an upload (``/data/upload/3/4f3c1a2b-cat.jpg``, stored
    under a prefix of its own) as its own name, ``cat.jpg``; a local storage file (``/data/local-files/?d=photos/
    cat.jpg``) as its path under the storage's root, ``photos/cat.jpg``: found near the export as a table's file
    names are (``prepare.settle_columns``). Other values as they are."""
    if not isinstance(value, str):
        return value
    if value.startswith("/data/local-files/"):
        from urllib.parse import parse_qs, urlsplit

        return (parse_qs(urlsplit(value).query).get("d") or [value])[0]
    m = re.fullmatch(r"/data/upload/\d+/(?:[0-9a-f]{8}-)?(.+)", value)
    return m.group(1) if m else value


def jsonl_records(path: Path, text: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSON-lines text; errors name the line."""
    out = []
    for lineno, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {lineno} is not valid JSON: {e.msg}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}: line {lineno} is not a JSON object")
        out.append((lineno, rec))
    return out


def list_files(folder: Path, suffixes: set[str]) -> list[Path]:
    """Files anywhere below ``folder`` whose suffix is one of ``suffixes``, sorted; hidden ones (``.*``: macOS's
    ``._photo.jpg`` resource forks, ``.DS_Store``) are not files of the data."""
    return sorted(_files(folder, suffixes))


def has_files(folder: Path, suffixes: set[str]) -> bool:
    """``list_files`` would find some (it stops at the first)."""
    return next(_files(folder, suffixes), None) is not None


def _files(folder: Path, suffixes: set[str]) -> Any:
    return (f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder``, sorted."""
    return list_files(folder, IMAGE_SUFFIXES)


# Lists of held-out files a class folder may ship, one path per line relative to the folder (CLASS/FILE): Speech
# Commands' validation_list.txt and testing_list.txt name the clips of speakers kept out of training.
SPLIT_LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}
UNLABELLED_FOLDERS = ("unsup", "unlabeled", "unlabelled")  # a class folder's examples without a class (aclImdb)


def split_lists(folder: Path) -> dict[str, Path]:
    """The split lists (``SPLIT_LISTS``) that ``folder`` holds: {"val": path, "test": path}, either may be absent."""
    return {k: folder / name for k, name in SPLIT_LISTS.items() if (folder / name).is_file()}


def _listed(path: Path) -> list[tuple[int, str]]:
    """(line number, relative path) of every non-empty line of a split list."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason} at byte {e.start}); a split list names one file "
                        "per line") from None
    return [(n, line.strip().replace("\\", "/")) for n, line in enumerate(text.splitlines(), start=1)
            if line.strip()]


def read_file_list(path: Path, suffixes: set[str], column: str, what: str) -> pd.DataFrame:
    """A split list (one path per line, relative to the list's folder, CLASS/FILE as Speech Commands writes them)
    -> rows (file path in ``column``, label = the path's class sub-folder). Errors name the line."""
    rows = []
    for n, rel in _listed(path):
        parts = Path(rel).parts
        if len(parts) < 2 or Path(rel).is_absolute() or ".." in parts:
            raise DataError(f"{path}: line {n}: {rel!r} is not CLASS/FILE relative to {path.parent}")
        if Path(rel).suffix.lower() not in suffixes:
            raise DataError(f"{path}: line {n}: {rel!r} is not one of the {what} read here "
                            f"({', '.join(sorted(suffixes))})")
        f = path.parent / rel
        if not f.is_file():
            raise DataError(f"{path}: line {n}: {f} does not exist")
        rows.append((str(f), parts[0]))
    if not rows:
        raise DataError(f"{path}: names no {what} (one CLASS/FILE path per line)")
    df = pd.DataFrame(rows, columns=[column, "label"])
    df.attrs["source"] = str(path)
    return df


def read_class_folder(path: Path, suffixes: set[str], column: str = "image", example: str = "cat/1.png",
                      what: str = "images", split_lists_held_out: bool = False,
                      label_pattern: str | None = None) -> pd.DataFrame:
    """A folder of class sub-folders -> rows (file path in ``column``, label = sub-folder name) of
    the files below each sub-folder whose suffix is one of ``suffixes``. A sub-folder named ``.*`` or ``_*`` is not
    a class (Speech Commands keeps long noise recordings in ``_background_noise_``): left out, said in a warning.
    With ``split_lists_held_out`` (a task that reads them: audio classification), the files a split list of the
    folder names (``SPLIT_LISTS``) are left out too, said in a warning: they are its held-out splits, read through
    the lists. A folder of the files themselves, without class sub-folders, or one read with ``label_pattern``
    (data.label_pattern): each file's class is read from its name (``names_classes``)."""
    splits = split_folders(path)
    if splits:  # (fmtune train, evaluate and predict read them as splits: prepare.split_lists_unset, held_out_test)
        raise DataError(f"{path}: its sub-folders are splits ({', '.join(p.name for p in splits.values())}), not "
                        f"classes: give {splits['train']} (its class sub-folders) here")
    flat = [f for f in path.iterdir() if f.is_file() and f.suffix.lower() in suffixes and not f.name.startswith(".")]
    if label_pattern or (flat and not any(has_files(d, suffixes) for d in path.iterdir() if d.is_dir())):
        files = list_files(path, suffixes)
        df = pd.DataFrame({column: [str(f) for f in files], "label": names_classes(path, files, label_pattern)})
        df.attrs["source"] = str(path)
        return df
    rows = []
    subs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    aside = [p.name for p in subs if p.name.startswith("_") or p.name.lower() in UNLABELLED_FOLDERS]
    if aside:
        warnings.warn(f"{path}: sub-folder(s) {', '.join(aside)} left out (a name starting with '_' is not a class, "
                      "nor are unlabelled examples: unsup, unlabeled)", UserWarning, stacklevel=2)
    for sub in subs:
        if sub.name not in aside:
            rows += [(str(f), sub.name) for f in list_files(sub, suffixes)]
    lists = split_lists(path) if split_lists_held_out else {}
    if lists:
        held = {str(path / rel) for f in lists.values() for _, rel in _listed(f)}
        before = len(rows)
        rows = [r for r in rows if r[0] not in held]
        warnings.warn(f"{path}: {before - len(rows):,} files named in {' and '.join(f.name for f in lists.values())} "
                      f"left out (the folder's held-out splits; fmtune train validates and tests on them unless "
                      "--val / --test are given)", UserWarning, stacklevel=2)
    if not rows:
        raise DataError(f"{path}: no {what} found; expected class sub-folders (e.g. {path}/{example}) "
                        f"holding {', '.join(sorted(suffixes))} files"
                        + (" that the folder's split lists do not name" if lists else ""))
    df = pd.DataFrame(rows, columns=[column, "label"])
    df.attrs["source"] = str(path)
    return df


# a file's class in its name, where no sub-folder holds it: the name without its number at the end (Oxford-IIIT Pet's
# Abyssinian_12.jpg, Dogs vs. Cats' cat.0.jpg)
_NAMED_CLASS = re.compile(r"^(.*?\D)[\s_.\-]*\d+$")


def names_classes(path: Path, files: list[Path], pattern: str | None) -> list[str]:
    """Each of ``files``' class, from its name: ``pattern``'s (data.label_pattern) first group over the file's name
    (or what it matches, without a group: ``^(\\d+)_`` reads the Free Spoken Digit Dataset's 0_jackson_0.wav as 0);
    unset, its name without its suffix and its number at the end, said in a warning. A name that holds none, or
    names that give one class only or nearly one a file, are a DataError naming what to set."""
    rx = re.compile(pattern) if pattern else _NAMED_CLASS
    hint = ("give the files in class sub-folders, or --set data.label_pattern=REGEX (a regular expression over a "
            "file's name, its first group the class: '^(\\d+)_' reads 0_jackson_0.wav as 0)")
    out = []
    for f in files:
        m = rx.search(f.name if pattern else f.stem)
        label = (m.group(1) if m and rx.groups else m.group(0) if m else None)
        if not label or not label.strip(" _.-"):
            said = f"data.label_pattern {pattern!r} finds no class in its name" if pattern else (
                "no class sub-folder holds it, and its name holds no class before a number (cat.1.jpg, "
                "Abyssinian_12.jpg)")
            raise DataError(f"{f}: {said}; {hint}")
        out.append(label.strip(" _.-") if not pattern else label)
    counts = pd.Series(out).value_counts()
    if len(counts) < 2 or (not pattern and len(counts) > len(out) / 2):
        raise DataError(f"{path}: {len(out)} files without class sub-folders, whose names give {len(counts)} "
                        f"class(es) ({', '.join(map(str, counts.index[:5]))}{' ...' if len(counts) > 5 else ''}); "
                        f"{hint}")
    if not pattern:
        warnings.warn(f"{path}: no class sub-folders: each file's class read from its name, without the number at its "
                      f"end ({files[0].name} -> {out[0]}): {len(counts)} classes, {counts.min()} to {counts.max()} "
                      "files each (--set data.label_pattern=REGEX reads them otherwise)", UserWarning, stacklevel=3)
    return out


def read_image_folder(path: Path, label_pattern: str | None = None) -> pd.DataFrame:
    """A folder of class sub-folders of images -> rows (image path, label = sub-folder name; or read from the file
    names, ``names_classes``)."""
    return read_class_folder(path, IMAGE_SUFFIXES, label_pattern=label_pattern)


TEXT_FILE_SUFFIXES = {".txt", ""}  # a text class folder's files: aclImdb's .txt, 20 Newsgroups' numbered files


def read_text_folder(path: Path, encoding: str = "utf-8", column: str = "text",
                     label_pattern: str | None = None) -> pd.DataFrame:
    """A folder of class sub-folders of text files, one example a file (scikit-learn's load_files layout: aclImdb's
    train/pos/*.txt, 20 Newsgroups, BBC News) -> rows (its text in ``column``, label = sub-folder name, file)."""
    df = read_class_folder(path, TEXT_FILE_SUFFIXES, column="file", example="pos/1.txt", what="text files",
                           label_pattern=label_pattern)
    df.insert(0, column, [text_file(f, encoding) for f in df["file"]])
    return df


def text_file(path: str | Path, encoding: str) -> str:
    """A text file's text (one example of a folder of text files), stripped; an error naming it if it is not in
    ``encoding``."""
    try:
        return Path(path).read_text(encoding=encoding).strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not {encoding} text (byte {e.start}); give its encoding: --set "
                        "data.encoding=latin-1 (or the files' encoding)") from None


# a folder's table of its files and their labels (Hugging Face's imagefolder / audiofolder layout: file_name, ...)
METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.tsv", "metadata.parquet")


def folder_metadata(folder: Path) -> Path | None:
    """The table of ``folder``'s files (``METADATA_FILES``), else None."""
    return next((folder / m for m in METADATA_FILES if (folder / m).is_file()), None)


def read_any(path: str | Path, encoding: str = "utf-8", text_column: str = "text", media: Any = None) -> pd.DataFrame:
    """A table file (or a text file, one text per line), or a folder: its metadata.csv / .jsonl (Hugging Face's
    imagefolder layout: file_name and its label) where it has one, else its class sub-folders of images or of text
    files (``read_text_folder``)."""
    p = Path(path)
    if p.is_dir() and folder_metadata(p) is not None:
        return read_table(folder_metadata(p), encoding, text_column, media)
    if p.is_dir():
        images = any(f.suffix.lower() in IMAGE_SUFFIXES for f in p.rglob("*"))
        pattern = getattr(media, "label_pattern", None)
        if not images and any(has_files(d, TEXT_FILE_SUFFIXES) for d in p.iterdir() if d.is_dir()):
            return read_text_folder(p, encoding, text_column, pattern)
        return read_image_folder(p, pattern)
    return read_table(p, encoding, text_column, media)


def table_base(df: pd.DataFrame) -> Path:
    """The folder that relative paths in ``df`` (image and audio columns) are relative to: ``data.media_root``
    where given (see ``read_table``), else its file's."""
    if df.attrs.get("media_root"):
        return Path(df.attrs["media_root"])
    src = df.attrs.get("source", "")
    return Path(src).parent if src and Path(src).is_file() else Path(".")


MEDIA_COLUMNS = ("image_column", "audio_column", "mask_column")  # data options naming a column of file paths


def media_templates(df: pd.DataFrame, data_cfg: Any) -> pd.DataFrame:
    """``df`` with a column of file paths built from its other columns where ``data.image_column`` /
    ``audio_column`` / ``mask_column`` is a template over column names rather than a column: Kaggle's
    ``{id}.jpg``, UrbanSound8K's ``fold{fold}/{slice_file_name}``. The new column is named by the template."""
    for attr in MEDIA_COLUMNS:
        template = getattr(data_cfg, attr, None)
        if not template or "{" not in template or template in df.columns:
            continue
        keys = [k for _, k, _, _ in string.Formatter().parse(template) if k]
        missing = [k for k in keys if k not in df.columns]
        if missing:
            raise DataError(f"{df.attrs.get('source', 'the data')}: data.{attr} {template!r} names "
                            f"{', '.join(map(repr, missing))}, not a column; columns are: "
                            f"{', '.join(map(str, df.columns))}")
        df[template] = template_paths(df, template)
    return df


def template_paths(df: pd.DataFrame, template: str) -> list[str | None]:
    """Each row's file path as ``template`` writes it from its columns (None where a cell is empty); a wildcard
    folder's files found by name (``_by_name``)."""
    keys = [k for _, k, _, _ in string.Formatter().parse(template) if k]
    rows = df[keys].astype(object).where(df[keys].notna(), None).to_dict("records")
    paths = [None if any(v is None for v in r.values()) else template.format(**r) for r in rows]
    return _by_name(paths, table_base(df)) if "*" in template else paths


def _by_name(paths: list[str | None], base: Path) -> list[str | None]:
    """Paths whose folders hold a wildcard (``HAM10000_images_part_*/{image_id}.jpg``: a table's files split over
    folders no column names) as the one file of that name in the folders it matches under ``base``; a path that
    matches none, or several, is kept as written (the error that follows names it)."""
    index: dict[tuple[str, str], list[str]] = {}
    for folder in {Path(p).parent.as_posix() for p in paths if p}:
        for f in sorted(base.glob(f"{folder}/*")):
            index.setdefault((folder, f.name), []).append(f.relative_to(base).as_posix())
    out = []
    for p in paths:
        found = index.get((Path(p).parent.as_posix(), Path(p).name), []) if p else []
        out.append(found[0] if len(found) == 1 else p)
    return out


def media_folder(missing: list[Path], base: Path) -> Path | None:
    """Where the relative paths of a table that are not found under ``base`` are instead: the first folder beside
    or below the table's that holds the first few of them (Common Voice's clips/, ESC-50's ../audio/), or None."""
    rel = [p.relative_to(base) for p in missing if p.is_relative_to(base)][:5]
    if not rel or not base.is_dir():
        return None
    here = base.resolve()
    for parent in (base, base.parent):
        folders = sorted(d for d in parent.iterdir() if d.is_dir()) + ([parent] if parent != base else [])
        for d in folders:
            if d.resolve() != here and all((d / r).is_file() for r in rel):
                return d
    return None


MEDIA_WALK = 200_000  # files looked at, at most, per folder searched for a table's media (media_template)


def _media_files(root: Path, suffixes: set[str], limit: int = MEDIA_WALK) -> dict[str, list[str]]:
    """The files of ``suffixes`` below ``root`` (hidden folders skipped; at most ``limit`` entries looked at), by
    name and by stem: {name or stem: [path relative to root, ...]}."""
    index: dict[str, list[str]] = {}
    seen = 0
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        seen += len(files) + len(dirs)
        rel = Path(folder).relative_to(root)
        for f in files:
            if Path(f).suffix.lower() in suffixes:
                path = (rel / f).as_posix()
                index.setdefault(f, []).append(path)
                index.setdefault(Path(f).stem, []).append(path)
        if seen > limit:
            break
    return index


def _as_template(df: pd.DataFrame, column: str, rows: list[int], found: list[str]) -> str | None:
    """The one template over ``df``'s columns that writes each of ``rows``' ``found`` file (a path relative to the
    folder searched) from its ``column`` value: ``{column}`` or ``{column}.png`` as the name, each folder above it
    the same for every row or written from a column (``fold{fold}``), else None."""
    value = [str(df[column].iloc[i]).strip() for i in rows]
    parts = [Path(f).parts for f in found]
    if len({len(p) for p in parts}) != 1:
        return None
    names = {f"{{{column}}}" if Path(f).name == v else f"{{{column}}}{Path(f).suffix}" for f, v in zip(found, value)}
    if len(names) != 1:
        return None
    out = []
    for depth in range(len(parts[0]) - 1):
        here = [p[depth] for p in parts]
        if len(set(here)) == 1:
            out.append(here[0].replace("{", "{{").replace("}", "}}"))
            continue
        written = None
        for other in df.columns:
            cells = [str(df[other].iloc[i]).strip() for i in rows]
            if _field_name(other) and all(c and c in h for c, h in zip(cells, here)):
                forms = {h.replace(c, f"{{{other}}}", 1) for c, h in zip(cells, here)}
                if len(forms) == 1:
                    written = forms.pop()
                    break
        if written is None:  # folders no column names (HAM10000's part_1, part_2): a wildcard between what they share
            start = os.path.commonprefix(here).rstrip("0123456789")  # (images_001 .. images_012: images_*)
            end = os.path.commonprefix([h[len(start):][::-1] for h in here])[::-1].lstrip("0123456789")
            if not (start or end):
                return None
            written = f"{start}*{end}".replace("{", "{{").replace("}", "}}")
        out.append(written)
    return "/".join([*out, names.pop()])


def _field_name(column: Any) -> bool:
    """``column`` can be named in a template (``{Image Index}``: str.format's field names)."""
    return isinstance(column, str) and bool(column.strip()) and not set(column) & set(".[]:!{}*/\\")


def media_template(df: pd.DataFrame, kind: str, column: str | None = None, rows: int = 20) -> tuple[str, Path] | None:
    """Where a table names its image / audio files (``kind``) not as paths but by a value its files are named after
    (Kaggle's ``id`` / ``id_code`` beside ``train_images/{id}.png``; UrbanSound8K's ``slice_file_name`` in
    ``audio/fold{fold}/``): a template over its columns (``media_templates``) that writes each row's file, found by
    name below the table's media folder (``table_base``), its own folder or the one above it, and that folder.
    Found from ``rows`` rows spread over the table, whose values in one column (``column``, if given) each name
    exactly one file, their folders the same or written from another column; kept where it writes files that exist
    for nine in ten of 200 rows spread over it. Names are matched as they are or as the file's name without its
    suffix. None where there is no such column, or more than one."""
    src = df.attrs.get("source", "")
    if not src or not Path(src).is_file() or df.empty:
        return None
    here = Path(src).parent
    sample = df.iloc[np.unique(np.linspace(0, len(df) - 1, min(rows, len(df))).astype(int))].reset_index(drop=True)
    check = df.iloc[np.unique(np.linspace(0, len(df) - 1, min(200, len(df))).astype(int))].reset_index(drop=True)
    columns = [column] if column else [c for c in df.columns if _field_name(c)]
    for root in dict.fromkeys((table_base(df), here, here.parent)):
        index = _media_files(root, MEDIA_SUFFIXES[kind]) if root.is_dir() else {}
        if not index:
            continue
        found = []
        for c in columns:
            cells = sample[c].astype(object).where(sample[c].notna(), "").astype(str).str.strip()
            hits = [index.get(v, []) if v and "/" not in v and "\\" not in v else [] for v in cells]
            if all(len(h) == 1 for h in hits):
                template = _as_template(sample, c, list(range(len(sample))), [h[0] for h in hits])
                if template:
                    found.append(template)
        if len(found) != 1:
            continue
        check.attrs["media_root"] = str(root)  # (a wildcard's files are looked up there)
        try:
            written = template_paths(check, found[0])
        except (KeyError, ValueError, IndexError):
            continue
        if sum(isinstance(p, str) and (root / p).is_file() for p in written) >= 0.9 * len(written):
            return found[0], root
    return None


def media_root_hint(missing: list[Path], base: Path) -> str:
    """``media_folder`` as advice to append to the error, or ""."""
    d = media_folder(missing, base)
    return f"\n  (they are under {d}: --set data.media_root={d})" if d is not None else ""


# The columns well-known datasets keep their inputs and labels in, read where the data.* option is left at its
# default and a table lacks that column but holds exactly one of these (prepare.settle_columns): GLUE's SST-2 and
# CoLA (sentence), IMDB's and Yelp's CSVs (review, sentiment), CLINC150 (intent), GoEmotions (labels), AG News
# variants (category), ... Names are compared without case. Paths of images or audio are found by their suffixes.
USUAL_TEXT = ("text", "sentence", "review", "content", "tweet", "comment_text", "comment", "document", "utterance",
              "body", "message", "review_text", "sms")
USUAL_LABELS = ("label", "labels", "intent", "category", "class", "sentiment", "emotion", "topic", "target",
                "genre", "intent_class")  # (GTZAN, MINDS-14; not fine_label: TREC's and CIFAR-100's beside
# coarse_label are two tasks, the error names both)
USUAL_TARGETS = ("label", "target", "score", "rating", "stars", "y")  # regression


def label_names_beside(df: pd.DataFrame, column: str) -> list[str] | None:
    """The class names a column beside the label column gives its ids, in id order, where ``column`` holds ids 0..K-1
    and ``{column}_text`` (SetFit's datasets: text, label, label_text) or ``{column}_name`` names each id with one
    name of its own; else None."""
    named = next((c for c in (f"{column}_text", f"{column}_name") if c in df.columns), None)
    if named is None or column not in df.columns:
        return None
    pairs = df[[column, named]].dropna().astype(str).apply(lambda s: s.str.strip()).drop_duplicates()
    if not len(pairs) or not pairs[column].str.fullmatch(r"\d+").all():
        return None
    ids = pairs[column].astype(int)
    if ids.duplicated().any() or pairs[named].duplicated().any() or sorted(ids) != list(range(len(ids))):
        return None
    return [name for _, name in sorted(zip(ids, pairs[named]))]


def usual_columns(df: pd.DataFrame, names: tuple[str, ...]) -> list[str]:
    """The columns of ``df`` named as one of ``names`` (without regard to case)."""
    wanted = set(names)
    return [c for c in df.columns if isinstance(c, str) and c.strip().lower() in wanted]


def media_path_columns(df: pd.DataFrame, kind: str) -> list[str]:
    """The columns whose first cells (up to 50 that are filled) all hold ``kind`` files (image, audio): paths with
    such a suffix, or files embedded in the table (a Hugging Face dataset's Image / Audio cells; by the suffix of
    the name they carry, if any)."""
    suffixes, head, out = MEDIA_SUFFIXES[kind], df.head(50), []

    def holds(v: Any) -> bool:
        if isinstance(v, str):
            return Path(v.strip()).suffix.lower() in suffixes
        name = v.get("path") if isinstance(v, dict) else None
        return embedded(v) is not None and (not name or Path(str(name)).suffix.lower() in suffixes)

    def filled(v: Any) -> bool:
        return v is not None and not (isinstance(v, float) and v != v) and not (isinstance(v, str) and not v.strip())

    for c in df.columns:
        cells = [v for v in head[c].tolist() if filled(v)]
        if cells and all(holds(v) for v in cells):
            out.append(c)
    return out


def absolute_paths(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """A copy of ``df`` whose ``column`` of paths is absolute (to mix rows of several tables); files
    embedded in the table (see ``media_cell``) stay as they are."""
    base, out = table_base(df), df.copy()
    out[column] = [v if embedded(v) is not None else str(Path(str(v)) if Path(str(v)).is_absolute()
                                                         else (base / str(v)).resolve()) for v in df[column]]
    return out


COCO_FILES = ("annotations.json", "_annotations.coco.json", "instances.json")  # a folder's COCO file (Roboflow's too)


def find_coco_file(folder: Path) -> Path | None:
    """The COCO file of a dataset folder: one of COCO_FILES in it, else the only .json in its annotations/ (CVAT's
    export: annotations/instances_default.json beside images/); None if there is none."""
    found = next((folder / n for n in COCO_FILES if (folder / n).is_file()), None)
    if found is None and (folder / "annotations").is_dir():
        listed = sorted((folder / "annotations").glob("*.json"))
        found = listed[0] if len(listed) == 1 else None
    return found


def coco_image_root(path: Path, data: dict[str, Any], image_root: str | None) -> Path:
    """The folder a COCO file's ``file_name``s are relative to: data.image_root if given, else the file's own folder,
    or, where its first image is not there, the images/ folder beside it or above it (CVAT writes
    annotations/instances_default.json beside images/)."""
    if image_root:
        return Path(image_root)
    first = next((im.get("file_name") for im in data["images"] if isinstance(im, dict) and im.get("file_name")), None)
    if first is None or Path(first).is_absolute():
        return path.parent
    for root in (path.parent, path.parent / "images", path.parent.parent / "images", path.parent.parent):
        if (root / first).is_file():
            return root
    return path.parent


def read_coco_json(path: Path) -> dict[str, Any]:
    """A COCO annotation file (images, annotations, categories); a DataError naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a readable COCO JSON file ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise DataError(f"{path}: no {key!r} list; a COCO file has images, annotations and categories")
    return data


def coco_images(path: Path, image_root: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A COCO file's images, each {"entry": its images[] object, "file": its path (``coco_image_root``),
    "objects": [(where, annotation), ...]}, in the file's order, and its categories in id order. An image without
    id or file_name, or an annotation whose image or category is not listed, is a DataError naming it (``where``
    names an annotation so: file, index and id)."""
    data = read_coco_json(path)
    root = coco_image_root(path, data, image_root)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    known = {c["id"] for c in categories}
    images: dict[Any, dict[str, Any]] = {}
    for i, im in enumerate(data["images"]):
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{path}: images[{i}] has no id or file_name")
        file = Path(im["file_name"])
        images[im["id"]] = {"entry": im, "file": file if file.is_absolute() else root / file, "objects": []}
    for i, a in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {a.get('id')})"
        if a.get("image_id") not in images:
            raise DataError(f"{where}: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in known:
            raise DataError(f"{where}: category_id {a.get('category_id')!r} is not in categories")
        images[a["image_id"]]["objects"].append((where, a))
    return list(images.values()), categories


def embedded(value: Any) -> bytes | None:
    """The file held in a table cell itself: a Hugging Face dataset's Image / Audio cell as Parquet
    stores it (``{"bytes": ..., "path": name}``), or raw bytes; None for a cell naming a file."""
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):
        return bytes(value["bytes"])
    return bytes(value) if isinstance(value, (bytes, bytearray)) else None


def media_cell(value: Any, base: Path) -> tuple[Path | bytes | None, str]:
    """A table cell of an image / audio column -> (what to decode, how messages name it): a path
    (relative to ``base``, the table's folder), or the bytes of a file embedded in the table (see
    ``embedded``; a cell of a path only is that path). None for an empty cell."""
    data = embedded(value)
    if data is not None:
        name = value.get("path") if isinstance(value, dict) else None
        return data, f"embedded file {name}" if name else "embedded file"
    if isinstance(value, dict):  # {"bytes": None, "path": ...}: the file is outside the table
        value = value.get("path")
    if value is None or (isinstance(value, float) and value != value) or not str(value).strip():
        return None, ""
    p = Path(str(value))
    p = p if p.is_absolute() else base / p
    return p, str(p)


def file_like(source: Any) -> Any:
    """What PIL / soundfile open for a ``media_cell`` source: a path as it is, the bytes of a file
    embedded in a table as a file object."""
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


def media_name(source: Path | bytes | None, name: str) -> str:
    """A short name for a ``media_cell``: the file's name, for a path or an embedded file alike."""
    return Path(name.removeprefix("embedded file ") if isinstance(source, bytes) else name).name or name


LABEL_WORDS = ("label", "class", "category", "target", "intent", "sentiment", "topic", "tag", "emotion", "score")
MIN_TEXT_CHARS = 15  # the mean length of a column of texts worth suggesting as one


def likely_columns(df: pd.DataFrame, what: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Columns that may be the missing ``what`` ("text" or "label"), most likely first, for the message
    that names it: the column of the longest strings for a text; for a label, columns named like
    one (coarse_label, intent, category ...), else those of a few distinct values. Never ``exclude``."""
    names = [c for c in df.columns if isinstance(c, str) and c not in exclude]
    head = df.head(1000)
    if what == "text":
        lengths = {c: float(np.mean([len(v) if isinstance(v, str) else 0 for v in head[c].dropna()] or [0]))
                   for c in names}  # (not Series.mean: an empty column of pandas' string dtype cannot average)
        return [c for c in sorted(lengths, key=lengths.get, reverse=True) if lengths[c] >= MIN_TEXT_CHARS][:1]
    if what == "label":
        named = [c for c in names if any(w in c.lower() for w in LABEL_WORDS)]
        if named:
            return named[:4]
        few = max(2, min(50, len(head) // 5))
        return [c for c in names if 2 <= _distinct(head[c]) <= few][:4]
    return []


def spread(df: pd.DataFrame, n: int = 1000) -> pd.DataFrame:
    """``n`` rows of ``df`` spread evenly over it (all of a shorter one)."""
    return df if len(df) <= n else df.iloc[np.linspace(0, len(df) - 1, n).astype(int)]


def free_text_columns(df: pd.DataFrame, exclude: set[str] | tuple[str, ...] = ()) -> list[str]:
    """The columns of free text in a table without a text column of a usual name, in their order (AG News as
    Kaggle ships it: Title, Description; News Category: headline, short_description): of 1,000 rows spread over it,
    at least half filled, at least half their values distinct, four words or more on average (not authors, links,
    dates, ids or labels). Never ``exclude``."""
    out, rows = [], spread(df)
    for c in df.columns:
        if not isinstance(c, str) or c in exclude:
            continue
        values = [v.strip() for v in rows[c] if isinstance(v, str) and v.strip()]
        if len(values) < max(1, min(len(df), 1000) / 2) or len(set(values)) < len(values) / 2:
            continue
        if np.mean([len(v.split()) for v in values]) >= 4:
            out.append(c)
    return out


_LABEL_SUFFIXES = ("index", "id", "idx", "code", "name", "num")  # AG News' "Class Index", label_id, class_name


def label_named_columns(df: pd.DataFrame, names: tuple[str, ...] | set[str], exclude: set[str]) -> list[str]:
    """Columns named for a label in more words than one: whose last word is one of ``names`` (Twitter US Airline
    Sentiment's airline_sentiment, not airline_sentiment_confidence), or whose first is, followed by an id's word
    (Kaggle's AG News "Class Index", label_id). Words split at ``_``, ``-``, spaces and camelCase."""
    out = []
    for c in df.columns:
        if not isinstance(c, str) or c in exclude:
            continue
        words = re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", c).lower())
        if len(words) > 1 and (words[-1] in names or (len(words) == 2 and words[0] in names
                                                      and words[1] in _LABEL_SUFFIXES)):
            out.append(c)
    return out


def repeating_columns(df: pd.DataFrame, exclude: set[str]) -> list[str]:
    """The columns that may hold class labels: of 1,000 rows spread over the table (a table sorted by its label),
    nine in ten filled, two values or more, each value repeated on average (distinct values at most half the filled
    rows). Never ``exclude``."""
    head, out = spread(df), []
    for c in df.columns:
        if c in exclude:
            continue
        filled = head[c].dropna()
        filled = filled[filled.astype(str).str.strip() != ""]
        if len(filled) >= 0.9 * len(head) and 2 <= _distinct(filled) <= len(filled) / 2:
            out.append(c)
    return out


def _distinct(values: pd.Series) -> int:
    """How many distinct values (cells holding lists or dicts, which do not hash, count as text)."""
    try:
        return int(values.nunique())
    except TypeError:
        return int(values.astype(str).nunique())


def require_column(df: pd.DataFrame, column: str, what: str, option: str, exclude: tuple[str, ...] = ()) -> None:
    """A DataError listing the columns (and the likely ones) unless ``df`` has ``column``; ``exclude``:
    columns the message must not suggest (the text, when the label is missing)."""
    if column not in df.columns:
        src = df.attrs.get("source", "the data")
        likely = likely_columns(df, what, exclude)
        hint = (f" ({' or '.join(repr(c) for c in likely)}?)" if likely else "")
        raise DataError(f"{src}: no {what} column {column!r}; columns are: {', '.join(map(str, df.columns))}. "
                        f"Name the right one with --set {option}=COLUMN{hint}")


# the column names of common sentence-pair sets (GLUE, SNLI, SICK, PAWS ...): a training table holding one of these
# pairs and no text column is read as pairs of texts (prepare.settle_columns); another is told how to read it
PAIR_COLUMNS = [("sentence1", "sentence2"), ("premise", "hypothesis"), ("question1", "question2"),
                ("question", "sentence"), ("question", "passage"), ("sentence_A", "sentence_B"),
                ("sentence_a", "sentence_b"), ("text1", "text2"), ("text_a", "text_b"), ("query", "passage")]


def usual_pair(df: pd.DataFrame) -> tuple[str, str] | None:
    """The one pair of ``PAIR_COLUMNS`` ``df`` holds both columns of, else None (none, or more than one)."""
    found = [(a, b) for a, b in PAIR_COLUMNS if a in df.columns and b in df.columns]
    return found[0] if len(found) == 1 else None


def text_columns(data_cfg: Any) -> list[str]:
    """The columns a row's text is read from: ``data.text_column``, and ``data.text_pair_column``
    for a run on pairs of texts."""
    return [c for c in (data_cfg.text_column, getattr(data_cfg, "text_pair_column", None)) if c]


def require_text_column(df: pd.DataFrame, column: str, pair_column: str | None = None) -> list[str]:
    """The text column (and the second text's, ``pair_column``), else a DataError listing the
    columns; a table of sentence pairs read without data.text_pair_column is told the settings that
    read it. Returns the columns a row's text is read from."""
    if column not in df.columns and pair_column is None:
        pair = usual_pair(df)
        if pair:
            raise DataError(f"{df.attrs.get('source', 'the data')}: no text column {column!r}; columns are: "
                            f"{', '.join(map(str, df.columns))}. These look like pairs of texts: --set "
                            f"data.text_column={pair[0]} --set data.text_pair_column={pair[1]}")
    require_column(df, column, "text", "data.text_column")
    if pair_column is None:
        return [column]
    require_column(df, pair_column, "second text", "data.text_pair_column")
    return [column, pair_column]


def row_label(df: pd.DataFrame, i: int) -> str:
    """Human name of positional row ``i`` (0-based) for messages.

    Frames keep their file row positions in the index (splits do not renumber), so the message
    points at the row in the file even after a train/validation split.
    """
    src = df.attrs.get("source", "")
    idx = df.index[i]
    i = int(idx) if isinstance(idx, (int, np.integer)) else i
    if df.attrs.get("header") is False:  # a table without a header line (LJSpeech's metadata.csv)
        return f"{src}: line {i + 1}"
    if src.endswith(tuple(EXCEL_SUFFIXES)):
        return f"{src}: row {i + 1} (sheet row {i + 2})"
    if df.attrs.get("header") is True or src.endswith((".csv", ".tsv")):  # (a .txt table with a header too)
        return f"{src}: row {i + 1} (line {i + 2})"
    if src.endswith(".txt"):
        return f"{src}: line {i + 1}"
    return f"{src}: row {i + 1}"


def row_prefix(df: pd.DataFrame, i: int) -> str:
    """``row_label(df, i)`` and ": " when ``df`` was read from a table (its rows name the files),
    else "" (a folder: the file's own path says which)."""
    src = df.attrs.get("source", "")
    return f"{row_label(df, i)}: " if src and Path(src).is_file() else ""


# --- streaming: large inputs in chunks of rows, in constant memory ----------------------------

def count_rows(path: Path, media: str = "image") -> int | None:
    """Data rows of a table, or ``media`` files (image, audio) of a folder, cheaply (for a progress
    bar); None if unknown."""
    suffix = path.suffix.lower()
    if path.is_dir():
        return len(list_files(path, TEXT_FILE_SUFFIXES if media == "text" else MEDIA_SUFFIXES[media]))
    if suffix in MEDIA_SUFFIXES.get(media, ()):
        return 1
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if suffix in CONLL_PREDICT_SUFFIXES or suffix in EXCEL_SUFFIXES:
        return None  # sentences, not lines; a workbook's rows are known once read
    lines = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            lines += block.count(b"\n")
    return max(0, lines - (1 if suffix in (".csv", ".tsv") else 0))


def iter_chunks(path: str | Path, encoding: str, chunk_rows: int, image_column: str = "image",
                text_column: str = "text", media: str = "image"):
    """Yield ``(frame, problems)`` chunks of at most ``chunk_rows`` rows of a table, a folder
    (any depth) of ``media`` files (image, audio: their paths in ``image_column``; text: their texts in
    ``text_column``, the path in ``file``) or one such file. Frames keep the file's row positions in their index. A row
    that cannot be read at all (a CSV line with the wrong number of fields, a JSONL line that is
    not a JSON object) is an empty row, and ``problems`` maps its position in the chunk to a
    message naming its line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if media == "text" and path.is_dir():  # a folder of text files, one example a file
        files = list_files(path, TEXT_FILE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no text files found (.txt, or files without a suffix)")
        for start in range(0, len(files), chunk_rows):
            part = files[start:start + chunk_rows]
            df = pd.DataFrame({text_column: [text_file(f, encoding) for f in part], "file": [str(f) for f in part]},
                              index=range(start, start + len(part)))
            df.attrs["source"] = str(path)
            yield df, {}
        return
    suffixes = MEDIA_SUFFIXES.get(media, set())
    if path.is_dir() or path.suffix.lower() in suffixes:
        files = list_files(path, suffixes) if path.is_dir() else [path]
        if not files:
            raise DataError(f"{path}: no {media} files found ({', '.join(sorted(suffixes))})")
        for start in range(0, len(files), chunk_rows):
            part = files[start:start + chunk_rows]
            df = pd.DataFrame({image_column: [str(f) for f in part]}, index=range(start, start + len(part)))
            df.attrs["source"] = str(path)
            yield df, {}
        return
    if (inside := unpacked(path)) is not None:  # (relative media paths: beside the compressed file)
        for df, problems in iter_chunks(inside, encoding, chunk_rows, image_column, text_column, media):
            df.attrs["source"] = str(path)
            yield df, problems
        return
    suffix = _check_table(path, f"an {media} file, or a folder of {media} files")
    if suffix in (".parquet", ".pq"):
        yield from _parquet_chunks(path, chunk_rows)
    elif suffix in EXCEL_SUFFIXES:
        yield from _whole_chunks(read_excel(path), chunk_rows)
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl_chunks(path, encoding, chunk_rows)
    elif (layout := _text_layout(path, suffix, encoding))[1] is None:
        yield from _txt_chunks(path, layout[0], chunk_rows, text_column)
    else:
        yield from _csv_chunks(path, *layout, chunk_rows)


def _whole_chunks(df: pd.DataFrame, chunk_rows: int):
    """A table read whole (a JSON array, a workbook: they cannot be streamed) in chunks of ``chunk_rows`` rows."""
    for start in range(0, len(df), chunk_rows):
        yield df.iloc[start:start + chunk_rows], {}


def _parquet_chunks(path: Path, chunk_rows: int):
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises many types
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    start, names = 0, hf_label_names(path)
    for batch in pf.iter_batches(batch_size=chunk_rows):
        df = batch.to_pandas()
        df.index = range(start, start + len(df))
        df.attrs["source"] = str(path)
        start += len(df)
        yield name_labels(df, names), {}


# --- a Hugging Face dataset saved with save_to_disk ----------------------------------------------------------------

DICT_SPLITS = {"val": ("validation", "valid", "dev", "val"), "test": ("test",)}  # a DatasetDict's held-out splits


# a dataset folder whose sub-folders are its splits (Kaggle's and the imagefolder layout: train/ beside val/, test/)
SPLIT_FOLDERS = {"train": ("train", "training"), "val": DICT_SPLITS["val"], "test": (*DICT_SPLITS["test"], "testing")}


def split_folders(folder: Path) -> dict[str, Path]:
    """The splits of a folder whose sub-folders are splits (``SPLIT_FOLDERS``: train/ beside val/ or test/, each laid
    out as the task reads a folder: class sub-folders, images/ + masks/ ...), as {"train": path, "val": path,
    "test": path} where it has them; {} where it has no train/ or another sub-folder beside them (then they may
    be classes)."""
    if not folder.is_dir():
        return {}
    subs = {p.name.lower(): p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    known = {n for names in SPLIT_FOLDERS.values() for n in names}
    if not subs or set(subs) - known:
        return {}
    out = {key: next(subs[n] for n in names if n in subs) for key, names in SPLIT_FOLDERS.items()
           if any(n in subs for n in names)}
    return out if "train" in out else {}


def dataset_dict_splits(folder: Path) -> dict[str, Path]:
    """The splits of a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``), as {"train": path, "val": path,
    "test": path} where it has them; {} for any other path."""
    try:
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {"train": folder / "train"} if "train" in splits else {}
    for key, names in DICT_SPLITS.items():
        found = next((n for n in names if n in splits), None)
        if found:
            out[key] = folder / found
    return out


# a table's column naming each row's split (a dataset written out whole: `split`, Kaggle's `set`), its values named as
# split folders are (any case)
SPLIT_COLUMNS = ("split", "data_split", "subset", "partition", "set")
SPLIT_OF = {name: key for key, names in SPLIT_FOLDERS.items() for name in names}


def split_roles(values: pd.Series) -> pd.Series:
    """Each value's split (train, val, test; NaN where it names none)."""
    return values.astype(object).where(values.notna(), "").astype(str).str.strip().str.lower().map(SPLIT_OF)


def split_column(df: pd.DataFrame, option: str) -> str | None:
    """The column of ``df`` naming each row's split, else None. ``option`` (data.split_column): ``auto``: the one
    column named as such columns go (``SPLIT_COLUMNS``) whose every value names a split (``SPLIT_OF``), some rows train
    and some another split; ``none``: none; a column's name: that column, where ``df`` has it, every value a split's
    name (an error names the row that is not)."""
    if option == "none":
        return None
    if option == "auto":
        def marks(c: str) -> bool:
            roles = split_roles(df[c])
            return bool(roles.notna().all()) and "train" in set(roles) and roles.nunique() > 1

        found = [c for c in usual_columns(df, SPLIT_COLUMNS) if marks(c)]
        return found[0] if len(found) == 1 else None
    if option not in df.columns:
        return None
    bad = np.flatnonzero(split_roles(df[option]).isna().to_numpy())
    if len(bad):
        names = ", ".join(SPLIT_OF)
        raise DataError(f"{row_label(df, int(bad[0]))}: {option} {df[option].iloc[bad[0]]!r} names no split ({names}; "
                        f"{len(bad):,} row(s) in all); --set data.split_column=none to read every row")
    return option


def rows_of_split(df: pd.DataFrame, column: str, split: str) -> pd.DataFrame:
    """The rows of ``df`` its split ``column`` marks as ``split`` (train, val, test), at their positions in the file
    (messages name the file's rows); an error where it marks none."""
    roles = split_roles(df[column])
    part = df[(roles == split).to_numpy()]
    if part.empty:
        counts = ", ".join(f"{k} {n:,}" for k, n in roles.value_counts().items())
        raise DataError(f"{df.attrs.get('source', 'the data')}: its {column!r} column marks no {split} rows "
                        f"({counts}); give the {split} data as a file of its own, or --set data.split_column=none to "
                        "read every row")
    part.attrs = dict(df.attrs)
    return part


SHARD = re.compile(r"-\d{5}-of-\d{5}$")  # a Parquet shard's name after its split's: train-00000-of-00002


def split_files(folder: Path) -> dict[str, Path]:
    """The splits of a folder whose files are its splits, as {"train": path, "val": path, "test": path}: GLUE's
    train.tsv / dev.tsv / test.tsv, Kaggle's train.csv / test.csv, a Hugging Face dataset's Parquet files as the hub
    holds them (train-00000-of-00001.parquet, validation-..., test-...; a split in several shards is read as one
    table, written once into the cache), TweetEval's train_text.txt ..., CoNLL's train.conll ...; compressed too.
    A held-out split without labels (Kaggle's test.csv without the label column, GLUE's test rows of label -1: a
    column the training split fills left empty) is left out, said. {} where the folder has no train file and no
    other split's beside it."""
    found = split_named_files(folder)
    if not found:
        return {}
    out = {key: files[0] if len(files) == 1 else _shards(folder, key, files) for key, files in found.items()}
    for key in ("val", "test"):
        why = _unlabelled_split(out[key], out["train"]) if key in out else None
        if why is not None:
            warnings.warn(f"{out[key]}: not read as the {key} split: it holds no labels ({why}); fmtune predict "
                          "reads it", UserWarning, stacklevel=2)
            del out[key]
    return out


def split_named_files(folder: Path) -> dict[str, list[Path]]:
    """The files of ``folder`` named as splits (``split_files``), by split, where it has a train file and another
    split's; else {}."""
    if not folder.is_dir() or split_folders(folder):
        return {}
    found: dict[str, list[Path]] = {}
    readable = TABLE_SUFFIXES | set(PARALLEL_SUFFIXES) | CONLL_PREDICT_SUFFIXES
    for f in sorted(folder.iterdir()):
        if not f.is_file() or f.name.startswith("."):
            continue
        name = f.name.lower()
        for packed in (*STREAMS, ".zip"):
            name = name.removesuffix(packed)
        stem, suffix = Path(name).stem, Path(name).suffix
        key = SPLIT_OF.get(SHARD.sub("", stem).removesuffix("_text"))
        if key is not None and suffix in readable:
            found.setdefault(key, []).append(f)
    return found if "train" in found and len(found) >= 2 else {}


def _unlabelled_split(split: Path, train: Path) -> str | None:
    """What a held-out split's file lacks that the training file holds (its label column, or a column the training
    file fills left empty in every row), else None; None too where either is not a table read here (a CoNLL file:
    the task's reader says)."""
    try:
        held = read_table(split)
        small = train.stat().st_size < 50 * 2**20  # (a large one: its first rows, as a stream reads them)
        trained = read_table(train) if small else next(iter_chunks(train, "utf-8", 1000))[0]
    except (DataError, StopIteration):
        return None
    missing = [c for c in trained.columns if c not in held.columns]
    if missing:
        return f"no {', '.join(map(repr, missing[:3]))} column"
    empty = [c for c in trained.columns if held[c].isna().all() and not trained[c].isna().all()]
    return f"its {empty[0]!r} column is empty" if empty else None


def _shards(folder: Path, key: str, files: list[Path]) -> Path:
    """The Parquet shards of one split (train-00000-of-00002.parquet ...) as one Parquet file of their rows and
    metadata (class names), written once into the cache; a DataError for several files of another kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not all(f.suffix.lower() in (".parquet", ".pq") and SHARD.search(f.stem) for f in files):
        raise DataError(f"{folder}: {len(files)} files hold its {key} split ({', '.join(f.name for f in files[:4])}); "
                        "give the one to read (--data / --val / --test)")
    from fmtune.fsutil import atomic_file, cache_dir, files_digest

    target = cache_dir() / "datasets" / f"{folder.name}-{key}-{files_digest(files)}.parquet"
    if target.is_file():
        return target
    tables = [pq.read_table(f) for f in files]
    table = pa.concat_tables(tables, promote_options="default").replace_schema_metadata(tables[0].schema.metadata)
    return atomic_file(target, lambda tmp: pq.write_table(table, tmp))


def held_out_test(path: Path) -> Path | None:
    """The test split of a saved DatasetDict or of a folder of splits (sub-folders or files: what evaluate and predict
    read of it), else None."""
    return (dataset_dict_splits(path) or split_folders(path) or split_files(path)).get("test")


def saved_dataset(path: str | Path) -> Path | None:
    """A ``Dataset.save_to_disk`` folder (state.json, dataset_info.json and Arrow files; a ``DatasetDict`` folder:
    its train split) as a Parquet file of the same rows and features (class names, embedded images and audio),
    written once into the feature cache's ``datasets`` folder and read as any Hugging Face Parquet file is; None
    for any other path."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(path)
    if not folder.is_dir():
        return None
    if not (folder / "state.json").is_file():
        train = dataset_dict_splits(folder).get("train")
        return saved_dataset(train) if train is not None else None
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
        info_file = folder / "dataset_info.json"
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}: a Hugging Face dataset folder whose state.json cannot be read ({e})") from None
    missing = [f.name for f in files if not f.is_file()]
    if missing or not files:
        raise DataError(f"{folder}: the dataset's Arrow files are missing ({', '.join(missing) or 'none listed'})")
    from fmtune.fsutil import atomic_file, cache_dir, files_digest

    target = cache_dir() / "datasets" / f"{folder.name}-{files_digest(files)}.parquet"
    if target.is_file():
        return target
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())  # (datasets writes Arrow streams)
        except pa.ArrowInvalid:
            try:
                tables.append(pa.ipc.open_file(str(f)).read_all())
            except pa.ArrowInvalid as e:
                raise DataError(f"{f}: not an Arrow file a Hugging Face dataset writes ({e})") from None
    table = pa.concat_tables(tables)
    features = info.get("features") if isinstance(info.get("features"), dict) else None
    if features:
        meta = {**(table.schema.metadata or {}), b"huggingface": json.dumps({"info": {"features": features}}).encode()}
        table = table.replace_schema_metadata(meta)
    return atomic_file(target, lambda tmp: pq.write_table(table, tmp))  # (ranks of a distributed run may both)


def hf_features(path: Path) -> dict[str, Any]:
    """The features (column types) a Parquet file written by Hugging Face ``datasets`` keeps in its
    schema's ``huggingface`` metadata; {} for any other file."""
    import pyarrow.parquet as pq

    try:
        features = json.loads((pq.read_schema(path).metadata or {})[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return {}
    return features if isinstance(features, dict) else {}


def class_label_names(feature: Any) -> list[str] | None:
    """The names of a ClassLabel feature, or of a List / Sequence of them; None for other features."""
    inner = feature.get("feature", feature) if isinstance(feature, dict) else None
    if isinstance(inner, dict) and inner.get("_type") == "ClassLabel" and isinstance(inner.get("names"), list):
        return [str(n) for n in inner["names"]]
    return None


def hf_label_names(path: Path) -> dict[str, list[str]]:
    """The class names of a Hugging Face Parquet file's ClassLabel columns (``label``) and lists of
    them (``ner_tags``); {} for any other file."""
    return {column: names for column, feature in hf_features(path).items()
            if (names := class_label_names(feature)) is not None}


def name_labels(df: pd.DataFrame, names: dict[str, list[str]], digits: bool = False) -> pd.DataFrame:
    """Integer class ids in ``df``'s columns (or lists of them) as their names (``digits``: ids
    written as text too, as a CSV holds them); -1 (a Hugging Face dataset's "no label", e.g. a GLUE
    test split) is a missing label. An id outside the names is a DataError naming the row."""
    for column, labels in names.items():
        if column not in df.columns:
            continue

        def name(v: Any, i: int, column: str = column, labels: list[str] = labels) -> Any:
            if isinstance(v, (list, tuple, np.ndarray)):
                return [name(x, i) for x in v]
            if isinstance(v, str) and digits and v.strip().lstrip("-").isdigit():
                v = int(v)
            if v is None or isinstance(v, (str, bool)) or (isinstance(v, float) and not float(v).is_integer()):
                return v
            k = int(v)
            if k == -1:
                return None
            if not 0 <= k < len(labels):
                raise DataError(f"{row_label(df, i)}: {column} {k} is not a class id: the names given are ids "
                                f"0..{len(labels) - 1} ({', '.join(labels[:10])}{' ...' if len(labels) > 10 else ''})")
            return labels[k]

        df[column] = pd.Series([name(v, i) for i, v in enumerate(df[column])], index=df.index, dtype=object)
    return df


_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def headerless_names(path: Path, first: list[str], sample: list[list[Any]]) -> list[str] | None:
    """Names for the columns of a CSV whose first line is data, not a header, said in a warning; None for a CSV with
    a header. Told by a cell of the first line that is no column name (spaces, or over 30 characters) beside one
    that is a value: a number (the sets of Zhang et al. 2015 as fast.ai and Kaggle ship them: Yelp, AG News,
    DBpedia, Amazon polarity, ``"3","Wall St. Bears ...","Reuters - ..."``; Sentiment140; pandas numbers repeated
    names: ``5.1``), or a value its column holds again in the rows below (Financial PhraseBank's ``neutral,"According
    to Gran ..."``; ``text,label`` files saved without their header). The column of the longest cells is ``text``;
    ``label`` the first column where its cells are whole numbers, else the one that repeats its first cell (the
    fewest distinct values first); the rest ``column_N``."""
    cells = [c.strip() for c in first]
    wordy = [j for j, c in enumerate(cells) if " " in c or len(c) > 30]
    if len(cells) < 2 or not wordy:
        return None
    rows = [cells, *sample]

    def column(j: int) -> list[str]:
        return [str(r[j]).strip() for r in rows if j < len(r) and r[j] is not None]

    again = [j for j in range(len(cells)) if j not in wordy and cells[j] and column(j)[1:].count(cells[j])]
    numbered = bool(_NUMBER.fullmatch(cells[0])) and any(j > 0 for j in wordy)
    if not (numbered or again):
        return None
    names = [f"column_{i + 1}" for i in range(len(cells))]
    lengths = [np.mean([len(v) for v in column(j)] or [0]) for j in range(len(cells))]
    text = int(np.argmax(lengths))
    if all(re.fullmatch(r"-?\d+", v) for v in column(0)) and text != 0:
        names[0] = "label"
    elif again:
        names[min((j for j in again if j != text), key=lambda j: len(set(column(j))), default=text)] = "label"
    names[text] = "text"
    warnings.warn(f"{path}: its first line is data, not a header ({cells[0][:40]!r}, {cells[1][:40]!r} ...): read "
                  f"without one, its columns named {', '.join(names)}", UserWarning, stacklevel=4)
    return names


def _without_written_index(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the index pandas wrote into its CSV (``to_csv`` without ``index=False``: a first column without
    a name, read as ``Unnamed: 0``, of distinct whole numbers): a row number, not data (``text_columns: all`` would
    read it as text)."""
    first = df.columns[0] if len(df.columns) else None
    if not (isinstance(first, str) and first.startswith("Unnamed: 0")):
        return df
    cells = df[first].astype(str).str.strip()
    if cells.str.fullmatch(r"-?\d+").all() and cells.is_unique:
        return df.drop(columns=[first])
    return df


def read_parquet(path: Path) -> pd.DataFrame:
    """A Parquet file as a DataFrame; class ids of a Hugging Face dataset's ClassLabel columns come
    back as their names. A pandas index written into the file (``__index_level_0__``) is not data."""
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises many types
        raise DataError(f"{path}: cannot read as Parquet: {e}") from None
    df = df.drop(columns=[c for c in df.columns if str(c).startswith("__index_level_")]).reset_index(drop=True)
    df.attrs["source"] = str(path)
    return name_labels(df, hf_label_names(path))


def _jsonl_chunks(path: Path, encoding: str, chunk_rows: int):
    with path.open(encoding=encoding, errors="strict") as fh:
        first = fh.read(1)
        while first.isspace():
            first = fh.read(1)
    if first == "[" or (first == "{" and path.suffix.lower() == ".json" and _one_object(path, encoding)):
        yield from _whole_chunks(_read_jsonl(path, encoding), chunk_rows)  # (a JSON array, or one object of columns)
        return
    records: list[dict] = []
    index: list[int] = []
    problems: dict[int, str] = {}
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode(encoding)
                rec = json.loads(line) if line.strip() else None
                if rec is not None and not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
            except (UnicodeDecodeError, ValueError) as e:
                problems[len(records)] = f"{path}: row {lineno} (line {lineno}) cannot be read: {e}"
                rec = {}  # an empty row in its place: one output row per input row
            if rec is None:
                continue
            records.append(rec)
            index.append(lineno - 1)  # "row N" of a JSONL file is its line N
            if len(records) == chunk_rows:
                yield _frame(records, index, path), problems
                records, index, problems = [], [], {}
    if records:
        yield _frame(records, index, path), problems


FASTTEXT_LABEL = "__label__"


def _txt_chunks(path: Path, encoding: str, chunk_rows: int, column: str):
    """One text per line of a file in ``encoding`` (``_text_layout``'s; a row's index is its line number - 1); empty
    lines are skipped, and counted in a warning at the end. A file in fastText's format (nine in ten of its first
    lines start with ``__label__``: Kaggle's Amazon reviews ``train.ft.txt``, ``__label__2 Great CD: ...``) gives each
    line's labels too, in ``label`` (several: a list, multi-label)."""
    import warnings

    with path.open(encoding=encoding, newline="") as fh:
        head = [x for x in itertools.islice((x for x in fh if x.strip()), 200)]
    labelled = bool(head) and sum(x.startswith(FASTTEXT_LABEL) for x in head) >= 0.9 * len(head)
    rows: list[dict] = []
    index: list[int] = []
    empty = 0
    with path.open(encoding=encoding, newline="") as fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.rstrip("\r\n")
            if not text.strip():
                empty += 1
                continue
            rows.append(_fasttext_row(text, column) if labelled else {column: text})
            index.append(lineno - 1)
            if len(rows) == chunk_rows:
                yield _frame(rows, index, path), {}
                rows, index = [], []
    if rows:
        yield _frame(rows, index, path), {}
    if empty:
        warnings.warn(f"{path}: {empty} empty line(s) skipped", UserWarning, stacklevel=2)


def _fasttext_row(line: str, column: str) -> dict[str, Any]:
    """A fastText line, ``__label__a __label__b words ...``: its text and its label (labels: a list)."""
    words = line.split(" ")
    k = next((i for i, w in enumerate(words) if not w.startswith(FASTTEXT_LABEL)), len(words))
    labels = [w[len(FASTTEXT_LABEL):] for w in words[:k] if w[len(FASTTEXT_LABEL):]]
    return {column: " ".join(words[k:]).strip(), "label": labels[0] if len(labels) == 1 else labels or None}


def _frame(records: list[dict], index: list[int], path: Path) -> pd.DataFrame:
    df = pd.DataFrame.from_records(records, index=index) if records else pd.DataFrame(index=index)
    df.attrs["source"] = str(path)
    return df


def _csv_chunks(path: Path, encoding: str, sep: str, chunk_rows: int):
    """The csv module's reader, not pandas' (of a file in ``encoding``, split by ``sep``: ``_text_layout``'s): it knows
    the file line of every row (quoted cells may span lines), so a malformed row is reported by line and the rest goes
    on."""
    with path.open(encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, delimiter=sep, quoting=_quoting(path))
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: the file is empty")
        numbered = ((reader.line_num, fields) for fields in reader)
        ahead = list(itertools.islice(numbered, 200))  # (the first rows: is the first line data, not a header?)
        names = headerless_names(path, header, [fields for _, fields in ahead])
        lines = itertools.chain(ahead, numbered)
        if names is not None:
            lines, header = itertools.chain([(1, header)], lines), names
        rows: list[list[str | None]] = []
        index: list[int] = []
        problems: dict[int, str] = {}
        row = -1
        for line, fields in lines:
            if not fields:
                continue  # a blank line
            row += 1
            if len(fields) != len(header):
                msg = (f"{path}: row {row + 1} (line {line}) has {len(fields)} fields, the header has "
                       f"{len(header)} (an unquoted separator in a value?)")
                problems[len(rows)] = msg
                fields = [None] * len(header)  # an empty row in its place: one output row per input row
            rows.append([v if v != "" else None for v in fields])
            index.append(row)
            if len(rows) == chunk_rows:
                yield _table(rows, index, header, path, names is None), problems
                rows, index, problems = [], [], {}
        if rows:
            yield _table(rows, index, header, path, names is None), problems


def _table(rows: list[list], index: list[int], header: list[str], path: Path, with_header: bool = True
           ) -> pd.DataFrame:
    df = pd.DataFrame(rows, index=index, columns=header, dtype=object)
    df.attrs["source"] = str(path)
    df.attrs["header"] = with_header
    return df
