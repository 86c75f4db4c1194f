"""Readers for token-labelled text (named entities): CoNLL-style files, JSONL (or Parquet) of
tokens and tags, JSONL of texts with character spans, and CSV/TSV tables of one word a row. Each gives one row
per sentence with

    tokens   the words                      tags     their tags (None where unlabelled)
    text     the sentence as text           offsets  each word's (start, end) in ``text``
    line     the file line the sentence starts at (for messages)

Tags are checked and converted to IOB2 (BIO): IOBES/BILOU prefixes are mapped (S-/U- -> B-,
E-/L- -> I-) and an I- that does not continue an entity of its type starts one (B-), the way
seqeval reads it. Texts given without words are split into words by ``split_words``.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmtune.data.readers import (
    CONLL_PREDICT_SUFFIXES,
    annotated_tasks,
    csv_separator,
    file_encoding,
    jsonl_records,
    label_studio_annotation,
    label_studio_task,
    read_parquet,
    read_table,
)
from fmtune.errors import DataError

CONLL_SUFFIXES = CONLL_PREDICT_SUFFIXES | {".txt", ".tsv"}  # training reads .txt / .tsv as CoNLL too
_WORD = re.compile(r"https?://\S+|[@#]\w+|\w+(?:[-'’.]\w+)*|[^\w\s]", re.UNICODE)
_TAG = re.compile(r"^([BIESLU])-(.+)$")


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Words of a raw text with their character spans: URLs, @mentions and #hashtags whole; runs
    of letters/digits (with inner hyphens, apostrophes and dots); every other non-space character alone."""
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    return [text[a:b] for a, b in spans], spans


