"""Object detection data: images with labelled boxes, read in the formats users have.

- COCO JSON (``--data annotations.json``): ``images`` (id, file_name, width, height),
  ``annotations`` (image_id, bbox [x, y, w, h], category_id, iscrowd), ``categories`` (id, name);
  file names are relative to the JSON's folder unless ``data.image_root`` says otherwise.
- YOLO: a dataset YAML (``path``, ``train``/``val``/``test`` image folders, ``names``) — its
  ``train`` split is read (``data.yolo_split`` picks another) — or an image folder whose labels
  sit in the parallel ``labels/`` folder (``.../images/x.jpg`` -> ``.../labels/x.txt``: ``class
  cx cy w h`` per line, normalised to 0-1), class names from a ``data.yaml`` / ``classes.txt``
  above it.
- Pascal VOC: a folder with ``Annotations/*.xml`` (``filename``, ``size``, ``object``: ``name``,
  ``bndbox`` xmin/ymin/xmax/ymax, ``difficult``) and ``JPEGImages/``.
- Label Studio's JSON export (or JSON-MIN) of rectangles (``rectanglelabels``: x, y, width, height in percent of
  the image, a rotation), its images as the user's copies name them (``label_studio_file``).
- A Parquet / JSONL table of one image per row (a path, or embedded as a Hugging Face dataset
  stores it) and ``objects`` {``bbox``, ``category``, optional ``iscrowd``}: cppe-5's layout;
  boxes ``data.box_format`` (xywh, as COCO; or xyxy), class ids named by the file's metadata.

Every reader gives the same rows: image path, its size, boxes (x0, y0, x1, y1 in pixels) and
their class names; COCO crowd boxes and VOC difficult ones are kept as ``ignore`` (neither
trained on nor counted as missed, as in COCO's and VOC's own evaluations). A box outside its
image, of non-positive size, or for a missing image is a DataError naming the file.

Images are letterboxed to a square (``letterbox``: the whole image scaled to fit, padded), the
boxes with them; training images are flipped and scale-jittered with their boxes moved alike.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fmtune.data.dataset import EAGER_IMAGE_BYTES, ImageData, stored_warning, upright_size
from fmtune.data.masks import as_annotated, label_studio_size, open_image
from fmtune.data.readers import (
    IMAGE_SUFFIXES,
    class_label_names,
    coco_images,
    embedded,
    find_coco_file,
    hf_features,
    label_studio_export,
    label_studio_images,
    list_images,
    media_cell,
    read_table,
    require_column,
    row_prefix,
    table_base,
)
from fmtune.errors import DataError

PAD_VALUE = 114  # letterbox padding (grey), as YOLO pads
MIN_BOX = 1.0  # pixels: a box narrower or lower than this after resizing is dropped from training


def _rows(records: list[dict[str, Any]], source: str) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=["image", "width", "height", "boxes", "labels", "ignore"])
    df.attrs["source"] = source
    return df


def _check_box(box: list[float], w: float, h: float, where: str, tolerance: float = 1.0) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise DataError(f"{where}: box {[round(v, 2) for v in box]} has a non-positive size (x0, y0, x1, y1 in "
                        "pixels)")
    if x0 < -tolerance or y0 < -tolerance or x1 > w + tolerance or y1 > h + tolerance:
        raise DataError(f"{where}: box {[round(v, 2) for v in box]} lies outside its {int(w)}x{int(h)} image")
    return [max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)]


def read_coco(path: Path, image_root: str | None = None) -> pd.DataFrame:
    images, categories = coco_images(path, image_root)
    names = {c["id"]: str(c.get("name", c["id"])) for c in categories}
    records = []
    for img in images:
        rec = {"image": str(img["file"]), "width": img["entry"].get("width"), "height": img["entry"].get("height"),
               "boxes": [], "labels": [], "ignore": []}
        w, h = rec["width"] or 1e9, rec["height"] or 1e9
        for where, a in img["objects"]:
            x, y, bw, bh = (float(v) for v in a["bbox"])
            rec["boxes"].append(_check_box([x, y, x + bw, y + bh], w, h, f"{where} in {rec['image']}"))
            rec["labels"].append(names[a["category_id"]])
            rec["ignore"].append(bool(a.get("iscrowd", 0)))
        records.append(rec)
    df = _rows(records, str(path))
    df.attrs["classes"] = list(names.values())
    return df


def _ls_box(v: dict, w: float, h: float) -> list[float]:
    """A Label Studio rectangle (x, y, width, height in percent of the image, turned ``rotation`` degrees clockwise
    about its top-left corner) as the pixel box x0, y0, x1, y1 that holds it."""
    import math

    x, y = float(v["x"]) * w / 100, float(v["y"]) * h / 100
    bw, bh = float(v["width"]) * w / 100, float(v["height"]) * h / 100
    a = math.radians(float(v.get("rotation") or 0.0))
    xs = [x + dx * math.cos(a) - dy * math.sin(a) for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    ys = [y + dx * math.sin(a) + dy * math.cos(a) for dx, dy in ((0, 0), (bw, 0), (0, bh), (bw, bh))]
    return [min(xs), min(ys), max(xs), max(ys)]


def read_label_studio_boxes(path: Path, tasks: list[dict]) -> pd.DataFrame:
    """Rows of a Label Studio export of image rectangles (``label_studio_export``): each annotated task's image,
    size and boxes (``label_studio_images``); all of them, without boxes, where none is annotated (images to
    predict)."""
    records, names = [], set()
    for where, file, objects, size in label_studio_images(path, tasks, ("rectanglelabels",)):
        w, h = label_studio_size(file, where, size, objects)
        if objects is None:
            records.append({"image": str(file)})
            continue
        row = {"image": str(file), "width": w, "height": h, "boxes": [], "labels": [], "ignore": []}
        for j, o in enumerate(objects):
            labels = o.get("rectanglelabels") or []
            if len(labels) != 1:
                raise DataError(f"{where}: box {j + 1} has {len(labels)} labels ({labels}); a box needs one")
            try:
                box = _ls_box(o, float(w), float(h))
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}: box {j + 1} has no x, y, width and height in percent") from None
            row["boxes"].append(_check_box(box, float(w), float(h), f"{where}: box {j + 1} in {file.name}"))
            row["labels"].append(str(labels[0]))
            row["ignore"].append(False)
            names.add(str(labels[0]))
        records.append(row)
    if not any("boxes" in r for r in records):
        return pd.DataFrame({"image": [r["image"] for r in records]}).pipe(_with_source, str(path))
    df = _rows(records, str(path))
    df.attrs["classes"] = sorted(names)
    return df


def _yolo_spec(yaml_path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}


def _yolo_names(spec: dict[str, Any], yaml_path: Path) -> list[str]:
    """The class names of a YOLO dataset YAML (``spec``, read from ``yaml_path``)."""
    names = spec.get("names")
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise DataError(f"{yaml_path}: no 'names' (a list, or a dict of class index -> name)")


def _find_upwards(folder: Path, names: tuple[str, ...], levels: int = 3) -> Path | None:
    for parent in [folder, *folder.parents][:levels + 1]:
        for n in names:
            if (parent / n).is_file():
                return parent / n
    return None


def _yolo_label_file(image: Path) -> Path:
    """Where YOLO keeps an image's labels: the same path with its last ``images`` folder as ``labels``, ``.txt``."""
    parts = image.parts
    k = len(parts) - 1 - parts[::-1].index("images")
    return Path(*parts[:k], "labels", *parts[k + 1:]).with_suffix(".txt")


