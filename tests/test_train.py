"""End to end on tiny models: train -> run directory -> evaluate -> predict, for every task."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import cfg_dict

import fmtune
from fmtune.errors import DataError, RunDirError, TrainingError
from fmtune.models import build


def _train(tmp_path, model, train_file, name="run", **sections):
    cfg = cfg_dict(model, train_file, out=str(tmp_path / name), **sections)
    return fmtune.train(cfg, quiet=True)


def test_classification_run_directory_and_learning(tmp_path, tiny_st_bert, text_files):
    s = _train(tmp_path, tiny_st_bert, text_files["train"], data={"val": str(text_files["val"]),
               "test": str(text_files["test"])}, train={"epochs": 4})
    run = tmp_path / "run"
    for f in ("config.yaml", "labels.json", "metrics.jsonl", "eval.json", "run.json", "model/model.safetensors",
              "model/config.json", "model/modeling_fmtune.py", "state/trainer.json", "confusion_matrix.png",
              "classification_report.txt"):
        assert (run / f).exists(), f
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["test"]) >= {"accuracy", "macro_f1"}
    # the keyword decides the label: a model that learned nothing sits near 0.5
    assert ev["test"]["accuracy"] > 0.9, ev
    assert s["best"] > 0.9
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(x["type"] == "eval" for x in lines) and any(x["type"] == "train" for x in lines)
    assert json.loads((run / "labels.json").read_text())["labels"] == ["neg", "pos"]


def test_split_validation_off_train_and_baseline(tmp_path, tiny_st_bert, text_files):
    s = _train(tmp_path, tiny_st_bert, text_files["train"], data={"test": str(text_files["test"])},
               train={"baseline": True, "epochs": 1})
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data"]["val_split_from_train"] is True
    assert info["data"]["val"]["rows"] == 24  # 10% of 240
    # stratified: both labels in validation
    assert set(info["data"]["val"]["label_counts"]) == {"neg", "pos"}
    assert set(s["eval"]["baseline"]) >= {"accuracy", "macro_f1"}


def test_multilabel(tmp_path, tiny_st_bert, text_files):
    s = _train(tmp_path, tiny_st_bert, text_files["multilabel_train"], task={"type": "multilabel"},
               data={"test": str(text_files["multilabel_test"])}, train={"epochs": 6})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["music", "neg", "pos"]
    assert s["eval"]["test"]["macro_f1"] > 0.6
    preds = fmtune.predict(tmp_path / "run", text_files["multilabel_test"], quiet=True)
    assert "labels" in preds and "prob_music" in preds


def _one_hot(src, dst, names=("music", "neg", "pos")):
    """The multi-label fixture as Jigsaw / GoEmotions CSVs hold labels: a 0/1 column each, the text under another
    name, an id column beside them."""
    df = pd.read_csv(src)
    cells = [set(str(c).split("|")) for c in df["label"]]
    out = pd.DataFrame({"id": range(len(df)), "comment_text": df["text"],
                        **{n: [int(n in c) for c in cells] for n in names}})
    out.to_csv(dst, index=False)
    return dst


def test_multilabel_from_one_hot_label_columns(tmp_path, tiny_st_bert, text_files):
    """data.label_columns: one 0/1 column per label (Jigsaw's toxic comments, GoEmotions) -> the labels of a row;
    they trained as one cell of joined labels only. The 0/1 columns are not text (text_columns=all leaves them out);
    evaluate reads the test file's the same way; bad cells and missing columns are named."""
    train = _one_hot(text_files["multilabel_train"], tmp_path / "train.csv")
    test = _one_hot(text_files["multilabel_test"], tmp_path / "test.csv")
    data = {"test": str(test), "text_column": "comment_text", "label_columns": "music, neg, pos"}
    s = _train(tmp_path, tiny_st_bert, train, task={"type": "multilabel"}, data=data, train={"epochs": 6})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["music", "neg", "pos"]
    assert s["eval"]["test"]["macro_f1"] > 0.6, s["eval"]["test"]
    assert fmtune.evaluate(tmp_path / "run", test, quiet=True)["test"] == pytest.approx(s["eval"]["test"])
    preds = fmtune.predict(tmp_path / "run", test, quiet=True)
    truth = [set(c.split("|")) for c in pd.read_csv(text_files["multilabel_test"])["label"]]
    got = [set(str(c).split("|")) - {"nan", ""} for c in preds["labels"]]
    assert np.mean([a == b for a, b in zip(got, truth)]) == pytest.approx(s["eval"]["test"]["accuracy"])  # exact sets
    from fmtune.config import DataConfig
    from fmtune.data.tabular import render
    from fmtune.tasks.multilabel import MultiLabel

    cfg = DataConfig(text_column="text", text_columns="all", label_columns="music,neg,pos")
    rows = MultiLabel.read_file(test, cfg)
    assert list(rows.columns) == ["id", "comment_text", "label"] and rows["label"][0] in ([], ["neg"], ["pos"],
                                                                                          ["music", "neg"],
                                                                                          ["music", "pos"])
    assert render(pd.read_csv(test), cfg)["text"][0].startswith("id: 0, comment_text: ")  # (no 'pos: 1')
    assert "pos:" not in render(pd.read_csv(test), cfg)["text"][0]
    bad = pd.read_csv(test)
    bad.loc[3, "neg"] = 2
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: row 4 \(line 5\): column 'neg' holds '2'; data.label_columns"):
        MultiLabel.read_file(tmp_path / "bad.csv", cfg)
    bad.drop(columns=["neg"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: no column 'neg' \(data.label_columns\)"):
        MultiLabel.read_file(tmp_path / "bad.csv", cfg)


def test_multilabel_0_1_columns_are_read_without_settings(tmp_path, tiny_st_bert, text_files):
    """A multi-label table without a label column whose labels are 0/1 columns (Jigsaw's comment_text + toxic ...;
    GoEmotions' raw CSV, whose true / false example_very_unclear is no label) trains without data.label_columns:
    said, kept, and evaluate reads the test file the same way."""
    import yaml

    train = _one_hot(text_files["multilabel_train"], tmp_path / "train.csv")
    test = _one_hot(text_files["multilabel_test"], tmp_path / "test.csv")
    df = pd.read_csv(train)
    df.assign(example_very_unclear=[str(i % 7 == 0) for i in range(len(df))]).to_csv(train, index=False)
    s = _train(tmp_path, tiny_st_bert, train, task={"type": "multilabel"}, data={"test": str(test)},
               train={"epochs": 2})
    assert s["columns_read"] == {"text_column": "comment_text", "label_columns": "music,neg,pos"}
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["music", "neg", "pos"]
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["label_columns"] == "music,neg,pos"
    assert fmtune.evaluate(tmp_path / "run", test, quiet=True)["test"] == pytest.approx(s["eval"]["test"])
    from fmtune.tasks.multilabel import MultiLabel

    assert MultiLabel.usual_label_columns(df.assign(one=1), {"comment_text"}) == ["music", "neg", "pos", "one"]
    assert MultiLabel.usual_label_columns(df[["id", "comment_text", "pos"]], {"comment_text"}) is None  # one: no set
    # trained as single-label classes (the default task): told it is multi-label, at a row with several labels
    many = int(np.flatnonzero((df[["music", "neg", "pos"]].sum(axis=1) > 1).to_numpy())[0])
    with pytest.raises(DataError, match=rf"train.csv: row {many + 1} \(line {many + 2}\): no label column 'label', and "
                                        r"the table's 0/1 columns music, neg, pos mark 2 labels on this row: a "
                                        r"multi-label table; --task multilabel"):
        _train(tmp_path / "single", tiny_st_bert, train)


def test_the_zoos_multilabel_set_exports_with_empty_label_sets_and_trains(tmp_path, tiny_st_bert):
    """wnut16-entity-types: real tweets -> the entity types they mention, most of them none (an empty cell,
    read back as no label); its label sets are too rare to stratify the split by, so it is not."""
    from fmtune.zoo.datasets import export

    files = export("wnut16-entity-types", tmp_path / "data", sizes=(300, 60, 100), seed=0)
    test = pd.read_csv(files["test"])
    assert len(test) == 100 and test["label"].isna().mean() > 0.4  # most tweets mention no entity
    types = {t for cell in test["label"].dropna() for t in cell.split("|")}
    assert types <= {"person", "geo-loc", "other", "company", "facility", "product", "musicartist", "sportsteam",
                     "tvshow", "movie"} and "person" in types
    s = _train(tmp_path, tiny_st_bert, files["train"], task={"type": "multilabel"},
               data={"val": str(files["val"]), "test": str(files["test"])}, train={"epochs": 1})
    assert 0.0 <= s["eval"]["test"]["macro_f1"] <= 1.0 and s["eval"]["test"]["accuracy"] > 0.2  # exact label sets
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())["labels"]
    assert "person" in labels and "" not in labels


def test_regression(tmp_path, tiny_st_bert, text_files):
    s = _train(tmp_path, tiny_st_bert, text_files["regression_train"], task={"type": "regression"},
               data={"test": str(text_files["regression_test"])}, train={"epochs": 6})
    ev = s["eval"]["test"]
    assert set(ev) >= {"mae", "rmse", "r2"}
    assert ev["r2"] > 0.5, ev
    preds = fmtune.predict(tmp_path / "run", text_files["regression_test"], quiet=True)
    # the model predicts in target units (about -1 and 3), not standardised ones
    assert preds["prediction"].max() > 2.0 and preds["prediction"].min() < 0.0


def test_predict_and_evaluate_reuse_the_run(tmp_path, tiny_st_bert, text_files):
    _train(tmp_path, tiny_st_bert, text_files["train"], train={"epochs": 3})
    out = tmp_path / "preds.csv"
    summary = fmtune.predict(tmp_path / "run", text_files["test"], out, quiet=True)
    truth = pd.read_csv(text_files["test"])["label"]
    assert summary == {"rows": len(truth), "errors": 0, "output": str(out)}
    df = pd.read_csv(out)
    assert list(df.columns[:3]) == ["text", "label", "predicted_label"]  # the input's label is kept as it is
    assert {"score", "prob_neg", "prob_pos", "error"} <= set(df.columns)
    ev = fmtune.evaluate(tmp_path / "run", text_files["test"], quiet=True)
    assert ev["test"]["accuracy"] == pytest.approx((df["predicted_label"] == truth).mean())


def test_saved_model_loads_with_plain_transformers(tmp_path, tiny_st_bert, text_files):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _train(tmp_path, tiny_st_bert, text_files["train"], train={"epochs": 1})
    model_dir = tmp_path / "run" / "model"
    hf = AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    texts = pd.read_csv(text_files["test"])["text"].tolist()[:12]
    with torch.no_grad():
        logits = hf(**tok(texts, padding=True, return_tensors="pt")).logits
    ours = fmtune.predict(tmp_path / "run", text_files["test"], quiet=True).head(12)
    probs = torch.tensor(ours[["prob_neg", "prob_pos"]].to_numpy())
    assert torch.allclose(logits.softmax(-1), probs.float(), atol=1e-5)
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    # without trust_remote_code: transformers' error, never a stock BERT with random weights
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(model_dir)


def test_same_seed_same_metrics_however_the_batches_are_collated(tmp_path, tiny_bert, text_files):
    # a as the hardware chooses (inline on a CPU), b with one background thread, c with 3
    runs = {name: _train(tmp_path, tiny_bert, text_files["train"], name=name, train={"epochs": 1, **extra})
            for name, extra in (("a", {}), ("b", {"loader_threads": 1}), ("c", {"loader_threads": 3}))}
    timing = {"samples_per_s", "seconds", "eval_seconds"}

    def history(name):
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in timing} for r in rows]

    assert history("a") == history("b") == history("c")
    assert runs["a"]["best"] == runs["b"]["best"] == runs["c"]["best"]
    hw = json.loads((tmp_path / "c" / "run.json").read_text())["hardware"]
    assert "collated ahead by 3 background threads" in hw


