"""Frozen-prefix feature cache.

When the first ``k`` blocks of the backbone are frozen (``head``, ``last_n``, any strategy that
leaves a prefix untouched) and the inputs are deterministic, the prefix's output is computed
once per example and stored; training then runs only the rest of the network. With the whole
backbone frozen (``head``), the pooled features are cached and an epoch is a few matrix
products. A dense head (segmentation, detection) on a frozen backbone reads three of its maps:
those are cached, flattened into one row per image (cut back into maps per batch).

The cache lives in ``$FMTUNE_CACHE_DIR`` (default ``~/.cache/fmtune/features``), memory-mapped
from disk, under a content hash of the backbone weights, the split point, the pooling, the
precision and storage type, and the preprocessed inputs: any change of model, data or
preprocessing computes a new one.

Runs in mixed precision compute the prefix under the same autocast as uncached training does,
and store it as fp16: its 11-bit mantissa is finer than the bf16 products that made the values,
and it halves the disk, page cache and bytes read per batch. A cache whose values leave fp16's
range is kept in fp32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from fmtune import fsutil
from fmtune.data.audio import AudioData
from fmtune.data.dataset import TextData, batch_targets, inference_batches
from fmtune.fsutil import atomic_dir
from fmtune.strategies import WHOLE_BACKBONE, backbone_blocks, block_list, frozen_prefix
from fmtune.training import hardware, memory, prefetch
from fmtune.training.infer import model_device

VERSION = "3"  # 3: photos decoded upright (EXIF orientation applied)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class Split:
    kind: str  # "pooled": the pooled features; "tokens": the last token states; "hidden": the input of block k;
    # "maps": a dense head's three backbone maps
    k: int
    image_size: int = 0
    # "maps": (C, h, w) of each map, found once by ``plan`` (not part of the cache key: they follow from the rest)
    shapes: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)


def plan(bundle: Any) -> tuple[Split | None, str]:
    """Where to split the model, or None with the reason why nothing can be cached."""
    model = bundle.model
    if getattr(model, "whole", False):
        return None, "a whole detector's or segmenter's head reads its backbone in its own way: nothing to cache"
    k = frozen_prefix(model)
    if getattr(model, "level", "") == "dense":
        if k == WHOLE_BACKBONE:
            size = int(bundle.image.get("size", 0))
            return (Split("maps", -1, size, map_shapes(model, size)),
                    "the whole backbone is frozen: the three maps its head reads are cached")
        return None, "the head reads three stages of the backbone, the last of them trained: nothing to cache"
    if k == WHOLE_BACKBONE:
        if getattr(model, "level", "pooled") == "tokens":
            return Split("tokens", -1), "the whole backbone is frozen: its token states are cached"
        return Split("pooled", -1), "the whole backbone is frozen: its pooled features are cached"
    if k == 0:
        return None, "the first backbone block (or the embeddings) trains: nothing to cache"
    if bundle.kind == "audio":
        return None, "audio clips differ in length: only a wholly frozen encoder's pooled features are cached"
    bb = model.backbone
    supported = hasattr(bb, "forward_suffix") or (hasattr(bb, "embeddings") and block_list(bb) is not None)
    if not supported:
        return None, f"{type(bb).__name__} cannot be run from an intermediate block"
    n = len(backbone_blocks(bb))
    return Split("hidden", k, int(bundle.image.get("size", 0))), f"the first {k} of {n} blocks are frozen: cached"


def precision(train: Any, hw: Any) -> tuple[torch.dtype | None, str]:
    """The dtype the frozen prefix is computed in, and how the cache stores it.

    The prefix runs under the run's mixed precision when that choice is final before training
    (on a GPU with ``precision: auto`` it is timed on the model afterwards, so the cache is
    computed in fp32 there). Stored as fp16 when computed in reduced precision, unless set.
    """
    reduced = hw.precision in ("bf16", "fp16") and not (hw.device == "cuda" and train.precision == "auto")
    autocast = hardware.autocast_dtype(hw.precision) if reduced else None
    storage = train.feature_cache if train.feature_cache in ("fp32", "fp16") else ("fp16" if reduced else "fp32")
    return autocast, storage


class _Stop(Exception):
    pass


@torch.no_grad()
def _prefix(model: nn.Module, split: Split, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if split.kind in ("pooled", "tokens"):
        return model.features(**batch)
    if split.kind == "maps":  # one row per image: the maps flattened, side by side
        return torch.cat([m.flatten(1) for m in model.backbone(batch["pixel_values"])], 1)
    bb = model.backbone
    if hasattr(bb, "forward_prefix"):
        return bb.forward_prefix(batch["pixel_values"], split.k)
    captured: dict[str, torch.Tensor] = {}

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["h"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop  # the rest of the network is not needed

    handle = backbone_blocks(bb)[split.k].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.features(**batch)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["h"]


def suffix_features(model: nn.Module, split: Split, hidden: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run blocks ``k``.. of the backbone on cached hidden states and pool."""
    bb = model.backbone
    if hasattr(bb, "forward_suffix"):
        return bb.forward_suffix(hidden, split.k)
    parent, attr = block_list(bb)
    full = getattr(parent, attr)
    # The backbone's own forward (masks, final norm, pooler) runs over the remaining blocks;
    # the embeddings' output is replaced by the cached hidden states.
    setattr(parent, attr, nn.ModuleList(list(full)[split.k:]))
    handle = bb.embeddings.register_forward_hook(lambda _m, _a, _o: hidden)
    try:
        if attention_mask is not None:
            dummy = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            return model.features(input_ids=dummy, attention_mask=attention_mask)
        pixels = torch.zeros((hidden.shape[0], 3, split.image_size, split.image_size), device=hidden.device)
        return model.features(pixel_values=pixels)
    finally:
        setattr(parent, attr, full)
        handle.remove()


