"""Speech recognition: an audio clip -> its transcript, by an encoder-decoder speech model (Whisper)
fine-tuned with the token-level loss on the transcript.

Data: a table (CSV/TSV/JSONL/Parquet) of audio paths (``data.audio_column``; relative to the table,
or absolute) and transcripts (``data.target_column``; found by name when unset: text, transcript,
transcription, sentence), or a folder holding such a table as ``metadata.csv`` / ``metadata.jsonl``
(the Hugging Face audiofolder layout, paths in ``file_name``), LibriSpeech's ``*.trans.txt`` files, LJSpeech's
metadata.csv + wavs/, or each clip's transcript in a ``.txt`` / ``.lab`` file of its name (VCTK, TIMIT, MFA).

Validation measures the loss on every clip within the model's window (a longer clip, which
cannot train, is left out of the training split) and, on a fixed sample, the transcripts the model
decodes (greedy, batched, KV cache: ``fmtune.models.speech.transcribe``) against the references:
word and character error rate (``jiwer``) after a light normalisation (lower case, punctuation
and symbols to spaces: transformers' BasicTextNormalizer), so "Hello, world." and "hello world"
agree. The best checkpoint is the one of the lowest WER, not the lowest loss (the loss can keep
falling while the transcripts get worse).
"""

from __future__ import annotations

import copy
import functools
import re
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fmtune.data.readers import AUDIO_SUFFIXES, METADATA_FILES, folder_metadata, list_files, read_table, row_label
from fmtune.errors import DataError, ModelError
from fmtune.tasks.base import TASKS, Task
from fmtune.tasks.generation import GenerationSettings, fixed_sample, token_batches, token_loss
from fmtune.training.memory import inference_batch

AUDIO_COLUMNS = ("audio", "file_name", "path", "file", "filename", "audio_path", "audio_filepath")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "normalized_text")
# clips are read padded to the next multiple of this many seconds, not to Whisper's 30 (fmtune.models.speech)
BUCKET_SECONDS = 5.0


def _pick(df: pd.DataFrame, wanted: str | None, candidates: tuple[str, ...], what: str, option: str) -> str:
    src = df.attrs.get("source", "the data")
    cols = ", ".join(map(str, df.columns))
    if wanted and wanted in df.columns:
        return wanted
    found = [c for c in candidates if c in df.columns]
    if found:
        return found[0]
    named = f"no column {wanted!r}" if wanted else f"no {what} column (looked for {', '.join(candidates)})"
    raise DataError(f"{src}: {named}; columns are: {cols}. Name the right one with --set {option}=COLUMN")


def _read_transcript_files(folder: Path, files: list[Path]) -> pd.DataFrame:
    """LibriSpeech's layout: ``*.trans.txt`` files (anywhere under ``folder``) of lines ``CLIP-ID TRANSCRIPT``, each
    clip an audio file ``CLIP-ID.flac`` (or another readable format) beside its transcript file. Errors name the
    transcript file and line."""
    rows = []
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            clip, text = (line.split(maxsplit=1) + [""])[:2]
            if not text.strip():
                raise DataError(f"{f}: line {n}: no transcript after the clip id {clip!r} (each line is "
                                "'CLIP-ID TRANSCRIPT')")
            audio = _clip_file((f.parent,), clip)
            if audio is None:
                raise DataError(f"{f}: line {n}: no audio file {clip}.flac (or another readable format) beside it")
            rows.append({"file_name": str(audio), "text": text.strip()})
    if not rows:
        raise DataError(f"{folder}: its transcript files ({files[0].name} ...) hold no lines")
    return pd.DataFrame(rows)


TRANSCRIPT_SUFFIXES = {".txt", ".lab"}  # a clip's own transcript file (the Montreal Forced Aligner's .lab, VCTK's .txt)


def _read_clip_transcripts(folder: Path) -> pd.DataFrame | None:
    """Each clip's transcript in a file of its name: ``a.wav`` + ``a.txt`` / ``a.lab`` beside it (the Montreal Forced
    Aligner's corpus layout), or anywhere under ``folder`` (VCTK: wav48/p225/p225_001.wav, txt/p225/p225_001.txt);
    TIMIT's sample range before the words (``0 46797 She had ...``) is not read. None where under nine in ten clips
    have one; the clips without one are left out, said in a warning."""
    clips = list_files(folder, AUDIO_SUFFIXES)
    texts = {}
    for f in list_files(folder, TRANSCRIPT_SUFFIXES):
        texts.setdefault(f.stem.lower(), []).append(f)
    if not clips:
        return None

    def own(clip: Path) -> Path | None:  # (beside it first; else the one file of its name anywhere)
        named = texts.get(clip.stem.lower(), [])
        near = [f for f in named if f.parent == clip.parent]
        return near[0] if len(near) == 1 else named[0] if len(named) == 1 else None

    found = {c: own(c) for c in clips}
    kept = [c for c in clips if found[c] is not None]
    if len(kept) < 0.9 * len(clips):
        return None
    if len(kept) < len(clips):
        warnings.warn(f"{folder}: {len(clips) - len(kept)} of its {len(clips)} clips have no transcript file of their "
                      f"name (first {next(c for c in clips if found[c] is None)}): left out", UserWarning, stacklevel=3)
    rows = []
    for c in kept:
        words = found[c].read_text(encoding="utf-8", errors="replace").strip()
        words = re.sub(r"^\d+ \d+ ", "", words) if re.match(r"^\d+ \d+ \S", words) else words
        if not words:
            raise DataError(f"{found[c]}: the transcript of {c.name} is empty (a clip without speech needs no file)")
        rows.append({"file_name": str(c), "text": " ".join(words.split())})
    return pd.DataFrame(rows)