def test_refuses_existing_run_dir(tmp_path, tiny_bert, text_files):
    _train(tmp_path, tiny_bert, text_files["train"], train={"max_steps": 2})
    with pytest.raises(RunDirError, match="already exists.*--overwrite"):
        _train(tmp_path, tiny_bert, text_files["train"], train={"max_steps": 2})
    cfg = cfg_dict(tiny_bert, text_files["train"], out=str(tmp_path / "run"), train={"max_steps": 2})
    fmtune.train(cfg, overwrite=True, quiet=True)


def test_nan_loss_stops_and_keeps_best_checkpoint(tmp_path, tiny_bert, text_files, monkeypatch):
    from fmtune import tasks

    calls = {"n": 0}
    real = tasks.Classification.loss

    def flaky(self, logits, targets):
        calls["n"] += 1
        loss = real(self, logits, targets)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(tasks.Classification, "loss", flaky)
    with pytest.raises(TrainingError, match="loss became nan.*best checkpoint.*intact"):
        _train(tmp_path, tiny_bert, text_files["train"], train={"eval_every": 3})
    # the best checkpoint (from step 3 or 6) is complete and loads
    bundle = build.load(tmp_path / "run" / "model")
    assert bundle.model.head[1].weight.isfinite().all()


def test_early_stopping(tmp_path, tiny_bert, text_files):
    # lr 0 after warm-up: the metric cannot improve, so patience 1 stops after the second evaluation
    s = _train(tmp_path, tiny_bert, text_files["train"],
               train={"epochs": 10, "eval_every": 2, "patience": 1, "lr": 1e-12, "head_lr": 1e-12})
    assert s["stopped_early"] is True
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in x]
    assert len(evals) == 2


