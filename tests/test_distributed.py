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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_bert, text_files):
    cfg = cfg_dict(tiny_bert, text_files["train"], data={"val": str(text_files["test"])},
                   train={"epochs": 3, "batch_size": 16, "head_lr": 3e-3})
    one = tmp_path_factory.mktemp("one-process") / "one"
    fmtune.train({**cfg, "out": str(one)}, quiet=True, report=False)
    return cfg, one


def _train_two(cfg: dict, tmp_path, mode: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({**cfg, "train": {**cfg["train"], "distributed": mode}}))
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fmtune", "train", str(path), "--out", str(two), "--num-processes", "2",
           "--no-report", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr  # every rank left its process group before exiting
    return two


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, one_process):
    """The same run in 2 processes, DDP and FSDP."""
    return {mode: _train_two(one_process[0], tmp_path_factory.mktemp(mode), mode) for mode in ("ddp", "fsdp")}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(one_process, two_processes, text_files, mode):
    _, one = one_process
    two = two_processes[mode]
    info = json.loads((two / "run.json").read_text())["fit"]
    # FSDP: each rank holds a shard of every weight; in sync by construction, nothing to compare
    dist = info.pop("distributed")
    held = dist.pop("weights_per_rank_mib")
    assert dist == {"processes": 2, "mode": mode, "params_in_sync": True if mode == "ddp" else None}
    whole = json.loads((one / "run.json").read_text())["params"]["total_params"] * 4 / 2**20  # fp32
    assert held == pytest.approx(whole if mode == "ddp" else whole / 2, rel=0.02)  # FSDP: half the weights each
    assert info["steps"] == json.loads((one / "run.json").read_text())["fit"]["steps"]  # same global batches
    assert sorted(p.name for p in two.parent.iterdir()) == ["cfg.yaml", "two"]  # one run directory
    a, b = _evals(one), _evals(two)
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):  # the same data and global batch; only dropout masks and summation order differ
        assert abs(x["accuracy"] - y["accuracy"]) <= 0.1 and abs(x["loss"] - y["loss"]) <= 0.15
    # validation was sharded and gathered: the recorded best is exactly what one process measures
    res = fmtune.evaluate(two, text_files["test"], quiet=True)
    best = max(e["accuracy"] for e in b)
    assert res["test"]["accuracy"] == pytest.approx(best, abs=1e-9)


def test_a_refused_run_directory_stops_every_rank_with_one_message(two_processes):
    """Rank 0 refuses to overwrite a run; the other rank stops with it instead of waiting on a
    broadcast that never comes (it printed gloo's "Connection closed by peer" traceback)."""
    run = two_processes["ddp"]
    cmd = [sys.executable, "-m", "fmtune", "train", str(run.parent / "cfg.yaml"), "--out", str(run),
           "--num-processes", "2", "--no-report", "-q"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=run.parent)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert out.count("already exists") == 1, out[-3000:]
    assert "[rank1]" not in out and "Connection closed" not in out, out[-3000:]


def test_fsdp_computes_what_ddp_computes(two_processes):
    """Sharding changes where the weights live, not the arithmetic: the same losses step by step."""
    losses = {mode: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
                     if '"train"' in x] for mode, run in two_processes.items()}
    assert len(losses["ddp"]) == len(losses["fsdp"]) > 5
    assert losses["ddp"] == pytest.approx(losses["fsdp"], abs=1e-5)


def test_shards_cover_a_batch_once():
    idx = [5, 3, 9, 1, 7]
    parts = [shard(idx, r, 2) for r in range(2)]
    assert parts == [[5, 3, 9], [1, 7]]
    assert sorted(parts[0] + parts[1]) == sorted(idx)


