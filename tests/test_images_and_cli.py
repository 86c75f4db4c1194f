"""Image runs end to end, the linear probe against scikit-learn, and the CLI verbs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cfg_dict, class_folders_as_hf_parquet, hf_parquet, save_turned_photo
from PIL import Image
from sklearn.linear_model import LogisticRegression

import fmtune
from fmtune.cli import main
from fmtune.errors import DataError


@pytest.mark.parametrize("model", ["tiny_vit", "tiny_resnet", "mobilenet-v2"])
def test_image_classification_end_to_end(tmp_path, image_dirs, model, request):
    name = request.getfixturevalue(model) if model.startswith("tiny") else model
    s = fmtune.train(cfg_dict(name, image_dirs["train"], out=str(tmp_path / "run"),
                              model={"image_size": 32}, data={"test": str(image_dirs["test"])},
                              train={"epochs": 4, "batch_size": 8}), quiet=True)
    assert s["eval"]["test"]["accuracy"] >= 0.8, s
    preds = fmtune.predict(tmp_path / "run", image_dirs["test"], quiet=True)
    assert len(preds) == 20 and set(preds["label"]) <= {"top", "bottom"}
    # a folder with an unreadable file: the row is reported, the rest predicted
    (image_dirs["test"] / "bad.png").write_text("not an image")
    try:
        with pytest.warns(UserWarning, match="bad.png"):
            preds = fmtune.predict(tmp_path / "run", image_dirs["test"], quiet=True, )
    finally:
        (image_dirs["test"] / "bad.png").unlink()
    assert preds["error"].notna().sum() == 1 and preds["label"].notna().sum() == 20


def test_a_table_whose_images_are_in_a_folder_below_it(tmp_path, image_dirs, tiny_vit):
    """Kaggle's layout: train.csv beside train_images/, the table naming files relative to that folder. Training
    finds the folder (data.media_root, kept for predict); another table's error says where its files are."""
    import shutil

    shutil.copytree(image_dirs["train"], tmp_path / "train_images")
    files = sorted(p.relative_to(image_dirs["train"]) for p in image_dirs["train"].glob("*/*.png"))
    table = pd.DataFrame({"image_id": [str(f) for f in files], "label": [f.parent.name for f in files]})
    table.to_csv(tmp_path / "train.csv", index=False)
    cfg = cfg_dict(tiny_vit, tmp_path / "train.csv", out=str(tmp_path / "run"), model={"image_size": 32},
                   data={"image_column": "image_id"}, train={"epochs": 1, "batch_size": 8})
    s = fmtune.train(cfg, quiet=True)
    assert s["columns_read"] == {"media_root": str((tmp_path / "train_images").resolve())} and s["best"] is not None
    (tmp_path / "test_images").mkdir()
    tests = sorted(image_dirs["test"].glob("*/*.png"))
    for f in tests:
        shutil.copy(f, tmp_path / "test_images" / f"{f.parent.name}-{f.name}")
    pd.DataFrame({"image_id": [f"{f.parent.name}-{f.name}" for f in tests], "label": [f.parent.name for f in tests]}
                 ).to_csv(tmp_path / "test.csv", index=False)
    with pytest.raises(DataError, match=rf"file not found(.|\n)*\(they are under {tmp_path / 'test_images'}: "
                                        rf"--set data.media_root={tmp_path / 'test_images'}\)$"):
        fmtune.evaluate(tmp_path / "run", tmp_path / "test.csv", quiet=True)  # (read from the run's media_root)
    preds = fmtune.predict(tmp_path / "run", tmp_path / "train.csv", quiet=True)
    assert len(preds) == len(files) and not preds["error"].any()
    moved = fmtune.predict(tmp_path / "run", tmp_path / "train.csv", quiet=True, media_root=tmp_path)
    assert moved["error"].str.contains(f"no such image file: {tmp_path / 'bottom'}").any()  # read from the one given
    explained = fmtune.explain(tmp_path / "run", [str(tmp_path / "train.csv")], limit=2, quiet=True,
                               out=tmp_path / "explained")  # the table explained as the run read it
    assert [e["name"] for e in explained["items"]] == [f.name for f in files[:2]]