def test_grad_accum_and_schedules(tmp_path, tiny_bert, text_files):
    s = _train(tmp_path, tiny_bert, text_files["train"],
               train={"epochs": 1, "grad_accum": 3, "scheduler": "cosine", "optimizer": "sgd", "lr": 0.05,
                      "log_every": 1})
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["type"] == "train"]
    # 216 training rows / 16 per batch = 14 batches -> 5 optimizer steps with accumulation 3
    assert train_lines[-1]["step"] == 5
    assert train_lines[-1]["lr"] < train_lines[1]["lr"]  # decayed
    assert s["best_step"] >= 1


def test_class_weights(tmp_path, tiny_bert, text_files):
    s = _train(tmp_path, tiny_bert, text_files["train"], task={"class_weights": True}, train={"max_steps": 3})
    assert s["best"] is not None


def test_time_budget_stops_with_the_best_checkpoint(tmp_path, tiny_bert, text_files):
    s = _train(tmp_path, tiny_bert, text_files["train"], train={"epochs": 50, "max_minutes": 1e-6})
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["fit"]["out_of_time"] is True and info["fit"]["steps"] == 1
    assert s["best_step"] == 1 and (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_vit_run_loads_with_plain_transformers_image_class(tmp_path, tiny_vit, image_dirs):
    from transformers import AutoModelForImageClassification

    from fmtune.data.dataset import decode_image

    _train(tmp_path, tiny_vit, image_dirs["train"], train={"max_steps": 3})
    hf = AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "model", trust_remote_code=True).eval()
    files = sorted(image_dirs["test"].rglob("*.png"))[:6]
    pixels = torch.stack([decode_image(f, 32) for f in files]).float() / 255
    with torch.no_grad():
        probs = hf(pixel_values=(pixels - 0.5) / 0.5).logits.softmax(-1)
    ours = fmtune.predict(tmp_path / "run", image_dirs["test"], quiet=True).set_index("image")
    expected = torch.tensor(ours.loc[[str(f) for f in files], ["prob_bottom", "prob_top"]].to_numpy()).float()
    assert torch.allclose(probs, expected, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "model")


