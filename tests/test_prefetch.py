"""Batches collated ahead in background threads: the same batches, in order, errors where they occur."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from fmtune.config import TrainConfig
from fmtune.errors import ConfigError
from fmtune.training import hardware, prefetch


def collate(idx):
    time.sleep(0.002 * (idx[0] % 3))  # batches finish out of order
    if idx[0] == 13:
        raise ValueError("row 13 is unreadable")
    return {"x": torch.tensor(idx, dtype=torch.float32)}


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_come_in_order_and_match_inline_collation(workers):
    indices = [[i, i + 100] for i in range(12)]
    got = list(prefetch.batches(collate, indices, prefetch.Loader(workers, False)))
    assert [b["x"].tolist() for b in got] == [[float(i), float(i + 100)] for i in range(12)]


def test_an_error_is_raised_at_its_batch_and_the_threads_end():
    before = {t.name for t in threading.enumerate()}
    seen = []
    with pytest.raises(ValueError, match="row 13"):
        for b in prefetch.batches(collate, [[i] for i in range(10, 20)], prefetch.Loader(2, False)):
            seen.append(int(b["x"][0]))
    assert seen == [10, 11, 12]  # everything before the bad batch was delivered
    feed = prefetch.batches(collate, [[i] for i in range(30)], prefetch.Loader(2, False))
    next(feed)
    feed.close()  # a loop that stops early (Ctrl-C, max_steps): the pool is shut down
    deadline = time.time() + 5
    while time.time() < deadline and any(t.name.startswith("fmtune-collate") and t.name not in before
                                         for t in threading.enumerate()):
        time.sleep(0.01)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("fmtune-collate") and t.name not in before]


def test_the_choice_follows_the_device_and_the_setting():
    assert hardware.loader_for("cpu") == prefetch.Loader(0, False)
    gpu = hardware.loader_for("cuda")
    assert 1 <= gpu.workers <= 4 and gpu.pin
    assert hardware.loader_for("cuda", 0) == prefetch.Loader(0, False)
    assert hardware.loader_for("cpu", 2).describe() == "batches collated ahead by 2 background threads"
    assert "collated" in hardware.choose("cpu", "fp32", 1).describe()
    with pytest.raises(ConfigError, match="train.loader_threads"):
        TrainConfig(loader_threads=-1)