def _clip_file(folders: tuple[Path, ...], clip: str) -> Path | None:
    """The audio file of a clip id (``CLIP-ID.flac``, ``.wav`` or another readable format) in the first of
    ``folders`` that holds one, else None."""
    found = (d / f"{clip}{x}" for d in folders for x in sorted(AUDIO_SUFFIXES))
    return next((f for f in found if f.is_file()), None)


def _read_ljspeech(meta: Path) -> pd.DataFrame | None:
    """LJSpeech's layout: metadata.csv without a header, lines ``CLIP-ID|TRANSCRIPT|NORMALISED TRANSCRIPT`` (the
    normalised one, numbers written as words, is read where given), each clip ``wavs/CLIP-ID.wav``; None for a
    file not so laid out. Errors name the file and line."""
    folders = (meta.parent / "wavs", meta.parent)
    if meta.suffix.lower() != ".csv":
        return None
    with meta.open(encoding="utf-8", errors="replace") as fh:
        first = fh.readline().split("|")
    if len(first) < 2 or _clip_file(folders, first[0].strip()) is None:  # (a header, or not clip ids: a table)
        return None
    rows = []
    for n, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = [x.strip() for x in line.split("|")]
        text = parts[2] if len(parts) > 2 and parts[2] else parts[1] if len(parts) > 1 else ""
        if not text:
            raise DataError(f"{meta}: line {n}: expected 'CLIP-ID|TRANSCRIPT' (LJSpeech's metadata.csv)")
        audio = _clip_file(folders, parts[0])
        if audio is None:
            raise DataError(f"{meta}: line {n}: no audio file {parts[0]}.wav in {meta.parent / 'wavs'} (or beside it)")
        rows.append({"file_name": str(audio), "text": text})
    return pd.DataFrame(rows) if rows else None


def read_speech(path: str | Path, data_cfg: Any, with_targets: bool = True) -> pd.DataFrame:
    """Rows of ``audio`` (a path as written) and ``text`` (the transcript; None without targets),
    ``line`` (the row in the file), with the table's path in ``attrs['source']``."""
    p = Path(path)
    if p.is_dir():
        meta = folder_metadata(p)
        transcripts = sorted(p.rglob("*.trans.txt")) if meta is None else []
        beside = _read_clip_transcripts(p) if meta is None and not transcripts else None
        if meta is None and not transcripts and beside is None:
            raise DataError(f"{p}: a speech folder needs a table of its clips and transcripts: "
                            f"{' or '.join(METADATA_FILES[:2])} with columns file_name and text (or LibriSpeech's "
                            "*.trans.txt files beside the clips, or each clip's transcript in a .txt / .lab file of "
                            "its name)")
        if transcripts or beside is not None:
            df = _read_transcript_files(p, transcripts) if transcripts else beside
            df.attrs["source"] = str(p)
            return _speech_rows(df, data_cfg, with_targets, p)
        p = meta
    lj = _read_ljspeech(p) if p.is_file() else None
    if lj is not None:
        lj.attrs["source"], lj.attrs["header"] = str(p), False  # (row N is line N: messages say so)
        return _speech_rows(lj, data_cfg, with_targets, p)
    df = read_table(p, data_cfg.encoding, data_cfg.audio_column, data_cfg)
    if df.empty:
        raise DataError(f"{p}: no rows")
    return _speech_rows(df, data_cfg, with_targets, p)


