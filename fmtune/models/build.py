"""Create a backbone + head for a task, save it to a run's ``model/`` folder, load it back.

A ``Bundle`` holds the model and the preprocessing it was trained with (a tokenizer, or the
image size and normalisation), so every later verb uses exactly the same inputs.
"""

from __future__ import annotations

import copy
import inspect
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fmtune import adapters
from fmtune.config import resolve_max_length
from fmtune.errors import ModelError, brief
from fmtune.fsutil import atomic_dir, read_json
from fmtune.models import causal_lm, cnn, dense, whole
from fmtune.models.hf_remote import FMTUNE_MODEL_TYPE, FmtuneClassifier, build_backbone, config_from_values
from fmtune.zoo.models import resolve, resolve_base  # noqa: F401  (build.resolve: where a model name leads)

META_FILE = "fmtune.json"
DEFAULT_MAX_LENGTH = 128  # model.max_length of sequence- and token-level text tasks
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CNN_FAMILIES = {
    "efficientnet-lite0": dict(make=lambda: cnn.EfficientNetLite("efficientnet-lite0"), size=224,
                               mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    "mobilenet-v2": dict(make=cnn.MobileNetV2, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
_AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_fmtune.FmtuneClassifier",
             "AutoModelForImageClassification": "modeling_fmtune.FmtuneClassifier",
             "AutoModelForAudioClassification": "modeling_fmtune.FmtuneClassifier"}


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


_quiet_transformers()


@dataclass
class Bundle:
    model: nn.Module
    kind: str  # "text" | "image" | "audio"
    family: str  # "hf" or a key of CNN_FAMILIES
    pooling: str
    tokenizer: Any = None
    image: dict = field(default_factory=dict)  # size, mean, std
    audio: dict = field(default_factory=dict)  # fmtune.data.audio.AudioSpec as a dict
    max_length: int = 128
    source: str = ""  # the model name or path it was created from
    adapter: str | None = None  # the peft strategy when ``model`` is wrapped by peft (fmtune.adapters)
    segments: bool | None = None  # whether pairs of texts get segment ids (``uses_segments``, decided once)
    pretrained: bool = True  # False: model.init random (nothing learned yet: no layer is kept as it is)
    converted: str | None = None  # the folder a GGUF / CTranslate2 source was converted into, as a run recorded it

    def text_data(self, texts: list[str] | list[tuple[str, str]], targets: Any = None) -> Any:
        """Texts as the model reads them: token ids, truncated at ``max_length``, without padding
        (each batch pads itself). The one place text is tokenised for a sequence-level head. Pairs
        of texts (``data.text_pair_column``) are read as the tokenizer joins two texts, the longer
        cut first, with their segment ids where the model has them."""
        from fmtune.data.dataset import TextData

        tok = self.tokenizer
        texts = list(texts)
        pairs = bool(texts) and isinstance(texts[0], tuple)
        if pairs:
            enc = tok([a for a, _ in texts], [b for _, b in texts], truncation="longest_first",
                      max_length=self.max_length)
        else:
            enc = tok(texts, truncation=True, max_length=self.max_length)
        segments = enc.get("token_type_ids") if pairs and self.uses_segments() else None
        return TextData(enc["input_ids"], targets, tok.pad_token_id if tok.pad_token_id is not None else 0, segments,
                        pairs)

    def uses_segments(self) -> bool:
        """Whether the text model reads segment ids: its tokenizer makes them, its backbone takes
        them and has more than one (BERT's token types; not RoBERTa's kin, MPNet, ModernBERT).
        Decided on the torch model and kept, so an ONNX-backed predictor feeds what its graph takes."""
        if self.segments is None:
            backbone = getattr(adapters.base_model(self.model), "backbone", None) if self.model is not None else None
            self.segments = bool(
                "token_type_ids" in getattr(self.tokenizer, "model_input_names", []) and backbone is not None
                and "token_type_ids" in inspect.signature(backbone.forward).parameters
                and getattr(backbone.config, "type_vocab_size", 2) > 1)
        return self.segments

    def length_limit(self) -> int | None:
        """The most tokens the text model reads: its tokenizer's ``model_max_length``, else its
        config's ``max_position_embeddings``; None where neither says."""
        said = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(said, int) and 0 < said < 1_000_000:  # tokenizers without a limit say 1e30
            return said
        positions = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return positions if isinstance(positions, int) and positions > 0 else None

    def meta(self) -> dict[str, Any]:
        from fmtune.zoo.models import converted_folder

        return {"kind": self.kind, "family": self.family, "pooling": self.pooling, "image": self.image,
                "audio": self.audio, "max_length": self.max_length, "source": self.source, "adapter": self.adapter,
                "converted": (converted_folder(self.source) or self.converted) if self.adapter else None}


# Image transformers whose first token is not a class token to read, and what their own classifier reads instead:
# Swin's tokens are patches only (its classifier averages them: ``mean``), SigLIP's vision tower has no class token
# (its attention-pooling head: ``pooler``), BEiT and data2vec-vision pretrain no summary in theirs (their pooler
# averages the patches)
IMAGE_POOLING = {"swin": "mean", "swinv2": "mean", "donut-swin": "mean", "siglip_vision_model": "pooler",
                 "siglip2_vision_model": "pooler", "beit": "pooler", "data2vec-vision": "pooler"}


def _hf_pooling(path: Path | str, config: Any, kind: str, requested: str) -> str:
    if requested != "auto":
        return requested
    if kind == "audio":  # AST: its own pooled output (the mean of its class and distillation tokens)
        # the others: the mean over the clip's frames (Whisper's encoder has no summary token)
        return "pooler" if config.model_type in SPECTROGRAM_ENCODERS else "mean"
    if kind == "image":
        if getattr(config, "hidden_sizes", None):  # CNNs: ResNet, ConvNeXt, ... pool globally
            return "pooler"
        if config.model_type in IMAGE_POOLING:  # transformers without a class token, or not trained to summarise
            return IMAGE_POOLING[config.model_type]
        return "cls" if getattr(config, "patch_size", None) else "mean"
    st = read_json(Path(path) / "1_Pooling" / "config.json", {}) if isinstance(path, Path) else {}
    if st.get("pooling_mode_mean_tokens"):
        return "mean"  # sentence-transformers encoders were trained with mean pooling
    if getattr(config, "is_encoder_decoder", False):
        return "mean"  # the encoder of a text encoder-decoder (T5, BART): no summary token (as Sentence-T5)
    if causal_lm.is_decoder_only(config):
        return "last"  # a causal decoder's first token has read nothing else (a head on it learns nothing)
    return "cls"


def _hf_num_features(config: Any) -> int | None:
    """The pooled feature size a config states, or None (then ``_probe_num_features`` measures it)."""
    if getattr(config, "add_adapter", False) and isinstance(getattr(config, "output_hidden_size", None), int):
        return config.output_hidden_size  # (wav2vec2 kin with an adapter after the encoder: its width)
    for attr in ("hidden_size", "d_model", "dim"):
        if isinstance(getattr(config, attr, None), int):
            return getattr(config, attr)
    sizes = getattr(config, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    return None


def _probe_num_features(backbone: nn.Module, config: Any, pooling: str, kind: str) -> int:
    """The pooled feature size of a backbone whose config does not state it (MobileNetV2 and
    EfficientNet in transformers: the last convolution's channels follow from width multipliers),
    measured on one small input."""
    from fmtune.models.hf_remote import pool

    if kind != "image":
        raise ModelError(f"cannot tell the feature size of model type {config.model_type!r} "
                         "(its config has no hidden_size, d_model, dim or hidden_sizes)")
    size = getattr(config, "image_size", None) or 224
    size = size if isinstance(size, int) else int(size[0])
    with torch.no_grad():
        out = backbone.eval()(pixel_values=torch.zeros(1, getattr(config, "num_channels", 3), size, size))
    return int(pool(out, None, pooling).shape[-1])


def _image_spec(path: Path | str, config: Any, size: int | None) -> dict[str, Any]:
    pp = read_json(Path(path) / "preprocessor_config.json", {}) if isinstance(path, Path) else {}
    s = pp.get("size") or {}
    default = (s.get("height") or s.get("shortest_edge")) if isinstance(s, dict) else s
    spec = {"size": int(size or default or getattr(config, "image_size", 224)),
            "mean": pp.get("image_mean", IMAGENET_MEAN), "std": pp.get("image_std", IMAGENET_STD)}
    if pp.get("do_normalize") is False:  # pixels in [0, 1] as they are (RT-DETR's processor)
        spec.update(mean=[0.0] * 3, std=[1.0] * 3)
    return spec


AUDIO_CHOICES = "whisper-tiny-en, or a local Whisper, wav2vec2, w2v-BERT, HuBERT, WavLM or AST folder"
# wav2vec2-style encoders (CTC models for speech recognition): the waveform's, and w2v-BERT (stacked filterbank)
AUDIO_ENCODERS = ("wav2vec2", "wav2vec2-conformer", "hubert", "wavlm", "data2vec-audio", "sew", "sew-d", "unispeech",
                  "unispeech-sat", "wav2vec2-bert")
STACKED_ENCODERS = ("wav2vec2-bert",)  # read SeamlessM4T's stacked filterbank (data.audio.StackedFbank)
SPECTROGRAM_ENCODERS = ("audio-spectrogram-transformer",)  # read a fixed-size filterbank (data.audio.Fbank)


def _audio_kind(path: Path | str, config: Any) -> str | None:
    """"audio" for a Whisper model, a wav2vec2-style encoder (wav2vec2, HuBERT, WavLM ..., w2v-BERT) or a
    spectrogram transformer (AST)."""
    model_type = getattr(config, "model_type", "")
    return "audio" if model_type == "whisper" or model_type in AUDIO_ENCODERS + SPECTROGRAM_ENCODERS else None


WAVEFORM_WINDOW = 30.0  # seconds a raw-waveform encoder reads at once unless model.audio_window says otherwise


def _window(window: float | None, path: Path | str, default: float, longest: float | None = None) -> float:
    """The seconds a model reads at once: model.audio_window (ModelConfig holds it to 1 s at least), at most the
    ``longest`` the model holds, else ``default``."""
    if window is not None and longest is not None and window > longest:
        raise ModelError(f"model.audio_window={window:g} s: {path} reads at most {longest:g} s at once")
    return float(window or default)


def _audio_spec(path: Path | str, config: Any, window: float | None) -> dict[str, Any]:
    """How the model reads audio, from its feature extractor's settings (preprocessor_config.json):
    Whisper's log-mel settings and window (its own 30 s unless model.audio_window is shorter), or a
    raw-waveform encoder's sampling rate and normalisation (windows of WAVEFORM_WINDOW seconds), or a
    spectrogram transformer's filterbank: its frames (config max_length) and normalisation, or w2v-BERT's
    stacked filterbank (SeamlessM4TFeatureExtractor's mel bands and stride; windows of WAVEFORM_WINDOW seconds)."""
    from fmtune.data.audio import FBANK, STACKED, WAVEFORM, AudioSpec, Fbank
    from fmtune.models.ctc import CTC_ONLY_TYPES
    from fmtune.models.speech import FBANK_SPEECH_TYPES

    pp = read_json(Path(path) / "preprocessor_config.json", {}) if isinstance(path, Path) else {}
    rate = int(pp.get("sampling_rate", 16000))
    if getattr(config, "model_type", "") in STACKED_ENCODERS:
        mels, stride = int(pp.get("num_mel_bins", 80)), int(pp.get("stride", 2))
        if rate != 16000 or mels * stride != config.feature_projection_input_dim:
            raise ModelError(f"{path}: preprocessor_config.json says sampling_rate {rate}, num_mel_bins {mels}, "
                             f"stride {stride}; the model reads {config.feature_projection_input_dim} features per "
                             "frame (num_mel_bins x stride) at 16000 Hz, as SeamlessM4TFeatureExtractor computes them")
        seconds = _window(window, path, WAVEFORM_WINDOW)
        return AudioSpec(frontend=STACKED, sampling_rate=rate, n_mels=mels, n_fft=Fbank.FFT, hop_length=160,
                         stride=stride, window_seconds=seconds, encoder_seconds=seconds).as_dict()
    if getattr(config, "model_type", "") in FBANK_SPEECH_TYPES:
        return _speech2text_spec(path, config, pp, window)
    if getattr(config, "model_type", "") in CTC_ONLY_TYPES:
        return _parakeet_spec(path, config, pp, window)
    if getattr(config, "model_type", "") in SPECTROGRAM_ENCODERS:
        if rate != 16000:  # (the extractor's frame length and FFT size are fixed for 16 kHz)
            raise ModelError(f"{path}: preprocessor_config.json says sampling_rate {rate}; fmtune reads AST models "
                             "at 16000 Hz, as transformers' ASTFeatureExtractor does")
        frames, hop = int(config.max_length), 160
        longest = (Fbank.FRAME + (frames - 1) * hop) / rate
        return AudioSpec(frontend=FBANK, normalize=bool(pp.get("do_normalize", True)), sampling_rate=rate,
                         n_mels=int(config.num_mel_bins), n_fft=Fbank.FRAME, hop_length=hop,
                         window_seconds=_window(window, path, longest, longest), encoder_seconds=longest, frames=frames,
                         mean=float(pp.get("mean", -4.2677393)), std=float(pp.get("std", 4.5689974))).as_dict()
    if getattr(config, "model_type", "") != "whisper":
        seconds = _window(window, path, WAVEFORM_WINDOW)
        return AudioSpec(frontend=WAVEFORM, normalize=bool(pp.get("do_normalize", True)), sampling_rate=rate,
                         window_seconds=seconds, encoder_seconds=seconds).as_dict()
    longest = 2 * config.max_source_positions * pp.get("hop_length", 160) / rate
    return AudioSpec(sampling_rate=rate, n_mels=int(config.num_mel_bins),
                     n_fft=int(pp.get("n_fft", 400)), hop_length=int(pp.get("hop_length", 160)),
                     window_seconds=_window(window, path, longest, longest), encoder_seconds=float(longest)).as_dict()


def _speech2text_spec(path: Path | str, config: Any, pp: dict[str, Any], window: float | None) -> dict[str, Any]:
    """A Speech2Text model's features (Speech2TextFeatureExtractor's): the Kaldi filterbank of SeamlessM4T's, one
    frame an input (stride 1), each band normalised over the window (utterance CMVN) unless the extractor says not;
    windows of WAVEFORM_WINDOW seconds (its positions hold minutes) unless model.audio_window says otherwise."""
    from fmtune.data.audio import SPEECH2TEXT, STACKED, AudioSpec, Fbank

    rate, mels = int(pp.get("sampling_rate", 16000)), int(pp.get("num_mel_bins", 80))
    reads = int(config.input_feat_per_channel) * int(config.input_channels)
    if rate != 16000 or mels != reads:
        raise ModelError(f"{path}: preprocessor_config.json says sampling_rate {rate}, num_mel_bins {mels}; the model "
                         f"reads {reads} filterbank bands a frame at 16000 Hz, as Speech2TextFeatureExtractor computes "
                         "them")
    cmvn = bool(pp.get("do_ceptral_normalize", True))
    if cmvn and not (pp.get("normalize_means", True) and pp.get("normalize_vars", True)):
        raise ModelError(f"{path}: preprocessor_config.json normalises the filterbank's means or its deviations but "
                         "not both; fmtune reads Speech2Text models that normalise both (or neither)")
    positions = int(config.max_source_positions) * 2 ** int(config.num_conv_layers) * 160 / rate
    seconds = _window(window, path, min(WAVEFORM_WINDOW, positions), positions)
    return AudioSpec(frontend=STACKED, normalize=cmvn, sampling_rate=rate, n_mels=mels, n_fft=Fbank.FFT,
                     hop_length=160, stride=1, extractor=SPEECH2TEXT, subsample=2 ** int(config.num_conv_layers),
                     window_seconds=seconds, encoder_seconds=seconds).as_dict()


def _parakeet_spec(path: Path | str, config: Any, pp: dict[str, Any], window: float | None) -> dict[str, Any]:
    """A Parakeet CTC model's features (ParakeetFeatureExtractor's, ``data.audio.ParakeetMel``), in windows of
    WAVEFORM_WINDOW seconds unless model.audio_window says otherwise."""
    from fmtune.data.audio import PARAKEET, STACKED, AudioSpec, ParakeetMel

    enc = config.encoder_config
    got = {k: pp.get(k, default) for k, default in (("sampling_rate", 16000), ("feature_size", 80), ("n_fft", 512),
                                                    ("hop_length", 160), ("win_length", 400), ("preemphasis", 0.97))}
    want = {"sampling_rate": 16000, "feature_size": int(enc.num_mel_bins), "n_fft": 512, "hop_length": 160,
            "win_length": ParakeetMel.WINDOW, "preemphasis": 0.97}
    if got != want:
        wrong = ", ".join(f"{k} {got[k]} (fmtune reads {want[k]})" for k in want if got[k] != want[k])
        raise ModelError(f"{path}: preprocessor_config.json says {wrong}: fmtune reads Parakeet models at NeMo's "
                         "usual settings, the model's mel bands as its config says")
    seconds = _window(window, path, WAVEFORM_WINDOW)
    return AudioSpec(frontend=STACKED, sampling_rate=16000, n_mels=int(enc.num_mel_bins), n_fft=512, hop_length=160,
                     stride=1, extractor=PARAKEET, subsample=int(enc.subsampling_factor), window_seconds=seconds,
                     encoder_seconds=seconds).as_dict()


def _create_speech(model_cfg: Any, task: Any) -> Bundle:
    """The pretrained speech model named by ``model_cfg.name`` (a zoo name, a local Whisper folder or
    a local ``*ForCTC`` folder: wav2vec2, HuBERT, WavLM ...), its tokenizer and audio settings."""
    from transformers import AutoModelForSpeechSeq2Seq

    from fmtune.models import ctc, speech
    from fmtune.models.speech import SPEECH_MODEL_TYPES
    from fmtune.tasks.speech import prefix_ids

    family, path = resolve(model_cfg.name)
    if family != "hf":
        raise ModelError(f"task {task.name} needs a speech model; {model_cfg.name} is not one (use "
                         "whisper-tiny-en, or a local Whisper folder (Hugging Face or CTranslate2 format), a "
                         "Moonshine or Speech2Text folder or a wav2vec2-style or Parakeet CTC folder)")
    config = _config_at(path)
    reads_audio = _audio_kind(path, config) or config.model_type in speech.SPEECH_MODEL_TYPES + ctc.CTC_ONLY_TYPES
    audio = _audio_spec(path, config, model_cfg.audio_window) if reads_audio else {}
    if config.model_type in AUDIO_ENCODERS + ctc.CTC_ONLY_TYPES:  # a CTC model: one token distribution per frame
        model, tokenizer = ctc.create(path, config, model_cfg.init, getattr(task, "alphabet", None))
        return Bundle(model, "audio", ctc.FAMILY, "none", tokenizer=tokenizer, audio=audio, max_length=0,
                      source=str(model_cfg.name))
    if config.model_type not in SPEECH_MODEL_TYPES:
        raise ModelError(f"task {task.name} needs a speech model; {model_cfg.name} is a model of type "
                         f"{config.model_type!r} (use whisper-tiny-en, or a local Whisper, Moonshine, Speech2Text, "
                         "wav2vec2-style or Parakeet CTC folder)")
    model, tokenizer = causal_lm.load_pretrained(path, config, model_cfg.init, AutoModelForSpeechSeq2Seq)
    prefix_ids(tokenizer, getattr(task, "language", None), model)  # a wrong language is an error now, not at the end
    return Bundle(model, "audio", speech.FAMILY, "none", tokenizer=tokenizer, audio=audio,
                  max_length=speech.max_target_positions(model), source=str(model_cfg.name))


def create(model_cfg: Any, task: Any) -> Bundle:
    """Build the pretrained backbone named by ``model_cfg.name`` plus a fresh head for ``task``."""
    if task.level == "lm" and task.modality == "audio":  # a speech model that transcribes (speech recognition)
        return _create_speech(model_cfg, task)
    if task.level == "dense":  # an image backbone + a decoder to every pixel (segmentation)
        return _create_dense(model_cfg, task)
    if task.level == "lm":  # a model that generates text with its own output layer: a causal LM or T5/BART-like
        model, tokenizer, max_length, family = causal_lm.create(model_cfg, task)
        return Bundle(model, "text", family, "none", tokenizer=tokenizer, max_length=max_length,
                      source=str(model_cfg.name))
    family, path = resolve(model_cfg.name)
    if family == causal_lm.FAMILY:
        raise ModelError(f"{model_cfg.name} is a causal language model: it generates text (--task generation)")
    if task.modality == "audio" and family in CNN_FAMILIES:
        raise ModelError(f"task {task.name} reads audio; {model_cfg.name} is an image model: use an audio encoder "
                         f"({AUDIO_CHOICES})")
    scale, shift = task.output_affine()
    if task.level == "tokens" and family in CNN_FAMILIES:
        raise ModelError(f"task {task.name} labels the tokens of a text; {model_cfg.name} is an image model: "
                         "use a text encoder (minilm-l6, or a local BERT-like folder)")
    if family in CNN_FAMILIES:
        spec = CNN_FAMILIES[family]
        backbone = _pretrained_cnn(family, path) if model_cfg.init == "pretrained" else spec["make"]()
        model = cnn.TaskModel(backbone, task.num_outputs, model_cfg.head_dropout, scale, shift)
        image = {"size": model_cfg.image_size or spec["size"], "mean": spec["mean"], "std": spec["std"]}
        pooling = "mean" if model_cfg.pooling == "auto" else model_cfg.pooling
        if pooling != "mean":
            raise ModelError(f"model.pooling: {family} pools globally (mean); {pooling!r} does not apply")
        return Bundle(model, "image", family, pooling, image=image, source=model_cfg.name)
    return _create_hf(path, model_cfg, task, scale, shift)


def _refuse_transcriber(config: Any, path: Path | str, task: Any) -> None:
    """A ModelError for a speech recognition model that is no audio encoder fmtune reads for other tasks (Moonshine,
    Speech2Text, Parakeet: a Whisper's encoder is one) under another task (its tokenizer made it look like a text
    model)."""
    from fmtune.models.ctc import CTC_ONLY_TYPES
    from fmtune.models.speech import SPEECH_MODEL_TYPES

    model_type = getattr(config, "model_type", "")
    if model_type in SPEECH_MODEL_TYPES + CTC_ONLY_TYPES and _audio_kind(path, config) is None:
        raise ModelError(f"{path} is a speech recognition model ({model_type}): fmtune fine-tunes it with --task "
                         f"speech-recognition; task {task.name} needs "
                         + (f"an audio encoder ({AUDIO_CHOICES})" if task.modality == "audio" else
                            f"a {task.modality} model"))


DENSE_SIZE = 320  # model.image_size of segmentation and detection on a CNN unless set: objects and edges need pixels


def _dense_net(family: str, path: Path | str, init: str, image_size: int | None,
               task: str = "segmentation") -> tuple[nn.Module, dict[str, Any]]:
    """The image backbone ``path`` of ``family`` (pretrained or random) and its input settings: a
    CNN reads DENSE_SIZE pixels unless model.image_size says otherwise (its classification size,
    224, leaves small objects a few cells wide); a ViT its own size (its position embeddings)."""
    if family in CNN_FAMILIES:
        spec = CNN_FAMILIES[family]
        net = _pretrained_cnn(family, path) if init == "pretrained" else spec["make"]()
        return net, {"size": image_size or DENSE_SIZE, "mean": spec["mean"], "std": spec["std"]}
    if family != "hf":
        raise ModelError(f"{path} is not an image backbone; {task} needs an image model: mobilenet-v2, "
                         "efficientnet-lite0, or a local ResNet / ConvNeXt / ViT folder")
    config = tower_config(_config_at(path), "vision")
    dense.check_hf(config, str(path), task)
    net = dense.hf_net(config, str(path) if init == "pretrained" else None)
    cnn_like = bool(getattr(config, "hidden_sizes", None))  # ResNet, ConvNeXt ... (a ViT has one hidden_size)
    return net, _image_spec(path, config, image_size or (DENSE_SIZE if cnn_like else None))


def _create_dense(model_cfg: Any, task: Any) -> Bundle:
    family, path = resolve(model_cfg.name)
    kind = whole.kind_of(_config_at(path).to_dict(), task.dense_head) if family == "hf" else None
    if kind is not None:  # a whole detector or segmenter (RT-DETR, UperNet, Mask2Former ...): a new classifier
        model = whole.create(path, task.labels, model_cfg.init == "pretrained", kind)
        image = _image_spec(path, model.net.config, model_cfg.image_size)
        if model.set_prediction:  # (its batches carry the boxes or masks to it: it computes its own loss)
            image["set_prediction"] = True
        return Bundle(model, "image", family, "none", image=image, source=str(model_cfg.name))
    net, image = _dense_net(family, path, model_cfg.init, model_cfg.image_size, task.name)
    model = dense.HEADS[task.dense_head](dense.DenseBackbone(net, int(image["size"])), task.num_outputs)
    return Bundle(model, "image", family, "none", image=image, source=str(model_cfg.name))


def _pretrained_cnn(family: str, path: Path | str) -> nn.Module:
    backbone = CNN_FAMILIES[family]["make"]()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if family == "mobilenet-v2":
        sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
        backbone.load_state_dict(sd, strict=True)
    else:
        backbone.load_imagenet(sd)
    return backbone


def _create_hf(path: Path | str, model_cfg: Any, task: Any, scale: float, shift: float) -> Bundle:
    from transformers import AutoTokenizer

    config = _config_at(path)
    _refuse_transcriber(config, path, task)
    tower = None
    if two_towers(config):  # CLIP, SigLIP ...: one tower is the backbone (api resolves auto from the data)
        tower = model_cfg.tower if model_cfg.tower != "auto" else ("text" if task.level == "tokens" else "vision")
        config = tower_config(config, tower)
    is_image = isinstance(path, Path) and (path / "preprocessor_config.json").exists() and not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    kind = {"vision": "image", "text": "text"}.get(tower) or _audio_kind(path, config) or (
        "image" if is_image else "text")
    if kind == "image":
        dense.check_whole_model(config, str(path), task.name)
        pp = read_json(Path(path) / "preprocessor_config.json", {})
        if "sampling_rate" in pp:  # an audio feature extractor: an audio model of a kind fmtune does not read
            raise ModelError(f"{path} is an audio model fmtune does not read (model type {config.model_type!r}, "
                             f"read by {pp.get('feature_extractor_type', 'its own feature extractor')}); use "
                             f"{AUDIO_CHOICES}")
    if (kind == "audio") != (task.modality == "audio"):
        raise ModelError(f"task {task.name} reads audio; {path} is {'an' if kind == 'image' else 'a'} {kind} model: "
                         "use an audio encoder "
                         f"({AUDIO_CHOICES})" if kind != "audio" else
                         f"{path} is an audio model ({config.model_type}); {task.name} does not read audio: "
                         "use --task audio-classification")
    if task.level == "tokens" and kind != "text":
        raise ModelError(f"task {task.name} labels the tokens of a text; {path} is an image model: use a text encoder")
    # a tower's own pooled output: CLIP's final-normed class (image) or end-of-text (text) token, SigLIP's heads
    pooling = "pooler" if tower and model_cfg.pooling == "auto" else _hf_pooling(path, config, kind, model_cfg.pooling)
    labels = task.labels or ["value"]
    config.num_labels = task.num_outputs
    config.id2label = {i: n for i, n in enumerate(labels)}
    config.label2id = {n: i for i, n in enumerate(labels)}
    config.problem_type = task.hf_problem_type
    config.fmtune_level = task.level
    config.fmtune_pooling = pooling
    config.fmtune_head_dropout = model_cfg.head_dropout
    config.fmtune_output_scale, config.fmtune_output_shift = scale, shift
    config.auto_map = dict(_AUTO_MAP) if task.level == "pooled" else {
        "AutoModelForTokenClassification": "modeling_fmtune.FmtuneClassifier"}
    config.architectures = ["FmtuneClassifier"]
    try:
        backbone = build_backbone(config, pooling, str(path) if model_cfg.init == "pretrained" else None)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config) if kind == "text" else None
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"cannot load the pretrained model at {path}: {brief(e)}") from None
    backbone.float()
    config.fmtune_num_features = _hf_num_features(config) or _probe_num_features(backbone, config, pooling, kind)
    model = FmtuneClassifier(config, backbone=backbone)
    image = _image_spec(path, config, model_cfg.image_size) if kind == "image" else {}
    audio = _audio_spec(path, config, model_cfg.audio_window) if kind == "audio" else {}
    bundle = Bundle(model, kind, "hf", pooling, tokenizer=tokenizer, image=image, audio=audio,
                    max_length=model_cfg.max_length or DEFAULT_MAX_LENGTH, source=str(model_cfg.name),
                    pretrained=model_cfg.init == "pretrained")
    if kind == "text":
        bundle.max_length = resolve_max_length(model_cfg.max_length, DEFAULT_MAX_LENGTH, bundle.length_limit(),
                                               model_cfg.name)
    return bundle


def save(bundle: Bundle, target: Path) -> None:
    """Save model + preprocessing to ``target`` atomically."""
    atomic_dir(target, lambda tmp: _write(bundle, tmp))


def head_linear(model: nn.Module) -> nn.Linear:
    """The linear layer of the task head (the trained copy when peft wraps the head)."""
    return _head_layers(model)[1]


def _head_layers(model: nn.Module) -> tuple[nn.Dropout, nn.Linear]:
    """The task head's dropout and linear layer (also when peft wraps the head)."""
    mods = list(model.head.modules())
    return ([m for m in mods if isinstance(m, nn.Dropout)][0], [m for m in mods if isinstance(m, nn.Linear)][-1])


def _write(bundle: Bundle, tmp: Path) -> None:
    meta = bundle.meta()
    if bundle.family in causal_lm.FAMILIES:  # a transformers folder (or its adapter) and the tokenizer
        causal_lm.write(bundle, tmp)
        if bundle.family == causal_lm.SPEECH_FAMILY:  # and the feature extractor
            from fmtune.models.speech import write_extra

            write_extra(bundle, tmp)
        elif bundle.family == causal_lm.CTC_FAMILY:
            from fmtune.data.audio import feature_extractor

            feature_extractor(bundle.audio).save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        return
    base = adapters.base_model(bundle.model)
    if bundle.adapter:
        adapters.save(bundle.model, tmp)  # the adapter and the trained head; the backbone comes from its source
    if isinstance(base, whole.WholeModel):  # a transformers detector or segmenter folder (an adapter's: its config)
        whole.save(base, tmp, bundle.source, int(bundle.image["size"]), weights=not bundle.adapter)
        meta["dense"] = {"num_outputs": base.num_classes, "head": base.kind}
    elif isinstance(base, dense.DenseTaskModel):  # the whole model's weights; a transformers backbone's config
        if not bundle.adapter:
            save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp / "model.safetensors"))
        if base.backbone.is_hf:
            base.backbone.net.config.save_pretrained(tmp)
        meta["dense"] = {"num_outputs": base.num_classes,
                         "head": next(k for k, v in dense.HEADS.items() if isinstance(base, v))}
    elif bundle.family == "hf":
        standard = None if bundle.adapter else _as_token_classifier(base)
        if bundle.adapter:
            base.config.save_pretrained(tmp)
        elif standard is not None:  # transformers' own class: loads without fmtune or remote code
            standard.save_pretrained(tmp, safe_serialization=True)
            meta["layout"] = TOKEN_LAYOUT
        else:
            base.save_pretrained(tmp, safe_serialization=True)
        if meta.get("layout") != TOKEN_LAYOUT:
            _mark_config(tmp)
        shutil.copyfile(Path(__file__).with_name("hf_remote.py"), tmp / "modeling_fmtune.py")
        if bundle.tokenizer is not None:
            bundle.tokenizer.save_pretrained(tmp)
        if bundle.kind == "audio":  # the feature extractor its inputs match
            from fmtune.data.audio import feature_extractor

            feature_extractor(bundle.audio).save_pretrained(tmp)
    else:
        if not bundle.adapter:
            state = {k: v.contiguous() for k, v in base.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
        dropout, linear = _head_layers(base)
        meta.update(num_outputs=linear.out_features, head_dropout=dropout.p,
                    output_scale=base.output_scale, output_shift=base.output_shift)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


TOKEN_LAYOUT = "AutoModelForTokenClassification"
ST_FOLDER = "sentence-transformers"


def sentence_transformer_layout(bundle: Bundle, folder: Path) -> bool:
    """The fine-tuned text encoder (no head) in the sentence-transformers layout under ``folder``:
    the backbone as a plain transformers model (its own model type: loads without remote code),
    the tokenizer, modules.json and the pooling the head reads (mean or CLS), so
    ``SentenceTransformer(folder)`` embeds texts as the run's head sees them. Returns False where
    there is no such layout (images, token-level heads, pooler outputs, an unmerged adapter)."""
    model = bundle.model
    if (bundle.kind != "text" or bundle.family != "hf" or bundle.adapter or bundle.pooling not in ("mean", "cls")
            or getattr(model.config, "fmtune_level", "pooled") != "pooled"):
        return False
    folder.mkdir(parents=True, exist_ok=True)
    model.backbone.save_pretrained(folder, safe_serialization=True)
    bundle.tokenizer.save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}], indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": bundle.max_length,
                                                                  "do_lower_case": False}, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": int(model.config.fmtune_num_features),
        "pooling_mode_cls_token": bundle.pooling == "cls", "pooling_mode_mean_tokens": bundle.pooling == "mean",
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    return True