def test_every_rank_runs_as_many_forward_passes_when_validation_is_gathered(monkeypatch):
    # FSDP's forward is collective: a rank that ran one batch more would hang the others. The CPU's padding
    # cut (dataset.inference_batches) makes the count depend on the lengths, so gathered_infer turns it off.
    from types import SimpleNamespace

    import numpy as np
    import torch

    from fmtune.data import dataset
    from fmtune.training.distributed import gathered_infer

    monkeypatch.setattr(dataset, "INFER_MIN_TOKENS", 0)
    ids = [[1] * 5] * 8 + [[1] * n for n in (5, 9, 17, 30, 44, 61, 80, 100)]  # rank 0 one length, rank 1 spread
    ds = dataset.TextData(ids, torch.zeros(len(ids), dtype=torch.long), 0)
    assert len(dataset.inference_batches(dataset.Rows(ds, np.arange(8, 16)), 4, "cpu")) > 2  # cut, alone

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.calls = 0

        def forward(self, input_ids, attention_mask=None, **_):
            self.calls += 1
            return SimpleNamespace(logits=attention_mask.sum(1, keepdim=True).float() * self.w)

    calls = []
    for rank in (0, 1):
        net = Net()
        acc = SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu"),
                              gather=lambda t: torch.cat([t, t]))
        gathered_infer(net, ds, 4, torch.device("cpu"), acc)
        calls.append(net.calls)
    assert calls == [2, 2]


def test_gathered_outputs_of_a_fixed_size_need_no_lengths(monkeypatch):
    """A detector's outputs are 3-D (images x queries x scores) but its data has no token lengths: gathered
    as they are (a launched detection run failed on ``int(np.max(None))``)."""
    from types import SimpleNamespace

    import torch

    from fmtune.training import distributed

    class Boxes:
        lengths, targets = None, None

        def __len__(self):
            return 5

    monkeypatch.setattr(distributed, "infer", lambda model, rows, *a, **k: (
        torch.as_tensor(rows.keep, dtype=torch.float)[:, None, None].expand(-1, 4, 7), None))
    rank1 = SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"),
                            gather=lambda t: torch.cat([torch.zeros_like(t), t]))  # rank 0 sent zeros
    out = distributed.gathered_infer(None, Boxes(), 4, torch.device("cpu"), rank1)[0]
    assert out.shape == (3 + 2, 4, 7)  # rank 0's 3 images, rank 1's 2 (padded to 3 for the gather), each once
    assert out[3:, 0, 0].tolist() == [3.0, 4.0]  # rank 1's own, in order


def test_finish_leaves_the_process_group_once(tmp_path):
    import torch.distributed as td

    from fmtune.training.distributed import finish

    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert td.is_initialized()
    finish()
    assert not td.is_initialized()
    finish()  # the atexit call after an explicit one is a no-op


def test_launcher_drops_only_its_own_flags():
    argv = ["train", "c.yaml", "--num-processes", "2", "--out", "r", "--main-process-port=1234", "-q"]
    assert _without_dist_flags(argv) == ["train", "c.yaml", "--out", "r", "-q"]


