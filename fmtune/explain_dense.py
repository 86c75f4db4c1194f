"""Grad-CAM for segmentation and detection runs: where in the image the evidence lies for a
predicted class region (segmentation: the region the model labels with the explained class) or
for the best box of the explained class (detection).

The score Grad-CAM differentiates is the task's ``class_scores``: per class, the mean logit over
the explained region (fixed from the unperturbed prediction), or the best location's class
logit; the layer is the backbone's stride-16 map (what the decoder reads besides the finest and
the coarsest), so the heat shows where the backbone saw the evidence, resized to the image. At
stride 32 (the last convolution, as for classification) the maps of 192-px scenes were 6 x 6
cells and missed small objects by a cell. A ViT backbone works too (its patch grid).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtune import ui
from fmtune.adapters import base_model
from fmtune.errors import ConfigError
from fmtune.fsutil import atomic_dir, check_output_dir
from fmtune.training.infer import infer
from fmtune.training.perturb import PixelModel

MAP = 1  # of the backbone's (stride 8, 16, 32) maps: 16 is where objects are both recognised and placed


class ClassScores(nn.Module):
    """Pixels in [0, 1] -> (B, K): the task's per-class score of each image (``task.class_scores``)."""

    def __init__(self, model: nn.Module, spec: dict[str, Any], task: Any, regions: torch.Tensor | None):
        super().__init__()
        self.net, self.task, self.regions = PixelModel(model, spec), task, regions

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.task.class_scores(self.net(pixels), self.regions)


def explain_dense(pred: Any, inputs: list[str], method: str, target: str | None, out: str | Path | None,
                  limit: int, quiet: bool, *, collect_inputs: Any, save_image_pngs: Any) -> dict[str, Any]:
    """Grad-CAM maps of ``inputs`` (images, folders, tables); files into ``out`` (default RUN/explain).
    The image explainer's own helpers come as arguments (``fmtune.explain`` calls this)."""
    from captum.attr import LayerAttribution, LayerGradCam

    task, model = pred.task, pred.model
    if method not in ("auto", "gradcam"):
        raise ConfigError(f"--method {method}: {task.name} runs are explained with gradcam (a class region or box "
                          "of a dense prediction has no single logit for the other methods)")
    if getattr(base_model(model), "whole", False):  # a whole detector or segmenter: its backbone's map at stride 16
        from fmtune.models.whole import gradcam_layer

        layer = gradcam_layer(base_model(model), int(pred.bundle.image["size"]))
    else:
        layer = base_model(model).backbone  # its three maps; Grad-CAM reads the middle one (stride 16)
    if not inputs:
        raise ConfigError(f"fmtune explain of a {task.name} run: give images (--input FILE, FOLDER or a table)")
    target_idx = None
    if target is not None:
        if target not in task.labels:
            raise ConfigError(f"--target {target!r} is not a class of this run; classes: {', '.join(task.labels)}")
        target_idx = task.labels.index(target)
    items = collect_inputs(pred, [str(task.predict_source(Path(v))) for v in inputs], limit)
    out_dir = Path(out) if out else pred.run_dir / "explain"
    check_output_dir(out_dir, "explain.json")
    summary: dict[str, Any] = {"method": "gradcam", "run": str(pred.run_dir), "out": str(out_dir), "items": []}
    ds = task.inputs([it["input"] for it in items], pred.bundle)
    logits, _ = infer(model, ds, pred.batch_size)
    regions = []
    for k, (item, row) in enumerate(zip(items, logits)):
        cls, score, region = task.explain_target(row, target_idx)
        regions.append(region)
        item.update(input=ds.raw([k])[0], predicted=task.labels[cls], score=score, target=task.labels[cls],
                    target_idx=cls)
    region_t = torch.stack(regions) if regions and regions[0] is not None else None
    device = next(model.parameters()).device

    def write(tmp: Path) -> None:
        heats = []
        with ui.CountProgress("explaining (gradcam)", len(items), quiet) as bar:
            for s in range(0, len(items), 8):
                pixels = torch.stack([it["input"] for it in items[s:s + 8]]).float().to(device) / 255.0
                tgt = torch.tensor([it["target_idx"] for it in items[s:s + 8]], device=device)
                net = ClassScores(model, pred.bundle.image, task,
                                  None if region_t is None else region_t[s:s + 8].to(device)).eval()
                cam = LayerGradCam(net, layer).attribute(pixels, target=tgt, relu_attributions=True)
                cam = cam[MAP] if isinstance(cam, tuple) else cam  # (fmtune's backbones give three maps)
                heat = LayerAttribution.interpolate(cam, tuple(pixels.shape[-2:]), interpolate_mode="bilinear")[:, 0]
                top = heat.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
                heats.append((heat / top).detach().cpu())
                bar(len(pixels))
        heat = torch.cat(heats)
        summary["files"] = save_image_pngs(items, heat, tmp, "gradcam")
        summary["items"] = [{k: it[k] for k in ("name", "predicted", "score", "target", "true")} for it in items]
        np.save(tmp / "heatmaps.npy", heat.numpy().astype(np.float16))
        (tmp / "explain.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "out"}, indent=1))

    atomic_dir(out_dir, write)
    return summary
