"""Multi-label decision thresholds chosen on the validation rows (task.thresholds=auto): per label for
macro-F1, one for all for micro-F1 and exact match, saved with the run and used by everything that predicts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import cfg_dict

import fmtune
from fmtune.tasks.multilabel import choose_thresholds


def _scores(n: int, rate: float, lo: float, hi: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A label with positives scoring in [hi - 0.1, hi] and negatives in [lo, lo + 0.1]."""
    y = (rng.random(n) < rate).astype(int)
    return y, np.where(y == 1, rng.uniform(hi - 0.1, hi, n), rng.uniform(lo, lo + 0.1, n))


def test_thresholds_are_chosen_per_label_for_macro_f1_and_shared_for_the_others():
    rng = np.random.default_rng(0)
    ya, pa = _scores(400, 0.3, 0.05, 0.3, rng)  # cut anywhere in [0.15, 0.2]: 0.5 finds no positive
    yb, pb = _scores(400, 0.4, 0.55, 0.95, rng)  # cut anywhere in [0.65, 0.85]
    yc = np.zeros(400, int)
    yc[:3] = 1  # 3 positives: too few to choose by
    pc = np.full(400, 0.3)
    yd = (rng.random(400) < 0.3).astype(int)  # no skill: its best F1 is flagging every row
    pd_ = rng.uniform(0.0, 0.4, 400)
    y, p = np.stack([ya, yb, yc, yd], 1), np.stack([pa, pb, pc, pd_], 1)
    t = choose_thresholds(y, p, "macro_f1")
    assert 0.15 <= t[0] <= 0.2 and 0.65 <= t[1] <= 0.85, t
    assert t[2] == t[3] == 0.5  # too few rows; no better than every row: the fallback
    assert choose_thresholds(y, p, "macro_f1", fallback=0.4)[3] == 0.4
    from sklearn.metrics import f1_score

    assert f1_score(yd, pd_ > 0.05) > 0.4  # ... which an unguarded F1 search would have taken (0.05: every row)
    assert len(set(choose_thresholds(y, p, "micro_f1"))) == 1 and len(set(choose_thresholds(y, p, "accuracy"))) == 1
    # exact match (every label right) with one cut: under 0.55 flags b on its 60% negative rows, from 0.3 misses
    # a on its 30% positive ones, so from 0.3, and nearest 0.5 where b is right too: 0.65
    assert choose_thresholds(y[:, :2], p[:, :2], "accuracy")[0] == 0.65
    assert choose_thresholds(y, p, "loss") is None  # thresholds do not move the loss
    assert choose_thresholds(y[:, 2:3], p[:, 2:3], "macro_f1") is None  # no label with 5 positive and 5 negative rows


def test_ties_go_to_the_fallback_threshold():
    y = np.array([[1], [1], [1], [1], [1], [0], [0], [0], [0], [0]])
    p = np.array([[0.9], [0.9], [0.9], [0.9], [0.9], [0.1], [0.1], [0.1], [0.1], [0.1]])
    assert choose_thresholds(y, p, "macro_f1")[0] == 0.5  # every cut in [0.1, 0.9) is perfect
    assert choose_thresholds(y, p, "macro_f1", fallback=0.3)[0] == 0.3


def _ml_files(tmp_path, text_files):
    """multilabel rows whose `music` label is decided by the word at probability well under 0.5 after a short run."""
    df = pd.read_csv(text_files["multilabel_train"])
    train, val = df.iloc[:160], df.iloc[160:]
    paths = {}
    for name, part in (("train", train), ("val", val)):
        paths[name] = tmp_path / f"{name}.csv"
        part.to_csv(paths[name], index=False)
    return paths