def _token_head_keys(std: nn.Module) -> tuple[str, str] | None:
    """(weight, bias) keys of the linear head of a transformers ``*ForTokenClassification``."""
    head = [k for k in std.state_dict() if not k.startswith(std.base_model_prefix + ".")]
    weight = [k for k in head if k.endswith(".weight")]
    bias = [k for k in head if k.endswith(".bias")]
    return (weight[0], bias[0]) if len(head) == 2 and len(weight) == 1 and len(bias) == 1 else None


def _as_token_classifier(model: nn.Module) -> nn.Module | None:
    """A token-level FmtuneClassifier as transformers' own ``*ForTokenClassification`` of the same
    weights (the linear head is its classifier), or None where there is no such class or the
    weights do not map one to one."""
    if getattr(model.config, "fmtune_level", "pooled") != "tokens":
        return None
    from transformers import AutoModelForTokenClassification

    config = copy.deepcopy(model.config)
    config.auto_map = {}
    config.architectures = None
    try:
        std = AutoModelForTokenClassification.from_config(config)
    except (ValueError, KeyError):
        return None
    keys = _token_head_keys(std)
    if keys is None:
        return None
    mapped = {f"{std.base_model_prefix}.{k.removeprefix('backbone.')}": v for k, v in model.state_dict().items()
              if k.startswith("backbone.")}
    linear = head_linear(model)
    mapped[keys[0]], mapped[keys[1]] = linear.weight, linear.bias
    theirs = std.state_dict()
    if set(mapped) != set(theirs) or any(theirs[k].shape != v.shape for k, v in mapped.items()):
        return None
    std.load_state_dict(mapped, strict=True)
    return std


