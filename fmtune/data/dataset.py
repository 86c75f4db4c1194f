"""Turn a DataFrame into model inputs: tokenised text or decoded images, plus batching.

Text is tokenised once, without padding; each batch is padded to its own longest example, and
training batches are grouped by length (shuffled buckets) so little compute goes to padding.
Images are decoded, converted to RGB and resized once, kept as uint8, and normalised per batch.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fmtune.data.readers import (
    file_like,
    media_cell,
    media_root_hint,
    require_column,
    require_text_column,
    row_label,
    row_prefix,
    table_base,
)
from fmtune.errors import DataError

AUTO_MAX_LENGTH = 256  # the most tokens model.max_length is raised to from the data, when not set
LONG_TEXTS_NOTE = 0.05  # the plan says so when at least this share of the training texts is cut at model.max_length
EAGER_IMAGE_BYTES = 2 << 30  # decode everything up front below this size, else decode per batch


def batch_targets(targets: Any, idx: list[int], width: int) -> Any:
    """The targets of examples ``idx``: one per example, or one per token (per-token targets,
    ``fmtune.data.tokens.TokenTargets``, collate themselves, padded to ``width`` positions)."""
    return targets.collate(idx, width) if hasattr(targets, "collate") else targets[idx]


class TextData(torch.utils.data.Dataset):
    def __init__(self, input_ids: list[list[int]], targets: torch.Tensor | None, pad_id: int,
                 segments: list[list[int]] | None = None, pairs: bool = False):
        self.input_ids, self.targets, self.pad_id = input_ids, targets, pad_id
        self.segments = segments  # token type ids of text pairs (None: one text, or a model without them)
        self.pairs = pairs  # pairs of texts (data.text_pair_column)
        self.lengths = np.array([len(x) for x in input_ids])

    def memory_profile(self) -> tuple[np.ndarray, np.ndarray, None]:
        """What a text costs a forward pass (``fmtune.training.memory``): its tokens."""
        return self.lengths, self.lengths, None

    def text(self, i: int, tokenizer: Any) -> str:
        """Example ``i`` as the model read it; a pair keeps the separator between its two texts."""
        ids = self.input_ids[i]
        if not self.pairs:
            return tokenizer.decode(ids, skip_special_tokens=True)
        ends = {tokenizer.cls_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
        ids = ids[1:] if ids and ids[0] in ends else ids  # the leading [CLS] / <s>
        ids = ids[:-1] if ids and ids[-1] in ends | {tokenizer.sep_token_id} else ids  # and the closing one
        return tokenizer.decode(ids, skip_special_tokens=False)

    def pair(self, i: int, tokenizer: Any) -> tuple[str, str]:
        """Example ``i``'s two texts as the model read them (cut to fit), split at the separator
        between them ([SEP], </s></s> ...)."""
        marks = {tokenizer.cls_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.sep_token_id,
                 tokenizer.pad_token_id} - {None}
        parts: list[list[int]] = [[]]
        for t in self.input_ids[i]:
            if t not in marks:
                parts[-1].append(t)
            elif parts[-1]:
                parts.append([])
        parts = [p for p in parts if p]
        texts = [tokenizer.decode(p, skip_special_tokens=True) for p in parts] + ["", ""]
        return texts[0], " ".join(texts[1:]).strip()  # a separator written inside a text stays in the second

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> int:
        return i  # collation reads the columns directly; cheaper than per-item tensors

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        width = int(self.lengths[idx].max())
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = self.input_ids[i]
            ids[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if self.segments is not None:
            types = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                types[row, : len(self.segments[i])] = torch.as_tensor(self.segments[i])
            batch["token_type_ids"] = types
        if self.targets is not None:
            batch["labels"] = batch_targets(self.targets, idx, width)
        return batch


class ImageData(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor | list[str], targets: torch.Tensor | None, spec: dict[str, Any]):
        self.images, self.targets, self.spec = images, targets, spec
        self.mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
        self.lengths = None
        self.stored: frozenset[Any] = frozenset()  # turned photos read as stored: their annotations fit those pixels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> int:
        return i

    @property
    def image_side(self) -> int | None:
        """The side every image is read at (``fmtune.training.memory``), where one is."""
        size = self.spec.get("size")
        return size if isinstance(size, int) else None

    def raw(self, idx: list[int]) -> torch.Tensor:
        """The images ``idx`` as stored (uint8, or float 0-255), decoding lazily kept ones."""
        if isinstance(self.images, torch.Tensor):
            return self.images[idx]
        return torch.stack([self.decode(self.images[i]) for i in idx])

    def decode(self, path: str | bytes) -> torch.Tensor:
        """One lazily kept image (a path, or the bytes of one embedded in its table) as the model
        reads it (classification: resized, centre-cropped)."""
        return decode_image(file_like(path), self.spec["size"])

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the model reads them: normalised, channels-last. oneDNN's
        convolutions run 1.7x faster on that layout (EfficientNet-Lite0 training step, fp32, 2-core
        Zen 4: 350 -> 206 ms at 64 px, 1429 -> 833 ms at 224 px); same values."""
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": self.pixels(self.raw(idx).float() / 255.0)}
        if self.targets is not None:
            batch["labels"] = self.targets[idx]
        return batch