def test_a_multilabel_run_chooses_its_thresholds_on_validation_and_predicts_with_them(tmp_path, tiny_st_bert,
                                                                                     text_files):
    files = _ml_files(tmp_path, text_files)
    test = text_files["multilabel_test"]
    cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / "run"), task={"type": "multilabel"},
                   data={"val": str(files["val"]), "test": str(test)}, train={"epochs": 1, "baseline": True})
    s = fmtune.train(cfg, quiet=True, report=False)
    cut = s["thresholds"]
    assert cut["chosen"] and cut["metric"] == "macro_f1" and cut["rows"] == len(pd.read_csv(files["val"]))
    assert cut["val_macro_f1"] >= cut["before"]["val_macro_f1"] and cut["before"]["threshold"] == 0.5
    assert s["best"] == cut["val_macro_f1"]
    # the checkpoint was chosen on the same thresholded metric: the validations of training read each
    # checkpoint at the thresholds it would get, so the best one's value is the one chosen for it after
    evals = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = [r for r in evals if r["type"] == "eval" and r.get("best")][-1]
    assert best["macro_f1"] == pytest.approx(cut["val_macro_f1"], abs=1e-6)
    assert cut["val_macro_f1"] > cut["before"]["val_macro_f1"]  # (so the line above tells the two apart)
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels["threshold"] == [cut["thresholds"][k] for k in labels["labels"]]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["thresholds"] == cut
    # predict, the test metrics and the baseline all decide with thresholds chosen on validation
    pred = fmtune.predict(tmp_path / "run", test, quiet=True)
    probs = pred[[f"prob_{k}" for k in labels["labels"]]].to_numpy(float)
    decided = probs > np.array(labels["threshold"])
    assert [set(str(c).split("|")) - {"nan", ""} for c in pred["labels"]] == \
        [{k for k, on in zip(labels["labels"], row) if on} for row in decided]
    # the service's /metadata says them
    assert fmtune.load(tmp_path / "run").metadata()["thresholds"] == pytest.approx(cut["thresholds"])
    truth = np.array([[k in str(c).split("|") for k in labels["labels"]] for c in pd.read_csv(test)["label"]])
    from sklearn.metrics import f1_score

    assert s["eval"]["test"]["macro_f1"] == pytest.approx(f1_score(truth, decided, average="macro", zero_division=0),
                                                          abs=1e-6)
    assert "decision thresholds chosen on the validation rows" in s["eval"]["baseline_method"]
    from fmtune.report import write_report

    assert "Decision thresholds chosen on" in write_report(tmp_path / "run").read_text()
    # an exported folder says them too (predict and serve read them from the run, whatever the backend)
    from fmtune.exporter import export

    exported = export(tmp_path / "run", format="hf", out=tmp_path / "exported", quiet=True)
    assert exported["label_thresholds"] == pytest.approx(dict(zip(labels["labels"], labels["threshold"])))
    assert json.loads((tmp_path / "exported" / "export.json").read_text())["label_thresholds"] == \
        exported["label_thresholds"]
    # fmtune evaluate --baseline chooses the probe's the same way
    again = fmtune.evaluate(tmp_path / "run", test, baseline=True, quiet=True)
    assert again["baseline"] == pytest.approx(s["eval"]["baseline"]) and again["test"] == pytest.approx(
        s["eval"]["test"])


def test_fixed_thresholds_and_runs_without_a_validation_split_keep_task_threshold(tmp_path, tiny_st_bert,
                                                                                  text_files):
    files = _ml_files(tmp_path, text_files)
    cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / "fixed"), task={"type": "multilabel",
                   "thresholds": "fixed", "threshold": 0.4}, data={"val": str(files["val"])}, train={"epochs": 1})
    s = fmtune.train(cfg, quiet=True, report=False)
    assert "thresholds" not in s
    assert json.loads((tmp_path / "fixed" / "labels.json").read_text())["threshold"] == 0.4
    few = tmp_path / "few.csv"
    pd.read_csv(files["train"]).iloc[:12].to_csv(few, index=False)  # too few rows for a validation split
    s = fmtune.train(cfg_dict(tiny_st_bert, few, out=str(tmp_path / "few"), task={"type": "multilabel"},
                              data={"min_val_per_class": 5}), quiet=True, report=False)
    assert s["few_labels"]["no_validation_split"]
    assert not s["thresholds"]["chosen"] and "no validation split" in s["thresholds"]["why"]
    assert json.loads((tmp_path / "few" / "labels.json").read_text())["threshold"] == 0.5
    from fmtune.report import write_report

    assert "Decision thresholds not chosen: no validation split" in write_report(tmp_path / "few").read_text()


def test_a_label_is_never_flagged_on_more_than_five_times_its_positive_rows():
    """F1 rewards flagging a weakly ranked rare label on most rows (once: 62% of tweets at 8% precision);
    the threshold chosen flags at most 5x as many validation rows as the label has positives."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(1)
    y = (rng.random(1000) < 0.05).astype(int)  # 5%: at most 25% of the rows may be flagged
    p = np.where(y == 1, rng.uniform(0.06, 0.14, 1000), rng.uniform(0.0, 0.3, 1000) ** 2 * 2)  # weakly ranked
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    free = max(grid, key=lambda t: f1_score(y, p > t, zero_division=0))
    assert free == 0.05 and (p > free).sum() > 5 * y.sum()  # what an unbounded F1 search takes: 46% of the rows
    # within the bound (0.15 and up) nothing beats flagging every row: the fallback
    assert choose_thresholds(y[:, None], p[:, None], "macro_f1")[0] == 0.5
    p[y == 1] += 0.1  # better ranked: a threshold within the bound
    t = choose_thresholds(y[:, None], p[:, None], "macro_f1")[0]
    assert t != 0.5 and (p > t).sum() <= 5 * y.sum(), t
