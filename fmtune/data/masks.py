"""Semantic segmentation data: images with a class-index mask each.

Read directly, without conversion scripts:

- a folder holding an image folder and a mask folder (``images/`` + ``masks/``, or Pascal VOC's
  ``JPEGImages/`` + ``SegmentationClass/``, and the other names in ``IMAGE_DIRS`` / ``MASK_DIRS``)
  whose files pair up by name (``images/a.jpg`` with ``masks/a.png``);
- a CSV/TSV/JSONL/Parquet table with an image path and a mask path per row (``data.image_column``,
  ``data.mask_column``), paths relative to the table, or both files embedded in it (a Hugging
  Face dataset's Parquet split: ``{bytes, path}`` cells);
- a COCO JSON file (or a folder holding one, as Roboflow and CVAT export it) of polygons or RLE:
  each image's objects painted into one class-index mask (``read_coco_masks``);
- Label Studio's JSON export of polygons, painted so too (``read_label_studio_masks``).

A mask is a one-channel PNG (mode L, P or 1; a grey RGB image is read as one channel) whose pixel
value is the class index; ``task.ignore_index`` (255) marks pixels that are not scored. Masks
holding only 0 and 255 are binary masks saved for viewing: ``task.mask_format`` auto reads them as
0 background / 255 foreground and says so (reading 255 as "ignore" would leave nothing to learn,
a known source of IoU 0). Images are resized to ``size`` x ``size`` (bilinear) and masks with them
(nearest); predictions are resized back to each image's own size.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from fmtune.data.dataset import EAGER_IMAGE_BYTES, ImageData, load_rgb, stored_warning
from fmtune.data.readers import (
    IMAGE_SUFFIXES,
    coco_images,
    embedded,
    file_like,
    find_coco_file,
    label_studio_export,
    label_studio_images,
    list_images,
    media_cell,
    media_path_columns,
    read_table,
    require_column,
    row_prefix,
    table_base,
)
from fmtune.errors import DataError

IMAGE_DIRS = ("images", "image", "imgs", "img", "JPEGImages", "inputs")
MASK_DIRS = ("masks", "mask", "labels", "annotations", "SegmentationClass", "targets", "gt")
IGNORE = 255
# how mask files are often named after their image (a.jpg -> a_mask.png): Carvana, ISIC / Kvasir, CamVid, Cityscapes
MASK_NAME_SUFFIXES = ("_mask", "-mask", "_masks", "_segmentation", "_seg", "_label", "_labels", "_L", "_gt",
                      "_labelIds", "_gtFine_labelIds")
# a file naming each colour of colour (RGB) masks: CVAT's Segmentation mask export (name:r,g,b:parts:actions a line),
# CamVid's and many Kaggle sets' class_dict.csv (name,r,g,b)
COLOUR_MAPS = ("labelmap.txt", "class_dict.csv")


def subdir(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (folder / n).is_dir():
            return folder / n
    return None


def image_folder(path: Path) -> Path:
    """What to predict of ``path``: a labelled folder's images/ (not its masks or labels), else ``path``."""
    return (subdir(path, IMAGE_DIRS) or path) if path.is_dir() else path


def _coco_file(p: Path) -> Path | None:
    """The COCO JSON file ``p`` is, or that its folder holds (``find_coco_file``) where the folder has no mask
    images beside its images; else None."""
    if p.is_file():
        return p if p.suffix.lower() == ".json" else None
    masks = subdir(p, MASK_DIRS)
    return None if masks is not None and list_images(masks) else find_coco_file(p)


