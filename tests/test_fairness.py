"""Fairness: per-group metrics with bootstrap intervals (checked against fairlearn), gaps, group
columns checked, re-weighing, per-group thresholds (fairlearn's ThresholdOptimizer) stored in the
run and applied by predict, counterfactuals, tabular rows as text, and the verb end to end."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import cfg_dict

import fmtune
from fmtune import fairness
from fmtune.config import DataConfig
from fmtune.data import tabular
from fmtune.errors import ConfigError, DataError


def _binary(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Groups with different base rates and a score that separates the labels imperfectly."""
    rng = np.random.default_rng(seed)
    g = rng.choice(["a", "b", "c"], size=n, p=[0.5, 0.35, 0.15])
    y = (rng.random(n) < np.select([g == "a", g == "b"], [0.45, 0.25], 0.1)).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(n), 0, 1)
    return g, y, (p > 0.5).astype(int), p


def _outcomes(y, pred, p):
    return {"kind": "labels", "true": y, "pred": pred, "proba": np.c_[1 - p, p]}


def test_group_metrics_and_gaps_match_fairlearn():
    from fairlearn.metrics import (
        MetricFrame,
        demographic_parity_difference,
        demographic_parity_ratio,
        equalized_odds_difference,
        false_positive_rate,
        selection_rate,
        true_positive_rate,
    )
    from sklearn.metrics import accuracy_score, f1_score

    g, y, pred, p = _binary()
    res = fairness.audit(_outcomes(y, pred, p), pd.DataFrame({"grp": g}), positive=1, n_boot=300)["grp"]
    mf = MetricFrame(metrics={"accuracy": accuracy_score, "selection_rate": selection_rate,
                              "tpr": true_positive_rate, "fpr": false_positive_rate,
                              "macro_f1": lambda a, b: f1_score(a, b, average="macro")},
                     y_true=y, y_pred=pred, sensitive_features=g)
    for row in res["groups"]:
        for m in ("accuracy", "selection_rate", "tpr", "fpr", "macro_f1"):
            assert row["metrics"][m]["value"] == pytest.approx(mf.by_group.loc[row["group"], m], abs=1e-6), m
            lo, hi = row["metrics"][m]["ci"]
            assert lo <= row["metrics"][m]["value"] <= hi and hi - lo > 0
    gaps = res["gaps"]
    assert gaps["demographic_parity_difference"]["value"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=g), abs=1e-6)
    assert gaps["demographic_parity_ratio"]["value"] == pytest.approx(
        demographic_parity_ratio(y, pred, sensitive_features=g), abs=1e-6)
    assert gaps["equalized_odds_difference"]["value"] == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=g), abs=1e-6)
    lo, hi = gaps["demographic_parity_difference"]["ci"]
    assert lo < gaps["demographic_parity_difference"]["value"] < hi


def test_intervals_narrow_with_more_data_and_small_groups_are_flagged_not_judged():
    g, y, pred, p = _binary(20000, seed=1)
    widths = []
    for n in (500, 20000):
        r = fairness.audit(_outcomes(y[:n], pred[:n], p[:n]), pd.DataFrame({"grp": g[:n]}), positive=1, n_boot=400)
        lo, hi = r["grp"]["groups"][0]["metrics"]["accuracy"]["ci"]
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 3
    small = g[:300].astype(object)
    small[:5] = "tiny"  # a group of 5 rows
    r = fairness.audit(_outcomes(y[:300], pred[:300], p[:300]), pd.DataFrame({"grp": small}), positive=1,
                       n_boot=100, min_group_size=30)["grp"]
    tiny = next(row for row in r["groups"] if row["group"] == "tiny")
    assert tiny["too_small"] and tiny["n"] == 5 and "tiny" not in r["judged"]
    assert set(r["judged"]) == {x for x in set(small) if x != "tiny" and (small == x).sum() >= 30}


