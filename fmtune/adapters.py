"""Parameter-efficient strategies through the ``peft`` library: LoRA, DoRA, IA3, prompt tuning.

The whole task model (backbone + head) is wrapped by ``peft.get_peft_model``; the head is in
``modules_to_save``, so it trains and is saved in the adapter file with the adapter weights
(a reloaded adapter never comes with a random head). Which modules are adapted comes from one
table per architecture (``TARGETS``), falling back to peft's own table and then to every layer
of the right kind; ``strategy.targets`` overrides it and is checked against the backbone first,
so a typo or a module LoRA cannot take is an error that lists what can be chosen.

A run's ``model/`` folder for these strategies is a peft adapter folder (``adapter_config.json``,
``adapter_model.safetensors``) plus the classifier's config: the pretrained backbone is read
from its source (``fmtune.json``: ``source``) when the run is loaded.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from fmtune.config import lora_dropout
from fmtune.errors import ConfigError, ModelError
from fmtune.zoo.models import resolve

PEFT_STRATEGIES = ("lora", "dora", "ia3", "prompt")
# The head's linear layer, trained and saved with the adapter. peft matches modules_to_save by name
# suffix ("head" would also catch EfficientNet's "_conv_head"), so the layer is named more precisely
# and ``wrap`` checks that nothing else was caught.
HEAD_LAYER = "head.1"
MERGEABLE = ("lora", "dora", "ia3")
ADAPTER_NAME = "default"

# Default modules to adapt, per architecture (``config.model_type`` of a transformers backbone, or
# fmtune's CNN family): (lora/dora targets, ia3 targets, ia3 feed-forward subset). Names are
# suffixes of module names. Architectures not listed use peft's table, then the attention projections of a
# LLaMA-like block where there are q_proj / v_proj layers (IA3: k_proj, v_proj, down_proj), then every linear
# layer of the backbone but those peft refuses (every convolution LoRA can take, for CNNs).
TARGETS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "bert": (["query", "value"], ["key", "value", "output.dense"], ["output.dense"]),
    "vit": (["q_proj", "v_proj"], ["k_proj", "v_proj", "fc2"], ["fc2"]),
    "distilbert": (["q_lin", "v_lin"], ["k_lin", "v_lin", "lin2"], ["lin2"]),
}
CONV_ARCHS = ("efficientnet-lite0", "mobilenet-v2")  # fmtune's own CNNs: convolutions are the targets
LLAMA_LIKE = (["q_proj", "v_proj"], ["k_proj", "v_proj", "down_proj"], ["down_proj"])
# what peft refuses to adapt with LoRA in state-space models (peft.tuners.tuners_utils: their fused kernels read
# these weights directly)
NOT_LORA = {("mamba", "mamba2", "falcon_mamba", "falcon_h1", "nemotron_h"): ("out_proj", "conv1d")}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """peft calls a transformers method that transformers 5 marks deprecated; not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def is_peft(name: str) -> bool:
    return name in PEFT_STRATEGIES


