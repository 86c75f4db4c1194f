"""Two CPU processes (gloo) train like one process with the same global batch; rank 0 alone writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import cfg_dict

import fmtune
from fmtune.cli import _without_dist_flags
from fmtune.training.distributed import shard


def _evals(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]


def test_two_processes_match_one(tmp_path, tiny_bert, text_files):
    cfg = cfg_dict(tiny_bert, text_files["train"], data={"val": str(text_files["test"])},
                   train={"epochs": 3, "batch_size": 16, "head_lr": 3e-3})
    cfg.pop("out", None)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    one = tmp_path / "one"
    fmtune.train({**cfg, "out": str(one)}, quiet=True, report=False)
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fmtune", "train", str(path), "--out", str(two), "--num-processes", "2",
           "--no-report", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())["fit"]
    assert info["distributed"] == {"processes": 2, "params_in_sync": True}
    assert info["steps"] == json.loads((one / "run.json").read_text())["fit"]["steps"]  # same global batches
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml", "one", "two"]  # one run directory each
    a, b = _evals(one), _evals(two)
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):  # the same data and global batch; only dropout masks and summation order differ
        assert abs(x["accuracy"] - y["accuracy"]) <= 0.1 and abs(x["loss"] - y["loss"]) <= 0.15
    # validation was sharded and gathered: the recorded best is exactly what one process measures
    res = fmtune.evaluate(two, text_files["test"], quiet=True)
    best = max(e["accuracy"] for e in b)
    assert res["test"]["accuracy"] == pytest.approx(best, abs=1e-9)


def test_shards_cover_a_batch_once():
    idx = [5, 3, 9, 1, 7]
    parts = [shard(idx, r, 2) for r in range(2)]
    assert parts == [[5, 3, 9], [1, 7]]
    assert sorted(parts[0] + parts[1]) == sorted(idx)


def test_launcher_drops_only_its_own_flags():
    argv = ["train", "c.yaml", "--num-processes", "2", "--out", "r", "--main-process-port=1234", "-q"]
    assert _without_dist_flags(argv) == ["train", "c.yaml", "--out", "r", "-q"]