def read_coco_masks(path: Path, image_col: str, mask_col: str, image_root: str | None = None) -> pd.DataFrame:
    """A COCO file's objects (polygons, or RLE as COCO and pycocotools write it) as one class-index mask per image,
    embedded as PNG: 0 = background, category k (in category-id order) = k + 1, named in ``attrs["classes"]``. The
    objects are painted largest first, so that one lying on another keeps its pixels (crowd regions too, as their
    class). Images are named as for detection (``file_name`` relative to the file's folder, or data.image_root)."""
    images, cats = coco_images(path, image_root)
    index = {c["id"]: k + 1 for k, c in enumerate(cats)}
    unpainted = next((where for img in images for where, a in img["objects"] if not a.get("segmentation")), None)
    if unpainted is not None:
        raise DataError(f"{unpainted}: no segmentation (polygons or RLE) to paint a mask from; a file of boxes "
                        "only is detection data (--task detection)")
    rows = []
    for img in images:
        im, p = img["entry"], img["file"]
        w, h = im.get("width"), im.get("height")
        if not (w and h):
            with open_image(str(p), f"{path}: image {im['id']}: ") as opened:
                w, h = opened.size
        objects = [(where, a["segmentation"], index[a["category_id"]], float(a.get("area") or 0))
                   for where, a in img["objects"]]
        rows.append({image_col: str(p), mask_col: _png_cell(_paint(objects, int(w), int(h), f"image {im['id']}"), p)})
    if not rows:
        raise DataError(f"{path}: no images listed")
    df = pd.DataFrame(rows)
    df.attrs["source"] = str(path)
    df.attrs["classes"] = ["background", *(str(c.get("name", c["id"])) for c in cats)]
    return df


