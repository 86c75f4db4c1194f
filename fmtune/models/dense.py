"""Dense prediction on an image backbone: semantic segmentation with an LR-ASPP decoder.

``DenseBackbone`` runs any of fmtune's image backbones (MobileNetV2, EfficientNet-Lite0, or a
transformers image model from a folder: ResNet, ConvNeXt, ViT ...) and returns two feature maps:
a detailed one at stride 8 (the last stage still at 1/8 of the input; a ViT's patch grid at
mid-depth) and the backbone's last one (stride 32 for CNNs, the patch stride for ViTs). Which
stages those are is found once by running the backbone on an image of the model's input size.

``LRASPP`` is the decoder of MobileNetV3's segmentation model (Howard et al., 2019, "Searching
for MobileNetV3"): the last map through a 1x1 convolution, gated by its own global context,
upsampled to the detailed map, plus a 1x1 classifier of the detailed map. It outputs class
logits at stride 8; the task resizes them to the mask (training) or to the image (prediction).
Written here because torchvision cannot be a dependency.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from fmtune.errors import ModelError

DETAIL_STRIDE = 8
HEAD_CHANNELS = 128
# the head's layers by name, so that peft trains and saves exactly them beside an adapter
HEAD_LAYERS = ("seg_project", "seg_gate", "seg_detail", "seg_context")


class DenseBackbone(nn.Module):
    """A backbone returning (detailed map, last map). ``net`` is the wrapped model: one of
    fmtune's CNNs (``stage_outputs``), or a transformers model read with its hidden states."""

    def __init__(self, net: nn.Module, size: int):
        super().__init__()
        self.net = net
        self.is_hf = hasattr(net, "config")
        with torch.no_grad():
            was = net.training
            net.eval()
            maps = self._maps(torch.zeros(1, 3, size, size))
            net.train(was)
        if not maps:
            raise ModelError(f"{type(net).__name__}: no feature maps to segment from")
        side = [m.shape[-1] for m in maps]
        fine = [i for i, s in enumerate(side) if s * DETAIL_STRIDE >= size]
        # the detailed map: the last one at stride <= 8; a ViT (one stride throughout): mid-depth
        self.detail_index = fine[-1] if fine and fine[-1] < len(maps) - 1 else len(maps) // 2
        self.channels = (int(maps[self.detail_index].shape[1]), int(maps[-1].shape[1]))
        self.strides = (size / side[self.detail_index], size / side[-1])

    @property
    def blocks(self) -> list[nn.Module]:
        if hasattr(self.net, "blocks"):
            return list(self.net.blocks)
        from fmtune.strategies import backbone_blocks

        return backbone_blocks(self.net)

    def _maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if not self.is_hf:
            return self.net.stage_outputs(pixel_values)
        out = self.net(pixel_values=pixel_values, output_hidden_states=True)
        states = list(out.hidden_states)
        if states[-1].dim() == 4:  # a CNN: (B, C, h, w) per stage
            return states
        h, w = pixel_values.shape[-2:]  # a ViT: tokens -> a grid (the patch tokens are the last h*w)
        patch = self.net.config.patch_size
        gh, gw = h // patch, w // patch
        return [s[:, -gh * gw:].transpose(1, 2).reshape(s.shape[0], s.shape[2], gh, gw) for s in states[1:]]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self._maps(pixel_values)
        return maps[self.detail_index], maps[-1]


class LRASPP(nn.Module):
    def __init__(self, detail_channels: int, last_channels: int, num_classes: int, inter: int = HEAD_CHANNELS):
        super().__init__()
        self.seg_project = nn.Sequential(nn.Conv2d(last_channels, inter, 1, bias=False), nn.BatchNorm2d(inter),
                                         nn.ReLU(inplace=True))
        self.seg_gate = nn.Conv2d(last_channels, inter, 1)
        self.seg_detail = nn.Conv2d(detail_channels, num_classes, 1)
        self.seg_context = nn.Conv2d(inter, num_classes, 1)

    def forward(self, detail: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        x = self.seg_project(last) * torch.sigmoid(self.seg_gate(F.adaptive_avg_pool2d(last, 1)))
        x = F.interpolate(x, size=detail.shape[-2:], mode="bilinear", align_corners=False)
        return self.seg_detail(detail) + self.seg_context(x)


class DenseModel(nn.Module):
    """Backbone + LR-ASPP; ``forward`` gives class logits at stride 8 (``.logits``: B, K, H/8, W/8);
    ``features`` the backbone's last map (the linear-probe baseline reads it)."""

    level = "dense"
    head_layers = HEAD_LAYERS

    def __init__(self, backbone: DenseBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = LRASPP(*backbone.channels, num_classes)
        self.num_classes = num_classes

    def features(self, pixel_values: torch.Tensor, **_: object) -> torch.Tensor:
        return self.backbone(pixel_values)[1]

    def forward(self, pixel_values: torch.Tensor, **_: object) -> SemanticSegmenterOutput:
        return SemanticSegmenterOutput(logits=self.head(*self.backbone(pixel_values)))


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


def check_hf(config: Any, where: str) -> None:
    if getattr(config, "model_type", "") in ("whisper",) or not (
            getattr(config, "hidden_sizes", None) or getattr(config, "patch_size", None)):
        raise ModelError(f"{where} is not an image backbone (model type {config.model_type!r}); segmentation needs "
                         "an image model: mobilenet-v2, efficientnet-lite0, or a local ResNet / ConvNeXt / ViT folder")
