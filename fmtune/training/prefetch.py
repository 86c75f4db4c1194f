"""Batches collated ahead, in background threads, while the model computes the current one.

Training, evaluation and the feature cache read their data through ``collate(idx)``: texts
padded per batch, images decoded (when too many to hold decoded) and normalised, cached features
gathered, augmentations applied. Done inline, every step waits for it. Here the next batches are
collated by a small thread pool while the model computes (tokenisers, PIL and numpy release the
GIL). Collation is a pure function of the indices (augmentations are seeded per batch), so the
batches and their order are exactly those of the inline loop; an error in one is raised when the
loop reaches that batch. On CUDA the batches are put in pinned memory, so the copy to the GPU
runs asynchronously.

Who gets threads is ``hardware.loader_for``'s choice: a GPU does; a CPU collates inline by
default, as a thread there competes with the compute threads (measured slower on 2 cores).

Threads rather than DataLoader worker processes: the datasets are already in memory (or a
memory map) in this process; worker processes would copy or re-open them and pickle every
batch back.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Loader:
    workers: int  # background collating threads; 0 = inline
    pin: bool  # pinned (page-locked) memory for asynchronous copies to a GPU

    def describe(self) -> str:
        if not self.workers:
            return "batches collated inline"
        return (f"batches collated ahead by {self.workers} background thread{'s' * (self.workers > 1)}"
                f"{', pinned memory' if self.pin else ''}")


INLINE = Loader(0, False)


def batches(collate: Callable[[Any], dict[str, torch.Tensor]], indices: Iterable[Any],
            loader: Loader = INLINE) -> Iterator[dict[str, torch.Tensor]]:
    """``collate(idx)`` for each ``idx`` in order, computed up to ``2 * workers`` batches ahead."""
    if not loader.workers or (isinstance(indices, list) and len(indices) <= 1):  # nothing to overlap
        for idx in indices:
            yield collate(idx)
        return

    def work(idx: Any) -> dict[str, torch.Tensor]:
        batch = collate(idx)
        return {k: v.pin_memory() for k, v in batch.items()} if loader.pin else batch

    pool = ThreadPoolExecutor(loader.workers, thread_name_prefix="fmtune-collate")
    todo = iter(indices)
    ahead = collections.deque(pool.submit(work, idx) for idx in itertools.islice(todo, 2 * loader.workers))
    try:
        while ahead:
            batch = ahead.popleft().result()
            for idx in itertools.islice(todo, 1):
                ahead.append(pool.submit(work, idx))
            yield batch
    finally:  # the loop stopped (end, Ctrl-C, an error): batches not started are dropped
        pool.shutdown(wait=False, cancel_futures=True)