def is_linear(module: nn.Module) -> bool:
    """A linear layer peft can adapt: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2, GPT-BigCode:
    a linear layer with its weight stored transposed; peft sets ``fan_in_fan_out`` for it)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def transposed(model: nn.Module, targets: list[str]) -> dict[str, bool]:
    """peft's ``fan_in_fan_out`` setting for ``targets`` (module names or suffixes): on where they
    are ``Conv1D`` layers (peft would otherwise switch it on itself, with a warning)."""
    from transformers.pytorch_utils import Conv1D

    hit = any(isinstance(m, Conv1D) for n, m in model.named_modules() if any(_matches(n, t) for t in targets))
    return {"fan_in_fan_out": True} if hit else {}


def _adaptable(module: nn.Module, method: str) -> str | None:
    """None if ``method`` can adapt ``module``, else why not."""
    if is_linear(module):
        return None
    if isinstance(module, nn.Conv2d):
        if method == "ia3":
            return None  # IA3 scales channels: any convolution
        if module.groups > 1:
            return f"a depthwise/grouped convolution (groups={module.groups}), which LoRA cannot adapt"
        if type(module) is not nn.Conv2d:  # peft builds the LoRA convolutions with the layer's own class
            return f"a {type(module).__name__} (a Conv2d subclass), which peft's LoRA cannot copy"
        return None
    return f"a {type(module).__name__}, not a linear or convolution layer"


def backbone_name(model: nn.Module) -> str:
    """The backbone's module name inside ``model``: "backbone" in fmtune's task models, the transformers model's own
    (``net.model.backbone`` ...) in a whole detector or segmenter (``fmtune.models.whole``)."""
    if not getattr(model, "whole", False):
        return "backbone"
    backbone = model.backbone
    return next(n for n, m in model.named_modules() if m is backbone)


def _backbone_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name relative to the task model, module) for every module of the backbone."""
    prefix = backbone_name(model)
    return [(f"{prefix}.{n}", m) for n, m in model.backbone.named_modules() if n]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def valid_targets(model: nn.Module, method: str) -> list[str]:
    """Names that select only modules ``method`` can adapt: short ones (the last name part, two
    when it is a number) where they are unambiguous, else full names."""
    mods = _backbone_modules(model)
    ok = [n for n, m in mods if _adaptable(m, method) is None]
    shorts: dict[str, None] = {}
    for name in ok:
        parts = name.split(".")
        shorts[".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1]] = None
    clean = [s for s in shorts if all(_adaptable(m, method) is None for n, m in mods if _matches(n, s))]
    return clean or ok


def _choices(model: nn.Module, method: str) -> str:
    names = valid_targets(model, method)
    more = f" ... ({len(names)} in all)" if len(names) > 24 else ""
    return ", ".join(names[:24]) + more


def _arch(bundle: Any) -> str:
    if bundle.family != "hf":
        return bundle.family
    model = bundle.model  # a dense task model holds the transformers model inside its backbone; a whole one in net
    config = getattr(model, "config", None) or getattr(getattr(model, "net", None), "config", None) or getattr(
        getattr(model.backbone, "net", None), "config", None)
    return getattr(config, "model_type", "")


def not_lora(model_type: str) -> tuple[str, ...]:
    """Module names peft refuses to adapt with LoRA in a model of this type."""
    return next((names for types, names in NOT_LORA.items() if model_type in types), ())


def default_targets(bundle: Any, method: str) -> tuple[list[str], list[str]]:
    """(targets, ia3 feed-forward targets) for ``bundle``'s architecture, as module-name suffixes."""
    arch = _arch(bundle)
    if arch in TARGETS:
        lora, ia3, ff = TARGETS[arch]
        return (ia3, ff) if method == "ia3" else (lora, [])
    from peft.utils import constants

    if method == "ia3":
        ia3 = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(arch)
        if ia3:
            return list(ia3), list(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(arch, []))
    else:
        lora = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(arch)
        if lora:
            return list(lora), []
    linear = [n for n, m in _backbone_modules(bundle.model) if is_linear(m)]
    short = {n.rsplit(".", 1)[-1] for n in linear}
    if {"q_proj", "v_proj"} <= short:  # (not every linear layer: an MoE block's router returns its choices too)
        lora, ia3, ff = LLAMA_LIKE
        return ([t for t in ia3 if t in short], [t for t in ff if t in short]) if method == "ia3" else (lora, [])
    refused = not_lora(arch) if method == "lora" else ()
    linear = [n for n in linear if n.rsplit(".", 1)[-1] not in refused]
    if linear and arch not in CONV_ARCHS:
        return linear, []
    convs = [n for n, m in _backbone_modules(bundle.model)
             if isinstance(m, nn.Conv2d) and _adaptable(m, method) is None]
    return convs, []


def resolve_targets(bundle: Any, cfg: Any) -> tuple[list[str], list[str]]:
    """Full module names (relative to the task model) to adapt, and the IA3 feed-forward subset.

    Every requested target must match a backbone module that the method can adapt."""
    method = "ia3" if cfg.name == "ia3" else "lora"
    model = bundle.model
    mods = _backbone_modules(model)
    if cfg.targets is None:
        wanted, ff = default_targets(bundle, method)
        key = "the default targets for this architecture"
        if not wanted:
            layers = [m for _, m in mods if isinstance(m, nn.Conv2d)]
            why = _adaptable(layers[0], method) if layers else "no linear or convolution layer"
            raise ConfigError(f"strategy {cfg.name}: the {type(model.backbone).__name__} backbone has no layer "
                              f"{cfg.name} can adapt (its convolutions: {why}); use --strategy ia3, bitfit, "
                              "last_n or full")
    else:
        wanted = [t.strip() for t in cfg.targets.split(",") if t.strip()]
        ff = []
        key = "strategy.targets"
        if wanted == ["all-linear"]:
            wanted = [n for n, m in mods if is_linear(m)]
            if not wanted:
                raise ConfigError(f"strategy.targets: all-linear: the {type(model.backbone).__name__} backbone has "
                                  f"no linear layers; valid targets: {_choices(model, method)}")
        elif cfg.name == "ia3":
            ff = [t for t in default_targets(bundle, method)[1] if t in wanted]
    names: list[str] = []
    for t in wanted:
        hits = [(n, m) for n, m in mods if _matches(n, t)]
        if not hits:
            raise ConfigError(f"{key}: {t!r} matches no module of the {type(model.backbone).__name__} backbone; "
                              f"valid targets: {_choices(model, method)}")
        for n, m in hits:
            why = _adaptable(m, method)
            if why is not None:
                raise ConfigError(f"{key}: {t!r} matches {n}, {why}; valid targets: {_choices(model, method)}")
            names.append(n)
    ff_names = [n for n in names if any(_matches(n, f) for f in ff)]
    return sorted(set(names)), sorted(set(ff_names))


def peft_config(bundle: Any, cfg: Any) -> Any:
    """The peft config for strategy ``cfg`` on ``bundle``'s model."""
    import peft

    head = head_layers(bundle.model)
    if cfg.name == "prompt":
        if bundle.kind != "text" or bundle.family != "hf":
            what = {"image": "an image model", "audio": "an audio model"}.get(bundle.kind, "not a text encoder")
            raise ConfigError("strategy prompt: prompt tuning puts virtual tokens before a text; "
                              f"{bundle.source} is {what}: use lora, dora, ia3 or bitfit")
        limit = getattr(bundle.model.config, "max_position_embeddings", None)
        if limit and bundle.max_length + cfg.virtual_tokens > limit:
            raise ConfigError(f"strategy.virtual_tokens: {cfg.virtual_tokens} virtual tokens + model.max_length "
                              f"{bundle.max_length} exceed the {limit} positions of this model; lower one of them")
        # the virtual tokens join the word embeddings: ALBERT's and ELECTRA's are narrower than the
        # hidden states peft would size them by, and DistilBERT's config names no size peft reads
        # (peft also wants the heads and layers, unused by prompt tuning; DistilBERT's names are its own)
        dim = bundle.model.backbone.get_input_embeddings().embedding_dim
        bc = bundle.model.backbone.config
        return peft.PromptTuningConfig(task_type=peft.TaskType.FEATURE_EXTRACTION, token_dim=dim,
                                       num_attention_heads=getattr(bc, "num_attention_heads", None) or 1,
                                       num_layers=getattr(bc, "num_hidden_layers", None) or 1,
                                       num_virtual_tokens=cfg.virtual_tokens, modules_to_save=head)
    targets, ff = resolve_targets(bundle, cfg)
    if cfg.name == "ia3":
        return peft.IA3Config(target_modules=targets, feedforward_modules=ff, modules_to_save=head,
                              **transposed(bundle.model, targets))
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=lora_dropout(cfg), target_modules=targets,
                           use_dora=cfg.name == "dora", modules_to_save=head, **transposed(bundle.model, targets))


