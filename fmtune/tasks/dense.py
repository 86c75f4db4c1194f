"""What the dense image tasks (segmentation, detection) share: a head on the backbone's feature
maps (``level = "dense"``; ``fmtune.models.dense``), learning rates for a fresh head on a CNN,
the head trained on the frozen backbone as baseline, class names from ``task.classes``, a
labelled folder predicting its images/, and the file names ``fmtune predict --save-images``
writes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from fmtune.data.readers import media_cell, media_name
from fmtune.tasks.base import Task


class DenseTask(Task):
    level = "dense"
    probe_baseline = False  # train.baseline: the head trained on the frozen backbone, a run of its own
    # a fresh head on a CNN (digit-scenes, MobileNetV2, 4 epochs): lr 5e-4 beat 2e-3 and the classification default
    # 5e-5 at every epoch (segmentation mIoU)
    default_lrs = {"full": 5e-4, "last_n": 5e-4, "head": 5e-4}
    # a dense head learns from many steps, as detectors' usual "1x" schedule of 12 epochs. Full fine-tuning on
    # digit-scenes (400 images, 192 px): 3 epochs of 32 (39 steps) reached test mAP 0.027 / mIoU 0.229; 12 epochs
    # of 8 (600 steps) 0.410 / 0.538, still rising (bench/results-2026-12-02-dense-defaults-2core.json)
    # evaluation and prediction: a dense model holds 150-250 MB of activations an image at 512 px (SegFormer-b0 150,
    # Mask2Former Swin-T 250: 19-32 GB at the usual 128 an evaluation batch), and on a CPU gives no more images a
    # second above 4 an image batch (SegFormer-b0 at 512 px: 4.9 images/s at 4, 4.4 at 8, 16 and 32)
    default_train = {"epochs": 12, "batch_size": 8, "eval_batch_size": 8}

    @staticmethod
    def class_names(classes: str | list[str] | None) -> list[str]:
        """``task.classes``: comma-separated names (or a list), in class-index order."""
        return [c.strip() for c in classes.split(",")] if isinstance(classes, str) else list(classes or [])

    def notes(self) -> list[str]:
        return [self.options["how"]] if "how" in self.options else []

    def predict_source(self, path: Path) -> Path:
        """A labelled folder (images/ beside masks/ or labels/) predicts its images only."""
        from fmtune.data.masks import image_folder

        return image_folder(path)

    @staticmethod
    def output_files(out: pd.DataFrame, column: str, values: str, base: Path,
                     taken: set[str]) -> Iterator[tuple[int, Path | bytes, str]]:
        """(row, image path (or the bytes of an image embedded in the table), a file stem not
        ``taken`` yet) for each row of ``out`` with a prediction
        in ``values``; a name taken by an earlier image (of this call or an earlier chunk of the same
        ``fmtune predict``: ``taken`` is kept by the caller) gets -2, -3 ..."""
        for i, (src, value) in enumerate(zip(out[column], out[values])):
            if not isinstance(value, (str, list)):  # a row that got no prediction (see its error)
                continue
            path, name = media_cell(src, base)  # a path, or the bytes of an image embedded in the table
            first = Path(media_name(path, name)).stem or f"image-{i + 1}"
            stem, k = first, 1
            while stem in taken:
                k += 1
                stem = f"{first}-{k}"
            taken.add(stem)
            yield i, path, stem