def test_two_runs_with_different_precisions_in_one_process(tmp_path, tiny_bert, text_files):
    _train(tmp_path, tiny_bert, text_files["train"], name="a", train={"max_steps": 1, "precision": "bf16"})
    s = _train(tmp_path, tiny_bert, text_files["train"], name="b", train={"max_steps": 1, "precision": "fp32"})
    assert s["best"] is not None


def test_throughput_counts_each_example_once(tmp_path, tiny_bert, text_files):
    _train(tmp_path, tiny_bert, text_files["train"], train={"epochs": 2, "log_every": 3})
    fit = json.loads((tmp_path / "run" / "run.json").read_text())["fit"]
    assert fit["samples_per_s"] == pytest.approx(216 * 2 / fit["seconds"], rel=1e-6)


def test_texts_cut_at_max_length_are_counted_and_a_length_suggested(tmp_path, tiny_bert, text_files, capsys):
    df = pd.read_csv(text_files["train"])
    long = df.copy()
    long.loc[::2, "text"] = [" ".join([t] * 8) for t in long["text"][::2]]  # half the rows: 8 times as long
    path = tmp_path / "long.csv"
    long.to_csv(path, index=False)
    fmtune.train(cfg_dict(tiny_bert, path, out=str(tmp_path / "run"), train={"max_steps": 1}), quiet=False)
    note = json.loads((tmp_path / "run" / "run.json").read_text())["long_texts"]
    n_train = json.loads((tmp_path / "run" / "run.json").read_text())["data"]["train"]["rows"]
    assert note["max_length"] == 32 and note["model_limit"] == 64  # the tiny BERT's 64 positions
    assert 0.4 < note["share"] < 0.6 and note["texts_cut"] == round(note["share"] * n_train)
    assert note["tokens_p95"] > 32 and note["suggested_max_length"] == min(64, -(-note["tokens_p95"] // 32) * 32)
    assert "of the training texts" in capsys.readouterr().err
    # short texts: no note
    fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(tmp_path / "short"), train={"max_steps": 1}),
                 quiet=True)
    assert "long_texts" not in json.loads((tmp_path / "short" / "run.json").read_text())