def head_layers(model: nn.Module) -> list[str]:
    """The names of the head's layers that train and are saved beside an adapter: the linear layer
    of a classifier's head, every layer of a segmentation decoder (``model.head_layers``), or all but the
    backbone of a whole detector or segmenter (``fmtune.models.whole``: its transformer, queries and class
    and box heads; its decode head)."""
    if getattr(model, "whole", False):
        names = {id(m): n for n, m in model.named_modules()}
        out = []
        for m in model.head:  # peft cannot wrap a ModuleList: its layers then, one by one
            out += [names[id(x)] for x in m] if isinstance(m, nn.ModuleList) else [names[id(m)]]
        return out
    if not hasattr(model, "head_layers"):
        return [HEAD_LAYER]
    out = []
    for n in model.head_layers:  # peft cannot wrap a ModuleList: its layers then, one by one
        m = getattr(model.head, n)
        out += [f"head.{n}.{i}" for i in range(len(m))] if isinstance(m, nn.ModuleList) else [f"head.{n}"]
    return out


def wrap(bundle: Any, cfg: Any) -> nn.Module:
    """The bundle's task model wrapped with a fresh adapter for strategy ``cfg``."""
    import peft

    pc = peft_config(bundle, cfg)
    if cfg.name == "prompt":
        # the classifier pools over the real tokens only (see hf_remote.FmtuneClassifier.features)
        bundle.model.config.fmtune_virtual_tokens = cfg.virtual_tokens
    # adapter_config.json records where the base weights are (peft reads it off the model)
    bundle.model.name_or_path = pc.base_model_name_or_path = base_path(bundle.source)
    with _quiet():
        model = keep_conv_geometry(peft.get_peft_model(bundle.model, pc, adapter_name=ADAPTER_NAME))
    from peft.utils import ModulesToSaveWrapper

    saved = sorted(n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper))
    head = head_layers(bundle.model)
    if len(saved) != len(head) or not all(any(n.endswith("model." + h) for n in saved) for h in head):
        raise ModelError(f"peft trained other layers than the head's ({', '.join(head)}) beside the adapter: {saved}")
    return model