def join_words(tokens: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """A text for words given without one: joined by single spaces, with each word's span."""
    offsets, pos = [], 0
    for t in tokens:
        offsets.append((pos, pos + len(t)))
        pos += len(t) + 1
    return " ".join(tokens), offsets


def to_bio(tags: list[str], where: str) -> list[str]:
    """Tags of one sentence as IOB2; a tag outside O / B-, I-, E-, S-, L-, U-TYPE is a DataError."""
    out: list[str] = []
    prev_type = None
    for i, tag in enumerate(tags):
        if isinstance(tag, int) and not isinstance(tag, bool):
            raise DataError(f"{where}: tag {tag} (word {i + 1}) is a number; name the numbers in id order with "
                            "--set data.label_names=O,B-PER,I-PER,... (a Hugging Face dataset's "
                            "features['ner_tags'].feature.names), or write the tag names in the file")
        tag = str(tag).strip()
        if tag == "O":
            out.append("O")
            prev_type = None
            continue
        m = _TAG.match(tag)
        if not m:
            raise DataError(f"{where}: tag {tag!r} (word {i + 1}) is not O or a B-/I-/E-/S- (IOB2/IOBES) tag "
                            "with an entity type, e.g. B-person")
        prefix, typ = m.groups()
        if prefix in ("B", "S", "U") or prev_type != typ:  # an I-/E- that continues nothing starts an entity
            out.append(f"B-{typ}")
        else:
            out.append(f"I-{typ}")
        prev_type = None if prefix in ("E", "S", "L", "U") else typ
    return out


def _frame(rows: list[dict[str, Any]], path: Path, unit: str = "line") -> pd.DataFrame:
    """The sentences as a frame; ``unit``: what its ``line`` column counts (line, or the row /
    record of a Parquet file / JSON array), for messages."""
    if not rows:
        raise DataError(f"{path}: no sentences found")
    df = pd.DataFrame(rows, columns=["tokens", "tags", "text", "offsets", "line"])
    df.attrs["source"] = str(path)
    df.attrs["line_unit"] = unit
    return df


def read_conll(path: Path, encoding: str = "utf-8", token_col: int = 0, tag_col: int = -1) -> pd.DataFrame:
    """Token and tag per line (tab or space separated; the first column is the word, the last the tag; or the tag
    first where the file has it so, ``_tag_first``), a blank line between sentences, ``-DOCSTART-`` lines ignored. A
    line with a single column is an unlabelled word (then every word of the file must be unlabelled)."""
    rows: list[dict[str, Any]] = []
    words: list[str] = []
    tags: list[str | None] = []
    start = 0

    def flush() -> None:
        if not words:
            return
        labelled = [t is not None for t in tags]
        where = f"{path}: line {start}"
        if any(labelled) and not all(labelled):
            k = labelled.index(False)
            raise DataError(f"{where}: word {k + 1} ({words[k]!r}) has no tag while others of the sentence do; "
                            "every line needs a word and its tag")
        bio = to_bio(tags, where) if all(labelled) else None
        text, offsets = join_words(words)
        rows.append({"tokens": list(words), "tags": bio, "text": text, "offsets": offsets, "line": start})
        words.clear()
        tags.clear()

    encoding = file_encoding(path, encoding)
    lines = _read_text(path, encoding).split("\n")  # not splitlines: \u2028 is a word
    if (token_col, tag_col) == (0, -1) and _tag_first(lines):  # (the MIT Movie / Restaurant corpora: B-Actor<TAB>word)
        token_col, tag_col = -1, 0
    for lineno, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        if stripped.startswith("-DOCSTART-"):
            flush()
            continue
        parts = stripped.split("\t") if "\t" in stripped else stripped.split()
        parts = [p.strip() for p in parts if p.strip()]
        if not words:
            start = lineno
        words.append(parts[token_col])
        tags.append(parts[tag_col] if len(parts) > 1 else None)
    flush()
    return _frame(rows, path)


def _tag_first(lines: list[str]) -> bool:
    """A file's lines hold the tag first and the word last (``B-Rating<TAB>2``, as the MIT Movie and Restaurant
    corpora do): of its first 2,000 lines of two fields or more, nine in ten start with a tag (O, B-TYPE ...) and
    under half end with one."""
    parts = [x.split("\t") if "\t" in x else x.split() for x in itertools.islice(
        (x.strip() for x in lines if x.strip() and not x.startswith("-DOCSTART-")), 2000)]
    parts = [p for p in parts if len(p) > 1]

    def tag(v: str) -> bool:
        return v.strip() == "O" or bool(_TAG.match(v.strip()))

    first, last = sum(tag(p[0]) for p in parts), sum(tag(p[-1]) for p in parts)
    return bool(parts) and first >= 0.9 * len(parts) and last < 0.5 * len(parts)


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid {encoding} ({e.reason} at byte {e.start}); pass "
                        "--set data.encoding=latin-1 (or the file's encoding)") from None


SPAN_KEYS = ("entities", "spans", "label")  # a text's entity spans: fmtune's and spaCy's, Prodigy's, doccano's JSONL,
# Label Studio's JSON-MIN


def _span(ent: Any) -> tuple[Any, Any, Any] | None:
    """(start, end, label) of one entity span as annotation tools write it: {start, end, label} (Prodigy too),
    doccano's {start_offset, end_offset, label}, or spaCy's / doccano's [start, end, label]; None if none of those."""
    if isinstance(ent, dict):
        label = ent.get("label")
        if label is None and isinstance(ent.get("labels"), list) and len(ent["labels"]) == 1:
            label = ent["labels"][0]  # (Label Studio's JSON-MIN: {start, end, text, labels: [name]})
        for a, b in (("start", "end"), ("start_offset", "end_offset")):
            if a in ent and b in ent and label is not None:
                return ent[a], ent[b], label
        return None
    if isinstance(ent, (list, tuple)) and len(ent) == 3:
        return ent[0], ent[1], ent[2]
    return None