def _yolo_images(entry: Any, base: Path, where: str) -> list[Path]:
    """The images of one entry of a YOLO split: an image folder, or a .txt file listing images (one path a line;
    ``./`` relative to the list's folder, other relative paths to the dataset's ``path``), as Ultralytics reads
    them (its coco.yaml lists train2017.txt). A ``../x`` that is not there is read as ``x``, as Ultralytics does
    (Roboflow's exports name ``../train/images`` from a data.yaml beside train/)."""
    target = Path(str(entry))
    target = target if target.is_absolute() else base / target
    if not target.exists() and str(entry).startswith("../"):
        target = base / str(entry)[3:]
    if target.is_file() and target.suffix.lower() == ".txt":
        images = []
        for n, line in enumerate(target.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            img = target.parent / line[2:] if line.startswith("./") else Path(line)
            img = img if img.is_absolute() else base / img
            if not img.is_file():
                raise DataError(f"{target}: line {n}: image {line!r} not found (looked for {img})")
            images.append(img)
        return images
    if not target.is_dir():
        raise DataError(f"{target}: no such image folder or image list ({where})")
    return list_images(target)


def _yolo_boxes(label_file: Path, names: list[str] | None, w: int, h: int) -> tuple[list, list]:
    """An image's boxes and class names from its YOLO label file: ``class cx cy w h`` (normalised) a line, or a
    polygon ``class x1 y1 x2 y2 ...`` (YOLO's segmentation labels, read as the box around it, as Ultralytics does)."""
    boxes, labels = [], []
    for n, line in enumerate(label_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{label_file}: line {n}"
        f = line.split()
        try:
            c, values = int(f[0]), [float(v) for v in f[1:]]
        except (ValueError, IndexError):
            values, c = [], -1
        if len(values) == 4:
            cx, cy, bw, bh = values
            box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
        elif len(values) >= 6 and len(values) % 2 == 0:
            xs, ys = values[0::2], values[1::2]
            box = [min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h]
        else:
            raise DataError(f"{where}: expected 'class cx cy w h' (normalised) or a polygon 'class x1 y1 x2 y2 x3 "
                            f"y3 ...', got {line.strip()!r}")
        if names is not None and not 0 <= c < len(names):
            raise DataError(f"{where}: class {c} is not one of the {len(names)} classes named in the dataset YAML")
        boxes.append(_check_box(box, w, h, where))
        labels.append(names[c] if names is not None else str(c))
    return boxes, labels


def read_yolo(path: Path, split: str = "train") -> pd.DataFrame:
    """A YOLO dataset YAML (its ``split``: an image folder, a .txt list of images, or a list of those), or an image
    folder with a parallel labels/."""
    names = None
    if path.suffix.lower() in (".yaml", ".yml"):
        spec = _yolo_spec(path)
        names = _yolo_names(spec, path)
        if split not in spec:
            raise DataError(f"{path}: no {split!r} split (it has: {', '.join(k for k in spec if k != 'names')})")
        base = Path(spec.get("path") or ".")
        base = base if base.is_absolute() else path.parent / base
        entries = spec[split] if isinstance(spec[split], list) else [spec[split]]
        images = [img for e in entries for img in _yolo_images(e, base, f"YOLO split {split!r} of {path}")]
        folder = path
    else:
        folder = path
        found = _find_upwards(folder, ("data.yaml", "dataset.yaml"))
        if found is not None:
            names = _yolo_names(_yolo_spec(found), found)
        else:
            listed = _find_upwards(folder, ("classes.txt", "obj.names"))
            if listed is not None:
                names = [x.strip() for x in listed.read_text().splitlines() if x.strip()]
        if not folder.is_dir():
            raise DataError(f"{folder}: no such image folder")
        images = list_images(folder)
    outside = next((img for img in images if "images" not in img.parts), None)
    if outside is not None:
        raise DataError(f"{outside}: a YOLO image sits in a folder named images/ (its labels in the parallel "
                        "labels/ folder)")
    records = []
    for img_path in images:
        label_file = _yolo_label_file(img_path)
        with Image.open(img_path) as im:
            w, h = upright_size(im)
        boxes, labels = _yolo_boxes(label_file, names, w, h) if label_file.is_file() else ([], [])  # no file: none
        records.append({"image": str(img_path), "width": w, "height": h, "boxes": boxes, "labels": labels,
                        "ignore": [False] * len(boxes)})
    if not records:
        raise DataError(f"{folder}: no images found")
    df = _rows(records, str(path))
    if names is not None:
        df.attrs["classes"] = names
    return df


def read_voc(path: Path) -> pd.DataFrame:
    ann_dir = path / "Annotations"
    img_dir = next((path / n for n in ("JPEGImages", "images", "Images") if (path / n).is_dir()), path)
    records = []
    for xml in sorted(ann_dir.glob("*.xml")):
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as e:
            raise DataError(f"{xml}: not readable XML ({e})") from None
        fname = root.findtext("filename") or xml.with_suffix(".jpg").name
        img_path = img_dir / fname
        size = root.find("size")
        w = float(size.findtext("width")) if size is not None and size.findtext("width") else None
        h = float(size.findtext("height")) if size is not None and size.findtext("height") else None
        if not img_path.is_file():
            raise DataError(f"{xml}: its image {img_path} does not exist")
        if not w or not h:
            with Image.open(img_path) as im:
                w, h = upright_size(im)
        boxes, labels, ignore = [], [], []
        for j, obj in enumerate(root.findall("object")):
            bb = obj.find("bndbox")
            if bb is None:
                raise DataError(f"{xml}: object {j + 1} has no bndbox")
            try:
                box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise DataError(f"{xml}: object {j + 1}: bndbox needs xmin, ymin, xmax, ymax") from None
            box[0] -= 1  # VOC pixel indices are 1-based and inclusive
            box[1] -= 1
            boxes.append(_check_box(box, w, h, f"{xml}: object {j + 1}"))
            labels.append((obj.findtext("name") or "").strip())
            ignore.append(obj.findtext("difficult", "0").strip() == "1")
        records.append({"image": str(img_path), "width": w, "height": h, "boxes": boxes, "labels": labels,
                        "ignore": ignore})
    if not records:
        raise DataError(f"{ann_dir}: no .xml annotation files")
    return _rows(records, str(path))


BOX_KEYS = ("bbox", "bboxes", "boxes")
CLASS_KEYS = ("category", "categories", "label", "labels", "category_id", "class", "classes")


def _first_key(keys: Any, wanted: tuple[str, ...]) -> str | None:
    return next((k for k in wanted if k in keys), None)


def _object_names(path: Path, columns: list[str]) -> list[str] | None:
    """The class names of a Hugging Face detection Parquet's object classes (ClassLabel), from the
    file's metadata: inside ``objects`` (the old Sequence-of-dict, the dict-of-List and the newer
    List-of-dict layouts) or a top-level list column beside the boxes."""
    features = hf_features(path)
    objects = features.get("objects")
    if "objects" not in columns:
        objects = features
    objects = objects.get("feature", objects) if isinstance(objects, dict) else {}  # Sequence / List: the dict inside
    key = _first_key(objects, CLASS_KEYS) if isinstance(objects, dict) else None
    return class_label_names(objects[key]) if key else None


def _objects(df: pd.DataFrame, path: Path) -> list[dict]:
    """Each row's objects as {boxes, classes, crowd} lists, from an ``objects`` column (a dict of
    lists, or a list of dicts) or from top-level box and class columns."""
    if "objects" in df.columns:
        cells = list(df["objects"])
    else:
        box, cls = _first_key(df.columns, BOX_KEYS), _first_key(df.columns, CLASS_KEYS)
        if box is None or cls is None:
            raise DataError(f"{path}: no 'objects' column; a detection table holds an image per row and its objects "
                            f"({{bbox: [[x, y, w, h], ...], category: [...]}}), as Hugging Face detection datasets "
                            f"do, or list columns of boxes ({'/'.join(BOX_KEYS)}) and classes "
                            f"({'/'.join(CLASS_KEYS)}); columns are: {', '.join(map(str, df.columns))}")
        cells = [{box: b, cls: c, **({"iscrowd": df["iscrowd"].iloc[r]} if "iscrowd" in df.columns else {})}
                 for r, (b, c) in enumerate(zip(df[box], df[cls]))]
    out = []
    for r, cell in enumerate(cells):
        if isinstance(cell, (list, tuple, np.ndarray)) and all(isinstance(o, dict) for o in cell):  # list of dicts
            keys = set().union(*(o.keys() for o in cell)) if len(cell) else {"bbox", "category"}
            cell = {k: [o.get(k) for o in cell] for k in keys}
        box = _first_key(cell, BOX_KEYS) if isinstance(cell, dict) else None
        cls = _first_key(cell, CLASS_KEYS) if box else None
        if cls is None:
            raise DataError(f"{row_prefix(df, r)}objects must hold box ({'/'.join(BOX_KEYS)}) and class "
                            f"({'/'.join(CLASS_KEYS)}) lists, got {str(cell)[:80]}")
        boxes = [list(b) for b in cell[box]]
        classes = list(cell[cls])
        if len(classes) != len(boxes):
            raise DataError(f"{row_prefix(df, r)}{len(boxes)} boxes but {len(classes)} classes")
        crowd = cell.get("iscrowd")
        out.append({"boxes": boxes, "classes": classes,
                    "crowd": [bool(c) for c in (list(crowd) if crowd is not None else [0] * len(boxes))]})
    return out


BOX_CSV = "_annotations.csv"  # the box table of a folder of images (Roboflow's Tensorflow CSV export)
# a table of one box a row (TensorFlow's object detection CSV, as labelImg's xml_to_csv and Roboflow's "Tensorflow
# CSV" export write it: filename, width, height, class, xmin, ymin, xmax, ymax): its corner columns, any case
CORNER_COLUMNS = (("xmin", "ymin", "xmax", "ymax"), ("x_min", "y_min", "x_max", "y_max"), ("x0", "y0", "x1", "y1"),
                  ("x1", "y1", "x2", "y2"), ("left", "top", "right", "bottom"))
ROW_IMAGE_KEYS = ("filename", "file_name", "image", "image_path", "path", "file", "img")
ROW_CLASS_KEYS = ("class", "label", "category", "name", "class_name", "category_name")


def _corner_columns(df: pd.DataFrame) -> tuple[str, ...] | None:
    """The corner columns of a table of one box a row (``CORNER_COLUMNS``), as the table spells them, else None."""
    lower = {str(c).strip().lower(): c for c in df.columns}
    found = next((names for names in CORNER_COLUMNS if all(n in lower for n in names)), None)
    return tuple(lower[n] for n in found) if found else None


def _images_of_boxes(df: pd.DataFrame, corners: tuple[str, ...], path: Path, data_cfg: Any) -> tuple[pd.DataFrame,
                                                                                                       str]:
    """A table of one box a row as one image a row: its image column (``data.image_column`` where the table has it,
    else the first of ``ROW_IMAGE_KEYS``), width / height where given, and ``objects`` {bbox: corners, category};
    a row without a box (empty corners) is an image without objects. Each image's row keeps the position of its
    first line (messages name the file's rows). Returns it and its image column."""
    lower = {str(c).strip().lower(): c for c in df.columns}
    image = data_cfg.image_column if data_cfg.image_column in df.columns else next(
        (lower[k] for k in ROW_IMAGE_KEYS if k in lower), None)
    cls = next((lower[k] for k in ROW_CLASS_KEYS if k in lower and lower[k] != image), None)
    if image is None or cls is None:
        raise DataError(f"{path}: a table of one box a row ({', '.join(map(str, corners))}) needs an image column "
                        f"({'/'.join(ROW_IMAGE_KEYS)}, or data.image_column) and a class column "
                        f"({'/'.join(ROW_CLASS_KEYS)}); columns are: {', '.join(map(str, df.columns))}")
    if df[image].isna().any():
        r = int(np.flatnonzero(df[image].isna().to_numpy())[0])
        raise DataError(f"{row_prefix(df, r)}column {image!r} is empty")
    box = df[list(corners)]
    filled = box.notna().all(axis=1).to_numpy()
    part = box.notna().any(axis=1).to_numpy() & ~filled
    if part.any():
        r = int(np.flatnonzero(part)[0])
        raise DataError(f"{row_prefix(df, r)}a box needs all of {', '.join(map(str, corners))}; some are empty")
    try:
        values = box.astype(float).to_numpy()
    except (TypeError, ValueError):
        bad = pd.to_numeric(box.stack(), errors="coerce")
        r, c = bad[bad.isna()].index[0]
        raise DataError(f"{row_prefix(df, df.index.get_loc(r))}column {c!r}: {box.loc[r, c]!r} is not a number") \
            from None
    first: dict[str, int] = {}
    objects: dict[str, dict[str, list]] = {}
    for r, name in enumerate(df[image].astype(str)):
        first.setdefault(name, r)
        o = objects.setdefault(name, {"bbox": [], "category": []})
        if filled[r]:
            o["bbox"].append(values[r].tolist())
            o["category"].append(str(df[cls].iloc[r]))
    keep = list(first.values())
    out = df.iloc[keep][[c for c in df.columns if c not in (*corners, cls)]].copy()
    out["objects"] = [objects[n] for n in first]
    out.attrs = dict(df.attrs)
    return out, image


def _cell_size(value: Any, df: pd.DataFrame, r: int, column: str) -> float | None:
    """A table's image width / height cell as a number (None where empty); an error naming the row otherwise."""
    if value is None or (not isinstance(value, str) and pd.isna(value)) or str(value).strip() == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{row_prefix(df, r)}column {column!r}: {value!r} is not a number") from None


def read_box_table(path: Path, data_cfg: Any) -> pd.DataFrame:
    """A table (a Hugging Face detection dataset's Parquet split) of one image per row (a path, or
    embedded: ``data.image_column``) and its objects: an ``objects`` column holding ``bbox``
    (``data.box_format``) and ``category`` lists (or a list of such objects), or top-level box and
    class list columns (``bboxes`` / ``labels`` ...); class ids are named by the file's metadata;
    ``iscrowd`` where given. Or a table of one box a row (TensorFlow's CSV: filename, width, height, class, xmin,
    ymin, xmax, ymax; ``CORNER_COLUMNS``), its boxes in pixels."""
    df = read_table(path, data_cfg.encoding, media=data_cfg)
    column, box_format = data_cfg.image_column, data_cfg.box_format
    corners = _corner_columns(df) if "objects" not in df.columns and not _first_key(df.columns, BOX_KEYS) else None
    if corners:
        df, column, box_format = *_images_of_boxes(df, corners, path, data_cfg), "xyxy"
    require_column(df, column, "image", "data.image_column")
    names, base, records = _object_names(path, list(df.columns)), table_base(df), []
    for r, (cell, objects) in enumerate(zip(df[column], _objects(df, path))):
        source, name = media_cell(cell, base)
        where = f"{row_prefix(df, r)}{name}"
        if source is None:
            raise DataError(f"{row_prefix(df, r)}column {column!r} is empty")
        w, h = (df["width"].iloc[r], df["height"].iloc[r]) if {"width", "height"} <= set(df.columns) else (None, None)
        w, h = _cell_size(w, df, r, "width"), _cell_size(h, df, r, "height")  # (a CSV's cells are read as text)
        if w is None or h is None:
            w, h = open_image(source, f"{row_prefix(df, r)}").size
        boxes = objects["boxes"]
        corners = [[x, y, x + bw, y + bh] for x, y, bw, bh in boxes] if box_format == "xywh" else boxes
        labels = [names[int(c)] if names is not None and not isinstance(c, str) else str(c) for c in objects["classes"]]
        records.append({"image": cell if isinstance(source, bytes) else str(source), "width": w, "height": h,
                        "boxes": [_check_box(b, w, h, f"{where}: box {k + 1}") for k, b in enumerate(corners)],
                        "labels": labels, "ignore": objects["crowd"]})
    out = _rows(records, str(path))
    if names is not None:
        out.attrs["classes"] = names
    return out


def yolo_split_path(path: str | Path) -> tuple[Path, str] | None:
    """``data.yaml:val``: a YOLO dataset YAML and one of its splits (how a run names the YAML's own val and test
    splits), or None where ``path`` is not of that form."""
    text = str(path)
    yaml_path, _, split = text.rpartition(":")
    if not split or not yaml_path or Path(text).exists() or Path(yaml_path).suffix.lower() not in (".yaml", ".yml"):
        return None
    return Path(yaml_path), split


def yolo_splits(path: str | Path) -> dict[str, str]:
    """The val and test splits a YOLO dataset YAML names (as ``data.yaml:val``), for a run trained on it."""
    p = Path(path)
    if not p.is_file() or p.suffix.lower() not in (".yaml", ".yml"):
        return {}
    import yaml

    try:
        spec = _yolo_spec(p)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # (reading it as data says what is wrong)
        return {}
    return {k: f"{p}:{k}" for k in ("val", "test") if isinstance(spec, dict) and spec.get(k)}


def read_detection(path: str | Path, data_cfg: Any) -> pd.DataFrame:
    """Rows (image, width, height, boxes, labels, ignore) from COCO JSON, YOLO, VOC or a table of
    images and objects (a Hugging Face Parquet split); a folder or file of images alone gives rows
    without boxes (images to predict). ``data.yaml:val`` reads that split of a YOLO YAML."""
    p = Path(path)
    split = yolo_split_path(p)
    if split is not None and split[0].is_file():
        return read_yolo(*split)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_file() and p.suffix.lower() in (".parquet", ".pq", ".jsonl", ".csv", ".tsv"):
        return read_box_table(p, data_cfg)
    if p.is_file() and p.suffix.lower() == ".json":
        tasks = label_studio_export(p, ("rectanglelabels",))
        return read_label_studio_boxes(p, tasks) if tasks is not None else read_coco(p, data_cfg.image_root)
    if p.is_file() and p.suffix.lower() in (".yaml", ".yml"):
        return read_yolo(p, data_cfg.yolo_split)
    if p.is_dir() and (p / "Annotations").is_dir():
        return read_voc(p)
    if p.is_dir():
        coco = find_coco_file(p)
        if coco is not None:
            return read_coco(coco, data_cfg.image_root)
        if (p / BOX_CSV).is_file():  # (Roboflow's Tensorflow CSV export: a split folder's images and its boxes)
            return read_box_table(p / BOX_CSV, data_cfg)
        if (p / "images").is_dir() and (p / "labels").is_dir():
            return read_yolo(p / "images")
        if p.name == "images" or "images" in p.parts:
            return read_yolo(p)
        images = list_images(p)
        if not images:
            raise DataError(f"{p}: no images or annotations found; give a COCO JSON file, a YOLO dataset YAML or "
                            "images/ folder (labels/ beside it), or a Pascal VOC folder (Annotations/, JPEGImages/)")
        return pd.DataFrame({"image": [str(f) for f in images]}).pipe(_with_source, str(p))
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return pd.DataFrame({"image": [str(p)]}).pipe(_with_source, str(p))
    raise DataError(f"{p}: not a detection dataset: give a COCO .json, a YOLO .yaml, an images/ folder with labels/, "
                    "or a Pascal VOC folder")


def _with_source(df: pd.DataFrame, source: str) -> pd.DataFrame:
    df.attrs["source"] = source
    return df


# --- images and boxes at the model's input size ------------------------------------------------

def letterbox(img: Image.Image, size: int) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """uint8 (3, size, size): the image scaled to fit (aspect kept), padded right and below; the
    scale and the (width, height) it was scaled to."""
    w, h = img.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = np.asarray(img.resize((nw, nh), Image.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(canvas).permute(2, 0, 1), scale, (nw, nh)


def pack_targets(boxes: list[np.ndarray], classes: list[np.ndarray], ignore: list[np.ndarray]) -> torch.Tensor:
    """Per image (N, M, 6): class, x0, y0, x1, y1, ignore; rows past an image's boxes have class -1."""
    m = max([len(b) for b in boxes] + [1])
    out = torch.full((len(boxes), m, 6), -1.0)
    for i, (b, c, g) in enumerate(zip(boxes, classes, ignore)):
        if len(b):
            out[i, :len(b), 0] = torch.as_tensor(c, dtype=torch.float32)
            out[i, :len(b), 1:5] = torch.as_tensor(b, dtype=torch.float32)
            out[i, :len(b), 5] = torch.as_tensor(g, dtype=torch.float32)
    return out


def augment_boxes(x: torch.Tensor, t: torch.Tensor, rng: np.random.Generator, min_scale: float = 0.6
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: zoom into a random crop (60-100% of the side) that keeps every box's centre, or
    zoom out (the image shrunk to 60-100%, placed at random on padding), each half the time; a
    horizontal flip half the time. Boxes move with the pixels, clipped to the crop."""
    import torch.nn.functional as F

    n, _, s, _ = x.shape
    xs, ts = x.clone(), t.clone()
    for i in range(n):
        valid = ts[i, :, 0] >= 0
        b = ts[i, valid, 1:5].clone()
        f = rng.uniform(min_scale, 1.0)
        if rng.random() < 0.5:  # zoom in: a crop of side f*s that keeps the boxes' centres
            c = max(8, round(s * f))
            if len(b):
                cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
                lo_x, hi_x = max(0.0, float(cx.max()) - c + 1), min(float(s - c), float(cx.min()) - 1)
                lo_y, hi_y = max(0.0, float(cy.max()) - c + 1), min(float(s - c), float(cy.min()) - 1)
            else:
                lo_x = lo_y = 0.0
                hi_x = hi_y = float(s - c)
            if hi_x >= lo_x and hi_y >= lo_y:
                left, top = int(rng.uniform(lo_x, hi_x + 1e-6)), int(rng.uniform(lo_y, hi_y + 1e-6))
                crop = xs[i:i + 1, :, top:top + c, left:left + c]
                xs[i] = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False)[0]
                k = s / c
                b = ((b - torch.tensor([left, top, left, top])) * k).clamp(0, s)
        else:  # zoom out: the image shrunk, placed at random on the padding colour
            c = max(8, round(s * f))
            small = F.interpolate(xs[i:i + 1], size=(c, c), mode="bilinear", align_corners=False)[0]
            left, top = int(rng.integers(0, s - c + 1)), int(rng.integers(0, s - c + 1))
            xs[i] = PAD_VALUE / 255.0
            xs[i, :, top:top + c, left:left + c] = small
            b = b * (c / s) + torch.tensor([left, top, left, top])
        if rng.random() < 0.5:
            xs[i] = xs[i].flip(-1)
            b = torch.stack([s - b[:, 2], b[:, 1], s - b[:, 0], b[:, 3]], 1) if len(b) else b
        ts[i, valid, 1:5] = b
        small_box = ((b[:, 2] - b[:, 0]) < MIN_BOX) | ((b[:, 3] - b[:, 1]) < MIN_BOX) if len(b) else None
        if small_box is not None and small_box.any():  # cut away by the crop: no longer an object
            rows = torch.nonzero(valid).flatten()[small_box]
            ts[i, rows, 0] = -1
    return xs, ts


class BoxData(ImageData):
    """Letterboxed images (uint8) with packed box targets in input pixels (``pack_targets``), the
    scale back to each original image, and training augmentation seeded by the batch's indices."""

    def __init__(self, images: torch.Tensor | list[str], targets: torch.Tensor | None, scales: list[float],
                 sizes: list[tuple[int, int]], spec: dict[str, Any], names: list[str], augment_seed: int | None = None):
        super().__init__(images, targets, spec)
        self.scales, self.sizes, self.names, self.augment_seed = scales, sizes, names, augment_seed

    def decode(self, path: str) -> torch.Tensor:
        return letterbox(open_image(path, upright=path not in self.stored), self.spec["size"])[0]

    def with_augment(self, seed: int) -> BoxData:
        out = BoxData(self.images, self.targets, self.scales, self.sizes, self.spec, self.names, seed)
        out.stored = self.stored
        return out

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        x = self.raw(idx).float() / 255.0
        t = self.targets[idx] if self.targets is not None else None
        if self.augment_seed is not None and t is not None:
            x, t = augment_boxes(x, t, np.random.default_rng([self.augment_seed, *map(int, idx)]))
        batch = {"pixel_values": self.pixels(x)}
        if t is not None:
            batch["labels"] = t
            if self.spec.get("set_prediction"):  # a whole detector computes its own loss from them (models.whole)
                batch["det_targets"] = t
        return batch


def box_dataset(df: pd.DataFrame, column: str, spec: dict[str, Any], classes: list[str] | None,
                with_targets: bool) -> BoxData:
    """Every image of ``df`` opened (a missing or unreadable one is a DataError naming it),
    letterboxed, its boxes scaled with it; a label that is not one of ``classes`` is a DataError."""
    size = int(spec["size"])
    eager = len(df) * 3 * size * size <= EAGER_IMAGE_BYTES
    images, scales, sizes, boxes, cls, ign = [], [], [], [], [], []
    index = {c: i for i, c in enumerate(classes or [])}
    names = [media_cell(v, Path("."))[1] for v in df[column]]  # a path, or an image embedded in the table
    cells = [embedded(p) or str(p) for p in df[column]]
    stored = set()
    for r, path in enumerate(df[column]):
        img = open_image(path, f"{df.attrs.get('source')}: ")
        path = names[r]
        w, h = img.size
        said = (_size(df["width"].iloc[r]), _size(df["height"].iloc[r])) if with_targets else (0.0, 0.0)
        said = said if all(said) else None  # (no size given)
        if said is not None:
            img, as_stored = as_annotated(df[column].iloc[r], img, said, f"{df.attrs.get('source')}: ", tolerance=1)
            if as_stored:
                w, h = img.size
                stored.add(cells[r])
        if said is not None and (abs(said[0] - w) > 1 or abs(said[1] - h) > 1):
            raise DataError(f"{df.attrs.get('source')}: {path} is {w}x{h} but its annotation says "
                            f"{int(df['width'].iloc[r])}x{int(df['height'].iloc[r])}")
        tensor, scale, _ = letterbox(img, size)
        if eager:
            images.append(tensor)
        scales.append(scale)
        sizes.append((w, h))
        if with_targets:
            labels = list(df["labels"].iloc[r])
            unknown = [lab for lab in labels if lab not in index]
            if unknown:
                raise DataError(f"{df.attrs.get('source')}: {path}: class {unknown[0]!r} is not one of the training "
                                f"classes ({', '.join(list(index)[:20])})")
            boxes.append(np.asarray(df["boxes"].iloc[r], dtype=np.float32).reshape(-1, 4) * scale)
            cls.append(np.asarray([index[lab] for lab in labels], dtype=np.int64))
            ign.append(np.asarray(df["ignore"].iloc[r], dtype=bool))
    targets = pack_targets(boxes, cls, ign) if with_targets else None
    stored_warning(len(stored), df.attrs.get("source", "the data"), "sizes")
    out = BoxData(torch.stack(images) if eager else cells, targets, scales, sizes, spec,
                  [n if embedded(v) is not None else Path(n).name for v, n in zip(df[column], names)])
    out.stored = frozenset(stored)
    return out


def _size(v: Any) -> float:
    """A width or height an annotation gives (0.0 where it gives none: None, NaN, 0)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if f > 0 else 0.0