def test_intersections_multiclass_and_regression():
    rng = np.random.default_rng(0)
    n = 600
    groups = pd.DataFrame({"sex": rng.choice(["f", "m"], n), "race": rng.choice(["x", "y"], n)})
    y = rng.integers(0, 3, n)
    pred = np.where(rng.random(n) < 0.7, y, rng.integers(0, 3, n))
    res = fairness.audit({"kind": "labels", "true": y, "pred": pred, "proba": np.eye(3)[pred]}, groups, n_boot=50)
    assert set(res) == {"sex", "race", "sex & race"}
    assert len(res["sex & race"]["groups"]) == 4
    assert "selection_rate" not in res["sex"]["groups"][0]["metrics"]  # more than two labels
    assert set(res["sex"]["gaps"]) == {"accuracy_difference"}
    t = rng.normal(size=n)
    pr = t + np.where(groups["sex"] == "f", 0.5, 0.0)
    reg = fairness.audit({"kind": "values", "true": t, "pred": pr}, groups[["sex"]], n_boot=50)["sex"]
    f = next(r for r in reg["groups"] if r["group"] == "f")
    assert f["metrics"]["mae"]["value"] == pytest.approx(np.abs(pr - t)[groups["sex"] == "f"].mean(), abs=1e-6)
    assert reg["gaps"]["mean_prediction_difference"]["value"] > 0.3


def test_group_columns_are_checked():
    df = pd.DataFrame({"sex": ["f", "m", None, "m"], "one": ["x"] * 4, "label": list("abab")})
    df.attrs["source"] = "data.csv"
    with pytest.raises(DataError, match="no group column 'race'"):
        fairness.group_columns(df, ["race"])
    with pytest.raises(DataError, match="'one' holds a single value"):
        fairness.group_columns(df, ["one"])
    with pytest.raises(DataError, match=r"row 3.*'sex' is empty.*--missing group"):
        fairness.group_columns(df, ["sex"])
    assert list(fairness.group_columns(df, ["sex"], missing="group")["sex"]) == ["f", "m", "(missing)", "m"]


def test_reweighing_makes_label_independent_of_group():
    g, y, _, _ = _binary()
    w = fairness.reweighing(pd.DataFrame({"grp": g}), y)
    assert w.mean() == pytest.approx(1.0, abs=1e-5)
    rates = [np.average(y[g == k], weights=w[g == k]) for k in ("a", "b", "c")]
    assert max(rates) - min(rates) < 1e-6 and abs(rates[0] - y.mean()) < 1e-6
    # regression: each group weighs the same in all
    w = fairness.reweighing(pd.DataFrame({"grp": g}), None)
    assert [w[g == k].sum() for k in ("a", "b", "c")] == pytest.approx([len(g) / 3] * 3, rel=1e-5)


def test_thresholds_meet_the_constraint_and_are_deterministic():
    g, y, pred, p = _binary(6000, seed=2)
    groups = pd.DataFrame({"grp": g})
    fit, test = slice(0, 3000), slice(3000, 6000)
    rules = fairness.fit_thresholds(p[fit], y[fit], groups.iloc[fit], "demographic_parity")
    inputs = [f"row {i}" for i in range(3000, 6000)]
    decided_pos, decided, unseen = fairness.apply_thresholds(rules, p[test], groups.iloc[test], inputs)
    assert decided.all() and not unseen
    rates = [decided_pos[g[test] == k].mean() for k in ("a", "b", "c")]
    before = [pred[test][g[test] == k].mean() for k in ("a", "b", "c")]
    assert max(rates) - min(rates) < 0.06 < max(before) - min(before)
    again, _, _ = fairness.apply_thresholds(rules, p[test], groups.iloc[test], inputs)
    assert (again == decided_pos).all()  # one input, one answer
    other = pd.DataFrame({"grp": ["zzz"] * 3})
    _, decided, unseen = fairness.apply_thresholds(rules, p[:3], other, ["a", "b", "c"])
    assert not decided.any() and unseen == ["zzz"]
    with pytest.raises(ConfigError, match="--constraint"):
        fairness.fit_thresholds(p, y, groups, "equal_vibes")


def test_swapper_keeps_case_and_whole_words():
    swap = fairness.swapper([["he", "she"], ["his", "her"], ["man", "woman"]])
    assert swap("He said his dog likes the MAN.") == "She said her dog likes the WOMAN."
    assert swap("themselves and manager") is None  # no whole-word term
    pairs = fairness.default_terms()["gender"]
    assert ["female", "male"] in pairs or ["male", "female"] in pairs