@torch.no_grad()
def verify(model: nn.Module, split: Split, ds: Any) -> str | None:
    """None if running the blocks after the split on the cached input of block ``k`` gives the
    model's own features (checked on the first two examples), else why not. Backbones that change
    the hidden states between their embeddings and first block (ELECTRA's and ALBERT's projections)
    or pass more than the hidden states between blocks (Swin) would train on wrong features."""
    if split.kind != "hidden" or len(ds) == 0:
        return None
    batch = {k: v.to(model_device(model)) for k, v in ds.collate(list(range(min(2, len(ds))))).items()}
    batch.pop("labels", None)
    was = model.training
    model.eval()
    try:
        want = model.features(**batch)
        got = suffix_features(model, split, _prefix(model, split, batch), batch.get("attention_mask"))
        same = got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-4)
    except Exception as e:  # noqa: BLE001 - any failure means: do not cache this backbone this way
        return f"{type(model.backbone).__name__} cannot be run from an intermediate block ({type(e).__name__})"
    finally:
        model.train(was)
    name = type(model.backbone).__name__
    return None if same else f"{name} does not give its own features when run from block {split.k}"


class CachedForward(nn.Module):
    """The model seen from the cache: takes cached features or hidden states, returns logits."""

    def __init__(self, model: nn.Module, split: Split):
        super().__init__()
        self.model, self.split = model, split

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    @property
    def head(self) -> nn.Module:
        return self.model.head

    def forward(self, features: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **maps: torch.Tensor) -> SequenceClassifierOutput:
        if maps:  # map0, map1, map2: a dense head's backbone maps
            return self.model.forward_maps(tuple(maps[f"map{i}"] for i in range(len(maps))),
                                           (self.split.image_size, self.split.image_size))
        if features is None:
            features = hidden if self.split.kind == "tokens" else \
                suffix_features(self.model, self.split, hidden, attention_mask)
        return SequenceClassifierOutput(logits=self.model.classify(features))