def spans_to_tags(text: str, entities: list[Any], offsets: list[tuple[int, int]], where: str) -> list[str]:
    """BIO tags of the words (``offsets``) of ``text`` from character spans (``_span``'s forms)."""
    tags = ["O"] * len(offsets)
    spans = []
    entities = entities.tolist() if hasattr(entities, "tolist") else entities
    if not isinstance(entities, list):
        raise DataError(f"{where}: the entities must be a list of spans, got {type(entities).__name__}")
    for k, ent in enumerate(entities):
        span = _span(ent.tolist() if hasattr(ent, "tolist") else ent)
        if span is None:
            raise DataError(f"{where}: entity {k + 1} must be an object with start, end and label (or "
                            f"start_offset / end_offset), or a [start, end, label] list; got {ent!r}")
        (a, b), label = (int(v) if isinstance(v, np.integer) else v for v in span[:2]), str(span[2])
        if not (isinstance(a, int) and isinstance(b, int)) or not (0 <= a < b <= len(text)):
            raise DataError(f"{where}: entity {k + 1} ({label}) spans characters {a}..{b}, outside the text of "
                            f"{len(text)} characters (or empty)")
        spans.append((a, b, label, k))
    spans.sort()
    for (a1, b1, l1, k1), (a2, b2, l2, k2) in zip(spans, spans[1:]):
        if a2 < b1:
            raise DataError(f"{where}: entities {k1 + 1} ({l1}, {a1}..{b1}) and {k2 + 1} ({l2}, {a2}..{b2}) overlap; "
                            "named entities must not overlap")
    for a, b, label, k in spans:
        inside = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
        if not inside:
            raise DataError(f"{where}: entity {k + 1} ({label}, {text[a:b]!r}) covers no word")
        for j, i in enumerate(inside):
            if tags[i] != "O":
                raise DataError(f"{where}: entities meet inside the word {text[offsets[i][0]:offsets[i][1]]!r}")
            tags[i] = ("B-" if j == 0 else "I-") + label
    return tags


def _token_rows(records: list[tuple[str, int, dict]], text_column: str, names: list[str] | None) -> list[dict]:
    """Sentences from records ``(where, line, object)`` of ``{"tokens": [...], "tags": [...]}`` (or
    ``ner_tags``; numbers named by ``names``) or ``{"text": ..., "entities": [{start, end, label}]}``
    (character spans; ``entities`` may be absent for unlabelled text; also Prodigy's ``spans``, doccano's
    ``label`` lists and ``start_offset`` / ``end_offset``, spaCy's ``[start, end, label]``: ``_span``)."""
    rows = []
    annotated = annotated_tasks([rec for _, _, rec in records], records[0][0] if records else "")
    records = [r for r, keep in zip(records, annotated) if keep]
    for where, line, rec in records:
        rec = _label_studio(rec, text_column, where)
        if "tokens" in rec:
            tokens = rec["tokens"]
            tokens = tokens.tolist() if hasattr(tokens, "tolist") else tokens  # a Parquet list column
            if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
                raise DataError(f"{where}: 'tokens' must be a list of strings")
            tags = rec.get("tags", rec.get("ner_tags"))
            tags = tags.tolist() if hasattr(tags, "tolist") else tags
            if tags is not None and (not isinstance(tags, list) or len(tags) != len(tokens)):
                n = len(tags) if isinstance(tags, list) else "no list of"
                raise DataError(f"{where}: {len(tokens)} tokens but {n} tags; give one tag per token")
            if tags is not None and names is not None:
                tags = _named_tags(tags, names, where)
            text, offsets = join_words(tokens)
        elif text_column in rec:
            text = rec[text_column]
            if not isinstance(text, str):
                raise DataError(f"{where}: {text_column!r} must be a string")
            tokens, offsets = split_words(text)
            key = next((k for k in SPAN_KEYS if rec.get(k) is not None and not isinstance(rec.get(k), str)), None)
            tags = None if key is None else spans_to_tags(text, rec[key], offsets, where)
        else:
            raise DataError(f"{where}: expected 'tokens' (with 'tags' or 'ner_tags') or {text_column!r} (with "
                            f"'entities'); found keys {', '.join(map(repr, rec)) or 'none'}")
        if not tokens:
            raise DataError(f"{where}: the sentence is empty (no words)")
        rows.append({"tokens": tokens, "tags": None if tags is None else to_bio(tags, where), "text": text,
                     "offsets": offsets, "line": line})
    return rows