def test_tabular_rows_as_text():
    df = pd.DataFrame({"age": ["39", None], "sex": ["Male", "Female"], "label": ["a", "b"]})
    df.attrs["source"] = "t.csv"
    cfg = DataConfig(text_columns="all")
    assert list(tabular.render(df, cfg)["text"]) == ["age: 39, sex: Male", "age: , sex: Female"]
    cfg = DataConfig(text_template="{sex}, {age} years")
    assert list(tabular.render(df, cfg)["text"]) == ["Male, 39 years", "Female,  years"]
    with pytest.raises(DataError, match="t.csv: data.text_template names column 'job'"):
        tabular.render(df, DataConfig(text_template="{job}"))
    with pytest.raises(ConfigError, match="not both"):
        DataConfig(text_columns="age", text_template="{age}")
    with pytest.raises(ConfigError, match="text_template"):
        DataConfig(text_template="{age")


def _table(n: int, seed: int) -> pd.DataFrame:
    """A tabular set: a review word decides the label; group 'film' is mostly negative."""
    rng = np.random.default_rng(seed)
    grp = rng.choice(["movie", "film"], n, p=[0.6, 0.4])
    pos = rng.random(n) < np.where(grp == "movie", 0.6, 0.25)
    noisy = rng.random(n) < 0.1
    word = np.where(pos ^ noisy, rng.choice(["good", "great"], n), rng.choice(["bad", "poor"], n))
    return pd.DataFrame({"review": word, "grp": grp, "extra": rng.choice(["very", "really"], n),
                         "label": np.where(pos, "yes", "no")})


