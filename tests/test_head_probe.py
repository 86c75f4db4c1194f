"""strategy head starts from the linear probe solved on the cached features (issue: a head trained
by a few epochs of SGD lost to the logistic-regression baseline on the same page). The solved head
computes what the probe computes, and the run is at least as good as the baseline on datasets of
different shapes (binary imbalanced, 6 classes, 12 classes)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FILLER, NEG, POS, cfg_dict

import fmtune
from fmtune.fsutil import read_jsonl
from fmtune.tasks import Classification, MultiLabel, Regression


def _features(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(0, 1.5, (k, 16))
    return (centres[y] + rng.normal(0, 1, (n, 16)) + 5.0).astype(np.float32), y  # off-centre: the scaler matters


def _head(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return x @ weight.T + bias


@pytest.mark.parametrize("k", [2, 5])
def test_solved_classification_head_is_the_probe(k):
    x, y = _features(300, k)
    task = Classification([f"c{i}" for i in range(k)])
    probe = task.fit_probe(x, torch.from_numpy(y), seed=0)
    logits = torch.from_numpy(_head(*task.head_from_probe(probe, 16), x))
    np.testing.assert_allclose(logits.softmax(-1).numpy(), probe.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("task", [Classification(["c0", "c1", "c2"]), MultiLabel(["c0", "c1", "c2"]),
                                  Regression([], target_stats={"mean": 0.0, "std": 1.0})])
def test_dead_feature_dimensions_get_no_weight(task):
    """A pooled dimension that is all but constant (all-MiniLM-L6-v2 has three, about 1e-32): the
    scaler once divided it by its spread, and the head weighed it 1e31 on the raw features."""
    x, y = _features(300, 3)
    x[:, 3] = np.random.default_rng(1).normal(0, 1e-32, 300)
    x[:, 7] = 0.25 + np.random.default_rng(2).normal(0, 1e-9, 300)
    targets = (torch.from_numpy(y) if task.name == "classification" else torch.from_numpy(y.astype(np.float32))
               if task.name == "regression" else torch.nn.functional.one_hot(torch.from_numpy(y), 3).float())
    probe = task.fit_probe(x, targets, seed=0)
    weight, bias = task.head_from_probe(probe, 16)
    assert np.isfinite(weight).all() and np.abs(weight).max() < 100 and np.abs(bias).max() < 100
    assert np.abs(weight[:, [3, 7]]).max() < 1e-6
    clean = x.copy()
    clean[:, [3, 7]] = x[:, [3, 7]].mean(0)
    np.testing.assert_allclose(task.probe_logits(probe, clean).numpy(), task.probe_logits(probe, x).numpy())


def test_probe_fits_with_blas_on_one_thread_and_puts_the_limit_back():
    """Two BLAS threads made LogisticRegressionCV's small products 3-13x slower on 2 cores (see
    probe.Probe): the fit runs on one, and the caller's setting is back afterwards."""
    from sklearn.base import BaseEstimator, ClassifierMixin
    from threadpoolctl import threadpool_info, threadpool_limits

    from fmtune.tasks.probe import scaled

    class Seen(ClassifierMixin, BaseEstimator):
        def fit(self, x, y):
            self.threads_ = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
            return self

    x, y = _features(60, 2)
    with threadpool_limits(2, user_api="blas"):
        probe = scaled(Seen()).fit(x, y)
        after = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    assert probe[-1].threads_ == {1}
    assert after == {2}


