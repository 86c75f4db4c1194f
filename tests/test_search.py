"""fmtune search: optuna over the config's search space; resumable; several workers share one study."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import cfg_dict

from fmtune import config as config_mod
from fmtune.errors import ConfigError
from fmtune.search import search

SPACE = {"train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
         "strategy.name": {"type": "categorical", "choices": ["head", "full"]}}


def _config(tmp_path, tiny_bert, text_files, **extra):
    cfg = cfg_dict(tiny_bert, text_files["train"], data={"val": str(text_files["test"])},
                   train={"epochs": 2, "lr": None}, **extra)
    cfg["train"].pop("lr")
    cfg["search"] = SPACE
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_search_writes_best_config_trials_and_plots(tmp_path, tiny_bert, text_files):
    path = _config(tmp_path, tiny_bert, text_files)
    res = search(path, trials=4, out=tmp_path / "study", seed=0, quiet=True)
    folder = tmp_path / "study"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 4 == res["trials"] and res["complete"] >= 2
    best = config_mod.load(folder / "best.yaml")
    assert best.train.lr == pytest.approx(res["best_params"]["train.lr"])
    assert best.strategy.name == res["best_params"]["strategy.name"]
    assert res["best_value"] == trials["value"].max()
    assert (folder / "history.png").is_file() and (folder / "study.db").is_file()
    # rerunning continues the study from its database
    again = search(path, trials=5, out=folder, quiet=True)
    assert again["trials"] == 5 and len(list((folder / "trials").iterdir())) == 5


def test_two_workers_share_one_study(tmp_path, tiny_bert, text_files):
    path = _config(tmp_path, tiny_bert, text_files)
    folder = tmp_path / "shared"
    cmd = [sys.executable, "-m", "fmtune", "search", str(path), "--trials", "6", "-o", str(folder), "-q",
           "--pruner", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    import optuna

    study = optuna.load_study(study_name="space", storage=f"sqlite:///{folder / 'study.db'}")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 6 <= len(numbers) <= 7  # none lost; at most one extra in flight
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    dirs = sorted(p.name for p in (folder / "trials").iterdir())
    assert dirs == [f"trial-{n:04d}" for n in sorted(numbers)]
    for n in numbers:  # each trial's run is complete and its own
        assert (folder / "trials" / f"trial-{n:04d}" / "run.json").is_file()


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
import optuna, sqlalchemy  # imported before the start line, so the processes meet there
from fmtune.search import open_study
ready, go = Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.001)
open_study(None, Path(sys.argv[1]), "s", direction="maximize")
"""


def test_workers_starting_at_the_same_moment_create_the_study_once(tmp_path):
    # Without the lock, 4 processes opening a new SQLite study at once failed most of the time
    # ("table studies already exists", a duplicate alembic_version row): 21 of 32 processes in 8 rounds.
    folder = tmp_path / "s"
    folder.mkdir()
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(folder), str(tmp_path / f"ready{i}"), str(go)],
                              stderr=subprocess.PIPE, text=True) for i in range(4)]
    while not all((tmp_path / f"ready{i}").exists() for i in range(4)):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-1500:] for p in procs if p.poll()]
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    import optuna

    assert optuna.get_all_study_names(f"sqlite:///{folder / 'study.db'}") == ["s"]


def test_bad_spaces_are_clear_errors(tmp_path, tiny_bert, text_files):
    base = cfg_dict(tiny_bert, text_files["train"])
    for space, match in (({}, "no search: section"),
                         ({"train.learning_rate": {"type": "float", "low": 1, "high": 2}}, "not a setting"),
                         ({"train.lr": {"type": "float", "low": 1e-3, "high": 1e-5}}, "above high"),
                         ({"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale needs low > 0"),
                         ({"strategy.name": {"type": "categorical"}}, "non-empty list of choices"),
                         ({"train.lr": {"type": "uniform", "low": 0, "high": 1}}, "expected {type")):
        with pytest.raises(ConfigError, match=match):
            search({**base, "search": space}, trials=1, out=tmp_path / "x", quiet=True)


def test_a_trial_whose_settings_clash_fails_alone(tmp_path, tiny_bert, text_files):
    cfg = cfg_dict(tiny_bert, text_files["train"], strategy={"name": "lora"})
    cfg["search"] = {"strategy.targets": {"type": "categorical", "choices": ["no_such_module"]}}
    res = search(cfg, trials=2, out=tmp_path / "s", quiet=True)
    assert res["trials"] == 2 and res["complete"] == 0 and res["note"] == "no trial completed"
    trials = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert list(trials["state"]) == ["FAIL", "FAIL"]
    assert trials["user_attrs_error"].str.contains("no_such_module").all()


def test_a_searched_batch_size_is_the_one_each_trial_trains():
    from fmtune.search import trial_config

    base = {"train": {"epochs": 1}}
    assert trial_config(base, {"train.batch_size": 16}, None).train.min_steps is None  # not lowered for small data
    assert trial_config(base, {"train.lr": 1e-4}, None).train.min_steps == config_mod.MIN_STEPS
    kept = trial_config({"train": {"min_steps": 50}}, {"train.batch_size": 16}, None).train
    assert (kept.min_steps, kept.batch_size) == (50, 16)  # the user's own setting stands
