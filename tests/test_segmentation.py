"""Semantic segmentation: mask readers and their errors, augmentation that moves masks with the
pixels, metrics against scikit-learn, training on tiny random backbones (transformers ResNet and
ViT, fmtune's MobileNetV2), prediction at each image's own size, reload, serve."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import assert_head_cache_trains_the_same, cfg_dict, save_turned_photo
from PIL import Image

from fmtune import api
from fmtune.config import DataConfig
from fmtune.data.masks import IGNORE, augment, read_segmentation
from fmtune.errors import ConfigError, DataError, ModelError
from fmtune.tasks.segmentation import Segmentation, confusion, decode_mask_png, scores

COLOURS = np.array([[20, 20, 20], [230, 40, 40], [40, 200, 60], [60, 80, 230]], np.uint8)


def scene(rng: np.random.Generator, size: int = 48, w: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A noisy background (class 0) with 1-3 filled rectangles of classes 1-3 in their colours."""
    w = w or size
    mask = np.zeros((size, w), np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        c = int(rng.integers(1, 4))
        h0, w0 = int(rng.integers(8, size // 2)), int(rng.integers(8, w // 2))
        y, x = int(rng.integers(0, size - h0)), int(rng.integers(0, w - w0))
        mask[y:y + h0, x:x + w0] = c
    img = COLOURS[mask].astype(np.float32) + rng.normal(0, 12, (size, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8), mask


def write_scenes(root: Path, n: int, seed: int = 0, size: int = 48, binary: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = scene(rng, size, size + 8 * (i % 3))  # images of several sizes
        if binary:
            mask = np.where(mask > 0, 255, 0).astype(np.uint8)
        Image.fromarray(img).save(root / "images" / f"s{i:03d}.jpg", quality=95)
        Image.fromarray(mask).save(root / "masks" / f"s{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("scenes")
    return {"train": write_scenes(base / "train", 48, 0), "val": write_scenes(base / "val", 12, 1),
            "test": write_scenes(base / "test", 12, 2)}


def seg_cfg(model, scenes, out, **train):
    return cfg_dict(model, scenes["train"], task={"type": "segmentation"},
                    data={"train": str(scenes["train"]), "val": str(scenes["val"]), "test": str(scenes["test"])},
                    model={"name": str(model), "image_size": 32},
                    train={"epochs": 2, "batch_size": 8, "lr": 2e-3, **train}, out=str(out))


# --- reading ---------------------------------------------------------------------------------

def coco_from_masks(split: Path, out: Path, names: tuple[str, ...] = ("red", "green", "blue"),
                    ids: tuple[int, ...] = (1, 2, 3)) -> Path:
    """The images of a scenes split (copied to out/images/) with their masks as a COCO file in CVAT's layout
    (out/annotations/instances_default.json, file names relative to images/): an RLE object per class present,
    compressed as pycocotools writes it (counts a string); mask value k is category ``ids[k - 1]``."""
    import shutil

    from pycocotools import mask as coco_mask

    shutil.copytree(split / "images", out / "images")
    (out / "annotations").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for i, n in zip(ids, names)]}
    for i, img in enumerate(sorted((split / "images").iterdir())):
        mask = np.asarray(Image.open(split / "masks" / f"{img.stem}.png"))
        coco["images"].append({"id": i, "file_name": img.name, "width": mask.shape[1], "height": mask.shape[0]})
        for k in np.unique(mask[mask > 0]):
            rle = coco_mask.encode(np.asfortranarray(mask == k, dtype=np.uint8))
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i, "category_id": ids[k - 1],
                                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                                        "area": float(coco_mask.area(rle)), "bbox": [0, 0, 1, 1], "iscrowd": 0})
    (out / "annotations" / "instances_default.json").write_text(json.dumps(coco))
    return out


def test_a_coco_file_of_polygons_or_rle_is_read_as_class_index_masks(scenes, tmp_path):
    """Segmentation read folders of mask images and tables only; COCO files (Roboflow, CVAT, COCO itself) were
    refused. Now each image's objects are painted into one mask (0 background, category k in id order -> k + 1,
    the names from the file), largest first; a CVAT folder (annotations/*.json beside images/) is found; a file of
    boxes only is refused as detection data."""
    from fmtune.data.masks import read_mask

    folder = coco_from_masks(scenes["test"], tmp_path / "cvat")
    for source in (folder, folder / "annotations" / "instances_default.json"):
        df = read_segmentation(source, DataConfig())
        assert df.attrs["classes"] == ["background", "red", "green", "blue"] and len(df) == 12
        for img, cell in zip(df["image"], df["mask"]):
            want = np.asarray(Image.open(scenes["test"] / "masks" / f"{Path(img).stem}.png"))
            assert np.array_equal(read_mask(cell), want), img
    # polygons: a small square on a large one keeps its pixels whatever the order in the file
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "p.png")
    small = {"id": 1, "image_id": 7, "category_id": 5, "area": 25.0, "segmentation": [[5, 5, 10, 5, 10, 10, 5, 10]]}
    large = {"id": 2, "image_id": 7, "category_id": 3, "area": 400.0, "segmentation": [[0, 0, 20, 0, 20, 20, 0, 20]]}
    coco = {"images": [{"id": 7, "file_name": "p.png"}],  # (no width and height: read from the image)
            "categories": [{"id": 5, "name": "dot"}, {"id": 3, "name": "square"}], "annotations": [small, large]}
    (tmp_path / "poly.json").write_text(json.dumps(coco))
    df = read_segmentation(tmp_path / "poly.json", DataConfig())
    mask = read_mask(df["mask"][0])
    assert df.attrs["classes"] == ["background", "square", "dot"] and mask.shape == (40, 40)
    assert (mask[7, 7], mask[15, 15], mask[30, 30]) == (2, 1, 0)
    del large["segmentation"]
    (tmp_path / "poly.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"poly.json: annotations\[1\] \(id 2\): no segmentation .*--task detection"):
        read_segmentation(tmp_path / "poly.json", DataConfig())


def label_studio_polygons(split: Path, out: Path) -> Path:
    """A Label Studio JSON export of ``split``'s scenes: per image a task (its upload path), an annotation of one
    polygon per class present, the rectangle around that class's pixels, in percent of original_width / height."""
    import shutil

    (out / "images").mkdir(parents=True)
    tasks = []
    for k, img in enumerate(sorted((split / "images").iterdir())):
        shutil.copy(img, out / "images" / img.name)
        mask = np.asarray(Image.open(split / "masks" / f"{img.stem}.png"))
        h, w = mask.shape
        result = []
        for c, name in enumerate(("red", "green", "blue"), 1):
            ys, xs = np.nonzero(mask == c)
            if len(xs):
                x0, y0 = float(xs.min()) * 100 / w, float(ys.min()) * 100 / h
                x1, y1 = float(xs.max() + 1) * 100 / w, float(ys.max() + 1) * 100 / h
                result.append({"type": "polygonlabels", "original_width": w, "original_height": h,
                               "value": {"points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]],
                                         "polygonlabels": [name]}})
        tasks.append({"id": k + 1, "data": {"image": f"/data/upload/2/{k:08x}-{img.name}"},
                      "annotations": [{"result": result}]})
    (out / "export.json").write_text(json.dumps(tasks))
    return out / "export.json"


def test_label_studio_polygon_exports_are_read_as_masks_and_train(scenes, tiny_resnet, tmp_path):
    """Label Studio's JSON export of polygons was read as COCO and refused. Now each annotated task's polygons
    (points in percent of the image Label Studio saw) are painted into one class-index mask, larger first (a
    small polygon on a large one keeps its pixels), labels in name order from 1; its images are found below the
    export; it trains."""
    from fmtune.data.masks import read_mask

    Image.fromarray(np.zeros((40, 80, 3), np.uint8)).save(tmp_path / "p.png")
    small = {"points": [[6.25, 12.5], [12.5, 12.5], [12.5, 25.0], [6.25, 25.0]], "polygonlabels": ["dot"]}
    large = {"points": [[0, 0], [25.0, 0], [25.0, 50.0], [0, 50.0]], "polygonlabels": ["square"]}
    task = {"id": 3, "data": {"image": "/data/upload/1/0a1b2c3d-p.png"}, "annotations": [{"result": [
        {"type": "polygonlabels", "value": small}, {"type": "polygonlabels", "value": large}]}]}
    (tmp_path / "ls.json").write_text(json.dumps([task]))
    df = read_segmentation(tmp_path / "ls.json", DataConfig())
    mask = read_mask(df["mask"][0])
    assert df.attrs["classes"] == ["background", "dot", "square"] and mask.shape == (40, 80)
    assert (mask[7, 7], mask[15, 15], mask[30, 30]) == (1, 2, 0)  # (x 5-10, y 5-10 the dot; to 20, 20 the square)
    cfg = seg_cfg(tiny_resnet, scenes, tmp_path / "run", epochs=1)
    cfg["data"]["train"] = str(label_studio_polygons(scenes["train"], tmp_path / "ls"))
    api.train(cfg, quiet=True, report=False)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["background", "blue", "green",
                                                                                     "red"]


def pack_brush(mask: np.ndarray, literal_every: int = 0) -> list[int]:
    """``mask`` (h, w; painted where true) as Label Studio's editor exports a brush: its RGBA canvas (alpha 255 where
    painted) packed with thi.ng's rle-pack (see fmtune.data.masks.decode_brush), written here from the format:
    8-bit words, run lengths in 3, 6, 10 or 16 bits; runs of one value as repeat chunks, and with
    ``literal_every`` every such chunk's first values as a literal chunk (as rle-pack writes a stretch of changing
    values)."""
    values = np.repeat(np.where(mask.ravel(), 255, 0).astype(np.uint8), 4)
    values[0::4] = np.where(mask.ravel(), 200, 0)  # (red where painted: only alpha is read)
    bits = [format(len(values), "032b"), format(8 - 1, "05b")] + [format(n - 1, "04b") for n in (3, 6, 10, 16)]

    def chunk(repeat: bool, run: list[int]) -> None:
        size = next(k for k, n in enumerate((3, 6, 10, 16)) if len(run) - 1 < 2 ** n)
        bits.extend([str(int(repeat)), format(size, "02b"), format(len(run) - 1, f"0{(3, 6, 10, 16)[size]}b")])
        bits.extend(format(v, "08b") for v in (run[:1] if repeat else run))

    i, n = 0, 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i] and j - i < 2 ** 16:
            j += 1
        run = values[i:j].tolist()
        n += 1
        if literal_every and n % literal_every == 0 and len(run) > 1:
            chunk(False, run[:2])
            run = run[2:]
        if run:
            chunk(True, run)
        i = j
    text = "".join(bits)
    text += "0" * (-len(text) % 8)
    return [int(text[k:k + 8], 2) for k in range(0, len(text), 8)]


def test_label_studio_brush_masks_are_decoded(scenes, tiny_resnet, tmp_path):
    """Label Studio's brush masks (brushlabels: its editor's RLE of the brush's RGBA canvas) were an error ("export
    as COCO or PNG"). Now they are decoded and painted as polygons are (larger first, labels in name order); an RLE of
    another size than the image, a cut one or one that is not bytes is an error naming the task and brush; a project
    brushed in Label Studio trains."""
    from fmtune.data.masks import read_mask

    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(tmp_path / "p.png")
    yy, xx = np.mgrid[:30, :50]
    disc = (yy - 15) ** 2 + (xx - 20) ** 2 < 100  # (radius 10 around x 20, y 15)
    spot = (yy - 15) ** 2 + (xx - 22) ** 2 < 9
    task = {"id": 4, "data": {"image": "/data/upload/1/0a1b2c3d-p.png"}, "annotations": [{"result": [
        {"type": "brushlabels", "original_width": 50, "original_height": 30,
         "value": {"format": "rle", "rle": pack_brush(spot, literal_every=2), "brushlabels": ["spot"]}},
        {"type": "brushlabels", "original_width": 50, "original_height": 30,
         "value": {"format": "rle", "rle": pack_brush(disc), "brushlabels": ["disc"]}}]}]}
    (tmp_path / "ls.json").write_text(json.dumps([task]))
    df = read_segmentation(tmp_path / "ls.json", DataConfig())
    mask = read_mask(df["mask"][0])
    assert df.attrs["classes"] == ["background", "disc", "spot"]
    expected = np.where(spot, 2, np.where(disc, 1, 0))
    np.testing.assert_array_equal(mask, expected)
    value = task["annotations"][0]["result"][1]["value"]
    for rle, message in [(pack_brush(disc[:, :40]), r"holds 4800 values; the 50x30 image Label Studio saw has 6000"),
                         (pack_brush(disc)[:40], "ends before the 50x30 image's pixels do"),
                         ([1, 2, 300, 4, 5, 6, 7, 8], "not a list of bytes 0-255")]:
        value["rle"] = rle
        (tmp_path / "bad.json").write_text(json.dumps([task]))
        with pytest.raises(DataError, match=rf"bad.json: task 1 \(id 4\): brush 2: its brush RLE .*{message}"):
            read_segmentation(tmp_path / "bad.json", DataConfig())

    cfg = seg_cfg(tiny_resnet, scenes, tmp_path / "run", epochs=1)
    ls = label_studio_polygons(scenes["train"], tmp_path / "ls")
    tasks = json.loads(ls.read_text())
    for t, img in zip(tasks, sorted((scenes["train"] / "images").iterdir())):  # each class's pixels as a brush
        truth = np.asarray(Image.open(scenes["train"] / "masks" / f"{img.stem}.png"))
        h, w = truth.shape
        t["annotations"][0]["result"] = [
            {"type": "brushlabels", "original_width": w, "original_height": h,
             "value": {"format": "rle", "rle": pack_brush(truth == c), "brushlabels": [name]}}
            for c, name in enumerate(("red", "green", "blue"), 1) if (truth == c).any()]
    ls.write_text(json.dumps(tasks))
    first = read_mask(read_segmentation(ls, DataConfig())["mask"][0])
    truth = np.asarray(Image.open(scenes["train"] / "masks" / "s000.png"))
    np.testing.assert_array_equal(first, np.select([truth == 3, truth == 2, truth == 1], [1, 2, 3], 0))
    cfg["data"]["train"] = str(ls)
    api.train(cfg, quiet=True, report=False)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["background", "blue", "green",
                                                                                     "red"]


def test_colour_masks_with_a_colour_map_and_masks_named_after_their_images(scenes, tmp_path):
    """Colour (RGB) masks were refused. With CVAT's labelmap.txt (name:r,g,b:parts:actions) or a class_dict.csv
    (name,r,g,b; CamVid's) beside the masks they are read as class indices in the map's order, named by it; a
    colour it does not name is an error naming the mask and the colour. Masks named after their image with a
    suffix (a.jpg -> a_mask.png, CamVid's a_L.png) pair up too."""
    import shutil

    from fmtune.data.masks import read_mask

    palette = {0: (0, 0, 0), 1: (250, 50, 83), 2: (51, 221, 255), 3: (36, 179, 83)}
    names = ["background", "red", "green", "blue"]
    cvat = tmp_path / "cvat"
    shutil.copytree(scenes["test"] / "images", cvat / "JPEGImages")
    (cvat / "SegmentationClass").mkdir()
    want = {}
    for m in sorted((scenes["test"] / "masks").iterdir()):
        mask = np.asarray(Image.open(m))
        want[m.stem] = mask
        colour = np.zeros((*mask.shape, 3), np.uint8)
        for k, rgb in palette.items():
            colour[mask == k] = rgb
        Image.fromarray(colour).save(cvat / "SegmentationClass" / f"{m.stem}_mask.png")
    (cvat / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "".join(
        f"{n}:{','.join(map(str, palette[k]))}::\n" for k, n in enumerate(names)))
    df = read_segmentation(cvat, DataConfig())
    assert df.attrs["classes"] == names and df.attrs["colour_map"] == str(cvat / "labelmap.txt")
    for img, cell in zip(df["image"], df["mask"]):
        assert np.array_equal(read_mask(cell), want[Path(img).stem]), img
    # a table with a class_dict.csv beside it, the classes listed in another order
    order = [2, 0, 3, 1]
    (cvat / "labelmap.txt").unlink()
    (cvat / "class_dict.csv").write_text("label,r,g,b\n" + "".join(f"{names[k]},{','.join(map(str, palette[k]))}\n"
                                                                  for k in order))
    pd.DataFrame({"image": [f"JPEGImages/{k}.jpg" for k in want],
                  "mask": [f"SegmentationClass/{k}_mask.png" for k in want]}).to_csv(cvat / "pairs.csv", index=False)
    df = read_segmentation(cvat / "pairs.csv", DataConfig())
    assert df.attrs["classes"] == [names[k] for k in order]
    assert np.array_equal(read_mask(df["mask"][0]), np.array(order).argsort()[want[next(iter(want))]])
    # a colour the map does not name
    first = sorted((cvat / "SegmentationClass").iterdir())[0]
    bad = np.asarray(Image.open(first)).copy()
    bad[0, 0] = (1, 2, 3)
    Image.fromarray(bad).save(first)
    with pytest.raises(DataError, match=rf"{first.name}: colour \(1, 2, 3\) is not one of the 4 colours of .*_dict"):
        read_segmentation(cvat / "pairs.csv", DataConfig())
    (cvat / "class_dict.csv").unlink()  # no map: the colour mask is refused, saying what would read it
    with pytest.raises(DataError, match=r"a colour mask .*labelmap.txt or class_dict.csv"):
        read_mask(first)


def test_training_on_coco_files_names_the_classes(scenes, tiny_resnet, tmp_path):
    cfg = seg_cfg(tiny_resnet, scenes, tmp_path / "run", epochs=1)
    cfg["data"] = {s: str(coco_from_masks(scenes[s], tmp_path / s)) for s in ("train", "val", "test")}
    api.train(cfg, quiet=True, report=False)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["background", "red", "green",
                                                                                     "blue"]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["n_test"] == 12 and set(ev["per_class"]) == {"background", "red", "green", "blue"}
    # a test file numbering the same categories in another order is read by name, not by position
    other = coco_from_masks(scenes["test"], tmp_path / "other", ids=(3, 1, 2))  # red 3, green 1, blue 2
    assert read_segmentation(other, DataConfig()).attrs["classes"] == ["background", "green", "blue", "red"]
    assert api.evaluate(tmp_path / "run", other, quiet=True)["test"] == pytest.approx(ev["test"])


def test_a_folder_of_split_folders_is_its_splits(scenes, tiny_resnet, tmp_path):
    """fmtune datasets --export's layout (train/, val/, test/, each images/ + masks/) given as one folder."""
    root = scenes["train"].parent
    cfg = seg_cfg(tiny_resnet, scenes, tmp_path / "run", epochs=1)
    cfg["data"] = {"train": str(root)}
    with pytest.warns(UserWarning, match="ships its held-out splits"):
        s = api.train(cfg, quiet=True)
    info = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert (info["train"]["rows"], info["val"]["rows"]) == (48, 12) and 0 <= s["eval"]["test"]["miou"] <= 1


def test_folder_pairs_and_table_read_the_same(scenes, tmp_path):
    from fmtune.config import DataConfig

    df = read_segmentation(scenes["train"], DataConfig())
    assert len(df) == 48 and Path(df["image"][0]).stem == Path(df["mask"][0]).stem
    rel = pd.DataFrame({"image": [str(Path(p).relative_to(scenes["train"].parent)) for p in df["image"]],
                        "mask": [str(Path(p).relative_to(scenes["train"].parent)) for p in df["mask"]]})
    rel.to_csv(scenes["train"].parent / "train.csv", index=False)
    table = read_segmentation(scenes["train"].parent / "train.csv", DataConfig())
    assert [Path(p).resolve() for p in table["mask"]] == [Path(p).resolve() for p in df["mask"]]


@pytest.mark.parametrize("problem, message", [
    ("no_mask", "no mask for this image"),
    ("orphan_mask", "have no image"),
    ("size", "mask is 10x10 but its image"),
    ("value", "mask value 9 is not a class"),
    ("colour", "a colour mask"),
])
def test_bad_masks_are_named(tmp_path, problem, message):
    from fmtune.config import DataConfig
    from fmtune.data.masks import seg_dataset

    root = write_scenes(tmp_path / "d", 6)
    bad = root / "masks" / "s002.png"
    if problem == "no_mask":
        bad.unlink()
    elif problem == "orphan_mask":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "masks" / "zzz.png")
    elif problem == "size":
        Image.fromarray(np.zeros((10, 10), np.uint8)).save(bad)
    elif problem == "value":
        m = np.zeros((48, 64), np.uint8)
        m[0, 0] = 9
        Image.fromarray(m).save(bad)
    else:
        m = np.zeros((48, 64, 3), np.uint8)
        m[..., 0] = 200
        Image.fromarray(m).save(bad)
    with pytest.raises(DataError, match=message) as err:
        df = read_segmentation(root, DataConfig())
        task = Segmentation.from_train(df["mask"], df, classes="a,b,c,d")
        seg_dataset(df, "image", "mask", {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, task._encode)
    assert "s002" in str(err.value) or "zzz" in str(err.value)


def test_a_turned_photo_pairs_with_its_mask_as_shown(tmp_path, monkeypatch):
    """A phone photo (pixels stored turned, EXIF orientation 6) with its mask drawn as the photo is shown (as
    annotation tools show it): the two line up. It was refused: 'mask is 48x64 but its image is 64x48'."""
    from fmtune.data import masks
    from fmtune.data.masks import seg_dataset

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(3):
        img, mask = scene(rng, 64, 48)
        save_turned_photo(tmp_path / "images" / f"p{i}.jpg", img)
        Image.fromarray(mask).save(tmp_path / "masks" / f"p{i}.png")
    df = read_segmentation(tmp_path, DataConfig())
    task = Segmentation.from_train(df["mask"], df, classes="bg,red,green,blue")
    ds = seg_dataset(df, "image", "mask", {"size": 32, "mean": [0.0] * 3, "std": [1.0] * 3}, task._encode)
    assert ds.sizes == [(48, 64)] * 3
    pixels, labels = ds.images.float(), ds.targets
    for c in (1, 2, 3):  # each class's pixels carry its colour
        where = labels == c
        if where.any():
            colour = pixels.permute(0, 2, 3, 1)[where].mean(0)
            assert int(colour.argmax()) == c - 1 and float(colour.max()) > 150
    # masks drawn on the pixels as stored (a tool that did not turn the photos): the photos are read as stored
    for f in sorted((tmp_path / "masks").iterdir()):
        Image.fromarray(np.asarray(Image.open(f)).T.copy()[::-1]).save(f)  # the mask turned as the stored pixels
    df = read_segmentation(tmp_path, DataConfig())
    for eager in (True, False):
        if not eager:
            monkeypatch.setattr(masks, "EAGER_IMAGE_BYTES", 0)
        with pytest.warns(UserWarning, match="3 photo.*masks fit the pixels as stored"):
            ds = seg_dataset(df, "image", "mask", {"size": 32, "mean": [0.0] * 3, "std": [1.0] * 3}, task._encode)
        assert ds.sizes == [(64, 48)] * 3
        pixels, labels = ds.raw([0, 1, 2]).float(), ds.targets
        for c in (1, 2, 3):
            where = labels == c
            if where.any():
                colour = pixels.permute(0, 2, 3, 1)[where].mean(0)
                assert int(colour.argmax()) == c - 1 and float(colour.max()) > 150, eager


def test_binary_masks_saved_as_0_255_are_recognised(tmp_path):
    from fmtune.config import DataConfig

    root = write_scenes(tmp_path / "b", 4, binary=True)
    df = read_segmentation(root, DataConfig())
    task = Segmentation.from_train(df["mask"], df)
    assert task.labels == ["background", "foreground"] and "binary" in task.notes()[0]
    m = np.array([[0, 255], [255, 0]], np.uint8)
    assert task._encode(m, "x").tolist() == [[0, 1], [1, 0]]
    # read as indices instead, 255 is the ignore value: nothing but background is left to learn
    index = Segmentation.from_train(df["mask"], df, mask_format="index")
    assert index.labels == ["0"] and index._encode(m, "x").tolist() == [[0, IGNORE], [IGNORE, 0]]


def test_classes_file_names_the_classes(tmp_path):
    from fmtune.config import DataConfig

    root = write_scenes(tmp_path / "c", 4)
    (root / "classes.txt").write_text("bg\nred\ngreen\nblue\n")
    df = read_segmentation(root, DataConfig())
    assert Segmentation.from_train(df["mask"], df).labels == ["bg", "red", "green", "blue"]
    assert Segmentation.from_train(df["mask"], df, classes="w,x,y,z").labels == ["w", "x", "y", "z"]


def roboflow_split(split: Path, out: Path, nested: bool = False) -> Path:
    """A split as Roboflow's semantic segmentation export lays it out: each image and its a_mask.png in one folder
    (``nested``: a folder per four images, as the LGG MRI set's per-patient folders), _classes.csv naming values."""
    out.mkdir(parents=True)
    for i, image in enumerate(sorted((split / "images").iterdir())):
        folder = out / f"p{i // 4}" if nested else out
        folder.mkdir(exist_ok=True)
        (folder / image.name).write_bytes(image.read_bytes())
        (folder / f"{image.stem}_mask.png").write_bytes((split / "masks" / f"{image.stem}.png").read_bytes())
    (out / "_classes.csv").write_text("Pixel Value, Class\n0, background\n2, green\n1, red\n3, blue\n")
    return out


def test_masks_beside_their_images_and_roboflows_classes_file(scenes, tiny_resnet, tmp_path):
    """Roboflow's semantic segmentation export (a.jpg beside a_mask.png, _classes.csv: pixel value, class) and
    folders of such pairs read the masks images/ + masks/ hold, the classes named by the file; an image without
    its mask is named; train/ valid/ test/ of such folders train on their splits."""
    want = read_segmentation(scenes["train"], DataConfig())
    for nested in (False, True):
        got = read_segmentation(roboflow_split(scenes["train"], tmp_path / f"flat{nested}", nested), DataConfig())
        pairs = dict(zip((Path(p).name for p in got["image"]), got["mask"]))
        assert sorted(pairs) == sorted(Path(p).name for p in want["image"])
        assert all(np.array_equal(np.array(Image.open(pairs[Path(a).name])), np.array(Image.open(b)))
                   for a, b in zip(want["image"], want["mask"]))
    df = read_segmentation(tmp_path / "flatFalse", DataConfig())
    assert Segmentation.from_train(df["mask"], df).labels == ["background", "red", "green", "blue"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "_classes.csv").write_text("Pixel Value, Class\n0, background\n2, red\n")
    with pytest.raises(DataError, match=r"_classes.csv: the pixel values must be 0..1, one row each; got 0, 2"):
        Segmentation.from_train(df["mask"], _with_source(df.copy(), tmp_path / "bad"))
    (tmp_path / "flatFalse" / "s002_mask.png").unlink()
    with pytest.raises(DataError, match=r"s002.jpg: no mask for this image beside it .*1 image\(s\) without one"):
        read_segmentation(tmp_path / "flatFalse", DataConfig())
    export = tmp_path / "export"
    for split, folder in (("train", "train"), ("val", "valid"), ("test", "test")):
        roboflow_split(scenes[split], export / folder)
    cfg = seg_cfg(tiny_resnet, scenes, tmp_path / "run", epochs=1)
    cfg["data"] = {"train": str(export)}
    with pytest.warns(UserWarning, match="ships its held-out splits"):
        s = api.train(cfg, quiet=True)
    info = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert (info["train"]["rows"], info["val"]["rows"], info["test"]["rows"]) == (48, 12, 12)
    assert json.loads((tmp_path / "run" / "labels.json").read_text())["labels"] == ["background", "red", "green",
                                                                                    "blue"]
    assert 0 <= s["eval"]["test"]["miou"] <= 1


def _with_source(df: pd.DataFrame, source: Path) -> pd.DataFrame:
    df.attrs["source"] = str(source)
    return df


# --- augmentation and metrics ----------------------------------------------------------------

def test_augmentation_moves_the_mask_with_the_pixels():
    rng = np.random.default_rng(0)
    imgs, masks = zip(*[scene(rng, 64) for _ in range(8)])
    x = torch.from_numpy(np.stack([COLOURS[m] for m in masks])).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(np.stack(masks))
    xa, ya = augment(x, y, np.random.default_rng(1))
    assert not torch.equal(ya, y)  # something moved
    # the class each pixel's colour says, after the crop and flip, is the mask's class there
    dist = ((xa.permute(0, 2, 3, 1)[..., None, :] * 255 - torch.from_numpy(COLOURS).float()) ** 2).sum(-1)
    agree = (dist.argmin(-1) == ya.long()).float().mean()
    assert agree > 0.97, agree  # all but the blended edge pixels


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, jaccard_score

    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(5, 4, 6, 6))).float()
    targets = torch.from_numpy(rng.integers(0, 3, (5, 12, 12))).to(torch.uint8)  # class 3: predicted, never true
    targets[0, :2] = IGNORE
    task = Segmentation(["a", "b", "c", "d"])
    m = task.metrics(logits, targets)
    pred = torch.nn.functional.interpolate(logits, size=(12, 12), mode="bilinear").argmax(1).numpy().ravel()
    y = targets.numpy().ravel()
    keep = y != IGNORE
    assert (pred[keep] == 3).any()  # so the false-positive-only class counts, with IoU 0, as in scikit-learn
    assert m["miou"] == pytest.approx(jaccard_score(y[keep], pred[keep], average="macro"))
    assert m["pixel_accuracy"] == pytest.approx(accuracy_score(y[keep], pred[keep]))
    cm = confusion(logits, targets, 4)
    assert cm.sum() == keep.sum() and scores(cm)["support"].tolist() == np.bincount(y[keep], minlength=4).tolist()