@pytest.mark.parametrize("per_class", [1, 2])
def test_a_probe_fits_one_or_two_examples_of_a_class(per_class, tmp_path, tiny_st_bert):
    """3-fold cross-validation of the probe's C cannot split a class of 1 or 2 examples (scikit-learn raised
    from a training run of one clip per class): fewer folds, or none and C = 1; multi-label too (a label on in
    one row); and a run on such data trains, its baseline scored."""
    x, y = _features(3 * per_class, 3)
    y = np.repeat(np.arange(3), per_class)
    task = Classification(["c0", "c1", "c2"])
    probe = task.fit_probe(x, torch.from_numpy(y), seed=0)
    assert probe.predict(x).tolist() == y.tolist()  # (separable: a fitted model, not a failure)
    multi = MultiLabel(["a", "b"])
    targets = torch.zeros(8, 2)
    targets[0, 0] = targets[1:4, 1] = 1.0
    multi.fit_probe(*_features(8, 2)[:1], targets, seed=0)
    rows = pd.DataFrame({"text": [f"{w} {w} words" for w in ("good", "bad", "okay") for _ in range(per_class)],
                         "label": [c for c in ("pos", "neg", "mid") for _ in range(per_class)]})
    rows.to_csv(tmp_path / "train.csv", index=False)
    summary = fmtune.train(cfg_dict(tiny_st_bert, tmp_path / "train.csv", out=str(tmp_path / "run"),
                                    data={"test": str(tmp_path / "train.csv"), "min_val_per_class": -1},
                                    train={"max_steps": 2, "head_init": "probe", "baseline": True}), quiet=True)
    assert "accuracy" in summary["eval"]["baseline"]


def test_solved_multilabel_and_regression_heads_are_the_probes():
    x, y = _features(300, 3)
    task = MultiLabel(["a", "b", "c", "never"])
    targets = torch.zeros(300, 4)
    targets[np.arange(300), y] = 1.0
    probe = task.fit_probe(x, targets, seed=0)
    np.testing.assert_allclose(_head(*task.head_from_probe(probe, 16), x), task.probe_logits(probe, x).numpy(),
                               atol=1e-5)
    values = (x[:, 0] * 3.0 - 7.0).astype(np.float32)
    reg = Regression([], target_stats={"mean": float(values.mean()), "std": float(values.std())})
    probe = reg.fit_probe(x, torch.from_numpy(values), seed=0)
    scale, shift = reg.output_affine()
    np.testing.assert_allclose(_head(*reg.head_from_probe(probe, 16), x)[:, 0] * scale + shift, probe.predict(x),
                               rtol=1e-5, atol=1e-4)


def _rows(n: int, keys: list[str], seed: int, weights: list[float] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    others = [w for w in FILLER + POS + NEG if w not in keys]
    rows = []
    for _ in range(n):
        key = rng.choice(keys, p=weights)
        words = list(rng.choice(others, size=rng.integers(3, 9)))
        words.insert(int(rng.integers(len(words) + 1)), key)
        rows.append({"text": " ".join(words), "label": key})
    return pd.DataFrame(rows)


SHAPES = {
    "binary-imbalanced": (["good", "bad"], [0.87, 0.13]),
    "six-classes": (POS + NEG, None),
    "twelve-classes": (FILLER, None),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_head_is_at_least_as_good_as_the_baseline(shape, tmp_path, tiny_st_bert):
    keys, weights = SHAPES[shape]
    files = {}
    for name, n, seed in (("train", 360, 0), ("val", 120, 1), ("test", 300, 2)):
        files[name] = tmp_path / f"{name}.csv"
        _rows(n, keys, seed, weights).to_csv(files[name], index=False)
    cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / "run"), strategy={"name": "head"},
                   data={"val": str(files["val"]), "test": str(files["test"])},
                   train={"epochs": 3, "baseline": True, "lr": None, "head_lr": None})
    ev = fmtune.train(cfg, quiet=True, report=False)["eval"]
    assert ev["test"]["accuracy"] >= ev["baseline"]["accuracy"] - 0.005, ev


def _twelve_classes(tmp_path) -> dict:
    keys, weights = SHAPES["twelve-classes"]
    files = {}
    for name, n, seed in (("train", 360, 0), ("val", 120, 1), ("test", 300, 2)):
        files[name] = tmp_path / f"{name}.csv"
        _rows(n, keys, seed, weights).to_csv(files[name], index=False)
    return files