def test_long_texts_raise_an_unset_max_length_from_the_data(tmp_path, tiny_bert, text_files, capsys):
    """model.max_length unset: 128, or the length that keeps 95% of the training texts whole when
    more (at most 256); the run keeps the length chosen (config.yaml, the saved model)."""
    import shutil

    from transformers import BertConfig, BertModel

    model = tmp_path / "bert-512"
    shutil.copytree(tiny_bert, model)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=BertConfig.from_pretrained(tiny_bert).vocab_size, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=512)).save_pretrained(model)
    df = pd.read_csv(text_files["train"])
    for name, times in (("long", 20), ("longer", 60)):
        long = df.assign(text=[" ".join([t] * times) for t in df["text"]])  # about 7 tokens per copy
        long.to_csv(tmp_path / f"{name}.csv", index=False)
    cfg = cfg_dict(model, tmp_path / "long.csv", out=str(tmp_path / "run"), train={"max_steps": 1})
    del cfg["model"]["max_length"]
    fmtune.train(cfg, quiet=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    auto = run["max_length_auto"]
    assert 128 < auto["tokens_p95"] <= 256 and auto["max_length"] == -(-auto["tokens_p95"] // 32) * 32
    assert "long_texts" not in run  # 95% now fit
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["max_length"] == auto["max_length"]
    assert fmtune.load(tmp_path / "run").bundle.max_length == auto["max_length"]
    assert f"model.max_length {auto['max_length']} (95% of the training texts fit" in capsys.readouterr().err
    # longer still: at most 256, and the note says how many are cut; short texts: 128, nothing said
    cfg.update(out=str(tmp_path / "longer"), data={**cfg["data"], "train": str(tmp_path / "longer.csv")})
    fmtune.train(cfg, quiet=True)
    run = json.loads((tmp_path / "longer" / "run.json").read_text())
    assert run["max_length_auto"]["max_length"] == 256 and run["long_texts"]["max_length"] == 256
    cfg.update(out=str(tmp_path / "short"), data={**cfg["data"], "train": str(text_files["train"])})
    fmtune.train(cfg, quiet=True)
    assert "max_length_auto" not in json.loads((tmp_path / "short" / "run.json").read_text())
    assert fmtune.load(tmp_path / "short").bundle.max_length == 128


def test_max_length_beyond_the_model_is_refused_and_the_default_fits_the_model(tmp_path, tiny_bert):
    from fmtune.config import ModelConfig
    from fmtune.errors import ConfigError
    from fmtune.tasks import Classification

    task = Classification(["a", "b"])
    with pytest.raises(ConfigError, match="model.max_length 100 is more than .* reads: 64 tokens"):
        build.create(ModelConfig(name=str(tiny_bert), max_length=100), task)
    assert build.create(ModelConfig(name=str(tiny_bert)), task).max_length == 64  # the default 128, cut to 64
    assert build.create(ModelConfig(name=str(tiny_bert), max_length=64), task).max_length == 64


def test_max_train_samples_is_a_stratified_subset(tmp_path, tiny_bert, text_files):
    _train(tmp_path, tiny_bert, text_files["train"], data={"max_train_samples": 100}, train={"max_steps": 1})
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert data["train"]["rows"] == 90 and data["val"]["rows"] == 10
    counts = data["train"]["label_counts"]
    full = pd.read_csv(text_files["train"])["label"].value_counts(normalize=True)
    assert counts["pos"] / 90 == pytest.approx(full["pos"], abs=0.02)  # stratified: same class balance


def test_precision_probe_times_both_and_leaves_no_trace(tiny_bert):
    """The probe used on GPUs (where a small model can be slower in bf16) works on any device; here, CPU."""
    from conftest import random_batch, small_bundle

    from fmtune.tasks import Classification
    from fmtune.training import hardware

    task = Classification(["a", "b"])
    bundle = small_bundle(tiny_bert, task)
    batch = {**random_batch(bundle), "labels": torch.tensor([0, 1, 0, 1])}
    before = torch.random.get_rng_state()
    hw = hardware.Hardware("cpu", "bf16", 1, "x")
    out = hardware.probe_precision(hw, bundle.model, batch, task.loss, steps=2)
    assert out.precision in ("no", "bf16") and (out.device, out.threads) == ("cpu", 1)
    assert "fp32" in out.why and "bf16" in out.why and "ms/step" in out.why
    assert all(p.grad is None for p in bundle.model.parameters())
    assert torch.equal(torch.random.get_rng_state(), before)  # dropout drew from a forked generator
    # a model whose fp32 step cannot be 1.1x slower than bf16 with min_gain huge stays fp32
    assert hardware.probe_precision(hw, bundle.model, batch, task.loss, steps=1, min_gain=1e9).precision == "no"


def test_test_metrics_after_mixed_precision_training_match_a_fresh_evaluation(tmp_path, tiny_bert, text_files,
                                                                              monkeypatch):
    """accelerate wraps the model's forward in autocast for bf16 training; the test split at the end must
    be scored like `fmtune evaluate` scores the saved model (in the precision it predicts in, made fp32 here so
    that the wrapper's bf16 would show), not under that wrapper."""
    from fmtune.training import hardware

    monkeypatch.setattr(hardware, "inference_autocast", lambda precision, device_type: None)
    res = _train(tmp_path, tiny_bert, text_files["regression_train"], task={"type": "regression"},
                 data={"test": str(text_files["regression_test"])}, train={"precision": "bf16", "epochs": 1})
    assert res["eval"]["precision"] == "fp32"
    again = fmtune.evaluate(tmp_path / "run", quiet=True)
    # regression errors show any bf16 rounding (~1e-3 relative); float32 sums over 60 rows may differ in
    # the last bit between the two processes' thread settings
    assert res["eval"]["test"] == pytest.approx(again["test"], rel=1e-6)


def test_macro_f1_averages_the_classes_that_occur():
    """A test set without some class (new classes only, after `fmtune continue`) is not scored as if
    the model had failed on the missing classes; a class predicted but absent still counts."""
    from fmtune.tasks import Classification

    task = Classification(["a", "b", "c", "d"])
    logits = torch.eye(4)[[0, 1, 1, 0]] * 5
    perfect = task.metrics(logits, torch.tensor([0, 1, 1, 0]))
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == pytest.approx(1.0)
    wrong = task.metrics(torch.eye(4)[[0, 1, 2, 0]] * 5, torch.tensor([0, 1, 1, 0]))  # 'c' predicted once
    assert wrong["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)


def test_a_tie_on_the_metric_is_broken_by_the_validation_loss():
    from fmtune.training.loop import _better

    best = {"step": 10, "wer": 0.25, "loss": 1.5, "best": True}
    assert _better({"wer": 0.2, "loss": 9.0}, 0.25, best, "wer", False, 0.0)  # the metric decides first
    assert not _better({"wer": 0.3, "loss": 0.1}, 0.25, best, "wer", False, 0.0)
    assert _better({"wer": 0.25, "loss": 1.2}, 0.25, best, "wer", False, 0.0)  # tie: lower loss wins
    assert not _better({"wer": 0.25, "loss": 1.6}, 0.25, best, "wer", False, 0.0)
    assert not _better({"wer": 0.25}, 0.25, best, "wer", False, 0.0)  # no loss to compare: the first stays
    assert _better({"wer": 0.2500001, "loss": 1.4}, 0.25, best, "wer", False, 0.0)  # equal as logged
    assert _better({"accuracy": 0.5, "loss": 0.3}, None, None, "accuracy", True, 0.0)  # the first evaluation
    assert not _better({"loss": 1.5}, 1.5, {"loss": 1.5}, "loss", False, 0.0)


def test_epochs_and_batch_size_default_per_task_and_a_setting_wins(tmp_path):
    from fmtune import config
    from fmtune.tasks import TASKS, task_class

    own = {name: task_class(name).default_train for name in TASKS.names()}
    # a dense model's activations: 150-250 MB an image at 512 px, so 8 an evaluation batch rather than 128
    assert own["detection"] == own["segmentation"] == {"epochs": 12, "batch_size": 8, "eval_batch_size": 8}
    assert own["generation"] == own["ner"] == {"batch_size": 8}
    for name in TASKS.names():
        train = config.from_dict({"task": {"type": name}}).train
        assert (train.epochs, train.batch_size, train.eval_batch_size) == (
            own[name].get("epochs", config.DEFAULT_EPOCHS), own[name].get("batch_size", config.DEFAULT_BATCH_SIZE),
            own[name].get("eval_batch_size", config.DEFAULT_EVAL_BATCH_SIZE)), name
        chosen = config.from_dict({"task": {"type": name},
                                   "train": {"epochs": 2, "batch_size": 5, "eval_batch_size": 3}}).train
        assert (chosen.epochs, chosen.batch_size, chosen.eval_batch_size) == (2, 5, 3), name
    # a run's config.yaml holds the resolved numbers, so resuming or continuing it does not depend on the defaults
    cfg = config.from_dict({"task": {"type": "detection"}})
    cfg.save(tmp_path / "config.yaml")
    saved = config.load(tmp_path / "config.yaml").to_dict()["train"]
    assert (saved["epochs"], saved["batch_size"], saved["eval_batch_size"]) == (12, 8, 8)
    with pytest.raises(fmtune.errors.ConfigError, match="train.batch_size"):
        config.from_dict({"train": {"batch_size": 0}})


def test_a_small_training_set_gets_smaller_batches_for_min_steps(tmp_path, tiny_st_bert, text_files):
    from fmtune import config

    def enough(n, **train):
        cfg = config.from_dict({"train": train})
        new, why = config.enough_steps(cfg, n)
        return new.train.batch_size, why

    # 1,000 rows, 3 epochs of 32 = 96 steps < 200: the largest batch that gives 200 steps is 15 (201 steps)
    batch, why = enough(1000)
    assert batch == 15 and "96 optimizer steps" in why and "(201 steps)" in why
    assert enough(3000) == (32, None)  # 282 steps: enough already
    assert enough(300)[0] == config.MIN_STEPS_BATCH  # never below 8, even short of min_steps (114 steps)
    assert enough(300, min_steps=None) == (32, None)
    with pytest.raises(fmtune.errors.ConfigError, match="train.min_steps: must be at least 1 or null"):
        config.from_dict({"train": {"min_steps": 0}})
    assert enough(300, max_steps=40) == (32, None)  # a step budget the user set stands
    batch, why = enough(1000, grad_accum=2)  # steps count accumulated batches: 3 x ceil(ceil(1000 / 8) / 2)
    assert batch == config.MIN_STEPS_BATCH and "(189 steps)" in why
    assert enough(300, batch_size=8) == (8, None)
    cfg = config.from_dict({"strategy": {"name": "head"}})  # the probe is solved, not stepped
    assert config.enough_steps(cfg, 300)[0].train.batch_size == 32
    # end to end: the plan's batch is the one trained, saved in config.yaml and said in run.json
    _train(tmp_path, tiny_st_bert, text_files["train"], train={"min_steps": 60, "epochs": 2})
    run = tmp_path / "run"
    info = json.loads((run / "run.json").read_text())
    assert "batches of 8 instead" in info["small_training_set"]  # 216 rows x 2 epochs / 60 steps -> 7, so 8
    assert info["fit"]["steps"] == 2 * 27  # ceil(216 / 8) a epoch
    assert fmtune.config.load(run / "config.yaml").train.batch_size == 8


def test_batchnorm_cnns_fine_tune_at_their_own_default_learning_rate(tmp_path, tiny_resnet, tiny_vit):
    """Full / last_n fine-tuning of a BatchNorm CNN defaults to config.CNN_LR (at the transformers' 5e-5
    and at 2e-4, EfficientNet-Lite0 and MobileNetV2 beat their linear-probe start in 1 of 12 runs:
    bench/image_lr.py); a transformer, an adapter, a rate set by hand and a task's own default are left alone."""
    from fmtune import config
    from fmtune.tasks import task_class

    def lr(model, strategy="full", **extra):
        return config.from_dict({"model": {"name": str(model)}, "strategy": {"name": strategy}, **extra}).train.lr

    assert lr("efficientnet-lite0") == lr("mobilenet-v2", "last_n") == lr(tiny_resnet) == config.CNN_LR
    assert lr(tiny_vit) == lr("minilm-l6") == config.DEFAULT_LR["full"]
    assert lr("mobilenet-v2", "lora") == config.DEFAULT_LR["lora"]
    assert lr("mobilenet-v2", train={"lr": 3e-4}) == 3e-4
    assert lr("mobilenet-v2", task={"type": "segmentation"}) == task_class("segmentation").default_lrs["full"]
    convnext = tmp_path / "convnext"
    convnext.mkdir()
    (convnext / "config.json").write_text('{"model_type": "convnext"}')  # LayerNorm, not BatchNorm
    assert lr(convnext) == config.DEFAULT_LR["full"]


def test_inference_batches_cover_every_row_once_and_cut_where_padding_would_pass_its_share():
    from fmtune.data.dataset import INFER_MAX_PADDING, INFER_MIN_TOKENS, inference_batches, sorted_batches

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 40, 900), rng.integers(40, 128, 100)])  # a long tail
    batches = sorted_batches(lengths, 128, INFER_MIN_TOKENS)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert max(len(b) for b in batches) <= 128
    flat = [i for b in batches for i in b]
    assert (np.diff(lengths[flat]) >= 0).all()  # ascending: each batch pads to its last row
    for b, nxt in zip(batches, batches[1:]):
        tokens = int(lengths[b].sum())
        assert len(b) * lengths[b].max() <= (1 + INFER_MAX_PADDING) * tokens or tokens < INFER_MIN_TOKENS + 128
        if len(b) < 128:  # cut early: the next row would have padded too much
            assert (len(b) + 1) * lengths[nxt[0]] > (1 + INFER_MAX_PADDING) * (tokens + lengths[nxt[0]])

    def padded(bs):
        return sum(int(lengths[b].max()) * len(b) for b in bs) / lengths.sum()

    plain = sorted_batches(lengths, 128, None)
    assert [len(b) for b in plain] == [128] * 7 + [104]
    assert padded(batches) < 1.07 < 1.2 < padded(plain)  # 1.061 against 1.235: the short batches pad
    assert [len(b) for b in sorted_batches(np.full(300, 20), 128, 0)] == [128, 128, 44]  # one length: full batches

    class Rows:  # no lengths (images, audio): runs in order
        def __len__(self):
            return 5
    assert inference_batches(Rows(), 2, "cpu") == [[0, 1], [2, 3], [4]]
    text = type("Text", (Rows,), {"lengths": lengths})()
    assert inference_batches(text, 128, "cpu") == batches
    assert inference_batches(text, 128, "cuda") == plain  # unmeasured on a GPU: as before


def test_inference_gives_each_row_its_own_output_in_the_datasets_order(tiny_bert, monkeypatch):
    from fmtune.config import ModelConfig
    from fmtune.data import dataset
    from fmtune.tasks import Classification
    from fmtune.training.infer import infer

    monkeypatch.setattr(dataset, "INFER_MIN_TOKENS", 0)  # cut wherever padding would pass its share
    bundle = build.create(ModelConfig(name=str(tiny_bert), max_length=64), Classification(["a", "b"]))
    texts = [" ".join(["word"] * n) + f" {n}" for n in (30, 2, 17, 5, 44, 1, 9, 25, 3, 12, 29, 31)]
    ids = bundle.tokenizer(texts, truncation=True, max_length=64)["input_ids"]
    pad = bundle.tokenizer.pad_token_id
    ds = dataset.TextData(ids, None, pad)
    assert 4 < len(dataset.inference_batches(ds, 8, "cpu")) < len(texts)  # batches of several rows, cut early
    together, _ = infer(bundle.model, ds, 8)
    alone = torch.cat([infer(bundle.model, dataset.TextData([i], None, pad), 1)[0] for i in ids])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
