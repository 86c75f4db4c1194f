"""Whole transformers models for the dense image tasks, fine-tuned as they are where
``fmtune.models.dense`` puts its own head on an image backbone: a detector (a folder
``AutoModelForObjectDetection`` loads: RT-DETR, RT-DETRv2, D-FINE, DETR, Conditional DETR, YOLOS ...)
or a semantic segmenter with its decode head (``AutoModelForSemanticSegmentation``: SegFormer,
UperNet, DPT, BEiT, MobileViT-DeepLabV3 ... fine-tuned checkpoints; a backbone-only folder such as
SegFormer's mit-b0 keeps fmtune's decoder), or a mask classifier (Mask2Former, MaskFormer: a class and a
mask per query, ``AutoModelForUniversalSegmentation``) for semantic segmentation.

Either keeps everything it was pretrained with but its classifier, made anew for the run's classes
(``ignore_mismatched_sizes``, as transformers' own fine-tuning guides do). A DETR-family checkpoint
built on timm's ResNet (``use_timm_backbone``: facebook/detr-resnet-50 ...) is read without timm into
transformers' ResNet, the same network under other names (``_timm_resnet``). A segmenter's logits go
to the segmentation task as fmtune's decoder's do (resized to the mask for the loss). A detector is
trained with its own loss: transformers' Hungarian matching of queries to boxes with the
classification, L1 and GIoU terms of the architecture (and its auxiliary and denoising losses).
So that the detection task scores, decodes, reports and serves it as it does fmtune's FCOS head,
``SetDetector`` gives the same per-location layout (``fmtune.models.dense.DetectionModel``): per
query the K class logits (a softmax detector's probabilities as logits of their own, the
"no object" class dropped), the box in input pixels, a centre-ness of certainty, the box's centre
and a stride of 0; and one channel more, the detector's loss for the batch (each query holding
its share), which the task's loss sums (``Detection.loss``): transformers computes the loss from
outputs a per-location tensor cannot hold.

A mask classifier (``MaskSegmenter``) is trained with its own loss too (queries matched to the image's class
masks; class, mask and dice terms; its auxiliary losses): its batches carry the masks to it, as a detector's carry
the boxes. Its output is the semantic map transformers' ``post_process_semantic_segmentation`` makes (each class's
probability summed over the queries, weighted by their masks), as log-scores the segmentation task reads as it
reads a decoder's logits, and, where the batch gave masks, one channel more holding the batch's loss
(``Segmentation.loss`` reads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from fmtune.errors import ModelError
from fmtune.tasks.detection import SET_EXTRA  # noqa: F401  (pack's layout: the task reads it)

CERTAIN = 20.0  # the centre-ness logit of every query (sigmoid: 1)
DETECTOR, SEGMENTER, MASKS = "detector", "segmenter", "mask-segmenter"  # (fmtune.json's dense head of a saved run)
# mask classifiers fine-tuned for semantic segmentation (their forward takes mask_labels and class_labels). Not
# OneFormer (it also reads a task prompt) nor EoMT (its ViT and its queries' blocks are one stack: no backbone to
# freeze or adapt apart from the head)
MASK_TYPES = ("mask2former", "maskformer")
# learning rates unless set (backbone, the rest), from the models' own fine-tuning recipes, not measured here (no
# detector or segmenter weights ship offline): RT-DETR and DETR train with AdamW at 1e-4, their backbone at 1e-5;
# SegFormer at 6e-5, its decode head at ten times that
# Mask2Former and MaskFormer: AdamW at 1e-4, the backbone at a tenth of it
LRS = {DETECTOR: (1e-5, 1e-4), SEGMENTER: (6e-5, 6e-4), MASKS: (1e-5, 1e-4)}


def kind_of(values: dict[str, Any], dense_head: str) -> str | None:
    """DETECTOR or SEGMENTER where a model's config (``values``: config.json's) is a whole model of that kind for a
    task whose own head would be ``dense_head`` ("fcos": detection; "lraspp": segmentation), else None."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES,
        MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES,
    )

    model_type = values.get("model_type")
    if dense_head == "fcos" and model_type in MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES:
        return DETECTOR
    has_head = values.get("backbone_config") is not None or any(
        str(a).endswith("ForSemanticSegmentation") for a in values.get("architectures") or [])
    if dense_head == "lraspp" and model_type in MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES and has_head:
        return SEGMENTER
    if dense_head == "lraspp" and model_type in MASK_TYPES:
        return MASKS
    return None