@pytest.mark.parametrize("budget", [1 << 25, 5000, 1])
def test_scores_read_a_group_of_classes_at_a_time_as_all_at_once(monkeypatch, budget):
    """Logits are resized to the masks a group of classes and of images at a time (memory stays bounded with 150
    classes at full size): the same classes, cross-entropy and confidences as resizing every class at once."""
    from fmtune.tasks import segmentation

    monkeypatch.setattr(segmentation, "SCORE_ELEMENTS", budget)
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(3, 21, 8, 8))).float()
    targets = torch.from_numpy(rng.integers(0, 21, (3, 24, 20))).to(torch.uint8)
    targets[1, :4] = IGNORE
    up = torch.nn.functional.interpolate(logits, size=(24, 20), mode="bilinear", align_corners=False)
    task = Segmentation([str(i) for i in range(21)])
    m = task.metrics(logits, targets)
    keep = targets != IGNORE
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(up, targets.long(), ignore_index=IGNORE)),
                                      rel=1e-5)
    assert m["pixel_accuracy"] == pytest.approx(float((up.argmax(1) == targets)[keep].float().mean()))
    masks = task.predicted_masks(logits, [(20, 24)] * 3)
    assert all((mask == up[i].argmax(0).numpy()).all() for i, (mask, _) in enumerate(masks))
    conf = up.softmax(1).max(1).values.mean((1, 2))
    assert [c for _, c in masks] == pytest.approx(conf.tolist(), rel=1e-5)


