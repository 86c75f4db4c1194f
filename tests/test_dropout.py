"""fmtune.training.dropout: CPU dropout with four mask elements per random draw, and the
attention path that uses it while training."""

import pytest
import torch
from conftest import cfg_dict, make_text_rows
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import fmtune
from fmtune import api
from fmtune.training.dropout import FastDropout, attention, drop, fast_dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_one_minus_p_and_every_lane_is_random(p):
    torch.manual_seed(0)
    keep = keep_mask((1000, 1001), p)  # not a multiple of 4: the last word is cut
    assert keep.shape == (1000, 1001) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - (1 - p)) < 0.003
    lanes = keep.flatten()[: 4 * 250_000].view(-1, 4).float().mean(0)  # each of the 4 lanes of a word
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=0.005), lanes
    # neighbouring elements are independent (a lane's mask does not predict the next lane's)
    flat = keep.flatten().float()
    both = (flat[:-1] * flat[1:]).mean().item()
    assert abs(both - (1 - p) ** 2) < 0.004


def test_keep_mask_follows_the_torch_seed():
    torch.manual_seed(3)
    a = keep_mask((64, 33), 0.3)
    torch.manual_seed(3)
    assert torch.equal(a, keep_mask((64, 33), 0.3))
    assert not torch.equal(a, keep_mask((64, 33), 0.3))


def test_drop_scales_what_it_keeps_and_its_gradient_is_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(50, 40, requires_grad=True)
    y = drop(x, 0.25)
    kept = y != 0
    assert 0.65 < kept.float().mean() < 0.85
    assert torch.allclose(y[kept], x[kept] / 0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.75)
    assert drop(x, 0.25, training=False) is x and drop(x, 0.0) is x
    assert torch.equal(drop(x, 1.0), torch.zeros_like(x))
    layer = FastDropout(0.25).eval()
    assert layer(x) is x


class _Attn(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.is_causal = causal


def _qkv(b=2, h=3, t=5, d=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, h, t, d, generator=g) for _ in range(3)]


@pytest.mark.parametrize("case", ["bool mask", "float mask", "no mask", "causal", "causal with mask"])
def test_attention_computes_what_sdpa_computes(case):
    """With a dropout too small to drop anything the plain path is taken and must agree with
    transformers' own sdpa function: masks of either kind, causal decoders, the scale."""
    q, k, v = _qkv()
    mask = None
    if "mask" in case and case != "no mask":
        mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
        mask[0, :, :, 3:] = False  # the first example's last two tokens are padding
        if "causal" in case:
            mask &= torch.ones(5, 5, dtype=torch.bool).tril()
        if case == "float mask":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _Attn(causal="causal" in case)
    fast, _ = attention(sdpa_attention_forward)(module, q, k, v, mask, dropout=1e-9, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=0.3)
    assert fast.shape == ref.shape == (2, 5, 3, 8)
    assert torch.allclose(fast, ref, atol=1e-5)


def test_attention_drops_probabilities_and_leaves_other_cases_to_sdpa():
    q, k, v = _qkv(t=64)
    calls = []

    def original(*args, **kwargs):
        calls.append(kwargs["dropout"])
        return sdpa_attention_forward(*args, **kwargs)

    fn = attention(original)
    torch.manual_seed(0)
    a, _ = fn(_Attn(False), q, k, v, None, dropout=0.5)
    b, _ = fn(_Attn(False), q, k, v, None, dropout=0.5)
    assert not calls and not torch.allclose(a, b)  # computed here, with fresh masks
    fn(_Attn(False), q, k, v, None, dropout=0.0)
    grouped = _Attn(False)
    grouped.num_key_value_groups = 2
    fn(grouped, q, k[:, :1].expand_as(k), v, None, dropout=0.5)
    assert calls == [0.0, 0.5]


def test_fast_dropout_swaps_the_layers_and_attention_while_training_and_restores_them(tiny_bert):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert, attn_implementation="sdpa")
    model.config.attention_probs_dropout_prob = 0.1
    original_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    dropouts = [m for m in model.modules() if type(m) is nn.Dropout]
    assert dropouts
    ids = torch.randint(5, 20, (4, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with fast_dropout(model):
        assert not any(type(m) is nn.Dropout for m in model.modules())
        assert sum(type(m) is FastDropout for m in model.modules()) == len(dropouts)
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not original_sdpa
        with torch.no_grad():  # eval mode: nothing dropped, the same output
            assert torch.allclose(model(input_ids=ids, attention_mask=mask).last_hidden_state, before, atol=1e-6)
        model.train()
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.sum().backward()
        assert not torch.allclose(out, before, atol=1e-3)
        assert all(p.grad is not None for p in model.encoder.parameters())
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is original_sdpa
    assert [m for m in model.modules() if isinstance(m, nn.Dropout)] == dropouts
    assert all(type(m) is nn.Dropout and m.training for m in dropouts)  # the mode set inside is kept


def test_fast_dropout_off_changes_nothing(tiny_bert):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    with fast_dropout(model, enabled=False):
        assert not any(type(m) is FastDropout for m in model.modules())


def test_set_dropout_turns_every_dropout_of_a_model_off_in_training(tiny_bert, monkeypatch, tmp_path):
    """model.dropout: the layers, attention's probabilities and float attributes attention modules keep
    (Whisper's) all follow; a training-mode forward is then deterministic."""
    from transformers import AutoModel

    from fmtune.config import from_dict
    from fmtune.training.dropout import set_dropout

    model = AutoModel.from_pretrained(tiny_bert, attn_implementation="sdpa")
    model.config.attention_probs_dropout_prob = 0.1
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.3
    model.encoder.layer[0].attention.dropout = 0.2  # a float, as Whisper's attention keeps it
    ids = torch.randint(5, 20, (4, 9))
    model.train()
    with fast_dropout(model):
        assert not torch.allclose(model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state)
    layers = sum(isinstance(m, nn.Dropout) for m in model.modules())
    assert set_dropout(model, 0.0) == layers + 1 and model.encoder.layer[0].attention.dropout == 0.0
    for fast in (True, False):
        with fast_dropout(model, fast):
            a, b = model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        assert torch.equal(a, b)
    # the model's own unless set; a value given is kept and checked
    assert from_dict({"task": {"type": "regression"}}).model.dropout is None
    assert from_dict({"task": {"type": "regression"}, "model": {"dropout": 0.0}}).model.dropout == 0.0
    with pytest.raises(Exception, match="model.dropout"):
        from_dict({"model": {"dropout": 1.0}})
    # fmtune train sets it on the model it builds
    seen = []
    monkeypatch.setattr(api, "set_dropout", lambda m, p: seen.append(p) or set_dropout(m, p))
    make_text_rows(60, 0, "regression").to_csv(tmp_path / "r.csv", index=False)
    for p in (None, 0.0):
        fmtune.train(cfg_dict(tiny_bert, tmp_path / "r.csv", out=str(tmp_path / f"run-{p}"),
                              task={"type": "regression"}, model={"dropout": p}, train={"epochs": 1}),
                     quiet=True, report=False)
    assert seen == [0.0]