@pytest.fixture(scope="module")
def tabular_run(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("fair")
    files = {}
    for name, n, seed in (("train", 400, 0), ("val", 150, 1), ("test", 300, 2)):
        files[name] = tmp / f"{name}.csv"
        _table(n, seed).to_csv(files[name], index=False)
    cfg = cfg_dict(tiny_bert, files["train"], out=str(tmp / "run"),
                   data={"val": str(files["val"]), "test": str(files["test"]), "text_template": "{review} {grp}"},
                   task={"group_weights": "grp"}, train={"epochs": 3})
    summary = fmtune.train(cfg, quiet=True, report=False)
    return tmp, summary


def test_fairness_end_to_end(tabular_run):
    from fmtune.report import write_report

    tmp, summary = tabular_run
    run = tmp / "run"
    assert summary["eval"]["test"]["accuracy"] > 0.75  # the template's text was learnt
    res = fairness.run_fairness(run, groups=["grp"], baseline=True, fit="demographic_parity", counterfactual=True,
                                n_boot=200, quiet=True)
    assert set(res["models"]) == {"pretrained baseline", "fine-tuned", "fine-tuned + thresholds (demographic_parity)"}
    gap = {m: res["models"][m]["grp"]["gaps"]["demographic_parity_difference"]["value"] for m in res["models"]}
    assert gap["fine-tuned + thresholds (demographic_parity)"] < gap["fine-tuned"]
    rules = json.loads((run / fairness.THRESHOLDS_FILE).read_text())
    assert rules["columns"] == ["grp"] and set(rules["rules"]) == {"movie", "film"} and rules["positive"] == "yes"
    cf = res["counterfactual"]
    assert "group values swapped" in cf["method"] and set(cf["by"]) == {"grp -> film", "grp -> movie"}
    assert all(0 <= c["flip_rate"] <= 1 and c["rows"] > 0 for c in cf["by"].values())
    assert (run / fairness.FAIRNESS_PNG).stat().st_size > 1000
    on_disk = json.loads((run / fairness.FAIRNESS_FILE).read_text())
    assert on_disk["overall"].keys() == res["models"].keys()
    assert "Fairness" in write_report(run).read_text()


def test_predict_applies_the_thresholds(tabular_run, tmp_path):
    tmp, _ = tabular_run
    run = tmp / "run"
    if not (run / fairness.THRESHOLDS_FILE).is_file():
        fairness.run_fairness(run, groups=["grp"], fit="demographic_parity", n_boot=50, quiet=True)
    test = pd.read_csv(tmp / "test.csv")
    out = tmp_path / "pred.csv"
    fmtune.api.predict(run, tmp / "test.csv", out, quiet=True)
    got = pd.read_csv(out)
    rules = json.loads((run / fairness.THRESHOLDS_FILE).read_text())
    decided_pos, decided, _ = fairness.apply_thresholds(rules, got["prob_yes"].to_numpy(), test[["grp"]],
                                                        list(tabular.render(test, DataConfig(
                                                            text_template="{review} {grp}"))["text"]))
    assert decided.all()
    assert (got["predicted_label"] == np.where(decided_pos, "yes", "no")).all()
    own = np.where(got["prob_yes"] > 0.5, "yes", "no")
    assert (got["predicted_label"] != own).any()  # the thresholds changed some decisions
    test.drop(columns=["grp"]).to_csv(tmp_path / "nogrp.csv", index=False)
    with pytest.raises(DataError, match="'grp'"):
        fmtune.api.predict(run, tmp_path / "nogrp.csv", tmp_path / "p2.csv", quiet=True)


def test_serve_applies_the_thresholds_to_rows(tabular_run):
    from fastapi.testclient import TestClient

    from fmtune.predictor import Predictor
    from fmtune.serve import create_app

    tmp, _ = tabular_run
    run = tmp / "run"
    if not (run / fairness.THRESHOLDS_FILE).is_file():
        fairness.run_fairness(run, groups=["grp"], fit="demographic_parity", n_boot=50, quiet=True)
    test = pd.read_csv(tmp / "test.csv").head(40)
    rows = test[["review", "grp"]].to_dict("records")
    with TestClient(create_app(Predictor(run))) as client:
        r = client.post("/predict", json={"inputs": rows})
        assert r.status_code == 200, r.text
        served = [p["label"] for p in r.json()["predictions"]]
        probs = np.array([p["probabilities"]["yes"] for p in r.json()["predictions"]])
        rules = json.loads((run / fairness.THRESHOLDS_FILE).read_text())
        texts = list(tabular.render(test, DataConfig(text_template="{review} {grp}"))["text"])
        decided_pos, _, _ = fairness.apply_thresholds(rules, probs, test[["grp"]], texts)
        assert served == list(np.where(decided_pos, "yes", "no"))
        r = client.post("/predict", json={"inputs": ["good movie"]})
        assert r.status_code == 422 and "per-group thresholds on grp" in r.json()["error"]
        r = client.post("/predict", json={"inputs": [{"review": "good"}]})
        assert r.status_code == 422


def test_export_carries_the_thresholds(tabular_run, tmp_path):
    from fmtune.exporter import export

    tmp, _ = tabular_run
    run = tmp / "run"
    if not (run / fairness.THRESHOLDS_FILE).is_file():
        fairness.run_fairness(run, groups=["grp"], fit="demographic_parity", n_boot=50, quiet=True)
    res = export(run, tmp_path / "exp", quiet=True)
    assert json.loads((tmp_path / "exp" / fairness.THRESHOLDS_FILE).read_text()) == \
        json.loads((run / fairness.THRESHOLDS_FILE).read_text())
    assert res["decision_thresholds"]["columns"] == ["grp"]
    assert json.loads((tmp_path / "exp" / "export.json").read_text())["decision_thresholds"]["constraint"] == \
        "demographic_parity"


def test_cli_evaluate_with_groups_and_bad_group_column(tabular_run, capsys):
    from fmtune.cli import main

    tmp, _ = tabular_run
    run = tmp / "run"
    assert main(["evaluate", str(run), "--groups", "grp", "--precision", "bf16", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["precision"] == res["fairness"]["precision"] == "bf16"  # both predicted under bf16 autocast
    assert main(["evaluate", str(run), "--groups", "grp", "-q"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fairness"]["groups"] == ["grp"] and "fine-tuned" in res["fairness"]["models"]
    assert res["precision"] == res["fairness"]["precision"] == "fp32"  # the run's train.precision
    assert main(["fairness", str(run), "--groups", "nope"]) == 2
    assert "no group column 'nope'" in capsys.readouterr().err
    assert main(["fairness", str(run), "--groups", "grp", "--threshold-groups", "extra"]) == 2


def test_group_weights_reach_the_loss(tabular_run):
    """task.group_weights: the training set carries the re-weighing weights, and the loss is the
    weighted mean of the per-example losses."""
    import torch

    from fmtune import config as config_mod
    from fmtune.api import _group_weighted
    from fmtune.tasks import Classification, MultiLabel, Regression
    from fmtune.training.loop import WEIGHT_KEY

    tmp, _ = tabular_run
    train = pd.read_csv(tmp / "train.csv")
    cfg = config_mod.coerce({"data": {"train": str(tmp / "train.csv")}, "task": {"group_weights": "grp"}})
    task = Classification(["no", "yes"])

    class Rows:
        def __len__(self):
            return len(train)

        def collate(self, idx):
            return {"labels": torch.zeros(len(idx), dtype=torch.long)}

    ds = _group_weighted(cfg, task, train, Rows(), quiet=True)
    w = ds.collate(list(range(len(train))))[WEIGHT_KEY].numpy()
    assert np.allclose(w, fairness.reweighing(train[["grp"]].astype(str), train["label"].to_numpy()))
    logits, targets = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 0])
    weights = torch.tensor([0.5, 2.0, 1.0, 1.0, 0.25, 3.0])
    each = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert torch.allclose(task.loss(logits, targets, weights), (each * weights).sum() / weights.sum())
    reg = Regression([], target_stats={"mean": 0.0, "std": 2.0})
    v, t = torch.randn(6, 1), torch.randn(6)
    assert torch.allclose(reg.loss(v, t, weights), ((v.view(-1) - t) ** 2 * weights).sum() / weights.sum() / 4)
    with pytest.raises(ConfigError, match="task.group_weights"):
        _group_weighted(cfg, MultiLabel(["a", "b"]), train, Rows(), quiet=True)


def test_compare_shows_the_fairness_gaps_side_by_side(tabular_run, tmp_path):
    import shutil

    from fmtune.report import compare

    tmp, _ = tabular_run
    run = tmp / "run"
    if not (run / fairness.FAIRNESS_FILE).is_file():
        fairness.run_fairness(run, groups=["grp"], n_boot=50, quiet=True)
    other = tmp_path / "other"
    shutil.copytree(run, other)
    out, _, _ = compare([run, other], tmp_path / "cmp.html")
    page = out.read_text()
    assert "Fairness gaps" in page and page.count("demographic_parity_difference") >= 2


def test_regression_audit_end_to_end_on_the_compas_deciles_export(tmp_path, tiny_bert):
    """The zoo's real regression set (COMPAS records -> the decile score) exports as a table with the
    group columns, trains `--task regression`, and the audit compares the groups' errors and mean
    predictions, the pretrained baseline's too."""
    from fmtune.zoo.datasets import export

    files = export("compas-deciles", tmp_path / "data", sizes=(160, 40, 240), seed=0)
    test = pd.read_csv(files["test"])
    assert list(test.columns) == ["text", "label", "sex", "race", "age_cat", "two_year_recid"]
    assert set(test["label"]) <= set(range(1, 11)) and test["label"].nunique() >= 8
    assert test["text"].str.contains(r"charge degree: (?:felony|misdemeanor), charge: ").all()
    assert not set(test["text"]) & set(pd.read_csv(files["train"])["text"])  # no record in two splits
    fmtune.train(cfg_dict(tiny_bert, files["train"], out=str(tmp_path / "run"), task={"type": "regression"},
                          data={"val": str(files["val"]), "test": str(files["test"])}, train={"epochs": 1}),
                 quiet=True)
    res = fairness.run_fairness(tmp_path / "run", groups=["race", "sex"], baseline=True, n_boot=100, quiet=True)
    assert res["task"] == "regression" and set(res["models"]) == {"pretrained baseline", "fine-tuned"}
    for model in res["models"].values():
        race = model["race"]
        sizes = {g["group"]: g["n"] for g in race["groups"]}
        assert sum(sizes.values()) == len(test) and "African-American" in race["judged"]
        assert all(sizes[g] >= 30 for g in race["judged"]) and not {"Asian", "Native American"} & set(race["judged"])
        mae = [g["metrics"]["mae"]["value"] for g in race["groups"] if g["group"] in race["judged"]]
        assert race["gaps"]["mae_difference"]["value"] == pytest.approx(max(mae) - min(mae))
        lo, hi = race["gaps"]["mean_prediction_difference"]["ci"]
        assert lo <= race["gaps"]["mean_prediction_difference"]["value"] <= hi
        assert set(model["sex"]["judged"]) == {"Female", "Male"}
