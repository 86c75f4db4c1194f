"""Read a CTranslate2 Whisper model (``model.bin``) into transformers' ``WhisperForConditionalGeneration``.

CTranslate2 stores a flat list of named arrays (binary format version 6):

    u32 version, str spec name, u32 spec revision, u32 count,
    count x (str name, u8 rank, rank x u32 dim, u8 dtype, u32 nbytes, nbytes of data),
    u32 aliases, aliases x (str alias, str name)

where a str is a u16 length (with its NUL) then the UTF-8 bytes and a NUL. The Whisper spec's
names map one to one onto transformers' except that self-attention stores q, k and v fused in
one matrix (``linear_0``) and cross-attention stores k and v fused (``linear_1``); Whisper's k
projection has no bias (CTranslate2 stores zeros there, checked on reading).
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtune.errors import ModelError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}


def spec_name(path: Path) -> str:
    """The model spec a CTranslate2 ``model.bin`` names in its header (e.g. ``WhisperSpec``), read without the
    arrays; ModelError when the file is not a CTranslate2 model this reader knows."""
    with open(path, "rb") as f:
        head = f.read(4 + 2 + 512)
    try:
        version, n = struct.unpack_from("<IH", head, 0)
        if version != 6:
            raise ModelError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6")
        if not 0 < n <= 512:
            raise ValueError(f"a spec name of {n} bytes")
        return head[6:6 + n - 1].decode("utf-8")
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is not a readable CTranslate2 model ({type(e).__name__}: {e})") from None


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a CTranslate2 ``model.bin`` by name (aliases resolved)."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        value = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        s = buf[pos:pos + n - 1].decode("utf-8")
        pos += n
        return s

    try:
        version = take("I")
        if version != 6:
            raise ModelError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6")
        text(), take("I")  # spec name, revision
        arrays: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = text()
            shape = [take("I") for _ in range(take("B"))]
            dtype, nbytes = take("B"), take("I")
            raw = buf[pos:pos + nbytes]
            pos += nbytes
            if _DTYPES.get(dtype) == "bfloat16":
                value = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).float().numpy()
            elif dtype in _DTYPES:
                value = np.frombuffer(raw, dtype=_DTYPES[dtype])
            else:
                raise ModelError(f"{path}: array {name!r} has an unknown CTranslate2 type id {dtype}")
            arrays[name] = value.reshape(shape)
        for _ in range(take("I")):
            alias, target = text(), text()
            arrays[alias] = arrays[target]
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"{path} is not a readable CTranslate2 model ({type(e).__name__}: {e})") from None
    return arrays


def _layer_count(arrays: dict[str, np.ndarray], prefix: str) -> int:
    return len({k.split("/")[1] for k in arrays if re.match(rf"{prefix}/layer_\d+/", k)})


def whisper_config(arrays: dict[str, np.ndarray]) -> Any:
    from transformers import WhisperConfig

    vocab, d_model = arrays["decoder/embeddings/weight"].shape
    return WhisperConfig(
        vocab_size=int(vocab), d_model=int(d_model), num_mel_bins=int(arrays["encoder/conv1/weight"].shape[1]),
        encoder_layers=_layer_count(arrays, "encoder"), decoder_layers=_layer_count(arrays, "decoder"),
        encoder_attention_heads=int(arrays["encoder/num_heads"]),
        decoder_attention_heads=int(arrays["decoder/num_heads"]),
        encoder_ffn_dim=int(arrays["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(arrays["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(arrays["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(arrays["decoder/position_encodings/encodings"].shape[0]),
        tie_word_embeddings=True,
        # the special tokens' ids come from the tokenizer (convert_whisper), not from English-only defaults
        pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _linear(out: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], src: str, dst: str, bias: bool = True) -> None:
    out[f"{dst}.weight"] = torch.from_numpy(arrays[f"{src}/weight"].astype(np.float32))
    if bias:
        out[f"{dst}.bias"] = torch.from_numpy(arrays[f"{src}/bias"].astype(np.float32))


def _norm(out: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], src: str, dst: str) -> None:
    out[f"{dst}.weight"] = torch.from_numpy(arrays[f"{src}/gamma"].astype(np.float32))
    out[f"{dst}.bias"] = torch.from_numpy(arrays[f"{src}/beta"].astype(np.float32))


def _split(out: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], src: str, dsts: list[str]) -> None:
    """A fused projection (rows q|k|v, or k|v) as separate ones; k has no bias in Whisper."""
    weights = np.split(arrays[f"{src}/weight"].astype(np.float32), len(dsts))
    biases = np.split(arrays[f"{src}/bias"].astype(np.float32), len(dsts))
    for dst, w, b in zip(dsts, weights, biases, strict=True):
        out[f"{dst}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        if dst.endswith("k_proj"):
            if np.abs(b).max() > 1e-6:
                raise ModelError(f"{src}: the key projection has a non-zero bias, which Whisper does not have")
        else:
            out[f"{dst}.bias"] = torch.from_numpy(np.ascontiguousarray(b))


def whisper_state_dict(arrays: dict[str, np.ndarray], config: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        m = f"model.{side}"
        out[f"{m}.embed_positions.weight"] = torch.from_numpy(
            arrays[f"{side}/position_encodings/encodings"].astype(np.float32))
        _norm(out, arrays, f"{side}/layer_norm", f"{m}.layer_norm")
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"{m}.layers.{i}"
            _norm(out, arrays, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            _split(out, arrays, f"{src}/self_attention/linear_0",
                   [f"{dst}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")])
            _linear(out, arrays, f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            if side == "decoder":
                _norm(out, arrays, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
                _linear(out, arrays, f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                _split(out, arrays, f"{src}/attention/linear_1",
                       [f"{dst}.encoder_attn.{p}" for p in ("k_proj", "v_proj")])
                _linear(out, arrays, f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
            _norm(out, arrays, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
            _linear(out, arrays, f"{src}/ffn/linear_0", f"{dst}.fc1")
            _linear(out, arrays, f"{src}/ffn/linear_1", f"{dst}.fc2")
    for conv in ("conv1", "conv2"):
        _linear(out, arrays, f"encoder/{conv}", f"model.encoder.{conv}")
    out["model.decoder.embed_tokens.weight"] = torch.from_numpy(arrays["decoder/embeddings/weight"].astype(np.float32))
    return out


def convert_whisper(folder: Path, target: Path) -> None:
    """Write the CTranslate2 Whisper model in ``folder`` as a transformers folder in ``target``:
    config, fp32 safetensors weights, tokenizer, feature extractor and generation config."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizerFast

    ct2_config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    arrays = read_arrays(folder / "model.bin")
    config = whisper_config(arrays)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = whisper_state_dict(arrays, config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "proj_out.weight"]  # tied to the token embedding
    if missing or unexpected:
        raise ModelError(f"{folder}/model.bin does not map onto Whisper: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    multilingual = config.vocab_size >= 51865
    gen = model.generation_config
    gen.decoder_start_token_id = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    gen.eos_token_id = gen.pad_token_id = gen.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    gen.no_timestamps_token_id = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    gen.is_multilingual = multilingual
    gen.suppress_tokens = [int(t) for t in ct2_config.get("suppress_ids", [])]
    gen.begin_suppress_tokens = [int(t) for t in ct2_config.get("suppress_ids_begin", [])]
    gen.max_length = config.max_target_positions
    if "alignment_heads" in ct2_config:
        gen.alignment_heads = ct2_config["alignment_heads"]
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(config, key, getattr(gen, key))
    tokenizer.pad_token = "<|endoftext|>"
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(target)
