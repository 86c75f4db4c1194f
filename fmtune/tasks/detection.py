"""Object detection: labelled boxes, scored with COCO mAP (pycocotools).

Data: COCO JSON, YOLO or Pascal VOC (``fmtune.data.boxes``), letterboxed to the model's square
input with the boxes. The model (``fmtune.models.dense.DetectionModel``: a feature pyramid and an
FCOS head) gives, per location, class logits, a box and a centre-ness logit. Training assigns each
location inside a box's centre region (1.5 strides) and within its level's size range to the
smallest such box (FCOS); the losses are sigmoid focal loss (classes, every location), GIoU
(boxes, weighted by the centre-ness target), binary cross-entropy (centre-ness), and a softmax
cross-entropy over the classes at the positive locations: FCOS's focal loss alone learns "an
object is here" long before "which one" (digit-scenes, 4 epochs: test mAP 0.066 without it, 0.196
with it; mAP with the classes merged 0.44 and 0.35). Decoding: scores = class
probability x centre-ness, above ``task.score_threshold``, non-maximum suppression per class
(``task.nms_iou``), at most ``task.max_detections`` per image, in torch. Those are what mAP scores; predict
and serve return the boxes scoring at least ``task.threshold``, which ``task.thresholds=auto`` chooses after
training: the score of the best F1 of boxes on the validation images (``box_matches``, ``best_f1_cut``).
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmtune.data.boxes import box_dataset, read_detection, yolo_splits
from fmtune.errors import ConfigError, DataError
from fmtune.tasks.base import TASKS
from fmtune.tasks.dense import DenseTask

CENTER_RADIUS = 1.5  # strides around a box's centre whose locations may be its positives
TOP_K = 1000  # candidates per image before NMS
CLASS_WEIGHT = 1.0  # of the softmax cross-entropy over classes at positive locations (see Detection.loss)
# a whole transformers detector's outputs (fmtune.models.whole.SetDetector) have this many channels after the
# K class logits: the FCOS head's 8 and the detector's own loss
SET_EXTRA = 9
MATCH_IOU = 0.5  # a predicted box is right where it overlaps a true box of its class by this IoU (PASCAL VOC's)
MIN_TRUE_BOXES = 5  # true boxes the validation images need for the prediction threshold to be chosen on them


def level_ranges(strides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The box-size range (the largest distance from a location to a side) each level predicts:
    up to 8 strides on the finest level, from 4 to 8 strides on the middle, above 4 on the coarsest."""
    s = strides
    finest, coarsest = float(s.min()), float(s.max())
    lo = torch.where(s == finest, torch.zeros_like(s), 4 * s)
    hi = torch.where(s == coarsest, torch.full_like(s, float("inf")), 8 * s)
    return lo, hi


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def box_matches(dets: list[tuple[np.ndarray, np.ndarray, np.ndarray]], targets: torch.Tensor,
                iou: float = MATCH_IOU) -> tuple[np.ndarray, np.ndarray, int]:
    """Every detection's score and whether it is right: it overlaps a true box of its class by ``iou`` or more that
    no better-scored detection took (each true box is found once, best scores first, as COCO matches). Also the
    number of true boxes. A crowd region (COCO's iscrowd) is not a box to find, and a detection mostly inside one
    of its class (intersection over the detection's area >= ``iou``) is neither right nor wrong: left out."""
    scores, hits, n_true = [], [], 0
    for (b, s, c), t in zip(dets, targets):
        t = t[t[:, 0] >= 0].float()
        crowd = t[:, 5] > 0
        n_true += int((~crowd).sum())
        for k in np.unique(c):
            mine = np.nonzero(c == k)[0]
            mine = mine[np.argsort(-s[mine], kind="stable")]
            boxes = torch.as_tensor(b[mine], dtype=torch.float32).reshape(-1, 4)
            truth, regions = t[(t[:, 0] == k) & ~crowd, 1:5], t[(t[:, 0] == k) & crowd, 1:5]
            overlap = box_iou(boxes, truth).numpy()
            inside = np.zeros(len(boxes), bool)
            if len(regions):
                lt = torch.max(boxes[:, None, :2], regions[None, :, :2])
                rb = torch.min(boxes[:, None, 2:], regions[None, :, 2:])
                area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=1e-9)
                inside = ((rb - lt).clamp(min=0).prod(-1).amax(1) / area >= iou).numpy()
            free = np.ones(len(truth), bool)
            for j, d in enumerate(mine):
                best = np.where(free, overlap[j], -1.0)
                if len(best) and best.max() >= iou:
                    free[int(best.argmax())] = False
                    scores.append(s[d])
                    hits.append(True)
                elif not inside[j]:
                    scores.append(s[d])
                    hits.append(False)
    return np.asarray(scores, np.float64), np.asarray(hits, bool), n_true