def _auto(kind: str) -> Any:
    from transformers import (
        AutoModelForObjectDetection,
        AutoModelForSemanticSegmentation,
        AutoModelForUniversalSegmentation,
    )

    return {DETECTOR: AutoModelForObjectDetection, SEGMENTER: AutoModelForSemanticSegmentation,
            MASKS: AutoModelForUniversalSegmentation}[kind]


def create(path: Any, labels: list[str], pretrained: bool, kind: str) -> WholeModel:
    """The whole model at ``path`` with a classifier for ``labels`` (pretrained weights, or random with
    ``pretrained`` False)."""
    import copy

    from transformers import AutoConfig

    config = copy.deepcopy(AutoConfig.from_pretrained(path))
    resnet = _timm_resnet(config)
    if resnet is not None:
        config.backbone_config = resnet
    else:
        _needs_timm(path, config)
    config.num_labels = len(labels)
    config.id2label, config.label2id = dict(enumerate(labels)), {n: i for i, n in enumerate(labels)}
    try:
        if pretrained:
            model = _auto(kind).from_pretrained(path, config=config, ignore_mismatched_sizes=True, dtype=torch.float32)
        else:
            model = _auto(kind).from_config(config)
    except Exception as e:
        raise ModelError(_failure(path, config, e)) from None
    if resnet is not None and pretrained:
        _load_timm_resnet(model, path)
    return CLASSES[kind](model)


def _timm_resnet(config: Any) -> Any:
    """Where ``config``'s backbone is one of timm's plain ResNets at its usual stride (not a DC5 checkpoint's
    dilated one) and timm is not installed, the transformers ResNetConfig of the same network and feature maps (its
    weights then read by ``_load_timm_resnet``), else None. transformers' ResNet is timm's (ResNet v1.5: the stride
    in the 3x3 convolution), under other names."""
    import importlib.util

    from fmtune.models.resnet_files import TIMM_RESNETS, config_of

    timm = getattr(config, "backbone_config", None)
    if getattr(timm, "model_type", None) != "timm_backbone" or importlib.util.find_spec("timm") is not None:
        return None
    name = str(getattr(timm, "backbone", "") or "").split(".")[0]  # (a pretrained tag: resnet50.a1_in1k)
    if name not in TIMM_RESNETS or getattr(timm, "output_stride", None) not in (None, 32):
        return None
    indices = list(getattr(timm, "out_indices", None) or [1, 2, 3, 4])
    if not all(i in (1, 2, 3, 4) for i in indices):  # (0: the stem's map, which transformers' backbone has not)
        return None
    return config_of(*TIMM_RESNETS[name], out_features=[f"stage{i}" for i in indices])


def _load_timm_resnet(model: nn.Module, path: Any) -> None:
    """The pretrained weights of the timm ResNet in the checkpoint in the folder ``path`` (its backbone under
    ``...conv_encoder.model.``) into ``model``'s transformers ResNet, every one of them: a ModelError naming
    what is missing or left over otherwise."""
    from transformers.models.resnet.modeling_resnet import ResNetBackbone

    from fmtune.models.resnet_files import hf_name

    backbones = [m for m in model.modules() if isinstance(m, ResNetBackbone)]
    found = {}
    for key, tensor in _checkpoint(path, "conv_encoder.model.").items():
        name = hf_name(key.split("conv_encoder.model.", 1)[1])
        if name is not None:
            found[name] = tensor
    if len(backbones) != 1 or not found:
        raise ModelError(f"{path}: cannot read its timm ResNet backbone's weights (no weights under "
                         "'conv_encoder.model.' in its checkpoint); install timm (pip install timm) to load it as "
                         "transformers does")
    missing, unexpected = backbones[0].load_state_dict(found, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: its timm ResNet backbone's weights do not fit transformers' ResNet "
                         f"(missing {sorted(missing)[:3]}, left over {sorted(unexpected)[:3]}); install timm (pip "
                         "install timm) to load it as transformers does")