# --- training, prediction, reload ------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory, tiny_resnet, scenes):
    out = tmp_path_factory.mktemp("runs") / "seg"
    summary = api.train(seg_cfg(tiny_resnet, scenes, out, epochs=3, baseline=True), quiet=True)
    return out, summary


def test_training_learns_and_reports(resnet_run):
    out, summary = resnet_run
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["test"]) == {"miou", "pixel_accuracy", "dice"}
    assert 0 <= ev["baseline"]["miou"] <= 1 and ev["baseline_run"].endswith("baseline")
    assert "frozen" in ev["baseline_method"] and (out / "baseline" / "model").is_dir()
    assert set(ev["per_class"]) == {"0", "1", "2", "3"}
    # three epochs on coloured rectangles: well above the 0.25 of predicting one class everywhere
    assert ev["test"]["pixel_accuracy"] > 0.6 and ev["test"]["miou"] > 0.3, ev["test"]
    assert (out / "mistakes.png").is_file() and (out / "confusion_matrix.png").is_file()
    assert (out / "report.html").is_file()


def test_evaluate_with_the_linear_probe_baseline(resnet_run, scenes, tmp_path):
    """fmtune evaluate --baseline: the quicker baseline, a per-cell probe on the frozen backbone."""
    import shutil

    out, _ = resnet_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("baseline", "export", "robustness", "explain"))
    res = api.evaluate(copy, scenes["test"], baseline=True, quiet=True)
    assert 0 <= res["baseline"]["miou"] <= 1 and "linear probe" in res["baseline_method"]


