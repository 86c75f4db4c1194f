"""Parameter-efficient strategies (lora, dora, ia3, prompt through peft; bitfit written here):
exactly the intended parameters train, frozen ones and frozen BatchNorm statistics stay
bit-identical, a saved adapter reloads with its trained head, merged exports match, and bad
targets are clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import cfg_dict, random_batch, small_bundle, strategy_step

from fmtune import adapters, api
from fmtune.config import StrategyConfig, from_dict
from fmtune.errors import ConfigError
from fmtune.exporter import export
from fmtune.models import build
from fmtune.strategies import apply_strategy, frozen_prefix
from fmtune.tasks import Classification

TASK = Classification(["a", "b", "c"])
MARKS = {"lora": ("lora_A", "lora_B"), "dora": ("lora_A", "lora_B", "lora_magnitude_vector"), "ia3": ("ia3_l",),
         "prompt": ("prompt_encoder",)}


def _bundle(name) -> build.Bundle:
    return small_bundle(name, TASK)


def _intended(model: torch.nn.Module, strategy: str) -> set[str]:
    names = {n for n, _ in model.named_parameters()}
    if strategy == "bitfit":
        return {n for n in names if n.startswith("head.") or (n.startswith("backbone.") and n.endswith("bias"))}
    return {n for n in names if any(m in n for m in MARKS[strategy]) or ".modules_to_save." in n}


CASES = [(m, s) for m in ("tiny_bert", "tiny_vit", "tiny_resnet", "efficientnet-lite0")
         for s in ("lora", "dora", "ia3", "bitfit")] + [("tiny_bert", "prompt"), ("tiny_st_bert", "prompt")]


@pytest.mark.parametrize("model_path,strategy", CASES, indirect=["model_path"])
def test_only_the_intended_parameters_train(model_path, strategy):
    b = _bundle(model_path)
    counts, changed, with_grad, buffers = strategy_step(b, StrategyConfig(name=strategy, virtual_tokens=3), TASK)
    model = b.model
    intended = _intended(model, strategy)
    assert intended and {n for n, p in model.named_parameters() if p.requires_grad} == intended
    assert counts["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in intended)
    assert counts["trainable_params"] < counts["base_params"] <= counts["total_params"]
    assert with_grad == intended
    assert changed <= intended and any(not n.startswith(("head.", "base_model.model.head.")) for n in changed)
    # frozen BatchNorm keeps its running statistics (the backbone's norms are not trained)
    for n, t in model.named_buffers():
        assert torch.equal(buffers[n], t), n


@pytest.mark.parametrize("model_path,strategy", [(m, s) for m, s in CASES if m != "tiny_st_bert"],
                         indirect=["model_path"])
def test_saved_adapter_reloads_with_its_trained_head(tmp_path, model_path, strategy):
    b = _bundle(model_path)
    apply_strategy(b, StrategyConfig(name=strategy, virtual_tokens=3))
    with torch.no_grad():  # move every trainable tensor away from its initial value (head included)
        for p in b.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    b.model.eval()
    batch = random_batch(b)
    with torch.no_grad():
        expected = b.model(**batch).logits
    build.save(b, tmp_path / "model")
    again = build.load(tmp_path / "model")
    assert again.adapter == (strategy if strategy != "bitfit" else None)
    with torch.no_grad():
        got = again.model(**batch).logits
    assert torch.allclose(expected, got, atol=1e-6), (expected - got).abs().max()
    if again.adapter:  # the adapter file holds the adapter and the head, not the frozen backbone
        from safetensors.torch import load_file

        keys = load_file(str(tmp_path / "model" / "adapter_model.safetensors")).keys()
        marks = (*MARKS[strategy], "prompt_embeddings", "model.head.1.")
        assert keys and all(any(m in k for m in marks) for k in keys), sorted(keys)


def _train(tmp_path, model, files, strategy, **train):
    cfg = cfg_dict(model, files["train"], data={"test": str(files["test"])}, out=str(tmp_path / strategy),
                   strategy={"name": strategy, "virtual_tokens": 4},
                   train={"epochs": 3, "lr": 1e-2 if strategy != "prompt" else 5e-2, "head_lr": 1e-2, **train})
    return api.train(cfg, quiet=True)


@pytest.mark.parametrize("strategy", ["lora", "dora", "ia3", "prompt", "bitfit"])
def test_train_learns_records_memory_and_predicts_after_reload(tmp_path, tiny_st_bert, text_files, strategy):
    summary = _train(tmp_path, tiny_st_bert, text_files, strategy, epochs=8)
    run = tmp_path / strategy
    assert summary["eval"]["test"]["accuracy"] >= 0.7, summary["eval"]  # majority class: 0.6
    params = json.loads((run / "run.json").read_text())["params"]
    assert params["trainable_params"] < params["base_params"]
    assert 0 < params["optimizer_state_mib"] < params["full_finetune_optimizer_state_mib"]
    # the saved best checkpoint, reloaded by predict, gives the test accuracy evaluated at the end
    pred = api.predict(run, text_files["test"], quiet=True)
    truth = pd.read_csv(text_files["test"])["label"]
    acc = float((pred["predicted_label"].to_numpy() == truth.to_numpy()).mean())
    assert acc == pytest.approx(summary["eval"]["test"]["accuracy"])


@pytest.mark.parametrize("strategy", ["lora", "dora", "ia3"])
def test_merged_export_matches_and_needs_no_peft(tmp_path, tiny_bert, text_files, strategy):
    _train(tmp_path, tiny_bert, text_files, strategy, epochs=1)
    res = export(tmp_path / strategy, merge=True, quiet=True)
    assert res["kind"] == "merged" and res["max_abs_diff"] <= 1e-4
    out = res["out"]
    assert not (tmp_path / strategy / "export" / "merged" / "adapter_config.json").exists()
    # plain transformers, with peft made unimportable, gives the run's logits
    script = f"""
