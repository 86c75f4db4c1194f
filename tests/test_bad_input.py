"""Every bad input gets an error (or warning) that names the file and the row, column or key."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import cfg_dict, hf_parquet, save_shape_images
from PIL import Image

import fmtune
from fmtune.config import load
from fmtune.data.readers import iter_chunks, read_any, read_table
from fmtune.errors import ConfigError, DataError, ModelError


def _train(tmp_path, model, train_file, **sections):
    return fmtune.train(cfg_dict(model, train_file, out=str(tmp_path / "run"), **sections), quiet=True)


def _csv(tmp_path, name, rows, columns=("text", "label")):
    p = tmp_path / name
    pd.DataFrame(rows, columns=list(columns)).to_csv(p, index=False)
    return p


# --- files -----------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv does not exist"):
        read_table(tmp_path / "nope.csv")


def test_empty_file_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        read_table(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="header.csv: no data rows"):
        read_table(tmp_path / "header.csv")


def test_a_file_not_in_utf8_is_read_in_the_encoding_it_is_in(tmp_path):
    """Kaggle's SMS Spam Collection and Financial PhraseBank are Windows-1252, CoNLL-2002 Latin-1, Excel saves
    "Unicode text" as UTF-16 and "CSV UTF-8" with a byte-order mark: each is read as it is, a file not UTF-8 said in a
    warning that names its first line that is not; an encoding given that the file is not in is an error naming the
    line."""
    import codecs

    p = tmp_path / "latin.csv"
    p.write_bytes("text,label\ngood film,pos\ncaf\xe9 noir \u201cgreat\u201d,neg\n".encode("cp1252"))
    with pytest.warns(UserWarning, match=r"latin.csv: not UTF-8 \(line 3, byte b'\\xe9'\): read as cp1252"):
        assert read_table(p)["text"].iloc[1] == "caf\xe9 noir \u201cgreat\u201d"
    with pytest.raises(DataError, match=r"latin.csv: line 3 \(row 2\) is not valid ascii \(byte b'\\xe9' at column "
                                        r"4\).*data.encoding"):
        read_table(p, encoding="ascii")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (given, it is not guessed)
        assert read_table(p, encoding="latin-1")["text"].iloc[0] == "good film"
    ru = tmp_path / "ru.csv"  # not Western: what is found, not cp1252's reading of its bytes
    ru.write_bytes(("text,label\n" + "\u042d\u0442\u043e \u0445\u043e\u0440\u043e\u0448\u0438\u0439 "
                    "\u0444\u0438\u043b\u044c\u043c,pos\n" * 30).encode("cp1251"))
    with pytest.warns(UserWarning, match="read as cp1251"):
        assert read_table(ru)["text"].iloc[0] == "\u042d\u0442\u043e \u0445\u043e\u0440\u043e\u0448\u0438\u0439 " \
            "\u0444\u0438\u043b\u044c\u043c"
    ja = tmp_path / "ja.csv"  # a multi-byte one
    ja.write_bytes(("text,label\n" + "\u3053\u308c\u306f\u672c\u5f53\u306b\u7d20\u6674\u3089\u3057\u3044,pos\n" * 20)
                   .encode("cp932"))
    with pytest.warns(UserWarning, match="read as cp932"):
        assert read_table(ja)["text"].iloc[0] == "\u3053\u308c\u306f\u672c\u5f53\u306b\u7d20\u6674\u3089\u3057\u3044"
    odd = tmp_path / "odd.csv"  # bytes cp1252 has no letter for (0x8d): latin-1, which reads any
    odd.write_bytes(b"text,label\n" + b"the car\x8ds are caf\xe9 good,pos\nbad film here,neg\n" * 20)
    with pytest.warns(UserWarning, match="read as latin-1"):
        assert read_table(odd)["text"].iloc[0] == "the car\x8ds are caf\xe9 good"
    rows = "text\tlabel\n" + "sehr sch\xf6n\tpos\nschlecht\tneg\nsch\xf6n\tpos\n" * 4
    (tmp_path / "unicode.txt").write_bytes(codecs.BOM_UTF16_LE + rows.encode("utf-16-le"))  # Excel's Unicode text
    (tmp_path / "bom.csv").write_bytes(codecs.BOM_UTF8 + rows.replace("\t", ",").encode())
    for name in ("unicode.txt", "bom.csv"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = read_table(tmp_path / name)
            chunk = next(iter_chunks(tmp_path / name, "utf-8", 100))[0]
        assert got.columns.tolist() == ["text", "label"] and got["text"].tolist() == chunk["text"].tolist() == [
            "sehr sch\xf6n", "schlecht", "sch\xf6n"] * 4, name


def write_sheet(df: pd.DataFrame, path: Path) -> Path:
    """``df`` as a spreadsheet of ``path``'s kind: .xlsx (openpyxl), .xls (xlwt: Excel 97-2003, as UCI's datasets
    ship), .ods (odfpy); its header the first row, an empty cell where a value is missing."""
    if path.suffix == ".xls":
        import xlwt

        book = xlwt.Workbook()
        sheet = book.add_sheet("Sheet1")
        for j, column in enumerate(df.columns):
            sheet.write(0, j, column)
            for i, value in enumerate(df[column], 1):
                if not pd.isna(value):
                    sheet.write(i, j, value.item() if hasattr(value, "item") else value)
        book.save(str(path))
    else:
        df.to_excel(path, index=False, engine="odf" if path.suffix == ".ods" else "openpyxl")
    return path


@pytest.mark.parametrize("suffix", [".xlsx", ".xls", ".ods"])
def test_a_spreadsheet_is_a_table(tmp_path, tiny_bert, text_files, suffix):
    """An Excel workbook (.xlsx; the old .xls, as UCI's datasets ship, was an unsupported file type, as was
    OpenDocument's .ods): its first sheet's rows, the first row the header, trains, predicts and evaluates as the CSV
    it came from; an empty cell is named by its sheet row; a file that is not a workbook says so."""
    df = pd.read_csv(text_files["train"]).head(60)
    train = write_sheet(df, tmp_path / f"train{suffix}")
    got = read_table(train)
    assert got["text"].tolist() == df["text"].tolist() and got["label"].tolist() == df["label"].tolist()
    numbers = read_table(write_sheet(pd.DataFrame({"x": [540.0, 332.5], "n": [28, 270]}), tmp_path / f"n{suffix}"))
    assert numbers.to_dict("list") == {"x": ["540", "332.5"], "n": ["28", "270"]}  # (as a CSV writes them)
    _train(tmp_path, tiny_bert, train, train={"max_steps": 2})
    predicted = fmtune.predict(tmp_path / "run", train, quiet=True)
    assert len(predicted) == 60 and predicted["error"].isna().all()
    assert fmtune.evaluate(tmp_path / "run", train, quiet=True)["n_test"] == 60
    bad = df.copy()
    bad.loc[3, "text"] = None
    write_sheet(bad, tmp_path / f"bad{suffix}")
    with pytest.raises(DataError, match=rf"bad{suffix}: row 4 \(sheet row 5\): column 'text' is empty"):
        _train(tmp_path / "b", tiny_bert, tmp_path / f"bad{suffix}", data={"max_bad_fraction": 0})
    (tmp_path / f"fake{suffix}").write_text("text,label\na,b\n")
    with pytest.raises(DataError, match=rf"fake{suffix}: cannot read as an? (Excel workbook|OpenDocument spreadsheet)"):
        read_table(tmp_path / f"fake{suffix}")


def test_jsonl_bad_line_and_parquet(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match="d.jsonl: line 2 is not valid JSON"):
        read_table(p)
    pq = tmp_path / "d.parquet"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "y"]}).to_parquet(pq)
    assert read_table(pq)["label"].tolist() == ["x", "y"]


def test_unsupported_suffix(tmp_path):
    (tmp_path / "d.docx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.docx'"):
        read_table(tmp_path / "d.docx")
    (tmp_path / "train.csv.7z").write_bytes(b"7z\xbc\xaf\x27\x1c")
    with pytest.raises(DataError, match=r"train.csv.7z: a compressed file \(.7z\) fmtune does not read in place; "
                                        r"unpack it first .* give the .csv file"):
        read_table(tmp_path / "train.csv.7z")
    (tmp_path / "photo").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")  # no suffix, not text: not read as lines
    with pytest.raises(DataError, match="unsupported file type ''"):
        read_table(tmp_path / "photo")


def test_compressed_tables_are_read_in_place(tmp_path, tiny_bert, text_files, monkeypatch):
    """Kaggle's and the hub's downloads as they come (``train.csv.gz``, ``test.csv.zip``, a ``.xz``) were an error
    asking to unpack them. Now a one-file compression or a zip of one table is unpacked once into the cache and read
    from there: training, evaluate and predict give what the plain files give; messages name the compressed file; a
    second read reuses the copy."""
    import lzma
    import zipfile

    cache = tmp_path / "cache"
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(cache))
    train = pd.read_csv(text_files["train"])
    train.to_csv(tmp_path / "train.csv.gz", index=False)
    with zipfile.ZipFile(tmp_path / "test.csv.zip", "w") as z:  # (with a README beside it: the table is named)
        z.write(text_files["test"], "test.csv")
        z.writestr("README.txt", "the test split")
    with lzma.open(tmp_path / "new.csv.xz", "wt") as f:
        pd.read_csv(text_files["test"])[["text"]].to_csv(f, index=False)
    assert read_table(tmp_path / "train.csv.gz").equals(read_table(text_files["train"]))
    copy = next(cache.glob("unpacked/train.csv.gz-*/train.csv"))
    stamp = copy.stat().st_mtime_ns
    fmtune.train(cfg_dict(tiny_bert, tmp_path / "train.csv.gz", out=str(tmp_path / "run"),
                          data={"test": str(tmp_path / "test.csv.zip")}, train={"max_steps": 2}), quiet=True)
    assert copy.stat().st_mtime_ns == stamp  # unpacked once
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert data["train"]["source"] == str(tmp_path / "train.csv.gz")
    plain = fmtune.evaluate(tmp_path / "run", text_files["test"], quiet=True)
    packed = fmtune.evaluate(tmp_path / "run", tmp_path / "test.csv.zip", quiet=True)
    assert packed["test"] == plain["test"] and packed["n_test"] == len(pd.read_csv(text_files["test"]))
    fmtune.predict(tmp_path / "run", tmp_path / "new.csv.xz", tmp_path / "pred.csv", quiet=True)
    fmtune.predict(tmp_path / "run", text_files["test"], tmp_path / "plain.csv", quiet=True)
    pred, plain = pd.read_csv(tmp_path / "pred.csv"), pd.read_csv(tmp_path / "plain.csv")
    assert pred["label"].tolist() == plain["predicted_label"].tolist() and len(pred) == len(plain)  # (its truth beside)
    from fmtune.paths import looks_like_path

    assert looks_like_path("gone.csv.gz") and not looks_like_path("a dull film")  # (predict: a file, not a text)
    bad = train.copy()
    bad.loc[4, "text"] = ""
    bad.to_csv(tmp_path / "bad.csv.gz", index=False)
    with pytest.raises(DataError, match=r"bad.csv.gz: row 5 \(line 6\): column 'text' is empty"):
        _train(tmp_path / "bad", tiny_bert, tmp_path / "bad.csv.gz", data={"max_bad_fraction": 0})


def test_tweeteval_line_aligned_text_and_label_files(tmp_path, tiny_bert, text_files):
    """TweetEval as its repository ships it: train_text.txt beside train_labels.txt (a class id a line) and
    mapping.txt naming the ids, val_ and test_ likewise. Each text file was read as texts without labels ("no
    label column"). Now a *text*.txt file with a *labels*.txt of as many lines beside it is read as a table, the
    ids named by mapping.txt; messages name the line; unequal files are an error naming both."""
    names = {"neg": 0, "pos": 1}
    for split in ("train", "val", "test"):
        df = pd.read_csv(text_files[split])
        (tmp_path / f"{split}_text.txt").write_text("\n".join(df["text"]) + "\n")
        (tmp_path / f"{split}_labels.txt").write_text("\n".join(str(names[v]) for v in df["label"]) + "\n")
    (tmp_path / "mapping.txt").write_text("0\tnegative\n1\tpositive\n")
    got = read_table(tmp_path / "train_text.txt")
    want = pd.read_csv(text_files["train"])
    assert got["text"].tolist() == want["text"].tolist()
    assert got["label"].tolist() == [{"neg": "negative", "pos": "positive"}[v] for v in want["label"]]
    fmtune.train(cfg_dict(tiny_bert, tmp_path / "train_text.txt", out=str(tmp_path / "run"),
                          data={"val": str(tmp_path / "val_text.txt"), "test": str(tmp_path / "test_text.txt")},
                          train={"max_steps": 2}), quiet=True)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["negative", "positive"]
    assert fmtune.evaluate(tmp_path / "run", tmp_path / "test_text.txt", quiet=True)["n_test"] == len(
        pd.read_csv(text_files["test"]))
    lines = (tmp_path / "test_labels.txt").read_text().splitlines()
    (tmp_path / "test_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match=r"test_text.txt has \d+ lines and .*test_labels.txt \d+: line-aligned"):
        read_table(tmp_path / "test_text.txt")


def test_a_folder_of_split_files_is_its_splits(tmp_path, tiny_bert, text_files, monkeypatch):
    """A dataset as it downloads, its splits files side by side, given as one folder: GLUE's train.tsv / dev.tsv /
    test.tsv (its test rows without labels), a Hugging Face dataset's Parquet files as the hub holds them (train in
    two shards, validation, a test split of label -1), Kaggle's train.csv beside an unlabelled test.csv. It was
    read as a folder of classes ("no class sub-folders"). Now its train file trains, its validation file
    validates, its test file tests where it holds labels (else left out, said); predict and evaluate read its test
    file."""
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    train, val, test = (pd.read_csv(text_files[s]) for s in ("train", "val", "test"))
    glue = tmp_path / "SST-2"
    glue.mkdir()
    train.rename(columns={"text": "sentence"}).to_csv(glue / "train.tsv", sep="\t", index=False)
    val.rename(columns={"text": "sentence"}).to_csv(glue / "dev.tsv", sep="\t", index=False)
    test[["text"]].rename(columns={"text": "sentence"}).rename_axis("index").to_csv(glue / "test.tsv", sep="\t")
    (glue / "README.md").write_text("SST-2")
    with pytest.warns(UserWarning, match=r"test.tsv: not read as the test split: it holds no labels \(no 'label' "
                                         r"column\)"):
        fmtune.train(cfg_dict(tiny_bert, glue, out=str(tmp_path / "glue-run"), train={"max_steps": 2}), quiet=True)
    data = json.loads((tmp_path / "glue-run" / "run.json").read_text())["data"]
    assert (data["train"]["rows"], data["val"]["rows"]) == (len(train), len(val)) and "test" not in data
    names = ["neg", "pos"]
    hub = tmp_path / "hub" / "plain_text"
    hub.mkdir(parents=True)
    half = len(train) // 2
    for part, rows in (("train-00000-of-00002", train[:half]), ("train-00001-of-00002", train[half:]),
                       ("validation-00000-of-00001", val)):
        hf_parquet(hub / f"{part}.parquet", {"text": rows["text"].tolist(),
                                             "label": [names.index(v) for v in rows["label"]]}, {"label": names}, set())
    hf_parquet(hub / "test-00000-of-00001.parquet", {"text": test["text"].tolist(), "label": [-1] * len(test)},
               {"label": names}, set())
    with pytest.warns(UserWarning, match=r"test-00000-of-00001.parquet: not read as the test split: .*'label' column "
                                         r"is empty"):
        fmtune.train(cfg_dict(tiny_bert, hub, out=str(tmp_path / "hub-run"), train={"max_steps": 2}), quiet=True)
    data = json.loads((tmp_path / "hub-run" / "run.json").read_text())["data"]
    assert (data["train"]["rows"], data["val"]["rows"]) == (len(train), len(val))  # (both shards)
    assert json.loads((tmp_path / "hub-run" / "labels.json").read_text())["labels"] == names
    kaggle = tmp_path / "kaggle"
    kaggle.mkdir()
    train.to_csv(kaggle / "train.csv", index=False)
    test.to_csv(kaggle / "test.csv", index=False)
    fmtune.train(cfg_dict(tiny_bert, kaggle, out=str(tmp_path / "kaggle-run"), train={"max_steps": 2}), quiet=True)
    data = json.loads((tmp_path / "kaggle-run" / "run.json").read_text())["data"]
    assert data["test"]["rows"] == len(test) and data["train"]["rows"] + data["val"]["rows"] == len(train)
    assert fmtune.evaluate(tmp_path / "kaggle-run", kaggle, quiet=True)["n_test"] == len(test)


def test_compressed_files_that_cannot_be_read_in_place_say_why(tmp_path, monkeypatch):
    """A zip of several files none named as the archive, a damaged gzip, a tar archive: each an error naming it."""
    import gzip
    import zipfile

    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as z:
        z.writestr("train.csv", "text,label\na,b\n")
        z.writestr("test.csv", "text,label\na,b\n")
    with pytest.raises(DataError, match=r"data.zip: a zip archive of 2 files \(train.csv, test.csv\); .*unpack"):
        read_table(tmp_path / "data.zip")
    (tmp_path / "cut.csv.gz").write_bytes(gzip.compress(b"text,label\n" + b"a fine film,pos\n" * 500)[:60])
    with pytest.raises(DataError, match=r"cut.csv.gz: cannot unpack it, the file is damaged or not gz data"):
        read_table(tmp_path / "cut.csv.gz")
    assert not list((tmp_path / "cache").rglob("*.csv"))  # nothing half-written left to be read next time
    (tmp_path / "imdb.tar.gz").write_bytes(gzip.compress(b"x" * 1024))
    with pytest.raises(DataError, match=r"imdb.tar.gz: a compressed file \(.gz\) fmtune does not read in place"):
        read_table(tmp_path / "imdb.tar.gz")


def test_a_compressed_table_of_images_reads_them_beside_it(tmp_path, monkeypatch):
    """Relative image paths in a compressed table are read beside the compressed file (where the user keeps the
    images), not in the cache it was unpacked into; predict reads them so too."""
    import gzip

    from fmtune.data.readers import table_base

    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    save_shape_images(tmp_path / "imgs", 2)
    rows = [(f"imgs/{c}/{i}.png", c) for c in ("top", "bottom") for i in range(2)]
    _csv(tmp_path, "t.csv", rows, ("image", "label"))
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress((tmp_path / "t.csv").read_bytes()))
    df = read_any(tmp_path / "t.csv.gz")
    assert table_base(df) == tmp_path and (table_base(df) / df["image"].iloc[0]).is_file()
    chunk, _ = next(iter_chunks(tmp_path / "t.csv.gz", "utf-8", 10))
    assert table_base(chunk) == tmp_path and len(chunk) == 4


def test_jsonl_and_parquet_train(tmp_path, tiny_bert, text_files):
    df = pd.read_csv(text_files["train"])
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    df.rename(columns={"text": "review", "label": "y"}).to_parquet(tmp_path / "t.parquet")
    assert _train(tmp_path, tiny_bert, tmp_path / "t.jsonl", train={"max_steps": 2})["best"] is not None
    s = fmtune.train(cfg_dict(tiny_bert, tmp_path / "t.parquet", out=str(tmp_path / "pq"),
                              data={"text_column": "review", "label_column": "y"}, train={"max_steps": 2}),
                     quiet=True)
    assert s["best"] is not None
    # pandas' to_json default (orient=columns: {"text": {"0": ...}, ...}) and a JSON object of lists are tables too
    df.to_json(tmp_path / "columns.json")
    df.to_json(tmp_path / "indented.json", indent=2)
    (tmp_path / "lists.json").write_text(json.dumps(df.to_dict(orient="list")))
    for name in ("columns.json", "indented.json", "lists.json"):
        got = read_table(tmp_path / name)
        assert got["text"].tolist() == df["text"].tolist() and got["label"].tolist() == df["label"].tolist(), name
        chunks = [c for c, _ in iter_chunks(tmp_path / name, "utf-8", 100)]  # (predict reads it so)
        assert pd.concat(chunks)["text"].tolist() == df["text"].tolist(), name
    (tmp_path / "one.json").write_text(json.dumps({"text": "a lone row", "label": "pos"}))
    assert read_table(tmp_path / "one.json").to_dict(orient="records") == [{"text": "a lone row", "label": "pos"}]


def test_hugging_face_class_ids_come_back_as_names(tmp_path, tiny_bert, text_files):
    """A Hugging Face dataset's Parquet split (label ids, names in its metadata) trains and
    predicts names; its -1 (GLUE's unlabelled test rows) is no label; a CSV of ids is named by
    data.label_names."""
    df = pd.read_csv(text_files["train"])
    names = ["neg", "pos"]
    p = hf_parquet(tmp_path / "train.parquet", {"sentence": df["text"].tolist(),
                                                "label": [names.index(v) for v in df["label"]]},
                   {"label": names}, set())
    s = fmtune.train(cfg_dict(tiny_bert, p, out=str(tmp_path / "run"), data={"text_column": "sentence"},
                              train={"max_steps": 2}), quiet=True)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == names and s["best"] is not None
    unlabelled = hf_parquet(tmp_path / "test.parquet", {"sentence": ["a good film", "bad"], "label": [-1, -1]},
                            {"label": names}, set())
    assert read_table(unlabelled)["label"].tolist() == [None, None]
    chunk = next(iter_chunks(unlabelled, "utf-8", 10, "sentence"))[0]
    assert chunk["label"].tolist() == [None, None]
    ids = _csv(tmp_path, "ids.csv", [(t, names.index(v)) for t, v in zip(df["text"], df["label"])])
    cfg = cfg_dict(tiny_bert, ids, out=str(tmp_path / "run2"), data={"label_names": "neg, pos"}, train={"max_steps": 2})
    fmtune.train(cfg, quiet=True)
    assert json.loads((tmp_path / "run2" / "labels.json").read_text())["labels"] == names
    assert load(overrides=["data.label_names=[neg, pos]"]).data.label_names == names
    bad = _csv(tmp_path, "bad.csv", [("fine", 0), ("poor", 2)])
    with pytest.raises(DataError, match=r"bad.csv: row 2 \(line 3\): label 2 is not a class id: the names given are "
                                        r"ids 0..1 \(neg, pos\)"):
        _train(tmp_path, tiny_bert, bad, data={"label_names": "neg,pos"})


# --- columns and values ----------------------------------------------------------------
def test_missing_label_and_text_columns(tmp_path, tiny_bert):
    p = _csv(tmp_path, "d.csv", [["good", "pos"], ["bad", "neg"]] * 5, columns=("phrase", "label"))
    with pytest.raises(DataError, match="d.csv: no text column 'text'; columns are: phrase, label.*data.text_column"):
        _train(tmp_path, tiny_bert, p)
    q = _csv(tmp_path, "e.csv", [["good", "pos", "a"], ["bad", "neg", "b"]] * 5, columns=("text", "y", "z"))
    with pytest.raises(DataError, match=r"e.csv: no label column 'label'.*data.label_column=COLUMN \('y' or 'z'\?\)$"):
        _train(tmp_path, tiny_bert, q)
    # the likely columns are named: the one of long texts; the ones named like labels (a TREC-style table)
    rows = [[i, f"what is the {w} of this long question", i % 2, i % 4] for i, w in enumerate(["name", "size"] * 6)]
    g = _csv(tmp_path, "g.csv", rows, columns=("idx", "question_text", "coarse_label", "fine_label"))
    with pytest.raises(DataError, match=r"data.text_column=COLUMN \('question_text'\?\)$"):
        _train(tmp_path, tiny_bert, g)
    with pytest.raises(DataError, match=r"data.label_column=COLUMN \('coarse_label' or 'fine_label'\?\)$"):
        _train(tmp_path, tiny_bert, g, data={"text_column": "question_text"})


def test_the_columns_of_well_known_datasets_are_read_without_settings(tmp_path, tiny_bert, text_files):
    """GLUE's SST-2 (idx, sentence, label), CLINC150 (text, intent), IMDB's CSV (review, sentiment), a regression
    score: the one column a table holds under a usual name is read, said, kept in config.yaml for predict."""
    import yaml

    df = pd.read_csv(text_files["train"]).head(60)
    sst2 = df.assign(idx=range(len(df))).rename(columns={"text": "sentence"})[["idx", "sentence", "label"]]
    layouts = {"sst2": (sst2, {"text_column": "sentence"}),
               "clinc": (df.rename(columns={"label": "intent"}), {"label_column": "intent"}),
               "imdb": (df.rename(columns={"text": "Review", "label": "sentiment"}),
                        {"text_column": "Review", "label_column": "sentiment"})}
    for name, (table, settled) in layouts.items():
        p = tmp_path / f"{name}.csv"
        table.to_csv(p, index=False)
        s = _train(tmp_path / name, tiny_bert, p, train={"max_steps": 2})
        assert s["columns_read"] == settled, name
        saved = yaml.safe_load((tmp_path / name / "run" / "config.yaml").read_text())["data"]
        assert {k: saved[k] for k in settled} == settled
        got = fmtune.predict(tmp_path / name / "run", p, quiet=True)  # the same layout predicts as it trained
        assert len(got) == len(table) and got["error"].isna().all()
    other = fmtune.predict(tmp_path / "sst2" / "run", text_files["test"], quiet=True)  # 'text', not 'sentence'
    assert len(other) == 80 and other["error"].isna().all()
    scored = {n: fmtune.evaluate(tmp_path / "sst2" / "run", tmp_path / f"{n}.csv", quiet=True)["test"]["accuracy"]
              for n in ("sst2", "imdb")}  # evaluate reads a labelled table of another layout too
    assert scored["sst2"] == scored["imdb"]
    # the validation split is stratified by the label read, as by a 'label' column
    from fmtune.config import DataConfig
    from fmtune.data.prepare import read_frames

    df.to_csv(tmp_path / "plain.csv", index=False)
    split = {n: read_frames(DataConfig(train=str(tmp_path / f"{n}.csv"), min_val_per_class=0), "classification", 3).val
             for n in ("plain", "clinc")}
    assert split["plain"].index.tolist() == split["clinc"].index.tolist()
    reg = pd.read_csv(text_files["regression_train"]).head(60).rename(columns={"label": "score"})
    reg.to_csv(tmp_path / "reg.csv", index=False)
    s = fmtune.train(cfg_dict(tiny_bert, tmp_path / "reg.csv", out=str(tmp_path / "reg"), task={"type": "regression"},
                              train={"max_steps": 2}), quiet=True)
    assert s["columns_read"] == {"label_column": "score"}
    # GTZAN's genre
    df.rename(columns={"label": "genre"}).to_csv(tmp_path / "genre.csv", index=False)
    assert read_frames(DataConfig(train=str(tmp_path / "genre.csv")), "classification", 0).settled == {
        "label_column": "genre"}
    # two usual names for one column: nothing is chosen, the error names both
    two = df.rename(columns={"label": "category"}).assign(target=df["label"])
    two.to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match=r"no label column 'label'.*\('category' or 'target'\?\)$"):
        _train(tmp_path / "two", tiny_bert, tmp_path / "two.csv")
    # a column named in the config is never replaced; nor is a label guessed for tabular rows (it would be read
    # as text too)
    with pytest.raises(DataError, match="no text column 'words'"):
        _train(tmp_path / "named", tiny_bert, tmp_path / "sst2.csv", data={"text_column": "words"})
    tab = df.rename(columns={"label": "target"}).assign(n=range(len(df)))
    tab.to_csv(tmp_path / "tab.csv", index=False)
    with pytest.raises(DataError, match="no label column 'label'"):
        _train(tmp_path / "tab", tiny_bert, tmp_path / "tab.csv", data={"text_columns": "all"})


def test_class_ids_named_by_the_column_beside_them(tmp_path, tiny_bert, text_files):
    """SetFit's datasets (text, label, label_text): the classes are named by label_text, so labels.json, predict and
    evaluate say 'neg' / 'pos', not 0 / 1; a naming that is not one name per id is not used."""
    df = pd.read_csv(text_files["train"]).head(60)
    ids = (df["label"] == "pos").astype(int)
    pd.DataFrame({"text": df["text"], "label": ids, "label_text": df["label"]}).to_csv(tmp_path / "s.csv", index=False)
    s = _train(tmp_path / "a", tiny_bert, tmp_path / "s.csv", train={"max_steps": 2})
    assert s["columns_read"] == {"label_names": ["neg", "pos"]}
    assert json.loads((tmp_path / "a" / "run" / "labels.json").read_text())["labels"] == ["neg", "pos"]
    got = fmtune.predict(tmp_path / "a" / "run", tmp_path / "s.csv", quiet=True)
    assert set(got["predicted_label"] if "predicted_label" in got else got["label"]) <= {"neg", "pos"}
    assert fmtune.evaluate(tmp_path / "a" / "run", tmp_path / "s.csv", quiet=True)["test"]["accuracy"] >= 0
    clash = pd.DataFrame({"text": df["text"], "label": ids, "label_text": ["x"] * len(df)})  # one name for both ids
    clash.to_csv(tmp_path / "c.csv", index=False)
    s = _train(tmp_path / "b", tiny_bert, tmp_path / "c.csv", train={"max_steps": 2})
    assert "columns_read" not in s
    assert json.loads((tmp_path / "b" / "run" / "labels.json").read_text())["labels"] == ["0", "1"]


def test_a_column_naming_each_rows_split_splits_the_table(tmp_path, tiny_bert, text_files):
    """A dataset written out whole, its rows' split in a 'split' column (any case): train rows train, validation rows
    validate, test rows test, and evaluation reads the test rows again; never are val or test rows trained on."""
    import yaml

    from fmtune.config import DataConfig
    from fmtune.data.prepare import read_data, read_frames

    parts = {n: pd.read_csv(text_files[n]).assign(split=s) for n, s in
             (("train", "train"), ("val", "Validation"), ("test", "TEST"))}
    whole = pd.concat(parts.values()).sample(frac=1.0, random_state=0)  # rows of every split mixed
    whole.to_csv(tmp_path / "all.csv", index=False)
    with pytest.warns(UserWarning, match=r"'split' column marks each row's split: 240 train, 60 val, 80 test rows"):
        s = _train(tmp_path / "a", tiny_bert, tmp_path / "all.csv", train={"max_steps": 4})
    run = tmp_path / "a" / "run"
    info = json.loads((run / "run.json").read_text())["data"]
    assert (info["train"]["rows"], info["val"]["rows"], info["test"]["rows"]) == (240, 60, 80)
    assert not info["val_split_from_train"]
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["split_column"] == "split" and saved["val"] == saved["test"] == str(tmp_path / "all.csv")
    # the same rows as the separate files: the run's test metrics are the test file's, and evaluate reads them again
    assert s["eval"]["test"] == fmtune.evaluate(run, text_files["test"], quiet=True)["test"]
    again = fmtune.evaluate(run, quiet=True)
    assert again["test"] == s["eval"]["test"] and again["n_test"] == 80 and "split" in again["data_rows"]
    with pytest.warns(UserWarning, match="marks each row's split"):
        frames = read_frames(DataConfig(train=str(tmp_path / "all.csv")), "classification", 0)
    assert sorted(frames.train["text"]) == sorted(parts["train"]["text"])
    assert sorted(frames.test["text"]) == sorted(parts["test"]["text"])
    assert (frames.test.index == whole.reset_index(drop=True).index[(whole["split"] == "TEST").to_numpy()]).all()
    # a test file given: the table's test rows are left out, not trained on
    with pytest.warns(UserWarning, match=r"its 80 test rows are left out \(data.test = "):
        given = read_frames(DataConfig(train=str(tmp_path / "all.csv"), test=str(text_files["val"])),
                            "classification", 0)
    assert len(given.train) == 240 and len(given.val) == 60 and len(given.test) == 60
    # the column is not read as text, and data.split_column=none reads every row
    rows = read_data(tmp_path / "all.csv", "classification", DataConfig(text_columns="all"), split="train")
    assert len(rows) == 240 and not rows["text"].str.contains("split:").any()
    every = read_frames(DataConfig(train=str(tmp_path / "all.csv"), split_column="none"), "classification", 0)
    assert len(every.train) + len(every.val) == 380 and every.val_from_train
    # a column holding other values is no split column unless named; named, the row at fault is
    other = whole.assign(split=whole["split"].replace({"TEST": "holdout"}))
    other.to_csv(tmp_path / "other.csv", index=False)
    assert len(read_frames(DataConfig(train=str(tmp_path / "other.csv"), min_val_per_class=0), "classification",
                           0).train) == 342
    first = int(np.flatnonzero((other["split"] == "holdout").to_numpy())[0])
    with pytest.raises(DataError, match=rf"other.csv: row {first + 1} \(line {first + 2}\): split 'holdout' names "
                                        r"no split \(train, .*; 80 row\(s\) in all\)"):
        read_frames(DataConfig(train=str(tmp_path / "other.csv"), split_column="split"), "classification", 0)
    no_test = whole[whole["split"] != "TEST"]
    no_test.to_csv(tmp_path / "no_test.csv", index=False)
    with pytest.raises(DataError, match=r"no_test.csv: its 'split' column marks no test rows \(train 240, val 60\)"):
        fmtune.evaluate(run, tmp_path / "no_test.csv", quiet=True)


def test_a_json_object_of_splits_and_records_under_one_key(tmp_path, tiny_bert, text_files):
    """CLINC150's data_full.json ({"train": [[text, intent], ...], "val": ..., "test": ..., "oos_train": ...}): its
    lists are its splits (oos_train trains, oos_test tests), each row a pair of text and label; training validates and
    tests on them and evaluate reads its test rows. Records under one key ({"data": [{...}]}) are its rows."""
    from fmtune.data.readers import read_table

    parts = {n: pd.read_csv(text_files[n]) for n in ("train", "val", "test")}
    oos = {f"oos_{n}": [["play me something not in scope", "oos"]] * k for n, k in (("train", 6), ("val", 3),
                                                                                    ("test", 4))}
    data = {**oos, **{n: df[["text", "label"]].values.tolist() for n, df in parts.items()}}
    (tmp_path / "data_full.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match=r"marks each row's split: 246 train, 63 val, 84 test rows"):
        s = _train(tmp_path, tiny_bert, tmp_path / "data_full.json", train={"max_steps": 2})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["neg", "oos", "pos"]
    assert s["eval"]["test"] == fmtune.evaluate(tmp_path / "run", tmp_path / "data_full.json", quiet=True)["test"]
    assert fmtune.evaluate(tmp_path / "run", quiet=True)["n_test"] == 84
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": parts["train"].to_dict("records")}))
    assert read_table(tmp_path / "wrapped.json").to_dict("records") == parts["train"].to_dict("records")
    assert len(next(iter_chunks(tmp_path / "wrapped.json", "utf-8", 1000))[0]) == 240
    (tmp_path / "other.json").write_text(json.dumps({"train": [["a b", "x"]], "notes": [["c", "d"]]}))
    assert "split" not in read_table(tmp_path / "other.json").columns  # (a key that names no split: not splits)


def test_image_paths_are_found_by_their_suffix_and_their_folder_near_the_table(tmp_path, tiny_vit, image_dirs):
    """A Kaggle-style table (meta/train.csv naming files kept in images/) with the paths in 'filepath' trains
    without data.image_column or data.media_root; both are kept for predict."""
    files = sorted(image_dirs["train"].rglob("*.png"))
    (tmp_path / "images").mkdir()
    (tmp_path / "meta").mkdir()
    rows = []
    for f in files:
        name = f"{f.parent.name}_{f.name}"
        (tmp_path / "images" / name).write_bytes(f.read_bytes())
        rows.append({"id": len(rows), "filepath": name, "class": f.parent.name})
    table = tmp_path / "meta" / "train.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    s = _train(tmp_path, tiny_vit, table, train={"max_steps": 2})
    assert s["columns_read"] == {"image_column": "filepath", "label_column": "class",
                                 "media_root": str((tmp_path / "images").resolve())}
    got = fmtune.predict(tmp_path / "run", table, quiet=True)
    assert len(got) == len(rows) and got["error"].isna().all()


def test_images_named_by_an_id_column_are_found_in_the_folder_beside_the_table(tmp_path, tiny_vit, image_dirs):
    """Kaggle's layout (APTOS, dog breeds, cancer detection): train.csv names each image by an id without its
    suffix (id_code, diagnosis), the images in train_images/{id_code}.png; test.csv's ids are in test_images/.
    Training reads the template it finds; predict and evaluate of test.csv find its own folder, said in a warning;
    an id that names a file in two folders is not guessed at."""
    import yaml

    def lay_out(split: str, folder: Path) -> pd.DataFrame:
        (tmp_path / f"{split}_images").mkdir()
        rows = []
        for f in sorted(folder.rglob("*.png")):
            code = f"{split[:2]}{len(rows):05x}"
            (tmp_path / f"{split}_images" / f"{code}.png").write_bytes(f.read_bytes())
            rows.append({"id_code": code, "diagnosis": f.parent.name})
        pd.DataFrame(rows).to_csv(tmp_path / f"{split}.csv", index=False)
        return pd.DataFrame(rows)

    train, test = lay_out("train", image_dirs["train"]), lay_out("test", image_dirs["test"])
    s = _train(tmp_path, tiny_vit, tmp_path / "train.csv", data={"label_column": "diagnosis"},
               train={"max_steps": 2})
    assert s["columns_read"] == {"image_column": "train_images/{id_code}.png"}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["image_column"] == "train_images/{id_code}.png" and saved["media_root"] is None
    with pytest.warns(UserWarning, match=r"test.csv: its files are not where data.image_column "
                                         r"'train_images/\{id_code\}.png' puts them; read as "
                                         r"'test_images/\{id_code\}.png'"):
        got = fmtune.predict(tmp_path / "run", tmp_path / "test.csv", quiet=True)
    assert len(got) == len(test) and got["error"].isna().all()
    direct = fmtune.load(tmp_path / "run").predict([str(tmp_path / "test_images" / f"{test['id_code'][0]}.png")])
    assert got["label"][0] == direct[0]["label"]
    with pytest.warns(UserWarning, match="its files are not where"):
        assert fmtune.evaluate(tmp_path / "run", tmp_path / "test.csv", quiet=True)["n_test"] == len(test)
    # a table of both splits (a 'split' column): its test rows read their files as its training rows do
    from fmtune.config import DataConfig
    from fmtune.data.prepare import read_frames

    whole = pd.concat([train.assign(split="train"), test.assign(split="test")])
    whole.assign(id_code=[f"{'train' if s == 'train' else 'test'}_images/{c}.png" for s, c in
                          zip(whole["split"], whole["id_code"])]).to_csv(tmp_path / "paths.csv", index=False)
    for name in ("paths", "ids"):
        if name == "ids":  # ids of both folders: the template is written from the split column
            (tmp_path / "split_images").mkdir()
            whole.to_csv(tmp_path / "ids.csv", index=False)
        with pytest.warns(UserWarning, match="marks each row's split"):
            frames = read_frames(DataConfig(train=str(tmp_path / f"{name}.csv"), label_column="diagnosis"),
                                 "classification", 0)
        column = frames.settled["image_column"]
        assert len(frames.test) == len(test) and all((tmp_path / p).is_file() for p in frames.test[column]), name
    assert frames.settled == {"image_column": "{split}_images/{id_code}.png"}
    # the same ids in two folders: no template is guessed, the error is the one of a missing image column
    (tmp_path / "copy").mkdir()
    for f in (tmp_path / "train_images").iterdir():
        (tmp_path / "copy" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(DataError, match="no text column 'text'"):
        _train(tmp_path / "two", tiny_vit, tmp_path / "train.csv", data={"label_column": "diagnosis"})


def test_a_folder_of_class_folders_of_text_files(tmp_path, tiny_bert, text_files):
    """scikit-learn's load_files layout: aclImdb (train/ and test/, each pos/ and neg/ of .txt files; train/unsup/
    unlabelled, left out) trains on its splits and reads the same texts as the table they came from; 20 Newsgroups'
    files without a suffix are texts too; hidden files are not examples; a file not in the encoding is named."""
    root = tmp_path / "aclImdb"
    for split in ("train", "test"):
        df = pd.read_csv(text_files[split])
        for i, (text, label) in enumerate(zip(df["text"], df["label"])):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            (root / split / label / f"{i}_7.txt").write_text(text)
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("a review without its rating")
    (root / "train" / "pos" / "._0_7.txt").write_bytes(b"\x00\x05\x16\x07 resource fork")  # (macOS' copy)
    (root / "imdb.vocab").write_text("good\nbad\n")
    with pytest.warns(UserWarning, match="ships its held-out splits"):
        s = _train(tmp_path, tiny_bert, root, train={"max_steps": 2})
    info = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert info["train"]["rows"] + info["val"]["rows"] == 240 and info["test"]["rows"] == 80
    from fmtune.data.readers import read_any

    with pytest.warns(UserWarning, match="sub-folder\\(s\\) unsup left out"):
        got = read_any(root / "train")
    want = pd.read_csv(text_files["train"])
    assert sorted(zip(got["text"], got["label"])) == sorted(zip(want["text"], want["label"]))
    assert fmtune.evaluate(tmp_path / "run", root / "test", quiet=True)["test"] == s["eval"]["test"]
    predicted = fmtune.predict(tmp_path / "run", root / "test", quiet=True)  # each file, any depth
    table = fmtune.predict(tmp_path / "run", text_files["test"], quiet=True)
    assert len(predicted) == 80 and predicted["error"].isna().all()
    assert sorted(zip(predicted["text"], predicted["label"])) == sorted(zip(table["text"], table["predicted_label"]))
    news = tmp_path / "20news" / "sci.space"
    news.mkdir(parents=True)
    (news / "60154").write_text("orbit and launch")
    (tmp_path / "20news" / "rec.autos").mkdir()
    (tmp_path / "20news" / "rec.autos" / "101551").write_bytes("caf\xe9 engine".encode("latin-1"))
    with pytest.raises(DataError, match=r"101551: not utf-8 text .*--set data.encoding=latin-1"):
        read_any(tmp_path / "20news")
    assert read_any(tmp_path / "20news", "latin-1")["text"].tolist() == ["café engine", "orbit and launch"]


def test_images_split_over_folders_no_column_names_are_found_by_name(tmp_path, image_dirs):
    """HAM10000 (HAM10000_metadata.csv naming image_id, the images in HAM10000_images_part_1/ and _part_2/) and NIH
    ChestX-ray14 ('Image Index' with its suffix, images_001/images/ ... images_012/images/): a wildcard over the
    folders no column names, each file found by its name there."""
    from fmtune.config import DataConfig
    from fmtune.data.prepare import read_frames

    files = sorted(image_dirs["train"].rglob("*.png"))
    ham, nih = [], []
    for i, f in enumerate(files):
        part = tmp_path / "ham" / f"HAM10000_images_part_{1 + i % 2}"
        part.mkdir(parents=True, exist_ok=True)
        (part / f"ISIC_{i:07d}.jpg").write_bytes(f.read_bytes())
        ham.append({"lesion_id": f"HAM_{i // 2:07d}", "image_id": f"ISIC_{i:07d}", "dx": f.parent.name})
        folder = tmp_path / "nih" / f"images_{1 + i * 12 // len(files):03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:08d}_000.png").write_bytes(f.read_bytes())
        nih.append({"Image Index": f"{i:08d}_000.png", "Finding Labels": f.parent.name, "Patient ID": i})
    pd.DataFrame(ham).to_csv(tmp_path / "ham" / "HAM10000_metadata.csv", index=False)
    pd.DataFrame(nih).to_csv(tmp_path / "nih" / "Data_Entry_2017.csv", index=False)
    for name, table, label, template in (
            ("ham", "HAM10000_metadata.csv", "dx", "HAM10000_images_part_*/{image_id}.jpg"),
            ("nih", "Data_Entry_2017.csv", "Finding Labels", "images_*/images/{Image Index}")):
        cfg = DataConfig(train=str(tmp_path / name / table), label_column=label, min_val_per_class=0)
        frames = read_frames(cfg, "classification", 0)
        assert frames.settled == {"image_column": template}, name
        read = pd.concat([frames.train, frames.val])
        assert all((tmp_path / name / p).is_file() for p in read[template]), name
        assert len(read) == len(files)


def test_label_studio_exports_of_choices_train_a_classifier(tmp_path, tiny_bert, text_files):
    """Label Studio's JSON export for text classification (tasks of data.text, annotations' results of choices):
    the texts and the choice of each task's first annotation not cancelled, as the table they came from; several
    choices a multi-label list; tasks not yet annotated left out, with a warning."""
    df = pd.read_csv(text_files["train"]).head(60)

    def task(i, text, choices, cancelled=False):
        result = [{"from_name": "sentiment", "to_name": "text", "type": "choices", "value": {"choices": choices}}]
        return {"id": i, "data": {"text": text}, "annotations": [
            *([{"was_cancelled": True, "result": []}] if cancelled else []), {"id": i, "result": result}]}

    tasks = [task(i, t, [lab], cancelled=i % 5 == 0) for i, (t, lab) in enumerate(zip(df["text"], df["label"]))]
    (tmp_path / "ls.json").write_text(json.dumps([*tasks, {"id": 99, "data": {"text": "later"}, "annotations": []}]))
    with pytest.warns(UserWarning, match="1 Label Studio task\\(s\\) without an annotation left out"):
        got = read_any(tmp_path / "ls.json")
    assert got["text"].tolist() == df["text"].tolist() and got["label"].tolist() == df["label"].tolist()
    with pytest.warns(UserWarning, match="without an annotation"):
        s = _train(tmp_path, tiny_bert, tmp_path / "ls.json", train={"max_steps": 2})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == sorted(set(df["label"]))
    (tmp_path / "multi.json").write_text(json.dumps([task(1, "a b", ["x", "y"]), task(2, "c", ["y"])]))
    assert read_any(tmp_path / "multi.json")["label"].tolist() == [["x", "y"], "y"]
    assert s["best"] is not None


def test_label_studio_exports_of_images_find_the_users_copies(tmp_path, tiny_vit, image_dirs):
    """Label Studio's JSON export of an image classification project names its images as the server stores them:
    uploads as /data/upload/N/PREFIX-name.jpg, local storage as /data/local-files/?d=path. Each is read as the user's
    copy names it (name.jpg; path), found near the export, and trains."""
    import shutil

    (tmp_path / "photos").mkdir()
    files = sorted(image_dirs["train"].rglob("*.png"))
    for f in files:
        shutil.copy(f, tmp_path / "photos" / f"{f.parent.name}-{f.name}")
    for kind in ("upload", "local"):
        tasks = [{"id": i, "data": {"image": f"/data/upload/3/{i:08x}-{f.parent.name}-{f.name}" if kind == "upload"
                                    else f"/data/local-files/?d=photos/{f.parent.name}-{f.name}"},
                  "annotations": [{"result": [{"from_name": "class", "to_name": "image", "type": "choices",
                                               "value": {"choices": [f.parent.name]}}]}]} for i, f in enumerate(files)]
        (tmp_path / f"{kind}.json").write_text(json.dumps(tasks))
        rows = read_any(tmp_path / f"{kind}.json")
        name = f"{files[0].parent.name}-{files[0].name}"
        assert rows["image"].iloc[0] == (name if kind == "upload" else f"photos/{name}")
        _train(tmp_path / kind, tiny_vit, tmp_path / f"{kind}.json", train={"max_steps": 2})
        data = json.loads((tmp_path / kind / "run" / "run.json").read_text())["data"]
        assert data["train"]["rows"] + data["val"]["rows"] == len(files), kind


def test_one_hot_class_columns_train_a_single_label_run(tmp_path, tiny_vit, image_dirs):
    """Kaggle's plant-pathology layout: train.csv (image_id, then one 0/1 column a class, exactly one 1 a row) with
    images/{image_id}.jpg: trains as classification without settings (the classes from the columns, the images from
    the ids); a row with two classes marked is named."""
    from fmtune.config import DataConfig
    from fmtune.data.prepare import read_frames

    (tmp_path / "images").mkdir()
    rows = []
    for i, f in enumerate(sorted(image_dirs["train"].rglob("*.png"))):
        (tmp_path / "images" / f"Train_{i}.png").write_bytes(f.read_bytes())
        rows.append({"image_id": f"Train_{i}", "bottom": float(f.parent.name == "bottom"),
                     "top": int(f.parent.name == "top")})
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    s = _train(tmp_path, tiny_vit, tmp_path / "train.csv", train={"max_steps": 2})
    assert s["columns_read"] == {"image_column": "images/{image_id}.png", "label_columns": "bottom,top"}
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["bottom", "top"]
    got = fmtune.predict(tmp_path / "run", tmp_path / "train.csv", quiet=True)
    assert got["error"].isna().all() and set(got["predicted_label"] if "predicted_label" in got else got["label"]) \
        <= {"bottom", "top"}
    assert fmtune.evaluate(tmp_path / "run", tmp_path / "train.csv", quiet=True)["n_test"] == len(rows)
    rows[3]["top"] = 1
    pd.DataFrame(rows).to_csv(tmp_path / "two.csv", index=False)
    cfg = DataConfig(train=str(tmp_path / "two.csv"), label_columns="bottom,top", image_column="images/{image_id}.png")
    with pytest.raises(DataError, match=r"two.csv: row 4 \(line 5\): data.label_columns marks 2 classes \(bottom, "
                                        r"top\); a single-label run needs exactly one a row"):
        read_frames(cfg, "classification", 0)


def test_a_csv_without_a_header_as_the_classic_text_sets_ship(tmp_path, tiny_bert, text_files):
    """Yelp, AG News, DBpedia and Amazon polarity as fast.ai and Kaggle ship them: no header, the class id first
    ("1","Title ...","Description ..."). Read without one (it was read as a header: columns named by the first
    review), label the first column, text the column of the longest cells; training, predict (chunked) and
    messages (line N is row N) agree; a CSV whose header has a number for a name is still a header."""
    import csv

    from fmtune.data.readers import iter_chunks

    df = pd.read_csv(text_files["train"]).head(60)
    ids = {"neg": 1, "pos": 2}
    with (tmp_path / "ag.csv").open("w", newline="") as fh:
        csv.writer(fh, quoting=csv.QUOTE_ALL).writerows(
            [ids[lab], f"title {i}", text] for i, (text, lab) in enumerate(zip(df["text"], df["label"])))
    with pytest.warns(UserWarning, match=r"ag.csv: its first line is data, not a header \('\d', 'title 0' ...\): "
                                         r"read without one, its columns named label, column_2, text"):
        got = read_table(tmp_path / "ag.csv")
    assert got["text"].tolist() == df["text"].tolist() and got["label"].tolist() == [str(ids[x]) for x in df["label"]]
    with pytest.warns(UserWarning, match="first line is data"):
        chunk = next(iter_chunks(tmp_path / "ag.csv", "utf-8", 100))[0]
    assert chunk["text"].tolist() == df["text"].tolist()
    with pytest.warns(UserWarning, match="first line is data"):
        s = _train(tmp_path, tiny_bert, tmp_path / "ag.csv", train={"max_steps": 2})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["1", "2"]
    with pytest.warns(UserWarning, match="first line is data"):
        assert len(fmtune.predict(tmp_path / "run", tmp_path / "ag.csv", quiet=True)) == 60
    lines = (tmp_path / "ag.csv").read_text().splitlines()
    lines[2] = '"2","title 2",""'  # an empty text on line 3: named by its line
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"(?s)first line is data.*"), pytest.warns(
            UserWarning, match=r"skipping 1 row\(s\) without a text in .*bad.csv:\n  .*bad.csv: line 3: column"):
        _train(tmp_path / "b", tiny_bert, tmp_path / "bad.csv", train={"max_steps": 2})
    pd.DataFrame({"2019": ["1", "2"], "text": ["a b", "c d"]}).to_csv(tmp_path / "year.csv", index=False)
    assert read_table(tmp_path / "year.csv").columns.tolist() == ["2019", "text"]
    assert s["best"] is not None


def test_tables_without_a_header_whose_labels_are_words_and_text_files_that_are_tables(tmp_path, tiny_bert,
                                                                                      text_files):
    """Financial PhraseBank (``neutral,"According to ..."``), a ``text,label`` CSV saved without its header, the
    Emotion dataset's ``text;label`` lines in a .txt, UCI's SMSSpamCollection (``ham<TAB>text``, no suffix), fastText's
    ``__label__pos text`` lines: the first
    line is data (a cell its column holds again beside a cell of words), the label the column that repeats, the
    text the longest; training and predict read them so. A .txt of texts that hold a semicolon now and then stays one
    text a line."""
    df = pd.read_csv(text_files["train"]).head(60)
    df["text"] = df["text"].str.replace(r"[;\t\"]", " ", regex=True)
    df[["label", "text"]].to_csv(tmp_path / "fpb.csv", index=False, header=False)
    df[["text", "label"]].to_csv(tmp_path / "saved.csv", index=False, header=False)
    (tmp_path / "emotion.txt").write_text("".join(f"{t};{y}\n" for t, y in zip(df["text"], df["label"])))
    (tmp_path / "SMSSpamCollection").write_text("".join(f"{y}\t{t}\n" for t, y in zip(df["text"], df["label"])))
    for name, order in (("fpb.csv", "label, text"), ("saved.csv", "text, label"), ("emotion.txt", "text, label"),
                        ("SMSSpamCollection", "label, text")):
        with pytest.warns(UserWarning, match=f"{name}: its first line is data.*its columns named {order}"):
            got = read_table(tmp_path / name)
        assert got["text"].tolist() == df["text"].tolist() and got["label"].tolist() == df["label"].tolist(), name
        with pytest.warns(UserWarning, match="first line is data"):
            assert next(iter_chunks(tmp_path / name, "utf-8", 100))[0]["label"].tolist() == df["label"].tolist()
    with pytest.warns(UserWarning, match="first line is data"):
        _train(tmp_path, tiny_bert, tmp_path / "emotion.txt", train={"max_steps": 2})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["neg", "pos"]
    with pytest.warns(UserWarning, match="first line is data"):
        got = fmtune.predict(tmp_path / "run", tmp_path / "SMSSpamCollection", quiet=True)
    assert len(got) == 60 and got["error"].isna().all()
    # fastText's format (Kaggle's Amazon reviews train.ft.txt): labels first, as __label__NAME
    (tmp_path / "train.ft.txt").write_text("".join(f"__label__{y} {t}\n" for t, y in zip(df["text"], df["label"])))
    got = read_table(tmp_path / "train.ft.txt")
    assert got["text"].tolist() == df["text"].tolist() and got["label"].tolist() == df["label"].tolist()
    _train(tmp_path / "ft", tiny_bert, tmp_path / "train.ft.txt", train={"max_steps": 2})
    assert json.loads((tmp_path / "ft" / "run" / "labels.json").read_text())["labels"] == ["neg", "pos"]
    (tmp_path / "multi.txt").write_text("__label__a __label__b two labels here\n" + "__label__a one\n" * 9
                                        + "no label line\n")
    assert read_table(tmp_path / "multi.txt")["label"].tolist() == [["a", "b"], *["a"] * 9, None]
    texts = [f"a film; {t}" if i % 3 == 0 else t for i, t in enumerate(df["text"])]
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    assert read_table(tmp_path / "texts.txt")["text"].tolist() == texts
    assert fmtune.predict(tmp_path / "run", tmp_path / "texts.txt", quiet=True)["text"].tolist() == texts


def test_columns_of_tables_as_kaggle_ships_them_are_read_without_settings(tmp_path, tiny_bert, text_files):
    """Where a table has no text or label column of a usual name: its columns of free text are its text (AG News'
    Title and Description written as one; the SMS Spam Collection's v2), its label the column named for one in more
    words (AG News' "Class Index", Twitter Airline Sentiment's airline_sentiment, not its confidence), a rating
    (Amazon's Score), else its one column of values that repeat (v1). Said, kept in config.yaml, read so by predict;
    two columns that may be the label are not chosen between, and a table evaluated is not guessed at."""
    df = pd.read_csv(text_files["train"]).head(60)
    words = df["text"].str.split()
    ag = pd.DataFrame({"Class Index": df["label"].map({"neg": 1, "pos": 2}), "Title": words.str[:5].str.join(" "),
                       "Description": [" ".join(w[5:] + ["and", "more", "words"]) for w in words]})
    spam = pd.DataFrame({"v1": df["label"], "v2": df["text"], "Unnamed: 2": None, "Unnamed: 3": None})
    air = pd.DataFrame({"tweet_id": range(60), "airline_sentiment": df["label"], "airline": "Virgin America",
                        "airline_sentiment_confidence": np.linspace(0.3, 1, 60).round(4), "text": df["text"]})
    air["airline"] = ["Virgin America", "United"] * 30
    amazon = pd.DataFrame({"Id": range(60), "Score": df["label"].map({"neg": 1, "pos": 5}),
                           "Summary": words.str[:2].str.join(" "), "Text": df["text"]})
    layouts = {"ag": (ag, {"text_template": "{Title}. {Description}", "label_column": "Class Index"}),
               "spam": (spam, {"text_column": "v2", "label_column": "v1"}),
               "air": (air, {"label_column": "airline_sentiment"}),
               "amazon": (amazon, {"text_column": "Text", "label_column": "Score"})}
    for name, (table, settled) in layouts.items():
        table.to_csv(tmp_path / f"{name}.csv", index=False)
        s = _train(tmp_path / name, tiny_bert, tmp_path / f"{name}.csv", train={"max_steps": 2})
        assert s["columns_read"] == settled, name
        got = fmtune.predict(tmp_path / name / "run", tmp_path / f"{name}.csv", quiet=True)
        assert len(got) == 60 and got["error"].isna().all(), name
    assert fmtune.predict(tmp_path / "ag" / "run", tmp_path / "ag.csv", quiet=True)["text"].tolist() == [
        f"{a}. {b}" for a, b in zip(ag["Title"], ag["Description"])]
    assert fmtune.evaluate(tmp_path / "ag" / "run", tmp_path / "ag.csv", quiet=True)["test"]["accuracy"] >= 0
    # two columns of values that repeat, neither named for a label: the error names both
    two = df.assign(source=["web", "print"] * 30).rename(columns={"label": "y"})
    two.to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match=r"no label column 'label'.*\('y' or 'source'\?\)$"):
        _train(tmp_path / "two", tiny_bert, tmp_path / "two.csv")
    # evaluated: the run's labels are in no column of the table; a column that repeats is not taken for them
    df.drop(columns="label").assign(lang=["en", "de"] * 30).to_csv(tmp_path / "unlabelled.csv", index=False)
    with pytest.raises(DataError, match="unlabelled.csv: no label column 'airline_sentiment'"):
        fmtune.evaluate(tmp_path / "air" / "run", tmp_path / "unlabelled.csv", quiet=True)


def test_empty_text_cell_names_the_row(tmp_path, tiny_bert):
    """An empty text was always an error ("fill or drop that row"), where an unreadable image is left out up to
    data.max_bad_fraction: real sets have a few (rotten-tomatoes' full corpus: one of 14,000), and one stopped the
    whole run. Now a few are left out with a warning naming each, from training and from the scores; more than
    data.max_bad_fraction of the rows is an error listing them."""
    rows = [[t, y] for _ in range(5) for t, y in (("good film", "pos"), ("bad film", "neg"))]
    rows[3][0] = None
    p = _csv(tmp_path, "d.csv", rows)
    with pytest.raises(DataError, match=r"d.csv: 1 of 10 texts are empty or not text \(10%, more than "
                                        r"data.max_bad_fraction=5%\):\n  .*d.csv: row 4 \(line 5\): column 'text' "
                                        r"is empty; fill or drop those rows"):
        _train(tmp_path, tiny_bert, p, data={"val": str(p)})
    many = [[t, y] for _ in range(20) for t, y in (("good film", "pos"), ("bad film", "neg"))]
    many[3][0], many[7][0] = None, "   "
    q = _csv(tmp_path, "many.csv", many)
    with pytest.warns(UserWarning, match=r"skipping 2 row\(s\) without a text in .*many.csv:\n  .*row 4 \(line 5\)"
                                         r": column 'text' is empty\n  .*row 8 \(line 9\)"):
        _train(tmp_path / "m", tiny_bert, q, data={"val": str(q), "test": str(q)}, train={"max_steps": 2})
    data = json.loads((tmp_path / "m" / "run" / "run.json").read_text())["data"]
    assert data["test"]["rows"] == 38 and json.loads((tmp_path / "m" / "run" / "eval.json").read_text())["n_test"] == 38


def test_rows_without_a_label_are_left_out_up_to_max_bad_fraction(tmp_path, tiny_bert, text_files):
    """A row whose label cell is empty was an error ("empty 'label' value"), in training and when evaluating. Now a
    few are left out with a warning naming them (from the classes, the split, the scores), as rows without a text
    are; more than data.max_bad_fraction of a file's rows is an error listing them (a GLUE test split of -1s: all)."""
    train = pd.read_csv(text_files["train"]).astype(object)
    train.loc[[3, 17], "label"] = [None, " "]
    train.to_csv(tmp_path / "train.csv", index=False)
    test = pd.read_csv(text_files["test"]).astype(object)
    test.loc[5, "label"] = None
    test.to_csv(tmp_path / "test.csv", index=False)
    assert len(train) * 0.05 > 2 and len(test) * 0.05 > 1
    with pytest.warns(UserWarning, match=r"skipping 2 row\(s\) without a label in .*train.csv:\n  .*row 4 \(line 5\): "
                                         r"no 'label' value\n  .*row 18 \(line 19\)"):
        fmtune.train(cfg_dict(tiny_bert, tmp_path / "train.csv", out=str(tmp_path / "run"),
                              data={"test": str(tmp_path / "test.csv")}, train={"max_steps": 2}), quiet=True)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["neg", "pos"]  # (no 'nan')
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert data["train"]["rows"] + data["val"]["rows"] == len(train) - 2 and data["test"]["rows"] == len(test) - 1
    with pytest.warns(UserWarning, match=r"skipping 1 row\(s\) without a label in .*test.csv"):
        assert fmtune.evaluate(tmp_path / "run", tmp_path / "test.csv", quiet=True)["n_test"] == len(test) - 1
    test["label"] = None
    test.to_csv(tmp_path / "unlabelled.csv", index=False)
    with pytest.raises(DataError, match=rf"unlabelled.csv: {len(test)} of {len(test)} rows have no label \(100%"):
        fmtune.evaluate(tmp_path / "run", tmp_path / "unlabelled.csv", quiet=True)


def test_unseen_label_in_validation(tmp_path, tiny_bert, text_files):
    val = pd.read_csv(text_files["val"])
    val.loc[7, "label"] = "meh"
    vp = tmp_path / "val.csv"
    val.to_csv(vp, index=False)
    with pytest.raises(DataError, match=r"val.csv: row 8 \(line 9\): label 'meh'.*not seen in training"):
        _train(tmp_path, tiny_bert, text_files["train"], data={"val": str(vp)})
    # asked for: mapped to 'unknown', never predicted, counted as an error
    s = fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(tmp_path / "ok"),
                              data={"val": str(vp), "test": str(vp), "unknown_labels": "unknown"},
                              train={"max_steps": 2}), quiet=True)
    assert s["eval"]["test"]["accuracy"] <= 1 - 1 / len(val)


def test_non_numeric_regression_target(tmp_path, tiny_bert):
    p = _csv(tmp_path, "r.csv", [["good", "1.5"], ["bad", "2"], ["ok", "three"], ["x", "4"]] * 3)
    with pytest.raises(DataError, match=r"r.csv: row 3 \(line 4\): regression target 'three'.*not a finite number"):
        _train(tmp_path, tiny_bert, p, task={"type": "regression"}, data={"val": str(p)})


def test_single_class_is_refused(tmp_path, tiny_bert):
    p = _csv(tmp_path, "one.csv", [["good", "pos"]] * 10)
    with pytest.raises(DataError, match="single label"):
        _train(tmp_path, tiny_bert, p)


def test_a_numeric_quantity_as_classes_is_refused_and_class_ids_are_not(tmp_path, tiny_bert):
    """Prices trained as 'classes' (the user forgot --task regression): most values occur once, so
    the run stops and says which task to use; integer class ids, even one row each, train."""
    rng = np.random.default_rng(0)
    prices = _csv(tmp_path, "prices.csv", [[f"flat {i}", f"{v:.2f}"] for i, v in enumerate(rng.normal(900, 200, 40))])
    with pytest.raises(DataError, match=r"column 'label' holds 40 different numbers \(.*40 of them in one row only, "
                                        r"e\.g\. '.*' in .*prices\.csv: row \d+ \(line \d+\)\).*--task regression"):
        _train(tmp_path, tiny_bert, prices, data={"val": str(prices)})
    ids = _csv(tmp_path, "ids.csv", [[f"intent {i}", str(i)] for i in range(1, 31)])
    _train(tmp_path, tiny_bert, ids, data={"val": str(ids)}, train={"epochs": 1})
    assert len(json.loads((tmp_path / "run" / "labels.json").read_text())["labels"]) == 30
    halves = _csv(tmp_path, "halves.csv", [[f"t {i}", str((i % 25) / 2)] for i in range(75)])
    with pytest.warns(UserWarning, match=r"column 'label' holds 25 different numbers \(0 to 12\).*--task regression"):
        _train(tmp_path / "h", tiny_bert, halves, data={"val": str(halves)}, train={"epochs": 1})


def test_semicolon_csv_from_a_spreadsheet_is_read_like_a_comma_one(tmp_path):
    p = tmp_path / "excel.csv"
    p.write_text("text;label\n\"well, it was good\";pos\nbad film;neg\n", encoding="utf-8")
    df = read_table(p)
    assert list(df.columns) == ["text", "label"] and df["text"].tolist() == ["well, it was good", "bad film"]
    chunk, problems = next(iter_chunks(p, "utf-8", 10))
    assert chunk["label"].tolist() == ["pos", "neg"] and not problems
    comma = tmp_path / "comma.csv"  # a comma in the header keeps the comma, whatever the cells hold
    comma.write_text("text,label\na;b,pos\n", encoding="utf-8")
    assert read_table(comma)["text"].tolist() == ["a;b"]


def test_an_index_pandas_wrote_into_the_file_is_not_data(tmp_path):
    """df.to_csv(path) without index=False writes the index as a nameless first column, to_parquet as
    __index_level_0__: neither is read as a column (text_columns=all read it as text); a nameless first column of
    other values is kept."""
    from fmtune.config import DataConfig
    from fmtune.data.tabular import render

    df = pd.DataFrame({"age": ["39", "50", "38"], "job": ["clerk", "manager", "cleaner"], "label": ["a", "b", "a"]},
                      index=[4, 9, 2])
    df.to_csv(tmp_path / "i.csv")
    df.to_parquet(tmp_path / "i.parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(df).replace_schema_metadata(None), tmp_path / "hf.parquet")  # no pandas meta
    for name in ("i.csv", "i.parquet", "hf.parquet"):
        got = read_table(tmp_path / name)
        assert got.columns.tolist() == ["age", "job", "label"], name
        assert render(got, DataConfig(text_columns="all"))["text"][0] == "age: 39, job: clerk", name
    df.reset_index().rename(columns={"index": ""}).assign(**{"": ["x", "y", "z"]}).to_csv(tmp_path / "k.csv",
                                                                                           index=False)
    assert read_table(tmp_path / "k.csv").columns[0] == "Unnamed: 0"


def test_labels_differing_only_in_case_or_spaces_are_named(tmp_path, tiny_bert):
    rows = [["good", "pos"], ["bad", "neg"]] * 6 + [["fine", "pos "], ["poor", "Neg"]]
    p = _csv(tmp_path, "look.csv", rows)
    with pytest.warns(UserWarning) as caught:
        _train(tmp_path, tiny_bert, p, data={"val": str(p)}, train={"epochs": 1})
    said = " ".join(str(w.message) for w in caught)
    assert "'pos' (6 rows) and 'pos ' (1 row(s), first" in said and "look.csv: row 13 (line 14)" in said
    assert "'neg' (6 rows) and 'Neg' (1 row(s), first" in said and "row 14 (line 15)" in said


# --- images --------------------------------------------------------------------------------
def test_bad_images_are_skipped_with_a_warning_then_fail_over_the_limit(tmp_path, tiny_vit):
    root = save_shape_images(tmp_path / "imgs", 12)
    val = str(save_shape_images(tmp_path / "val", 3))
    (root / "top" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "bottom" / "notes.jpg").write_text("hello")
    good = root / "top" / "0.png"
    (root / "top" / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    expected = r"(?s)3 of 27 images cannot be read.*max_bad_fraction.*corrupt.png.*truncated.png"
    with pytest.raises(DataError, match=expected):
        _train(tmp_path, tiny_vit, root, data={"val": val}, train={"max_steps": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = fmtune.train(cfg_dict(tiny_vit, root, out=str(tmp_path / "ok"), data={"max_bad_fraction": 0.2, "val": val},
                                  train={"max_steps": 1}), quiet=True)
    msgs = " ".join(str(w.message) for w in caught)
    assert "skipping" in msgs and "truncated.png" in msgs and "notes.jpg" in msgs and "corrupt.png" in msgs
    assert s["best"] is not None


def test_grayscale_rgba_cmyk_palette_images_are_converted(tmp_path, tiny_vit):
    root = tmp_path / "modes"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i, mode in enumerate(["L", "RGBA", "CMYK", "P", "I;16", "LA"]):
            arr = rng.integers(0, 255, size=(20, 30, 3), dtype=np.uint8)
            img = Image.fromarray(arr).convert(mode if mode != "I;16" else "L")
            if mode == "I;16":
                img = img.convert("I;16")
            ext = "jpg" if mode == "CMYK" else "png"
            img.save(root / label / f"{i}.{ext}")
    s = fmtune.train(cfg_dict(tiny_vit, root, out=str(tmp_path / "r"), data={"max_bad_fraction": 0.0},
                              train={"max_steps": 1}), quiet=True)
    assert s["best"] is not None


def test_image_csv_with_relative_paths(tmp_path, tiny_vit):
    root = save_shape_images(tmp_path / "data" / "imgs", 8)
    rows = [(str(p.relative_to(tmp_path / "data")), p.parent.name) for p in sorted(root.rglob("*.png"))]
    csv = tmp_path / "data" / "index.csv"
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(csv, index=False)
    s = fmtune.train(cfg_dict(tiny_vit, csv, out=str(tmp_path / "r"), data={"image_column": "path"},
                              train={"max_steps": 1}), quiet=True)
    assert s["best"] is not None
    assert len(read_any(root)) == 16


def test_a_folder_without_class_folders_reads_each_class_from_the_file_name(tmp_path, tiny_vit, image_dirs):
    """Oxford-IIIT Pet (Abyssinian_12.jpg, american_bulldog_3.jpg) and Dogs vs. Cats (cat.0.jpg): one folder of the
    images, each one's class its name without the number at its end, said; evaluate reads a test folder so;
    data.label_pattern reads other names (the Free Spoken Digit Dataset's 0_jackson_0.wav: '^(\\d+)_'), kept for
    evaluate. Names that give one class, or a class a file, or no class, are errors naming the setting."""
    import shutil

    import yaml

    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        for i, f in enumerate(sorted(image_dirs[split].rglob("*.png"))):
            shutil.copy(f, tmp_path / split / f"{f.parent.name}_shape{'.' if i % 2 else '_'}{i}.png")
    with pytest.warns(UserWarning, match=r"no class sub-folders: each file's class read from its name, without the "
                                         r"number at its end \(\w+_shape[._]\d+.png -> \w+_shape\): 2 classes"):
        _train(tmp_path / "a", tiny_vit, tmp_path / "train", train={"max_steps": 2})
    classes = sorted(f"{p.name}_shape" for p in image_dirs["train"].iterdir() if p.is_dir())
    assert json.loads((tmp_path / "a" / "run" / "labels.json").read_text())["labels"] == classes
    with pytest.warns(UserWarning, match="no class sub-folders"):
        assert fmtune.evaluate(tmp_path / "a" / "run", tmp_path / "test", quiet=True)["n_test"] == 20
    # a pattern: its first group the class, for every file (sub-folders or not), kept in config.yaml
    (tmp_path / "fsdd").mkdir()
    for i, f in enumerate(sorted(image_dirs["train"].rglob("*.png"))):
        shutil.copy(f, tmp_path / "fsdd" / f"{f.parent.name}_{['jackson', 'theo'][i % 2]}_{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(tmp_path / "b", tiny_vit, tmp_path / "fsdd", data={"label_pattern": r"^([a-z]+)_"},
               train={"max_steps": 2})
    assert json.loads((tmp_path / "b" / "run" / "labels.json").read_text())["labels"] == sorted(
        p.name for p in image_dirs["train"].iterdir() if p.is_dir())
    assert yaml.safe_load((tmp_path / "b" / "run" / "config.yaml").read_text())["data"]["label_pattern"] == "^([a-z]+)_"
    # names that hold no classes
    (tmp_path / "one").mkdir()
    for i, f in enumerate(sorted(image_dirs["train"].rglob("*.png"))[:6]):
        shutil.copy(f, tmp_path / "one" / f"IMG_{1000 + i}.png")
    with pytest.raises(DataError, match=r"one: 6 files without class sub-folders, whose names give 1 class\(es\) "
                                        r"\(IMG\); give the files in class sub-folders, or --set data.label_pattern"):
        _train(tmp_path / "c", tiny_vit, tmp_path / "one")
    (tmp_path / "one" / "cover.png").write_bytes((tmp_path / "one" / "IMG_1000.png").read_bytes())
    with pytest.raises(DataError, match=r"cover.png: no class sub-folder holds it, and its name holds no class"):
        _train(tmp_path / "c", tiny_vit, tmp_path / "one")
    with pytest.raises(DataError, match=r"IMG_1000.png: data.label_pattern '\^\(x\)' finds no class in its name"):
        _train(tmp_path / "c", tiny_vit, tmp_path / "one", data={"label_pattern": "^(x)"})
    with pytest.raises(ConfigError, match=r"data.label_pattern: '\(' is not a regular expression"):
        _train(tmp_path / "c", tiny_vit, tmp_path / "one", data={"label_pattern": "("})


def test_a_folder_with_its_metadata_table_reads_its_labels_there(tmp_path, tiny_vit, image_dirs):
    """Hugging Face's imagefolder layout: the images beside metadata.jsonl (or .csv), {"file_name": ..., "label": ...}:
    the labels are the table's, not read from the file names (IMG_0001.png names no class)."""
    import shutil

    rows = []
    (tmp_path / "data").mkdir()
    for i, f in enumerate(sorted(image_dirs["train"].rglob("*.png"))):
        shutil.copy(f, tmp_path / "data" / f"IMG_{i:04d}.png")
        rows.append({"file_name": f"IMG_{i:04d}.png", "label": f.parent.name})
    (tmp_path / "data" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_any(tmp_path / "data")
    assert got["label"].tolist() == [r["label"] for r in rows]
    _train(tmp_path, tiny_vit, tmp_path / "data", train={"max_steps": 2})
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == sorted({r["label"] for r in rows})


def test_empty_image_folder(tmp_path, tiny_vit):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        _train(tmp_path, tiny_vit, tmp_path / "imgs")


# --- models ---------------------------------------------------------------------------------
def test_model_path_that_does_not_exist(tmp_path, text_files):
    with pytest.raises(ModelError, match="not a zoo model and no such folder.*minilm-l6"):
        _train(tmp_path, tmp_path / "no-such-model", text_files["train"])


def test_folder_that_is_not_a_model(tmp_path, text_files):
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "readme.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a Hugging Face model folder \\(no config.json"):
        _train(tmp_path, tmp_path / "notmodel", text_files["train"])


def test_broken_model_config(tmp_path, text_files):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ModelError, match="cannot read the model config"):
        _train(tmp_path, tmp_path / "broken", text_files["train"])


# --- config -----------------------------------------------------------------------------------
def test_unknown_key_and_wrong_type_name_the_dotted_path(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrate'; valid keys here: .*lr"):
        load(overrides=["train.lrate=1e-4"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer, got 'many'"):
        load(overrides=["train.epochs=many"])
    with pytest.raises(ConfigError, match="strategy.name: 'sideways' is not one of"):
        load(overrides=["strategy.name=sideways"])
    with pytest.raises(ConfigError, match="train.lr: must be > 0"):
        load(overrides=["train.lr=0"])
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: minilm-l6\n  colour: blue\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.colour'"):
        load(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="c.yaml: expected a mapping"):
        load(p)


def test_overrides_and_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 3e-5\n  epochs: 2\n")
    cfg = load(p, overrides=["train.epochs=5", "model.max_length=64", "train.grad_clip=null"])
    assert cfg.train.lr == 3e-5 and cfg.train.epochs == 5 and cfg.model.max_length == 64
    assert cfg.train.grad_clip is None


def test_unknown_metric_fails_before_training(tmp_path, tiny_bert, text_files):
    with pytest.raises(ConfigError, match="train.metric: 'rmse' is not computed for task 'classification'.*accuracy"):
        _train(tmp_path, tiny_bert, text_files["train"], train={"metric": "rmse"})
    assert not (tmp_path / "run").exists()  # nothing written: the same command works once fixed


EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load(path)
    assert cfg.model.name and cfg.data.train


def test_multilabel_cells_written_as_lists_are_read_as_lists(tmp_path, tiny_st_bert, text_files):
    """A list column written to CSV (pandas writes "['a', 'b']", json '["a", "b"]') is read as its labels, the
    same run as with '|'-joined cells; a literal is parsed, never evaluated."""
    from fmtune.tasks import MultiLabel

    df = pd.DataFrame({"label": ["['pos', 'music']", '["neg"]', "[]", "pos|music", "[__import__('os')]"]})
    task = MultiLabel.from_train(df["label"].iloc[:4], df)
    assert task.labels == ["music", "neg", "pos"]
    assert task.encode(df["label"].iloc[:4], df, "label").tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1]]
    assert task._split(df["label"].iloc[4]) == ["[__import__('os')]"]  # not a literal: one label, as written
    runs = {}
    for style in ("joined", "listed"):
        paths = {}
        for name in ("multilabel_train", "multilabel_test"):
            part = pd.read_csv(text_files[name])
            if style == "listed":
                part["label"] = [str(c.split("|")) if i % 2 else json.dumps(c.split("|"))
                                 for i, c in enumerate(part["label"])]
            paths[name] = tmp_path / f"{style}-{name}.csv"
            part.to_csv(paths[name], index=False)
        s = fmtune.train(cfg_dict(tiny_st_bert, paths["multilabel_train"], out=str(tmp_path / style),
                                  task={"type": "multilabel"}, data={"test": str(paths["multilabel_test"])},
                                  train={"epochs": 1}), quiet=True, report=False)
        runs[style] = (json.loads((tmp_path / style / "labels.json").read_text())["labels"], s["eval"]["test"])
    assert runs["listed"] == runs["joined"] and runs["listed"][0] == ["music", "neg", "pos"]


def test_multilabel_cells_joined_by_another_separator_are_pointed_out(tmp_path):
    from fmtune.tasks import MultiLabel

    df = pd.DataFrame({"label": ["sports,politics", "sports", "weather", "politics,weather", "sports"]})
    df.attrs["source"] = "train.csv"
    with pytest.warns(UserWarning, match=r"row 1 .*'\|'.*2 of 5 hold ','.*--set data.label_separator=,"):
        task = MultiLabel.from_train(df["label"], df)
    assert "sports,politics" in task.labels  # read as written: a label name may hold a comma
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MultiLabel.from_train(df["label"], df, separator=",")  # told: no warning
        MultiLabel.from_train(pd.Series(["a|b", "c,d"]), df)  # the separator is in use: no hint
