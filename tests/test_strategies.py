"""Each strategy trains exactly the intended parameters; frozen ones are bit-identical after a
step; frozen BatchNorm stays in eval mode with unchanged statistics."""

from __future__ import annotations

import pytest
import torch
from conftest import small_bundle, strategy_step
from torch import nn

from fmtune.config import ModelConfig, StrategyConfig
from fmtune.errors import ConfigError
from fmtune.models import build
from fmtune.strategies import apply_strategy, backbone_blocks
from fmtune.tasks import Classification

TASK = Classification(["a", "b", "c"])


def _bundle(name) -> build.Bundle:
    return small_bundle(name, TASK)


def _step(bundle: build.Bundle, strategy: StrategyConfig):
    return strategy_step(bundle, strategy, TASK)


MODELS = ["tiny_bert", "tiny_vit", "tiny_resnet", "mobilenet-v2", "efficientnet-lite0"]


@pytest.mark.parametrize("model_path", MODELS, indirect=True)
def test_head_strategy_trains_only_the_head(model_path):
    b = _bundle(model_path)
    counts, changed, with_grad, _ = _step(b, StrategyConfig(name="head"))
    head = {n for n, _ in b.model.named_parameters() if n.startswith("head.")}
    assert with_grad == head and changed == head
    assert counts["trainable_params"] == sum(p.numel() for p in b.model.head.parameters())


@pytest.mark.parametrize("model_path", MODELS, indirect=True)
def test_last_n_trains_the_last_blocks_and_head(model_path):
    b = _bundle(model_path)
    blocks = backbone_blocks(b.model.backbone)
    _, changed, with_grad, _ = _step(b, StrategyConfig(name="last_n", n=1))
    last = {id(p) for p in blocks[-1].parameters()}
    earlier = {id(p) for blk in blocks[:-1] for p in blk.parameters()}
    params = dict(b.model.named_parameters())
    assert all(id(params[n]) not in earlier for n in with_grad)
    assert {n for n in with_grad if id(params[n]) in last} == {n for n, p in params.items() if id(p) in last}
    assert {n for n in params if n.startswith("head.")} <= with_grad
    # nothing before the blocks (embeddings, stem) moves
    first_block_param = next(iter(blocks[0].parameters()))
    names = list(params)
    first_idx = next(i for i, n in enumerate(names) if params[n] is first_block_param)
    assert not changed & set(names[:first_idx])


@pytest.mark.parametrize("model_path", MODELS, indirect=True)
def test_full_trains_everything_but_a_text_encoders_token_embeddings(model_path):
    b = _bundle(model_path)
    counts, changed, with_grad, _ = _step(b, StrategyConfig(name="full"))
    used = {n for n, p in b.model.named_parameters()}
    if b.kind == "text":  # the vocabulary x width lookup stays as pretrained; its neighbours train
        vocab = "backbone.embeddings.word_embeddings.weight"
        assert with_grad == used - {vocab} and vocab not in changed
        assert "backbone.embeddings.position_embeddings.weight" in changed
        assert counts["frozen_embedding_params"] == b.model.backbone.get_input_embeddings().weight.numel()
        assert counts["trainable_params"] == counts["total_params"] - counts["frozen_embedding_params"]
        for other in (StrategyConfig(name="full", freeze_embeddings=False), None):
            b = _bundle(model_path)
            if other is None:  # a randomly initialised model has nothing to keep
                b.pretrained, other = False, StrategyConfig(name="full")
            counts, _, with_grad, _ = _step(b, other)
            assert with_grad == used and "frozen_embedding_params" not in counts
        assert not build.create(ModelConfig(name=str(model_path), max_length=16, init="random"), TASK).pretrained
    else:  # an image backbone's input layer is a convolution: every weight trains
        assert with_grad == used and "frozen_embedding_params" not in counts
    assert counts["trainable_params"] == counts["total_params"] - counts.get("frozen_embedding_params", 0)


