"""Batched forward passes in eval mode, results returned in the dataset's own order.

Outputs too large to hold (a segmenter's logits: classes x cells for every image; 150 classes at 128 x 128 cells are
10 MB an image) are written to a file-backed tensor on disk instead (``fsutil.output_tensor``), which the page cache
keeps in memory while it fits and evicts when it does not; their readers take them in chunks."""

from __future__ import annotations

from typing import Any

import torch

from fmtune.data.dataset import inference_batches
from fmtune.fsutil import output_tensor
from fmtune.training import hardware, memory, prefetch


def model_device(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _to(batch: dict[str, torch.Tensor], device: Any) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def infer(model: torch.nn.Module, ds: Any, batch_size: int, device: Any = None, features: bool = False,
          autocast_dtype: torch.dtype | None = None, progress: Any = None,
          loader: prefetch.Loader | None = None, padding_cut: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (or pooled features) for every example of ``ds``, plus its targets (or None).

    Batches are sorted by length (text) so padding is minimal (``inference_batches``); outputs are put back in order.
    ``device``: where the batches go; by default wherever the model's weights are. ``loader``:
    how batches are collated ahead (default: as ``hardware.loader_for`` chooses for the device).
    ``padding_cut=False``: as many batches as ``len(ds) / batch_size`` whatever the lengths (and the memory
    available: the ranks of a run must run as many). Otherwise fewer examples a batch where ``batch_size`` of the
    longest would not fit in memory (``memory.inference_batch``: 30-s clips for a wav2vec2).
    """
    device = device or model_device(model)
    model.eval()  # the caller puts it back in train mode (see strategies.set_train_mode)
    dev_type = torch.device(device).type
    if padding_cut:
        batch_size = memory.inference_batch(model, ds, batch_size, device)
    batches = inference_batches(ds, batch_size, dev_type, padding_cut)
    out: torch.Tensor | None = None
    loader = loader or hardware.loader_for(dev_type)
    for idx, host in zip(batches, prefetch.batches(ds.collate, batches, loader)):
        batch = _to(host, device)
        batch.pop("labels", None)
        with torch.autocast(dev_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            y = model.features(**batch) if features else model(**batch).logits
        y = y.float().cpu()
        if out is None:
            shape = list(y.shape[1:])
            if y.dim() == 3 and getattr(ds, "lengths", None) is not None:  # per token: to the longest example
                shape[0] = int(ds.lengths.max())
            out = output_tensor((len(ds), *shape), y.dtype)
        if y.dim() == 3:
            out[torch.as_tensor(idx), : y.shape[1]] = y
        else:
            out[torch.as_tensor(idx)] = y
        if progress is not None:
            progress(len(idx))
    if out is None:
        out = torch.empty((0,))
    return out, getattr(ds, "targets", None)
