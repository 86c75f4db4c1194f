"""The frozen-prefix feature cache: same numbers as recomputing, invalidated by any change."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import cfg_dict, small_bundle
from safetensors.torch import load_file

import fmtune
from fmtune.config import StrategyConfig
from fmtune.data.dataset import TextData
from fmtune.strategies import apply_strategy
from fmtune.tasks import Classification
from fmtune.tasks.detection import Detection
from fmtune.tasks.segmentation import Segmentation
from fmtune.training import cache

TASK = Classification(["a", "b"])
MODELS = ["tiny_st_bert", "tiny_vit", "mobilenet-v2", "efficientnet-lite0"]


def _bundle(name, strategy, task=TASK):
    b = small_bundle(name, task)
    apply_strategy(b, strategy)
    b.model.eval()
    return b


def _batch(b):
    if b.kind == "text":
        ids = torch.randint(5, 20, (3, 9))
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        return {"input_ids": ids, "attention_mask": mask}
    return {"pixel_values": torch.randn(3, 3, 32, 32)}


@pytest.mark.parametrize("model_path", MODELS, indirect=True)
@pytest.mark.parametrize("strategy", [StrategyConfig(name="head"), StrategyConfig(name="last_n", n=1)])
def test_suffix_of_cached_prefix_equals_the_full_forward(model_path, strategy):
    b = _bundle(model_path, strategy)
    split, why = cache.plan(b)
    assert split is not None, why
    batch = _batch(b)
    with torch.no_grad():
        full = b.model(**batch).logits
        hidden = cache._prefix(b.model, split, batch)
        if split.kind == "pooled":
            via = cache.CachedForward(b.model, split)(features=hidden).logits
        else:
            via = cache.CachedForward(b.model, split)(hidden=hidden, attention_mask=batch.get("attention_mask")).logits
    assert torch.allclose(full, via, atol=1e-5)


@pytest.mark.parametrize("model_path", ["tiny_resnet", "tiny_vit", "mobilenet-v2"], indirect=True)
@pytest.mark.parametrize("task", [Segmentation(["a", "b", "c"]), Detection(["a", "b"])], ids=["seg", "det"])
def test_a_dense_head_on_cached_maps_equals_the_full_forward(model_path, task, tmp_path, monkeypatch):
    """The maps are stored flat, one row per image, and cut back into their shapes per batch."""
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path))
    b = _bundle(model_path, StrategyConfig(name="head"), task)
    split, why = cache.plan(b)
    assert split is not None and split.kind == "maps", why
    from fmtune.data.dataset import ImageData

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    ds = ImageData(images, torch.zeros(5, dtype=torch.long), b.image)
    cached, _ = cache.build(b, split, ds, 2)
    assert cached.data.shape[0] == 5
    batch = cached.collate([3, 1])
    with torch.no_grad():
        full = b.model(**{"pixel_values": ds.collate([3, 1])["pixel_values"]}).logits
        via = cache.CachedForward(b.model, split)(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert via.shape == full.shape
    assert torch.allclose(full, via, atol=1e-4, rtol=1e-4)
    b2 = _bundle(model_path, StrategyConfig(name="last_n", n=1), task)
    assert cache.plan(b2)[0] is None


def test_dense_maps_are_not_cached_beyond_half_the_free_disk(tiny_resnet, tmp_path, monkeypatch):
    import collections

    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "not-yet" / "made"))
    b = _bundle(tiny_resnet, StrategyConfig(name="head"), Segmentation(["a", "b"]))
    split, _ = cache.plan(b)
    assert split.shapes == cache.map_shapes(b.model, split.image_size) and len(split.shapes) == 3
    row = sum(math.prod(s) for s in split.shapes)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda _p: usage(0, 0, 2 * 100 * row * 2))
    assert cache.too_big(b.model, split, 100, "fp16") is None  # exactly half
    why = cache.too_big(b.model, split, 101, "fp16")
    assert why and "more than half" in why and "not-yet" in why
    assert cache.too_big(b.model, split, 100, "fp32")  # twice the bytes
    pooled = _bundle(tiny_resnet, StrategyConfig(name="head"))
    assert cache.too_big(pooled.model, cache.plan(pooled)[0], 10**9, "fp32") is None  # small rows: not checked


def test_nothing_is_cached_when_the_first_block_trains(tiny_bert):
    b = _bundle(tiny_bert, StrategyConfig(name="full"))
    split, why = cache.plan(b)
    assert split is None and "nothing to cache" in why
    b2 = _bundle(tiny_bert, StrategyConfig(name="last_n", n=2))  # all blocks of the 2-layer model
    assert cache.plan(b2)[0] is None


LAST_LAYER_LORA = {"name": "lora",
                   "targets": "encoder.layer.1.attention.self.query,encoder.layer.1.attention.self.value"}


@pytest.mark.parametrize("strategy", [{"name": "head"}, {"name": "last_n", "n": 1}, LAST_LAYER_LORA],
                         ids=["head", "last_n", "lora-last-layer"])
def test_training_with_and_without_the_cache_reaches_the_same_model(tmp_path, tiny_st_bert, text_files, strategy,
                                                                     capsys):
    runs = {}
    for mode in ("auto", "off"):
        cfg = cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / mode), strategy=strategy,
                       data={"test": str(text_files["test"])}, train={"epochs": 2, "feature_cache": mode})
        runs[mode] = fmtune.train(cfg, quiet=mode == "off")
    assert "are frozen: cached" in capsys.readouterr().err or strategy["name"] == "head"
    name = "adapter_model.safetensors" if strategy["name"] == "lora" else "model.safetensors"
    a = load_file(str(tmp_path / "auto" / "model" / name))
    b = load_file(str(tmp_path / "off" / "model" / name))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    assert runs["auto"]["eval"]["test"] == pytest.approx(runs["off"]["eval"]["test"], abs=1e-3)


def test_cache_is_reused_and_invalidated_by_content(tmp_path, tiny_st_bert, monkeypatch):
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "c"))
    b = _bundle(tiny_st_bert, StrategyConfig(name="head"))
    split, _ = cache.plan(b)
    ds = TextData([[2, 5, 6, 3], [2, 7, 3]], torch.tensor([0, 1]), 0)
    first, reused = cache.build(b, split, ds, 8)
    assert not reused
    again, reused = cache.build(b, split, ds, 8)
    assert reused and again.key == first.key
    other = TextData([[2, 5, 6, 3], [2, 8, 3]], torch.tensor([0, 1]), 0)  # one token changed
    assert cache.build(b, split, other, 8)[0].key != first.key
    with torch.no_grad():
        b.model.backbone.embeddings.word_embeddings.weight[5] += 1  # other weights
    assert cache.build(b, split, ds, 8)[0].key != first.key
    assert len(list((tmp_path / "c").iterdir())) == 3


def test_run_says_what_the_cache_did(tmp_path, tiny_st_bert, text_files, capsys):
    fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "r"), strategy={"name": "head"},
                          train={"max_steps": 2}))
    err = capsys.readouterr().err
    assert "feature cache: the whole backbone is frozen" in err
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["fit"]["steps"] == 2


def test_fp16_storage_is_close_and_keeps_fp32_beyond_its_range(tmp_path, tiny_st_bert, monkeypatch):
    monkeypatch.setenv("FMTUNE_CACHE_DIR", str(tmp_path / "c"))
    ds = TextData([[2, 5, 6, 3], [2, 7, 3]], torch.tensor([0, 1]), 0)
    for strategy, field in ((StrategyConfig(name="head"), "features"), (StrategyConfig(name="last_n", n=1), "hidden")):
        b = _bundle(tiny_st_bert, strategy)
        split, _ = cache.plan(b)
        full, _ = cache.build(b, split, ds, 8)
        half, _ = cache.build(b, split, ds, 8, storage="fp16")
        assert (full.data.dtype.name, half.data.dtype.name) == ("float32", "float16") and half.key != full.key
        a, h = full.collate([0, 1]), half.collate([0, 1])
        assert h[field].dtype == torch.float32  # the model gets fp32 either way
        assert torch.allclose(a[field], h[field], rtol=1e-3, atol=1e-3) and not torch.equal(a[field], h[field])
    b = _bundle(tiny_st_bert, StrategyConfig(name="head"))
    with torch.no_grad():
        b.model.backbone.encoder.layer[-1].output.LayerNorm.weight.mul_(1e6)  # pooled values beyond 65504
    big, _ = cache.build(b, cache.plan(b)[0], ds, 8, storage="fp16")
    assert big.data.dtype.name == "float32" and float(abs(big.data).max()) > 65504
    with pytest.raises(ValueError, match="fp32 or fp16"):
        cache.build(b, cache.plan(b)[0], ds, 8, storage="int8")


def test_mixed_precision_runs_compute_the_prefix_in_it_and_store_fp16(tmp_path, tiny_st_bert, text_files, capsys):
    from types import SimpleNamespace as NS

    from fmtune.config import TrainConfig

    cpu_bf16, gpu = NS(device="cpu", precision="bf16"), NS(device="cuda", precision="bf16")
    assert cache.precision(TrainConfig(), cpu_bf16) == (torch.bfloat16, "fp16")
    assert cache.precision(TrainConfig(), NS(device="cpu", precision="no")) == (None, "fp32")
    assert cache.precision(TrainConfig(), gpu) == (None, "fp32")  # auto on a GPU: decided later, by timing
    assert cache.precision(TrainConfig(precision="bf16"), gpu) == (torch.bfloat16, "fp16")
    assert cache.precision(TrainConfig(feature_cache="fp32"), cpu_bf16) == (torch.bfloat16, "fp32")
    assert cache.precision(TrainConfig(feature_cache="fp16"), NS(device="cpu", precision="no")) == (None, "fp16")
    fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "r"),
                          strategy={"name": "last_n", "n": 1}, train={"precision": "bf16", "max_steps": 2}))
    assert "stored as fp16" in capsys.readouterr().err and (tmp_path / "r" / "model").is_dir()
    metas = [json.loads(p.read_text()) for p in cache.cache_dir().glob("*/meta.json")]
    assert {(m["computed_in"], m["stored_as"]) for m in metas} >= {("bfloat16", "float16")}