def _label_studio(rec: dict, text_column: str, where: str) -> dict:
    """A task of Label Studio's JSON export ({data: {text}, annotations: [{result: [{value: {start, end, labels}}]}]})
    as a text and its entity spans (its first annotation not cancelled; a task without one: the text alone); any
    other record as it is."""
    if not label_studio_task(rec):
        return rec
    data = rec["data"]
    texts = [v for v in data.values() if isinstance(v, str)]
    text = data.get(text_column, texts[0] if len(texts) == 1 else None)
    if not isinstance(text, str):
        raise DataError(f"{where}: a Label Studio task whose data holds no {text_column!r} text (data.text_column); "
                        f"its data keys: {', '.join(map(str, data))}")
    done = label_studio_annotation(rec)
    if done is None:
        return {text_column: text}
    result = [r.get("value") for r in done.get("result") or [] if isinstance(r, dict)
              and isinstance(r.get("value"), dict) and "labels" in r["value"]]
    return {text_column: text, "entities": result}


def _named_tags(tags: list[Any], names: list[str], where: str) -> list[Any]:
    out = []
    for i, t in enumerate(tags):
        if isinstance(t, int) and not isinstance(t, bool):
            if not 0 <= t < len(names):
                raise DataError(f"{where}: tag {t} (word {i + 1}) is not an id of data.label_names (0.."
                                f"{len(names) - 1})")
            t = names[t]
        out.append(t)
    return out


def read_token_jsonl(path: Path, encoding: str = "utf-8", text_column: str = "text",
                     names: list[str] | None = None) -> pd.DataFrame:
    """JSONL (or a JSON array) of sentences: see ``_token_rows``."""
    text = _read_text(path, encoding)
    if text.lstrip().startswith("["):  # a plain JSON array of records
        try:
            array = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if not all(isinstance(rec, dict) for rec in array):
            raise DataError(f"{path}: a JSON array of sentences must hold objects only")
        records = [(f"{path}: record {k}", k, rec) for k, rec in enumerate(array, start=1)]
        return _frame(_token_rows(records, text_column, names), path, "record")
    records = [(f"{path}: line {n}", n, rec) for n, rec in jsonl_records(path, text)]
    return _frame(_token_rows(records, text_column, names), path)


def read_token_parquet(path: Path, text_column: str = "text", names: list[str] | None = None) -> pd.DataFrame:
    """A Parquet file of sentences (columns as ``_token_rows``' keys), e.g. a Hugging Face dataset's
    split: its ClassLabel tag names are read from the file."""
    df = read_parquet(path)
    records = [(f"{path}: row {k}", k, rec) for k, rec in enumerate(df.to_dict("records"), start=1)]
    return _frame(_token_rows(records, text_column, names), path, "row")


# A table of one word a row (Kaggle's "Annotated Corpus for NER": Sentence #, Word, POS, Tag, the sentence named on
# its first word only): its columns are found by these names, without regard to case
WORD_COLUMNS = ("word", "token", "words", "tokens")
SENTENCE_COLUMNS = ("sentence #", "sentence_id", "sentence", "sentence_idx", "sentence_no", "sent_id")
TAG_COLUMNS = ("tag", "ner_tag", "ner", "tags", "ner_tags", "label", "labels", "entity")


def _named(columns: Any, names: tuple[str, ...]) -> str | None:
    low = {str(c).strip().lower(): c for c in columns}
    return next((low[n] for n in names if n in low), None)


def is_word_table(path: Path, encoding: str) -> bool:
    """A .csv / .tsv file whose header names a word column and a sentence column (a .tsv without: CoNLL)."""
    import csv

    if path.suffix.lower() not in (".csv", ".tsv") or not path.is_file():
        return False
    try:
        with path.open(encoding=encoding, errors="replace", newline="") as fh:
            header = next(csv.reader(fh, delimiter=csv_separator(path, encoding)), [])
    except (OSError, csv.Error):
        return False
    return _named(header, WORD_COLUMNS) is not None and _named(header, SENTENCE_COLUMNS) is not None