def best_f1_cut(scores: np.ndarray, hits: np.ndarray, n_true: int) -> dict[str, float] | None:
    """The lowest score a box needs for the best F1 of boxes (right boxes against every box kept and every true
    box; ``box_matches``), with that F1, precision and recall; the higher cut where two give the same F1. None
    without a right box."""
    if not n_true or not hits.any():
        return None
    order = np.argsort(-scores, kind="stable")
    s, h = scores[order], hits[order]
    tp, kept = np.cumsum(h), np.arange(1, len(h) + 1)
    f1 = np.where(np.r_[s[1:] != s[:-1], True], 2 * tp / (kept + n_true), -1.0)  # cuts between different scores
    i = int(f1.argmax())
    return {"threshold": float(s[i]), "f1": float(f1[i]), "precision": float(tp[i] / kept[i]),
            "recall": float(tp[i] / n_true)}


def f1_at(scores: np.ndarray, hits: np.ndarray, n_true: int, threshold: float) -> dict[str, float]:
    """F1, precision and recall of the boxes scoring at least ``threshold`` (``box_matches``)."""
    keep = scores >= threshold
    tp, kept = int(hits[keep].sum()), int(keep.sum())
    return {"f1": 2 * tp / max(1, kept + n_true), "precision": tp / kept if kept else 0.0,
            "recall": tp / n_true if n_true else 0.0}


def nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by non-maximum suppression within each class, best score first (classes are
    kept apart by shifting each class's boxes to a region of its own)."""
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long)
    shifted = boxes + classes[:, None].to(boxes.dtype) * (boxes.max() + 1)
    order = scores.argsort(descending=True)
    overlap = box_iou(shifted[order], shifted[order])
    keep = torch.ones(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= overlap[i, i + 1:] <= iou
    return order[keep]


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(-1)
    area_t = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(-1)
    union = area_p + area_t - inter
    iou = inter / union.clamp(min=1e-9)
    hull = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=0).prod(-1)
    return 1 - (iou - (hull - union) / hull.clamp(min=1e-9))