def test_outputs_too_large_for_memory_go_to_disk_and_score_the_same(resnet_run, scenes, tmp_path, monkeypatch):
    """A segmenter's logits for every test image (150 classes at 128 x 128 cells: 10 MB an image) did not fit in
    memory for a large test set: above fsutil.spill_bytes they are written to a file-backed tensor instead (its file
    removed at once), and evaluate, its probe baseline and predict give what they give in memory."""
    import shutil

    from fmtune import fsutil

    out, _ = resnet_run
    copies = []
    for name in ("memory", "disk"):
        copies.append(tmp_path / name)
        shutil.copytree(out, copies[-1], ignore=shutil.ignore_patterns("baseline", "export", "robustness", "explain"))
    held = api.evaluate(copies[0], scenes["test"], baseline=True, quiet=True)
    masks = api.predict(copies[0], scenes["test"] / "images", quiet=True)["mask_png"]

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv(fsutil.SCRATCH_ENV, str(scratch))
    monkeypatch.setattr(fsutil, "spill_bytes", lambda: 0)
    mapped = []
    from_file = torch.from_file
    monkeypatch.setattr(torch, "from_file", lambda path, *a, **kw: mapped.append(path) or from_file(path, *a, **kw))
    spilled = api.evaluate(copies[1], scenes["test"], baseline=True, quiet=True)
    assert mapped and all(Path(p).parent == scratch for p in mapped)  # the model's logits, its features, the probe's
    assert spilled["test"] == held["test"] and spilled["baseline"] == held["baseline"]
    assert spilled["per_class"] == held["per_class"] and spilled["mistakes"] == held["mistakes"]
    assert api.predict(copies[1], scenes["test"] / "images", quiet=True)["mask_png"].tolist() == masks.tolist()
    assert not list(scratch.iterdir())  # nothing left behind


