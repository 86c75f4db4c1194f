"""Few labels (issue 20): contrastive pair training, strategy auto, no 2-row validation split, the
few-label step budget, and self-training on unlabelled rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import cfg_dict, make_text_rows

import fmtune
from fmtune import config as config_mod
from fmtune import fewshot, semi
from fmtune.data.prepare import make_task, read_frames
from fmtune.errors import ConfigError, DataError, RunDirError
from fmtune.models import build
from fmtune.strategies import apply_strategy
from fmtune.training.infer import infer

DEFAULT_MIN_VAL = config_mod.DataConfig().min_val_per_class  # cfg_dict turns the few-label default off


def few_rows(per_class: int, seed: int, task: str = "classification") -> pd.DataFrame:
    df = make_text_rows(40 * per_class, seed, task)
    first = df["label"].str.split("|").str[0]
    return pd.concat([df[first == k].head(per_class) for k in ("neg", "pos")]).reset_index(drop=True)


# --- the pieces -------------------------------------------------------------------------------

def test_pair_targets_are_label_overlap():
    y = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0.0]])
    t = fewshot.pair_targets(y)
    assert t[0, 1] == 1 and t[0, 2] == 0  # same label, different label
    assert t[0, 3] == pytest.approx(0.5) and t[2, 3] == pytest.approx(0.5)  # {a} vs {a, b}: Jaccard 1/2
    assert t[4, 5] == 1 and t[0, 4] == 0  # two unlabelled rows are alike; unlabelled vs labelled are not
    onehot = fewshot.target_matrix(torch.tensor([0, 2, 2]), 3)
    assert onehot.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_pair_loss_is_zero_only_when_similarities_match_the_targets():
    target = fewshot.pair_targets(fewshot.target_matrix(torch.tensor([0, 0, 1, 1]), 2))
    ideal = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])  # same class: cos 1; other: cos 0
    assert fewshot.pair_loss(ideal, target).item() == pytest.approx(0.0, abs=1e-7)
    swapped = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    # positives (0,1), (2,3): cos 0, off by 1; negatives: (0,2), (1,3) cos 1 (off by 1), the other two right
    assert fewshot.pair_loss(swapped, target).item() == pytest.approx((1.0 + 0.5) / 2)
    # positives and negatives weigh the same however many of each there are
    many_neg = fewshot.pair_targets(fewshot.target_matrix(torch.tensor([0, 0, 1, 2, 3, 4]), 5))
    emb = torch.eye(6)[:, :6]  # all pairs cos 0: the one positive pair is off by 1, negatives by 0
    assert fewshot.pair_loss(emb, many_neg).item() == pytest.approx(0.5)


def test_supcon_loss_rewards_same_label_neighbours_and_skips_rows_without_a_positive():
    target = fewshot.pair_targets(fewshot.target_matrix(torch.tensor([0, 0, 1, 1]), 2))
    ideal = torch.tensor([[1.0, 0], [2.0, 0], [0, 1.0], [0, 3.0]])
    swapped = torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0], [0, 1.0]])
    assert fewshot.supcon_loss(ideal, target, 0.05).item() < 1e-6
    # each row's one positive is orthogonal while a negative matches it: -log(e^0 / (e^0 + e^(1/T) + e^0))
    t = 0.1
    expected = -math.log(1 / (2 + math.exp(1 / t)))
    assert fewshot.supcon_loss(swapped, target, t).item() == pytest.approx(expected, rel=1e-5)
    # a class of one row has no positive: it adds nothing (the loss of the rest is unchanged)
    lone = fewshot.pair_targets(fewshot.target_matrix(torch.tensor([0, 0, 1, 1, 2]), 3))
    emb = torch.cat([swapped, torch.tensor([[1.0, 1.0]])])
    direct = []
    for i in range(4):
        sims = F.normalize(emb, dim=-1) @ F.normalize(emb, dim=-1)[i] / t
        others = [j for j in range(5) if j != i]
        pos = next(j for j in others if lone[i, j] == 1)
        direct.append(-(sims[pos] - torch.logsumexp(sims[others], 0)))
    assert fewshot.supcon_loss(emb, lone, t).item() == pytest.approx(torch.stack(direct).mean().item(), rel=1e-5)
    # multi-label: positives weigh their Jaccard overlap
    soft = torch.tensor([[0, 0.5, 0], [0.5, 0, 1], [0, 1, 0.0]])
    e = torch.tensor([[1.0, 0], [0.6, 0.8], [0, 1.0]])
    logp = (F.normalize(e, dim=-1) @ F.normalize(e, dim=-1).T / t).masked_fill(torch.eye(3, dtype=torch.bool),
                                                                              float("-inf")).log_softmax(1)
    rows = [-(0.5 * logp[0, 1]) / 0.5, -(0.5 * logp[1, 0] + logp[1, 2]) / 1.5, -logp[2, 1]]
    assert fewshot.supcon_loss(e, soft, t).item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_balanced_batches_give_every_class_a_pair_and_use_every_row():
    labels = np.repeat(np.arange(3), [8, 8, 2])  # a class of two rows
    draw = fewshot.BalancedBatches(labels, len(labels), 12, seed=0)
    seen = []
    for _ in range(6):
        idx = draw()
        counts = np.bincount(labels[idx], minlength=3)
        assert set(counts[counts > 0]) and counts[counts > 0].min() >= 2
        assert len(set(idx)) == len(idx)
        seen += idx
    assert set(seen) == set(range(len(labels)))
    many = np.repeat(np.arange(150), 8)  # 150 classes: the batch holds 16 of them, 2 rows each
    idx = fewshot.BalancedBatches(many, len(many), 32, seed=1)()
    assert len(idx) == 32 and set(np.bincount(many[idx])[np.bincount(many[idx]) > 0]) == {2}
    rows = fewshot.BalancedBatches(None, 10, 5, seed=0)  # multi-label: every row once per pass
    assert sorted(rows() + rows()) == list(range(10))


def test_default_contrastive_steps():
    assert fewshot.contrastive_steps(16, 16) == 15
    assert fewshot.contrastive_steps(48, 32) == 23
    assert fewshot.contrastive_steps(1200, 32) == 400  # capped
    assert fewshot.contrastive_steps(32, 32, per_class=16) == 30  # 16 rows per class: at least 30
    assert fewshot.contrastive_steps(48, 32, per_class=16) == 30
    assert fewshot.contrastive_steps(24, 24, per_class=8) == 15
    assert fewshot.contrastive_steps(128, 32, per_class=64) == 60  # every row in 15 batches is more


def _separation(model, ds, labels) -> float:
    feats, _ = infer(model, ds, 64, features=True)
    e = F.normalize(feats, dim=-1)
    sim = e @ e.T
    same = torch.as_tensor(labels[:, None] == labels[None, :])
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return float(sim[same & off].mean() - sim[~same].mean())


@pytest.mark.parametrize("encoder,loss", [("full", "cosine"), ("lora", "cosine"), ("full", "supcon")])
def test_contrastive_pulls_labels_apart_and_leaves_only_the_head_trainable(tiny_st_bert, encoder, loss):
    df = few_rows(8, 0)
    strategy = {"name": "contrastive", "encoder": encoder, "pair_loss": loss}
    cfg = config_mod.from_dict(cfg_dict(tiny_st_bert, "x.csv", strategy=strategy,
                                        train={"lr": 3e-3 if encoder == "full" else 5e-2}))
    task = make_task(cfg.task, cfg.data, df)
    bundle = build.create(cfg.model, task)
    apply_strategy(bundle, cfg.strategy)
    ds = task.dataset(df, bundle, cfg.data)[0]
    labels = ds.targets.numpy()
    head = {k: v.clone() for k, v in bundle.model.head.state_dict().items()}
    before = _separation(bundle.model, ds, labels)
    info = fewshot.contrastive(bundle, task, ds, cfg.strategy, cfg.train, "cpu", quiet=True)
    after = _separation(bundle.model, ds, labels)
    assert after > before + (0.3 if encoder == "full" else 0.05), (before, after)  # LoRA on q/v: a smaller move
    assert info["loss_last"] < info["loss_first"]
    assert info["steps"] == 15 and info["rows_per_step"] == 16 and info["pairs_per_step"] == 120
    assert info["pair_loss"] == loss and ("temperature" in info) == (loss == "supcon")
    assert not any("lora" in n for n, _ in bundle.model.named_parameters())  # folded in: a plain model
    trainable = {n for n, p in bundle.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("head.") for n in trainable)
    for k, v in bundle.model.head.state_dict().items():
        assert torch.equal(v, head[k])


def test_contrastive_keeps_a_pretrained_encoders_token_embeddings(tiny_st_bert):
    df = few_rows(8, 0)
    for freeze in (True, False):
        cfg = config_mod.from_dict(cfg_dict(tiny_st_bert, "x.csv", train={"lr": 3e-3}, strategy={
            "name": "contrastive", "freeze_embeddings": freeze}))
        task = make_task(cfg.task, cfg.data, df)
        bundle = build.create(cfg.model, task)
        apply_strategy(bundle, cfg.strategy)
        ds = task.dataset(df, bundle, cfg.data)[0]
        before = {k: v.clone() for k, v in bundle.model.backbone.embeddings.state_dict().items()}
        info = fewshot.contrastive(bundle, task, ds, cfg.strategy, cfg.train, "cpu", quiet=True)
        after = bundle.model.backbone.embeddings.state_dict()
        vocab = bundle.model.backbone.get_input_embeddings().weight
        assert torch.equal(before["word_embeddings.weight"], after["word_embeddings.weight"]) == freeze
        assert info.get("frozen_embedding_params", 0) == (vocab.numel() if freeze else 0)
        assert not torch.equal(before["position_embeddings.weight"], after["position_embeddings.weight"])
        assert not vocab.requires_grad  # after the pair phase only the head trains, either way


def test_contrastive_refuses_images(tiny_vit):
    cfg = config_mod.from_dict(cfg_dict(tiny_vit, "x", strategy={"name": "contrastive"}))
    task = fmtune.tasks.Classification(["a", "b"])
    bundle = build.create(cfg.model, task)
    with pytest.raises(ConfigError, match="reads images"):
        fewshot.contrastive(bundle, task, None, cfg.strategy, cfg.train, "cpu", True)


def test_choose_strategy_by_labels_per_class_and_size():
    cfg = config_mod.Config()
    clf = fmtune.tasks.Classification(["a", "b"])
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, 8, clf)[0] == "contrastive"
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, 64, clf)[0] == "contrastive"
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, 65, clf)[0] == "full"
    assert fewshot.choose_strategy(cfg, "text", 400_000_000, 500, clf)[0] == "lora"
    assert fewshot.choose_strategy(cfg, "image", 4_000_000, 10, clf)[0] == "head"
    assert fewshot.choose_strategy(cfg, "image", 4_000_000, 100, clf)[0] == "full"
    assert fewshot.choose_strategy(cfg, "audio", 8_000_000, 6, clf)[0] == "head"
    assert fewshot.choose_strategy(cfg, "audio", 8_000_000, 33, clf)[0] == "full"
    quick = config_mod.from_dict({"train": {"max_minutes": 1}})
    name, why = fewshot.choose_strategy(quick, "image", 4_000_000, 100, clf)
    assert name == "head" and "time budget" in why
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, None, fmtune.tasks.Regression())[0] == "full"
    # many classes: the probe instead of contrastive tuning (up to 64 rows per class), single-label only
    ten = fmtune.tasks.Classification([f"c{i}" for i in range(10)])
    name, why = fewshot.choose_strategy(cfg, "text", 22_000_000, 8, ten)
    assert name == "head" and "10 classes" in why
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, fewshot.MANY_CLASSES_FULL_FROM - 1, ten)[0] == "head"
    # ... until full fine-tuning from the probe scores above it
    name, why = fewshot.choose_strategy(cfg, "text", 22_000_000, fewshot.MANY_CLASSES_FULL_FROM, ten)
    assert name == "full" and "from the linear probe" in why
    assert fewshot.choose_strategy(cfg, "text", 400_000_000, 64, ten)[0] == "lora"
    assert fewshot.choose_strategy(quick, "text", 22_000_000, 64, ten)[0] == "head"  # a time budget under 2 min
    from_random = config_mod.from_dict({"train": {"head_init": "random"}})  # 10-12 points under the probe
    assert fewshot.choose_strategy(from_random, "text", 22_000_000, 64, ten)[0] == "head"
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, 65, ten)[0] == "full"
    nine = fmtune.tasks.Classification([f"c{i}" for i in range(9)])
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, 8, nine)[0] == "contrastive"
    tags = fmtune.tasks.MultiLabel([f"c{i}" for i in range(10)])
    assert fewshot.choose_strategy(cfg, "text", 22_000_000, 8, tags)[0] == "contrastive"


def test_the_median_class_decides_the_split_and_a_label_seen_once_stays_in_training(tmp_path):
    big = make_text_rows(600, 4)
    rare = pd.DataFrame({"text": [f"rare text {i}" for i in range(3)], "label": "rare"})
    once = pd.DataFrame({"text": ["seen once"], "label": "once"})
    path = tmp_path / "imbalanced.csv"
    pd.concat([big, rare, once]).to_csv(path, index=False)
    for seed in range(5):  # whichever rows a seed draws
        frames = read_frames(config_mod.DataConfig(train=str(path)), "classification", seed)
        # 4 rows of the rarest labels would leave no split (0.4 validation rows); the median label's ~150 do
        assert frames.fewest == 1 and frames.typical > 100
        assert frames.val_from_train and not frames.val_is_train
        assert len(frames.val) == round(603 * 0.1) and len(frames.train) + len(frames.val) == 604
        assert "once" in set(frames.train["label"]) and "once" not in set(frames.val["label"])
        counts = frames.val["label"].value_counts()
        assert abs(counts["pos"] - counts["neg"]) <= 2  # stratified: the rare labels no longer turn it off
    # few rows of every class: no split, judged by the same median
    path8 = tmp_path / "eight.csv"
    pd.concat([few_rows(8, 0), rare]).to_csv(path8, index=False)
    frames = read_frames(config_mod.DataConfig(train=str(path8)), "classification", 0)
    assert frames.val_is_train and frames.typical == 8 and frames.fewest == 3
    # multi-label: a row holding a label seen once stays in training
    ml = make_text_rows(200, 5, "multilabel")
    ml.loc[7, "label"] = "pos|solo"
    path_ml = tmp_path / "ml.csv"
    ml.to_csv(path_ml, index=False)
    for seed in range(5):
        frames = read_frames(config_mod.DataConfig(train=str(path_ml), min_val_per_class=0), "multilabel", seed)
        assert 7 in frames.train.index and 7 not in frames.val.index and len(frames.val) == 20
    # multi-label with many rare labels: the median label is rare, but 600 rows split 60 rows for 6 labels
    many = make_text_rows(600, 7, "multilabel")
    for i, extra in enumerate(["a", "b", "c", "d"]):
        many.loc[i * 3:i * 3 + 2, "label"] = many.loc[i * 3:i * 3 + 2, "label"] + f"|{extra}"
    path_many = tmp_path / "many.csv"
    many.to_csv(path_many, index=False)
    frames = read_frames(config_mod.DataConfig(train=str(path_many)), "multilabel", 0)
    assert frames.typical == 3 and frames.val_from_train and len(frames.val) == 60


# --- runs --------------------------------------------------------------------------------------

def test_contrastive_run_with_few_labels_keeps_every_row_and_learns(tiny_st_bert, tmp_path):
    train, test = tmp_path / "few.csv", tmp_path / "test.csv"
    few_rows(16, 0).to_csv(train, index=False)
    make_text_rows(80, 2).to_csv(test, index=False)
    cfg = cfg_dict(tiny_st_bert, train, strategy={"name": "auto"}, out=str(tmp_path / "run"),
                   data={"train": str(train), "test": str(test), "min_val_per_class": DEFAULT_MIN_VAL},
                   train={"patience": 3})
    cfg["train"]["lr"] = 3e-3
    summary = fmtune.train(cfg, quiet=True, report=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    few = info["few_labels"]
    assert few["auto"]["strategy"] == "contrastive" and "16 labelled rows" in few["auto"]["why"]
    assert "no validation split" in few["no_validation_split"]
    assert info["data"]["train"]["rows"] == 32 and info["data"]["val_is_train"]
    assert info["fit"]["steps"] == 0  # the head solved on every row is final
    assert few["contrastive"]["steps"] == 30  # 16 rows per class: the floor of 30
    saved = config_mod.load(tmp_path / "run" / "config.yaml")
    assert saved.strategy.name == "contrastive" and saved.train.patience is None
    assert summary["eval"]["test"]["accuracy"] >= 0.75  # chance: 0.5 (a tiny random-init encoder)
    # the saved model is the tuned encoder with its head: loaded again, it scores the same
    again = fmtune.api.evaluate(tmp_path / "run", test, quiet=True)
    assert again["test"]["accuracy"] == summary["eval"]["test"]["accuracy"]


def test_few_label_full_run_gets_a_step_budget(tiny_st_bert, tmp_path):
    train = tmp_path / "few.csv"
    few_rows(8, 1).to_csv(train, index=False)
    fmtune.train(cfg_dict(tiny_st_bert, train, strategy={"name": "full"}, out=str(tmp_path / "run"),
                          data={"train": str(train), "min_val_per_class": DEFAULT_MIN_VAL}), quiet=True, report=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["fit"]["steps"] == fewshot.FEW_MIN_STEPS
    assert "a step budget of 50 steps of 4 rows" in info["few_labels"]["no_validation_split"]
    # asked for a split: it is made
    fmtune.train(cfg_dict(tiny_st_bert, train, out=str(tmp_path / "split"), data={"train": str(train),
                                                                               "min_val_per_class": 0}),
                 quiet=True, report=False)
    info = json.loads((tmp_path / "split" / "run.json").read_text())
    assert info["data"]["val_split_from_train"] and info["data"]["train"]["rows"] < 16


def test_auto_on_a_large_set_with_one_rare_class_fine_tunes_with_a_split(tiny_st_bert, tmp_path):
    train = tmp_path / "imbalanced.csv"
    rare = pd.DataFrame({"text": ["bad great film", "awful great plot"], "label": "mixed"})
    pd.concat([make_text_rows(300, 6), rare]).to_csv(train, index=False)
    fmtune.train(cfg_dict(tiny_st_bert, train, strategy={"name": "auto"}, out=str(tmp_path / "run"),
                          data={"train": str(train), "min_val_per_class": DEFAULT_MIN_VAL}, train={"epochs": 1}),
                 quiet=True, report=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    few = info["few_labels"]
    assert few["fewest_per_label"] == 2 and few["median_per_label"] > 64
    assert few["auto"]["strategy"] == "full" and "(the median class)" in few["auto"]["why"]
    assert "no_validation_split" not in few and info["data"]["val_split_from_train"]


def test_contrastive_multilabel_run(tiny_st_bert, tmp_path):
    train = tmp_path / "ml.csv"
    df = make_text_rows(120, 3, "multilabel")
    df.to_csv(train, index=False)
    summary = fmtune.train(cfg_dict(tiny_st_bert, train, task={"type": "multilabel"}, out=str(tmp_path / "run"),
                                    strategy={"name": "contrastive", "contrastive_steps": 5}),
                           quiet=True, report=False)
    assert summary["best"] is not None
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["few_labels"]["contrastive"]["steps"] == 5


# --- self-training ----------------------------------------------------------------------------

def test_select_is_class_balanced_and_most_confident_first():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05], [0.2, 0.8], [0.45, 0.55], [0.99, 0.01]])
    assert semi.select(["a", "b"], probs, 5, 0.0).tolist() == [3, 4, 5, 2] or \
        sorted(semi.select(["a", "b"], probs, 5, 0.0).tolist()) == [2, 3, 4, 5]
    assert semi.select(["a", "b"], probs, 1, 0.0).tolist() == [3, 5]  # the best of each class
    assert semi.select(["a", "b"], probs, 5, 0.7).tolist() == [3, 5]  # b has one row over 0.7: one each
    assert semi.select(["a", "b"], probs, 5, 0.99).size == 0  # b has none


@pytest.mark.parametrize("split", [False, True])
def test_self_training_rounds(tiny_st_bert, tmp_path, split):
    train, pool, test = tmp_path / "few.csv", tmp_path / "pool.csv", tmp_path / "test.csv"
    few_rows(8, 0).to_csv(train, index=False)
    make_text_rows(200, 5).to_csv(pool, index=False)  # has labels: used only to count right pseudo-labels
    make_text_rows(60, 2).to_csv(test, index=False)
    cfg = cfg_dict(tiny_st_bert, train, strategy={"name": "contrastive"}, out=str(tmp_path / "run"),
                   data={"train": str(train), "test": str(test), "min_val_per_class": 0 if split else DEFAULT_MIN_VAL},
                   semi={"unlabeled": str(pool), "rounds": 2})
    cfg["train"]["lr"] = 3e-3
    summary = fmtune.train(cfg, quiet=True, report=True)
    run = tmp_path / "run"
    result = json.loads((run / "selftrain.json").read_text())
    rounds = result["rounds"]
    # per class: twice the labelled rows of the rarest class (8, counted before a split) more each round
    assert [r["pseudo_labelled"] for r in rounds] == [0, 32, 64]
    assert [r["labelled"] for r in rounds] == [14 if split else 16] * 3
    assert all(0 <= r["pseudo_right"] <= r["pseudo_labelled"] for r in rounds[1:])
    assert rounds[1]["pseudo_right"] >= 0.75 * rounds[1]["pseudo_labelled"]  # the tiny model learnt the keyword
    vals = {config_mod.load(run / "rounds" / f"round-{r}" / "config.yaml").data.val for r in range(2)}
    vals.add(config_mod.load(run / "config.yaml").data.val)
    assert len(vals) == 1 and (vals.pop() is None) != split  # one validation file of labelled rows, every round
    assert all("accuracy" in r["test"] for r in rounds)
    assert (run / "rounds" / "round-0" / "model").is_dir() and (run / "rounds" / "round-1" / "eval.json").exists()
    assert summary["selftrain"] == result and (run / "report.html").exists()
    assert "Self-training" in (run / "report.html").read_text()
    data = pd.read_csv(run / "selftrain-data" / "train-round-2.csv")
    assert len(data) == rounds[2]["labelled"] + 64 and "_truth" not in data.columns
    assert not list(tmp_path.glob(".run.selftrain-*"))  # the work folder is gone


def test_self_training_bad_input(tiny_st_bert, tmp_path, text_files):
    pool = tmp_path / "pool.csv"
    pd.DataFrame({"sentence": ["a b"]}).to_csv(pool, index=False)
    cfg = cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "r"), semi={"unlabeled": str(pool)})
    with pytest.raises(DataError, match="sentence"):  # the columns it has are named
        fmtune.train(cfg, quiet=True)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    pool_ok = tmp_path / "pool-ok.csv"
    pd.DataFrame({"text": ["a good film"]}).to_csv(pool_ok, index=False)
    cfg = cfg_dict(tiny_st_bert, text_files["train"], out=str(taken), semi={"unlabeled": str(pool_ok)})
    with pytest.raises(RunDirError, match="already exists") as err:  # checked before round 0 trains
        fmtune.train(cfg, quiet=True)
    assert "--resume" not in str(err.value) and (taken / "x").exists()
    cfg = cfg_dict(tiny_st_bert, text_files["regression_train"], task={"type": "regression"},
                   out=str(tmp_path / "r"), semi={"unlabeled": str(pool)})
    with pytest.raises(ConfigError, match="self-training.*not available for regression"):
        fmtune.train(cfg, quiet=True)