def two_towers(config: Any) -> bool:
    """Whether a config is of a model of two towers, an image encoder and a text encoder (CLIP, SigLIP ...)."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def tower_config(config: Any, tower: str) -> Any:
    """Of a model of two towers, the config of the one that is the backbone ("vision" or "text"): transformers
    loads that tower alone from the whole model's weights (``CLIPVisionModel.from_pretrained``). Any other config
    as it is."""
    if not two_towers(config):
        return config
    return config.vision_config if tower == "vision" else config.text_config


def model_has_two_towers(name: str) -> bool:
    """Whether the model ``name`` (zoo name, folder, hub id) has two towers; reads its config.json only."""
    family, path = resolve(name)
    return family == "hf" and isinstance(path, Path) and two_towers(_config_at(path))


def _config_at(path: Path | str) -> Any:
    """The config of the model folder (or hub id) ``path``; a ModelError naming it if unreadable."""
    try:
        return saved_config(path)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for bad folders
        raise ModelError(f"cannot read the model config at {path}: {e}") from None


def saved_config(folder: Path | str) -> Any:
    """A model folder's config, read without remote code: a saved fmtune model's config.json (model
    type fmtune) as its backbone's config class with the fmtune settings."""
    from transformers import AutoConfig

    values = read_json(Path(folder) / "config.json", {}) if isinstance(folder, Path) else {}
    if values.get("model_type") != FMTUNE_MODEL_TYPE:
        return AutoConfig.from_pretrained(folder)
    return config_from_values(values)