@pytest.mark.parametrize("model_path", ["tiny_resnet", "mobilenet-v2", "efficientnet-lite0"], indirect=True)
def test_frozen_batchnorm_stays_in_eval_mode(model_path):
    b = _bundle(model_path)
    _, _, _, before = _step(b, StrategyConfig(name="last_n", n=1))
    bns = {n: m for n, m in b.model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    frozen = {n for n, m in bns.items() if not any(p.requires_grad for p in m.parameters())}
    trained = set(bns) - frozen
    assert frozen and trained
    assert all(not bns[n].training for n in frozen) and all(bns[n].training for n in trained)
    after = dict(b.model.named_buffers())
    for n in frozen:
        assert torch.equal(before[f"{n}.running_mean"], after[f"{n}.running_mean"]), n
    assert any(not torch.equal(before[f"{n}.running_mean"], after[f"{n}.running_mean"]) for n in trained)


def test_last_n_larger_than_the_backbone_is_an_error(tiny_bert):
    from fmtune.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.n: 5 is more than the 2 blocks"):
        apply_strategy(_bundle(tiny_bert), StrategyConfig(name="last_n", n=5))


def test_pooling_follows_what_the_backbone_was_trained_with(tiny_bert, tiny_st_bert, tiny_vit, tiny_resnet):
    assert _bundle(tiny_st_bert).pooling == "mean"
    assert _bundle(tiny_bert).pooling == "cls"
    assert _bundle(tiny_vit).pooling == "cls"
    assert _bundle(tiny_resnet).pooling == "pooler"
    assert _bundle("efficientnet-lite0").pooling == "mean"


def test_adamw_is_the_fused_kernel_on_one_device(tiny_bert):
    """fused AdamW on the CPU (about 7x faster a step than the foreach default on MiniLM here)."""
    from fmtune.config import TrainConfig
    from fmtune.tasks import Classification
    from fmtune.training.optim import make_optimizer

    bundle = small_bundle(tiny_bert, Classification(["a", "b"]))
    opt = make_optimizer(bundle.model, TrainConfig(lr=1e-3))
    assert opt.defaults["fused"] is True
    before = [p.detach().clone() for p in bundle.model.parameters()]
    for p in bundle.model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, bundle.model.parameters()))


def test_layer_lr_decay_scales_each_block_by_its_distance_from_the_top(tiny_bert, tiny_vit):
    """train.layer_lr_decay: the last block at lr x decay, each block below one factor more, the
    embeddings one more than the first block, the head at its own rate; off: one rate for the body."""
    from fmtune.config import TrainConfig
    from fmtune.training.optim import make_optimizer

    bundle = small_bundle(tiny_bert, Classification(["a", "b"]))
    blocks = backbone_blocks(bundle.model.backbone)
    lr_of = lambda opt: {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}  # noqa: E731
    lrs = lr_of(make_optimizer(bundle.model, TrainConfig(lr=1e-3, head_lr=1e-2, layer_lr_decay=0.5)))
    n = len(blocks)
    for i, block in enumerate(blocks):
        assert [lrs[id(p)] for p in block.parameters()] == pytest.approx([1e-3 * 0.5 ** (n - i)] * len(list(
            block.parameters())))
    embeddings = bundle.model.backbone.embeddings.word_embeddings.weight
    assert lrs[id(embeddings)] == pytest.approx(1e-3 * 0.5 ** (n + 1))
    assert {lrs[id(p)] for p in bundle.model.head.parameters()} == {1e-2}
    flat = lr_of(make_optimizer(bundle.model, TrainConfig(lr=1e-3, head_lr=1e-2)))
    assert set(flat.values()) == {1e-3, 1e-2}
    vit = small_bundle(tiny_vit, Classification(["a", "b"]))
    lrs = lr_of(make_optimizer(vit.model, TrainConfig(lr=1e-3, layer_lr_decay=0.5)))
    final_norm = vit.model.backbone.layernorm.weight  # what follows the blocks trains at lr
    assert lrs[id(final_norm)] == 1e-3 and lrs[id(vit.model.backbone.embeddings.cls_token)] == pytest.approx(
        1e-3 * 0.5 ** (len(backbone_blocks(vit.model.backbone)) + 1))
    with pytest.raises(Exception, match="train.layer_lr_decay"):
        TrainConfig(layer_lr_decay=1.5)
    no_blocks = nn.Module()
    no_blocks.backbone, no_blocks.head = nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2)
    for model in (no_blocks, nn.Linear(4, 2)):  # a backbone without blocks; no backbone at all (causal LM)
        with pytest.raises(ConfigError, match="train.layer_lr_decay"):
            make_optimizer(model, TrainConfig(lr=1e-3, layer_lr_decay=0.8))
        make_optimizer(model, TrainConfig(lr=1e-3))  # off: no complaint