EXIF_ORIENTATION = 0x0112  # the camera's turn of a photo (2..8), which viewers and annotation tools apply


def orientation(img: Image.Image) -> int:
    """A photo's EXIF orientation: 1 upright as stored, 2..8 turned or mirrored when shown; 5..8 swap its sides."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 (a broken EXIF block: the pixels as stored)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def stored_warning(n: int, source: Any, what: str) -> None:
    """Say that ``n`` turned photos are read as stored because their annotations (``what``) fit the stored pixels."""
    if n:
        warnings.warn(f"{source}: {n} photo(s) carry an EXIF orientation but their {what} fit the pixels as stored "
                      "(drawn by a tool that did not turn them): those photos are read as stored, not turned upright",
                      stacklevel=3)


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as it is shown (``load_rgb`` turns it so), from its header alone."""
    w, h = img.size
    return (h, w) if orientation(img) >= 5 else (w, h)


def load_rgb(source: Any, upright: bool = True) -> Image.Image:
    """A path / file object / PIL image as a loaded RGB image, upright as it is shown (a phone photo's EXIF
    orientation applied, as transformers' load_image and annotation tools do; ``upright`` False: its pixels as
    stored); PIL's own errors for what is not one."""
    img = source if isinstance(source, Image.Image) else Image.open(source)
    img.load()
    if upright and orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":  # grayscale, palette, RGBA, CMYK ...
        img = img.convert("RGBA").convert("RGB") if img.mode in ("P", "LA") else img.convert("RGB")
    return img


