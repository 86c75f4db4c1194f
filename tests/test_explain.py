"""fmtune explain: attributions land on what decides the label; bad inputs are clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import NEG, POS, SIZE, SQUARE, cfg_dict
from PIL import Image

import fmtune
from fmtune.cli import main
from fmtune.errors import ConfigError, DataError
from fmtune.explain import explain


@pytest.mark.parametrize("baseline", [None, "mask", "unk"])  # None: [PAD]
def test_text_attributions_fall_on_the_deciding_word(text_run, text_files, baseline):
    df = pd.read_csv(text_files["test"]).head(16)
    res = explain(text_run, [str(text_files["test"])], limit=16, baseline=baseline, quiet=True)
    assert res["baseline"] == (baseline or "pad")
    assert (text_run / "explain" / "attributions.html").is_file()
    saved = json.loads((text_run / "explain" / "attributions.json").read_text())
    assert len(saved) == len(res["items"]) == 16
    hits = n = 0
    for item, (_, row) in zip(res["items"], df.iterrows()):
        assert item["true"] == row["label"] and [w["word"] for w in item["words"]] == row["text"].split()
        if item["predicted"] != item["true"]:
            continue
        n += 1
        key = next(w for w in row["text"].split() if w in POS + NEG)
        top = max(item["words"], key=lambda w: w["attribution"])  # strongest evidence for the prediction
        hits += top["word"] == key
        assert item["top_positive"][0] == top
    assert n >= 12 and hits / n >= 0.8, (hits, n)
    html = (text_run / "explain" / "attributions.html").read_text()
    assert "<span" in html and "rgba(" in html


@pytest.mark.parametrize("method,baseline", [("gradcam", "mean"), ("ig", "mean"), ("occlusion", "mean"),
                                             ("occlusion", "blur")])  # ig from a blur does not pass: see the README
def test_image_attributions_fall_on_the_deciding_square(square_run, method, baseline, tmp_path):
    run, test, boxes = square_run
    out = tmp_path / method
    res = explain(run, [str(test)], method=method, out=out, limit=12, baseline=baseline, quiet=True)
    heat = np.load(out / "heatmaps.npy").astype(np.float32)
    assert heat.shape == (12, SIZE, SIZE) and np.isfinite(heat).all()
    inside = []
    paths = sorted(boxes)  # list_images order: blue/ then red/, file names sorted
    for k, item in enumerate(res["items"]):
        path = next(p for p in paths if p.endswith(f"{item['true']}/{item['name']}"))
        y, x = boxes[path]
        if item["predicted"] != item["true"]:
            continue
        box = np.zeros((SIZE, SIZE), dtype=bool)
        box[y: y + SQUARE, x: x + SQUARE] = True
        inside.append(heat[k][box].mean() / max(heat[k][~box].mean(), 1e-9))  # 1 for a map that ignores it
    print(method, np.round(inside, 2))
    assert len(inside) >= 9 and np.median(inside) > 2.5, (method, np.round(inside, 2))
    assert (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 12


def test_images_embedded_in_a_hugging_face_parquet_are_explained(square_run, tmp_path):
    """--input and --misclassified read the images from the table, each named by its file name,
    with the true label named from the file's class ids."""
    from conftest import class_folders_as_hf_parquet

    run, test, _ = square_run
    files, names = class_folders_as_hf_parquet({"test": test}, tmp_path, "image", "Image", "*/*.png")
    res = explain(run, [str(files["test"])], method="gradcam", out=tmp_path / "e", limit=4, quiet=True)
    firsts = sorted(p.name for p in (test / names[0]).glob("*.png"))[:4]
    assert [it["name"] for it in res["items"]] == firsts and {it["true"] for it in res["items"]} == {names[0]}
    from conftest import hf_parquet

    pngs = sorted(test.glob("*/*.png"))  # every label swapped: the run's right answers are the "mistakes"
    swapped = hf_parquet(tmp_path / "swapped.parquet",
                         {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in pngs],
                          "label": [1 - names.index(p.parent.name) for p in pngs]}, {"label": names}, set(),
                         {"image": "Image"})
    res = explain(run, misclassified=2, data=swapped, method="gradcam", out=tmp_path / "m", quiet=True)
    assert len(res["items"]) == 2
    assert all(it["name"] in {p.name for p in pngs} and it["predicted"] != it["true"] for it in res["items"])


def test_misclassified_explains_the_confident_mistakes(text_run, tmp_path):
    res = explain(text_run, misclassified=3, out=tmp_path / "m", quiet=True)
    assert len(res["items"]) <= 3
    for it in res["items"]:
        assert it["predicted"] != it["true"]
    scores = [it["score"] for it in res["items"]]
    assert scores == sorted(scores, reverse=True)


