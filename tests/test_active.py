"""Active learning (issue 20): uncertainty and diversity rankings, fmtune select on a run, and the
simulation of the whole loop with labels hidden."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import cfg_dict, make_text_rows

import fmtune
from fmtune import active
from fmtune import config as config_mod
from fmtune.errors import ConfigError, DataError


def test_uncertainty_orders_by_entropy_and_margin():
    probs = np.array([[0.98, 0.01, 0.01], [0.5, 0.45, 0.05], [0.34, 0.33, 0.33], [0.6, 0.2, 0.2]])
    assert active.rank("entropy", np.zeros((4, 2)), probs, 4, None)[0] == 2  # flattest first
    assert active.rank("margin", np.zeros((4, 2)), probs, 4, None) == [2, 1, 3, 0]  # gaps .01, .05, .4, .97
    assert active.rank("entropy", np.zeros((4, 2)), probs, 4, None)[-1] == 0  # the sure one last


def test_kcenter_picks_far_rows_and_skips_what_is_labelled():
    emb = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [-1, 0.05]], dtype=float)
    # labelled rows sit near (1, 0): the farthest row from them first, then the far side of the rest
    picks = active.kcenter(emb, 3, centres=np.array([[1.0, 0.0]]))
    assert picks[0] == 4 and set(picks[1:]) & {2, 3} and len(set(picks)) == 3
    # mix: only the uncertain shortlist is considered
    probs = np.array([[0.99, 0.01], [0.5, 0.5], [0.99, 0.01], [0.55, 0.45], [0.99, 0.01]])
    assert set(active.rank("mix", emb, probs, 1, np.array([[1.0, 0.0]]))) <= {1, 3, 0}
    with pytest.raises(ConfigError, match="not one of"):
        active.rank("greedy", emb, probs, 1, None)


@pytest.fixture(scope="module")
def small_run(tiny_st_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("active")
    make_text_rows(80, 0).to_csv(d / "train.csv", index=False)
    fmtune.train(cfg_dict(tiny_st_bert, d / "train.csv", out=str(d / "run")), quiet=True, report=False)
    return d


def test_select_writes_the_rows_to_label(small_run, tmp_path):
    pool = make_text_rows(60, 7).drop(columns="label")
    pool["id"] = range(len(pool))
    pool.to_csv(tmp_path / "pool.csv", index=False)
    out = tmp_path / "next.csv"
    for strategy in ("mix", "entropy", "kcenter", "random"):
        picked = active.select(small_run / "run", tmp_path / "pool.csv", 10, strategy=strategy, output=out,
                               quiet=True)
        written = pd.read_csv(out)
        assert len(written) == 10 and written["select_rank"].tolist() == list(range(1, 11))
        assert written["id"].nunique() == 10 and set(written["id"]) <= set(range(60))  # the pool's own rows
        assert "label" in written.columns and written["label"].isna().all()  # to fill in
        assert set(written["predicted"]) <= {"neg", "pos"}
        assert picked["id"].astype(int).tolist() == written["id"].tolist()  # (the reader keeps cells as text)
    entropy = active.select(small_run / "run", tmp_path / "pool.csv", 60, strategy="entropy", quiet=True)
    assert entropy["select_score"].is_monotonic_decreasing  # most uncertain first


def test_select_bad_input(small_run, tmp_path):
    pd.DataFrame({"sentence": ["a"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(DataError, match="sentence"):
        active.select(small_run / "run", tmp_path / "p.csv", 5, quiet=True)
    pd.DataFrame({"text": ["good film", None]}).to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(DataError, match=r"e\.csv.*3.*no text in column 'text'"):  # file line 3
        active.select(small_run / "run", tmp_path / "e.csv", 5, quiet=True)


def test_simulate_the_loop(tiny_st_bert, tmp_path):
    make_text_rows(120, 3).to_csv(tmp_path / "pool.csv", index=False)
    make_text_rows(40, 4).to_csv(tmp_path / "test.csv", index=False)
    cfg = config_mod.from_dict(cfg_dict(tiny_st_bert, tmp_path / "pool.csv"))
    res = active.simulate(cfg, tmp_path / "pool.csv", tmp_path / "test.csv", tmp_path / "al", start=4, step=8,
                          rounds=2, strategies=("random", "mix"), quiet=True)
    for strategy in ("random", "mix"):
        assert [p["labels"] for p in res["curves"][strategy]] == [8, 16, 24]
        assert all(0 <= p["accuracy"] <= 1 for p in res["curves"][strategy])
        rounds = [pd.read_csv(tmp_path / "al" / "data" / f"{strategy}-round-{r}.csv") for r in range(3)]
        assert rounds[0]["text"].isin(rounds[1]["text"]).all()  # labels only grow
        assert not rounds[2].duplicated().any()
    saved = json.loads((tmp_path / "al" / "active.json").read_text())
    assert saved["curves"] == res["curves"]
    assert (tmp_path / "al" / "active.png").stat().st_size > 1000
    assert len(pd.read_csv(tmp_path / "al" / "active.csv")) == 6