def decode_image(source: Any, size: int) -> torch.Tensor:
    """Open a path / file object / PIL image -> uint8 (3, size, size): RGB, shorter side resized, centre crop."""
    img = load_rgb(source)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def _check_image(path: str) -> str | None:
    """None if the file decodes as an image, else the reason."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as img:
            img.load()
    except FileNotFoundError:
        return "file not found"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        said = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "in the table", str(e))  # an embedded image
        return f"not a readable image ({type(e).__name__}: {said})"
    return None


def tokens_p95(bundle: Any, texts: pd.Series, seed: int = 0) -> int:
    """The 95th percentile of the token counts of up to 2,000 of ``texts`` (or pairs of texts),
    tokenised uncut."""
    pick = np.random.default_rng(seed).choice(len(texts), min(len(texts), 2000), replace=False)
    items = [texts.iat[int(i)] for i in pick]
    if items and isinstance(items[0], tuple):
        uncut = bundle.tokenizer([str(a) for a, _ in items], [str(b) for _, b in items], truncation=False,
                                 verbose=False)["input_ids"]
    else:
        uncut = bundle.tokenizer([str(t) for t in items], truncation=False, verbose=False)["input_ids"]
    return int(np.percentile([len(ids) for ids in uncut], 95))


def model_texts(df: pd.DataFrame, data_cfg: Any) -> pd.Series | None:
    """The texts of ``df`` as the model reads them: ``data.text_column``, or pairs of it and
    ``data.text_pair_column``; None when a column is missing."""
    pair = getattr(data_cfg, "text_pair_column", None)
    if data_cfg.text_column not in df.columns or (pair and pair not in df.columns):
        return None
    if not pair:
        return df[data_cfg.text_column]
    return pd.Series(list(zip(df[data_cfg.text_column], df[pair])), index=df.index, dtype=object)


def auto_max_length(bundle: Any, texts: pd.Series | None, default: int, seed: int = 0) -> dict[str, Any] | None:
    """model.max_length when it is not set, for texts read whole into one prediction: the multiple of
    32 that keeps 95% of the training texts whole, at least ``default`` and at most AUTO_MAX_LENGTH
    (and what the model reads); None when that is ``default`` (short texts). Reading more of long
    texts paid on the only long-document set offline (bench/long_texts.py: 2012 convention speech
    passages of ~360 tokens, party, 3 speaker splits, MiniLM-L6): test accuracy 0.646 at 128 tokens,
    0.688 at 256, 0.682 at 512, training 58 / 100 / 169 s."""
    if texts is None or not len(texts):
        return None
    p95 = tokens_p95(bundle, texts, seed)
    limit = bundle.length_limit()
    length = min(max(default, -(-p95 // 32) * 32), AUTO_MAX_LENGTH, *([limit] if limit else []))
    return None if length <= default else {"max_length": length, "tokens_p95": p95, "default": default}


def long_texts(ds: Any, bundle: Any, texts: pd.Series | None, seed: int = 0,
               p95: int | None = None) -> dict[str, Any] | None:
    """How many training texts reach model.max_length (and are cut there), and the length that keeps
    95% of them whole, from up to 2,000 of them tokenised uncut (``p95``: that length, when
    ``auto_max_length`` has measured it already); None when under LONG_TEXTS_NOTE."""
    if not isinstance(ds, TextData) or texts is None or not len(ds) or len(texts) != len(ds):
        return None
    cut = int((ds.lengths >= bundle.max_length).sum())
    if cut < LONG_TEXTS_NOTE * len(ds):
        return None
    p95 = tokens_p95(bundle, texts, seed) if p95 is None else p95
    limit = bundle.length_limit()
    keep = -(-p95 // 32) * 32  # a multiple of 32
    return {"texts_cut": cut, "share": round(cut / len(ds), 3), "max_length": bundle.max_length, "tokens_p95": p95,
            "suggested_max_length": min(keep, limit) if limit else keep, "model_limit": limit}


def long_texts_line(note: dict[str, Any]) -> str:
    """The plan's line for ``long_texts``' note."""
    line = (f"long texts: {note['share']:.0%} of the training texts ({note['texts_cut']}) reach model.max_length "
            f"{note['max_length']} tokens and are cut there; 95% fit in {note['tokens_p95']}")
    if note["suggested_max_length"] > note["max_length"]:
        return line + (f": --set model.max_length={note['suggested_max_length']} reads more of them (a step costs "
                       "about as much more as its batch is longer)")
    return line + f"; the model reads at most {note['model_limit']}"


def text_dataset(df: pd.DataFrame, column: str, bundle: Any, targets: torch.Tensor | None,
                 pair_column: str | None = None, max_bad_fraction: float = 0.0) -> tuple[TextData, np.ndarray]:
    """The texts of ``column`` (with ``pair_column``: pairs of texts) as the model reads them, and the positions
    (into ``df``) of the rows kept: a row whose cell is empty or not text is left out with a warning naming it, as an
    unreadable image is, up to ``max_bad_fraction`` of the rows (real sets have a few: rotten-tomatoes' full corpus,
    one of 14,000); more is a DataError listing them."""
    bad: dict[int, str] = {}
    for col in require_text_column(df, column, pair_column):
        for i, v in enumerate(df[col]):
            if (not isinstance(v, str) or not v.strip()) and i not in bad:
                what = "empty" if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "" \
                    else f"not text ({type(v).__name__})"
                bad[i] = f"{row_label(df, i)}: column {col!r} is {what}"
    skip_bad([bad[i] for i in sorted(bad)], len(df), df.attrs.get("source", "the data"), max_bad_fraction,
             "texts are empty or not text", "row(s) without a text", "; fill or drop those rows")
    keep = np.array([i for i in range(len(df)) if i not in bad], dtype=np.int64)
    texts = df[column].to_numpy()[keep]
    values = list(texts) if pair_column is None else list(zip(texts, df[pair_column].to_numpy()[keep]))
    return bundle.text_data(values, None if targets is None else targets[keep]), keep


def image_dataset(df: pd.DataFrame, column: str, spec: dict[str, Any], targets: torch.Tensor | None,
                  max_bad_fraction: float) -> tuple[ImageData, np.ndarray]:
    """Decode every image (or check it, when too many to hold); drop unreadable ones with a warning.
    A cell is a path (relative to the table) or an image embedded in the table (a Hugging Face
    dataset's Parquet: ``fmtune.data.readers.media_cell``).

    Returns the dataset and the positions (into ``df``) of the rows kept.
    """
    require_column(df, column, "image path", "data.image_column")
    src, base = df.attrs.get("source", ""), table_base(df)
    cells = [media_cell(v, base) for v in df[column]]
    size = int(spec["size"])
    eager = len(cells) * 3 * size * size <= EAGER_IMAGE_BYTES
    kept, images, bad = [], [], []
    for i, (source, name) in enumerate(cells):
        reason = f"column {column!r} is empty" if source is None else _check_image(file_like(source))
        if reason is None and eager:
            try:
                images.append(decode_image(file_like(source), size))
            except (OSError, ValueError) as e:
                reason = f"cannot decode ({e})"
        if reason is None:
            kept.append(i)
        else:
            bad.append(f"{row_prefix(df, i)}{name + ': ' if name else ''}{reason}")
    missing = [s for s, _ in cells if isinstance(s, Path) and not s.exists()]
    skip_bad(bad, len(cells), src, max_bad_fraction, "images cannot be read", "unreadable image(s)",
             media_root_hint(missing, base) if missing else "")
    keep = np.array(kept, dtype=np.int64)
    data = torch.stack(images) if eager else [cells[i][0] if isinstance(cells[i][0], bytes) else str(cells[i][0])
                                              for i in kept]
    return ImageData(data, None if targets is None else targets[keep], spec), keep


def skip_bad(bad: list[str], total: int, src: str, max_bad_fraction: float, cannot: str, skipping: str,
             hint: str = "") -> None:
    """Files that cannot be used (``bad``: one message each, naming the file): a DataError listing
    them when they are more than ``max_bad_fraction`` of ``total`` (or all of them), else a warning
    that they are skipped; ``hint``, where missing files were found elsewhere, ends the error."""
    if not bad:
        return
    share = len(bad) / total
    listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
    if share > max_bad_fraction or len(bad) == total:
        raise DataError(f"{src}: {len(bad)} of {total} {cannot} ({share:.0%}, more than "
                        f"data.max_bad_fraction={max_bad_fraction:.0%}):\n  {listing}{hint}")
    warnings.warn(f"skipping {len(bad)} {skipping} in {src}:\n  {listing}", stacklevel=3)


class WithAux:
    """A training set whose batches also carry per-example tensors (keys ``aux_*``) for the loss."""

    def __init__(self, ds: Any, aux: dict[str, torch.Tensor]):
        self.ds, self.aux = ds, aux

    def __len__(self) -> int:
        return len(self.ds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds, name)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = self.ds.collate(idx)
        at = torch.as_tensor(idx)
        batch.update({k: v[at] for k, v in self.aux.items()})
        return batch


class Rows:
    """Examples ``keep`` of a dataset, collated by the dataset itself (for prediction: a rank's share,
    the rows a probe reads)."""

    def __init__(self, ds: Any, keep: np.ndarray):
        self.ds, self.keep = ds, keep
        self.lengths = None if getattr(ds, "lengths", None) is None else np.asarray(ds.lengths)[keep]
        # the view is only predicted on; per-token targets (a TokenTargets) are not indexed here
        self.targets = None if ds.targets is None or hasattr(ds.targets, "collate") \
            else ds.targets[torch.as_tensor(keep)]

    def __len__(self) -> int:
        return len(self.keep)

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        return self.ds.collate([int(self.keep[i]) for i in idx])


# Inference batches on a CPU (no gradient, no order to keep): examples sorted by length, and a batch is
# closed before its padding would pass this share of its real tokens, once it holds INFER_MIN_TOKENS real
# tokens. rotten-tomatoes' 1,000 test sentences in sorted batches of 128 pad 15 % (batches of 32: 3 %);
# with the cut the Predictor read them in 3.9 s instead of 6.1-6.3 s (MiniLM-L6, fp32, 2 cores; bench/speed.py).
INFER_MAX_PADDING = 0.05
INFER_MIN_TOKENS = 1024


def sorted_batches(lengths: np.ndarray, batch_size: int, min_tokens: int | None) -> list[list[int]]:
    """Positions sorted by length, at most ``batch_size`` a batch; with ``min_tokens`` a batch that holds
    that many real tokens is cut where the next example would make its padding more than
    INFER_MAX_PADDING of its real tokens (None: plain runs of ``batch_size``)."""
    order = np.argsort(lengths, kind="stable")
    if min_tokens is None:
        return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    out: list[list[int]] = []
    batch: list[int] = []
    tokens = 0
    for i in order.tolist():
        width = int(lengths[i])  # the longest so far: the order is ascending
        padded = (len(batch) + 1) * width > (1 + INFER_MAX_PADDING) * (tokens + width)
        if batch and (len(batch) >= batch_size or (padded and tokens >= min_tokens)):
            out.append(batch)
            batch, tokens = [], 0
        batch.append(i)
        tokens += width
    if batch:
        out.append(batch)
    return out


def inference_batches(ds: Any, batch_size: int, device_type: str, cut: bool = True) -> list[list[int]]:
    """The batches to run ``ds`` through a model without gradients: sorted by length (text), padding
    capped on a CPU (sorted_batches); on a GPU plain runs of ``batch_size`` (the cap is unmeasured there,
    where a larger batch costs little more than a smaller one). ``cut=False``: plain runs everywhere, so
    the number of batches depends on the number of rows only (ranks that must run as many forward
    passes as each other: distributed.gathered_infer)."""
    lengths = getattr(ds, "lengths", None)
    if lengths is None:
        return [list(range(i, min(i + batch_size, len(ds)))) for i in range(0, len(ds), batch_size)]
    return sorted_batches(np.asarray(lengths), batch_size,
                          INFER_MIN_TOKENS if cut and device_type == "cpu" else None)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int,
                  lengths: np.ndarray | None = None) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch): resume can replay it exactly.

    With ``lengths``, examples are grouped by length within shuffled mega-batches of 50 batches,
    and the batches are then shuffled, so each batch pads little and training stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if lengths is not None:
        mega = batch_size * 50
        chunks = [order[i:i + mega] for i in range(0, n, mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]
