"""A Hugging Face dataset saved with ``save_to_disk`` (Arrow files, state.json, dataset_info.json; a DatasetDict:
dataset_dict.json and a folder per split) given as --data. Written here as ``datasets`` writes it (an Arrow stream,
its features in dataset_info.json): the ``datasets`` package itself is not a dependency."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import cfg_dict
from test_architectures import make_encoder
from test_ner import write_conll

import fmtune
from fmtune.data.conll import read_conll
from fmtune.errors import DataError


def save_to_disk(folder: Path, table: pa.Table, features: dict) -> Path:
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}))
    (folder / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_fingerprint": "0", "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": folder.name}))
    return folder


def sentiment(n: int, seed: int) -> pa.Table:
    import random

    rng = random.Random(seed)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "poor", "bad"]
    labels = [i % 2 for i in range(n)]
    texts = [f"the film was {rng.choice(good if y else bad)} and {rng.choice(good if y else bad)}" for y in labels]
    return pa.table({"sentence": texts, "label": pa.array(labels, pa.int64())})


FEATURES = {"sentence": {"dtype": "string", "_type": "Value"}, "label": {"names": ["negative", "positive"],
                                                                        "_type": "ClassLabel"}}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("enc") / "bert", "bert")


def test_a_dataset_dict_saved_to_disk_trains_on_its_splits(encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "sst"
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1), ("test", 16, 2)):
        save_to_disk(root / split, sentiment(n, seed), FEATURES)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    cfg = cfg_dict(encoder, root, out=str(tmp_path / "run"), data={"text_column": "sentence"},
                   train={"epochs": 1, "batch_size": 8})
    with pytest.warns(UserWarning, match=f"{root} ships its held-out splits: data.train = {root / 'train'}; data.val "
                                         f"= {root / 'validation'}; data.test = {root / 'test'}"):
        summary = fmtune.train(cfg, quiet=True)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["data"]["train"]["rows"] == 48 and run["data"]["val"]["rows"] == 16 and summary["eval"]["test"]
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["negative", "positive"]
    preds = fmtune.predict(tmp_path / "run", root / "test", quiet=True)  # a split folder to predict
    assert len(preds) == 16 and set(preds["label"]) <= {"negative", "positive"}
    assert len(fmtune.predict(tmp_path / "run", root, quiet=True)) == 16  # the DatasetDict: its test split
    assert fmtune.evaluate(tmp_path / "run", root, quiet=True)["n_test"] == 16
    assert len(list((tmp_path / "cache" / "datasets").glob("*.parquet"))) == 3  # each split converted once


def test_a_token_dataset_saved_to_disk_trains_ner(encoder, tmp_path, monkeypatch):
    """tokens + ner_tags (a Sequence of ClassLabel), as CoNLL-2003 and WNUT ship on the hub."""
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    rows = read_conll(write_conll(tmp_path / "ner.conll", 40, 0))
    names = sorted({t for tags in rows["tags"] for t in tags})
    table = pa.table({"tokens": list(rows["tokens"]), "ner_tags": [[names.index(t) for t in tags]
                                                                  for tags in rows["tags"]]})
    folder = save_to_disk(tmp_path / "wnut" / "train", table, {
        "tokens": {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"},
        "ner_tags": {"feature": {"names": names, "_type": "ClassLabel"}, "_type": "Sequence"}})
    summary = fmtune.train(cfg_dict(encoder, folder, out=str(tmp_path / "run"), task={"type": "ner"},
                                    train={"epochs": 1, "batch_size": 8}), quiet=True)
    assert summary["best"] is not None


def test_a_broken_saved_dataset_names_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    folder = save_to_disk(tmp_path / "d", sentiment(8, 0), FEATURES)
    (folder / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match="data-00000-of-00001.arrow: not an Arrow file a Hugging Face dataset writes"):
        fmtune.train(cfg_dict("minilm-l6", folder, out=str(tmp_path / "run")), quiet=True)
    (folder / "data-00000-of-00001.arrow").unlink()
    with pytest.raises(DataError, match=r"the dataset's Arrow files are missing \(data-00000-of-00001.arrow\)"):
        fmtune.train(cfg_dict("minilm-l6", folder, out=str(tmp_path / "run")), quiet=True)
