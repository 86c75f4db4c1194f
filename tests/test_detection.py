"""Object detection: COCO / YOLO / VOC readers agree and name bad annotations, letterbox and
augmentation move boxes with the pixels, NMS and the loss's target assignment, COCO mAP through
pycocotools, training on tiny random backbones with a head-on-frozen-backbone baseline, predict
(boxes in the original image's pixels, drawn on request), reload, serve."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_head_cache_trains_the_same, cfg_dict, save_turned_photo
from PIL import Image

from fmtune import api
from fmtune.config import DataConfig
from fmtune.data.boxes import augment_boxes, letterbox, pack_targets, read_detection
from fmtune.errors import DataError
from fmtune.tasks.detection import Detection, best_f1_cut, box_iou, box_matches, f1_at, nms

CLASSES = ["red", "green", "blue"]
COLOURS = np.array([[230, 40, 40], [40, 200, 60], [60, 80, 230]], np.uint8)


def draw_scene(rng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, list[list[int]], list[int]]:
    """Grey noise with 1-3 filled rectangles, each of a class's colour; their exact boxes."""
    img = np.clip(rng.normal(110, 15, (h, w, 3)), 0, 255).astype(np.uint8)
    boxes, classes = [], []
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(0, 3))
        bw, bh = int(rng.integers(10, w // 2)), int(rng.integers(10, h // 2))
        x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
        img[y0:y0 + bh, x0:x0 + bw] = COLOURS[c]
        boxes.append([x0, y0, x0 + bw, y0 + bh])
        classes.append(c)
    return img, boxes, classes


def write_dataset(root: Path, n: int, seed: int) -> Path:
    """The same scenes as COCO (annotations.json), YOLO (images/ + labels/ + data.yaml) and VOC."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels", "Annotations", "JPEGImages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)]}
    for i in range(n):
        w, h = 64 + 16 * (i % 3), 48 + 8 * (i % 2)  # images of several sizes and shapes
        img, boxes, classes = draw_scene(rng, w, h)
        name = f"im{i:03d}.png"
        Image.fromarray(img).save(root / "images" / name)
        Image.fromarray(img).save(root / "JPEGImages" / name)
        coco["images"].append({"id": i + 1, "file_name": f"images/{name}", "width": w, "height": h})
        lines, objects = [], []
        for (x0, y0, x1, y1), c in zip(boxes, classes):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "category_id": c + 1,
                                        "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
            lines.append(f"{c} {(x0 + x1) / 2 / w} {(y0 + y1) / 2 / h} {(x1 - x0) / w} {(y1 - y0) / h}\n")
            objects.append(f"<object><name>{CLASSES[c]}</name><difficult>0</difficult><bndbox><xmin>{x0 + 1}</xmin>"
                           f"<ymin>{y0 + 1}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
        (root / "labels" / f"im{i:03d}.txt").write_text("".join(lines))
        (root / "Annotations" / f"im{i:03d}.xml").write_text(
            f"<annotation><filename>{name}</filename><size><width>{w}</width><height>{h}</height></size>"
            + "".join(objects) + "</annotation>")
    (root / "annotations.json").write_text(json.dumps(coco))
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames: [red, green, blue]\n")
    return root


@pytest.fixture(scope="module")
def boxes_data(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("det")
    return {s: write_dataset(base / s, n, seed) for s, n, seed in (("train", 48, 0), ("val", 12, 1), ("test", 12, 2))}


def _norm(df: pd.DataFrame) -> list:
    return sorted((Path(p).name, tuple(lab), tuple(tuple(round(v, 3) for v in b) for b in bx))
                  for p, lab, bx in zip(df["image"], df["labels"], df["boxes"]))


def test_coco_yolo_and_voc_read_the_same_boxes(boxes_data):
    root = boxes_data["train"]
    coco = read_detection(root / "annotations.json", DataConfig())
    yolo = read_detection(root / "data.yaml", DataConfig())
    voc = read_detection(_voc_only(root), DataConfig())
    assert len(coco) == 48 and coco.attrs["classes"] == CLASSES
    assert _norm(coco) == _norm(yolo) == _norm(voc)


def test_a_cvat_coco_export_is_found_and_its_images_beside_it(boxes_data, tmp_path):
    """CVAT exports COCO as annotations/instances_default.json beside images/, file names relative to images/: the
    folder is read as COCO (it was listed as images without boxes) and the file's images are found there."""
    import shutil

    root = boxes_data["train"]
    shutil.copytree(root / "images", tmp_path / "cvat" / "images")
    coco = json.loads((root / "annotations.json").read_text())
    for im in coco["images"]:
        im["file_name"] = Path(im["file_name"]).name
    (tmp_path / "cvat" / "annotations").mkdir()
    (tmp_path / "cvat" / "annotations" / "instances_default.json").write_text(json.dumps(coco))
    want = _norm(read_detection(root / "annotations.json", DataConfig()))
    assert _norm(read_detection(tmp_path / "cvat", DataConfig())) == want
    assert _norm(read_detection(tmp_path / "cvat" / "annotations" / "instances_default.json", DataConfig())) == want


def hf_detection_parquet(root: Path, out: Path, xyxy: bool = False, layout: str = "sequence") -> Path:
    """The COCO fixture as a Hugging Face detection split stores it: the image embedded, width and
    height, the objects' boxes [x, y, w, h] (or corners) and category ids, with the class names in
    the file's metadata. ``layout``: "sequence" (cppe-5's ``objects`` {bbox: [...], category:
    [...]}), "list" (``objects`` [{bbox, category}, ...], datasets' List of dicts) or "columns"
    (top-level ``bboxes`` and ``labels`` lists, no width and height)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    coco = json.loads((root / "annotations.json").read_text())
    rows = []
    for im in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        boxes = [[x, y, x + w, y + h] if xyxy else [x, y, w, h] for x, y, w, h in (a["bbox"] for a in anns)]
        image = {"bytes": (root / im["file_name"]).read_bytes(), "path": Path(im["file_name"]).name}
        cats = [a["category_id"] - 1 for a in anns]
        if layout == "columns":
            rows.append({"image": image, "bboxes": boxes, "labels": cats})
            continue
        objects = ([{"bbox": b, "category": c} for b, c in zip(boxes, cats)] if layout == "list"
                   else {"bbox": boxes, "category": cats})
        rows.append({"image": image, "width": im["width"], "height": im["height"], "objects": objects})
    box = {"feature": {"dtype": "float32", "_type": "Value"}, "length": 4, "_type": "Sequence"}
    category = {"names": CLASSES, "_type": "ClassLabel"}
    features = {"image": {"_type": "Image"}, "width": {"dtype": "int32", "_type": "Value"},
                "height": {"dtype": "int32", "_type": "Value"},
                "objects": {"feature": {"bbox": box, "category": category},
                            "_type": "List" if layout == "list" else "Sequence"}}
    if layout == "columns":
        features = {"image": {"_type": "Image"}, "bboxes": {"feature": box, "_type": "List"},
                    "labels": {"feature": category, "_type": "List"}}
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}})}),
                   out)
    return out


def test_hugging_face_detection_parquet_reads_the_same_boxes_trains_and_predicts(boxes_data, tmp_path, tiny_resnet):
    coco = read_detection(boxes_data["train"] / "annotations.json", DataConfig())
    hf = read_detection(hf_detection_parquet(boxes_data["train"], tmp_path / "train.parquet"), DataConfig())
    corners = read_detection(hf_detection_parquet(boxes_data["train"], tmp_path / "xyxy.parquet", xyxy=True),
                             DataConfig(box_format="xyxy"))
    assert hf.attrs["classes"] == CLASSES

    def boxes(df):
        return sorted((lab, tuple(round(v, 3) for v in b)) for labs, bx in zip(df["labels"], df["boxes"])
                      for lab, b in zip(labs, bx))

    assert boxes(hf) == boxes(corners) == boxes(coco)
    for layout in ("list", "columns"):
        other = read_detection(hf_detection_parquet(boxes_data["train"], tmp_path / f"{layout}.parquet",
                                                    layout=layout), DataConfig())
        assert other.attrs["classes"] == CLASSES and boxes(other) == boxes(coco), layout
    files = {s: hf_detection_parquet(boxes_data[s], tmp_path / f"{s}-hf.parquet") for s in ("val", "test")}
    cfg = det_cfg(tiny_resnet, boxes_data, tmp_path / "run", epochs=1)  # (trained on the 12 val images: quick)
    cfg["data"].update({"train": str(files["val"]), "val": str(files["val"]), "test": str(files["test"])})
    s = api.train(cfg, quiet=True)
    assert 0.0 <= s["eval"]["test"]["map"] <= 1.0
    api.predict(tmp_path / "run", files["test"], tmp_path / "out.csv", save_images=tmp_path / "drawn", quiet=True)
    out = pd.read_csv(tmp_path / "out.csv")
    assert out["error"].isna().all() and out["image"].str.startswith("embedded file im0").all()
    assert len(list((tmp_path / "drawn").glob("im0*.jpg"))) == 12
    with pytest.raises(DataError, match=r"no 'objects' column; a detection table holds an image per row.*bboxes"):
        pd.DataFrame({"image": ["a.png"]}).to_parquet(tmp_path / "bad.parquet")
        read_detection(tmp_path / "bad.parquet", DataConfig())


def tensorflow_csv(root: Path, out: Path) -> Path:
    """``root``'s scenes as Roboflow's "Tensorflow CSV" export lays a split out: the images and _annotations.csv
    (filename, width, height, class, xmin, ymin, xmax, ymax: one box a row) in one folder."""
    import shutil

    coco = read_detection(root / "annotations.json", DataConfig())
    out.mkdir(parents=True)
    rows = []
    for image, w, h, boxes, labels in coco[["image", "width", "height", "boxes", "labels"]].itertuples(index=False):
        shutil.copy(image, out / Path(image).name)
        rows += [{"filename": Path(image).name, "width": w, "height": h, "class": lab, "xmin": b[0], "ymin": b[1],
                  "xmax": b[2], "ymax": b[3]} for b, lab in zip(boxes, labels)]
    pd.DataFrame(rows).to_csv(out / "_annotations.csv", index=False)
    return out


def test_a_table_of_one_box_a_row_reads_the_same_boxes_and_trains_as_exported(boxes_data, tmp_path, tiny_resnet):
    """TensorFlow's object detection CSV (labelImg's xml_to_csv, Roboflow's Tensorflow CSV export: a row per box,
    filename, width, height, class, xmin ... ymax) reads the boxes COCO holds, from the file or its folder; a
    Roboflow export (train/, valid/, test/, each with _annotations.csv) trains on its splits; an image without a
    box (empty corners) has no objects; a corner that is no number is named by its row and column."""
    export = tmp_path / "export"
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        tensorflow_csv(boxes_data[split], export / folder)
    want = _norm(read_detection(boxes_data["train"] / "annotations.json", DataConfig()))
    assert _norm(read_detection(export / "train" / "_annotations.csv", DataConfig())) == want
    got = read_detection(export / "train", DataConfig())
    assert _norm(got) == want and len(got) == 48
    table = pd.read_csv(export / "train" / "_annotations.csv")
    empty = pd.concat([table, pd.DataFrame([{"filename": "extra.png", "width": 64, "height": 48}])])
    Image.new("RGB", (64, 48)).save(export / "train" / "extra.png")
    empty.to_csv(tmp_path / "empty.csv", index=False)
    (tmp_path / "extra.png").write_bytes((export / "train" / "extra.png").read_bytes())
    for f in table["filename"].unique():
        (tmp_path / f).write_bytes((export / "train" / f).read_bytes())
    with_empty = read_detection(tmp_path / "empty.csv", DataConfig())
    assert len(with_empty) == 49 and with_empty.iloc[-1]["boxes"] == [] and with_empty.iloc[-1]["labels"] == []
    bad = table.astype(object)
    bad.loc[3, "ymax"] = "n/a"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=r"bad.csv: row 4 \(line 5\): column 'ymax': 'n/a' is not a number"):
        read_detection(tmp_path / "bad.csv", DataConfig())
    second = int(np.flatnonzero((table["filename"] != table["filename"][0]).to_numpy())[0])  # an image's first row
    bad = table.astype(object)
    bad.loc[second, "width"] = "wide"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=rf"bad.csv: row {second + 1} \(line {second + 2}\): column 'width': 'wide'"):
        read_detection(tmp_path / "bad.csv", DataConfig())
    cfg = cfg_dict(tiny_resnet, export, task={"type": "detection"}, model={"name": str(tiny_resnet), "image_size": 64},
                   train={"epochs": 1, "batch_size": 8}, out=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = api.train(cfg, quiet=True)
    info = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert (info["train"]["rows"], info["val"]["rows"], info["test"]["rows"]) == (48, 12, 12)
    assert 0.0 <= summary["eval"]["test"]["map"] <= 1.0


def label_studio_boxes(root: Path, out: Path, minimal: bool = False) -> Path:
    """The COCO boxes of ``root`` as Label Studio exports them: its JSON (a task per image, its upload path
    /data/upload/1/<8 hex>-<name>, an annotation whose results are rectanglelabels in percent of original_width /
    original_height) or JSON-MIN (``image`` and ``label``: the rectangles). Its images are copied under images/."""
    import shutil

    coco = json.loads((root / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    (out / "images").mkdir(parents=True)
    tasks = []
    for k, im in enumerate(coco["images"]):
        shutil.copy(root / im["file_name"], out / "images" / Path(im["file_name"]).name)
        w, h = im["width"], im["height"]
        rects = [{"x": a["bbox"][0] * 100 / w, "y": a["bbox"][1] * 100 / h, "width": a["bbox"][2] * 100 / w,
                  "height": a["bbox"][3] * 100 / h, "rotation": 0, "rectanglelabels": [names[a["category_id"]]]}
                 for a in coco["annotations"] if a["image_id"] == im["id"]]
        upload = f"/data/upload/1/{k:08x}-{Path(im['file_name']).name}"
        if minimal:
            tasks.append({"image": upload, "id": k + 1, "label": [dict(r, original_width=w, original_height=h)
                                                                  for r in rects]})
        else:
            result = [{"type": "rectanglelabels", "from_name": "label", "to_name": "image", "original_width": w,
                       "original_height": h, "value": r} for r in rects]
            tasks.append({"id": k + 1, "data": {"image": upload}, "annotations": [{"result": result}]})
    (out / "export.json").write_text(json.dumps(tasks))
    return out / "export.json"


def test_label_studio_box_exports_read_the_same_boxes_and_train(boxes_data, tmp_path, tiny_resnet):
    """Label Studio's own JSON export of image boxes (and its JSON-MIN) was read as a COCO file ("no 'images'
    list"). Now its rectangles (percent of the image Label Studio saw) are the boxes COCO holds, its uploads'
    images found below the export by their own names; a rotated rectangle is the box that holds it; tasks not
    annotated are left out, said; a rectangle of two labels is an error naming its task; it trains."""
    want = _norm(read_detection(boxes_data["train"] / "annotations.json", DataConfig()))
    full = label_studio_boxes(boxes_data["train"], tmp_path / "ls")
    got = read_detection(full, DataConfig())
    assert _norm(got) == want and got.attrs["classes"] == sorted(CLASSES)
    assert _norm(read_detection(label_studio_boxes(boxes_data["train"], tmp_path / "min", True), DataConfig())) == want
    tasks = json.loads(full.read_text())
    tasks.append({"id": 99, "data": {"image": tasks[0]["data"]["image"]}, "annotations": []})
    box = tasks[0]["annotations"][0]["result"][0]
    box["value"] = dict(box["value"], x=10.0, y=10.0, width=20.0, height=10.0, rotation=90)
    w, h = box["original_width"], box["original_height"]
    (tmp_path / "ls" / "more.json").write_text(json.dumps(tasks))
    with pytest.warns(UserWarning, match="1 Label Studio task"):
        more = read_detection(tmp_path / "ls" / "more.json", DataConfig())
    assert len(more) == 48
    x0, y0, x1, y1 = more.iloc[0]["boxes"][0]  # 20% wide, 10% high, turned a quarter clockwise about its corner
    assert (x0, y0, x1, y1) == pytest.approx([0.1 * w - 0.1 * h, 0.1 * h, 0.1 * w, 0.1 * h + 0.2 * w])
    box["value"]["rectanglelabels"] = ["red", "blue"]
    (tmp_path / "ls" / "bad.json").write_text(json.dumps(tasks))
    with pytest.raises(DataError, match=r"bad.json: task 1 \(id 1\): box 1 has 2 labels"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_detection(tmp_path / "ls" / "bad.json", DataConfig())
    cfg = det_cfg(tiny_resnet, boxes_data, tmp_path / "run", epochs=1)
    cfg["data"]["train"] = str(full)
    api.train(cfg, quiet=True, report=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["train"]["rows"] == 48


def _voc_only(root: Path) -> Path:
    """A folder with just VOC's Annotations/ and JPEGImages/ (links), so the VOC reader is chosen."""
    voc = root.parent / f"{root.name}-voc"
    if not voc.exists():
        voc.mkdir()
        (voc / "Annotations").symlink_to(root / "Annotations")
        (voc / "JPEGImages").symlink_to(root / "JPEGImages")
    return voc


def test_boxes_of_turned_photos_are_where_they_are_shown(tmp_path, monkeypatch):
    """A phone photo (pixels stored turned, EXIF orientation 6) labelled as it is shown: YOLO's normalised boxes are
    scaled by the shown size (Ultralytics' exif_size) and the box lies on the object in the image the model reads.
    The stored size was used: boxes stretched across the wrong sides."""
    from fmtune.data import boxes
    from fmtune.data.boxes import box_dataset

    upright = np.full((60, 30, 3), 20, np.uint8)
    upright[10:20, 5:15] = (230, 30, 30)  # a red square near the top, as shown
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    save_turned_photo(root / "images" / "a.jpg", upright)
    (root / "labels" / "a.txt").write_text(f"0 {10 / 30} {15 / 60} {10 / 30} {10 / 60}\n")
    (root / "data.yaml").write_text("path: .\ntrain: images\nnames: [red]\n")
    df = read_detection(root / "data.yaml", DataConfig())
    assert (df["width"][0], df["height"][0]) == (30, 60)
    np.testing.assert_allclose(df["boxes"][0], [[5, 10, 15, 20]], atol=1e-4)  # x0, y0, x1, y1 in the shown image
    ds = box_dataset(df, "image", {"size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}, ["red"], True)
    x0, y0, x1, y1 = ds.targets[0, 0, 1:5].round().int().tolist()
    inside = ds.images[0][:, y0:y1, x0:x1].float()
    assert inside[0].mean() > 150 and inside[1].mean() < 100  # red where the box is
    # a COCO file whose tool drew on the pixels as stored (its size 60 x 30 is the stored one): read as stored
    stored = np.asarray(Image.open(root / "images" / "a.jpg").convert("RGB"))
    ys, xs = np.nonzero((stored[..., 0] > 150) & (stored[..., 1] < 100))
    box = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
    coco = {"images": [{"id": 1, "file_name": "images/a.jpg", "width": 60, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": box, "area": box[2] * box[3],
                             "iscrowd": 0}], "categories": [{"id": 1, "name": "red"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    df = read_detection(root / "annotations.json", DataConfig())
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(boxes, "EAGER_IMAGE_BYTES", 0)
        with pytest.warns(UserWarning, match="1 photo.*fit the pixels as stored"):
            ds = box_dataset(df, "image", {"size": 32, "mean": [0, 0, 0], "std": [1, 1, 1]}, ["red"], True)
        x0, y0, x1, y1 = ds.targets[0, 0, 1:5].round().int().tolist()
        inside = ds.raw([0])[0][:, y0:y1, x0:x1].float()
        assert ds.sizes == [(60, 30)] and inside[0].mean() > 150 and inside[1].mean() < 100, eager
    from fmtune.training.cache import content_key

    upright = ds.with_augment(0)
    upright.stored = frozenset()  # the same files read upright: other pixels, another feature cache entry
    assert content_key("m", "train", ds, "mean") != content_key("m", "train", upright, "mean")


def test_yolo_polygon_labels_image_lists_and_split_lists_read_the_same_boxes(boxes_data, tmp_path):
    """YOLO as Ultralytics writes it beyond folders of boxes: a split as a .txt list of images (its coco.yaml's
    train2017.txt; ./ relative to the list) or a list of folders / lists, and segmentation labels (a polygon a line,
    read as the box around it). The first 4 numbers of a polygon were read as a box, silently."""
    import shutil

    root = tmp_path / "y"
    shutil.copytree(boxes_data["train"] / "images", root / "images" / "a")
    shutil.copytree(boxes_data["train"] / "labels", root / "labels" / "a")
    want = _norm(read_detection(boxes_data["train"] / "annotations.json", DataConfig()))
    names = sorted((root / "images" / "a").iterdir())
    half = len(names) // 2
    for im in names[half:]:  # the second half in another folder, with its labels as polygons
        for sub, suffix in (("images", im.suffix), ("labels", ".txt")):
            (root / sub / "b").mkdir(parents=True, exist_ok=True)
            (root / sub / "a" / im.with_suffix(suffix).name).rename(root / sub / "b" / im.with_suffix(suffix).name)
        label = root / "labels" / "b" / f"{im.stem}.txt"
        lines = []
        for line in label.read_text().splitlines():
            c, cx, cy, w, h = line.split()
            cx, cy, w, h = map(float, (cx, cy, w, h))
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            lines.append(f"{c} {cx} {y0} {x1} {cy} {cx} {y1} {x0} {cy}")  # a diamond touching the box's sides
        label.write_text("\n".join(lines) + "\n")
    (root / "a.txt").write_text("".join(f"./images/a/{n.name}\n" for n in names[:half]))
    for spec in ("[images/a, images/b]", "[a.txt, images/b]", "[../images/a, ../images/b]"):  # (Roboflow's ../)
        (root / "data.yaml").write_text(f"path: .\ntrain: {spec}\nnames: [red, green, blue]\n")
        assert _norm(read_detection(root / "data.yaml", DataConfig())) == want, spec
    (root / "data.yaml").write_text("path: .\ntrain: a.txt\nnames: [red, green, blue]\n")
    assert len(read_detection(root / "data.yaml", DataConfig())) == half
    (root / "a.txt").write_text("./images/a/nothere.png\n")
    with pytest.raises(DataError, match=r"a.txt: line 1: image './images/a/nothere.png' not found"):
        read_detection(root / "data.yaml", DataConfig())
    bad = sorted((root / "labels" / "b").iterdir())[0]
    bad.write_text("1 0.5 0.5 0.2 0.2 0.9\n")  # 5 numbers: neither a box nor a polygon
    (root / "data.yaml").write_text("path: .\ntrain: images/b\nnames: [red, green, blue]\n")
    with pytest.raises(DataError, match=rf"{bad.name}: line 1: expected 'class cx cy w h'.*or a polygon"):
        read_detection(root / "data.yaml", DataConfig())


def test_a_yolo_yaml_validates_and_tests_on_its_own_splits(boxes_data, tiny_resnet, tmp_path):
    """fmtune train --data data.yaml read the train split only and split its validation off it, with the YAML's val
    and test splits beside it unused. Now they validate and test (data.val = data.yaml:val, said in a warning and
    kept in the run's config), unless --val / --test name others; data.yaml:test reads that split anywhere."""
    import shutil

    import yaml

    root = tmp_path / "ds"
    for split in ("train", "val", "test"):
        shutil.copytree(boxes_data[split] / "images", root / "images" / split)
        shutil.copytree(boxes_data[split] / "labels", root / "labels" / split)
    spec = root / "data.yaml"
    spec.write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames: [red, green, blue]\n")
    cfg = det_cfg(tiny_resnet, boxes_data, tmp_path / "run", epochs=1)
    cfg["data"] = {"train": str(spec)}
    with pytest.warns(UserWarning, match=r"ships its held-out splits: data.val = .*data.yaml:val; data.test = "):
        summary = api.train(cfg, quiet=True, report=False)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert (saved["val"], saved["test"]) == (f"{spec}:val", f"{spec}:test")
    data = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert not data["val_split_from_train"] and (data["train"]["rows"], data["val"]["rows"]) == (48, 12)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n_test"] == 12 and summary["eval"]["test"]
    assert _norm(read_detection(f"{spec}:test", DataConfig())) == _norm(
        read_detection(boxes_data["test"] / "annotations.json", DataConfig()))
    with pytest.raises(DataError, match="no 'nope' split"):
        read_detection(f"{spec}:nope", DataConfig())


@pytest.mark.parametrize("problem, message", [
    ("outside", "lies outside its"),
    ("empty", "non-positive size"),
    ("missing_image", "image file not found"),
    ("unknown_image", "is not in images"),
    ("yolo_class", "class 7 is not one of the 3 classes"),
])
def test_bad_annotations_are_named(tmp_path, problem, message):
    from fmtune.data.boxes import box_dataset

    root = write_dataset(tmp_path / "d", 4, 0)
    coco = json.loads((root / "annotations.json").read_text())
    path = root / "annotations.json"
    if problem == "outside":
        coco["annotations"][0]["bbox"] = [50, 10, 40, 10]
    elif problem == "empty":
        coco["annotations"][0]["bbox"] = [5, 5, 0, 10]
    elif problem == "missing_image":
        (root / "images" / "im001.png").unlink()
    elif problem == "unknown_image":
        coco["annotations"][0]["image_id"] = 99
    else:
        (root / "labels" / "im002.txt").write_text("7 0.5 0.5 0.2 0.2\n")
        path = root / "data.yaml"
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=message) as err:
        df = read_detection(path, DataConfig())
        box_dataset(df, "image", {"size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}, CLASSES, True)
    assert str(root) in str(err.value)


def test_letterbox_and_augmentation_keep_boxes_on_their_objects():
    rng = np.random.default_rng(0)
    img, boxes, classes = draw_scene(rng, 96, 64)
    x, scale, _ = letterbox(Image.fromarray(img), 64)
    t = pack_targets([np.asarray(boxes, np.float32) * scale], [np.asarray(classes)], [np.zeros(len(boxes), bool)])

    def colour_inside(x: torch.Tensor, t: torch.Tensor) -> list[bool]:
        """Is the centre pixel of each box its class's colour?"""
        ok = []
        for row in t[0]:
            if row[0] < 0:
                continue
            cx, cy = int((row[1] + row[3]) / 2), int((row[2] + row[4]) / 2)
            px = x[:, cy, cx].numpy() * (255 if x.max() <= 1 else 1)
            ok.append(bool(np.abs(px - COLOURS[int(row[0])]).max() < 40))
        return ok

    assert all(colour_inside(x.float(), t)) and x.shape == (3, 64, 64)
    moved = 0
    for seed in range(10):
        xa, ta = augment_boxes(x[None].float() / 255, t, np.random.default_rng(seed))
        assert not (ta[0, :, 0] >= 0).any() or all(colour_inside(xa[0], ta))
        moved += int(not torch.equal(ta, t))
    assert moved >= 8


def test_nms_keeps_the_best_of_overlapping_boxes_per_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    assert sorted(nms(boxes, scores, classes, 0.5).tolist()) == [0, 2, 3]
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(81 / 100)


def test_perfect_predictions_score_map_1():
    """Logits that put each box's class and its exact box at the box's centre location give mAP 1,
    and the loss's assignment makes that location positive for that box."""
    task = Detection(CLASSES)
    t = pack_targets([np.array([[4, 4, 20, 28], [30, 8, 60, 40]], np.float32)], [np.array([0, 2])],
                     [np.zeros(2, bool)])
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    px, py = (xs.flatten() + 0.5) * 8, (ys.flatten() + 0.5) * 8
    logits = torch.full((1, 64, 3 + 8), -10.0)
    logits[0, :, 3:7] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    logits[0, :, 8], logits[0, :, 9], logits[0, :, 10] = px, py, 8.0
    match, ignored, _ = task.assign(logits, t)
    for k, (x0, y0, x1, y1) in enumerate(t[0, :, 1:5].tolist()):
        loc = int(((y0 + y1) / 2 // 8) * 8 + (x0 + x1) / 2 // 8)
        assert match[0, loc] == k and not ignored[0, loc]
        logits[0, loc, int(t[0, k, 0])] = 10.0
        logits[0, loc, 3:7] = t[0, k, 1:5]
        logits[0, loc, 7] = 10.0
    m = task.metrics(logits, t)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)


# --- training, prediction, reload ------------------------------------------------------------

def det_cfg(model, data, out, **train):
    return cfg_dict(model, data["train"], task={"type": "detection"},
                    data={"train": str(data["train"] / "annotations.json"),
                          "val": str(data["val"] / "annotations.json"),
                          "test": str(data["test"] / "annotations.json")},
                    model={"name": str(model), "image_size": 64},
                    train={"epochs": 2, "batch_size": 8, "lr": 2e-3, **train}, out=str(out))


@pytest.fixture(scope="module")
def det_run(tmp_path_factory, tiny_resnet, boxes_data):
    out = tmp_path_factory.mktemp("runs") / "det"
    summary = api.train(det_cfg(tiny_resnet, boxes_data, out, epochs=6, baseline=True), quiet=True)
    return out, summary


def test_training_learns_with_a_head_baseline(det_run):
    out, summary = det_run
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["test"]) == {"map", "map50", "map75"}
    assert set(ev["per_class_ap"]) == set(CLASSES)
    assert ev["baseline_run"].endswith("baseline") and (out / "baseline" / "model").is_dir()
    import yaml

    assert yaml.safe_load((out / "baseline" / "config.yaml").read_text())["strategy"]["name"] == "head"
    assert (out / "precision_recall.png").is_file() and (out / "mistakes.png").is_file()
    # six epochs on coloured rectangles: boxes are found (a random head scores about 0)
    assert ev["test"]["map50"] > 0.2, ev["test"]


def test_predict_boxes_in_original_pixels_and_reload_agrees(det_run, boxes_data, tmp_path):
    from fmtune.predictor import Predictor

    out, _ = det_run
    # the dataset's folder: its images/ are predicted, not the other files beside them
    df = api.predict(out, boxes_data["test"], quiet=True, save_images=tmp_path / "drawn")
    assert df["error"].isna().all() and len(df) == 12
    for path, boxes in zip(df["image"], df["boxes"]):
        w, h = Image.open(path).size
        for b in boxes:
            assert 0 <= b["x0"] < b["x1"] <= w and 0 <= b["y0"] < b["y1"] <= h and b["label"] in CLASSES
    assert len(list((tmp_path / "drawn").glob("*.jpg"))) == 12
    img = df["image"][0]
    assert Predictor(out).predict(img)["boxes"] == Predictor(out).predict(img)["boxes"] == df["boxes"][0]


def test_boxes_are_matched_once_per_true_box_and_the_best_f1_cut_is_chosen():
    """box_matches: best scores first, each true box found once, of its own class, at IoU 0.5; a box inside a
    crowd region is left out. best_f1_cut: the highest score of the best F1; f1_at: at a given cut."""
    truth = torch.tensor([[[0, 0, 0, 10, 10, 0], [1, 20, 20, 30, 30, 0], [0, 40, 0, 60, 20, 1],
                           [-1, 0, 0, 0, 0, 0]]], dtype=torch.float32)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [20, 21, 30, 30], [70, 70, 80, 80],
                      [45, 5, 50, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.4, 0.3, 0.6], np.float32)
    classes = np.array([0, 0, 0, 1, 0, 0])
    got, hits, n_true = box_matches([(boxes, scores, classes)], truth)
    assert n_true == 2  # the crowd region and the padding row are not boxes to find
    assert sorted(zip(got.round(3).tolist(), hits.tolist()), reverse=True) == [
        (0.9, True), (0.8, False), (0.7, False), (0.4, True), (0.3, False)]  # 0.6: inside the crowd, left out
    # F1 by cut: 0.9 -> 2/3, 0.8 -> 1/2, 0.7 -> 2/5, 0.4 -> 2/3, 0.3 -> 4/7: the tie goes to the higher cut
    best = best_f1_cut(got, hits, n_true)
    assert best["threshold"] == pytest.approx(0.9) and best["f1"] == pytest.approx(2 / 3)
    assert (best["precision"], best["recall"]) == (1.0, 0.5)
    assert f1_at(got, hits, n_true, 0.4) == pytest.approx({"f1": 2 / 3, "precision": 0.5, "recall": 1.0})
    assert best_f1_cut(got, np.zeros_like(hits), n_true) is None and best_f1_cut(got, hits, 0) is None
    task = Detection(CLASSES)
    assert task.threshold == 0.5 and task.kept(scores).tolist() == [True, True, True, False, False, True]


def test_predict_keeps_the_boxes_from_the_threshold_chosen_on_validation(det_run, boxes_data):
    """task.thresholds=auto: the score of the best box F1 on the validation images is saved with the run and is
    where predict starts returning boxes (before: every box above task.score_threshold 0.05, up to 100 an image);
    mAP still scores every box; eval.json says how the boxes predict returns score."""
    from fmtune.predictor import Predictor

    out, _ = det_run
    info = json.loads((out / "run.json").read_text())["thresholds"]
    assert info["chosen"] and info["metric"] == "box_f1" and info["unit"] == "images" and info["rows"] == 12
    cut = json.loads((out / "labels.json").read_text())["threshold"]
    assert cut == set(info["thresholds"].values()).pop() and 0.05 < cut < 1 and cut != 0.5
    assert info["val_box_f1"] >= info["before"]["val_box_f1"]
    ev = json.loads((out / "eval.json").read_text())
    assert ev["at_threshold"]["threshold"] == pytest.approx(cut) and 0 < ev["at_threshold"]["f1"] <= 1
    images = sorted(str(p) for p in (boxes_data["test"] / "images").iterdir())
    pred = Predictor(out)
    scores = [b["score"] for r in pred.predict(images) for b in r["boxes"]]
    assert scores and min(scores) >= round(cut, 4) - 1e-4
    pred.task.threshold = 0.05  # as task.thresholds=fixed with task.threshold 0.05: the boxes mAP scores
    assert sum(len(r["boxes"]) for r in pred.predict(images)) > len(scores)


def test_an_unreadable_upload_is_named_by_its_place(det_run):
    from fmtune.predictor import Predictor

    with pytest.raises(DataError, match=r"^input 0: not a readable image"):
        Predictor(det_run[0]).predict([b"not an image"])


def test_serve_returns_boxes(det_run, boxes_data):
    from fastapi.testclient import TestClient

    from fmtune.predictor import Predictor
    from fmtune.serve import create_app

    out, _ = det_run
    img = sorted((boxes_data["test"] / "images").iterdir())[0]
    with TestClient(create_app(Predictor(out))) as client:
        r = client.post("/predict", files={"files": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    assert "boxes" in r.json()["predictions"][0]


def test_huggingface_hub_inference_client_detects_objects(det_run, boxes_data, monkeypatch):
    """POST / as the Inference API's object detection, through huggingface_hub's InferenceClient: the boxes of
    /predict as {label, score, box: {xmin, ymin, xmax, ymax}}; threshold keeps fewer, below the run's is a 422."""
    import base64

    import httpx
    from conftest import hf_inference_client, live_server
    from huggingface_hub.errors import HfHubHTTPError

    from fmtune.predictor import Predictor
    from fmtune.serve import create_app

    out, _ = det_run
    pred = Predictor(out)
    img = max((boxes_data["test"] / "images").iterdir(), key=lambda p: len(pred.predict(str(p))["boxes"]))
    want = pred.predict(str(img))["boxes"]
    assert len(want) >= 2
    with live_server(create_app(pred)) as url:
        client = hf_inference_client(url, monkeypatch)
        got = client.object_detection(img)  # the file's bytes as the body
        assert [(g.label, g.score) for g in got] == [(b["label"], b["score"]) for b in want]
        assert [(g.box.xmin, g.box.ymin, g.box.xmax, g.box.ymax) for g in got] == [
            tuple(round(b[k]) for k in ("x0", "y0", "x1", "y1")) for b in want]
        middle = sorted(b["score"] for b in want)[len(want) // 2]
        fewer = client.object_detection(img, threshold=middle)  # base64 JSON with parameters
        assert [g.score for g in fewer] == [b["score"] for b in want if b["score"] >= middle]
        with pytest.raises(HfHubHTTPError, match="below this run's"):
            client.object_detection(img, threshold=pred.task.threshold / 2)
        encoded = base64.b64encode(img.read_bytes()).decode()
        r = httpx.post(url, json={"inputs": encoded, "parameters": {"threshold": "high"}})
        assert r.status_code == 422 and "parameters.threshold must be a number" in r.json()["error"]
        assert httpx.get(f"{url}/metadata").json()["thresholds"] == {c: pred.task.threshold for c in CLASSES}


@pytest.mark.parametrize("strategy", ["last_n", "lora"])
def test_strategies_train_and_reload(tmp_path, boxes_data, strategy):
    from fmtune.predictor import Predictor

    cfg = det_cfg("mobilenet-v2", boxes_data, tmp_path / strategy, epochs=1)
    cfg["model"]["init"] = "random" if strategy != "lora" else "pretrained"
    cfg["strategy"] = {"name": strategy, "n": 2}
    api.train(cfg, quiet=True, report=False)
    img = sorted((boxes_data["test"] / "images").iterdir())[0]
    assert isinstance(Predictor(tmp_path / strategy).predict(str(img))["boxes"], list)


def test_vit_backbone_detects(tmp_path, tiny_vit, boxes_data):
    cfg = det_cfg(tiny_vit, boxes_data, tmp_path / "vit", epochs=1)
    cfg["model"]["image_size"] = 32
    api.train(cfg, quiet=True, report=False)
    assert "map" in json.loads((tmp_path / "vit" / "eval.json").read_text())["test"]


def test_onnx_export_gives_the_same_boxes(det_run, boxes_data):
    """The graph ends at the per-location logits and boxes; thresholding and NMS run in Python."""
    from fmtune.exporter import export
    from fmtune.predictor import Predictor

    out, _ = det_run
    res = export(out, format="onnx", quiet=True)
    assert res["max_abs_diff"] <= 1e-4
    imgs = [str(p) for p in sorted((boxes_data["test"] / "images").iterdir())[:4]]
    torch_boxes = Predictor(out).predict(imgs)
    onnx_boxes = Predictor(out, backend="onnx").predict(imgs)
    assert sum(len(t["boxes"]) for t in torch_boxes) >= 4
    for t, o in zip(torch_boxes, onnx_boxes):
        assert [b["label"] for b in t["boxes"]] == [b["label"] for b in o["boxes"]]
        for bt, bo in zip(t["boxes"], o["boxes"]):
            assert abs(bt["x0"] - bo["x0"]) <= 0.2 and abs(bt["score"] - bo["score"]) <= 1e-3


def test_robustness_scores_map_under_corruptions(det_run, boxes_data, tmp_path):
    from fmtune.robustness import robustness

    out, _ = det_run
    res = robustness(out, boxes_data["test"] / "annotations.json", suite="quick", out=tmp_path / "rob", quiet=True)
    run = res["runs"][out.name]
    assert res["metric"] == "map" and 0 <= run["clean"] <= 1
    assert all(0 <= r["map"] <= 1 for p in run["perturbations"].values() for r in p["results"])


def test_interrupted_run_resumes_exactly(tmp_path, tiny_resnet, boxes_data):
    """Augmentation is seeded by the batch: a run stopped mid-training and resumed from its last
    resume point ends with the same weights and evaluations as an uninterrupted one."""
    from safetensors.torch import load_file

    def cfg(out):
        c = det_cfg(tiny_resnet, boxes_data, out, epochs=2, eval_every=4, save_every_steps=3, batch_size=8)
        c["data"]["test"] = None
        return c

    api.train(cfg(tmp_path / "ref"), quiet=True, report=False)

    def stop(rec):
        if rec["step"] == 8:
            raise KeyboardInterrupt

    with pytest.raises(BaseException, match="interrupted"):
        api.train(cfg(tmp_path / "cut"), quiet=True, report=False, on_eval=stop)
    api.train(None, resume=tmp_path / "cut", quiet=True, report=False)

    def evals(d):
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds")} for r in rows
                if r["type"] == "eval"]

    assert evals(tmp_path / "cut") == evals(tmp_path / "ref")
    a = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_on_images_without_annotations_says_what_is_missing(tmp_path, tiny_resnet):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    cfg = det_cfg(tiny_resnet, {"train": folder, "val": folder, "test": folder}, tmp_path / "r")
    cfg["data"] = {"train": str(folder)}
    with pytest.raises(DataError, match="no annotations; detection data is a COCO JSON file"):
        api.train(cfg, quiet=True)


def test_explain_gradcam_on_the_best_box(det_run, boxes_data, tmp_path):
    from fmtune.explain import explain

    out, _ = det_run
    res = explain(out, [str(boxes_data["test"] / "images")], limit=2, out=tmp_path / "ex", quiet=True)
    heat = np.load(tmp_path / "ex" / "heatmaps.npy")
    assert heat.shape == (2, 64, 64) and np.isfinite(heat).all() and heat.max() <= 1.0
    assert all(it["target"] in CLASSES for it in res["items"])


def test_frozen_backbone_maps_are_cached_and_train_the_same_head(tmp_path, tiny_resnet, boxes_data, capsys,
                                                                   monkeypatch):
    """strategy head (zooms and flips off by default there): the pyramid's three backbone maps are
    cached and training on them reaches the head training without the cache does."""
    assert_head_cache_trains_the_same(lambda out, **train: det_cfg(tiny_resnet, boxes_data, out, **train), tmp_path,
                                      capsys, monkeypatch, "the three maps its head reads are cached")


# --- whole transformers detectors (fmtune.models.whole) ---------------------------------------

# the sizes of the tiny RT-DETR-like detectors (RT-DETR, RT-DETRv2, D-FINE): hidden 32, 2 decoder layers, 30 queries
TINY_RT_DETR = dict(encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128], d_model=32, encoder_ffn_dim=64,
                    decoder_ffn_dim=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                    decoder_attention_heads=2, num_queries=30, decoder_in_channels=[32, 32, 32], num_denoising=10,
                    eval_size=None)
# and of their ResNet backbone: 4 small stages, the last three read
TINY_RT_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
                      out_features=["stage2", "stage3", "stage4"])


def save_tiny_rt_detr(folder: Path) -> Path:
    """A random RT-DETR (``TINY_RT_DETR``) with 80 COCO-like classes and RT-DETR's processor settings (640 px, pixels
    in [0, 1]: no normalisation), saved as a folder."""
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    cfg = RTDetrConfig(backbone_config=RTDetrResNetConfig(**TINY_RT_RESNET), num_labels=80, **TINY_RT_DETR)
    torch.manual_seed(0)
    RTDetrForObjectDetection(cfg).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "RTDetrImageProcessor", "do_normalize": False, "do_rescale": True,
         "do_resize": True, "size": {"height": 640, "width": 640}, "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    return folder


@pytest.fixture(scope="module")
def tiny_rt_detr(tmp_path_factory) -> Path:
    return save_tiny_rt_detr(tmp_path_factory.mktemp("rt-detr") / "m")


def test_a_whole_detector_trains_with_its_own_loss(tiny_rt_detr, boxes_data, tmp_path):
    """An RT-DETR folder was refused ("a whole rt_detr model ... give the folder of an image model"). Now it is
    fine-tuned as it is, new class heads for the run's classes: the loss is transformers' own (tested equal on a
    batch), training lowers it on unseen images, mAP is scored by pycocotools, its pixels are not normalised (its
    processor's do_normalize false), the learning rates are its recipe's; predict, reload and serve give boxes in
    the image's pixels; strategy head trains all but the backbone; explain reads Grad-CAM at the backbone's
    stride-16 stage; prompt tuning is refused by name (ONNX: test_a_whole_detector_exports_to_onnx)."""
    import yaml
    from fastapi.testclient import TestClient

    from fmtune.config import ModelConfig
    from fmtune.errors import ConfigError
    from fmtune.models import build
    from fmtune.predictor import Predictor
    from fmtune.serve import create_app

    task = Detection(CLASSES)
    bundle = build.create(ModelConfig(name=str(tiny_rt_detr), image_size=64), task)
    assert bundle.image["mean"] == [0.0] * 3 and bundle.image["std"] == [1.0] * 3 and bundle.image["set_prediction"]
    model = bundle.model
    assert model.net.config.num_labels == 3 and model.net.config.id2label[2] == "blue"
    df = task.read(boxes_data["train"] / "annotations.json", DataConfig())
    ds, _ = task.dataset(df, bundle, DataConfig())
    batch = ds.collate(list(range(4)))
    targets = batch.pop("labels")
    assert torch.equal(batch["det_targets"], targets)
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        ours = task.loss(model(**batch).logits, targets)
        theirs = model.net(pixel_values=batch["pixel_values"], labels=model.targets(targets, 64, 64)).loss
        plain = model(pixel_values=batch["pixel_values"]).logits
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5) and float(ours) > 0
    assert plain.shape == (4, 30, 3 + 9) and bool((plain[..., -1] == 0).all())  # no targets: no loss
    boxes, scores, _ = task.detections(plain)[0]
    assert len(boxes) and (boxes[:, 2] > boxes[:, 0]).all()  # boxes in input pixels, x1 > x0
    with torch.no_grad():  # the scores are the detector's own class probabilities (sigmoid, for RT-DETR)
        top = model.net(pixel_values=batch["pixel_values"][:1]).logits[0].sigmoid().max()
    assert float(scores.max()) == pytest.approx(float(top), rel=1e-5)

    out = tmp_path / "full"
    cfg = det_cfg(tiny_rt_detr, boxes_data, out, epochs=4)
    del cfg["train"]["lr"]
    api.train(cfg, quiet=True)
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["lr"] == 1e-5 and saved["head_lr"] == 1e-4  # the detector's own recipe
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["test"]) == {"map", "map50", "map75"} and 0.0 <= ev["test"]["map"] <= 1.0
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["type"] == "eval" and "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses  # the validation loss fell
    img = sorted((boxes_data["test"] / "images").iterdir())[0]
    first = Predictor(out).predict(str(img))["boxes"]
    assert first == Predictor(out).predict(str(img))["boxes"]  # reloaded: the same boxes
    w, h = Image.open(img).size
    assert all(0 <= b["x0"] < b["x1"] <= w and 0 <= b["y0"] < b["y1"] <= h for b in first)
    with TestClient(create_app(Predictor(out))) as client:
        r = client.post("/predict", files={"files": (img.name, img.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.json()["predictions"][0]["boxes"] == first
    # the run's model is a transformers detector folder: its classes named, its processor at the run's size
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    hf = AutoModelForObjectDetection.from_pretrained(out / "model").eval()
    assert hf.config.id2label == {0: "red", 1: "green", 2: "blue"}
    assert AutoImageProcessor.from_pretrained(out / "model").size == {"height": 64, "width": 64}
    pixels = ds.collate([0, 1])["pixel_values"]
    trained = Predictor(out).model
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=pixels).logits, trained.net(pixel_values=pixels).logits)
    from fmtune.exporter import export

    assert export(out, quiet=True)["max_abs_diff"] == 0.0  # (--format hf: the run's folder as it is)

    head = tmp_path / "head"
    cfg = det_cfg(tiny_rt_detr, boxes_data, head, epochs=1)
    cfg["strategy"] = {"name": "head"}
    api.train(cfg, quiet=True, report=False)
    from safetensors.torch import load_file

    before = load_file(str(tiny_rt_detr / "model.safetensors"))
    after = load_file(str(head / "model" / "model.safetensors"))
    frozen = [k for k in before if k.startswith("model.backbone.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.decoder.") and k in after)
    cfg["strategy"] = {"name": "prompt"}
    with pytest.raises(ConfigError, match="strategy prompt: a whole detector .RTDetrForObjectDetection. trains with "
                                          "full, head, last_n, bitfit, lora, dora, ia3"):
        api.train(dict(cfg, out=str(tmp_path / "prompt")), quiet=True, report=False)
    from fmtune.explain import explain
    from fmtune.models.whole import gradcam_layer

    # Grad-CAM at the backbone's stride-16 map: the ResNet's third stage (64 px in, 4 x 4 cells)
    assert type(gradcam_layer(Predictor(out).model, 64)).__name__ == "RTDetrResNetStage"
    items = explain(out, [str(img)], quiet=True)["items"]
    heat = np.load(out / "explain" / "heatmaps.npy")
    assert len(items) == 1 and items[0]["predicted"] in CLASSES and heat.shape == (1, 64, 64)


@pytest.mark.parametrize("model_type", ["rt_detr_v2", "yolos",
                                        pytest.param("rt_detr", marks=pytest.mark.slow),
                                        pytest.param("d_fine", marks=pytest.mark.slow),
                                        pytest.param("detr", marks=pytest.mark.slow)])
def test_a_whole_detector_exports_to_onnx(model_type, boxes_data, tmp_path):
    """ONNX export of a whole detector was refused. Now transformers' exporter writes it up to the queries' class
    logits and boxes, checked against the run (1e-4): YOLOS and DETR with a dynamic batch; RT-DETR, RT-DETRv2 and
    D-FINE for one image (torch.export fixes their batch: they read it with len()), which preprocessing.json says
    and the onnx backend runs image by image, giving the torch model's boxes. RT-DETRv2 and D-FINE need
    transformers' graph rewrites (torch.onnx alone has no lowering for their finite-value check). The tiny config
    takes all 84 locations of a 64 px image as queries: its random scores tie to float precision, and a top-k
    of fewer would pick different locations in onnxruntime, as a trained detector's do not."""
    from transformers import CONFIG_MAPPING, AutoModelForObjectDetection

    from fmtune.exporter import export
    from fmtune.predictor import Predictor

    if model_type == "rt_detr":
        cfg = CONFIG_MAPPING[model_type](backbone_config=CONFIG_MAPPING["rt_detr_resnet"](**TINY_RT_RESNET),
                                         **TINY_RT_DETR)
    else:
        cfg = tiny_detector_config(model_type)
    fixed = hasattr(cfg, "num_denoising")  # the RT-DETR family
    if fixed:
        cfg.num_queries = 8 * 8 + 4 * 4 + 2 * 2  # every location of its three levels at 64 px
    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(cfg).save_pretrained(tmp_path / "m")
    out = tmp_path / "run"
    cfg = det_cfg(tmp_path / "m", boxes_data, out, epochs=2)
    cfg["task"].update(thresholds="fixed", threshold=0.05)  # every box mAP scores, to compare (the model is random)
    api.train(cfg, quiet=True, report=False)
    res = export(out, format="onnx", quiet=True)
    assert res["max_abs_diff"] <= 1e-4 and res.get("batch_size") == (1 if fixed else None)
    folder = Path(res["out"])
    prep = json.loads((folder / "preprocessing.json").read_text())
    assert prep.get("batch_size") == (1 if fixed else None) and prep["image"]["set_prediction"]
    imgs = [str(p) for p in sorted((boxes_data["test"] / "images").iterdir())[:5]]
    ours, onnx = Predictor(out).predict(imgs), Predictor(out, backend="onnx").predict(imgs)  # one batch of 5

    def key(b):
        return b["label"], round(b["score"], 3), round(b["x0"]), round(b["y0"])

    assert sum(len(p["boxes"]) for p in ours) > 0
    for t, o in zip(ours, onnx):
        assert len(t["boxes"]) == len(o["boxes"])
        for bt, bo in zip(sorted(t["boxes"], key=key), sorted(o["boxes"], key=key)):
            assert bt["label"] == bo["label"] and abs(bt["score"] - bo["score"]) <= 1e-3
            assert max(abs(bt[c] - bo[c]) for c in ("x0", "y0", "x1", "y1")) <= 0.2


def test_a_whole_detectors_outputs_are_compared_as_a_set_of_queries():
    """The export check pairs a whole detector's queries: the same queries in another order are the same output
    (raw, they differ by whole boxes), a moved box is not; fmtune's own per-location head is compared as it is."""
    task = Detection(CLASSES)
    torch.manual_seed(0)
    a = torch.cat([torch.randn(2, 6, 3), torch.rand(2, 6, 4) * 60, torch.zeros(2, 6, 5)], -1)  # 3 + SET_EXTRA
    b = a[:, torch.tensor([3, 1, 0, 5, 4, 2])]
    assert task.output_difference(a, b) == 0.0 and (a - b).abs().max() > 1.0
    moved = b.clone()
    moved[1, 2, 3] += 6.0  # one box's x0 by 6 pixels (of at most 60: relative 0.1 or more)
    assert task.output_difference(a, moved) >= 0.1 - 1e-6
    own = a[..., :3 + 9 - 1]  # fmtune's FCOS layout has one channel fewer: compared as it is
    assert task.output_difference(own, own[:, torch.tensor([3, 1, 0, 5, 4, 2])]) > 1.0


def test_a_detr_whose_backbone_timm_cannot_be_built_without_says_so(tmp_path, boxes_data):
    """A DC5 checkpoint (facebook/detr-resnet-50-dc5: timm's ResNet dilated to stride 16) has no transformers ResNet
    to load into: without timm installed (fmtune does not depend on it) that is an error saying so."""
    from transformers import DetrConfig

    from fmtune.errors import ModelError

    folder = tmp_path / "detr"
    folder.mkdir()
    DetrConfig(d_model=32, encoder_layers=1, decoder_layers=1, num_queries=10, dilation=True).save_pretrained(folder)
    with pytest.raises(ModelError, match="detr model whose backbone is a timm model .*pip install timm"):
        api.train(det_cfg(folder, boxes_data, tmp_path / "run"), quiet=True)


def timm_resnet18(seed: int) -> dict[str, torch.Tensor]:
    """Random weights of timm's resnet18 as its state dict names and shapes them (conv1, bn1, layerS.B.convN / bnN,
    layerS.0.downsample.0 / .1 where a block changes size), batch-norm statistics away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    w: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k):
        w[name + ".weight"] = torch.randn(cout, cin, k, k, generator=g) * (2 / (cin * k * k)) ** 0.5

    def bn(name, c):
        w.update({f"{name}.weight": 1 + 0.1 * torch.randn(c, generator=g),
                  f"{name}.bias": 0.1 * torch.randn(c, generator=g),
                  f"{name}.running_mean": 0.1 * torch.randn(c, generator=g),
                  f"{name}.running_var": 0.5 + torch.rand(c, generator=g),
                  f"{name}.num_batches_tracked": torch.tensor(7)})

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for s, cout in enumerate([64, 128, 256, 512], 1):
        for b in range(2):
            p = f"layer{s}.{b}."
            conv(p + "conv1", cout, cin if b == 0 else cout, 3)
            bn(p + "bn1", cout)
            conv(p + "conv2", cout, cout, 3)
            bn(p + "bn2", cout)
            if b == 0 and cin != cout:
                conv(p + "downsample.0", cout, cin, 1)
                bn(p + "downsample.1", cout)
        cin = cout
    w["fc.weight"], w["fc.bias"] = torch.randn(1000, 512, generator=g), torch.zeros(1000)
    return w


def timm_resnet18_maps(w: dict[str, torch.Tensor], x: torch.Tensor) -> list[torch.Tensor]:
    """timm's resnet18 written out in torch's functions (a 7x7 stem at stride 2, a 3x3 max-pool, basic blocks whose
    first 3x3 convolution strides): its four stages' feature maps, as timm's features_only gives them."""
    import torch.nn.functional as F

    def bn(t, p):
        return F.batch_norm(t, w[p + ".running_mean"], w[p + ".running_var"], w[p + ".weight"], w[p + ".bias"],
                            False, 0.0, 1e-5)

    x = F.max_pool2d(F.relu(bn(F.conv2d(x, w["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
    maps = []
    for s in range(1, 5):
        for b in range(2):
            p, stride = f"layer{s}.{b}.", 2 if s > 1 and b == 0 else 1
            y = F.relu(bn(F.conv2d(x, w[p + "conv1.weight"], stride=stride, padding=1), p + "bn1"))
            y = bn(F.conv2d(y, w[p + "conv2.weight"], padding=1), p + "bn2")
            if p + "downsample.0.weight" in w:
                x = bn(F.conv2d(x, w[p + "downsample.0.weight"], stride=stride), p + "downsample.1")
            x = F.relu(y + x)
        maps.append(x)
    return maps


@pytest.fixture(scope="module")
def timm_detr(tmp_path_factory):
    """A DETR checkpoint laid out as the hub's are (facebook/detr-resnet-50 ...): config.json with timm's ResNet
    (use_timm_backbone, backbone resnet18), its weights under model.backbone.conv_encoder.model. with timm's names.
    Its transformer and heads are a tiny random DETR's; its ResNet timm_resnet18's random weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForObjectDetection, ResNetConfig

    root = tmp_path_factory.mktemp("timm-detr")
    tiny = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10)
    AutoConfig.for_model("detr", backbone="resnet18", **tiny).save_pretrained(root / "detr")
    resnet = ResNetConfig(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                          out_features=["stage4"])  # (only the rest of this model is kept)
    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(AutoConfig.for_model(
        "detr", use_timm_backbone=False, backbone_config=resnet, **tiny)).save_pretrained(root / "rest")
    rest = {k: v for k, v in load_file(str(root / "rest" / "model.safetensors")).items() if "conv_encoder" not in k}
    timm = timm_resnet18(1)
    save_file({**rest, **{f"model.backbone.conv_encoder.model.{k}": v for k, v in timm.items()}},
              str(root / "detr" / "model.safetensors"), metadata={"format": "pt"})
    return root / "detr", timm, rest


def test_a_detr_with_timms_resnet_loads_without_timm(timm_detr):
    """DETR's hub checkpoints (and Conditional, Deformable, DAB-DETR's, Table Transformer's) build their ResNet with
    timm, which fmtune does not depend on: that was an error saying to install it. Now, without timm, the ResNet is
    transformers' own with the checkpoint's weights renamed into it: its feature maps are timm's network's (written
    out in torch's functions) to float precision, and the rest of the checkpoint is loaded as it was."""
    from transformers.models.resnet.modeling_resnet import ResNetBackbone

    from fmtune.models.whole import DETECTOR, create

    folder, timm, rest = timm_detr
    model = create(folder, ["a", "b"], True, DETECTOR).eval()
    (backbone,) = [m for m in model.modules() if isinstance(m, ResNetBackbone)]
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = backbone(x).feature_maps
    want = timm_resnet18_maps(timm, x)
    assert len(got) == 4
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    state = model.net.state_dict()
    torch.testing.assert_close(state["model.input_projection.weight"], rest["model.input_projection.weight"])
    assert model.net.config.backbone_config.model_type == "resnet"


def test_a_detr_with_timms_resnet_trains_and_predicts(timm_detr, boxes_data, tmp_path):
    """The whole way on such a checkpoint: it trains, its run's model is a plain transformers detector with a
    transformers ResNet (loadable without timm), and predicts."""
    from transformers import AutoConfig

    from fmtune.predictor import Predictor

    out = tmp_path / "run"
    api.train(det_cfg(timm_detr[0], boxes_data, out, epochs=1), quiet=True, report=False)
    assert AutoConfig.from_pretrained(out / "model").backbone_config.model_type == "resnet"
    img = sorted((boxes_data["test"] / "images").iterdir())[0]
    boxes = Predictor(out).predict(str(img))["boxes"]
    assert isinstance(boxes, list) and all(b["label"] in CLASSES for b in boxes)


def test_a_softmax_detector_scores_its_classes_without_no_object():
    """DETR and YOLOS classify each query over the classes and "no object": a class's score is its softmax
    probability (as their own post-processing gives it), the box their centre and size over the input's pixels."""
    from types import SimpleNamespace

    from fmtune.models.whole import pack

    raw = torch.tensor([[[2.0, 0.0, 1.0, 3.0]]])
    packed = pack(SimpleNamespace(logits=raw, pred_boxes=torch.tensor([[[0.5, 0.5, 0.2, 0.4]]]), loss=None), 3, 50, 100)
    torch.testing.assert_close(packed[0, 0, :3].sigmoid(), raw[0, 0].softmax(-1)[:3])
    assert packed[0, 0, 3:7].tolist() == pytest.approx([40.0, 15.0, 60.0, 35.0])  # x0 y0 x1 y1 of a 100 x 50 input
    assert packed.shape[-1] == 3 + 9 and float(packed[0, 0, -1]) == 0.0


@pytest.mark.parametrize("model_type", ["yolos", "conditional_detr", "detr", "rt_detr_v2", "d_fine"])
def test_more_whole_detectors_train_and_predict(model_type, boxes_data, tmp_path):
    """YOLOS (a ViT with detection tokens, softmax classes), Conditional DETR (sigmoid) and DETR (softmax) with a
    transformers ResNet (use_timm_backbone false), RT-DETRv2, D-FINE (an HGNetV2 backbone): each trains with its own
    loss, saves and predicts."""
    from transformers import AutoModelForObjectDetection

    from fmtune.predictor import Predictor

    torch.manual_seed(0)
    AutoModelForObjectDetection.from_config(tiny_detector_config(model_type)).save_pretrained(tmp_path / model_type)
    out = tmp_path / "run"
    api.train(det_cfg(tmp_path / model_type, boxes_data, out, epochs=1), quiet=True, report=False)
    assert "map" in json.loads((out / "eval.json").read_text())["test"]
    img = sorted((boxes_data["test"] / "images").iterdir())[0]
    boxes = Predictor(out).predict(str(img))["boxes"]
    assert isinstance(boxes, list) and all(b["label"] in CLASSES and 0 <= b["score"] <= 1 for b in boxes)


def tiny_detector_config(model_type: str):
    """A tiny random config of a transformers detector (RT-DETRv2, D-FINE, YOLOS, DETR, Conditional DETR)."""
    from transformers import CONFIG_MAPPING, AutoConfig, HGNetV2Config, ResNetConfig

    if model_type == "rt_detr_v2":
        cfg = CONFIG_MAPPING[model_type](backbone_config=CONFIG_MAPPING["rt_detr_resnet"](**TINY_RT_RESNET),
                                         **TINY_RT_DETR)
    elif model_type == "d_fine":
        cfg = CONFIG_MAPPING[model_type](backbone_config=HGNetV2Config(
            stem_channels=[3, 8, 8], stage_in_channels=[8, 16, 32, 64], stage_mid_channels=[8, 16, 32, 64],
            stage_out_channels=[16, 32, 64, 128], stage_num_blocks=[1, 1, 1, 1],
            stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
            stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[2, 2, 2, 2], hidden_sizes=[16, 32, 64, 128],
            out_features=["stage2", "stage3", "stage4"]), decoder_n_points=4, **TINY_RT_DETR)
    elif model_type == "yolos":
        cfg = AutoConfig.for_model("yolos", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, image_size=[64, 64], patch_size=8, num_detection_tokens=10)
    else:
        resnet = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                              layer_type="basic", out_features=["stage4"])
        cfg = AutoConfig.for_model(model_type, use_timm_backbone=False, backbone_config=resnet, d_model=32,
                                   encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10)
    return cfg


@pytest.mark.parametrize("model_type", ["rt_detr", "yolos"])
def test_a_whole_detector_trains_an_adapter(model_type, tiny_rt_detr, boxes_data, tmp_path):
    """LoRA on a whole detector was refused. Now the adapter adapts its backbone (RT-DETR's ResNet convolutions,
    YOLOS's ViT attention) and all but the backbone (RT-DETR's transformer and heads; YOLOS's class and box heads)
    trains and is saved with it: the adapter's learning rate is LoRA's, the rest's the detector's recipe; the
    validation loss falls; the run's folder is a peft adapter with the classes' config (no model weights), the base
    read from the source; it reloads to the same boxes; --merge exports a plain transformers detector with the run's
    outputs. IA3's --merge failed on a head layer without a weight (peft copies .weight over: RT-DETR's Sequential
    projections; fmtune's own FCOS and segmentation heads too): the trained copies are put in place first."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForObjectDetection

    from fmtune.exporter import export
    from fmtune.predictor import Predictor

    source = tiny_rt_detr
    if model_type == "yolos":
        torch.manual_seed(0)
        source = tmp_path / "yolos"
        AutoModelForObjectDetection.from_config(tiny_detector_config("yolos")).save_pretrained(source)
    out = tmp_path / "lora"
    cfg = det_cfg(source, boxes_data, out, epochs=4)
    del cfg["train"]["lr"]
    cfg["strategy"] = {"name": "lora"}
    cfg["task"].update(thresholds="fixed", threshold=0.05)  # every box mAP scores, to compare after reloading
    api.train(cfg, quiet=True, report=False)
    saved = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert saved["lr"] == 5e-4 and saved["head_lr"] == 1e-4
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["type"] == "eval" and "loss" in r]
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    files = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_model.safetensors", "config.json"} <= files and "model.safetensors" not in files
    weights = load_file(str(out / "model" / "adapter_model.safetensors"))
    backbone = "model.backbone." if model_type == "rt_detr" else "vit."
    lora = [k for k in weights if "lora_" in k]
    assert lora and all(f".net.{backbone}" in k for k in lora), lora[:3]  # the adapter is in the backbone
    head = "class_embed" if model_type == "rt_detr" else "class_labels_classifier"
    assert any(head in k for k in weights)  # the new classifier travels with the adapter
    img = sorted((boxes_data["test"] / "images").iterdir())[0]
    first = Predictor(out).predict(str(img))["boxes"]
    assert first and first == Predictor(out).predict(str(img))["boxes"]
    merged = export(out, merge=True, quiet=True)
    assert merged["max_abs_diff"] < 1e-4
    hf = AutoModelForObjectDetection.from_pretrained(out / "export" / "merged")
    assert hf.config.id2label == {0: "red", 1: "green", 2: "blue"} and not any("lora" in n for n, _ in
                                                                              hf.named_parameters())
    if model_type == "rt_detr":
        cfg = det_cfg(source, boxes_data, tmp_path / "ia3", epochs=1)
        cfg["strategy"] = {"name": "ia3"}
        api.train(cfg, quiet=True, report=False)
        assert export(tmp_path / "ia3", merge=True, quiet=True)["max_abs_diff"] < 1e-4