def _speech_rows(df: pd.DataFrame, data_cfg: Any, with_targets: bool, p: Path) -> pd.DataFrame:
    audio_col = _pick(df, data_cfg.audio_column if data_cfg.audio_column in df.columns else None, AUDIO_COLUMNS,
                      "audio path", "data.audio_column")
    out = pd.DataFrame({"audio": df[audio_col].to_numpy()}, index=df.index)
    for c in df.columns:  # the rest (a speaker's gender, accent ...: what fmtune fairness groups clips by)
        if c not in (audio_col, data_cfg.target_column, "audio", "text", "line") and c not in TEXT_COLUMNS:
            out[c] = df[c].to_numpy()
    if with_targets:
        text_col = _pick(df, data_cfg.target_column, TEXT_COLUMNS, "transcript", "data.target_column")
        texts = df[text_col].tolist()
        for i, t in enumerate(texts):
            if t is None or (isinstance(t, float) and t != t) or not str(t).strip():
                raise DataError(f"{row_label(df, i)}: empty transcript in column {text_col!r}; a clip without "
                                "speech needs no row (or give its transcript)")
        out["text"] = [str(t).strip() for t in texts]
        out.attrs["text_column"] = text_col
    out["line"] = [int(i) + 1 for i in df.index]
    out.attrs["source"] = str(p)
    out.attrs["audio_column"] = audio_col
    if "header" in df.attrs:
        out.attrs["header"] = df.attrs["header"]
    if df.attrs.get("media_root"):  # (data.media_root: where the table's relative paths are)
        out.attrs["media_root"] = df.attrs["media_root"]
    return out


def decodes(bundle: Any) -> bool:
    """Whether the bundle's speech model decodes its transcripts (an encoder-decoder: Whisper, Moonshine,
    Speech2Text), rather than emitting a token per frame (a CTC model)."""
    from fmtune.models.wrapped import plain

    return bool(getattr(plain(bundle.model).config, "is_encoder_decoder", False))


def whisper_vocabulary(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is Whisper's (its transcripts follow its task tokens and begin with a space)."""
    return "<|startoftranscript|>" in tokenizer.get_vocab()


def prefix_ids(tokenizer: Any, language: str | None, model: Any = None) -> list[int]:
    """The decoder's first tokens: Whisper's start of transcript, (language, transcribe: multilingual
    models), no timestamps; another model's (Moonshine) decoder start token (``model``'s)."""
    if not whisper_vocabulary(tokenizer):
        from fmtune.models.wrapped import decoder_start, plain

        if language:
            raise ModelError(f"task.language: {language!r}, but a {plain(model).config.model_type} model transcribes "
                             "the language it was trained on (task.language chooses among Whisper's)")
        return [decoder_start(model)]
    multilingual = "<|en|>" in tokenizer.get_vocab() and tokenizer.convert_tokens_to_ids("<|en|>") != \
        tokenizer.unk_token_id and len(tokenizer.get_vocab()) > 51864
    if multilingual:
        try:
            tokenizer.set_prefix_tokens(language=language or "english", task="transcribe", predict_timestamps=False)
        except ValueError as e:
            raise ModelError(f"task.language: {e}") from None
    elif language and language.lower() not in ("en", "english"):
        raise ModelError(f"task.language: {language!r}, but this model transcribes English only")
    return list(tokenizer.prefix_tokens)


NORMALIZERS = {"basic": "transformers BasicTextNormalizer", "english": "transformers EnglishTextNormalizer"}


def normalize(text: str, normalizer: str = "basic") -> str:
    """What WER compares: lower case, punctuation and symbols as spaces, one space between words (basic); english:
    Whisper's English normaliser too ("ten" and "10" alike, "mr" = "mister", fillers dropped; without its British ->
    American spelling table, which does not ship with the offline model)."""
    return _normalizer(normalizer)(text).strip()


@functools.cache
def _normalizer(kind: str) -> Any:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer({}) if kind == "english" else BasicTextNormalizer()


ERROR_COUNTS = ("word_errors", "words", "char_errors", "chars")  # a transcript's (``error_counts``)


def rates(word_errors: np.ndarray, words: np.ndarray, char_errors: np.ndarray,
          chars: np.ndarray) -> dict[str, np.ndarray]:
    """WER and CER of clips from their ``error_counts``, summed over the last axis (a set's clips; fmtune fairness:
    each bootstrap resample's)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"wer": word_errors.sum(-1) / words.sum(-1), "cer": char_errors.sum(-1) / chars.sum(-1)}


def error_rates(hypotheses: list[str], references: list[str], normalizer: str = "basic") -> dict[str, float]:
    """Word and character error rate over the whole set (errors / reference words or characters),
    as jiwer computes them, on normalised text (``normalizer``: see ``normalize``): the clips' ``error_counts``
    summed. An empty hypothesis counts every reference word as deleted; no reference at all gives NaN."""
    counts = error_counts(hypotheses, references, normalizer)
    return {m: float(v) for m, v in rates(*(counts[k] for k in ERROR_COUNTS)).items()}


def error_counts(hypotheses: list[str], references: list[str], normalizer: str = "basic") -> dict[str, np.ndarray]:
    """Each transcript's word errors (substitutions, deletions, insertions), its reference's words, its character
    errors and its reference's characters, on normalised text (jiwer's alignment): summed over clips they give the
    set's WER and CER (``error_rates``). A reference empty once normalised counts nothing."""
    import jiwer

    out = np.zeros((4, len(references)), dtype=np.int64)
    for i, (h, r) in enumerate(zip(hypotheses, references)):
        r, h = normalize(r, normalizer), normalize(h, normalizer)
        if not r:
            continue
        w, c = jiwer.process_words(r, h), jiwer.process_characters(r, h)
        out[:, i] = (w.substitutions + w.deletions + w.insertions, len(r.split()),
                     c.substitutions + c.deletions + c.insertions, len(r))
    return dict(zip(ERROR_COUNTS, out))