def test_photos_are_read_upright_as_their_exif_orientation_says(tmp_path, image_dirs, tiny_vit):
    """A phone photo stores its pixels turned, with an EXIF orientation: read as shown (transformers' load_image
    does the same), in training and predict; it was read on its side."""
    from transformers.image_utils import load_image

    from fmtune.data.dataset import load_rgb, upright_size

    upright = np.zeros((40, 20, 3), np.uint8)
    upright[:20] = 220  # bright top half, as shown
    photo = save_turned_photo(tmp_path / "photo.jpg", upright)
    with Image.open(photo) as raw:
        assert raw.size == (40, 20) and upright_size(raw) == (20, 40)
    img = load_rgb(photo)
    assert img.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(img), np.asarray(load_image(str(photo))))
    pixels = np.asarray(img).astype(float)
    assert pixels[:20].mean() > 200 and pixels[20:].mean() < 20
    # the shape images of a class, stored turned: predicted as the same images stored upright
    turned = tmp_path / "turned"
    for f in sorted(image_dirs["test"].glob("*/*.png")):
        (turned / f.parent.name).mkdir(parents=True, exist_ok=True)
        save_turned_photo(turned / f.parent.name / f"{f.stem}.jpg", np.asarray(Image.open(f).convert("RGB")))
    fmtune.train(cfg_dict(tiny_vit, image_dirs["train"], out=str(tmp_path / "run"), model={"image_size": 32},
                          train={"epochs": 1, "batch_size": 8}), quiet=True)
    pred, moved = fmtune.load(tmp_path / "run"), []
    for f in sorted(turned.glob("*/*.jpg"))[:6]:
        shown, stored = f.with_name(f"{f.stem}-shown.png"), f.with_name(f"{f.stem}-stored.png")
        load_image(str(f)).save(shown)  # as transformers shows it
        Image.open(f).convert("RGB").save(stored)  # its pixels as stored
        got = pred.predict(str(f))["probabilities"]
        assert got == pytest.approx(pred.predict(str(shown))["probabilities"], abs=1e-5)
        moved.append(max(abs(got[k] - v) for k, v in pred.predict(str(stored))["probabilities"].items()))
    assert max(moved) > 1e-3  # (read as stored, the predictions differ)


def test_a_folder_of_split_folders_trains_on_train_and_tests_on_test(tmp_path, image_dirs, tiny_vit):
    """Kaggle's and the imagefolder layout: data/train/<class>/..., data/test/<class>/... given as one folder trains on
    train/ and tests on test/ (they were read as two classes, 'train' and 'test'); evaluate and predict read test/."""
    import shutil

    for split in ("train", "test"):
        shutil.copytree(image_dirs[split], tmp_path / "data" / split)
    with pytest.warns(UserWarning, match=r"ships its held-out splits: data.train = .*train; data.test = .*test"):
        s = fmtune.train(cfg_dict(tiny_vit, tmp_path / "data", out=str(tmp_path / "run"), model={"image_size": 32},
                                  train={"epochs": 1, "batch_size": 8}), quiet=True)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["bottom", "top"]
    assert s["eval"]["test"]["accuracy"] == fmtune.evaluate(tmp_path / "run", tmp_path / "data",
                                                            quiet=True)["test"]["accuracy"]
    assert len(fmtune.predict(tmp_path / "run", tmp_path / "data", quiet=True)) == 20  # test/'s images
    from fmtune.data.readers import read_image_folder

    with pytest.raises(DataError, match=r"data: its sub-folders are splits \(train, test\), not classes: give .*"
                                        r"data/train"):
        read_image_folder(tmp_path / "data")  # (what reads a class folder elsewhere: fmtune transfer, select ...)
    (tmp_path / "data" / "cats").mkdir()  # a sub-folder that is no split: then they are classes, as before
    (tmp_path / "data" / "train" / "top" / "0.png").rename(tmp_path / "data" / "cats" / "0.png")
    from fmtune.data.readers import split_folders

    assert split_folders(tmp_path / "data") == {}