def _mark_config(folder: Path) -> None:
    """A pooled model's config.json gets fmtune's own model type (see hf_remote.FmtuneConfig), so
    that transformers refuses to load it without trust_remote_code rather than load it wrong."""
    path = folder / "config.json"
    values = json.loads(path.read_text())
    if values.get("fmtune_level", "pooled") != "pooled" or values.get("model_type") == FMTUNE_MODEL_TYPE:
        return
    values["fmtune_backbone_model_type"] = values["model_type"]
    values["model_type"] = FMTUNE_MODEL_TYPE
    values["auto_map"] = {**values.get("auto_map", {}), "AutoConfig": "modeling_fmtune.FmtuneConfig"}
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _hf_from_dir(model_dir: Path) -> FmtuneClassifier:
    if read_json(model_dir / META_FILE, {}).get("layout") == TOKEN_LAYOUT:
        from transformers import AutoModelForTokenClassification

        std = AutoModelForTokenClassification.from_pretrained(model_dir, dtype=torch.float32)
        model = FmtuneClassifier(saved_config(model_dir), backbone=getattr(std, std.base_model_prefix))
        weight, bias = _token_head_keys(std)
        sd = std.state_dict()
        linear = head_linear(model)
        with torch.no_grad():
            linear.weight.copy_(sd[weight])
            linear.bias.copy_(sd[bias])
        return model
    return FmtuneClassifier.from_pretrained(model_dir, config=saved_config(model_dir), dtype=torch.float32)


