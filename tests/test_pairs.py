"""Sentence pairs (data.text_pair_column): tokenised as the tokenizer joins two texts, with segment
ids; trained, predicted, served, exported, explained, perturbed and ranked for labelling; refused
clearly where a command reads one text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FILLER, cfg_dict, make_text_rows

import fmtune
from fmtune.errors import ConfigError, DataError


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """The label is decided by the second text alone (its sentiment word); the first is filler. A
    model that did not read the second text would be at chance."""
    rng = np.random.default_rng(seed)
    second = make_text_rows(n, seed)
    first = [" ".join(rng.choice(FILLER, size=int(rng.integers(3, 9)))) for _ in range(n)]
    pd.DataFrame({"premise": first, "hypothesis": second["text"], "label": second["label"]}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pairs")
    return {"train": write_pairs(d / "train.csv", 240, 0), "val": write_pairs(d / "val.csv", 60, 1),
            "test": write_pairs(d / "test.csv", 80, 2)}


def _cfg(model, files, out, data=(), train=(), **sections):
    return cfg_dict(model, files["train"], out=str(out), train={"epochs": 6, **dict(train)}, **sections,
                    data={"val": str(files["val"]), "test": str(files["test"]), "text_column": "premise",
                          "text_pair_column": "hypothesis", **dict(data)})


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_bert, pair_files) -> Path:
    out = tmp_path_factory.mktemp("pair-run") / "run"
    fmtune.train(_cfg(tiny_bert, pair_files, out), quiet=True)
    return out


def test_pairs_are_tokenised_as_the_tokenizer_joins_them_with_segment_ids(tiny_bert):
    from transformers import AutoTokenizer

    from fmtune.config import ModelConfig
    from fmtune.models import build
    from fmtune.tasks import Classification

    bundle = build.create(ModelConfig(name=str(tiny_bert), max_length=12), Classification(["neg", "pos"]))
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    first, second = " ".join(["the movie"] * 10), "good film"
    ds = bundle.text_data([(first, second), ("bad", "very good")])
    assert ds.input_ids[1] == tok("bad", "very good")["input_ids"]
    assert len(ds.input_ids[0]) == 12 and ds.input_ids[0][-3:-1] == tok("good film", add_special_tokens=False)[
        "input_ids"]  # longest_first: the long first text is cut, the short second kept whole
    batch = ds.collate([0, 1])
    assert batch["token_type_ids"][1].tolist()[:6] == [0, 0, 0, 1, 1, 1] and batch["token_type_ids"][1, 6:].sum() == 0
    assert ds.text(1, tok) == "bad [SEP] very good"
    assert "token_type_ids" not in bundle.text_data(["one text"]).collate([0])  # one text: as before


def test_a_pair_run_reads_the_second_text(pair_run):
    """The label is in the second text only: the run beats chance by far only if it reads it."""
    s = json.loads((pair_run / "eval.json").read_text())
    assert s["test"]["accuracy"] >= 0.85, s["test"]


@pytest.mark.parametrize("strategy", ["head", "lora", "last_n"])
def test_pairs_train_with_the_feature_cache_and_adapters(tmp_path, tiny_bert, pair_files, strategy):
    """The segment ids reach the backbone through the frozen-feature cache (head, last_n) and peft."""
    s = fmtune.train(_cfg(tiny_bert, pair_files, tmp_path / "run", strategy={"name": strategy, "n": 1},
                          train={"epochs": 1}), quiet=True)
    assert 0.0 <= s["eval"]["test"]["accuracy"] <= 1.0
    pred = fmtune.load(tmp_path / "run")
    assert pred.predict(("the plot", "a great film"))["label"] in ("neg", "pos")


def test_predict_a_table_one_pair_or_a_list_and_the_missing_column(tmp_path, pair_run, pair_files):
    df = fmtune.predict(pair_run, pair_files["test"], quiet=True)
    assert (df["predicted_label"] == df["label"]).mean() >= 0.85 and df["error"].isna().all()
    pred = fmtune.load(pair_run)
    one = pred.predict(("the plot", "a great film"))
    assert isinstance(one, dict) and one["label"] == "pos"
    assert [r["label"] for r in pred.predict([("the plot", "an awful film"), ("a scene", "great music")])] == [
        "neg", "pos"]
    with pytest.raises(DataError, match=r"input 0: this run reads pairs of texts \(premise, hypothesis\)"):
        pred.predict("only one text")
    one_column = tmp_path / "one.csv"
    pd.read_csv(pair_files["test"]).drop(columns="hypothesis").to_csv(one_column, index=False)
    with pytest.raises(DataError, match=r"one.csv: no second text column 'hypothesis'.*data.text_pair_column"):
        fmtune.predict(pair_run, one_column, quiet=True)


def test_serve_pairs_as_lists_or_objects(pair_run):
    from fastapi.testclient import TestClient

    from fmtune.serve import create_app

    with TestClient(create_app(fmtune.load(pair_run))) as client:
        r = client.post("/predict", json={"inputs": [["the plot", "a great film"],
                                                     {"premise": "a scene", "hypothesis": "an awful story"}]})
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == ["pos", "neg"]
        r = client.post("/predict", json={"inputs": [{"premise": "a scene"}]})
        assert r.status_code == 422 and "'hypothesis' is missing" in r.json()["error"]
        # the Inference API's format (POST /): a pair as transformers' pipeline takes one, alone or in a list
        one = client.post("/", json={"inputs": {"text": "the plot", "text_pair": "a great film"}})
        assert one.status_code == 200, one.text
        assert one.json()[0][0]["label"] == "pos" and len(one.json()) == 1
        both = client.post("/", json={"inputs": [{"text": "the plot", "text_pair": "a great film"},
                                                 {"text": "a scene", "text_pair": "an awful story"}],
                                      "parameters": {"top_k": 1}})
        assert both.status_code == 200 and [b[0]["label"] for b in both.json()] == ["pos", "neg"], both.text
        r = client.post("/", json={"inputs": {"text": "the plot"}})
        assert r.status_code == 422 and "'text' and 'text_pair'" in r.json()["error"]


def test_onnx_export_takes_segment_ids_and_matches_the_run(tmp_path, pair_run):
    from fmtune.exporter import export

    export(pair_run, out=tmp_path / "onnx", format="onnx", quiet=True)  # checked against the run on its rows
    prep = json.loads((tmp_path / "onnx" / "preprocessing.json").read_text())
    assert prep["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and prep["text_pairs"] is True
    pairs = [("the plot", "a great film"), ("a very long scene of the movie", "awful")]
    torch_probs = [r["probabilities"]["pos"] for r in fmtune.load(pair_run).predict(pairs)]
    onnx_probs = [r["probabilities"]["pos"] for r in fmtune.load(pair_run, backend="onnx").predict(pairs)]
    assert onnx_probs == pytest.approx(torch_probs, abs=1e-4)


def test_robustness_perturbs_both_texts_of_a_pair(tmp_path, pair_run, pair_files, monkeypatch):
    """fmtune robustness on a pair run: clean, it scores what evaluate scores (both texts read); each
    perturbation rewrites the first and the second text of every pair."""
    import importlib

    rob = importlib.import_module("fmtune.robustness")  # the module (fmtune.robustness is also the function)
    seen: list[str] = []
    perturb = rob.perturb_text

    def spy(text, name, rate, rng):
        seen.append(text)
        return perturb(text, name, rate, rng)

    monkeypatch.setattr(rob, "perturb_text", spy)
    report = rob.robustness(pair_run, suite="quick", out=tmp_path / "rob", quiet=True)
    res = report["runs"]["run"]
    evaluated = json.loads((pair_run / "eval.json").read_text())["test"]["accuracy"]
    assert res["clean"] == pytest.approx(evaluated, abs=1e-4) and res["examples"] == 80
    assert res["perturbations"] and all(len(p["results"]) == 3 for p in res["perturbations"].values())
    test = pd.read_csv(pair_files["test"])
    assert set(test["premise"]) <= set(seen) and set(test["hypothesis"]) <= set(seen)
    assert (tmp_path / "rob" / "robustness.json").is_file()


def test_select_ranks_a_pool_of_pairs(tmp_path, pair_run, pair_files):
    """fmtune select on a pair run reads both texts of each pool row: the rows it picks by margin
    are the ones the run is least sure of when it predicts the pairs."""
    from fmtune.active import select

    pool = pd.read_csv(pair_files["test"]).drop(columns="label")
    pool.to_csv(tmp_path / "pool.csv", index=False)
    out = select(pair_run, tmp_path / "pool.csv", 10, strategy="margin", output=tmp_path / "next.csv", quiet=True)
    probs = [r["probabilities"] for r in fmtune.load(pair_run).predict(list(zip(pool["premise"], pool["hypothesis"])))]
    margins = np.array([abs(p["pos"] - p["neg"]) for p in probs])
    assert sorted(margins[out.index]) == pytest.approx(sorted(margins)[:10], abs=1e-5)
    assert len(pd.read_csv(tmp_path / "next.csv")) == 10
    mixed = select(pair_run, tmp_path / "pool.csv", 10, quiet=True)  # k-center on the pairs, the training pairs too
    assert len(set(mixed.index)) == 10
    pool.loc[3, "hypothesis"] = None
    pool.to_csv(tmp_path / "gap.csv", index=False)
    with pytest.raises(DataError, match=r"gap.csv: row 4 \(line 5\): no text in column 'hypothesis'"):
        select(pair_run, tmp_path / "gap.csv", 10, quiet=True)


def test_explain_attributes_both_texts_and_finds_the_deciding_word_in_the_second(tmp_path, pair_run, pair_files):
    """fmtune explain on a pair run: every word of both texts gets an attribution, marked with the
    text it is in; the label is decided by the second text's sentiment word, and that word is the
    strongest evidence for a right prediction."""
    from conftest import NEG, POS

    from fmtune.explain import explain

    df = pd.read_csv(pair_files["test"]).head(16)
    res = explain(pair_run, [str(pair_files["test"])], limit=16, out=tmp_path / "x", quiet=True)
    hits = n = 0
    for item, (_, row) in zip(res["items"], df.iterrows()):
        assert item["true"] == row["label"] and list(item["input"]) == [row["premise"], row["hypothesis"]]
        assert [w["word"] for w in item["words"] if w["text"] == 0] == row["premise"].split()
        assert [w["word"] for w in item["words"] if w["text"] == 1] == row["hypothesis"].split()
        if item["predicted"] != item["true"]:
            continue
        n += 1
        top = max(item["words"], key=lambda w: w["attribution"])
        hits += top["text"] == 1 and top["word"] in POS + NEG
    assert n >= 12 and hits / n >= 0.8, (hits, n)
    assert "second text:" in (tmp_path / "x" / "attributions.html").read_text()
    one = explain(pair_run, ['["a long scene", "an awful film"]'], out=tmp_path / "y", quiet=True)["items"][0]
    assert one["predicted"] == "neg" and {w["text"] for w in one["words"]} == {0, 1}
    wrong = explain(pair_run, misclassified=3, data=pair_files["test"], out=tmp_path / "z", quiet=True)
    assert all(len(it["input"]) == 2 for it in wrong["items"])
    with pytest.raises(DataError, match=r"--input: this run reads pairs of texts \(premise, hypothesis\)"):
        explain(pair_run, ["only one text"], out=tmp_path / "w", quiet=True)


def test_select_simulates_the_loop_on_pairs(tmp_path, tiny_bert, pair_files):
    """fmtune select --simulate with a pair config: every round trains on pairs and picks pool pairs."""
    from fmtune import active
    from fmtune import config as config_mod

    cfg = config_mod.from_dict(_cfg(tiny_bert, pair_files, tmp_path / "unused", train={"epochs": 2}))
    res = active.simulate(cfg, pair_files["train"], pair_files["test"], tmp_path / "al", start=4, step=8, rounds=1,
                          strategies=("mix",), quiet=True)
    assert [p["labels"] for p in res["curves"]["mix"]] == [8, 16]
    rounds = [pd.read_csv(tmp_path / "al" / "data" / f"mix-round-{r}.csv") for r in range(2)]
    assert rounds[1]["hypothesis"].notna().all() and len(rounds[1].drop_duplicates()) == 16


def test_counterfactual_fairness_swaps_terms_in_both_texts(tmp_path, pair_run, pair_files):
    """fmtune fairness --counterfactual on a pair run: terms are swapped in whichever text holds
    them; swapping the second text's sentiment words flips the decision, swapping filler words in
    the first leaves it."""
    from conftest import NEG, POS

    from fmtune import fairness

    test = pd.read_csv(pair_files["test"]).assign(grp=lambda d: np.where(np.arange(len(d)) % 2, "a", "b"))
    test.to_csv(tmp_path / "test.csv", index=False)
    first_words = sorted({w for t in test["premise"] for w in t.split()})[:2]
    terms = {"sentiment": [list(p) for p in zip(POS, NEG)], "filler": [first_words]}
    (tmp_path / "terms.json").write_text(json.dumps(terms))
    res = fairness.run_fairness(pair_run, tmp_path / "test.csv", groups=["grp"], counterfactual=True,
                                terms=tmp_path / "terms.json", n_boot=50, quiet=True)
    by = res["counterfactual"]["by"]
    assert by["sentiment"]["rows"] == len(test) and by["sentiment"]["flip_rate"] >= 0.8
    assert by["filler"]["rows"] > 0 and by["filler"]["flip_rate"] <= 0.2
    example = by["sentiment"]["largest"][0]
    assert len(example["text"]) == 2 and example["text"][0] == example["counterfactual"][0]  # the first unchanged


def test_augmentation_perturbs_both_texts_and_keeps_the_segments(tmp_path, pair_run, pair_files, tiny_bert):
    """train.augment on pairs: the two texts are split apart at the separator, each perturbed, and
    read again as a pair (segment ids kept); a run trains with it."""
    from fmtune.config import AugmentConfig
    from fmtune.data.prepare import make_dataset
    from fmtune.data.readers import read_any
    from fmtune.predictor import Predictor
    from fmtune.training.perturb import Augmented

    pred = Predictor(pair_run)
    df = read_any(pair_files["test"])
    ds, _ = make_dataset(df, pred.bundle, pred.task, pred.config.data)
    tok = pred.bundle.tokenizer
    assert [ds.pair(i, tok) for i in range(3)] == [(a.lower(), b.lower()) for a, b in  # tiny_bert is uncased
                                                   zip(df["premise"][:3], df["hypothesis"][:3])]
    idx = list(range(16))
    plain = ds.collate(idx)
    batch = Augmented(ds, AugmentConfig(word_drop=0.3), 7, pred.bundle).collate(idx)
    assert batch["input_ids"].shape != plain["input_ids"].shape or not torch.equal(batch["input_ids"],
                                                                                  plain["input_ids"])
    sep = tok.sep_token_id
    for row, types in zip(batch["input_ids"].tolist(), batch["token_type_ids"].tolist()):
        ends = [k for k, t in enumerate(row) if t == sep]
        assert len(ends) == 2 and types[: ends[0] + 1] == [0] * (ends[0] + 1)  # still two texts, two segments
        assert types[ends[0] + 1: ends[1] + 1] == [1] * (ends[1] - ends[0])
    s = fmtune.train(_cfg(tiny_bert, pair_files, tmp_path / "run", train={"epochs": 1, "augment": {"typos": 0.05}}),
                     quiet=True)
    assert 0.0 <= s["eval"]["test"]["accuracy"] <= 1.0


def test_self_training_pseudo_labels_pairs(tmp_path, tiny_bert, pair_files):
    """--unlabeled on a pair run: the pool's pairs are predicted and the confident ones trained on,
    both texts kept; the label is in the second text, so right pseudo-labels need both read."""
    pool = tmp_path / "pool.csv"
    write_pairs(pool, 120, 5)
    few = tmp_path / "few.csv"
    pd.read_csv(pair_files["train"]).groupby("label").head(24).to_csv(few, index=False)
    cfg = _cfg(tiny_bert, {**pair_files, "train": few}, tmp_path / "run", semi={"unlabeled": str(pool), "rounds": 1},
               train={"epochs": 10})
    s = fmtune.train(cfg, quiet=True, report=False)
    rounds = s["selftrain"]["rounds"]
    assert rounds[1]["pseudo_labelled"] > 0 and rounds[1]["pseudo_right"] >= 0.8 * rounds[1]["pseudo_labelled"]
    data = pd.read_csv(tmp_path / "run" / "selftrain-data" / "train-round-1.csv")
    assert list(data.columns) == ["premise", "hypothesis", "label"] and data["hypothesis"].notna().all()
    assert set(data["premise"]) - set(pd.read_csv(few)["premise"])  # pool pairs were added


def test_prompt_tuning_refuses_pairs_and_the_two_columns_must_differ(tmp_path, tiny_bert, pair_files):
    with pytest.raises(ConfigError, match="data.text_pair_column: prompt tuning does not read sentence pairs"):
        fmtune.train(_cfg(tiny_bert, pair_files, tmp_path / "p", strategy={"name": "prompt"}), quiet=True)
    with pytest.raises(ConfigError, match="data.text_pair_column: must name another column"):
        fmtune.train(_cfg(tiny_bert, pair_files, tmp_path / "s", data={"text_pair_column": "premise"}), quiet=True)


def test_a_table_of_pairs_is_read_as_pairs_without_the_setting(tmp_path, tiny_bert, pair_files):
    """GLUE's MRPC (sentence1, sentence2, label) and SNLI (premise, hypothesis) train as pairs without settings,
    said and kept for predict; QNLI's question and sentence are a pair, not the one usual text column 'sentence'; a
    table of pairs given to a run that reads one text is told how a pair run would read it."""
    import yaml

    from fmtune.config import DataConfig
    from fmtune.data.prepare import read_frames
    from fmtune.data.readers import require_text_column

    glue = tmp_path / "mrpc.csv"
    df = pd.read_csv(pair_files["train"])
    df.rename(columns={"premise": "sentence1", "hypothesis": "sentence2"}).to_csv(glue, index=False)
    s = fmtune.train(cfg_dict(tiny_bert, glue, out=str(tmp_path / "r"), train={"max_steps": 2}), quiet=True)
    assert s["columns_read"] == {"text_column": "sentence1", "text_pair_column": "sentence2"}
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["data"]
    assert (saved["text_column"], saved["text_pair_column"]) == ("sentence1", "sentence2")
    got = fmtune.predict(tmp_path / "r", glue, quiet=True)
    assert got["error"].isna().all() and len(got) == len(df)
    assert fmtune.load(tmp_path / "r").predict([df[["premise", "hypothesis"]].iloc[0].tolist()])[0]["label"] == \
        got["label"][0]
    df.to_csv(tmp_path / "snli.csv", index=False)
    df.rename(columns={"premise": "question", "hypothesis": "sentence"}).to_csv(tmp_path / "qnli.csv", index=False)
    for name, pair in (("snli", ("premise", "hypothesis")), ("qnli", ("question", "sentence"))):
        frames = read_frames(DataConfig(train=str(tmp_path / f"{name}.csv")), "classification", 0)
        assert frames.settled == dict(zip(("text_column", "text_pair_column"), pair)), name
    with pytest.raises(DataError, match=r"These look like pairs of texts: --set data.text_column=sentence1 --set "
                                        r"data.text_pair_column=sentence2"):
        require_text_column(pd.read_csv(glue), "text")