@pytest.mark.slow  # a minute of two processes; CI runs it (make test-slow)
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_stop_together_on_ctrl_c_and_resume(tmp_path, tiny_bert, mode):
    """Ctrl-C in a terminal reaches torchrun and both ranks: they stop at the same step (rank 0
    decides), rank 0 saves, and `--resume --num-processes 2` finishes the run."""
    import signal
    import time

    from conftest import make_text_rows

    data = tmp_path / "train.csv"
    make_text_rows(600, seed=3).to_csv(data, index=False)
    cfg = cfg_dict(tiny_bert, data, train={"epochs": 2, "batch_size": 8, "eval_every": 10, "log_every": 1,
                                           "save_every_minutes": 100, "distributed": mode})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fmtune", "train", str(path), "--out", str(run), "-q",
                             "--num-processes", "2", "--no-report"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log, sent, deadline = run / "metrics.jsonl", False, time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines() if log.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1]).get("step", 0) >= 15:
            os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
            sent = True
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    assert sent, "the run finished before it could be stopped"
    state = json.loads((run / "state" / "trainer.json").read_text())
    assert state["step"] >= 15 and not state["done"], err[-2000:]
    res = subprocess.run([sys.executable, "-m", "fmtune", "train", "--resume", str(run), "--num-processes", "2",
                          "-q", "--no-report"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "terminate called" not in res.stderr
    fit = json.loads((run / "run.json").read_text())["fit"]
    assert fit["distributed"]["params_in_sync"] is (True if mode == "ddp" else None)
    assert fit["steps"] == 2 * 68  # 540 training rows / 8, 2 epochs
    assert json.loads((run / "state" / "trainer.json").read_text())["done"]
    import torch

    assert torch.load(run / "state" / "optim.pt", weights_only=True)["fsdp"] is (mode == "fsdp")
    # the run's model is whole, however it was trained: it loads and scores like any run
    assert fmtune.evaluate(run, data, quiet=True)["test"]["accuracy"] > 0.5


@pytest.mark.parametrize("world", [None, "2"])
def test_a_launched_rank_ends_without_interpreter_shutdown(tmp_path, world):
    """A rank of a launched run ends with os._exit once its command is done (its streams flushed,
    its exit code kept): tearing FSDP's still-referenced gloo group down in interpreter shutdown
    aborted ranks that had finished. A plain process shuts down as usual."""
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('interpreter shutdown ran', flush=True))\n"
              "from fmtune.cli import main\n"
              f"sys.exit(main(['predict', {str(tmp_path / 'no-run')!r}, 'x.csv']))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if world:
        env.update(WORLD_SIZE=world, RANK="1", LOCAL_RANK="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no-run does not exist" in proc.stderr  # the error was printed before the process ended
    assert ("interpreter shutdown ran" in proc.stdout) == (world is None)


@pytest.fixture(scope="module")
def layerdrop_wav2vec2(tmp_path_factory):
    """A tiny group-norm wav2vec2 that drops each layer half the time in training."""
    from conftest import save_tiny_wav2vec2

    folder = save_tiny_wav2vec2(tmp_path_factory.mktemp("w2v-layerdrop"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layerdrop": 0.5}))
    return folder


def test_layerdrop_is_off_in_the_modules_while_the_config_keeps_it(layerdrop_wav2vec2):
    from transformers import AutoModel

    from fmtune.training.distributed import same_layers

    model = AutoModel.from_pretrained(layerdrop_wav2vec2)
    with same_layers(model) as off:
        assert off == {"layerdrop": 0.5}
        assert model.encoder.config.layerdrop == 0.0  # what the encoder reads in its forward
        assert model.config.layerdrop == 0.5  # what a checkpoint saves
    assert model.encoder.config is model.config and model.encoder.config.layerdrop == 0.5


def test_several_processes_train_a_layerdrop_model(layerdrop_wav2vec2, tmp_path):
    """Each rank drew its own layers to skip and the ranks waited on each other for good (wav2vec2-base's
    layerdrop 0.1 hung DDP and FSDP)."""
    from test_audio import tone_splits

    tones = tone_splits(tmp_path / "tones")
    cfg = cfg_dict(layerdrop_wav2vec2, tones["train"], task={"type": "audio-classification"},
                   data={"test": str(tones["test"])}, train={"epochs": 4, "batch_size": 8, "distributed": "ddp"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "fmtune", "train", str(tmp_path / "cfg.yaml"), "--out",
                           str(tmp_path / "run"), "--num-processes", "2", "--no-report", "-q"],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LayerDrop off while 2 processes train (layerdrop 0.5)" in proc.stderr
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["layerdrop"] == 0.5
    assert "accuracy" in json.loads((tmp_path / "run" / "eval.json").read_text())["test"]


def test_fsdp_refuses_an_encoder_that_reads_clips_in_groups(layerdrop_wav2vec2):
    """FSDP needs every rank to run each unit as often; a group-norm wav2vec2 reads a batch's clips in groups
    of equal length, a count that differs between ranks (2-process FSDP hung)."""
    from transformers import AutoModel

    from fmtune.errors import ConfigError
    from fmtune.training import fsdp

    with pytest.raises(ConfigError, match="a wav2vec2 model reads each batch's clips in groups.*distributed=ddp"):
        fsdp.shard(AutoModel.from_pretrained(layerdrop_wav2vec2))