def transcribe_clips(model: torch.nn.Module, ds: Any, rows: list[int], batch_size: int, decode: Any,
                     on_batch: Any = None, width: Any = None) -> list[str]:
    """The transcripts of clips ``rows`` of ``ds`` (``SpeechData`` or ``CTCData``): every window of
    every clip, sorted by length (by ``width(window)`` first, when given: a batch then holds one
    width), in batches of at most ``batch_size`` turned into texts by ``decode(windows)``, with the
    model in eval and inference mode; a clip's windows joined in order. ``on_batch(n)`` is told of
    each batch's clips done."""
    padded = types.SimpleNamespace(memory_profile=lambda: ds.memory_profile(width))  # (Whisper's whole window)
    batch_size = inference_batch(model, padded, batch_size, next(model.parameters()).device)
    width = width or (lambda _w: 0)
    windows = [(r, k, w) for r in rows for k, w in enumerate(ds.clips[r])]
    windows.sort(key=lambda x: (width(x[2]), x[2].shape[-1]))
    pieces: dict[tuple[int, int], str] = {}
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        start = 0
        while start < len(windows):
            first, stop = width(windows[start][2]), start
            while stop < len(windows) and stop - start < batch_size and width(windows[stop][2]) == first:
                stop += 1
            group = windows[start:stop]
            for (r, k, _), text in zip(group, decode([w for _, _, w in group])):
                pieces[(r, k)] = text
            if on_batch is not None:
                on_batch(len({r for r, _, _ in group}))
            start = stop
    if was_training:
        model.train()
    return [" ".join(p for k in range(len(ds.clips[r])) if (p := pieces[(r, k)])) for r in rows]


