"""Dense prediction on an image backbone: semantic segmentation with an LR-ASPP decoder.

``DenseBackbone`` runs any of fmtune's image backbones (MobileNetV2, EfficientNet-Lite0, or a
transformers image model from a folder: ResNet, ConvNeXt, ViT ...) and returns three feature
maps: the last stage at stride 8, the last at stride 16, and the backbone's last one (stride 32
for CNNs; a ViT, one stride throughout, gives its patch grid at 1/3 and 2/3 of its depth and
the last). Which stages those are is found once by running the backbone on an image of the
model's input size.

``LRASPP`` is the decoder of MobileNetV3's segmentation model (Howard et al., 2019, "Searching
for MobileNetV3"): the last map through a 1x1 convolution, gated by its own global context,
upsampled, plus a 1x1 classifier of the detailed map; here with one U-Net-style skip more (the
stride-16 map joins before the stride-8 one), since without dilated last stages the stride-32
map alone is too coarse to tell neighbouring objects apart. It outputs class logits at stride
8; the task resizes them to the mask (training) or to the image (prediction). Written here
because torchvision cannot be a dependency.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from fmtune.errors import ModelError
from fmtune.models.hf_remote import guard_group_norm

DETAIL_STRIDE = 8
HEAD_CHANNELS = 128
HEAD_LAYERS = ("seg_project", "seg_gate", "seg_middle", "seg_detail", "seg_context")


class DenseBackbone(nn.Module):
    """A backbone returning (detailed map, middle map, last map). ``net`` is the wrapped model:
    one of fmtune's CNNs (``stage_outputs``), or a transformers model read with its hidden states."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net = net
        self.is_hf = hasattr(net, "config")
        with torch.no_grad():
            was = net.training
            net.eval()
            try:
                maps = self._maps(torch.zeros(1, 3, size, size))
            except (RuntimeError, ValueError) as e:
                own = getattr(getattr(net, "config", None), "image_size", None)
                raise ModelError(f"{type(net).__name__} cannot read {size}x{size} images"
                                 + (f" (it was built for {own}: set model.image_size {own})" if own else "")
                                 + f": {e}") from None
            net.train(was)
        if len(maps) < 2:
            raise ModelError(f"{type(net).__name__}: too few feature maps to segment from ({len(maps)})")
        side = [m.shape[-1] for m in maps]
        last = len(maps) - 1

        def deepest(stride: int) -> int | None:  # the last map at this stride or finer, before the last one
            fine = [i for i, s in enumerate(side[:last]) if s * stride >= size]
            return fine[-1] if fine else None

        detail, middle = deepest(DETAIL_STRIDE), deepest(2 * DETAIL_STRIDE)
        if detail is None or middle is None or middle <= detail or side[middle] == side[last]:
            # one stride throughout (a ViT: its embeddings, then every layer): depths 1/3 and 2/3
            detail, middle = last // 3, max(1, (2 * last) // 3) if last > 1 else 0
        self.indices = (detail, middle, last)
        self.channels = tuple(int(maps[i].shape[1]) for i in self.indices)
        self.strides = tuple(size / side[i] for i in self.indices)

    @property
    def blocks(self) -> list[nn.Module]:
        if hasattr(self.net, "blocks"):
            return list(self.net.blocks)
        from fmtune.strategies import backbone_blocks

        return backbone_blocks(self.net)

    def _maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if not self.is_hf:
            return self.net.stage_outputs(pixel_values)
        from fmtune.models.hf_remote import image_kwargs

        out = self.net(pixel_values=pixel_values, output_hidden_states=True, **image_kwargs(self.net, pixel_values))
        # Swin and its kin give each stage's tokens as a map too
        states = list(getattr(out, "reshaped_hidden_states", None) or out.hidden_states)
        if states[-1].dim() == 4:  # a CNN: (B, C, h, w) per stage
            return states
        h, w = pixel_values.shape[-2:]  # tokens -> a grid (the patch tokens are the last gh*gw)
        # (but YOLOS's detection tokens, which follow them)
        after = int(getattr(self.net.config, "num_detection_tokens", 0) or 0)
        maps = []
        for s in states:
            s = s[:, : s.shape[1] - after]
            gh, gw = token_grid(s.shape[1], h, w)
            maps.append(s[:, -gh * gw:].transpose(1, 2).reshape(s.shape[0], s.shape[2], gh, gw))
        return maps

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = self._maps(pixel_values)
        return tuple(maps[i] for i in self.indices)


MAX_PREFIX_TOKENS = 16  # tokens before the patches: a class token, a distillation token, registers