def test_predict_gives_masks_at_each_image_size_and_reload_agrees(resnet_run, scenes, tmp_path):
    out, _ = resnet_run
    df = api.predict(out, scenes["test"] / "images", quiet=True)
    assert df["error"].isna().all() and len(df) == 12
    for path, png in zip(df["image"], df["mask_png"]):
        mask = decode_mask_png(png)
        w, h = Image.open(path).size
        assert mask.shape == (h, w) and mask.max() < 4
    from fmtune.predictor import Predictor

    first = Predictor(out).predict(str(Path(df["image"][0])))
    again = Predictor(out).predict(str(Path(df["image"][0])))
    assert first["mask_png"] == again["mask_png"] == df["mask_png"][0]
    # a table of images predicts the same
    pd.DataFrame({"image": list(df["image"][:3])}).to_csv(tmp_path / "in.csv", index=False)
    t = api.predict(out, tmp_path / "in.csv", quiet=True)
    assert list(t["mask_png"]) == list(df["mask_png"][:3])


def test_hugging_face_parquet_of_images_and_masks_trains_and_predicts(tmp_path, tiny_resnet, scenes):
    """A Hugging Face segmentation split (image and annotation embedded as {bytes, path}, the
    layout of scene_parse_150 / sidewalk-semantic) trains; predict writes each mask under its
    image's name, and the CSV names the images instead of holding their bytes."""
    from conftest import hf_parquet

    files = {}
    for split in ("train", "val", "test"):
        images = sorted((scenes[split] / "images").iterdir())
        masks = [scenes[split] / "masks" / f"{p.stem}.png" for p in images]
        files[split] = hf_parquet(tmp_path / f"{split}.parquet",
                                  {"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
                                   "annotation": [{"bytes": m.read_bytes(), "path": m.name} for m in masks]},
                                  {}, set(), {"image": "Image", "annotation": "Image"})
    cfg = seg_cfg(tiny_resnet, {k: v for k, v in files.items()}, tmp_path / "run", epochs=1)
    s = api.train(cfg, quiet=True)  # the column of masks found as the one of images beside the image column
    assert 0.0 <= s["eval"]["test"]["miou"] <= 1.0 and s["columns_read"] == {"mask_column": "annotation"}
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())["labels"]
    assert len(labels) == 4  # the mask values seen in the embedded masks: background and three shapes
    api.predict(tmp_path / "run", files["test"], tmp_path / "out.csv", save_images=tmp_path / "masks", quiet=True)
    out = pd.read_csv(tmp_path / "out.csv")
    assert out["error"].isna().all() and out["image"].str.startswith("embedded file s0").all()
    assert sorted(p.name for p in (tmp_path / "masks").glob("*.png")) == [f"s{i:03d}.png" for i in range(12)]
    # sidewalk-semantic's names (pixel_values, label) and a table of paths (image_path, mask_path) read the same
    from fmtune.data.masks import read_segmentation

    want = read_segmentation(files["test"], DataConfig(mask_column="annotation"))
    for name, columns in (("sidewalk", ("pixel_values", "label")), ("paths", ("image_path", "seg_path"))):
        df = pd.read_parquet(files["test"]).rename(columns=dict(zip(("image", "annotation"), columns)))
        if name == "paths":
            images = sorted((scenes["test"] / "images").iterdir())
            df = pd.DataFrame({"id": range(len(images)), columns[0]: [str(p) for p in images],
                               columns[1]: [str(scenes["test"] / "masks" / f"{p.stem}.png") for p in images]})
            df.to_csv(tmp_path / f"{name}.csv", index=False)
            got = read_segmentation(tmp_path / f"{name}.csv", DataConfig())
            assert [Path(p).name for p in got["mask"]] == [f"{p.stem}.png" for p in images]
        else:
            df.to_parquet(tmp_path / f"{name}.parquet")
            got = read_segmentation(tmp_path / f"{name}.parquet", DataConfig())
            assert [c["bytes"] for c in got["mask"]] == [c["bytes"] for c in want["annotation"]]
        assert got.attrs["columns_read"] == {"image_column": columns[0], "mask_column": columns[1]}, name