def test_target_label_and_a_wrong_size_image(square_run, tmp_path):
    run, _, _ = square_run
    img = np.full((70, 30, 3), 120, dtype=np.uint8)
    img[20:40, 5:25] = (230, 20, 20)
    Image.fromarray(img).save(tmp_path / "odd.jpg")  # not SIZE x SIZE: resized like in training
    res = explain(run, [str(tmp_path / "odd.jpg")], target="blue", out=tmp_path / "e", quiet=True)
    assert res["items"][0]["target"] == "blue" and (tmp_path / "e" / "001-odd.png").is_file()


def test_bad_requests_are_clear_errors(text_run, square_run, tiny_vit, image_dirs, tmp_path):
    run, test, _ = square_run
    with pytest.raises(ConfigError, match="does not apply to text models; choose one of: ig"):
        explain(text_run, ["great film"], method="gradcam")
    with pytest.raises(DataError, match="reads text, and this is an image file"):
        explain(text_run, [str(next(test.rglob("*.png")))])
    with pytest.raises(DataError, match="reads images"):
        explain(run, ["a sentence, not an image"])
    with pytest.raises(DataError, match="no such file"):
        explain(run, [str(tmp_path / "missing.png")])
    with pytest.raises(ConfigError, match="not a label of this run; labels: blue, red"):
        explain(run, [str(test)], target="green")
    with pytest.raises(ConfigError, match="nothing to explain"):
        explain(run)
    with pytest.raises(ConfigError, match="'blur' is not one for text runs; choose one of pad, mask, unk"):
        explain(text_run, ["great film"], baseline="blur")
    with pytest.raises(ConfigError, match="'mask' is not one for image runs; choose one of mean, blur, black"):
        explain(run, [str(test)], method="ig", baseline="mask")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="holds other files"):
        explain(text_run, ["great film"], out=tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    vit_run = tmp_path / "vit"
    fmtune.train(cfg_dict(tiny_vit, image_dirs["train"], out=str(vit_run), train={"epochs": 1}), quiet=True)
    with pytest.raises(ConfigError, match="gradcam needs a convolutional backbone"):
        explain(vit_run, [str(image_dirs["test"])], method="gradcam")
    res = explain(vit_run, [str(image_dirs["test"])], limit=2, quiet=True)  # auto: ig for a ViT
    assert res["method"] == "ig" and len(res["items"]) == 2


def test_cli_explain(text_run, tmp_path):
    assert main(["explain", str(text_run), "--input", "a really great film", "-o", str(tmp_path / "x")]) == 0
    saved = json.loads((tmp_path / "x" / "attributions.json").read_text())
    assert [w["word"] for w in saved[0]["words"]] == ["a", "really", "great", "film"]
    assert main(["explain", str(text_run), "--method", "occlusion", "--input", "x"]) == 2


def test_text_files_are_read_as_training_reads_them(text_run, tmp_path):
    """--input a.txt: one text a line; a .txt that is a table (the Emotion dataset's text;label lines) gives each
    text and its true label, as training reads it (it was explained whole, 'text;label', as one text)."""
    from fmtune.explain import collect_inputs

    pred = fmtune.load(text_run)
    (tmp_path / "lines.txt").write_text("a really great film\n\nthe plot was awful\n")
    got = collect_inputs(pred, [str(tmp_path / "lines.txt")], 10)
    assert [(g["input"], g["true"]) for g in got] == [("a really great film", None), ("the plot was awful", None)]
    assert [g["name"] for g in got] == ["line 1", "line 3"]
    rows = [("a really great film", "pos"), ("the plot was awful", "neg")] * 3
    (tmp_path / "emotion.txt").write_text("".join(f"{t};{y}\n" for t, y in rows))
    with pytest.warns(UserWarning, match="first line is data"):
        got = collect_inputs(pred, [str(tmp_path / "emotion.txt")], 10)
    assert [(g["input"], g["true"]) for g in got] == rows


@pytest.mark.parametrize("strategy", ["lora", "prompt"])
def test_adapter_runs_are_explained_through_the_adapter(tiny_bert, text_files, tmp_path, strategy):
    run = tmp_path / strategy
    fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(run), strategy={"name": strategy},
                          train={"epochs": 1}), quiet=True)
    res = explain(run, ["the movie was good"], quiet=True)
    words = res["items"][0]["words"]
    assert [w["word"] for w in words] == ["the", "movie", "was", "good"]
    assert any(w["attribution"] != 0 for w in words)


def test_text_baselines_are_the_tokens_asked_for(text_run, tmp_path):
    from types import SimpleNamespace

    from fmtune.explain import baseline_token

    runs = {b: explain(text_run, ["a really great film"], baseline=b, out=tmp_path / b, quiet=True) for b in
            ("pad", "mask")}
    words = {b: [w["attribution"] for w in r["items"][0]["words"]] for b, r in runs.items()}
    assert len(words["pad"]) == len(words["mask"]) == 4 and words["pad"] != words["mask"]
    no_mask = SimpleNamespace(pad_token_id=None, mask_token_id=None, unk_token_id=3)
    assert baseline_token(no_mask, "pad") == 0 and baseline_token(no_mask, "unk") == 3
    with pytest.raises(ConfigError, match="tokenizer has no mask token"):
        baseline_token(no_mask, "mask")
