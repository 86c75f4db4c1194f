"""Token-level datasets: each sentence's words are tokenised into sub-words and read in windows
that fit the model (``model.max_length``). A sentence longer than one window is split into
windows that overlap by ``stride`` of the window; each word is owned by the window in which it
has the most context around it, so every word of every sentence gets exactly one prediction.

One example = one window. ``Layout`` maps the windows back: which sentence, which words, and at
which position of the window each owned word's first sub-token sits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fmtune.data.dataset import TextData

IGNORE = -100


@dataclass
class Layout:
    sentence: np.ndarray  # window -> sentence (row) index
    word_pos: list[np.ndarray]  # window -> positions of its owned words' first sub-tokens
    word_index: list[np.ndarray]  # window -> those words' indices in the sentence
    n_words: np.ndarray  # sentence -> number of words
    spans: list[np.ndarray] | None = None  # window -> rows (word, start, end): each word's sub-token positions

    def window_of(self, sentence: int, word: int) -> int:
        """The window that owns ``word`` of ``sentence``."""
        for w in np.flatnonzero(self.sentence == sentence):
            if word in self.word_index[w]:
                return int(w)
        raise IndexError(f"word {word} of sentence {sentence} is in no window")

    def split_sentences(self) -> dict[str, int]:
        """How many sentences (and their words) needed more than one window."""
        counts = np.bincount(self.sentence, minlength=len(self.n_words))
        many = counts > 1
        return {"sentences": int(len(self.n_words)), "windows": int(len(self.sentence)),
                "sentences_in_several_windows": int(many.sum()), "words_in_them": int(self.n_words[many].sum())}

    def per_sentence(self, values_per_window: list[np.ndarray], fill: Any) -> list[np.ndarray]:
        """Per-window values of the owned words put back into sentence order."""
        out = [np.full(int(n), fill, dtype=np.asarray(fill).dtype) for n in self.n_words]
        for w, vals in enumerate(values_per_window):
            out[self.sentence[w]][self.word_index[w]] = vals
        return out


class TokenTargets:
    """Per-window training labels (one per sub-token position, -100 where not trained) and, per
    sentence, the gold tag of every word (strings; a tag unseen in training is kept as it is)."""

    def __init__(self, train: list[np.ndarray], gold: list[list[str]], layout: Layout):
        self.train, self.gold, self.layout = train, gold, layout

    def __len__(self) -> int:
        return len(self.train)

    def collate(self, idx: list[int], width: int) -> torch.Tensor:
        out = torch.full((len(idx), width), IGNORE, dtype=torch.long)
        for row, i in enumerate(idx):
            lab = self.train[i][:width]
            out[row, : len(lab)] = torch.from_numpy(lab)
        return out


class TokenData(TextData):
    """Windows of sub-token ids, their targets (or None) and the layout back to the words."""

    def __init__(self, input_ids: list[list[int]], targets: TokenTargets | None, pad_id: int, layout: Layout,
                 texts: list[str] | None = None, offsets: list[list[tuple[int, int]]] | None = None):
        super().__init__(input_ids, targets, pad_id)
        self.layout, self.texts, self.offsets = layout, texts, offsets
        self.n_rows = len(layout.n_words)  # sentences (an example is a window)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence ([CLS] / [SEP], <s> / </s> ...)."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(content) + 1):
        if full[i:i + len(content)] == content:
            return full[:i], full[i + len(content):]
    return [], []


def windows(counts: list[int], budget: int, stride: float) -> list[tuple[int, int, int, int]]:
    """(start, end, own_start, own_end) word ranges of the windows over words of ``counts``
    sub-tokens (each at most ``budget``); consecutive windows overlap by about ``stride * budget``
    sub-tokens, and a word in the overlap is owned by the window where it is further from the edge."""
    n = len(counts)
    if n == 0:
        return [(0, 0, 0, 0)]
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end, total = start, 0
        while end < n and total + counts[end] <= budget:
            total += counts[end]
            end += 1
        end = max(end, start + 1)
        spans.append((start, end))
        if end >= n:
            break
        back, nxt = 0, end
        while nxt > start + 1 and back + counts[nxt - 1] <= stride * budget:
            back += counts[nxt - 1]
            nxt -= 1
        start = nxt
    out = []
    for i, (s, e) in enumerate(spans):
        own_s = 0 if i == 0 else (s + spans[i - 1][1] + 1) // 2
        own_e = n if i == len(spans) - 1 else (spans[i + 1][0] + e + 1) // 2
        out.append((s, e, own_s, own_e))
    return out


def _word_pieces(sentences: list[list[str]], tokenizer: Any) -> list[list[list[int]]]:
    """Per sentence, per word: its sub-token ids (the sentence tokenised as a whole with a fast
    tokenizer, so words are read in context; word by word otherwise)."""
    if not sentences:
        return []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
        out = []
        for s, words in enumerate(sentences):
            pieces: list[list[int]] = [[] for _ in words]
            for tok_id, w in zip(enc["input_ids"][s], enc.word_ids(s)):
                if w is not None:
                    pieces[w].append(tok_id)
            out.append(pieces)
        return out
    flat = [w for words in sentences for w in words]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    out, k = [], 0
    for words in sentences:
        out.append([list(x) for x in ids[k:k + len(words)]])
        k += len(words)
    return out


def encode_sentences(sentences: list[list[str]], tokenizer: Any, max_length: int, stride: float,
                     labels: list[list[int]] | None = None, label_all: bool = False,
                     inside: dict[int, int] | None = None) -> tuple[list[list[int]], list[np.ndarray], Layout]:
    """Sub-token windows of ``sentences`` (lists of words), with per-position training labels when
    ``labels`` (per word ids) are given. ``inside`` maps a B- label id to its I- id, for the
    non-first sub-tokens of a word when ``label_all``."""
    before, after = special_tokens(tokenizer)
    budget = max(1, max_length - len(before) - len(after))
    unk = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    ids_out, train_out = [], []
    sent_of, pos_of, idx_of, spans_of = [], [], [], []
    for s, pieces in enumerate(_word_pieces(sentences, tokenizer)):
        pieces = [(p or [unk])[:budget] for p in pieces]  # a word the tokenizer drops still gets a position
        counts = [len(p) for p in pieces]
        for start, end, own_s, own_e in windows(counts, budget, stride):
            seq = list(before)
            first = []
            ranges = [[start, 0, 0]]
            lab = [IGNORE] * len(before)
            for w in range(start, end):
                first.append(len(seq))
                ranges.append([w, len(seq), len(seq) + len(pieces[w])])
                seq += pieces[w]
                owned = own_s <= w < own_e
                if labels is not None:
                    y = labels[s][w] if owned else IGNORE
                    rest = inside.get(y, y) if label_all and inside is not None and y != IGNORE else IGNORE
                    lab += [y] + [rest] * (len(pieces[w]) - 1)
            seq += after
            lab += [IGNORE] * len(after)
            ids_out.append(seq)
            train_out.append(np.asarray(lab, dtype=np.int64))
            owned_words = np.arange(max(start, own_s), min(end, own_e))
            sent_of.append(s)
            pos_of.append(np.asarray([first[w - start] for w in owned_words], dtype=np.int64))
            idx_of.append(owned_words)
            spans_of.append(np.asarray(ranges[1:], dtype=np.int64).reshape(-1, 3))
    layout = Layout(np.asarray(sent_of, dtype=np.int64), pos_of, idx_of,
                    np.asarray([len(w) for w in sentences], dtype=np.int64), spans_of)
    return ids_out, train_out, layout