@TASKS.register("detection")
class Detection(DenseTask):
    name = "detection"
    description = "object detection: labelled boxes (COCO JSON, YOLO, Pascal VOC), COCO mAP"
    default_metric = "map"
    metric_names = ("map", "map50", "map75", "loss")
    capabilities = frozenset({"save_images", "robustness", "explain", "thresholds"})
    thresholds_unchosen = f"fewer than {MIN_TRUE_BOXES} true boxes, or no box found"
    # measured on digit-scenes (MobileNetV2, 400 images): a head lr of 1e-2 (20x lr) left the FCOS towers at val
    # mAP 0.010 after an epoch, 1e-3 reached 0.042 (0.055 at 3 epochs against 0.049)
    default_head_lr = 1e-3
    dense_head = "fcos"

    # --- reading data ------------------------------------------------------------------------
    @classmethod
    def read_file(cls, path, data_cfg):
        return read_detection(path, data_cfg)

    @classmethod
    def target_column(cls, data_cfg):
        return "boxes"

    @classmethod
    def splits_of(cls, train):
        return yolo_splits(train)

    @classmethod
    def require_targets(cls, df, data_cfg):
        if "boxes" not in df.columns:
            raise DataError(f"{df.attrs.get('source', 'the data')}: no annotations; detection data is a COCO JSON "
                            "file, a YOLO dataset YAML or images/ folder with labels/ beside it, or a Pascal VOC "
                            "folder (Annotations/, JPEGImages/)")

    @classmethod
    def options_from(cls, task_cfg, data_cfg):
        return {"classes": task_cfg.classes, "score_threshold": task_cfg.score_threshold,
                "nms_iou": task_cfg.nms_iou, "max_detections": task_cfg.max_detections, "threshold": task_cfg.threshold}

    @classmethod
    def from_train(cls, values, df, classes=None, **kw):
        names = cls.class_names(classes)
        seen = sorted({lab for labels in df["labels"] for lab in labels})
        if not names:
            names = list(df.attrs.get("classes") or seen)
        if not seen:
            raise DataError(f"{df.attrs.get('source')}: no boxes in the training data")
        unknown = [s for s in seen if s not in names]
        if unknown:
            raise DataError(f"{df.attrs.get('source')}: class {unknown[0]!r} is not one of the declared classes "
                            f"({', '.join(names[:20])})")
        n_boxes = sum(len(b) for b in df["boxes"])
        task = cls(names, **kw)
        task.options["how"] = (f"{n_boxes} boxes of {len(seen)} classes in {len(df)} training images "
                               f"({sum(1 for b in df['boxes'] if not len(b))} without objects)")
        return task

    def dataset(self, df, bundle, data_cfg, with_targets=True, allow_unknown=False):
        if with_targets:
            self.require_targets(df, data_cfg)
        return box_dataset(df, data_cfg.image_column, bundle.image, self.labels, with_targets), np.arange(len(df))

    def image_input(self, source, bundle):
        from fmtune.data.boxes import letterbox
        from fmtune.data.dataset import load_rgb

        img = load_rgb(source)  # PIL's errors: the predictor names the input
        tensor, scale, _ = letterbox(img, int(bundle.image["size"]))
        return tensor, scale, img.size

    def inputs(self, items, bundle):
        from fmtune.data.boxes import BoxData

        return BoxData(torch.stack([x for x, _, _ in items]), None, [s for _, s, _ in items],
                       [z for _, _, z in items], bundle.image, [f"image {i}" for i in range(len(items))])

    # --- training --------------------------------------------------------------------------------
    def _whole(self, logits: torch.Tensor) -> bool:
        """Whether ``logits`` are a whole transformers detector's (SET_EXTRA channels after the classes)."""
        return logits.shape[-1] == self.num_outputs + SET_EXTRA

    def _split(self, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = self.num_outputs
        return (logits[..., :k], logits[..., k:k + 4], logits[..., k + 4], logits[..., k + 5], logits[..., k + 6],
                logits[..., k + 7])

    def assign(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per location: the index of its box (-1: background), whether it is ignored, and the
        box (B, L, 4)."""
        _, _, _, px, py, st = self._split(logits.detach())
        b, n = px.shape
        lo, hi = level_ranges(st)
        gt = targets[..., 1:5]  # (B, M, 4)
        valid = targets[..., 0] >= 0
        l_ = px[..., None] - gt[:, None, :, 0]
        t_ = py[..., None] - gt[:, None, :, 1]
        r_ = gt[:, None, :, 2] - px[..., None]
        b_ = gt[:, None, :, 3] - py[..., None]
        ltrb = torch.stack([l_, t_, r_, b_], -1)  # (B, L, M, 4)
        inside = ltrb.min(-1).values > 0
        cx, cy = (gt[..., 0] + gt[..., 2]) / 2, (gt[..., 1] + gt[..., 3]) / 2
        rad = CENTER_RADIUS * st[..., None]
        central = ((px[..., None] - cx[:, None]).abs() < rad) & ((py[..., None] - cy[:, None]).abs() < rad)
        reach = ltrb.max(-1).values
        in_range = (reach >= lo[..., None]) & (reach <= hi[..., None])
        ok = inside & central & in_range & valid[:, None, :]
        area = ((gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1]))[:, None, :].expand(b, n, -1)
        area = torch.where(ok, area, torch.full_like(area, float("inf")))
        best_area, best = area.min(-1)
        match = torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))
        ignored_box = targets[..., 5] > 0
        ignored = (match >= 0) & torch.gather(ignored_box, 1, match.clamp(min=0))
        boxes = torch.gather(gt, 1, match.clamp(min=0)[..., None].expand(-1, -1, 4))
        return match, ignored, boxes

    def loss(self, logits, targets, weights=None):
        if self._whole(logits):  # a whole detector: its own loss, in its last channel
            return logits[..., -1].float().sum(1).mean()
        logits, targets = logits.float(), targets.to(logits.device).float()
        cls, box, ctr, px, py, _ = self._split(logits)
        match, ignored, gt = self.assign(logits, targets)
        pos = (match >= 0) & ~ignored
        labels = torch.gather(targets[..., 0], 1, match.clamp(min=0)).long()
        onehot = torch.zeros_like(cls)
        onehot[pos] = F.one_hot(labels[pos], self.num_outputs).to(cls.dtype)
        keep = ~ignored
        n_pos = max(1.0, float(pos.sum()))
        focal = _sigmoid_focal(cls[keep], onehot[keep]).sum() / n_pos
        if not pos.any():
            return focal + 0.0 * box.sum() + 0.0 * ctr.sum()
        g = gt[pos]
        lt = torch.stack([px[pos] - g[:, 0], py[pos] - g[:, 1]], 1)
        rb = torch.stack([g[:, 2] - px[pos], g[:, 3] - py[pos]], 1)
        centerness = torch.sqrt((torch.min(lt[:, 0], rb[:, 0]) / torch.max(lt[:, 0], rb[:, 0]).clamp(min=1e-6))
                                * (torch.min(lt[:, 1], rb[:, 1]) / torch.max(lt[:, 1], rb[:, 1]).clamp(min=1e-6)))
        box_loss = (giou_loss(box[pos], g) * centerness).sum() / centerness.sum().clamp(min=1e-6)
        ctr_loss = F.binary_cross_entropy_with_logits(ctr[pos], centerness, reduction="sum") / n_pos
        # which class, at the positive locations: softmax cross-entropy (a plain K-way classification)
        class_loss = F.cross_entropy(cls[pos], labels[pos])
        return focal + box_loss + ctr_loss + CLASS_WEIGHT * class_loss

    # --- decoding and metrics --------------------------------------------------------------------
    def detections(self, logits: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: boxes (input pixels), scores and class ids after the threshold and NMS."""
        cls, box, ctr, _, _, _ = self._split(logits.float())
        thr = float(self.options.get("score_threshold", 0.05))
        whole = self._whole(logits)  # a whole detector: its own class probabilities
        out = []
        for i in range(len(logits)):
            scores = cls[i].sigmoid() if whole else torch.sqrt(cls[i].sigmoid() * ctr[i].sigmoid()[:, None])  # (L, K)
            flat = scores.flatten()
            cand = torch.nonzero(flat > thr).flatten()
            if len(cand) > TOP_K:
                cand = cand[flat[cand].topk(TOP_K).indices]
            loc, c = cand // self.num_outputs, cand % self.num_outputs
            b, s = box[i, loc], flat[cand]
            kept = nms(b, s, c, float(self.options.get("nms_iou", 0.6)))[: int(self.options.get("max_detections", 100))]
            out.append((b[kept].numpy(), s[kept].numpy(), c[kept].numpy()))
        return out

    def output_difference(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """A whole detector's queries are a set: RT-DETR and its successors take the top-k of per-location scores,
        and where two scores tie to float precision another runtime may take them in the other order, which permutes
        the queries and changes nothing else. Each image's queries (class logits and box) are paired with the other
        output's (scipy's linear_sum_assignment on the largest difference) before they are compared."""
        if not self._whole(a):
            return super().output_difference(a, b)
        from scipy.optimize import linear_sum_assignment

        worst = 0.0
        for x, y in zip(a[..., :self.num_outputs + 4].float(), b[..., :self.num_outputs + 4].float()):
            cost = ((x[:, None] - y[None]).abs() / x[:, None].abs().clamp(min=1.0)).amax(-1).numpy()
            rows, cols = linear_sum_assignment(cost)
            worst = max(worst, float(cost[rows, cols].max(initial=0.0)))
        return worst

    def _coco(self, logits: torch.Tensor, targets: torch.Tensor) -> Any:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        images, anns, dets = [], [], []
        for i in range(len(targets)):
            images.append({"id": i + 1})
            for row in targets[i]:
                if row[0] < 0:
                    continue
                x0, y0, x1, y1 = (float(v) for v in row[1:5])
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(row[0]) + 1,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                             "iscrowd": int(row[5] > 0)})
        for i, (b, s, c) in enumerate(self.detections(logits)):
            for bb, ss, cc in zip(b, s, c):
                dets.append({"image_id": i + 1, "category_id": int(cc) + 1, "score": float(ss),
                             "bbox": [float(bb[0]), float(bb[1]), float(bb[2] - bb[0]), float(bb[3] - bb[1])]})
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns,
                      "categories": [{"id": k + 1, "name": n} for k, n in enumerate(self.labels)]}
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
            if not dets:
                return None
            ev = COCOeval(gt, gt.loadRes(dets), "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return ev

    @staticmethod
    def _maps(ev: Any) -> dict[str, float]:
        """mAP@[.5:.95], @.5, @.75 of a COCO evaluation (0 without detections; COCO's -1, nothing to
        score, as 0)."""
        return {k: max(0.0, float(ev.stats[i])) if ev is not None else 0.0
                for i, k in enumerate(("map", "map50", "map75"))}

    def metrics(self, logits, targets):
        out = self._maps(self._coco(logits, targets))
        total = 0.0
        for i in range(0, len(targets), 32):
            total += float(self.loss(logits[i:i + 32], targets[i:i + 32])) * len(targets[i:i + 32])
        out["loss"] = total / max(1, len(targets))
        return out

    def any_class(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """mAP with every class merged into one: are the objects found (and only named wrongly)?"""
        k = self.num_outputs
        merged = torch.cat([logits[..., :k].max(-1, keepdim=True).values, logits[..., k:]], -1)
        t = targets.clone()
        t[..., 0] = torch.where(targets[..., 0] >= 0, 0.0, -1.0)
        m = self._maps(Detection(["object"], **{n: v for n, v in self.options.items() if n != "how"})._coco(merged, t))
        return {"map": round(m["map"], 6), "map50": round(m["map50"], 6)}

    def per_class_ap(self, ev: Any) -> dict[str, float | None]:
        """AP@[.5:.95] per class (all areas, 100 detections); None for a class without test boxes."""
        if ev is None:
            return {n: 0.0 for n in self.labels}
        prec = ev.eval["precision"][:, :, :, 0, -1]  # (IoU, recall, class)
        out = {}
        for k, n in enumerate(self.labels):
            p = prec[:, :, k]
            out[n] = None if (p == -1).all() else round(float(np.mean(p[p > -1])), 6)
        return out

    # --- the score predict and serve keep a box at (task.threshold) ---------------------------------
    def decision_thresholds(self) -> dict[str, float]:
        return {n: float(self.threshold) for n in self.labels}

    def choose_thresholds(self, logits: torch.Tensor, targets: torch.Tensor, metric: str) -> dict[str, Any] | None:
        """Set the score predict and serve keep a box at to the one of the best F1 of boxes on these (validation)
        images (``best_f1_cut``; mAP scores every box down to task.score_threshold, so ``metric`` is not moved by it
        and box F1 is what is chosen for). What was chosen, or None where the images hold fewer than
        MIN_TRUE_BOXES true boxes or no box is found (the threshold is left as it was)."""
        scores, hits, n_true = box_matches(self.detections(logits), targets)
        best = best_f1_cut(scores, hits, n_true) if n_true >= MIN_TRUE_BOXES else None
        if best is None:
            return None
        before = float(self.threshold)
        self.threshold = best["threshold"]
        return {"metric": "box_f1", "what": "the score from which predict returns a box", "rows": len(targets),
                "unit": "images", "true_boxes": n_true,
                "thresholds": self.decision_thresholds(),
                "before": {"threshold": before, "val_box_f1": round(f1_at(scores, hits, n_true, before)["f1"], 6)},
                "val_box_f1": round(best["f1"], 6), "val_box_precision": round(best["precision"], 6),
                "val_box_recall": round(best["recall"], 6)}

    def kept(self, scores: np.ndarray) -> np.ndarray:
        """Which of these box scores predict and serve return (at least task.threshold)."""
        return np.asarray(scores) >= float(self.threshold)

    # --- output ------------------------------------------------------------------------------
    def postprocess(self, logits, ds=None):
        out = []
        for (b, s, c), scale, (w, h) in zip(self.detections(logits), ds.scales, ds.sizes):
            boxes = []
            keep = self.kept(s)
            for bb, ss, cc in zip(b[keep] / scale, s[keep], c[keep]):
                x0, y0 = round(max(0.0, float(bb[0])), 1), round(max(0.0, float(bb[1])), 1)
                x1, y1 = round(min(float(w), float(bb[2])), 1), round(min(float(h), float(bb[3])), 1)
                if x1 > x0 and y1 > y0:  # a box on the padding, clipped to nothing, is no box
                    boxes.append({"label": self.labels[int(cc)], "score": round(float(ss), 4), "x0": x0, "y0": y0,
                                  "x1": x1, "y1": y1})
            out.append({"boxes": boxes, "count": len(boxes)})
        return out

    def prediction_columns(self):
        return ["boxes", "count"]

    def flatten(self, record):
        return {"boxes": record["boxes"], "count": record["count"]}

    hf_parameters = ("threshold",)

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        """The Inference API's object detection: [{label, score, box: {xmin, ymin, xmax, ymax}}] in the image's
        pixels (whole numbers, as transformers' pipeline gives them), best first; ``threshold``: only boxes scoring
        at least that (no lower than the run's own task.threshold, the boxes the record holds)."""
        cut = parameters.get("threshold")
        if cut is not None:
            if isinstance(cut, bool) or not isinstance(cut, (int, float)) or not 0 <= cut <= 1:
                raise DataError(f"parameters.threshold must be a number in [0, 1], got {cut!r}")
            if cut < float(self.threshold) - 1e-9:
                raise DataError(f"parameters.threshold {cut:g} is below this run's {float(self.threshold):.4g}: it "
                                "returns the boxes scoring at least that (its task.threshold; chosen on validation "
                                "unless task.thresholds=fixed); ask for that or more")
        corners = (("xmin", "x0"), ("ymin", "y0"), ("xmax", "x1"), ("ymax", "y1"))
        return [{"label": b["label"], "score": b["score"], "box": {k: int(round(b[v])) for k, v in corners}}
                for b in record["boxes"] if cut is None or b["score"] >= cut]

    def write_files(self, out, column, base, folder, taken):
        """Each image with its predicted boxes drawn, as ``folder/<image name>.jpg``."""
        from fmtune.data.masks import open_image

        files: list[str | None] = [None] * len(out)
        for i, path, stem in self.output_files(out, column, "boxes", base, taken):
            draw_boxes(open_image(path), out["boxes"].iloc[i], self.labels).save(folder / f"{stem}.jpg",
                                                                                     quality=90)
            files[i] = str(folder / f"{stem}.jpg")
        return out.assign(image_file=files)

    # --- explain (fmtune.explain_dense) ---------------------------------------------------------
    def explain_target(self, logits: torch.Tensor, target: int | None) -> tuple[int, float, None]:
        """The class to explain in one image's outputs (``target``, else the best box's) and that
        class's best score."""
        cls, _, ctr, _, _, _ = self._split(logits.float()[None])
        scores = torch.sqrt(cls[0].sigmoid() * ctr[0].sigmoid()[:, None]).max(0).values  # (K,)
        k = int(scores.argmax()) if target is None else target
        return k, round(float(scores[k]), 4), None

    def class_scores(self, logits: torch.Tensor, regions: None = None) -> torch.Tensor:
        """(B, K): each class's logit at its best location (the top box of that class)."""
        return logits[..., :self.num_outputs].max(1).values

    # --- the test report ---------------------------------------------------------------------
    def text_report(self, logits, targets) -> str:
        ev = self._coco(logits, targets)
        if ev is None:
            return "no detections above the score threshold\n"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ev.summarize()
        ap = self.per_class_ap(ev)
        width = max(8, *(len(n) for n in self.labels))
        counts = np.bincount(targets[..., 0][targets[..., 0] >= 0].long().numpy(), minlength=self.num_outputs)
        lines = [f"{'class':>{width}}  {'AP':>7}  {'boxes':>6}"] + [
            f"{n:>{width}}  {'-' if ap[n] is None else format(ap[n], '7.4f'):>7}  {counts[k]:6d}"
            for k, n in enumerate(self.labels)]
        merged = self.any_class(logits, targets)
        cut = self.at_threshold(logits, targets)
        return (buf.getvalue() + "\n" + "\n".join(lines) + f"\n\nwith the classes merged into one (are objects found, "
                f"whatever their class?): mAP {merged['map']:.4f}, mAP@.5 {merged['map50']:.4f}\n"
                f"the boxes predict returns (score >= {cut['threshold']:.4g}; right: IoU >= {MATCH_IOU} with a true "
                f"box of its class): precision {cut['precision']:.4f}, recall {cut['recall']:.4f}, "
                f"F1 {cut['f1']:.4f}\n")

    def at_threshold(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Precision, recall and F1 of the boxes predict returns (``kept``), with the threshold."""
        scores, hits, n_true = box_matches(self.detections(logits), targets)
        got = f1_at(scores, hits, n_true, float(self.threshold))
        return {"threshold": round(float(self.threshold), 6), **{k: round(v, 6) for k, v in got.items()}}

    def report_files(self, logits, targets, folder: Path, title: str) -> dict[str, Any]:
        from fmtune.plots import pyplot, save_atomic

        ev = self._coco(logits, targets)
        if ev is None:
            return {"per_class_ap": self.per_class_ap(None), "at_threshold": self.at_threshold(logits, targets)}
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4.5))
        recall = np.linspace(0, 1, 101)
        for iou_i, name in ((0, "IoU 0.50"), (5, "IoU 0.75")):
            p = ev.eval["precision"][iou_i, :, :, 0, -1]
            p = np.where(p < 0, np.nan, p)
            ax.plot(recall, np.nanmean(p, axis=1), label=f"{name} (mean over classes)")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"{title}: precision-recall (test)")
        ax.legend()
        fig.tight_layout()
        save_atomic(fig, folder / "precision_recall.png")
        return {"per_class_ap": self.per_class_ap(ev), "precision_recall": "precision_recall.png",
                "any_class": self.any_class(logits, targets), "at_threshold": self.at_threshold(logits, targets)}

    def mistakes(self, logits, targets, ds, bundle, png: Path, k: int = 6) -> list[dict[str, Any]]:
        """A gallery of the first ``k`` test images: ground truth (green) beside the predictions."""
        from PIL import Image

        from fmtune.plots import pyplot, save_atomic

        n = min(k, len(targets))
        if not n:
            return []
        dets = self.detections(logits[:n])
        plt = pyplot()
        fig, axes = plt.subplots(n, 2, figsize=(7, 3.5 * n), squeeze=False)
        for i in range(n):
            img = Image.fromarray(ds.raw([i])[0].permute(1, 2, 0).numpy())
            truth = [{"label": self.labels[int(r[0])], "x0": float(r[1]), "y0": float(r[2]), "x1": float(r[3]),
                      "y1": float(r[4])} for r in targets[i] if r[0] >= 0]
            b, s, c = dets[i]
            pred = [{"label": self.labels[int(cc)], "score": float(ss), "x0": float(bb[0]), "y0": float(bb[1]),
                     "x1": float(bb[2]), "y1": float(bb[3])} for bb, ss, cc, k in zip(b, s, c, self.kept(s)) if k]
            shown = f"prediction (score >= {float(self.threshold):.2f})"
            for col, (boxes, name) in enumerate(((truth, "truth"), (pred, shown))):
                axes[i, col].imshow(draw_boxes(img, boxes, self.labels))
                axes[i, col].set_title(f"{ds.names[i]}: {name}", fontsize=8)
                axes[i, col].axis("off")
        fig.tight_layout()
        save_atomic(fig, png)
        return [{"image": ds.names[i], "gallery": True} for i in range(n)]

    def fit_probe(self, x, targets, seed):
        raise ConfigError("detection has no linear-probe baseline; its baseline is the head trained on the frozen "
                          "backbone (train.baseline)")


def _sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = p * target + (1 - p) * (1 - target)
    return ce * (1 - pt) ** gamma * (alpha * target + (1 - alpha) * (1 - target))


def draw_boxes(img: Any, boxes: list[dict[str, Any]], labels: list[str]) -> Any:
    """A copy of the PIL image with each box drawn in its class's colour, label and score above it."""
    from PIL import ImageDraw

    from fmtune.tasks.segmentation import palette

    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    colours = palette(len(labels) + 1)[1:]
    for b in boxes:
        k = labels.index(b["label"]) if b["label"] in labels else 0
        colour = tuple(int(v) for v in colours[k % len(colours)])
        draw.rectangle([b["x0"], b["y0"], b["x1"], b["y1"]], outline=colour, width=2)
        text = b["label"] + (f" {b['score']:.2f}" if "score" in b else "")
        draw.text((b["x0"] + 2, max(0, b["y0"] - 11)), text, fill=colour)
    return out