def _paint(objects: list[tuple[str, Any, int, float]], w: int, h: int, image: str) -> np.ndarray:
    """A class-index mask of an image's objects, each (where: named in messages, its COCO segmentation: polygons
    [x0, y0, x1, y1, ...] in pixels or RLE, its class index, its area), painted largest first."""
    from pycocotools import mask as coco_mask

    mask = np.zeros((h, w), np.uint8)
    for where, seg, k, _ in sorted(objects, key=lambda o: -o[3]):
        if isinstance(seg, np.ndarray):  # painted already (a Label Studio brush)
            mask[seg] = k
            continue
        try:
            if isinstance(seg, list):  # polygons [x0, y0, x1, y1, ...]
                rle = coco_mask.merge(coco_mask.frPyObjects([q for q in seg if len(q) >= 6], h, w))
            elif isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = coco_mask.frPyObjects(seg, h, w)
            else:
                rle = dict(seg, counts=seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"])
            painted = coco_mask.decode(rle).astype(bool)
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise DataError(f"{where}: not a readable segmentation ({type(e).__name__}: {e})") from None
        if painted.shape != mask.shape:
            raise DataError(f"{where}: its RLE is {painted.shape[1]}x{painted.shape[0]} but {image} is {w}x{h}")
        mask[painted] = k
    return mask


def _png_cell(mask: np.ndarray, image: Path) -> dict[str, Any]:
    """A mask as a table cell of an embedded PNG (``readers.embedded``), named after its image."""
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": f"{image.stem}.png"}


def label_studio_size(file: Path, where: str, size: tuple[Any, Any], objects: list | None) -> tuple[Any, Any]:
    """The size of an annotated Label Studio task's image: as Label Studio saw it, else the file's (upright)."""
    if objects is None or (size[0] and size[1]):
        return size
    with open_image(file, f"{where}: ") as img:
        return img.size


LABEL_STUDIO_MASKS = ("polygonlabels", "brushlabels")


def decode_brush(rle: Any, w: int, h: int, where: str) -> np.ndarray:
    """A Label Studio brush mask (``brushlabels``, ``format: rle``) as a boolean (h, w) mask. Its editor packs the
    RGBA pixels of the brush's canvas (at the image's own size) with thi.ng's rle-pack: a 32-bit count of values,
    the word size - 1 (5 bits), four run-length sizes - 1 (4 bits each), then chunks of a repeat bit, a 2-bit
    choice of run-length size, the run's length - 1 in that many bits, and one word repeated over the run or that
    many words as they are; bits most significant first. A pixel is painted where its alpha is not 0 (as
    label-studio-converter reads it)."""
    try:
        packed = np.asarray(rle, dtype=np.int64)
        if packed.ndim != 1 or len(packed) < 8 or packed.min() < 0 or packed.max() > 255:
            raise ValueError("not a list of bytes")
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: its brush RLE is not a list of bytes 0-255 ({e})") from None
    array = np.unpackbits(packed.astype(np.uint8))
    bits = (array + ord("0")).tobytes().decode("ascii")
    short = DataError(f"{where}: its brush RLE ends before the {w}x{h} image's pixels do")
    if len(bits) < 53:
        raise short
    num = int(bits[:32], 2)
    if num != w * h * 4:
        raise DataError(f"{where}: its brush RLE holds {num} values; the {w}x{h} image Label Studio saw has "
                        f"{w * h * 4} (RGBA)")
    word = int(bits[32:37], 2) + 1
    sizes = [int(bits[37 + 4 * k:41 + 4 * k], 2) + 1 for k in range(4)]
    weights = 1 << np.arange(word - 1, -1, -1, dtype=np.int64)
    out = np.zeros(num, np.int64)
    i, pos, end = 0, 53, len(bits)
    while i < num:  # (one chunk a turn; a stretch of words read at once)
        n = sizes[int(bits[pos + 1:pos + 3], 2)]
        if pos + 3 + n > end:
            raise short
        j = min(num, i + 1 + int(bits[pos + 3:pos + 3 + n], 2))
        repeat, pos = bits[pos] == "1", pos + 3 + n
        count = 1 if repeat else j - i
        if pos + count * word > end:
            raise short
        if count == 1:
            out[i:j] = int(bits[pos:pos + word], 2)
        else:
            out[i:j] = array[pos:pos + count * word].reshape(count, word) @ weights
        pos, i = pos + count * word, j
    return out.reshape(h, w, 4)[:, :, 3] > 0


def read_label_studio_masks(path: Path, tasks: list[dict], image_col: str, mask_col: str) -> pd.DataFrame:
    """A Label Studio export of polygons (``polygonlabels``: points in percent of the image Label Studio saw) and
    brush strokes (``brushlabels``: its own RLE, ``decode_brush``) as one class-index mask per annotated task,
    embedded as PNG as a COCO file's are: 0 = background, the labels in name order from 1, the larger regions
    painted first."""
    rows, objects_of, names = [], [], set()
    for where, file, objects, size in label_studio_images(path, tasks, LABEL_STUDIO_MASKS):
        w, h = label_studio_size(file, where, size, objects)
        polygons = []
        for j, o in enumerate(o for o in objects or [] if "brushlabels" in o):
            labels = o.get("brushlabels") or []
            if len(labels) != 1:
                raise DataError(f"{where}: brush {j + 1} has {len(labels)} labels ({labels}); a brush needs one")
            if o.get("format", "rle") != "rle":
                raise DataError(f"{where}: brush {j + 1} is in format {o.get('format')!r}; Label Studio's is 'rle'")
            painted = decode_brush(o.get("rle"), int(w), int(h), f"{where}: brush {j + 1}")
            polygons.append((f"{where}: brush {j + 1}", painted, str(labels[0]), float(painted.sum())))
            names.add(str(labels[0]))
        for j, o in enumerate(o for o in objects or [] if "polygonlabels" in o):
            labels = o.get("polygonlabels") or []
            if len(labels) != 1:
                raise DataError(f"{where}: polygon {j + 1} has {len(labels)} labels ({labels}); a polygon needs one")
            try:
                flat = [float(v) * (w if k % 2 == 0 else h) / 100 for pt in o["points"] for k, v in enumerate(pt[:2])]
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}: polygon {j + 1} has no points [[x, y], ...] in percent") from None
            xs, ys = np.array(flat[0::2]), np.array(flat[1::2])
            area = 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))
            polygons.append((f"{where}: polygon {j + 1}", [flat], str(labels[0]), area))
            names.add(str(labels[0]))
        rows.append((file, int(w), int(h)) if objects is not None else (file, None, None))
        objects_of.append(polygons if objects is not None else None)
    if all(o is None for o in objects_of):  # (none annotated: images to predict)
        df = pd.DataFrame({image_col: [str(f) for f, _, _ in rows]})
        df.attrs["source"] = str(path)
        return df
    classes = sorted(names)
    index = {n: k + 1 for k, n in enumerate(classes)}
    out = [{image_col: str(f), mask_col: _png_cell(_paint([(wh, seg, index[n], a) for wh, seg, n, a in polygons],
                                                            w, h, f.name), f)}
           for (f, w, h), polygons in zip(rows, objects_of) if polygons is not None]
    df = pd.DataFrame(out)
    df.attrs["source"] = str(path)
    df.attrs["classes"] = ["background", *classes]
    return df