def test_image_paths_built_from_other_columns(tmp_path, image_dirs, tiny_vit):
    """Kaggle's layout: an id column, the images named {id}.png in a folder. data.image_column takes the template;
    a name in it that is not a column is an error naming the columns."""
    import shutil

    (tmp_path / "train").mkdir()
    rows = []
    for i, f in enumerate(sorted(image_dirs["train"].glob("*/*.png"))):
        shutil.copy(f, tmp_path / "train" / f"img{i:03d}.png")
        rows.append({"id": f"img{i:03d}", "label": f.parent.name})
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    cfg = cfg_dict(tiny_vit, tmp_path / "train.csv", out=str(tmp_path / "run"), model={"image_size": 32},
                   data={"image_column": "train/{id}.png"}, train={"epochs": 1, "batch_size": 8})
    assert fmtune.train(cfg, quiet=True)["best"] is not None
    preds = fmtune.predict(tmp_path / "run", tmp_path / "train.csv", quiet=True)
    assert len(preds) == len(rows) and not preds["error"].any()
    cfg["data"]["image_column"] = "train/{image_id}.png"
    with pytest.raises(DataError, match=r"data.image_column 'train/\{image_id\}.png' names 'image_id', not a column; "
                                        "columns are: id, label"):
        fmtune.train({**cfg, "out": str(tmp_path / "run2")}, quiet=True)


@pytest.mark.parametrize("eager", [True, False])
def test_hugging_face_image_parquet_trains_and_predicts(tmp_path, image_dirs, tiny_vit, eager, monkeypatch):
    """A Hugging Face image dataset's Parquet split (images embedded as {bytes, path}, class ids
    named in its metadata) trains, decoded up front or per batch, and predicts; the predictions
    name each image, not its bytes; a cell that is no image is an error naming the row."""
    from fmtune.data import dataset

    if not eager:
        monkeypatch.setattr(dataset, "EAGER_IMAGE_BYTES", 0)
    column = "image" if eager else "img"  # (CIFAR-10's name: the one column of images is read)
    files, names = class_folders_as_hf_parquet({k: image_dirs[k] for k in ("train", "test")}, tmp_path, column,
                                               "Image", "*/*.png")
    s = fmtune.train(cfg_dict(tiny_vit, files["train"], out=str(tmp_path / "run"), model={"image_size": 32},
                              data={"test": str(files["test"])}, train={"epochs": 4, "batch_size": 8}), quiet=True)
    assert s["eval"]["test"]["accuracy"] >= 0.8, s
    assert s.get("columns_read") == (None if eager else {"image_column": "img"})
    if not eager:  # the feature cache tells lazily kept embedded images apart by their bytes
        from fmtune.training.cache import content_key

        spec = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
        a, b = (content_key("m", "train", dataset.ImageData([x], None, spec), "mean") for x in (b"\x01", b"\x02"))
        assert a != b
    fmtune.predict(tmp_path / "run", files["test"], tmp_path / "out.csv", quiet=True)
    out = pd.read_csv(tmp_path / "out.csv")
    assert out[column].str.startswith("embedded file ").all() and out["error"].isna().all()
    assert (out["label"] == out["predicted_label"]).mean() >= 0.8
    bad = hf_parquet(tmp_path / "bad.parquet", {"image": [{"bytes": b"not an image", "path": "x.png"}] * 2,
                                                "label": [0, 1]}, {"label": names}, set(), {"image": "Image"})
    with pytest.raises(DataError, match=r"(?s)bad.parquet: 2 of 2 images cannot be read.*row 1: embedded file x.png: "
                                        r"not a readable image \(UnidentifiedImageError: cannot identify image file in "
                                        r"the table\)"):
        fmtune.train(cfg_dict(tiny_vit, bad, out=str(tmp_path / "bad"), model={"image_size": 32},
                              data={"val": str(bad)}), quiet=True)