def test_serve_returns_a_mask(resnet_run, scenes):
    from fastapi.testclient import TestClient

    from fmtune.predictor import Predictor
    from fmtune.serve import create_app

    out, _ = resnet_run
    img = sorted((scenes["test"] / "images").iterdir())[0]
    with TestClient(create_app(Predictor(out))) as client:
        r = client.post("/predict", files={"files": (img.name, img.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    pred = body["predictions"][0]
    assert decode_mask_png(pred["mask_png"]).shape == Image.open(img).size[::-1]


def test_huggingface_hub_inference_client_segments_images(resnet_run, scenes, monkeypatch):
    """POST / as the Inference API's image segmentation, through huggingface_hub's InferenceClient: one mask per
    class predicted, 255 where /predict's mask has that class; only the semantic subtask; thresholds refused."""
    from conftest import hf_inference_client, live_server
    from huggingface_hub.errors import HfHubHTTPError

    from fmtune.predictor import Predictor
    from fmtune.serve import create_app

    out, _ = resnet_run
    pred = Predictor(out)
    img = sorted((scenes["test"] / "images").iterdir())[0]
    mask = decode_mask_png(pred.predict(str(img))["mask_png"])
    with live_server(create_app(pred)) as url:
        client = hf_inference_client(url, monkeypatch)
        got = client.image_segmentation(img)
        assert [g.label for g in got] == [pred.task.labels[k] for k in np.unique(mask)] and len(got) >= 2
        for g in got:
            k = pred.task.labels.index(g.label)
            assert g.score is None and g.mask.size == Image.open(img).size
            assert np.array_equal(np.asarray(g.mask), np.where(mask == k, 255, 0).astype(np.uint8))
        assert [g.label for g in client.image_segmentation(img, subtask="semantic")] == [g.label for g in got]
        for kw, message in (({"subtask": "panoptic"}, "segments semantically"),
                            ({"threshold": 0.9}, "parameters.threshold is not supported")):
            with pytest.raises(HfHubHTTPError, match=message):
                client.image_segmentation(img, **kw)


@pytest.mark.parametrize("strategy", ["head", "last_n", "lora", "ia3"])
def test_strategies_train_and_reload(tmp_path, scenes, strategy):
    """Each strategy trains, predicts and reloads; an adapter merges (IA3's --merge failed: peft copied a .weight
    over from the decoder's layers, Sequentials without one)."""
    cfg = seg_cfg("mobilenet-v2", scenes, tmp_path / strategy, epochs=1)
    cfg["model"]["init"] = "pretrained" if strategy in ("lora", "ia3") else "random"
    cfg["strategy"] = {"name": strategy, "n": 2}
    summary = api.train(cfg, quiet=True, report=False)
    from fmtune.predictor import Predictor

    pred = Predictor(tmp_path / strategy)
    ev = json.loads((tmp_path / strategy / "eval.json").read_text())
    img = sorted((scenes["test"] / "images").iterdir())[0]
    assert decode_mask_png(pred.predict(str(img))["mask_png"]).shape == Image.open(img).size[::-1]
    assert 0 <= ev["test"]["miou"] <= 1 and summary["best"] is not None
    if strategy in ("lora", "ia3"):
        from fmtune.exporter import export

        assert export(tmp_path / strategy, merge=True, quiet=True)["max_abs_diff"] < 1e-4


def test_vit_backbone_segments(tmp_path, tiny_vit, scenes):
    api.train(seg_cfg(tiny_vit, scenes, tmp_path / "vit", epochs=1), quiet=True, report=False)
    ev = json.loads((tmp_path / "vit" / "eval.json").read_text())
    assert 0 <= ev["test"]["miou"] <= 1


def test_a_text_model_is_refused(tiny_bert, scenes, tmp_path):
    from fmtune.errors import ModelError

    with pytest.raises((ModelError, ConfigError), match="not an image backbone"):
        api.train(seg_cfg(tiny_bert, scenes, tmp_path / "t"), quiet=True)


def test_onnx_export_gives_the_same_masks(resnet_run, scenes):
    from fmtune.exporter import export
    from fmtune.predictor import Predictor

    out, _ = resnet_run
    res = export(out, format="onnx", quiet=True)
    assert res["max_abs_diff"] <= 1e-4
    imgs = [str(p) for p in sorted((scenes["test"] / "images").iterdir())[:4]]
    t = [decode_mask_png(r["mask_png"]) for r in Predictor(out).predict(imgs)]
    o = [decode_mask_png(r["mask_png"]) for r in Predictor(out, backend="onnx").predict(imgs)]
    assert all((a == b).mean() > 0.999 for a, b in zip(t, o))


def test_robustness_scores_miou_under_corruptions(resnet_run, scenes, tmp_path):
    from fmtune.robustness import robustness

    out, _ = resnet_run
    res = robustness(out, scenes["test"], suite="quick", out=tmp_path / "rob", quiet=True)
    run = res["runs"][out.name]
    ev = json.loads((out / "eval.json").read_text())
    assert res["metric"] == "miou" and run["clean"] == pytest.approx(ev["test"]["miou"], abs=1e-3)
    values = [r["miou"] for p in run["perturbations"].values() for r in p["results"]]
    assert len(values) == 6 * 3 and all(0 <= v <= 1 for v in values)
    assert (tmp_path / "rob" / "robustness.png").is_file()


def test_training_on_images_without_masks_says_what_is_missing(tmp_path, tiny_resnet):
    root = write_scenes(tmp_path / "d", 4)
    import shutil

    shutil.rmtree(root / "masks")
    with pytest.raises(DataError, match="no masks: segmentation data is a folder with images/ and masks/"):
        api.train(seg_cfg(tiny_resnet, {"train": root, "val": root, "test": root}, tmp_path / "r"), quiet=True)


def test_explain_gradcam_on_a_predicted_class_region(resnet_run, scenes, tmp_path):
    from fmtune.explain import explain

    out, _ = resnet_run
    res = explain(out, [str(scenes["test"])], limit=3, out=tmp_path / "ex", quiet=True)
    heat = np.load(tmp_path / "ex" / "heatmaps.npy")
    assert res["method"] == "gradcam" and heat.shape == (3, 32, 32) and len(res["items"]) == 3
    assert all(it["target"] in ["0", "1", "2", "3"] for it in res["items"]) and (tmp_path / "ex" / "grid.png").is_file()
    red = explain(out, [str(scenes["test"])], limit=2, target="1", out=tmp_path / "ex1", quiet=True)
    assert [it["target"] for it in red["items"]] == ["1", "1"]
    with pytest.raises(ConfigError, match="explained with gradcam"):
        explain(out, [str(scenes["test"])], method="ig", out=tmp_path / "ex2", quiet=True)


def test_an_unreadable_upload_is_named_by_its_place(resnet_run, scenes):
    from fmtune.predictor import Predictor

    good = sorted((scenes["test"] / "images").iterdir())[0].read_bytes()
    with pytest.raises(DataError, match=r"^input 1: not a readable image"):
        Predictor(resnet_run[0]).predict([good, b"not an image"])


def test_images_too_many_to_hold_are_decoded_per_batch_with_the_same_batches(scenes, monkeypatch):
    """Above the memory bound images are read per batch; the masks stay held (the metrics read the
    targets whole): the same batches, and targets a tensor either way."""
    from fmtune.config import DataConfig
    from fmtune.data import masks
    from fmtune.data.masks import seg_dataset

    df = read_segmentation(scenes["val"], DataConfig())
    task = Segmentation.from_train(df["mask"], df)
    spec = {"size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    held = seg_dataset(df, "image", "mask", spec, task._encode)
    monkeypatch.setattr(masks, "EAGER_IMAGE_BYTES", 0)
    lazy = seg_dataset(df, "image", "mask", spec, task._encode)
    assert isinstance(lazy.images, list) and isinstance(lazy.targets, torch.Tensor)
    a, b = held.with_augment(3).collate([0, 5, 2]), lazy.with_augment(3).collate([0, 5, 2])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])


def test_frozen_backbone_maps_are_cached_and_train_the_same_decoder(tmp_path, tiny_resnet, scenes, capsys,
                                                                      monkeypatch):
    """strategy head (crops and flips off by default there): the three maps the decoder reads are
    cached (one row per image) and training on them reaches the decoder training without the cache does."""
    assert_head_cache_trains_the_same(lambda out, **train: seg_cfg(tiny_resnet, scenes, out, **train), tmp_path,
                                      capsys, monkeypatch, "feature cache: the whole backbone is frozen: the three "
                                      "maps its head reads are cached")


# --- whole transformers segmenters (fmtune.models.whole) ------------------------------------------

def save_whole_segmenter(folder: Path, model_type: str) -> Path:
    """A random SegFormer (its all-MLP decode head) or UperNet (a ConvNeXt backbone, its pyramid-pooling head)
    ``*ForSemanticSegmentation`` of 150 ADE20K-like classes, with its processor settings (ImageNet normalisation)."""
    from transformers import (
        ConvNextConfig,
        SegformerConfig,
        SegformerForSemanticSegmentation,
        UperNetConfig,
        UperNetForSemanticSegmentation,
    )

    torch.manual_seed(0)
    if model_type in ("mask2former", "maskformer"):
        return save_mask_classifier(folder, model_type)
    if model_type == "segformer":
        model = SegformerForSemanticSegmentation(SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
            strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32, num_labels=150))
    else:
        model = UperNetForSemanticSegmentation(UperNetConfig(
            backbone_config=ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                           out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=16, auxiliary_channels=8, num_labels=150))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
         "size": {"height": 512, "width": 512}}))
    return folder