def _checkpoint(folder: Any, part: str) -> dict[str, torch.Tensor]:
    """The tensors of the transformers checkpoint in ``folder`` (a hub id is one too: ``zoo.models.resolve`` gives
    its cache folder) whose names hold ``part``: model.safetensors, sharded or not, else pytorch_model.bin read with
    weights_only."""
    from safetensors import safe_open

    folder = Path(folder)
    names = ["model.safetensors"]
    if (folder / "model.safetensors.index.json").is_file():
        names = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if (folder / name).is_file():
            with safe_open(str(folder / name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if part in k})
    if not out and (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        out = {k: v for k, v in state.items() if part in k}
    return out


def _needs_timm(path: Any, config: Any) -> None:
    """A ModelError where the model's backbone is a timm model (DETR's, Conditional and Deformable DETR's hub
    checkpoints: use_timm_backbone) and timm is not installed."""
    import importlib.util

    timm = getattr(getattr(config, "backbone_config", None), "model_type", None) == "timm_backbone" or getattr(
        config, "use_timm_backbone", False)
    if timm and importlib.util.find_spec("timm") is None:
        raise ModelError(f"{path} is a {config.model_type} model whose backbone is a timm model "
                         "(use_timm_backbone): transformers builds it only with the timm package installed (pip "
                         "install timm; fmtune does not depend on it); or use one with a transformers backbone "
                         "(a detector: RT-DETR, D-FINE, YOLOS)")


def _failure(path: Any, config: Any, error: Exception) -> str:
    why = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return f"cannot load the {config.model_type} model at {path}: {why}"


def save(model: WholeModel, folder: Path, source: str, size: int, weights: bool = True) -> None:
    """The model as a transformers folder (its auto class loads it, classes named), with its source's image
    processor settings at the run's input size (fmtune itself resizes to that square: the processor of a detector
    resizes without keeping the aspect, where fmtune letterboxes). Without ``weights`` (an adapter's run: the
    adapter holds what trained) its config alone, the classes named."""
    from fmtune.fsutil import read_json

    if weights:
        model.net.save_pretrained(folder, safe_serialization=True)
    else:
        model.net.config.save_pretrained(folder)
    pp = read_json(Path(source) / "preprocessor_config.json", {}) if Path(source).is_dir() else {}
    if pp:
        if isinstance(pp.get("size"), dict) and "height" in pp["size"]:
            pp["size"] = {"height": size, "width": size}
        (folder / "preprocessor_config.json").write_text(json.dumps(pp, indent=2))


def adapter_base(source: Any, folder: Path, kind: str) -> WholeModel:
    """The model an adapter saved in ``folder`` was trained on: the pretrained whole model at ``source`` with a
    classifier for the classes ``folder``'s config names (the adapter's saved head replaces it)."""
    from transformers import AutoConfig

    id2label = AutoConfig.from_pretrained(folder).id2label
    return create(source, [id2label[i] for i in sorted(id2label)], True, kind)


def load(folder: Path, kind: str) -> WholeModel:
    """A whole model saved by ``save``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    _needs_timm(folder, config)
    try:
        return CLASSES[kind](_auto(kind).from_pretrained(folder, dtype=torch.float32))
    except Exception as e:
        raise ModelError(_failure(folder, config, e)) from None


class WholeModel(nn.Module):
    """A transformers model behind the interface of fmtune's dense task models: ``backbone`` and ``head`` (what
    strategies freeze and train, and the optimizer gives train.head_lr), ``num_classes``. (No ``config`` of its own:
    peft would take it for a transformers model and look for one's attributes; ``net.config`` is the model's.)"""

    level = "dense"
    set_prediction = False  # (its batches carry the targets to it: it computes its own loss)
    whole = True  # (no feature cache; an adapter's head is all but the backbone; Grad-CAM at ``gradcam_layer``)
    kind = ""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.num_classes = int(net.config.num_labels)

    @property
    def backbone(self) -> nn.Module:
        """The pretrained image backbone inside (a DETR's CNN, YOLOS's ViT, SegFormer's encoder, UperNet's
        ConvNeXt ...)."""
        base = self.net.base_model
        return getattr(base, "backbone", None) or getattr(self.net, "backbone", None) or base

    @property
    def head(self) -> nn.ModuleList:
        """Everything with weights but the backbone: a detector's transformer, queries and class and box heads; a
        segmenter's decode head; a mask classifier's pixel decoder, transformer decoder and class head."""
        backbone = self.backbone

        def others(module: nn.Module) -> list[nn.Module]:  # its parts beside the backbone, those holding it opened
            out = []
            for m in module.children():
                if m is backbone or not any(True for _ in m.parameters()):  # (a loss's class weights: no weights)
                    continue
                out += others(m) if any(x is backbone for x in m.modules()) else [m]
            return out

        return nn.ModuleList(others(self.net))


def gradcam_layer(model: WholeModel, size: int) -> nn.Module:
    """The backbone's module whose output is its feature map nearest stride 16 (``fmtune.explain_dense`` reads
    Grad-CAM there, as on fmtune's own backbones): of the modules giving a 4-d map at that stride, the last to run,
    a block rather than a single layer where there is one (a ResNet's, ConvNeXt's or SegFormer's stage; a ViT's or
    a Swin's patch embedding, the only map its token encoder gives)."""
    runs: list[tuple[nn.Module, int]] = []

    def seen(module: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
        reads = any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values()))  # (not a Swin's position bias)
        if reads and isinstance(out, torch.Tensor) and out.dim() == 4:
            runs.append((module, int(out.shape[-1])))

    backbone = model.backbone
    hooks = [m.register_forward_hook(seen, with_kwargs=True) for m in backbone.modules() if m is not backbone]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(pixel_values=torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    if not runs:
        raise ModelError(f"the {type(backbone).__name__} backbone gives no feature map to read Grad-CAM at")
    side = min({s for _, s in runs}, key=lambda s: abs(s - size / 16))
    names = {m: n for n, m in backbone.named_modules()}
    coarser = [names[m] + "." for m, s in runs if s != side]
    # at that stride, not inside a block of another (a bottleneck ResNet's next stage starts with a 1x1 convolution)
    at = [m for m, s in runs if s == side and not names[m].startswith(tuple(coarser))] or [
        m for m, s in runs if s == side]
    blocks = [m for m in at if any(True for _ in m.children())]
    return (blocks or at)[-1]


class WholeSegmenter(WholeModel):
    """A transformers semantic segmenter: ``.logits`` (B, K, h, w), at the model's own resolution (the task resizes
    them to the mask)."""

    kind = SEGMENTER

    def forward(self, pixel_values: torch.Tensor, **_: object) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=self.net(pixel_values=pixel_values).logits)