def test_head_strategy_matches_sklearn_logistic_regression(tmp_path, tiny_st_bert, text_files):
    """A linear probe trained by fmtune on the frozen encoder scores like scikit-learn's logistic
    regression on the same mean-pooled features."""
    from fmtune.config import DataConfig
    from fmtune.data.prepare import make_dataset
    from fmtune.data.readers import read_table
    from fmtune.models import build
    from fmtune.run import open_run
    from fmtune.training.infer import infer

    s = fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "run"),
                              strategy={"name": "head"}, data={"val": str(text_files["val"]),
                                                               "test": str(text_files["test"])},
                              model={"head_dropout": 0.0},
                              train={"epochs": 30, "lr": 1e-2, "head_lr": 0.1, "weight_decay": 0.0}), quiet=True)
    run = open_run(tmp_path / "run")
    cfg = DataConfig()
    feats = {}
    for split in ("train", "test"):
        ds, _ = make_dataset(read_table(text_files[split]), run.bundle, run.task, cfg)
        x, y = infer(run.bundle.model, ds, 64, features=True)
        feats[split] = (x.numpy(), y.numpy())
    # the backbone really was frozen: its features equal the pretrained model's
    pre = build.create(run.config.model, run.task)
    ds, _ = make_dataset(read_table(text_files["test"]), pre, run.task, cfg)
    assert torch.allclose(infer(pre.model, ds, 64, features=True)[0], torch.from_numpy(feats["test"][0]), atol=1e-5)
    lr = LogisticRegression(max_iter=5000).fit(*feats["train"])
    sk_acc = float((lr.predict(feats["test"][0]) == feats["test"][1]).mean())
    assert abs(s["eval"]["test"]["accuracy"] - sk_acc) <= 0.05, (s["eval"]["test"], sk_acc)


def test_cli_train_evaluate_predict(tmp_path, tiny_st_bert, text_files, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_st_bert), "--data", str(text_files["train"]), "--val",
               str(text_files["val"]), "--test", str(text_files["test"]), "--task", "classification",
               "--strategy", "last_n", "--epochs", "2", "--out", str(run), "--baseline",
               "--set", "train.lr=1e-3", "--set", "strategy.n=1", "--set", "train.precision=fp32", "-q"])
    assert rc == 0
    cfg = (run / "config.yaml").read_text()
    assert "n: 1" in cfg and "lr: 0.001" in cfg and "baseline: true" in cfg
    assert set(json.loads((run / "eval.json").read_text())) >= {"test", "baseline"}

    assert main(["evaluate", str(run), "--data", str(text_files["test"]), "--baseline"]) == 0
    err = capsys.readouterr().err
    assert "macro avg" in err and "weighted avg" in err and "pretrained baseline" in err

    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(text_files["test"]), "-o", str(out), "-q"]) == 0
    assert len(pd.read_csv(out)) == len(pd.read_csv(text_files["test"]))


def test_a_warning_is_said_once_per_command(capsys):
    """A file read again (by the report, by evaluation) says its warning once, not at every read; a new command says
    it again."""
    from fmtune import cli

    def said() -> int:
        out = capsys.readouterr()
        return (out.out + out.err).count("x.csv: its first line is data")

    cli._SHOWN.clear()
    for _ in range(3):
        cli._show_warning(UserWarning("x.csv: its first line is data"), UserWarning, "f.py", 1)
    assert said() == 1
    assert cli.main(["models"]) == 0 and not cli._SHOWN  # (a new command starts afresh)
    cli._show_warning(UserWarning("x.csv: its first line is data"), UserWarning, "f.py", 1)
    assert said() == 1