def _evals(run) -> list[dict]:
    return [e for e in read_jsonl(run / "metrics.jsonl") if e.get("type") == "eval"]


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_a_head_trained_by_gradient_starts_from_the_probe(strategy, tmp_path, tiny_st_bert):
    """LP-FT: the probe is the step-0 candidate the fine-tuned model must beat on validation, so the
    run is at least as good as the baseline; with a random head (the old start) it is the fine-tuning
    alone."""
    files = _twelve_classes(tmp_path)
    runs = {}
    for init in ("probe", "random"):
        cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / init), strategy={"name": strategy},
                       data={"val": str(files["val"]), "test": str(files["test"])},
                       train={"epochs": 1, "baseline": True, "lr": None, "head_lr": None, "head_init": init})
        runs[init] = fmtune.train(cfg, quiet=True, report=False)
    probe, random = runs["probe"], runs["random"]
    assert probe["head_init"]["rows"] == 360 and "head_init" not in random
    first = _evals(tmp_path / "probe")[0]
    assert first["step"] == 0 and first["best"]
    assert _evals(tmp_path / "random")[0]["step"] > 0
    ev = probe["eval"]
    assert ev["test"]["accuracy"] >= ev["baseline"]["accuracy"] - 0.02, ev
    info = json.loads((tmp_path / "probe" / "run.json").read_text())
    assert info["head_init"]["kept_as_is"] == (probe["best_step"] == 0)


def test_probe_start_reads_at_most_probe_init_rows_and_says_when_it_is_kept(tmp_path, tiny_st_bert, monkeypatch):
    from fmtune import config

    sizes = ((200, 2), (500, 2), (2000, 2), (2560, 40), (20_000, 3), (50_000, 150), (200_000, 2))
    # 64 per label or one row in 8, whichever is more, 256 to 10,000 rows, never more than there are
    assert [config.probe_init_rows(n, k) for n, k in sizes] == [200, 256, 256, 2560, 2500, 9600, 10_000]
    monkeypatch.setattr(config, "PROBE_INIT_ROWS", 100)
    files = _twelve_classes(tmp_path)
    cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / "run"),
                   data={"val": str(files["val"]), "test": str(files["test"])},
                   train={"epochs": 1, "lr": 1e-12, "head_lr": 1e-12, "head_init": "probe"})
    s = fmtune.train(cfg, quiet=True, report=False)
    assert s["head_init"]["rows"] == 100
    # steps of 1e-12 change nothing: validation never improves on the probe, and the run says so
    assert s["best_step"] == 0 and s["head_init"]["kept_as_is"]
    # ... and a probe of 100 rows is a start, not a final head: it is solved again on all 360 (below)
    assert s["head_init"]["every_row"] == {"rows": 360, "val_accuracy": s["best"], "kept": True}
    from fmtune.report import write_report

    page = write_report(tmp_path / "run").read_text()
    assert "started from the linear probe solved on 100 training rows" in page and "Training never did better" in page
    assert "solved again on all 360 training rows" in page


def test_a_run_that_never_beats_its_probe_start_ends_with_the_probe_on_every_row(tmp_path, tiny_st_bert,
                                                                                  text_files, monkeypatch):
    """The probe a head starts from reads a sample of the rows (a start, cheap); when training never does
    better on validation, the run's model is not that sample's probe (it once scored RMSE 2.40 against the
    baseline's 2.22 on COMPAS deciles): the head is solved again on every training row, the baseline's probe."""
    from fmtune import config

    monkeypatch.setattr(config, "PROBE_INIT_ROWS", 100)
    cfg = cfg_dict(tiny_st_bert, text_files["regression_train"], out=str(tmp_path / "run"),
                   task={"type": "regression"}, data={"test": str(text_files["regression_test"])},
                   train={"epochs": 1, "lr": 1e-12, "head_lr": 1e-12, "head_init": "probe", "baseline": True})
    s = fmtune.train(cfg, quiet=True, report=False)
    assert s["head_init"]["rows"] == 100 and s["best_step"] == 0
    again = s["head_init"]["every_row"]
    assert again["rows"] == 216 and again["kept"] and s["best"] == again["val_rmse"]  # 240 less a 10% split
    test, base = s["eval"]["test"], s["eval"]["baseline"]
    assert test["rmse"] == pytest.approx(base["rmse"], rel=1e-5) and test["mae"] == pytest.approx(base["mae"], rel=1e-5)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["head_init"]["every_row"] == again
    rows = [e for e in _evals(tmp_path / "run")]
    assert again["val_rmse"] <= rows[0]["rmse"]  # kept: validation does not put the sample's probe first