def save_mask_classifier(folder: Path, model_type: str) -> Path:
    """A random Mask2Former (a Swin backbone, its deformable pixel decoder) or MaskFormer (a ResNet backbone) of 150
    ADE20K-like classes, with its processor settings as the hub's semantic checkpoints give them."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        MaskFormerConfig,
        MaskFormerForInstanceSegmentation,
        ResNetConfig,
        SwinConfig,
    )

    torch.manual_seed(0)
    if model_type == "mask2former":
        swin = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
        model = Mask2FormerForUniversalSegmentation(Mask2FormerConfig(
            backbone_config=swin, num_labels=150, hidden_dim=32, mask_feature_size=32, encoder_feedforward_dim=64,
            dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_queries=12, num_attention_heads=2,
            train_num_points=1024))
    else:
        resnet = ResNetConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], embedding_size=8,
                              out_features=["stage1", "stage2", "stage3", "stage4"])
        model = MaskFormerForInstanceSegmentation(MaskFormerConfig(
            backbone_config=resnet, num_labels=150, fpn_feature_size=32, mask_feature_size=32, num_queries=12,
            decoder_config={"model_type": "detr", "d_model": 32, "encoder_layers": 1, "decoder_layers": 2,
                            "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
                            "decoder_ffn_dim": 64, "num_queries": 12}))
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
         "ignore_index": 255, "size": {"shortest_edge": 384}, "size_divisor": 32,
         "image_processor_type": "Mask2FormerImageProcessor"}))
    return folder


@pytest.mark.parametrize("model_type", ["segformer", "upernet"])
def test_a_whole_segmenter_keeps_its_decode_head(model_type, scenes, tmp_path):
    """A SegFormer fine-tuned for segmentation (its decode head pretrained) was read as a backbone and its decode
    head dropped for fmtune's; an UperNet folder was refused ("a whole upernet model"). Both are fine-tuned as they
    are now: a new classifier for the run's classes, the rest pretrained; the run learns the scenes; its folder is
    a plain transformers segmenter; ONNX agrees; explain reads Grad-CAM in its backbone; strategy head keeps the
    backbone as it was."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSemanticSegmentation

    from fmtune.predictor import Predictor

    source = save_whole_segmenter(tmp_path / model_type, model_type)
    out = tmp_path / "run"
    cfg = seg_cfg(source, scenes, out, epochs=4)
    del cfg["train"]["lr"]
    api.train(cfg, quiet=True, report=False)
    ev = json.loads((out / "eval.json").read_text())
    assert ev["test"]["pixel_accuracy"] > 0.5, ev["test"]  # coloured rectangles on noise: better than background
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    decoder = [k for k in before if k.startswith("decode_head.") and "classifier" not in k]
    assert decoder and all(k in after for k in decoder)  # the decode head kept (and trained on)
    hf = AutoModelForSemanticSegmentation.from_pretrained(out / "model")
    assert hf.config.num_labels == 4 and type(hf).__name__.lower().startswith(model_type)
    img = sorted((scenes["test"] / "images").iterdir())[0]
    first = Predictor(out).predict(str(img))
    assert first["mask_png"] == Predictor(out).predict(str(img))["mask_png"]
    from fmtune.exporter import export

    assert export(out, format="onnx", quiet=True)["max_abs_diff"] < 1e-4
    from fmtune.explain import explain
    from fmtune.models.whole import gradcam_layer

    layer = type(gradcam_layer(Predictor(out).model, 32)).__name__  # the backbone's map at stride 16 (2 x 2 here)
    assert layer == {"segformer": "SegformerStage", "upernet": "ConvNextStage"}[model_type], layer
    items = explain(out, [str(img)], quiet=True)["items"]
    assert len(items) == 1 and np.load(out / "explain" / "heatmaps.npy").shape[0] == 1

    head = tmp_path / "head"
    cfg = seg_cfg(source, scenes, head, epochs=1)
    cfg["strategy"] = {"name": "head"}
    api.train(cfg, quiet=True, report=False)
    frozen = load_file(str(head / "model" / "model.safetensors"))
    stem = [k for k in before if not k.startswith(("decode_head.", "auxiliary_head."))]
    assert stem and all(torch.equal(before[k], frozen[k]) for k in stem)
    assert any(not torch.equal(before[k], frozen[k]) for k in decoder)