def _base_for_adapter(model_dir: Path, meta: dict[str, Any]) -> nn.Module:
    """The plain task model an adapter was trained on: the pretrained backbone (read from the
    run's source model) and a head that the adapter's saved head replaces."""
    try:
        _, path = resolve_base(meta["source"], meta.get("converted"))
    except ModelError as e:
        raise ModelError(f"{model_dir} holds a {meta['adapter']} adapter; its base model {meta['source']!r} "
                         f"is needed to load it and is not available here ({e})") from None
    if (meta.get("dense") or {}).get("head") in whole.CLASSES:
        return whole.adapter_base(path, model_dir, meta["dense"]["head"])
    if meta.get("dense"):
        return _dense_model(model_dir, meta, path)
    if meta["family"] == "hf":
        config = saved_config(model_dir)
        try:
            backbone = build_backbone(config, meta["pooling"], str(path))
        except Exception as e:
            raise ModelError(f"cannot load the base model {path} of the adapter in {model_dir}: {e}") from None
        return FmtuneClassifier(config, backbone=backbone.float())
    return cnn.TaskModel(_pretrained_cnn(meta["family"], path), meta["num_outputs"], meta["head_dropout"],
                         meta["output_scale"], meta["output_shift"])


def _dense_model(model_dir: Path, meta: dict[str, Any], pretrained: Path | str | None = None) -> nn.Module:
    """A saved segmentation model's architecture: its backbone pretrained from ``pretrained`` (an
    adapter's base) or random (weights loaded after)."""
    family, size = meta["family"], int(meta["image"]["size"])
    if family in CNN_FAMILIES:
        net = _pretrained_cnn(family, pretrained) if pretrained is not None else CNN_FAMILIES[family]["make"]()
    else:
        net = dense.hf_net(saved_config(model_dir), None if pretrained is None else str(pretrained))
    head = dense.HEADS[meta["dense"].get("head", "lraspp")]
    return head(dense.DenseBackbone(net, size), meta["dense"]["num_outputs"])