import sys, json, torch
sys.modules["peft"] = None
from transformers import AutoModelForSequenceClassification, AutoTokenizer
m = AutoModelForSequenceClassification.from_pretrained({out!r}, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained({out!r}, trust_remote_code=True)
enc = tok(["good movie", "the plot was awful really"], padding=True, return_tensors="pt")
try:
    AutoModelForSequenceClassification.from_pretrained({out!r})
    raise SystemExit("loaded without trust_remote_code")
except ValueError as e:
    assert "trust_remote_code" in str(e), e
with torch.no_grad():
    print("LOGITS " + json.dumps(m(**enc).logits.tolist()))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.tensor(json.loads(proc.stdout.split("LOGITS ")[-1]))
    pred = api.predict(tmp_path / strategy, _texts(tmp_path), quiet=True)
    expected = torch.tensor(pred[["prob_neg", "prob_pos"]].to_numpy(), dtype=torch.float32)
    assert torch.allclose(got.softmax(-1), expected, atol=1e-4)


def _texts(tmp_path):
    p = tmp_path / "two.csv"
    p.write_text("text\ngood movie\nthe plot was awful really\n")
    return p


def test_unmerged_adapter_loads_with_peft_from_pretrained(tmp_path, tiny_bert, text_files):
    import peft
    from transformers import AutoConfig

    from fmtune.models.hf_remote import FmtuneClassifier, build_backbone

    _train(tmp_path, tiny_bert, text_files, "lora", epochs=1)
    res = export(tmp_path / "lora", quiet=True)
    assert res["kind"] == "adapter"
    folder = res["out"]
    with pytest.raises(ValueError, match="trust_remote_code"):  # never a stock config of the backbone's type
        AutoConfig.from_pretrained(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    base = FmtuneClassifier(config, backbone=build_backbone(config, "cls", str(tiny_bert)))
    model = peft.PeftModel.from_pretrained(base, folder).eval()
    tok = build.load(tmp_path / "lora" / "model").tokenizer
    enc = tok(["good movie", "the plot was awful really"], padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    pred = api.predict(tmp_path / "lora", _texts(tmp_path), quiet=True)
    assert torch.allclose(probs, torch.tensor(pred[["prob_neg", "prob_pos"]].to_numpy(), dtype=torch.float32),
                          atol=1e-5)


def test_merged_export_of_a_cnn_lora_run(tmp_path, image_dirs):
    cfg = cfg_dict("efficientnet-lite0", image_dirs["train"], data={"test": str(image_dirs["test"])},
                   model={"name": "efficientnet-lite0", "image_size": 32}, strategy={"name": "lora"},
                   train={"epochs": 1, "lr": 1e-2}, out=str(tmp_path / "run"))
    api.train(cfg, quiet=True)
    res = export(tmp_path / "run", merge=True, quiet=True)
    assert res["max_abs_diff"] <= 1e-4
    plain = build.load(tmp_path / "run" / "export" / "merged")
    assert plain.adapter is None and not any("lora" in n for n, _ in plain.model.named_parameters())


def test_export_refuses_to_merge_prompt_tuning_and_to_overwrite(tmp_path, tiny_bert, text_files):
    _train(tmp_path, tiny_bert, text_files, "prompt", epochs=1)
    with pytest.raises(ConfigError, match="prompt adapter cannot be folded"):
        export(tmp_path / "prompt", merge=True, quiet=True)
    assert not (tmp_path / "prompt" / "export" / "merged").exists()
    export(tmp_path / "prompt", quiet=True)
    from fmtune.errors import RunDirError

    with pytest.raises(RunDirError, match="already exists"):
        export(tmp_path / "prompt", quiet=True)


def test_bad_targets_are_clear_errors(tiny_bert):
    with pytest.raises(ConfigError, match=r"strategy.targets: 'qurey' matches no module .*valid targets: .*query"):
        apply_strategy(_bundle(tiny_bert), StrategyConfig(name="lora", targets="qurey"))
    with pytest.raises(ConfigError, match=r"'LayerNorm' matches backbone\..*LayerNorm, a LayerNorm, not a linear"):
        apply_strategy(_bundle(tiny_bert), StrategyConfig(name="lora", targets="LayerNorm"))
    b = _bundle("efficientnet-lite0")
    with pytest.raises(ConfigError, match=r"_depthwise_conv.*depthwise.*which LoRA cannot adapt; valid targets: "
                                          r".*_expand_conv"):
        apply_strategy(b, StrategyConfig(name="dora", targets="_depthwise_conv"))
    with pytest.raises(ConfigError, match="all-linear: .* no linear layers"):
        apply_strategy(_bundle("mobilenet-v2"), StrategyConfig(name="lora", targets="all-linear"))
    with pytest.raises(ConfigError, match="prompt tuning .* image model"):
        apply_strategy(_bundle("mobilenet-v2"), StrategyConfig(name="prompt"))
    with pytest.raises(ConfigError, match="virtual tokens \\+ model.max_length"):
        apply_strategy(_bundle(tiny_bert), StrategyConfig(name="prompt", virtual_tokens=60))


def test_targets_override_and_all_linear(tiny_bert):
    b = _bundle(tiny_bert)
    apply_strategy(b, StrategyConfig(name="lora", targets="key, output.dense"))
    adapted = {n.split(".lora_A")[0] for n, _ in b.model.named_parameters() if ".lora_A." in n}
    assert adapted and all(n.endswith((".key", ".output.dense")) for n in adapted)
    b = _bundle(tiny_bert)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in b.model.backbone.modules())
    apply_strategy(b, StrategyConfig(name="lora", targets="all-linear"))
    assert len({n.split(".lora_A")[0] for n, _ in b.model.named_parameters() if ".lora_A." in n}) == n_linear


def test_default_target_table_fits_the_architectures():
    """Every table entry names modules that exist in a (tiny, random) model of that type."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel, ViTConfig, ViTModel

    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    backbones = {"bert": BertModel(BertConfig(vocab_size=50, **small)),
                 "vit": ViTModel(ViTConfig(image_size=32, patch_size=8, **small)),
                 "distilbert": DistilBertModel(DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2,
                                                                hidden_dim=64))}
    assert set(backbones) == set(adapters.TARGETS)
    for arch, bb in backbones.items():
        for name in ("lora", "ia3"):
            bundle = SimpleNamespace(model=SimpleNamespace(backbone=bb, config=bb.config), family="hf")
            targets, ff = adapters.resolve_targets(bundle, StrategyConfig(name=name))
            assert targets and set(ff) <= set(targets), (arch, name)


def test_prompt_tuning_is_never_served_from_the_feature_cache(tiny_bert):
    b = _bundle(tiny_bert)
    apply_strategy(b, StrategyConfig(name="prompt", virtual_tokens=3))
    assert frozen_prefix(b.model) == 0  # the backbone is frozen, but the prompt in front of it trains


def test_learning_rate_default_follows_the_strategy():
    assert from_dict({"strategy": {"name": "lora"}}).train.lr == 5e-4
    assert from_dict({"strategy": {"name": "full"}}).train.lr == 5e-5
    assert from_dict({"strategy": {"name": "prompt"}, "train": {"lr": 1e-3}}).train.lr == 1e-3