def test_auto_head_start_is_random_for_lora_on_two_classes_and_the_probe_elsewhere(tmp_path, tiny_st_bert):
    from fmtune import config

    auto, probe = config.TrainConfig(head_init="auto"), config.TrainConfig(head_init="probe")
    assert [config.head_start(auto, s, k) for s, k in
            (("lora", 2), ("dora", 2), ("lora", 3), ("lora", None), ("full", 2), ("ia3", 2))] == \
        ["random", "random", "probe", "probe", "probe", "probe"]
    assert config.head_start(probe, "lora", 2) == "probe"
    assert config.TrainConfig().head_init == "auto"
    files = {}
    for name, n, seed in (("train", 120, 0), ("val", 60, 1)):
        files[name] = tmp_path / f"{name}.csv"
        _rows(n, SHAPES["binary-imbalanced"][0], seed).to_csv(files[name], index=False)
    for strategy in ("lora", "full"):
        cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / strategy), strategy={"name": strategy},
                       data={"val": str(files["val"])}, train={"epochs": 1, "head_init": "auto"})
        s = fmtune.train(cfg, quiet=True, report=False)
        assert ("head_init" in s) == (strategy == "full"), s
        assert (_evals(tmp_path / strategy)[0]["step"] == 0) == (strategy == "full")


def test_probe_start_runs_in_the_runs_mixed_precision(tmp_path, tiny_st_bert, monkeypatch):
    """The probe start's forward pass (no feature cache: the body trains) runs under the precision the
    run trains in, as the cache's features do."""
    from fmtune import api
    from fmtune.training import hardware

    chosen, seen = [], []
    choose, infer = hardware.choose, api.infer
    monkeypatch.setattr(hardware, "choose", lambda *a, **k: chosen.append(choose(*a, **k)) or chosen[-1])
    monkeypatch.setattr(api, "infer", lambda *a, **k: seen.append(k.get("autocast_dtype", "unset")) or infer(*a, **k))
    files = _twelve_classes(tmp_path)
    cfg = cfg_dict(tiny_st_bert, files["train"], out=str(tmp_path / "run"), data={"val": str(files["val"])},
                   train={"epochs": 1, "head_init": "probe"})
    fmtune.train(cfg, quiet=True, report=False)
    assert seen[0] == hardware.autocast_dtype(chosen[0].precision)  # the first pass: the probe start's
    assert hardware.autocast_dtype("bf16") is torch.bfloat16 and hardware.autocast_dtype("no") is None


def test_few_labels_without_a_validation_split_still_fine_tune_from_the_probe(tmp_path, tiny_st_bert):
    """With no validation split a solved head (strategy head) is final as it is; a head that trains
    with its body must still take its steps."""
    keys, _ = SHAPES["six-classes"]
    train = tmp_path / "train.csv"
    _rows(48, keys, 0).to_csv(train, index=False)
    cfg = cfg_dict(tiny_st_bert, train, out=str(tmp_path / "run"), data={"min_val_per_class": 5},
                   train={"head_init": "probe"})
    s = fmtune.train(cfg, quiet=True, report=False)
    assert s["few_labels"]["no_validation_split"] and s["head_init"]["rows"] == 48
    assert s["best_step"] > 0 and not s["head_init"]["kept_as_is"]


