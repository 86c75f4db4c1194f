"""Semantic segmentation: a class for every pixel of an image, scored by mean IoU.

Data: images with class-index mask PNGs (``fmtune.data.masks``: a folder pair or a table).
The model (``fmtune.models.dense``) gives logits at stride 8; the loss and the metrics read them
resized (bilinear) to the mask, so every pixel counts, and prediction resizes them to each
image's own size. Pixels of the ignore value (255) are neither trained nor scored.
"""

from __future__ import annotations

import base64
import io
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from fmtune.data.masks import IGNORE, encode_mask, mask_values, read_segmentation, seg_dataset
from fmtune.errors import ConfigError, DataError
from fmtune.fsutil import output_tensor
from fmtune.tasks.base import TASKS
from fmtune.tasks.dense import DenseTask

CLASSES_FILE = "classes.txt"  # beside images/ and masks/: the class names, one per line, in mask-value order
PROBE_PIXELS = 30000  # feature-map cells the baseline probe is fitted on (a random sample beyond)
SCORE_ELEMENTS = 1 << 25  # logits resized to the masks at a time when scoring (128 MiB of float32)


PIXEL_CLASSES_FILE = "_classes.csv"  # Roboflow's semantic segmentation export: "Pixel Value, Class" a row


def listed_classes(folder: Path) -> list[str]:
    """The class names a dataset folder lists, in mask-value order: ``classes.txt`` (one a line), or Roboflow's
    ``_classes.csv`` (pixel value, class; values 0..K-1); [] where it lists none."""
    listed = folder / CLASSES_FILE
    if listed.is_file():
        return [line.strip() for line in listed.read_text(encoding="utf-8").splitlines() if line.strip()]
    table = folder / PIXEL_CLASSES_FILE
    if not table.is_file():
        return []
    rows = pd.read_csv(table, dtype=str, skipinitialspace=True)
    if rows.shape[1] < 2:
        raise DataError(f"{table}: expected two columns, a pixel value and its class; columns are: "
                        f"{', '.join(map(str, rows.columns))}")
    values = pd.to_numeric(rows.iloc[:, 0], errors="coerce")
    if values.isna().any() or sorted(values.astype(int)) != list(range(len(rows))):
        raise DataError(f"{table}: the pixel values must be 0..{len(rows) - 1}, one row each; got "
                        f"{', '.join(map(str, rows.iloc[:, 0]))}")
    return [str(c).strip() for _, c in sorted(zip(values.astype(int), rows.iloc[:, 1]))]


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def per_pixel(logits: torch.Tensor, size: tuple[int, int], targets: torch.Tensor | None = None,
              log_probs: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per pixel of ``logits`` (B, K, h, w) resized (bilinear) to ``size``: the predicted class (B, H, W), and with
    ``log_probs`` its log-probability and, given ``targets`` (B, H, W; any value at ignored pixels), the target
    class's. The classes are resized a group at a time, laid out classes-last (reducing over them is then 2-3x
    quicker than over the channels of the usual layout), so memory stays within ``SCORE_ELEMENTS`` whatever the number
    of classes and the size (bilinear resizing treats each class on its own: the same as resizing them all at once)."""
    b, k = logits.shape[:2]
    group = max(1, min(k, SCORE_ELEMENTS // max(1, b * size[0] * size[1])))
    pred = best = lse = picked = None
    y = targets.long() if targets is not None and log_probs else None
    for g in range(0, k, group):
        part = logits[:, g:g + group].float().contiguous(memory_format=torch.channels_last)
        up = F.interpolate(part, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        m, i = up.max(-1)
        if pred is None:
            pred, best = i, m
        else:
            better = m > best  # a tie keeps the lower class, as argmax does
            pred, best = torch.where(better, i + g, pred), torch.maximum(best, m)
        if log_probs:
            part_lse = torch.logsumexp(up, -1)
            lse = part_lse if lse is None else torch.logaddexp(lse, part_lse)
        if y is not None:
            inside = (y >= g) & (y < g + up.shape[-1])
            value = up.gather(-1, (y - g).clamp(0, up.shape[-1] - 1)[..., None])[..., 0]
            picked = torch.where(inside, value, torch.zeros_like(value) if picked is None else picked)
    if not log_probs:
        return pred, None, None
    return pred, best - lse, None if y is None else picked - lse


_SCORED: list[Any] = [None]  # the last scores: (weakly) their logits and targets, the versions and k, the scores


def pixel_scores(logits: torch.Tensor, targets: torch.Tensor, k: int, with_loss: bool = True) -> dict[str, Any]:
    """Of the first ``k`` channels of ``logits`` (a mask classifier's loss channel after them left out): ``cm``:
    K x K pixel counts (true class, predicted class) over every non-ignored pixel; ``loss``: the mean
    cross-entropy over them (NaN when none, or without ``with_loss``); ``correct`` / ``pixels``: each image's right
    and scored pixels. Read in chunks of images (``per_pixel``); kept for the same, unchanged ``logits`` and
    ``targets`` (the metrics, the report and its mistakes of one evaluation read them once)."""
    key = (k, logits._version, targets._version)
    kept = _SCORED[0]
    if (kept is not None and kept[0]() is logits and kept[1]() is targets and kept[2] == key
            and (kept[3]["has_loss"] or not with_loss)):
        return kept[3]
    cm = torch.zeros(k * k, dtype=torch.int64)
    total, n = 0.0, 0
    correct, pixels = [], []
    chunk = max(1, SCORE_ELEMENTS // max(1, k * targets[0].numel())) if len(targets) else 1
    for s in range(0, len(targets), chunk):
        y = targets[s:s + chunk].long()
        pred, _, picked = per_pixel(logits[s:s + chunk, :k], y.shape[-2:], y, log_probs=with_loss)
        keep = y != IGNORE
        cm += torch.bincount(y[keep] * k + pred[keep], minlength=k * k)
        correct.append(((pred == y) & keep).sum((1, 2)))
        pixels.append(keep.sum((1, 2)))
        if with_loss:
            total -= float(picked[keep].double().sum())
            n += int(keep.sum())
    out = {"cm": cm.view(k, k).numpy(), "loss": total / n if n else float("nan"), "has_loss": with_loss,
           "correct": torch.cat(correct).numpy() if correct else np.zeros(0, int),
           "pixels": torch.cat(pixels).numpy() if pixels else np.zeros(0, int)}
    _SCORED[0] = (weakref.ref(logits), weakref.ref(targets), key, out)
    return out


def confusion(logits: torch.Tensor, targets: torch.Tensor, k: int) -> np.ndarray:
    """K x K pixel counts (true class, predicted class) over every non-ignored pixel."""
    return pixel_scores(logits, targets, k, with_loss=False)["cm"]


def scores(cm: np.ndarray) -> dict[str, Any]:
    """Per-class IoU and Dice (NaN for a class neither in the truth nor predicted), pixel accuracy,
    and each class's pixels in the truth."""
    tp = np.diag(cm).astype(float)
    gt, pr = cm.sum(1).astype(float), cm.sum(0).astype(float)
    union = gt + pr - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        dice = np.where(gt + pr > 0, 2 * tp / (gt + pr), np.nan)
    total = cm.sum()
    return {"iou": iou, "dice": dice, "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "support": gt.astype(int)}


def mask_png(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_mask_png(text: str) -> np.ndarray:
    """A ``mask_png`` value (what predict and serve return) as a (H, W) array of class indices."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@TASKS.register("segmentation")
class Segmentation(DenseTask):
    name = "segmentation"
    description = "semantic segmentation: a class per pixel (class-index mask PNGs), mean IoU"
    default_metric = "miou"
    metric_names = ("miou", "pixel_accuracy", "dice", "loss")
    dense_head = "lraspp"
    capabilities = frozenset({"save_images", "robustness", "explain"})
    # train.baseline trains the decoder on the frozen backbone (DenseTask); fmtune evaluate --baseline fits this
    # quicker probe
    baseline_method = ("linear probe (scikit-learn logistic regression) per cell of the frozen pretrained backbone's "
                       "last feature map, resized to the mask")

    # --- reading data ------------------------------------------------------------------------
    @classmethod
    def read_file(cls, path, data_cfg):
        return read_segmentation(path, data_cfg)

    @classmethod
    def target_column(cls, data_cfg):
        return data_cfg.mask_column

    @classmethod
    def require_targets(cls, df, data_cfg):
        if data_cfg.mask_column not in df.columns:
            src = df.attrs.get("source", "the data")
            raise DataError(f"{src}: no masks: segmentation data is a folder with images/ and masks/ (same file "
                            f"names), or a table with a mask path column (data.mask_column, now "
                            f"{data_cfg.mask_column!r}; columns are: {', '.join(map(str, df.columns))})")

    @classmethod
    def options_from(cls, task_cfg, data_cfg):
        return {"column": data_cfg.mask_column, "classes": task_cfg.classes, "mask_format": task_cfg.mask_format,
                "ignore_index": task_cfg.ignore_index}

    @classmethod
    def from_train(cls, values, df, column="mask", classes=None, mask_format="auto", ignore_index=IGNORE, **kw):
        seen = mask_values(df, column)
        binary = mask_format == "binary" or (mask_format == "auto" and 255 in seen and seen <= {0, 255})
        names = cls.class_names(classes) or list(df.attrs.get("classes") or [])  # (a COCO file names its own)
        if not names:  # a dataset folder may name its classes
            names = listed_classes(Path(str(df.attrs.get("source", ""))))
        if binary:
            names = names or ["background", "foreground"]
            if len(names) != 2:
                raise ConfigError(f"task.classes: binary masks (0/255) have 2 classes; {len(names)} were named")
            how = ("masks hold only 0 and 255: read as binary, 0 = background, 255 = foreground (task.mask_format="
                   "index reads 255 as ignore)" if mask_format == "auto" else
                   "task.mask_format=binary: 0 = background, above 127 = foreground")
        else:
            labelled = sorted(v for v in seen if v != ignore_index)
            if not labelled:
                raise DataError(f"{df.attrs.get('source')}: every mask pixel is the ignore value {ignore_index}; "
                                "nothing to learn")
            if not names:
                names = [str(i) for i in range(labelled[-1] + 1)]
            how = (f"masks read as class indices 0..{len(names) - 1}, value 0 = {names[0]!r}"
                   + (f", {ignore_index} = ignore (not trained or scored)" if ignore_index >= 0 else ""))
            if len(names) > 255 or (ignore_index < 0 and len(names) > 255):
                raise ConfigError("task.classes: at most 255 classes (mask values are 8-bit; 255 is the ignore value)")
        task = cls(names, binary255=binary, ignore_index=ignore_index, how=how, **kw)
        missing = [names[v] for v in range(len(names)) if v not in seen] if not binary else []
        if missing:
            task.options["absent"] = missing
        return task

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def notes(self) -> list[str]:
        out = super().notes()
        if self.options.get("absent"):
            out.append(f"classes never seen in the training masks: {', '.join(self.options['absent'][:10])}")
        return out

    def _encode(self, mask: np.ndarray, where: str) -> np.ndarray:
        return encode_mask(mask, self.options.get("binary255", False), self.num_classes,
                           self.options.get("ignore_index", IGNORE), where)

    def dataset(self, df, bundle, data_cfg, with_targets=True, allow_unknown=False):
        mask_col = self.target_column(data_cfg) if with_targets else None
        if with_targets:
            self.require_targets(df, data_cfg)
        encode = self._encode
        named = list(df.attrs.get("classes") or [])  # a COCO file's or a colour map's own classes, in its order
        if with_targets and named and named != self.labels and set(named) <= set(self.labels):
            lut = np.arange(256, dtype=np.uint8)  # its values as the run's classes of the same names
            lut[: len(named)] = [self.labels.index(n) for n in named]
            encode = lambda mask, where: self._encode(lut[mask], where)  # noqa: E731
        return seg_dataset(df, data_cfg.image_column, mask_col, bundle.image, encode), np.arange(len(df))

    def image_input(self, source, bundle):
        from fmtune.data.dataset import load_rgb
        from fmtune.data.masks import resize_image

        img = load_rgb(source)  # PIL's errors: the predictor names the input
        return resize_image(img, int(bundle.image["size"])), img.size

    def inputs(self, items, bundle):
        from fmtune.data.masks import SegData

        return SegData(torch.stack([x for x, _ in items]), None, [s for _, s in items], bundle.image,
                       [f"image {i}" for i in range(len(items))])

    # --- training and evaluation -----------------------------------------------------------------
    def class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, K[+1], h, w) without a mask classifier's loss channel (``models.whole.MaskSegmenter``:
        one channel after the classes, given where its batch carried the masks)."""
        return logits[:, :self.num_classes]

    def loss(self, logits, targets, weights=None):
        if logits.shape[1] > self.num_classes:  # a mask classifier's own loss, in its last channel
            return logits[:, -1].float().mean()
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(upsample(logits, targets.shape[-2:]), targets.long(), weight=w, ignore_index=IGNORE)

    def metrics(self, logits, targets):
        scored = pixel_scores(logits, targets, self.num_classes)
        cm, loss = scored["cm"], scored["loss"]
        if logits.shape[1] > self.num_classes:  # a mask classifier's own loss: what it trains on
            loss = float(logits[:, -1, 0, 0].float().mean())
        return {**self._summary(scores(cm)), "loss": loss}

    def output_difference(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return super().output_difference(self.class_logits(a), self.class_logits(b))

    def _summary(self, s: dict[str, Any]) -> dict[str, float]:
        """mIoU, pixel accuracy and Dice from ``scores``."""
        seen = ~np.isnan(s["iou"])  # in the truth or in the prediction: a class only predicted counts as IoU 0
        return {"miou": float(np.mean(s["iou"][seen])) if seen.any() else float("nan"),
                "pixel_accuracy": s["pixel_accuracy"],
                # binary: the foreground's Dice (the usual figure; 0 when neither has any); else the mean
                "dice": float(np.nan_to_num(s["dice"][1])) if self.num_classes == 2 else
                float(np.mean(s["dice"][seen])) if seen.any() else float("nan")}

    # --- output ------------------------------------------------------------------------------
    def predicted_masks(self, logits: torch.Tensor, sizes: list[tuple[int, int]]) -> list[tuple[np.ndarray, float]]:
        """Per image: the class of every pixel at the image's own size, and the mean confidence."""
        out, logits = [], self.class_logits(logits)
        for i, (w, h) in enumerate(sizes):
            cls, log_p, _ = per_pixel(logits[i:i + 1], (h, w), log_probs=True)
            out.append((cls[0].to(torch.uint8).numpy(), float(log_p.exp().mean())))
        return out

    def postprocess(self, logits, ds=None):
        out = []
        for mask, conf in self.predicted_masks(logits, ds.sizes):
            counts = np.bincount(mask.ravel(), minlength=self.num_classes)
            share = {self.labels[c]: round(float(n / mask.size), 4) for c, n in enumerate(counts) if n}
            out.append({"classes": share, "score": round(conf, 4), "width": int(mask.shape[1]),
                        "height": int(mask.shape[0]), "mask_png": mask_png(mask)})
        return out

    def prediction_columns(self):
        return ["classes", "score", "mask_png"]

    def flatten(self, record):
        return {k: record[k] for k in self.prediction_columns()}

    hf_parameters = ("subtask",)

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        """The Inference API's image segmentation, as transformers' pipeline answers for a semantic model: one
        entry per class predicted somewhere, in class order, {label, score: null, mask: a base64 PNG, 255 where
        that class is and 0 elsewhere, at the image's size}. ``subtask``: semantic (instance and panoptic masks
        are not what this model predicts)."""
        sub = parameters.get("subtask")
        if sub is not None and sub != "semantic":
            raise DataError(f"parameters.subtask {sub!r}: this run segments semantically (a class per pixel); "
                            "ask for 'semantic' or leave it out")
        mask = decode_mask_png(record["mask_png"])
        return [{"label": self.labels[int(k)], "score": None, "mask": mask_png((mask == k).astype(np.uint8) * 255)}
                for k in np.unique(mask)]

    def write_files(self, out, column, base, folder, taken):
        """Each predicted mask as ``folder/<image name>.png`` (class indices) and
        ``<image name>_overlay.jpg`` (classes painted over the image); ``mask_png`` names the file."""
        from fmtune.data.masks import open_image

        files: list[str | None] = [None] * len(out)
        for i, path, stem in self.output_files(out, column, "mask_png", base, taken):
            mask = decode_mask_png(out["mask_png"].iloc[i])
            Image.fromarray(mask).save(folder / f"{stem}.png")
            image = np.asarray(open_image(path))
            Image.fromarray(overlay(image, mask, self.num_classes)).save(folder / f"{stem}_overlay.jpg", quality=90)
            files[i] = str(folder / f"{stem}.png")
        return out.assign(mask_png=files).rename(columns={"mask_png": "mask_file"})

    # --- explain (fmtune.explain_dense) ---------------------------------------------------------
    def explain_target(self, logits: torch.Tensor, target: int | None) -> tuple[int, float, torch.Tensor]:
        """The class to explain in one image's logits (``target``, else the largest class predicted
        besides class 0), its share of the image, and the region predicted as it."""
        pred = logits[:self.num_classes].argmax(0)
        counts = torch.bincount(pred.flatten(), minlength=self.num_classes)
        if target is None:
            rest = counts.clone()
            rest[0] = 0
            target = int(rest.argmax()) if rest.sum() else 0
        return target, round(float(counts[target]) / pred.numel(), 4), pred == target

    def class_scores(self, logits: torch.Tensor, regions: torch.Tensor | None) -> torch.Tensor:
        """(B, K): each class's mean logit over the explained region (all pixels if it is empty)."""
        logits = self.class_logits(logits)
        m = regions.to(logits.dtype)[:, None]
        m = torch.where(m.sum((2, 3), keepdim=True) > 0, m, torch.ones_like(m))
        return (logits * m).sum((2, 3)) / m.sum((2, 3))

    # --- the test report ---------------------------------------------------------------------
    def text_report(self, logits, targets) -> str:
        s = scores(confusion(logits, targets, self.num_classes))
        width = max(12, *(len(n) for n in self.labels))
        lines = [f"{'class':>{width}}  {'IoU':>7}  {'Dice':>7}  {'pixels':>10}"]
        for i, name in enumerate(self.labels):
            iou, dice = s["iou"][i], s["dice"][i]
            lines.append(f"{name:>{width}}  {iou:7.4f}  {dice:7.4f}  {s['support'][i]:10d}" if not np.isnan(iou)
                         else f"{name:>{width}}  {'-':>7}  {'-':>7}  {s['support'][i]:10d}")
        m = self._summary(s)
        lines.append(f"\nmean IoU {m['miou']:.4f} (over the {int((~np.isnan(s['iou'])).sum())} classes in the truth "
                     f"or the prediction), pixel "
                     f"accuracy {m['pixel_accuracy']:.4f}, Dice {m['dice']:.4f}")
        lines.append(self.options.get("how", ""))
        return "\n".join(lines) + "\n"

    def report_files(self, logits, targets, folder: Path, title: str) -> dict[str, Any]:
        from fmtune import plots

        cm = confusion(logits, targets, self.num_classes)
        s = scores(cm)
        per_class = {n: {"iou": None if np.isnan(s["iou"][i]) else round(float(s["iou"][i]), 6),
                         "dice": None if np.isnan(s["dice"][i]) else round(float(s["dice"][i]), 6),
                         "pixels": int(s["support"][i])} for i, n in enumerate(self.labels)}
        path = plots.confusion_matrix(cm, self.labels, folder / "confusion_matrix.png", f"{title}: pixels")
        return {"confusion_matrix": path.name, "per_class": per_class}

    def mistakes(self, logits, targets, ds, bundle, png: Path, k: int = 8) -> list[dict[str, Any]]:
        """The ``k`` test images with the lowest pixel accuracy: image, truth and prediction side by side."""
        if not len(targets):
            return []
        scored = pixel_scores(logits, targets, self.num_classes, with_loss=False)
        acc = [float(c / n) if n else 1.0 for c, n in zip(scored["correct"], scored["pixels"])]
        worst = np.argsort(acc, kind="stable")[:k]
        gallery(ds, self.class_logits(logits), targets, worst, png, self.num_classes,
                [f"{ds.names[i]}: {acc[i]:.2f}" for i in worst])
        return [{"image": ds.names[i], "pixel_accuracy": round(acc[i], 4)} for i in worst]

    # --- the baseline: a linear probe on frozen feature-map cells -------------------------------
    def _cell_labels(self, targets: torch.Tensor, h: int, w: int) -> np.ndarray:
        return F.interpolate(targets[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().numpy()

    def fit_probe(self, x, targets, seed):
        import warnings

        from sklearn.linear_model import LogisticRegression

        from fmtune.tasks.probe import scaled

        n, d, h, w = x.shape
        y = self._cell_labels(targets if isinstance(targets, torch.Tensor) else torch.as_tensor(targets), h, w)
        y = y.reshape(-1)
        keep = np.flatnonzero(y != IGNORE)
        rng = np.random.default_rng(seed)
        if len(keep) > PROBE_PIXELS:
            keep = np.sort(rng.choice(keep, PROBE_PIXELS, replace=False))
        image, cell = np.divmod(keep, h * w)
        feats = np.asarray(x).reshape(n, d, h * w)[image, :, cell]  # only the sampled cells: (cells, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return scaled(LogisticRegression(C=0.1, max_iter=300)).fit(feats, y[keep])

    def probe_logits(self, probe, x):
        n, d, h, w = x.shape
        out = output_tensor((n, self.num_classes, h, w))
        step = max(1, SCORE_ELEMENTS // (max(d, self.num_classes) * h * w))
        for s in range(0, n, step):
            cells = np.asarray(x[s:s + step]).transpose(0, 2, 3, 1).reshape(-1, d)
            proba = np.full((len(cells), self.num_classes), 1e-12)
            proba[:, probe.classes_] = probe.predict_proba(cells)
            log_p = torch.from_numpy(np.log(proba)).float().view(-1, h, w, self.num_classes)
            out[s:s + step] = log_p.permute(0, 3, 1, 2)
        return out


def palette(k: int) -> np.ndarray:
    """A colour per class (class 0 black), for overlays and galleries."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    colours = [(0, 0, 0)] + [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(max(k - 1, 0))]
    return np.array(colours, dtype=np.uint8)


def overlay(image: np.ndarray, mask: np.ndarray, k: int, alpha: float = 0.5) -> np.ndarray:
    """The image (H, W, 3 uint8) with each non-background class painted over it."""
    col = palette(k)[np.minimum(mask, k - 1)]
    out = image.astype(np.float32)
    fg = (mask > 0) & (mask != IGNORE)
    out[fg] = (1 - alpha) * out[fg] + alpha * col[fg]
    return out.astype(np.uint8)


def gallery(ds: Any, logits: torch.Tensor, targets: torch.Tensor, idx: Any, png: Path, k: int,
            titles: list[str]) -> None:
    """Rows of image | truth | prediction for the images ``idx``."""
    from fmtune.plots import pyplot, save_atomic

    plt = pyplot()
    fig, axes = plt.subplots(len(idx), 3, figsize=(7.5, 2.5 * len(idx)), squeeze=False)
    for row, i in enumerate(idx):
        img = ds.raw([int(i)])[0].permute(1, 2, 0).numpy()
        y = targets[int(i)].numpy()
        pred = per_pixel(logits[int(i):int(i) + 1], y.shape[-2:])[0][0].numpy().astype(np.uint8)
        for col, (im, t) in enumerate(((img, titles[row]), (overlay(img, y, k), "truth"),
                                       (overlay(img, pred, k), "prediction"))):
            axes[row, col].imshow(im)
            axes[row, col].set_title(t, fontsize=8)
            axes[row, col].axis("off")
    fig.tight_layout()
    save_atomic(fig, png)