class SetDetector(WholeModel):
    """A transformers detector behind the interface of fmtune's dense detection model (see the module doc)."""

    kind = DETECTOR
    set_prediction = True

    @staticmethod
    def targets(det_targets: torch.Tensor, height: int, width: int) -> list[dict[str, torch.Tensor]]:
        """fmtune's packed boxes (class, x0, y0, x1, y1 in input pixels, crowd; class -1: padding) as transformers'
        detection labels: per image the classes and the boxes as centre x, y, width, height over the image's size
        (crowd boxes left out of training, as COCO leaves them out of scoring)."""
        out = []
        scale = det_targets.new_tensor([width, height, width, height])
        for t in det_targets.float():
            t = t[(t[:, 0] >= 0) & (t[:, 5] <= 0)]
            xyxy = t[:, 1:5] / scale
            box = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                               xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], -1).clamp(0.0, 1.0)
            out.append({"class_labels": t[:, 0].long(), "boxes": box})
        return out

    def forward(self, pixel_values: torch.Tensor, det_targets: torch.Tensor | None = None,
                **_: object) -> SemanticSegmenterOutput:
        h, w = pixel_values.shape[-2:]
        labels = None if det_targets is None else self.targets(det_targets, h, w)
        out = self.net(pixel_values=pixel_values, labels=labels)
        return SemanticSegmenterOutput(logits=pack(out, self.num_classes, h, w))