def test_regression_is_recentred_on_its_training_rows_after_fine_tuning(tmp_path, tiny_st_bert, text_files):
    """The best checkpoint's mean prediction on the training rows is moved onto their mean target (unless
    validation says worse); what was done is in run.json. A head solved on every row is centred already."""
    import pandas as pd

    cfg = cfg_dict(tiny_st_bert, text_files["regression_train"], out=str(tmp_path / "run"),
                   task={"type": "regression"}, data={"val": str(text_files["regression_test"])},
                   train={"epochs": 1, "lr": 1e-3})
    s = fmtune.train(cfg, quiet=True, report=False)
    moved = s["recentred"]
    assert moved["rows"] == 240 and abs(moved["shift"]) > 1e-3 and moved["kept"], moved
    assert s["best"] == moved["val_rmse"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recentred"] == moved
    from fmtune.report import write_report

    page = write_report(tmp_path / "run").read_text()
    assert f"Recentred: mean target minus mean prediction on 240 training rows {moved['shift']:+.4g}" in page
    pred = fmtune.predict(tmp_path / "run", text_files["regression_train"], quiet=True)["prediction"]
    assert pred.mean() == pytest.approx(pd.read_csv(text_files["regression_train"])["label"].mean(), abs=1e-4)
    h = fmtune.train(cfg_dict(tiny_st_bert, text_files["regression_train"], out=str(tmp_path / "head"),
                              task={"type": "regression"}, strategy={"name": "head"}), quiet=True, report=False)
    assert "recentred" not in h


def _model_rmse(run, path) -> float:
    pred = fmtune.predict(run, path, quiet=True)["prediction"].to_numpy(float)
    return float(((pred - pd.read_csv(path)["label"].to_numpy(float)) ** 2).mean() ** 0.5)


def test_a_recentring_that_validation_says_is_worse_is_undone(tmp_path, tiny_st_bert, text_files, monkeypatch):
    """Recentring is kept only unless validation says worse: the training rows' mean target read 100 too high
    here moves the head by about 100, validation says worse, and the saved model (and the one tested) is the
    best checkpoint as it was, not the moved one."""
    from fmtune import api

    sampled, infer, sample = [], api.infer, api._seeded_sample
    monkeypatch.setattr(api, "_seeded_sample", lambda *a: sampled.append(sample(*a)) or sampled[-1])

    def high_targets(model, ds, *a, **k):
        pred, y = infer(model, ds, *a, **k)
        return (pred, y + 100) if sampled and ds is sampled[-1] else (pred, y)

    monkeypatch.setattr(api, "infer", high_targets)
    val = text_files["regression_test"]
    cfg = cfg_dict(tiny_st_bert, text_files["regression_train"], out=str(tmp_path / "run"),
                   task={"type": "regression"}, data={"val": str(val)}, train={"epochs": 1, "lr": 1e-3})
    s = fmtune.train(cfg, quiet=True, report=False)
    moved = s["recentred"]
    assert not moved["kept"] and moved["shift"] > 90 and moved["val_rmse"] > s["best"] + 50, (moved, s["best"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recentred"] == moved
    assert _model_rmse(tmp_path / "run", val) == pytest.approx(s["best"], rel=1e-4)  # the saved model: not moved


def test_an_every_row_probe_that_validation_says_is_worse_leaves_the_samples_probe(tmp_path, tiny_st_bert,
                                                                                     text_files, monkeypatch):
    """The head solved again on every row is kept unless validation says worse; when it is worse (its
    outputs negated here) the run's model stays the sample's probe, as validated at step 0."""
    from fmtune import api, config

    monkeypatch.setattr(config, "PROBE_INIT_ROWS", 100)
    solve, calls = api._solve_head, []

    def second_solve_negated(bundle, *a):
        done = solve(bundle, *a)
        calls.append(done)
        if len(calls) == 2:  # the every-row solve (the first is the probe start)
            linear = api.build.head_linear(bundle.model)
            with torch.no_grad():
                linear.weight.neg_()
                linear.bias.add_(50)
        return done

    monkeypatch.setattr(api, "_solve_head", second_solve_negated)
    val = text_files["regression_test"]
    cfg = cfg_dict(tiny_st_bert, text_files["regression_train"], out=str(tmp_path / "run"),
                   task={"type": "regression"}, data={"val": str(val)},
                   train={"epochs": 1, "lr": 1e-12, "head_lr": 1e-12, "head_init": "probe"})
    s = fmtune.train(cfg, quiet=True, report=False)
    again = s["head_init"]["every_row"]
    assert len(calls) == 2 and s["best_step"] == 0 and again["rows"] == 240 and not again["kept"], again
    assert again["val_rmse"] > s["best"] + 10
    assert s["best"] == pytest.approx(_evals(tmp_path / "run")[0]["rmse"], abs=1e-6)  # the step-0 probe's
    assert _model_rmse(tmp_path / "run", val) == pytest.approx(s["best"], rel=1e-4)