def read_token_table(path: Path, encoding: str = "utf-8", names: list[str] | None = None) -> pd.DataFrame:
    """Sentences from a table of one word a row: a word column, a sentence column (its id, given on a sentence's
    first word or on every word; a new sentence where it changes) and a tag column (absent: unlabelled words), found
    by name (``WORD_COLUMNS``, ``SENTENCE_COLUMNS``, ``TAG_COLUMNS``). Errors name the file and line."""
    df = read_table(path, encoding)
    word, sentence, tag = (_named(df.columns, n) for n in (WORD_COLUMNS, SENTENCE_COLUMNS, TAG_COLUMNS))
    if word is None or sentence is None:
        raise DataError(f"{path}: a table of named entities holds one word a row, with columns for the word "
                        f"({', '.join(WORD_COLUMNS[:2])}), its sentence ({', '.join(SENTENCE_COLUMNS[:3])}) and its "
                        f"tag ({', '.join(TAG_COLUMNS[:3])}); columns are: {', '.join(map(str, df.columns))}")
    ids = df[sentence].ffill()
    if pd.isna(ids.iloc[0]):
        raise DataError(f"{path}: line 2: no sentence named in column {sentence!r} for the first word")
    records = []
    starts = np.flatnonzero(ids.ne(ids.shift()).to_numpy())
    for a, b in zip(starts, [*starts[1:], len(df)]):
        rows = df.iloc[a:b]
        empty = rows[word].isna().to_numpy()
        if empty.any():
            raise DataError(f"{path}: line {a + int(np.argmax(empty)) + 2}: no word in column {word!r}")
        rec: dict[str, Any] = {"tokens": rows[word].astype(str).tolist()}
        if tag is not None:
            tags = rows[tag].tolist()
            if any(pd.isna(t) for t in tags):
                k = next(i for i, t in enumerate(tags) if pd.isna(t))
                raise DataError(f"{path}: line {a + k + 2}: no tag in column {tag!r}")
            rec["tags"] = [int(t) if names is not None and str(t).strip().isdigit() else t for t in tags]
        records.append((f"{path}: line {a + 2}", a + 2, rec))
    return _frame(_token_rows(records, "text", names), path)


def read_tokens(path: str | Path, encoding: str = "utf-8", text_column: str = "text",
                fmt: str = "auto", names: list[str] | None = None) -> pd.DataFrame:
    """Token-labelled data from a CoNLL-style, JSONL/JSON or Parquet file (``fmt``: auto, conll,
    jsonl); ``names``: data.label_names, for tags stored as numbers."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"{path} is a folder; named entities are read from a CoNLL file (.conll/.bio/.txt), "
                        "a JSONL file or a Parquet file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    suffix = path.suffix.lower()
    if fmt == "auto" and suffix in (".parquet", ".pq"):
        return read_token_parquet(path, text_column, names)
    if fmt == "jsonl" or (fmt == "auto" and suffix in (".jsonl", ".json")):
        return read_token_jsonl(path, encoding, text_column, names)
    if fmt == "table" or (fmt == "auto" and is_word_table(path, encoding)):
        return read_token_table(path, encoding, names)
    if fmt == "conll" or (fmt == "auto" and suffix in CONLL_SUFFIXES):
        return read_conll(path, encoding)
    raise DataError(f"{path}: unsupported file type {suffix!r} for named entities; use CoNLL (.conll, .bio, .txt: "
                    "word and tag per line), JSONL, Parquet or a CSV of one word a row, or say --set "
                    "data.format=conll|jsonl|table")


def sentence_chunks(path: Path, encoding: str, chunk_rows: int, column: str):
    """``fmtune predict``'s chunks of a CoNLL-style file (or a table of one word a row): each sentence a row, its
    words joined by spaces in ``column``, beside its first ``line`` and its ``tags`` (joined likewise) where the
    file has them. Yields ``(frame, problems)`` as ``fmtune.data.readers.iter_chunks`` does."""
    df = read_token_table(path, encoding) if is_word_table(path, encoding) else read_conll(path, encoding)
    df = pd.DataFrame({column: df["text"], "line": df["line"],
                       **({} if df["tags"].isna().all() else {"tags": df["tags"].map(" ".join)})})
    for start in range(0, len(df), chunk_rows):
        part = df.iloc[start:start + chunk_rows]
        part.attrs["source"] = str(path)
        yield part, {}
