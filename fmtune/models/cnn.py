"""Image backbones that are not transformers models: EfficientNet-Lite0 (from the
``efficientnet-lite-pytorch`` package) and MobileNetV2 (architecture written here, since
torchvision cannot be a dependency; the state_dict keys match torchvision's so its ImageNet
weights load as they are).

Every backbone here maps ``pixel_values`` (B, 3, H, W) to pooled features (B, num_features) and
exposes ``blocks``: its repeated stages in order, for the ``last_n`` strategy.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, k=1))
        layers += [_conv_bn(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0) feature extractor; ``features.N`` keys as in torchvision."""

    num_features = 1280
    _SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in self._SETTING:
            for i in range(n):
                layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, self.num_features, k=1))
        self.features = nn.Sequential(*layers)

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.features)[1:]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values).mean(dim=(2, 3))

    def forward_prefix(self, pixel_values: torch.Tensor, k: int) -> torch.Tensor:
        """The stem and the first ``k`` blocks: the input of block ``k``."""
        return self.features[: 1 + k](pixel_values)

    def stage_outputs(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after the stem and after every block (dense prediction reads two)."""
        out, x = [], pixel_values
        for layer in self.features:
            x = layer(x)
            out.append(x)
        return out

    def forward_suffix(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Blocks ``k`` and later, then global pooling."""
        return self.features[1 + k:](hidden).mean(dim=(2, 3))


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite feature extractor around ``efficientnet_lite_pytorch.EfficientNet``."""

    def __init__(self, variant: str = "efficientnet-lite0") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name(variant)
        self.num_features = self.net._fc.in_features
        # The ImageNet classifier is replaced by the task head; drop it so it is neither
        # trained nor counted.
        del self.net._fc
        # The TF port uses BatchNorm momentum 0.01: over a short fine-tuning run the running
        # statistics would barely move while the weights adapt to the new data's batch statistics,
        # so evaluation would use stale ImageNet statistics. PyTorch's 0.1 tracks them.
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        # 1x1 stride-1 convolutions need no "same" padding: make them plain nn.Conv2d (same keys, same
        # function), so that peft's LoRA, which copies a layer's class, can adapt them.
        for parent in list(self.modules()):
            for name, child in parent.named_children():
                if (isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1)
                        and tuple(child.stride) == (1, 1) and child.groups == 1):
                    plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                    setattr(parent, name, plain)

    @property
    def blocks(self) -> list[nn.Module]:
        # The 1x1 head convolution and its norm form the last stage after the MBConv blocks.
        return list(self.net._blocks) + [nn.ModuleList([self.net._conv_head, self.net._bn1])]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(pixel_values).mean(dim=(2, 3))

    # extract_features split at block k (same drop-connect schedule), for the frozen-prefix cache
    def _run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        n = len(self.net._blocks)
        for idx in range(start, min(stop, n)):
            rate = self.net._global_params.drop_connect_rate
            x = self.net._blocks[idx](x, drop_connect_rate=rate * idx / n if rate else rate)
        if stop > n:  # the head convolution stage is the last block
            x = self.net._swish(self.net._bn1(self.net._conv_head(x)))
        return x

    def forward_prefix(self, pixel_values: torch.Tensor, k: int) -> torch.Tensor:
        x = self.net._swish(self.net._bn0(self.net._conv_stem(pixel_values)))
        return self._run_blocks(x, 0, k)

    def stage_outputs(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after the stem and after every block (dense prediction reads two)."""
        x = self.net._swish(self.net._bn0(self.net._conv_stem(pixel_values)))
        out = [x]
        for k in range(len(self.net._blocks) + 1):
            x = self._run_blocks(x, k, k + 1)
            out.append(x)
        return out

    def forward_suffix(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        return self._run_blocks(hidden, k, len(self.net._blocks) + 1).mean(dim=(2, 3))

    def load_imagenet(self, state_dict: dict[str, torch.Tensor]) -> None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("_fc.")}
        self.net.load_state_dict(state_dict, strict=True)


class TaskModel(nn.Module):
    """A non-transformers backbone + dropout + linear head; same interface as FmtuneClassifier."""

    def __init__(self, backbone: nn.Module, num_outputs: int, dropout: float = 0.1,
                 output_scale: float = 1.0, output_shift: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.num_features, num_outputs))
        nn.init.normal_(self.head[1].weight, std=0.02)
        nn.init.zeros_(self.head[1].bias)
        self.output_scale, self.output_shift = output_scale, output_shift

    def features(self, pixel_values: torch.Tensor, **_: object) -> torch.Tensor:
        return self.backbone(pixel_values)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head(features)
        if self.output_scale != 1.0 or self.output_shift != 0.0:
            logits = logits * self.output_scale + self.output_shift
        return logits

    def forward(self, pixel_values: torch.Tensor, **_: object):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.classify(self.features(pixel_values)))