def test_a_whole_segmenter_trains_an_adapter(scenes, tmp_path):
    """LoRA on a whole segmenter was refused. Now it is PEFT's own semantic-segmentation recipe: a SegFormer's
    attention adapted, its decode head (with the new classifier) trained and saved beside the adapter. It learns the
    scenes, the run's folder is the adapter with the classes' config (the base read from the source), --merge and
    ONNX give its outputs; BitFit on an UperNet trains its ConvNeXt's biases and its heads, nothing else."""
    from safetensors.torch import load_file

    from fmtune.exporter import export
    from fmtune.predictor import Predictor

    source = save_whole_segmenter(tmp_path / "segformer", "segformer")
    out = tmp_path / "lora"
    cfg = seg_cfg(source, scenes, out, epochs=4)
    del cfg["train"]["lr"]
    cfg["strategy"] = {"name": "lora"}
    api.train(cfg, quiet=True, report=False)
    assert json.loads((out / "eval.json").read_text())["test"]["pixel_accuracy"] > 0.5
    weights = load_file(str(out / "model" / "adapter_model.safetensors"))
    assert {k.split("lora_")[0].rsplit(".", 2)[-2] for k in weights if "lora_" in k} == {"q_proj", "v_proj"}
    assert any("decode_head.classifier" in k for k in weights) and "model.safetensors" not in {
        p.name for p in (out / "model").iterdir()}
    img = sorted((scenes["test"] / "images").iterdir())[0]
    assert Predictor(out).predict(str(img))["mask_png"] == Predictor(out).predict(str(img))["mask_png"]
    assert export(out, merge=True, quiet=True)["max_abs_diff"] < 1e-4
    assert export(out, format="onnx", quiet=True)["max_abs_diff"] < 1e-4

    source = save_whole_segmenter(tmp_path / "upernet", "upernet")
    cfg = seg_cfg(source, scenes, tmp_path / "bitfit", epochs=1)
    cfg["strategy"] = {"name": "bitfit"}
    api.train(cfg, quiet=True, report=False)
    before = load_file(str(source / "model.safetensors"))
    after = load_file(str(tmp_path / "bitfit" / "model" / "model.safetensors"))
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    backbone = {k for k in changed if k.startswith("backbone.")}
    assert backbone and all(k.endswith("bias") for k in backbone)
    assert any(k.startswith("decode_head.") and k.endswith("weight") for k in changed)


@pytest.mark.parametrize("model_type", ["mask2former", "maskformer"])
def test_a_mask_classifier_is_fine_tuned_for_semantic_segmentation(model_type, scenes, tmp_path):
    """A Mask2Former or MaskFormer checkpoint (facebook/mask2former-swin-tiny-ade-semantic ...) was refused as "a
    whole model". Now it is fine-tuned with its own loss (its queries matched to each image's class masks): a new
    class head for the run's classes, the rest pretrained; it learns the scenes; its semantic map is transformers'
    own post-processing's; the run's folder is a plain transformers model; ONNX agrees; strategy head keeps the
    backbone as it was and trains the decoders; LoRA adapts the backbone, the decoders saved beside it (MaskFormer)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForUniversalSegmentation

    from fmtune.predictor import Predictor

    source = save_whole_segmenter(tmp_path / model_type, model_type)
    out = tmp_path / "run"
    cfg = seg_cfg(source, scenes, out, epochs=6, lr=2e-4, head_lr=2e-3)  # (random weights: above the recipe's)
    cfg["model"]["image_size"] = 64  # (at 32 MaskFormer's coarsest map is 1 x 1: its group norm needs 2 values)
    api.train(cfg, quiet=True, report=False)
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["type"] == "train"]
    assert losses[-1] < 0.8 * losses[0], losses  # its own loss (class, mask and dice terms) falls
    ev = json.loads((out / "eval.json").read_text())
    if model_type == "mask2former":  # (MaskFormer, its decoder a DETR's, learns slower: its loss falls)
        assert ev["test"]["miou"] > 0.3, ev["test"]  # above all-background (0.2)
    before, after = load_file(str(source / "model.safetensors")), load_file(str(out / "model" / "model.safetensors"))
    assert before["class_predictor.weight"].shape[0] == 151 and after["class_predictor.weight"].shape[0] == 5
    hf = AutoModelForUniversalSegmentation.from_pretrained(out / "model").eval()
    assert hf.config.num_labels == 4 and hf.config.id2label[1] == "1"

    img = sorted((scenes["test"] / "images").iterdir())[0]
    pred = Predictor(out)
    first = pred.predict(str(img))
    mask = decode_mask_png(first["mask_png"])
    assert mask.shape == Image.open(img).size[::-1]
    # transformers' own semantic post-processing of the saved model, on the pixels fmtune gives it, agrees
    ds = pred.task.inputs([pred.task.image_input(str(img), pred.bundle)], pred.bundle)
    pixels = ds.collate([0])["pixel_values"]
    with torch.no_grad():
        theirs = hf_semantic_map(hf, pixels, mask.shape)
    # (but at the edges of regions: transformers resizes each query's mask before summing them, fmtune the sum; at
    # this test's 16 x 16 maps that is a few percent of the pixels)
    assert (theirs == torch.from_numpy(mask.astype(np.int64))).float().mean() > 0.95

    from fmtune.exporter import export

    assert export(out, format="onnx", quiet=True)["max_abs_diff"] < 1e-3
    from fmtune.explain import explain
    from fmtune.models.whole import gradcam_layer

    # Grad-CAM in its backbone: a ResNet's stage; a Swin's patch embedding (not its window position bias, 4-d too)
    layer = type(gradcam_layer(pred.model, 64)).__name__
    assert layer == {"mask2former": "Conv2d", "maskformer": "ResNetStage"}[model_type], layer
    assert len(explain(out, [str(img)], quiet=True)["items"]) == 1

    head = tmp_path / "head"
    cfg = seg_cfg(source, scenes, head, epochs=1)
    cfg["strategy"] = {"name": "head"}
    api.train(cfg, quiet=True, report=False)
    frozen = load_file(str(head / "model" / "model.safetensors"))
    stem = [k for k in before if ".pixel_level_module.encoder." in f".{k}"]
    assert stem and all(torch.equal(before[k], frozen[k]) for k in stem)
    decoder = [k for k in before if "pixel_level_module.decoder." in k or "transformer_module." in k]
    assert decoder and any(not torch.equal(before[k], frozen[k]) for k in decoder)
    if model_type == "maskformer":  # LoRA on its backbone, the decoders and class head saved beside the adapter
        lora = tmp_path / "lora"
        cfg = seg_cfg(source, scenes, lora, epochs=1)
        cfg["model"]["image_size"], cfg["strategy"] = 64, {"name": "lora"}
        api.train(cfg, quiet=True, report=False)
        weights = load_file(str(lora / "model" / "adapter_model.safetensors"))
        assert any("lora_" in k and "encoder" in k for k in weights)
        assert any("transformer_module" in k for k in weights) and any("class_predictor" in k for k in weights)
        assert export(lora, merge=True, quiet=True)["max_abs_diff"] < 1e-4


def hf_semantic_map(model, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """transformers' semantic post-processing of ``model`` on ``pixels`` at the image's ``size``."""
    from transformers import Mask2FormerImageProcessor

    out = model(pixel_values=pixels)
    return Mask2FormerImageProcessor().post_process_semantic_segmentation(out, target_sizes=[size])[0]


def test_a_mask_classifier_fmtune_does_not_fine_tune_is_named(scenes, tmp_path):
    """EoMT (a ViT whose last blocks read the queries: no backbone config) was taken for an image backbone and failed
    inside transformers; now it is named as a whole model, with what fmtune fine-tunes."""
    from transformers import EomtConfig, EomtForUniversalSegmentation

    EomtForUniversalSegmentation(EomtConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=64, image_size=64, patch_size=16, num_queries=4,
                                            num_blocks=1, num_labels=3)).save_pretrained(tmp_path / "eomt")
    with pytest.raises(ModelError, match="whole eomt model.*Mask2Former"):
        api.train(seg_cfg(tmp_path / "eomt", scenes, tmp_path / "run"), quiet=True, report=False)