@functools.lru_cache(maxsize=64)  # called per hidden state of every forward, with the same few sizes
def token_grid(n: int, h: int, w: int) -> tuple[int, int]:
    """(rows, columns) of the patch grid among ``n`` tokens of an h x w image: the finest stride whose
    grid (rounded down or up, as padded stages round) leaves the fewest other tokens in front."""
    best: tuple[int, int, int] | None = None
    for stride in range(1, max(h, w) + 1):
        for gh in {h // stride, -(-h // stride)}:
            for gw in {w // stride, -(-w // stride)}:
                extra = n - gh * gw
                if gh and gw and 0 <= extra <= MAX_PREFIX_TOKENS and (best is None or extra < best[0]):
                    best = (extra, gh, gw)
        if best is not None and best[0] == 0:
            break
    if best is None:
        raise ModelError(f"cannot lay {n} tokens out as the patch grid of a {h}x{w} image")
    return best[1], best[2]


class LRASPP(nn.Module):
    """LR-ASPP with one more skip: the gated context of the last map is added to the middle map
    (stride 16) before it meets the detailed one (stride 8)."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int, inter: int = HEAD_CHANNELS):
        super().__init__()
        detail_channels, middle_channels, last_channels = channels
        self.seg_project = nn.Sequential(nn.Conv2d(last_channels, inter, 1, bias=False), nn.BatchNorm2d(inter),
                                         nn.ReLU(inplace=True))
        self.seg_gate = nn.Conv2d(last_channels, inter, 1)
        self.seg_middle = nn.Sequential(nn.Conv2d(middle_channels, inter, 1, bias=False), nn.BatchNorm2d(inter))
        self.seg_detail = nn.Conv2d(detail_channels, num_classes, 1)
        self.seg_context = nn.Conv2d(inter, num_classes, 1)

    def forward(self, detail: torch.Tensor, middle: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        x = self.seg_project(last) * torch.sigmoid(self.seg_gate(F.adaptive_avg_pool2d(last, 1)))
        x = F.interpolate(x, size=middle.shape[-2:], mode="bilinear", align_corners=False)
        x = F.relu(x + self.seg_middle(middle))
        x = F.interpolate(x, size=detail.shape[-2:], mode="bilinear", align_corners=False)
        return self.seg_detail(detail) + self.seg_context(x)


class DenseTaskModel(nn.Module):
    """A DenseBackbone and a head on its maps; ``features``: the backbone's last map (what the
    linear-probe baseline reads)."""

    level = "dense"
    head_layers: tuple[str, ...] = ()  # the head's layers by name (peft trains and saves them beside an adapter)

    def __init__(self, backbone: DenseBackbone, head: nn.Module, num_classes: int):
        super().__init__()
        self.backbone, self.head, self.num_classes = backbone, head, num_classes
        guard_group_norm(self)

    def features(self, pixel_values: torch.Tensor, **_: object) -> torch.Tensor:
        return self.backbone(pixel_values)[-1]

    def forward(self, pixel_values: torch.Tensor, **_: object) -> SemanticSegmenterOutput:
        return self.forward_maps(self.backbone(pixel_values), tuple(pixel_values.shape[-2:]))

    def forward_maps(self, maps: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> SemanticSegmenterOutput:
        """The head on the backbone's three maps of images of ``image_size`` (the feature cache
        of a frozen backbone feeds this directly)."""
        raise NotImplementedError


class DenseModel(DenseTaskModel):
    """Backbone + LR-ASPP; ``forward`` gives class logits at stride 8 (``.logits``: B, K, H/8, W/8)."""

    head_layers = HEAD_LAYERS

    def __init__(self, backbone: DenseBackbone, num_classes: int):
        super().__init__(backbone, LRASPP(backbone.channels, num_classes), num_classes)

    def forward_maps(self, maps: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=self.head(*maps))


def hf_net(config: Any, path: str | None) -> nn.Module:
    """The transformers image model (no pooler, no classifier) of ``config``, pretrained from
    ``path`` or random."""
    from transformers import AutoModel

    kw: dict[str, Any] = {}
    try:
        if path is None:
            return AutoModel.from_config(copy.deepcopy(config), **kw)
        return AutoModel.from_pretrained(path, config=config, **kw).float()
    except Exception as e:
        raise ModelError(f"cannot load an image backbone for segmentation from {path or config.model_type}: "
                         f"{e}") from None


def check_whole_model(config: Any, where: str, task: str) -> None:
    """A ModelError for a whole detector or segmenter (DETR, RT-DETR, UperNet, Mask2Former ...: an image backbone
    inside an architecture of its own), given where an image backbone is wanted."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES,
        MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES,
    )

    segmenter = config.model_type in {**MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES,
                                      **MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES}  # (EoMT has no backbone config)
    if getattr(config, "backbone_config", None) is not None or getattr(config, "use_timm_backbone", False) or segmenter:
        raise ModelError(f"{where} is a whole {config.model_type} model (an image backbone inside an architecture "
                         f"of its own); fmtune trains its own {task} head on an image backbone: give the folder of an "
                         "image model (a ResNet, ConvNeXt, Swin or ViT) instead (detection also fine-tunes a whole "
                         "object detector: RT-DETR, D-FINE, DETR, YOLOS ...; segmentation a whole semantic segmenter: "
                         "SegFormer, UperNet, DPT, Mask2Former, MaskFormer ...)")


