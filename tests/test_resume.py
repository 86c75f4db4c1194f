"""A run killed with SIGKILL mid-epoch and resumed ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import cfg_dict, make_text_rows
from safetensors.torch import load_file


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fmtune", *args]


def _interrupt_and_resume(tmp_path, model, strategy: str, sig: int, train: dict) -> dict:
    """Train once uninterrupted and once stopped by ``sig`` at step >= 45 then resumed; compare."""
    data = tmp_path / "train.csv"
    make_text_rows(1200, seed=5).to_csv(data, index=False)
    cfg = cfg_dict(model, data, strategy={"name": strategy, "n": 1},
                   train={"epochs": 2, "batch_size": 4, "eval_every": 20, "patience": 2, "lr": 5e-4, "log_every": 1,
                          **train})
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    ref = tmp_path / "ref"
    subprocess.run(_cli("train", str(cfg_file), "--out", str(ref), "-q"), check=True, env=env, timeout=300)

    run = tmp_path / "stopped"
    proc = subprocess.Popen(_cli("train", str(cfg_file), "--out", str(run), "-q"), env=env,
                            stderr=subprocess.PIPE, text=True)
    state, log = run / "state" / "trainer.json", run / "metrics.jsonl"
    sent = False
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines() if log.exists() else []
        if lines and lines[-1].endswith("}") and json.loads(lines[-1]).get("step", 0) >= 45:
            os.kill(proc.pid, sig)  # a train step after the evaluation at step 40
            sent = True
            break
        time.sleep(0.005)
    _, stderr = proc.communicate(timeout=60)
    assert sent, "the run finished before it could be stopped"
    last = json.loads(state.read_text())
    # stopped in the first epoch (270 batches per epoch), after it had passed an evaluation
    assert last["epoch"] == 0 and 0 < last["batch_in_epoch"] < 270 and not last["done"]
    assert last["history"], "the checkpoint should carry the evaluation history (early-stopping state)"

    subprocess.run(_cli("train", "--resume", str(run), "-q"), check=True, env=env, timeout=300)

    def evals(d):
        lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in x.items() if k not in ("seconds", "eval_seconds")} for x in lines
                if x["type"] == "eval"]

    assert evals(run) == evals(ref)
    files = sorted(f.name for f in (ref / "model").glob("*.safetensors"))  # the model, or the adapter
    assert files and files == sorted(f.name for f in (run / "model").glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(ref / "model" / name)), load_file(str(run / "model" / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert json.loads((run / "state" / "trainer.json").read_text())["done"]
    return {"returncode": proc.returncode, "stderr": stderr, "stopped_state": last}


SLOW = pytest.mark.slow  # the same machinery; CI runs them (make test-slow)


# the default suite kills a full, a head and a LoRA run; the other strategies run with the slow tests (CI)
# lora runs by default (a periodic resume point of an adapter run); full and head are also covered by
# default through the Ctrl-C test (full) and the solved-head test (head)
@pytest.mark.parametrize("strategy", [pytest.param("full", marks=SLOW), pytest.param("last_n", marks=SLOW),
                                      pytest.param("head", marks=SLOW), "lora",
                                      pytest.param("prompt", marks=SLOW), pytest.param("dora", marks=SLOW),
                                      pytest.param("ia3", marks=SLOW), pytest.param("bitfit", marks=SLOW)])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, tiny_bert, strategy):
    # a fresh head: a solved one (the default) is the best at step 0 and stops early with patience 2
    extra = {"head_init": "random"} if strategy == "head" else {}
    out = _interrupt_and_resume(tmp_path, tiny_bert, strategy, signal.SIGKILL, {"save_every_steps": 7, **extra})
    assert out["returncode"] == -signal.SIGKILL


def test_solved_head_killed_and_resumed_matches_uninterrupted(tmp_path, tiny_bert):
    """The head solved from the probe and validated at step 0: the step-0 evaluation is in the
    resume point's history, and the resumed run ends exactly as the uninterrupted one."""
    out = _interrupt_and_resume(tmp_path, tiny_bert, "head", signal.SIGKILL, {"save_every_steps": 7, "patience": None})
    assert out["stopped_state"]["history"][0]["step"] == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=SLOW)])  # Ctrl-C; preemption
def test_ctrl_c_saves_a_resume_point_that_continues_exactly(tmp_path, tiny_bert, sig):
    # no periodic checkpoints: what resumes is what the signal saved (or the evaluation at step 40)
    out = _interrupt_and_resume(tmp_path, tiny_bert, "full", sig, {"save_every_minutes": 100})
    assert out["returncode"] == 130
    assert "continue with  fmtune train --resume" in out["stderr"] and "Traceback" not in out["stderr"]
    # saved by Ctrl-C itself: past the last evaluation (step 40), the only other checkpoint
    assert out["stopped_state"]["step"] >= 45


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, tiny_bert, text_files):
    from fmtune.api import train
    from fmtune.errors import RunDirError

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg_dict(tiny_bert, text_files["train"])))
    with pytest.raises(RunDirError, match="no resume checkpoint"):
        train(None, resume=run, quiet=True)
    with pytest.raises(RunDirError, match="does not exist"):
        train(None, resume=tmp_path / "missing", quiet=True)


def test_head_like_runs_write_the_best_model_once(tmp_path, tiny_st_bert, text_files, monkeypatch):
    """A head run keeps its best weights in memory (and in each resume point) and writes model/
    once at the end; what it writes is the best evaluation's model, not the last one."""
    import fmtune
    from fmtune.models import build

    writes = []
    real = build.save
    monkeypatch.setattr(build, "save", lambda bundle, target: (writes.append(target), real(bundle, target)))
    run = tmp_path / "run"
    cfg = cfg_dict(tiny_st_bert, text_files["train"], out=str(run), strategy={"name": "head"},  # mean pooling
                   data={"val": str(text_files["test"])}, train={"epochs": 6, "lr": 3e-3, "metric": "loss",
                                                                 "head_init": "random"})
    fmtune.train(cfg, quiet=True, report=False)
    assert writes == [run / "model"]
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 6 and sum(1 for e in evals if e.get("best")) >= 2, [(e["loss"], e.get("best")) for e in evals]
    assert (run / "state" / "best.safetensors").is_file()
    best = min(evals, key=lambda e: e["loss"])
    assert fmtune.evaluate(run, text_files["test"], quiet=True)["test"]["accuracy"] == pytest.approx(
        best["accuracy"], abs=1e-9)