def read_segmentation(path: str | Path, data_cfg: Any) -> pd.DataFrame:
    """Rows of (image path, mask path) from a folder pair, a table or a COCO file; the mask column is
    absent for a folder of images alone (images to predict)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    image_col, mask_col = data_cfg.image_column, data_cfg.mask_column
    tasks = label_studio_export(p, LABEL_STUDIO_MASKS) if p.is_file() and p.suffix.lower() == ".json" else None
    if tasks is not None:
        return read_label_studio_masks(p, tasks, image_col, mask_col)
    coco = _coco_file(p)
    if coco is not None:
        return read_coco_masks(coco, image_col, mask_col, data_cfg.image_root)
    if p.is_file():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            df = pd.DataFrame({image_col: [str(p)]})
        else:
            df = _image_and_mask_columns(read_table(p, data_cfg.encoding, data_cfg.text_column, data_cfg), image_col,
                                         mask_col)
            require_column(df, image_col, "image path", "data.image_column")
            base = table_base(df)
            for col in (image_col, mask_col):  # paths made absolute; files embedded in the table kept as they are
                if col in df.columns:
                    df[col] = [v if embedded(v) is not None else
                               None if (src := media_cell(v, base)[0]) is None else str(src) for v in df[col]]
        df.attrs["source"] = str(p)
        return _colour_masks_indexed(df, mask_col, p.parent) if mask_col in df.columns else df
    images_dir, masks_dir = subdir(p, IMAGE_DIRS), subdir(p, MASK_DIRS)
    if images_dir is None:
        images = list_images(p)
        beside = _masks_beside(images, p)
        if beside is not None:  # (each image's mask beside it: a_mask.png)
            df = pd.DataFrame({image_col: [str(f) for f in beside], mask_col: [str(m) for m in beside.values()]})
            df.attrs["source"] = str(p)
            return _colour_masks_indexed(df, mask_col, p)
        if not images:
            raise DataError(f"{p}: no images found; a segmentation folder holds images/ and masks/ (same file "
                            f"names; also {', '.join(IMAGE_DIRS[2:])} / {', '.join(MASK_DIRS[2:])}), or give a "
                            f"table with columns {image_col!r} and {mask_col!r}")
        df = pd.DataFrame({image_col: [str(f) for f in images]})  # images only: to predict
        df.attrs["source"] = str(p)
        return df
    images = list_images(images_dir)
    if not images:
        raise DataError(f"{images_dir}: no images found")
    rows = {"image": [str(f) for f in images]}
    if masks_dir is not None:
        masks = {f.relative_to(masks_dir).with_suffix("").as_posix(): f for f in list_images(masks_dir)}
        paired = []
        for f in images:
            key = f.relative_to(images_dir).with_suffix("").as_posix()
            m = next((masks.pop(k) for k in (key, *(key + x for x in MASK_NAME_SUFFIXES)) if k in masks), None)
            if m is None:
                raise DataError(f"{f}: no mask for this image in {masks_dir} (expected {masks_dir / key}.png)")
            paired.append(str(m))
        if masks:
            extra = sorted(masks)[:3]
            raise DataError(f"{masks_dir}: {len(masks)} mask(s) have no image in {images_dir} (e.g. "
                            f"{', '.join(str(masks[k]) for k in extra)})")
        rows["mask"] = paired
    df = pd.DataFrame({image_col: rows["image"], **({mask_col: rows["mask"]} if "mask" in rows else {})})
    df.attrs["source"] = str(p)
    return _colour_masks_indexed(df, mask_col, masks_dir) if masks_dir is not None else df


def _masks_beside(files: list[Path], folder: Path) -> dict[Path, Path] | None:
    """{image: mask} of a folder whose masks lie beside their images, named after them (``MASK_NAME_SUFFIXES``:
    Roboflow's semantic segmentation export, a.jpg + a_mask.png; the LGG MRI set's a.tif + a_mask.tif per patient
    folder), where a file is such a mask of another; an image without its mask is an error naming it. None where no
    file is a mask of another (images to predict)."""
    by_stem = {f.with_suffix("").as_posix(): f for f in files}
    masks: dict[Path, Path] = {}
    for f in files:
        stem = f.with_suffix("").as_posix()
        for suffix in MASK_NAME_SUFFIXES:
            if stem.endswith(suffix) and stem[: -len(suffix)] in by_stem:
                masks[by_stem[stem[: -len(suffix)]]] = f
                break
    if not masks:
        return None
    images = [f for f in files if f not in set(masks.values())]
    missing = [f for f in images if f not in masks]
    if missing:
        raise DataError(f"{missing[0]}: no mask for this image beside it in {folder} (expected "
                        f"{missing[0].with_suffix('')}_mask.png, as {Path(masks[next(iter(masks))]).name} is "
                        f"{next(iter(masks)).name}'s; {len(missing)} image(s) without one)")
    return {f: masks[f] for f in images}


USUAL_IMAGES = ("image", "img", "images", "pixel_values")  # Hugging Face segmentation sets' image columns (and image_*)


def _image_and_mask_columns(df: pd.DataFrame, image_col: str, mask_col: str) -> pd.DataFrame:
    """A table whose image or mask column is not named as data.image_column / mask_column say, with its columns of
    images (paths, or files embedded as a Hugging Face dataset's Parquet holds them) named so: the image column is
    the one of a usual name (image, pixel_values, image_path ...) or the only one, the mask column the other one
    (ADE20K's scene_parse_150: image, annotation; sidewalk-semantic: pixel_values, label). ``attrs["columns_read"]``
    says which."""
    held = [c for c in media_path_columns(df, "image") if c not in (image_col, mask_col)]
    found: dict[str, str] = {}
    if image_col not in df.columns:
        named = [c for c in held if str(c).strip().lower() in USUAL_IMAGES
                 or str(c).strip().lower().startswith(("image_", "img_"))]
        pick = named or (held if mask_col in df.columns or len(held) == 1 else [])
        if len(pick) == 1:
            found["image_column"] = pick[0]
    if mask_col not in df.columns:
        others = [c for c in held if c != found.get("image_column")]
        if len(others) == 1 and (image_col in df.columns or "image_column" in found):
            found["mask_column"] = others[0]
    if not found:
        return df
    out = df.rename(columns={v: {"image_column": image_col, "mask_column": mask_col}[k] for k, v in found.items()})
    out.attrs = {**df.attrs, "columns_read": found}
    return out


def read_colour_map(path: Path) -> list[tuple[str, tuple[int, int, int]]]:
    """The classes of a colour map file (COLOUR_MAPS), in order, with their colours; a DataError naming the line."""
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(":") if path.suffix.lower() == ".txt" else line.partition(",")
        values = (rest.split(":")[0] if path.suffix.lower() == ".txt" else rest).split(",")
        try:
            r, g, b = (int(v) for v in values[:3])
            if len(values) < 3 or not all(0 <= v <= 255 for v in (r, g, b)):
                raise ValueError
        except ValueError:
            if n == 1 and path.suffix.lower() == ".csv":
                continue  # its header (name,r,g,b)
            raise DataError(f"{path}: line {n}: expected "
                            + ("'name:r,g,b:...'" if path.suffix.lower() == ".txt" else "'name,r,g,b'")
                            + f" with values 0-255, got {line!r}") from None
        out.append((name.strip(), (r, g, b)))
    if not out:
        raise DataError(f"{path}: names no class")
    return out


def find_colour_map(folder: Path, levels: int = 2) -> Path | None:
    for parent in [folder, *folder.parents][:levels + 1]:
        for name in COLOUR_MAPS:
            if (parent / name).is_file():
                return parent / name
    return None


def colours_to_classes(rgb: np.ndarray, colours: dict[int, int], where: str, listed: Path) -> np.ndarray:
    """A colour mask (H, W, 3) as class indices by ``colours`` (r << 16 | g << 8 | b -> class); a colour the map
    does not name is a DataError naming the mask, the colour and the map."""
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    found, inverse = np.unique(code, return_inverse=True)
    lut = np.array([colours.get(int(c), -1) for c in found])
    if (lut < 0).any():
        c = int(found[lut < 0][0])
        raise DataError(f"{where}: colour ({c >> 16}, {(c >> 8) & 255}, {c & 255}) is not one of the {len(colours)} "
                        f"colours of {listed}")
    return lut[inverse].reshape(code.shape).astype(np.uint8)


def _colour_masks_indexed(df: pd.DataFrame, mask_col: str, masks_dir: Path) -> pd.DataFrame:
    """Colour (RGB) masks, with a colour map file beside them or above (COLOUR_MAPS), as class-index masks embedded
    as PNG, the classes named and ordered as the map lists them; masks already of one channel are left as they are
    (and so is every mask where no map file is found)."""
    listed = find_colour_map(masks_dir)
    if listed is None:
        return df
    classes = read_colour_map(listed)
    colours = {(r << 16) | (g << 8) | b: k for k, (_, (r, g, b)) in enumerate(classes)}
    cells, recoloured = [], False
    for cell in df[mask_col]:
        source, name = _opened_cell(cell)
        try:
            with Image.open(source) as img:
                rgb = np.asarray(img.convert("RGB")) if img.mode in ("RGB", "RGBA") else None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            rgb = None  # (read_mask names the file)
        if rgb is None or (rgb == rgb[..., :1]).all():
            cells.append(cell)  # one channel (a palette's index is the class too) or grey: read as class indices
            continue
        buf = io.BytesIO()
        Image.fromarray(colours_to_classes(rgb, colours, name, listed)).save(buf, format="PNG")
        cells.append({"bytes": buf.getvalue(), "path": Path(name).with_suffix(".png").name})
        recoloured = True
    if recoloured:
        attrs = dict(df.attrs)
        df = df.assign(**{mask_col: cells})
        df.attrs.update(attrs, classes=[n for n, _ in classes], colour_map=str(listed))
    return df


def read_mask(path: Any) -> np.ndarray:
    """A mask file (a path, or a table cell holding the file: ``fmtune.data.readers.media_cell``) as
    a (H, W) uint8 array of class indices; a DataError naming the file if it is not one."""
    source, path = _opened_cell(path)
    try:
        with Image.open(source) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable mask image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        if mode in ("RGBA", "LA"):
            arr = arr[..., :-1]
        if not (arr == arr[..., :1]).all():
            raise DataError(f"{path}: a colour mask ({mode}); fmtune reads class-index masks: one channel whose "
                            "pixel value is the class (PNG mode L or P), or colour masks with a file naming each "
                            f"colour beside the masks' folder: {' or '.join(COLOUR_MAPS)} (CVAT's 'name:r,g,b:...' "
                            "lines; name,r,g,b rows)")
        arr = arr[..., 0]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise DataError(f"{path}: mask values {int(arr.min())}..{int(arr.max())} (mode {mode}); class indices "
                            "must be 0-254 (255 = ignore)")
        arr = arr.astype(np.uint8)
    return arr


def _opened_cell(cell: Any) -> tuple[Any, str]:
    """What PIL opens for a cell of an image / mask column (a path; the bytes of a file embedded in
    the table as a file object), and how messages name it."""
    source, name = media_cell(cell, Path("."))
    return (file_like(source) if source is not None else ""), name


def mask_values(df: pd.DataFrame, column: str) -> set[int]:
    """Every value that occurs in the masks of ``df`` (read from their files)."""
    seen: set[int] = set()
    for i, path in enumerate(df[column]):
        if path is None or (isinstance(path, float) and np.isnan(path)):
            raise DataError(f"{row_prefix(df, i)}{_opened_cell(df.iloc[i, 0])[1]}: no mask given for this image")
        seen.update(int(v) for v in np.unique(read_mask(path)))
    return seen


def open_image(path: Any, where: str = "", upright: bool = True) -> Image.Image:
    """``load_rgb`` of a file (a path, or a table cell holding the file); a DataError naming it
    (after ``where``) if it is missing or unreadable."""
    source, path = _opened_cell(path)
    try:
        return load_rgb(source, upright)
    except FileNotFoundError:
        raise DataError(f"{where}{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}{path}: not a readable image ({type(e).__name__}: {e})") from None


def as_annotated(cell: Any, img: Image.Image, size: tuple[float, float], where: str = "",
                 tolerance: float = 0) -> tuple[Image.Image, bool]:
    """A photo opened upright (``img``, from ``cell``) as its annotation sizes it (``size``: width, height, within
    ``tolerance`` pixels): where that is the size of its pixels as stored and not as shown (a turned photo drawn on
    by a tool that did not turn it), the photo opened as stored and True; else ``img`` and False."""
    def near(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return abs(a[0] - b[0]) <= tolerance and abs(a[1] - b[1]) <= tolerance

    w, h = img.size
    if not near(size, (h, w)) or near(size, (w, h)):
        return img, False
    stored = open_image(cell, where, upright=False)
    return (stored, True) if near(size, stored.size) else (img, False)


def resize_image(img: Image.Image, size: int) -> torch.Tensor:
    """uint8 (3, size, size): the whole image, resized (no crop: every pixel is predicted)."""
    img = img.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.fromarray(mask).resize((size, size), Image.NEAREST)).copy())


def encode_mask(mask: np.ndarray, binary255: bool, num_classes: int, ignore: int, where: str) -> np.ndarray:
    """Class indices as trained: 0/255 binary masks to 0/1, the ignore value to 255; an index
    outside the classes is a DataError naming the file and the value."""
    if binary255:
        return (mask > 127).astype(np.uint8)
    ignored = mask == ignore if ignore >= 0 else np.zeros(mask.shape, bool)
    bad = ~ignored & (mask >= num_classes)
    if bad.any():
        v = int(mask[bad][0])
        raise DataError(f"{where}: mask value {v} is not a class (classes 0..{num_classes - 1}"
                        f"{', ' + str(ignore) + ' = ignore' if ignore >= 0 else ''}); declare the classes with "
                        "--set task.classes=NAME,NAME,... or fix the mask")
    out = mask.copy()
    out[ignored] = IGNORE
    return out


class SegData(ImageData):
    """Images (uint8, size x size) with their masks (uint8 class indices, 255 = ignore), the
    original sizes (to predict at), and, for training, flips and scale crops that move the mask
    with the pixels, seeded by the batch's indices (a resumed run sees the same)."""

    def __init__(self, images: torch.Tensor | list[str], masks: torch.Tensor | None, sizes: list[tuple[int, int]],
                 spec: dict[str, Any], names: list[str], augment_seed: int | None = None):
        super().__init__(images, masks, spec)
        self.sizes, self.names, self.augment_seed = sizes, names, augment_seed

    def decode(self, path: str) -> torch.Tensor:
        return resize_image(open_image(path, upright=path not in self.stored), self.spec["size"])

    def with_augment(self, seed: int) -> SegData:
        out = SegData(self.images, self.targets, self.sizes, self.spec, self.names, seed)
        out.stored = self.stored
        return out

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        x = self.raw(idx).float() / 255.0
        y = self.targets[idx] if self.targets is not None else None
        if self.augment_seed is not None and y is not None:
            x, y = augment(x, y, np.random.default_rng([self.augment_seed, *map(int, idx)]))
        batch = {"pixel_values": self.pixels(x)}
        if y is not None:
            batch["labels"] = y.long()
            if self.spec.get("set_prediction"):  # a mask classifier computes its own loss from them (models.whole)
                batch["seg_targets"] = batch["labels"]
        return batch


def augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, min_scale: float = 0.5
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: a crop of 50-100% of the side (random place, aspect 3:4-4:3) resized back, and a
    horizontal flip half the time; the mask gets the same crop (nearest) and flip."""
    n, _, h, w = x.shape
    xs, ys = [], []
    for i in range(n):
        s = rng.uniform(min_scale, 1.0)
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, max(8, round(h * s / np.sqrt(ar)))), min(w, max(8, round(w * s * np.sqrt(ar))))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        xi = x[i:i + 1, :, top:top + ch, left:left + cw]
        yi = y[i:i + 1, None, top:top + ch, left:left + cw].float()
        xi = F.interpolate(xi, size=(h, w), mode="bilinear", align_corners=False)
        yi = F.interpolate(yi, size=(h, w), mode="nearest")
        if rng.random() < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        xs.append(xi)
        ys.append(yi[:, 0].to(y.dtype))
    return torch.cat(xs), torch.cat(ys)


def seg_dataset(df: pd.DataFrame, column: str, mask_column: str | None, spec: dict[str, Any],
                encode: Any = None) -> SegData:
    """Every image (and mask) of ``df`` checked, resized and kept as uint8 (images decoded per batch
    when too many to hold; the masks, a byte a pixel, always held: the metrics read them whole);
    a mask whose size differs from its image is a DataError naming both."""
    require_column(df, column, "image path", "data.image_column")
    size = int(spec["size"])
    with_masks = mask_column is not None
    eager = len(df) * 3 * size * size <= EAGER_IMAGE_BYTES
    images, masks, sizes = [], [], []
    names = [_opened_cell(v)[1] for v in df[column]]
    cells = [embedded(v) or str(v) for v in df[column]]  # paths, or the bytes of files embedded in the table
    mask_cells = list(df[mask_column]) if with_masks else []
    stored = set()
    for i, cell in enumerate(cells):
        where, path = row_prefix(df, i), names[i]
        img = open_image(cell, where)
        if with_masks:
            if mask_cells[i] is None or (isinstance(mask_cells[i], float) and np.isnan(mask_cells[i])):
                raise DataError(f"{where}{path}: no mask given for this image")
            m = read_mask(mask_cells[i])
            mask_name = _opened_cell(mask_cells[i])[1]
            img, as_stored = as_annotated(cell, img, (m.shape[1], m.shape[0]), where)
            if as_stored:
                stored.add(cell)
            if (m.shape[1], m.shape[0]) != img.size:
                raise DataError(f"{where}{mask_name}: mask is {m.shape[1]}x{m.shape[0]} but its image {path} is "
                                f"{img.size[0]}x{img.size[1]}; a mask must have its image's size")
            masks.append(resize_mask(encode(m, f"{where}{mask_name}"), size))
        sizes.append(img.size)
        if eager:
            images.append(resize_image(img, size))
    stored_warning(len(stored), df.attrs.get("source", "the data"), "masks")
    out = SegData(torch.stack(images) if eager else cells, torch.stack(masks) if with_masks else None, sizes, spec,
                  [n if isinstance(c, bytes) else Path(n).name for c, n in zip(cells, names)])
    out.stored = frozenset(stored)
    return out