def check_hf(config: Any, where: str, task: str = "segmentation") -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    check_whole_model(config, where, task)
    # transformers' image classifiers (MobileNetV2 and EfficientNet state neither stage sizes nor patches)
    image = model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES or bool(
        getattr(config, "hidden_sizes", None) or getattr(config, "patch_size", None))
    if not image or model_type == "whisper":
        raise ModelError(f"{where} is not an image backbone (model type {config.model_type!r}); {task} needs "
                         "an image model: mobilenet-v2, efficientnet-lite0, or a local ResNet / ConvNeXt / ViT folder")


# --- object detection: a feature pyramid and an anchor-free (FCOS) head --------------------------

DET_WIDTH = 96
# (the per-level scales are parameters, not layers: beside an adapter they stay at 1, saved with the architecture)
DET_LAYERS = ("det_lateral", "det_smooth", "det_cls_tower", "det_reg_tower", "det_cls", "det_box", "det_ctr")
PRIOR = 0.01  # the class scores start at this probability (focal-loss initialisation)


def _tower(width: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class FCOSHead(nn.Module):
    """A feature pyramid over the three maps (strides 8, 16, 32: lateral 1x1, top-down sums, 3x3
    smoothing) and FCOS's head shared by its levels (Tian et al., 2019): class scores, the box as
    distances from each location to its four sides, and centre-ness."""

    def __init__(self, channels: tuple[int, int, int], num_classes: int, width: int = DET_WIDTH, convs: int = 2):
        super().__init__()
        self.det_lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.det_smooth = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in channels)
        self.det_cls_tower, self.det_reg_tower = _tower(width, convs), _tower(width, convs)
        self.det_cls = nn.Conv2d(width, num_classes, 3, padding=1)
        self.det_box = nn.Conv2d(width, 4, 3, padding=1)
        self.det_ctr = nn.Conv2d(width, 1, 3, padding=1)
        self.det_scales = nn.Parameter(torch.ones(len(channels)))
        nn.init.constant_(self.det_cls.bias, -float(torch.log(torch.tensor((1 - PRIOR) / PRIOR))))
        for conv in (self.det_cls, self.det_box, self.det_ctr):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, maps: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> torch.Tensor:
        lat = [conv(m) for conv, m in zip(self.det_lateral, maps)]
        levels = [lat[-1]]
        for x in reversed(lat[:-1]):
            levels.insert(0, x + F.interpolate(levels[0], size=x.shape[-2:], mode="nearest"))
        out = []
        for k, (smooth, x) in enumerate(zip(self.det_smooth, levels)):
            x = smooth(x)
            b, _, h, w = x.shape
            stride = image_size[0] / h
            cls = self.det_cls(self.det_cls_tower(x))
            reg = self.det_reg_tower(x)
            dist = torch.exp((self.det_scales[k] * self.det_box(reg)).clamp(max=8.0)) * stride
            ctr = self.det_ctr(reg)
            ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            px = ((xs + 0.5) * stride).to(x.dtype).expand(b, h, w)
            py = ((ys + 0.5) * stride).to(x.dtype).expand(b, h, w)
            box = torch.stack([px - dist[:, 0], py - dist[:, 1], px + dist[:, 2], py + dist[:, 3]], 1)
            const = torch.stack([px, py, torch.full_like(px, stride)], 1)
            out.append(torch.cat([cls, box, ctr, const], 1).flatten(2).transpose(1, 2))
        return torch.cat(out, 1)


class DetectionModel(DenseTaskModel):
    """Backbone + FCOS head. ``.logits`` (B, locations, K + 8): per location of every pyramid
    level, K class logits, the box (x0, y0, x1, y1 in input pixels), the centre-ness logit, and the
    location itself (x, y, stride: constants the loss assigns targets by)."""

    head_layers = DET_LAYERS

    def __init__(self, backbone: DenseBackbone, num_classes: int):
        super().__init__(backbone, FCOSHead(backbone.channels, num_classes), num_classes)

    def forward_maps(self, maps: tuple[torch.Tensor, ...], image_size: tuple[int, int]) -> SemanticSegmenterOutput:
        if self.backbone.strides[0] == self.backbone.strides[-1]:  # a ViT: a simple pyramid from one stride
            maps = (F.interpolate(maps[0], scale_factor=2.0, mode="bilinear", align_corners=False), maps[1],
                    F.max_pool2d(maps[2], 2, ceil_mode=True))
        return SemanticSegmenterOutput(logits=self.head(maps, image_size))


HEADS = {"lraspp": DenseModel, "fcos": DetectionModel}  # Task.dense_head -> the model class