def test_cli_errors_are_one_clear_line(tmp_path, text_files, capsys):
    rc = main(["train", "--model", "no-such-model", "--data", str(text_files["train"]), "--out",
               str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "no-such-model" in err and "Traceback" not in err
    rc = main(["train", "--data", str(text_files["train"]), "--set", "train.bogus=1"])
    assert rc == 2 and "train.bogus" in capsys.readouterr().err
    rc = main(["evaluate", str(tmp_path / "nothing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_help_lists_the_settings():
    out = subprocess.run([sys.executable, "-m", "fmtune", "train", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for key in ("train.lr", "train.head_lr", "train.patience", "strategy.n", "data.text_column", "train.grad_accum"):
        assert key in out
    assert "--resume" in out and "--overwrite" in out


def test_models_and_datasets_listing(tmp_path, capsys):
    assert main(["models"]) == 0 and main(["datasets"]) == 0
    err = capsys.readouterr().err
    assert "minilm-l6" in err and "efficientnet-lite0" in err and "rotten-tomatoes" in err and "digits" in err
    assert main(["datasets", "--export", "digits", str(tmp_path / "digits")]) == 0
    n = sum(1 for _ in (tmp_path / "digits").rglob("*.png"))
    assert n == 1797 and len(list((tmp_path / "digits" / "train").iterdir())) == 10


def _idx_files(folder, part, images, labels):
    """Fashion-MNIST's idx layout: a 16-byte header before the pixels, an 8-byte one before the labels."""
    import gzip

    with gzip.open(folder / f"{part}-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(b"\0" * 16 + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{part}-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"\0" * 8 + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_debians_idx_files_and_names_a_missing_package(tmp_path, monkeypatch):
    from fmtune.zoo import datasets as zoo

    monkeypatch.setattr(zoo, "FASHION_MNIST_DIR", tmp_path / "none")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        zoo.DATASETS.get("fashion-mnist").load()
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 256, (5, 28, 28))
    monkeypatch.setattr(zoo, "FASHION_MNIST_DIR", tmp_path)
    _idx_files(tmp_path, "train", train, np.arange(12) % 10)
    _idx_files(tmp_path, "t10k", test, np.array([9, 0, 1, 2, 3]))
    df = zoo.DATASETS.get("fashion-mnist").load()
    assert len(df) == 17 and df["label"].iloc[0] == "t-shirt-top" and df["label"].iloc[12] == "ankle-boot"
    np.testing.assert_array_equal(df["image"].iloc[13], test[1])
    _idx_files(tmp_path, "t10k", test[:, :20], np.array([9, 0, 1, 2, 3]))  # cut short: not 28x28
    with pytest.raises(DataError, match="t10k.*damaged"):
        zoo.DATASETS.get("fashion-mnist").load()


def test_zoo_text_datasets_are_real():
    from fmtune.zoo.datasets import DATASETS

    rt = DATASETS.get("rotten-tomatoes").load()
    assert len(rt) == 12808 and set(rt["label"]) == {"fresh", "rotten"}
    tw = DATASETS.get("tweet-sentiment").load()
    assert set(tw["label"]) == {"negative", "neutral", "positive"} and len(tw) > 30000
    assert np.all(rt["text"].str.len() > 0)


def test_exported_text_datasets_read_back_whole(tmp_path):
    """Every exported row reads back as one row with its label (tweets hold bare carriage returns)."""
    from fmtune.data.readers import read_any
    from fmtune.zoo.datasets import DATASETS, export

    for name in ("tweet-sentiment", "rotten-tomatoes"):
        paths = export(name, tmp_path / name)
        back = {k: read_any(p) for k, p in paths.items()}
        assert sum(len(df) for df in back.values()) == len(DATASETS.get(name).load())
        for df in back.values():
            assert df["label"].notna().all() and set(df["label"]) <= {"negative", "neutral", "positive", "fresh",
                                                                      "rotten"}
