"""fmtune transfer: from scratch vs linear probe vs fine-tuned, at several training-set sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import cfg_dict

from fmtune import config
from fmtune.config import scratch_lr
from fmtune.errors import ConfigError
from fmtune.models import build
from fmtune.tasks import Classification
from fmtune.transfer import parse_sizes, per_class, transfer


@pytest.mark.parametrize("name", ["tiny_bert", "tiny_resnet"])
def test_random_init_is_the_same_architecture_without_the_weights(name, request):
    path = request.getfixturevalue(name)
    task = Classification(["a", "b"])
    pre = build.create(config.ModelConfig(name=str(path)), task).model.backbone.state_dict()
    rnd = build.create(config.ModelConfig(name=str(path), init="random"), task).model.backbone.state_dict()
    assert pre.keys() == rnd.keys()
    assert all(pre[k].shape == rnd[k].shape for k in pre)
    weights = [k for k in pre if pre[k].dtype.is_floating_point and pre[k].dim() >= 2]
    assert weights and all(not torch.equal(pre[k], rnd[k]) for k in weights)


def test_random_init_refuses_adapters(tiny_bert):
    with pytest.raises(ConfigError, match="model.init"):
        config.from_dict({"model": {"name": str(tiny_bert), "init": "random"}, "strategy": {"name": "lora"}})


def test_sizes_and_per_class_draws():
    assert parse_sizes("8, 32,all") == [8, 32, "all"]
    for bad in ("0", "eight", ""):
        with pytest.raises(ConfigError, match="--sizes"):
            parse_sizes(bad)
    df = pd.DataFrame({"label": ["a"] * 10 + ["b"] * 3, "text": range(13)})
    assert per_class(df, "label", 5, 0)["label"].value_counts().to_dict() == {"a": 5, "b": 3}
    assert len(per_class(df, "label", "all", 0)) == 13
    assert per_class(df, "label", 5, 0).equals(per_class(df, "label", 5, 0))
    assert scratch_lr(5e-5) == pytest.approx(5e-4) and scratch_lr(1e-2) == 2e-3 and scratch_lr(1e-6) == 1e-4


def test_transfer_trains_three_ways_with_one_budget(tiny_bert, text_files, tmp_path):
    cfg = config.from_dict(cfg_dict(tiny_bert, text_files["train"], data={"test": str(text_files["test"])},
                                    train={"epochs": 1, "batch_size": 8}))
    out = tmp_path / "t"
    res = transfer(cfg, sizes=[4, 16], out=out, min_steps=3, quiet=True)
    runs = res["runs"]
    assert [(r["method"], r["per_class"], r["examples"]) for r in runs] == [
        ("scratch", 4, 8), ("probe", 4, 8), ("finetune", 4, 8), ("scratch", 16, 32), ("probe", 16, 32),
        ("finetune", 16, 32)]
    assert {r["steps"] for r in runs if r["per_class"] == 4} == {3}  # the floor: 1 epoch of 8 is 1 step
    assert {r["steps"] for r in runs if r["per_class"] == 16} == {4}  # 1 epoch of 32 at batch 8
    for r in runs:
        run = Path(r["run"])
        saved = yaml.safe_load((run / "config.yaml").read_text())
        want = {"scratch": ("random", "full"), "probe": ("pretrained", "head"), "finetune": ("pretrained", "full")}
        assert (saved["model"]["init"], saved["strategy"]["name"]) == want[r["method"]]
        if r["method"] == "probe":
            assert saved["train"]["head_lr"] == 1e-2
        assert saved["data"]["val"] == str(out / "data" / "val.csv")  # one validation set for all
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").open() if '"train"' in x]
        assert max(steps) == r["steps"]
        ev = json.loads((run / "eval.json").read_text())["test"]
        assert ev["accuracy"] == r["accuracy"]
        assert not (run / "model").exists() and not (run / "state").exists()  # not kept unless --keep-models
    assert (out / "transfer.png").stat().st_size > 0 and (out / "transfer.csv").is_file()
    assert json.loads((out / "transfer.json").read_text())["runs"] == runs
    gains = res["gain_over_scratch"]
    assert set(gains) == {"4", "16"} and set(gains["4"]) == {"probe", "finetune"}
    scratch16 = next(r for r in runs if r["method"] == "scratch" and r["per_class"] == 16)
    assert gains["16"]["finetune"] == pytest.approx(
        next(r for r in runs if r["method"] == "finetune" and r["per_class"] == 16)["accuracy"] - scratch16["accuracy"])


def test_transfer_needs_a_test_set_and_classes(tiny_bert, text_files, tmp_path):
    cfg = config.from_dict(cfg_dict(tiny_bert, text_files["train"]))
    with pytest.raises(ConfigError, match="--test"):
        transfer(cfg, sizes=[4], out=tmp_path / "a", quiet=True)
    cfg = config.from_dict(cfg_dict(tiny_bert, text_files["regression_train"], task={"type": "regression"},
                                    data={"test": str(text_files["regression_test"])}))
    with pytest.raises(ConfigError, match="classification"):
        transfer(cfg, sizes=[4], out=tmp_path / "b", quiet=True)