class CachedData(torch.utils.data.Dataset):
    """Cached prefix outputs of one split. Text hidden states are ragged: one flat array and offsets.
    A dense head's maps are one flat row per image, cut back into ``shapes`` (C, h, w) per map."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray | None, targets: Any, key: str,
                 lengths: np.ndarray | None = None, shapes: list[tuple[int, ...]] | None = None):
        self.data, self.offsets, self.targets, self.key, self.shapes = data, offsets, targets, key, shapes
        # the source's lengths: batches are drawn exactly as without the cache
        self.lengths = lengths
        self.field = "maps" if shapes else "hidden" if data.ndim > 2 or offsets is not None else "features"

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.offsets is not None else len(self.data)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        if self.shapes:
            flat = torch.tensor(self.data[idx]).float()
            sizes = [math.prod(s) for s in self.shapes]
            batch = {f"map{i}": part.reshape(len(idx), *shape).contiguous(memory_format=torch.channels_last)
                     for i, (part, shape) in enumerate(zip(flat.split(sizes, 1), self.shapes))}
            width = 0
        elif self.offsets is None:
            batch = {self.field: torch.tensor(self.data[idx]).float()}
            width = 0  # no token axis: the targets are one per example
        else:
            width = int(max(self.offsets[i + 1] - self.offsets[i] for i in idx))
            hidden = torch.zeros((len(idx), width, self.data.shape[1]))
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                a, b = self.offsets[i], self.offsets[i + 1]
                hidden[row, : b - a] = torch.tensor(self.data[a:b])
                mask[row, : b - a] = 1
            batch = {"hidden": hidden, "attention_mask": mask}
        if self.targets is not None:
            batch["labels"] = batch_targets(self.targets, idx, width)
            if self.shapes and batch["labels"].dtype == torch.uint8:  # masks are held a byte a pixel
                batch["labels"] = batch["labels"].long()
        return batch


def too_big(model: nn.Module, split: Split, examples: int, storage: str) -> str | None:
    """Why a cache of ``examples`` would not fit (None: it does). Only a dense head's maps are large
    (MobileNetV2 at 320 px: 435 KB an image in fp16); they may take at most half the free space of
    the cache folder's disk."""
    if split.kind != "maps":
        return None
    need = examples * sum(math.prod(s) for s in split.shapes) * (2 if storage == "fp16" else 4)
    folder = cache_dir()
    probe = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    if need <= free / 2:
        return None
    return (f"the maps of {examples} images would take {need / 2**30:.1f} GiB, more than half the "
            f"{free / 2**30:.1f} GiB free under {folder} (FMTUNE_CACHE_DIR)")


def cache_dir() -> Path:
    return fsutil.cache_dir()


def weights_digest(model: nn.Module) -> str:
    """Hash of the backbone's weights (tens of MB): computed once per run, shared by its splits."""
    h = hashlib.sha256()
    for name, t in model.backbone.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def content_key(digest: str, split: Split, ds: Any, pooling: str, how: str = "") -> str:
    h = hashlib.sha256(f"{VERSION}|{split}|{pooling}|{digest}|{how}".encode())
    if isinstance(ds, AudioData):  # the log-mel windows of every clip
        h.update(json.dumps(ds.spec.as_dict(), sort_keys=True).encode())
        for clip in ds.clips:
            h.update(b"".join(w.numpy().tobytes() for w in clip) + b"|")
    elif isinstance(ds, TextData):
        for ids in ds.input_ids:
            h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        for seg in ds.segments or ():  # pairs: their segment ids
            h.update(np.asarray(seg, dtype=np.int64).tobytes() + b"|")
    elif isinstance(ds.images, torch.Tensor):
        h.update(json.dumps(ds.spec, sort_keys=True).encode())
        h.update(ds.images.numpy().tobytes())
    else:  # lazily decoded images: their paths, sizes and modification times (embedded ones: their bytes)
        h.update(json.dumps(ds.spec, sort_keys=True).encode())
        for p in ds.images:
            if p in ds.stored:  # (a turned photo read as stored: other pixels)
                h.update(b"stored|")
            if isinstance(p, bytes):
                h.update(hashlib.sha256(p).digest())
                continue
            st = os.stat(p)
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def build(bundle: Any, split: Split, ds: Any, batch_size: int, progress: Any = None,
          digest: str | None = None, storage: str = "fp32",
          autocast: torch.dtype | None = None) -> tuple[CachedData, bool]:
    """Cached version of ``ds`` (computed now, or reused from disk). Returns it and whether it was reused.

    ``digest``: the backbone's ``weights_digest``, when the caller already has it. ``storage``:
    "fp32" or "fp16" (fp32 where a value is beyond fp16's range). ``autocast``: the dtype the
    prefix is computed in (the run's mixed precision), None for fp32.
    """
    if storage not in ("fp32", "fp16"):
        raise ValueError(f"cache storage must be fp32 or fp16, not {storage!r}")
    model = bundle.model
    how = f"{storage}|{autocast}"
    key = content_key(digest or weights_digest(model), split, ds, bundle.pooling, how)
    target = cache_dir() / key
    if not (target / "meta.json").is_file():
        _compute(model, split, ds, batch_size, target, progress, storage, autocast)
        reused = False
    else:
        reused = True
    data = np.load(target / "data.npy", mmap_mode="r")
    offsets = np.load(target / "offsets.npy") if (target / "offsets.npy").exists() else None
    return CachedData(data, offsets, ds.targets, key, getattr(ds, "lengths", None), list(split.shapes)), reused