def pack(out: Any, k: int, height: int, width: int) -> torch.Tensor:
    """A detector's output as (B, queries, K + SET_EXTRA): see the module doc."""
    logits, boxes = out.logits.float(), out.pred_boxes.float()
    if logits.shape[-1] == k + 1:  # softmax over the classes and "no object" (DETR, YOLOS)
        p = logits.softmax(-1)[..., :k].clamp(1e-6, 1 - 1e-6)
        logits = torch.log(p) - torch.log1p(-p)
    cx, cy, bw, bh = (boxes * boxes.new_tensor([width, height, width, height])).unbind(-1)
    xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
    b, q = logits.shape[:2]
    loss = getattr(out, "loss", None)
    share = (loss.float() / q if loss is not None else logits.new_zeros(())).reshape(1, 1, 1).expand(b, q, 1)
    const = torch.stack([torch.full_like(cx, CERTAIN), cx, cy, torch.zeros_like(cx)], -1)
    return torch.cat([logits, xyxy, const, share], -1)


class MaskSegmenter(WholeModel):
    """A transformers mask classifier (Mask2Former, MaskFormer) as a semantic segmenter: see the module doc."""

    kind = MASKS
    set_prediction = True  # (its batches carry the masks to it)

    @property
    def backbone(self) -> nn.Module:
        """The image backbone its pixel decoder reads (a Swin, a ResNet ...)."""
        return self.net.base_model.pixel_level_module.encoder

    @staticmethod
    def targets(masks: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Class-index masks (B, H, W; IGNORE left out) as transformers' mask labels: per image a binary mask for
        each class it shows, and those classes."""
        from fmtune.data.masks import IGNORE

        mask_labels, class_labels = [], []
        for m in masks.long():
            classes = m[m != IGNORE].unique()
            mask_labels.append((m[None] == classes[:, None, None]).float())
            class_labels.append(classes)
        return mask_labels, class_labels

    def forward(self, pixel_values: torch.Tensor, seg_targets: torch.Tensor | None = None,
                **_: object) -> SemanticSegmenterOutput:
        mask_labels, class_labels = self.targets(seg_targets) if seg_targets is not None else (None, None)
        out = self.net(pixel_values=pixel_values, mask_labels=mask_labels, class_labels=class_labels)
        classes = out.class_queries_logits.float().softmax(-1)[..., :-1]  # (the last class: "no object")
        scores = torch.einsum("bqc,bqhw->bchw", classes, out.masks_queries_logits.float().sigmoid())
        logits = scores.clamp(min=1e-6).log()
        if out.loss is not None:
            logits = torch.cat([logits, out.loss.float().expand_as(logits[:, :1])], 1)
        return SemanticSegmenterOutput(logits=logits)


CLASSES: dict[str, type[WholeModel]] = {DETECTOR: SetDetector, SEGMENTER: WholeSegmenter, MASKS: MaskSegmenter}