CONV_GEOMETRY = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode")


def keep_conv_geometry(model: nn.Module) -> nn.Module:
    """Give each peft layer that wraps a convolution its convolution's shape attributes: models
    that pad by hand read them off the layer (transformers' MobileNetV2 and EfficientNet:
    TensorFlow-style "same" padding), and peft's wrapper does not carry them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        base = m.get_base_layer() if isinstance(m, BaseTunerLayer) else None
        if isinstance(base, nn.Conv2d):
            for attr in CONV_GEOMETRY:
                if attr not in m.__dict__ and not hasattr(type(m), attr):
                    setattr(m, attr, getattr(base, attr))
    return model


def base_path(source: str) -> str:
    """Where the pretrained weights of ``source`` (a zoo name or a path) are on this machine."""
    try:
        return str(resolve(source)[1])
    except ModelError:
        return source


def save(model: nn.Module, target: Path) -> None:
    """Write the adapter (and the head, via modules_to_save) as a peft adapter folder."""
    model.save_pretrained(target, save_embedding_layers=False)
    readme = target / "README.md"  # peft's model-card template says nothing about this run
    if readme.exists():
        readme.unlink()


def load(base: nn.Module, model_dir: Path, trainable: bool = False) -> nn.Module:
    import peft

    with _quiet():
        return keep_conv_geometry(peft.PeftModel.from_pretrained(base, model_dir, adapter_name=ADAPTER_NAME,
                                                                 is_trainable=trainable))


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Load the adapter weights saved in ``model_dir`` into an already-wrapped model."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_peft_weights(str(model_dir)), adapter_name=ADAPTER_NAME)
    # prompt embeddings are loaded by peft directly into the prompt encoder, and listed anyway
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if k != "prompt_embeddings"]
    if unexpected:
        raise ModelError(f"{model_dir}: adapter weights do not fit the model (unexpected {unexpected[:3]})")


def merge(model: nn.Module, strategy: str) -> nn.Module:
    """The plain task model with the adapter folded into its weights (and the trained head)."""
    if strategy not in MERGEABLE:
        raise ConfigError(f"--merge: a {strategy} adapter cannot be folded into the weights "
                          f"(only {', '.join(MERGEABLE)} can); export it without --merge")
    from peft.utils import ModulesToSaveWrapper

    for name, m in list(model.named_modules()):  # the trained copies of the head's layers in their place
        if isinstance(m, ModulesToSaveWrapper):
            # (peft's IA3 unloading copies a layer's .weight over: a head layer without one, a Sequential, failed)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, m.modules_to_save[ADAPTER_NAME])
    return model.merge_and_unload()


def base_model(model: nn.Module) -> nn.Module:
    """The task model inside a peft wrapper (itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