def load(model_dir: Path) -> Bundle:
    """Load a model saved by ``save``: same weights, same preprocessing."""
    meta = read_json(model_dir / META_FILE, {})
    if not meta:
        raise ModelError(f"{model_dir} holds no fmtune model ({META_FILE} missing or unreadable)")
    family = meta["family"]
    if family in causal_lm.FAMILIES:
        model, tokenizer = causal_lm.load(model_dir, meta)
        return Bundle(model, meta.get("kind", "text"), family, "none", tokenizer=tokenizer,
                      audio=meta.get("audio") or {},
                      max_length=meta.get("max_length", causal_lm.DEFAULT_MAX_LENGTH), source=meta.get("source", ""),
                      adapter=meta.get("adapter"), converted=meta.get("converted"))
    if family != "hf" and family not in CNN_FAMILIES:
        raise ModelError(f"{model_dir}/{META_FILE}: unknown model family {family!r}")
    adapter = meta.get("adapter")
    if adapter:
        model = adapters.load(_base_for_adapter(model_dir, meta), model_dir)
    elif (meta.get("dense") or {}).get("head") in whole.CLASSES:
        model = whole.load(model_dir, meta["dense"]["head"])
    elif meta.get("dense"):
        model = _dense_model(model_dir, meta)
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    elif family == "hf":
        model = _hf_from_dir(model_dir)
    else:
        backbone = CNN_FAMILIES[family]["make"]()
        model = cnn.TaskModel(backbone, meta["num_outputs"], meta["head_dropout"],
                              meta["output_scale"], meta["output_shift"])
        model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    tokenizer = None
    if family == "hf" and meta["kind"] == "text":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, config=saved_config(model_dir))
    model.eval()
    return Bundle(model, meta["kind"], family, meta["pooling"], tokenizer=tokenizer, image=meta.get("image") or {},
                  audio=meta.get("audio") or {},
                  max_length=meta.get("max_length", 128), source=meta.get("source", ""), adapter=adapter,
                  converted=meta.get("converted"))


def load_weights(bundle: Bundle, model_dir: Path) -> None:
    """Load the weights saved in ``model_dir`` into an already-built bundle's model (the best
    checkpoint, after training). transformers may store a model's keys under legacy names, so
    the folder is read back the way it was written."""
    if bundle.family in causal_lm.FAMILIES:
        causal_lm.load_weights(bundle, model_dir)
        saved = read_json(model_dir / META_FILE, {}).get("audio")
        if saved is not None:  # (a speech model: how its weights read clips, e.g. the pretrained ones in the window)
            bundle.audio.clear()
            bundle.audio.update(saved)
        return
    if bundle.adapter:
        adapters.load_weights(bundle.model, model_dir)
        return
    if isinstance(bundle.model, whole.WholeModel):
        bundle.model.net.load_state_dict(whole.load(model_dir, bundle.model.kind).net.state_dict(), strict=True)
        return
    if bundle.family == "hf" and not isinstance(bundle.model, dense.DenseTaskModel):
        state = _hf_from_dir(model_dir).state_dict()
    else:
        state = load_file(str(model_dir / "model.safetensors"))
    bundle.model.load_state_dict(state, strict=True)
