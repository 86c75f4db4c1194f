"""ResNets saved by timm and torchvision, read as transformers' ResNet: the same network (ResNet v1.5, the stride in a
bottleneck's 3x3 convolution) under other names. Three places bring them: DETR's hub checkpoints, whose backbone is
timm's (``fmtune.models.whole``); a weights file a user brings (torchvision's ``resnet50-0676ba61.pth``, a
``state_dict()`` saved with torch.save or safetensors); a timm folder from the hub (``timm/resnet50.a1_in1k``:
config.json naming the ``architecture``, model.safetensors). The last two are converted once into a plain
transformers folder (``ResNetForImageClassification`` with its ImageNet classifier, a processor with the weights'
normalisation) by ``fmtune.zoo.models``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmtune.errors import ModelError

if TYPE_CHECKING:
    import torch

# timm's plain ResNets by name (DETR's configs name them: backbone "resnet50"): block type and blocks per stage
TIMM_RESNETS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
                "resnet50": ("bottleneck", [3, 4, 6, 3]), "resnet101": ("bottleneck", [3, 4, 23, 3]),
                "resnet152": ("bottleneck", [3, 8, 36, 3])}
# torchvision's ImageNet weights are trained on this normalisation (timm's ResNets too unless their config says)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def hf_name(key: str) -> str | None:
    """transformers' ResNet name of a timm or torchvision ResNet's weight (``layer2.0.downsample.1.running_var`` ->
    ``encoder.stages.1.layers.0.shortcut.normalization.running_var``), None for what the backbone has not (``fc``,
    batch counts)."""
    if key.endswith("num_batches_tracked") or key.startswith("fc."):
        return None
    if m := re.fullmatch(r"(conv1|bn1)\.(\w+)", key):
        return f"embedder.embedder.{'convolution' if m[1] == 'conv1' else 'normalization'}.{m[2]}"
    if m := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", key):
        part = "convolution" if m[3] == "0" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{part}.{m[4]}"
    if m := re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", key):
        part = "convolution" if m[3] == "conv" else "normalization"
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}.{part}.{m[5]}"
    return None


def config_of(layer_type: str, depths: list[int], **kw: Any) -> Any:
    """transformers' ResNetConfig of a timm / torchvision ResNet with these blocks."""
    from transformers import ResNetConfig

    widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
    return ResNetConfig(layer_type=layer_type, depths=depths, hidden_sizes=widths, embedding_size=64,
                        downsample_in_first_stage=False, downsample_in_bottleneck=False, **kw)


def is_resnet(state: dict[str, Any]) -> bool:
    """Whether a state dict's names are a timm / torchvision ResNet's (shapes are checked on loading)."""
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state


def read_state(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file a user brings: safetensors, or a torch.save'd state dict read with
    weights_only (nothing is unpickled: a whole pickled model is an error saying to save its state_dict()), the
    dict inside a training checkpoint's ``state_dict`` / ``model`` key, DataParallel's ``module.`` taken off."""
    import torch

    if file.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as e:
            raise ModelError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelError(f"{file} is not a file of weights fmtune can read safely (torch.load with weights_only: "
                         f"{str(e).splitlines()[0][:200]}); fmtune never unpickles a whole model: save its "
                         "state_dict() (torch.save(model.state_dict(), ...)) or use safetensors") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{file} does not hold a state dict (a dict of tensor names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def depths_of(state: dict[str, Any]) -> tuple[str, list[int]]:
    """A ResNet state dict's block type and blocks per stage."""
    layer_type = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    depths = [len({k.split(".")[1] for k in state if k.startswith(f"layer{s}.") and k.split(".")[1].isdigit()})
              for s in range(1, 5)]
    return layer_type, depths


def write_folder(state: dict[str, torch.Tensor], folder: Path, where: str, mean: list[float] = IMAGENET_MEAN,
                 std: list[float] = IMAGENET_STD, size: int = 224, labels: list[str] | None = None) -> None:
    """``folder``: a transformers ResNetForImageClassification of the timm / torchvision ResNet ``state`` (its
    ImageNet classifier kept where it has one), with an image processor of the weights' normalisation. A ModelError
    naming ``where`` for a ResNet transformers' does not express (ResNeXt's groups, a wide ResNet, a deep stem)."""
    from transformers import ResNetForImageClassification

    layer_type, depths = depths_of(state)
    if 0 in depths:
        raise ModelError(f"{where}: a ResNet without all four stages (blocks per stage {depths})")
    classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else None
    names = labels if labels and classes and len(labels) == classes else None
    extra = {"num_labels": classes} if classes else {}
    if names:
        extra.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    model = ResNetForImageClassification(config_of(layer_type, depths, **extra))
    mapped = {f"resnet.{n}": v for k, v in state.items() if (n := hf_name(k)) is not None}
    if classes:
        mapped.update({"classifier.1.weight": state["fc.weight"], "classifier.1.bias": state["fc.bias"]})
    own = model.state_dict()
    missing = sorted(k for k in own if k not in mapped and not k.endswith("num_batches_tracked"))
    left = sorted(k for k in state if hf_name(k) is None and not k.startswith("fc.")
                  and not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k, v in mapped.items() if k in own and own[k].shape != v.shape)
    if missing or left or wrong:
        raise ModelError(f"{where} is not a plain ResNet (ResNet-18 to -152 as torchvision and timm build them) "
                         f"that transformers' ResNet holds: {_what(missing, left, wrong)}; ResNeXt, wide ResNets "
                         "and deep-stem variants are not read: give a transformers model folder")
    model.load_state_dict(mapped, strict=False)
    model.save_pretrained(folder, safe_serialization=True)
    processor = {"image_processor_type": "ConvNextImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                 "crop_pct": 0.875, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _what(missing: list[str], left: list[str], wrong: list[str]) -> str:
    parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("no weights for", missing), ("weights it has no place for:", left),
                                 ("weights of another shape:", wrong)) if keys]
    return "; ".join(parts)


def timm_folder(folder: Path) -> dict[str, Any] | None:
    """A timm folder's config.json (``architecture``, ``pretrained_cfg``, no transformers ``model_type``), else
    None."""
    try:
        values = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or "model_type" in values or "architecture" not in values:
        return None
    return values


def write_timm_folder(source: Path, values: dict[str, Any], folder: Path) -> None:
    """``folder``: the transformers ResNet of the timm folder ``source`` (its weights, normalisation, input size and
    class names from its config)."""
    arch = str(values.get("architecture"))
    files = [source / n for n in ("model.safetensors", "pytorch_model.bin") if (source / n).is_file()]
    if not files:
        raise ModelError(f"{source} is a timm folder ({arch}) without model.safetensors or pytorch_model.bin")
    cfg = values.get("pretrained_cfg") or {}
    size = cfg.get("input_size") or [3, 224, 224]
    write_folder(read_state(files[0]), folder, f"{source} ({arch})", cfg.get("mean") or IMAGENET_MEAN,
                 cfg.get("std") or IMAGENET_STD, int(size[-1]), values.get("label_names"))