class _Clips:
    """What the speech datasets share: clips (each a list of windows) with their references, file lines
    and sources; ``ids[i]`` the trained targets of clip i, None for a clip longer than the model's window
    (transcribed window by window and scored on WER, but with no loss: one transcript cannot be split between
    windows)."""

    clips: list[list[torch.Tensor]]
    ids: list[list[int] | None] | None
    references: list[str | None]
    lines: list[int]
    sources: list[Any]
    lengths: np.ndarray
    spec: Any  # the model's AudioSpec

    def memory_profile(self, width: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """What a window costs a forward pass (``fmtune.training.memory``): batches are of windows, each padded
        to ``width(window)`` (default: to its bucket, or its own length)."""
        from fmtune.data.audio import clips_profile

        return clips_profile(self.clips, self.spec, per_window=True, width=width or getattr(self, "width", None))

    def trained_rows(self) -> list[int]:
        """The clips with trained targets (every clip within one window)."""
        return [i for i, r in enumerate(self.ids or []) if r is not None]

    def only(self, rows: list[int]) -> _Clips:
        """These clips alone (same order)."""
        out = copy.copy(self)
        for name in ("clips", "ids", "references", "lines", "sources"):
            value = getattr(self, name)
            if value is not None and len(value) == len(self.clips):
                setattr(out, name, [value[i] for i in rows])
        out.lengths = self.lengths[rows]
        return out


class SpeechData(_Clips, torch.utils.data.Dataset):
    """Clips as log-mel windows (fp16; Moonshine: waveform windows; Speech2Text: filterbank frames) with their
    transcripts as decoder tokens.

    ``ids[i]`` is the decoder's prefix (start of transcript, language, task, no timestamps), the
    transcript's tokens and the end-of-text token; position p predicts token p + 1 from
    ``start[i] - 1`` on (the prefix is not trained). A batch pads every window, with Whisper's own
    padding value (silence: its log-mel floor), to the longest ``bucket`` of the batch: clips are
    read in buckets of a few seconds, not in Whisper's fixed 30 s, and a clip's transcript does not
    depend on the clips batched with it. Waveform and filterbank windows (``padded``: what a wav2vec2-style
    encoder reads) pad with zeros to the longest of the batch, ``frame_mask`` marking real samples or frames."""

    def __init__(self, clips: list[list[torch.Tensor]], ids: list[list[int]] | None, start: int, pad_id: int,
                 spec: Any, references: list[str | None], lines: list[int], sources: list[str]):
        from fmtune.data.audio import ENCODER_FRONTENDS

        self.clips, self.ids, self.start, self.pad_id = clips, ids, start, pad_id
        self.references, self.lines, self.sources = references, lines, sources
        self.spec, self.padded = spec, spec.frontend in ENCODER_FRONTENDS
        self.hop_seconds = spec.frame_seconds  # of a frame, or a sample
        self.window_seconds = spec.window_seconds
        self.bucket_frames = int(round(BUCKET_SECONDS / self.hop_seconds))
        self.max_frames = spec.encoder_frames  # what the encoder holds
        self.lengths = np.array([self.width(w) for c in clips for w in c[:1]])

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> int:
        return i

    def width(self, window: torch.Tensor, full_window: bool = False) -> int:
        """Frames a window is padded to: its bucket (the next multiple of ``bucket_frames``), or the encoder's whole
        window (``full_window``: a model not trained in buckets)."""
        if self.padded:  # (padded to the longest of its batch)
            return window.shape[-1]
        if full_window:
            return max(self.max_frames, window.shape[-1])
        n = window.shape[-1] + 2  # the convolutions at the end read padding, as in Whisper's window
        return min(int(-(-n // self.bucket_frames) * self.bucket_frames), max(self.max_frames, window.shape[-1]))

    def features(self, windows: list[torch.Tensor], full_window: bool = False) -> torch.Tensor:
        """Windows padded to the widest bucket among them (or to the encoder's window), with each window's floor
        (its maximum minus 8 decades of log power: Whisper's value for the silence after a clip)."""
        width = max(self.width(w, full_window) for w in windows)
        out = torch.empty((len(windows), windows[0].shape[0], width))
        for j, w in enumerate(windows):
            w = w.float()
            out[j, :, : w.shape[-1]] = w
            out[j, :, w.shape[-1]:] = w.max() - 2.0
        return out

    def inputs(self, windows: list[torch.Tensor], full_window: bool = False) -> dict[str, torch.Tensor]:
        """What the encoder reads of ``windows`` (``fmtune.models.speech.encode``): Whisper's ``input_features``
        (``features``), or zero-padded waveforms (filterbank frames) and their ``frame_mask``."""
        from fmtune.data.audio import encoder_batch

        return encoder_batch(windows, self.spec) if self.padded else {"input_features": self.features(windows,
                                                                                                        full_window)}

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = self.inputs([self.clips[i][0] for i in idx])
        rows = [self.ids[i] for i in idx]
        width = max(len(r) for r in rows) - 1
        dec = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        where, labels = [], []
        for b, r in enumerate(rows):
            dec[b, : len(r) - 1] = torch.tensor(r[:-1])
            where.extend(b * width + p for p in range(self.start - 1, len(r) - 1))
            labels.extend(r[self.start:])
        return {**batch, "decoder_input_ids": dec, "target_index": torch.tensor(where, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long)}


def case_of(tokenizer: Any) -> str:
    """How transcripts are cased for this vocabulary: "upper" (e.g. wav2vec2-base-960h), "lower" (Speech2Text's
    LibriSpeech pieces, Parakeet's), or "keep" (Whisper's, a vocabulary of both cases)."""
    letters = [c for t in tokenizer.get_vocab() if len(t) == 1 for c in t if c.isalpha()]
    if letters and not any(c.islower() for c in letters):
        return "upper"
    if letters and not any(c.isupper() for c in letters):
        return "lower"
    return "keep"


def cased(text: str, case: str) -> str:
    """``text`` in the case of a vocabulary (``case_of``): LibriSpeech's upper-case transcripts are read by a
    lower-case vocabulary as its own words, not as unknown pieces."""
    return text.upper() if case == "upper" else text.lower() if case == "lower" else text


def encode_texts(tokenizer: Any, texts: list[str], where: list[str]) -> list[list[int]]:
    """Each transcript as the vocabulary's token ids (cased as the vocabulary is); characters the
    vocabulary lacks are warned about once (they become the unknown token)."""
    case = case_of(tokenizer)
    vocab = tokenizer.get_vocab()
    delimiter = getattr(tokenizer, "word_delimiter_token", None) or " "
    out, missing = [], {}
    for text, w in zip(texts, where):
        text = cased(text, case)
        for c in set(text) - set(vocab) - {" "}:
            missing.setdefault(c, w)
        ids = tokenizer(text)["input_ids"]
        out.append([i for i in ids if i is not None])
    if missing:
        shown = ", ".join(f"{c!r} ({w})" for c, w in list(missing.items())[:8])
        warnings.warn(f"{len(missing)} character(s) of the transcripts are not in the model's vocabulary and are "
                      f"learned as {tokenizer.unk_token!r}: {shown}; words are split at {delimiter!r}",
                      UserWarning, stacklevel=2)
    return out


def ctc_loss(log_probs: torch.Tensor, labels: torch.Tensor, blank: int) -> torch.Tensor:
    """The mean over clips of each clip's CTC loss divided by its transcript's length (torch's
    ``reduction="mean"``, transformers' ``ctc_loss_reduction="mean"``); ``labels`` padded with -100."""
    lengths = (labels >= 0).sum(-1)
    flat = labels[labels >= 0]
    frames = torch.full((log_probs.shape[0],), log_probs.shape[1], dtype=torch.long, device=log_probs.device)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(log_probs.transpose(0, 1), flat, frames, lengths, blank=blank, reduction="mean",
                          zero_infinity=True)


class CTCData(_Clips, torch.utils.data.Dataset):
    """Clips as waveform windows (fp16; w2v-BERT: stacked filterbank frames) with their transcripts as a CTC
    vocabulary's ids (a wav2vec2-style model, ``fmtune.models.ctc``). A batch pads with zeros to the longest clip,
    ``frame_mask`` marking real samples (frames); ``labels`` are the ids padded with -100."""

    def __init__(self, clips: list[list[torch.Tensor]], ids: list[list[int]] | None, spec: Any,
                 references: list[str | None], lines: list[int], sources: list[str]):
        self.clips, self.ids = clips, ids
        self.references, self.lines, self.sources = references, lines, sources
        self.spec = spec
        self.hop_seconds = spec.frame_seconds  # of one sample, or one stacked frame (what the lengths count)
        self.window_seconds = spec.window_seconds
        self.lengths = np.array([c[0].shape[-1] for c in clips])

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> int:
        return i

    def waveforms(self, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        from fmtune.data.audio import encoder_batch

        return encoder_batch(windows, self.spec)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = self.waveforms([self.clips[i][0] for i in idx])
        rows = [self.ids[i] for i in idx]
        labels = torch.full((len(idx), max(len(r) for r in rows)), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            labels[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        batch["labels"] = labels
        return batch


@TASKS.register("speech-recognition")
class SpeechRecognition(Task):
    name = "speech-recognition"
    level = "lm"  # a model with its own output layer that generates (fmtune.models.speech)
    modality = "audio"
    default_metric = "wer"
    metric_names = ("wer", "cer", "loss", "perplexity")
    # POST /v1/audio/transcriptions (fmtune.serve_openai); fmtune robustness (WER under noise, delay, speed, level);
    # fmtune fairness (WER and CER per group of clips: speakers' gender, accent ...)
    capabilities = frozenset({"transcribe", "robustness", "fairness"})
    description = ("transcribe speech: fine-tune an encoder-decoder speech model (Whisper, Moonshine, Speech2Text) "
                   "or a CTC model (wav2vec2-style, Parakeet) on clips and their transcripts (a table of audio paths "
                   "and text); WER picks the best checkpoint")
    input_name = "audio"  # what each transcript in test_answers.jsonl transcribes
    baseline_method = "the pretrained model's own transcripts of the same test clips, before fine-tuning (zero-shot)"

    def __init__(self, labels: list[str] | None = None, **kw: Any):
        super().__init__([])
        self.language = kw.get("language")
        self.wer_normalizer = kw.get("wer_normalizer") or "basic"
        self.options = {"language": self.language, "wer_normalizer": self.wer_normalizer}
        self.settings = GenerationSettings()  # eval.samples, the decoding batch (set from the config)
        self.last_answers: list[str] = []  # of the latest evaluation's sample
        self.blank = 0  # a CTC model's blank (its tokenizer's pad token), set when its datasets are made
        self.alphabet: list[str] | None = None  # the training transcripts' characters (lower case)

    def greater_is_better(self, metric: str) -> bool:
        return metric not in ("wer", "cer", "loss", "perplexity")

    @classmethod
    def read_file(cls, path: str | Path, data_cfg: Any) -> pd.DataFrame:
        return read_speech(path, data_cfg)

    @classmethod
    def target_column(cls, data_cfg: Any) -> str:
        return "text"

    @classmethod
    def options_from(cls, task_cfg: Any, data_cfg: Any) -> dict[str, Any]:
        return {"language": task_cfg.language, "wer_normalizer": task_cfg.wer_normalizer}

    @classmethod
    def from_train(cls, values: pd.Series, df: pd.DataFrame, **kw: Any) -> SpeechRecognition:
        return cls(**kw)

    def use_transcripts(self, train: pd.DataFrame) -> None:
        """Note the training transcripts' characters (lower case): a CTC encoder without a head gets
        its vocabulary from them (``fmtune.models.ctc.create``); the same on resume."""
        self.alphabet = sorted({c for t in train["text"] if isinstance(t, str) for c in t.lower()} - {" "})

    # --- data -----------------------------------------------------------------------------------
    def dataset(self, df: pd.DataFrame, bundle: Any, data_cfg: Any, with_targets: bool = True,
                allow_unknown: bool = False) -> tuple[SpeechData | CTCData, np.ndarray]:
        from fmtune.data.audio import AudioSpec, audio_dataset

        spec = AudioSpec.from_dict(bundle.audio)
        audio, keep = audio_dataset(df, "audio", spec, None, data_cfg.max_bad_fraction)
        texts = df["text"].tolist() if with_targets and "text" in df.columns else [None] * len(df)
        lines = df["line"].tolist() if "line" in df.columns else list(range(1, len(df) + 1))
        if not decodes(bundle):  # a wav2vec2-style CTC model (fmtune.models.ctc)
            return self._ctc_dataset(df, bundle, audio, keep, spec, texts, lines, with_targets), keep
        tok = bundle.tokenizer
        prefix = prefix_ids(tok, self.language, bundle.model)
        eot = tok.eos_token_id
        lead = " " if whisper_vocabulary(tok) else ""
        case = case_of(tok)  # (a vocabulary of one case: Speech2Text's)
        ids, refs, kept_lines = [], [], []
        limit = bundle.max_length  # the decoder's positions
        for j, i in enumerate(keep):
            if with_targets and len(audio.clips[j]) > 1:
                ids.append(None)  # longer than the window: scored on WER only (``_Clips``)
            elif with_targets:
                body = tok(lead + cased(texts[i], case), add_special_tokens=False)["input_ids"]
                if len(prefix) + len(body) + 1 > limit:
                    raise DataError(f"{row_label(df, int(i))}: the transcript is {len(body)} tokens; the decoder "
                                    f"holds {limit - len(prefix) - 1} (cut the clip and its transcript in two)")
                ids.append(prefix + body + [eot])
            refs.append(texts[i])
            kept_lines.append(int(lines[i]))
        data = SpeechData(audio.clips, ids if with_targets else None, len(prefix), eot, spec, refs, kept_lines,
                          audio.sources)
        return data, keep

    def training_set(self, ds: SpeechData | CTCData) -> SpeechData | CTCData:
        """The training split without its clips longer than the model's window (each needs one transcript per
        window), said in a warning that names the first; none left is a DataError."""
        rows = ds.trained_rows()
        if len(rows) == len(ds):
            return ds
        long = [i for i in range(len(ds)) if ds.ids[i] is None]
        source = ds.sources[long[0]] if len(ds.sources) == len(ds) else None
        first = f"{source} (row {ds.lines[long[0]]})" if isinstance(source, str) else f"row {ds.lines[long[0]]}"
        window = f"the model's {ds.window_seconds:g} s window"
        if not rows:
            raise DataError(f"{first}: every training clip ({len(long)}) is longer than {window}; a training clip "
                            "needs one transcript per window: cut long recordings into clips of at most the window, "
                            "each with its own transcript")
        warnings.warn(f"{len(long)} of {len(ds)} training clips are longer than {window} and are left out of training "
                      f"(one transcript cannot be split between windows; first: {first}); validation and test clips "
                      "of any length are transcribed window by window and scored", UserWarning, stacklevel=2)
        return ds.only(rows)

    def _ctc_dataset(self, df: pd.DataFrame, bundle: Any, audio: Any, keep: np.ndarray, spec: Any,
                     texts: list[str | None], lines: list[int], with_targets: bool) -> CTCData:
        """A CTC model's clips and transcripts: a clip longer than the window has no ids (scored on WER only), and
        every other transcript at most as many tokens as its clip has frames (CTC emits one per frame)."""
        from fmtune.models.hf_remote import output_frames

        tok = bundle.tokenizer
        self.blank = int(tok.pad_token_id)
        refs = [texts[i] for i in keep]
        ids = None
        if with_targets:
            ids = encode_texts(tok, refs, [row_label(df, int(i)) for i in keep])
            frames = output_frames(bundle.model, torch.tensor([c[0].shape[-1] for c in audio.clips])).tolist()
            for j, windows in enumerate(audio.clips):
                if len(windows) > 1:
                    ids[j] = None  # longer than the window: scored on WER only (``_Clips``)
            for j, (row, n) in enumerate(zip(ids, frames)):
                if row is not None and len(row) > n:
                    raise DataError(f"{row_label(df, int(keep[j]))}: the transcript is {len(row)} tokens but the "
                                    f"clip gives the model {n} frames; CTC emits at most one token per frame (is "
                                    "this the clip's transcript?)")
        return CTCData(audio.clips, ids, spec, refs, [int(lines[i]) for i in keep], audio.sources)

    def inputs(self, items: list[Any], bundle: Any) -> SpeechData | CTCData:
        """Decoded waveforms to transcribe (any length: windows are transcribed in turn)."""
        from fmtune.data.audio import AudioSpec, features_of

        spec = AudioSpec.from_dict(bundle.audio)
        if not decodes(bundle):  # a CTC model
            return CTCData(features_of(items, spec), None, spec, [None] * len(items),
                           list(range(1, len(items) + 1)), [])
        return SpeechData(features_of(items, spec), None, 0, bundle.tokenizer.eos_token_id, spec,
                          [None] * len(items), list(range(1, len(items) + 1)), [])

    # --- loss and metrics -------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, targets: Any, weights: torch.Tensor | None = None) -> torch.Tensor:
        if targets.dim() == 2:  # a CTC model: log-probabilities per frame, transcripts padded with -100
            return ctc_loss(logits, targets, self.blank)
        return F.cross_entropy(logits.float(), targets)

    def evaluate_model(self, net: Any, ds: SpeechData, batch_size: int, device: Any,
                       sample: list[int] | None = None, progress: Any = None) -> dict[str, float]:
        """Loss over every clip; WER and CER of greedy transcripts of the fixed sample (``sample``;
        default: the first ``settings.samples`` of a seeded order)."""
        was_training = net.training
        net.eval()
        rows = ds.trained_rows()  # (a clip longer than the window has no loss: it is scored on WER only)
        lengths = ds.lengths[rows]
        batch_size = inference_batch(net, ds, batch_size, device)
        batches = [[rows[j] for j in b] for b in token_batches(lengths, batch_size,
                                                               max_tokens=batch_size * int(lengths.max(initial=1)))]
        ctc = isinstance(ds, CTCData)
        if not rows:  # every clip longer than the window: no loss to report (not a loss of 0)
            out = dict.fromkeys(("loss",) if ctc else ("loss", "perplexity"), float("nan"))
        else:
            out = self._ctc_loss(net, ds, batches, device) if ctc else token_loss(net, ds, batches, device)
        sample = self.sample(ds) if sample is None else sample
        if sample:
            answers = net.transcribe(ds, sample, self.settings.batch_size, device, self.language, on_batch=progress)
            self.last_answers = answers
            out.update(error_rates(answers, [ds.references[i] for i in sample], self.wer_normalizer))
        if was_training:
            net.train()
        return out

    def _ctc_loss(self, net: Any, ds: CTCData, batches: list[list[int]], device: Any) -> dict[str, float]:
        """The mean CTC loss per clip (each divided by its transcript's length, as in training)."""
        total = 0.0
        with torch.inference_mode():
            for idx in batches:
                batch = {k: v.to(device) for k, v in ds.collate(idx).items()}
                labels = batch.pop("labels")
                total += float(self.loss(net(**batch).logits, labels)) * len(idx)
        return {"loss": total / max(sum(map(len, batches)), 1)}

    def sample(self, ds: SpeechData, n: int | None = None) -> list[int]:
        """A fixed, seeded sample of clips with a transcript (the same at every evaluation)."""
        return fixed_sample(ds.references, self.settings.samples if n is None else n)

    @classmethod
    def media_column(cls, data_cfg: Any) -> str:
        return "audio"  # (``read_speech``'s column, whichever the table's is)

    def input_column(self, df: pd.DataFrame, default: str) -> str:
        """The audio column of a table to transcribe: ``data.audio_column``, else a usual name
        (file_name, path ...)."""
        return default if default in df.columns else next((c for c in AUDIO_COLUMNS if c in df.columns), default)

    # --- output ------------------------------------------------------------------------------
    def generate_records(self, net: Any, ds: SpeechData, batch_size: int, device: Any) -> list[dict[str, Any]]:
        """The transcript of every clip of ``ds`` (windows of a long clip transcribed in turn) by
        ``net`` (``fmtune.models.speech.SpeechLogits``)."""
        texts = net.transcribe(ds, list(range(len(ds))), batch_size, device, self.language)
        return [{"transcript": t} for t in texts]

    def prediction_columns(self) -> list[str]:
        return ["transcript"]

    def outcomes(self, logits: list[str], targets: list[str]) -> dict[str, Any]:
        """What a fairness audit compares across groups: each clip's word and character errors and its reference's
        words and characters (``logits``: the transcripts, ``targets``: the references)."""
        return {"kind": "errors", **error_counts(logits, targets, self.wer_normalizer)}

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        return {"text": record["transcript"]}

    def flatten(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"transcript": record["transcript"]}

    def state(self) -> dict[str, Any]:
        return {"task": self.name, "labels": [], **self.options}