@torch.no_grad()
def map_shapes(model: nn.Module, size: int) -> tuple[tuple[int, ...], ...]:
    """(C, h, w) of each map a dense head reads, for images of ``size`` pixels square."""
    was = model.backbone.training
    model.backbone.eval()
    try:
        x = torch.zeros((1, 3, size, size), device=model_device(model))
        return tuple(tuple(int(d) for d in m.shape[1:]) for m in model.backbone(x))
    finally:
        model.backbone.train(was)


class _BeyondFp16(Exception):
    pass


def _compute(model: nn.Module, split: Split, ds: Any, batch_size: int, target: Path, progress: Any,
             storage: str = "fp32", autocast: torch.dtype | None = None) -> None:
    """Run the prefix over ``ds`` and write it, batch by batch, into a memory-mapped array (the
    memory it needs is a batch, not the cache). fp16 storage that meets a value beyond fp16's
    range starts again in fp32."""
    started = time.perf_counter()

    def write(tmp: Path) -> None:
        try:
            stored, largest = _fill(model, split, ds, batch_size, tmp, progress,
                                    np.float16 if storage == "fp16" else np.float32, autocast)
        except _BeyondFp16:
            stored, largest = _fill(model, split, ds, batch_size, tmp, None, np.float32, autocast)
        (tmp / "meta.json").write_text(json.dumps({
            "split": str(split), "examples": len(ds), "seconds": round(time.perf_counter() - started, 3),
            "computed_in": str(autocast or torch.float32).removeprefix("torch."),
            "stored_as": np.dtype(stored).name, "largest_abs_value": largest}))

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(target, write)


def _fill(model: nn.Module, split: Split, ds: Any, batch_size: int, folder: Path, progress: Any,
          dtype: type, autocast: torch.dtype | None) -> tuple[type, float]:
    text = isinstance(ds, TextData) and split.kind in ("hidden", "tokens")  # ragged: rows of all examples, and offsets
    offsets = None
    if text:
        lengths = np.array([len(ids) for ids in ds.input_ids], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        np.save(folder / "offsets.npy", offsets)
    data = None
    largest = 0.0
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        batches = inference_batches(ds, memory.inference_batch(model, ds, batch_size, device), device.type)
        for idx, host in zip(batches, prefetch.batches(ds.collate, batches, hardware.loader_for(device.type))):
            batch = {k: v.to(device, non_blocking=True) for k, v in host.items()}
            batch.pop("labels", None)
            with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                out = _prefix(model, split, batch).float()
            largest = max(largest, float(out.abs().max()) if out.numel() else 0.0)
            if dtype == np.float16 and largest >= FP16_MAX:
                raise _BeyondFp16
            out = out.cpu().numpy()
            if data is None:
                shape = (int(offsets[-1]), out.shape[-1]) if text else (len(ds), *out.shape[1:])
                data = np.lib.format.open_memmap(folder / "data.npy", mode="w+", dtype=dtype, shape=shape)
            for row, i in enumerate(idx):
                if text:
                    data[offsets[i]: offsets[i + 1]] = out[row, : offsets[i + 1] - offsets[i]]
                else:
                    data[i] = out[row]
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
    if data is None:  # no examples
        np.save(folder / "data.npy", np.zeros((0,), dtype=dtype))
    else:
        data.flush()
        del data
    return dtype, largest
