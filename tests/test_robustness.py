"""fmtune robustness: perturbations are what they say, seeded; scores are honest; bad requests are clear."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import cfg_dict

from fmtune.cli import main
from fmtune.errors import ConfigError
from fmtune.predictor import Predictor
from fmtune.robustness import (
    ATTACKS,
    IMAGE_CORRUPTIONS,
    TEXT_PERTURBATIONS,
    attack,
    attack_sweep,
    corrupt_images,
    perturb_text,
    robustness,
)


def _images(n=4, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", list(IMAGE_CORRUPTIONS))
def test_image_corruptions_grow_with_severity_and_are_seeded(name):
    x = _images()
    levels = IMAGE_CORRUPTIONS[name][0]
    dist = []
    for level in levels:
        y = corrupt_images(x, name, level, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
        assert torch.equal(y, corrupt_images(x, name, level, torch.Generator().manual_seed(1)))
        dist.append(float((y - x).abs().mean()))
    assert dist[0] > 0
    assert dist[-1] > dist[0], (name, dist)  # the worst severity changes the image more than the mildest


@pytest.mark.parametrize("name", list(TEXT_PERTURBATIONS))
def test_text_perturbations(name):
    text = "the plot was really quite good and the actors were great"
    assert perturb_text(text, name, 0.0, np.random.default_rng(0)) == text
    a = perturb_text(text, name, TEXT_PERTURBATIONS[name][0][-1], np.random.default_rng(3))
    b = perturb_text(text, name, TEXT_PERTURBATIONS[name][0][-1], np.random.default_rng(3))
    assert a == b and a != text and a.strip()
    assert perturb_text("single", "word_drop", 1.0, np.random.default_rng(0)) == "single"  # never empty


def test_attacks_stay_in_budget_and_hurt(square_run):
    run, _, _ = square_run
    pred = Predictor(run)
    ds = [pred.decode(str(p), str(p)) for p in sorted(run.parent.glob("test/*/*.png"))]
    x = torch.stack(ds).float() / 255
    labels = [pred.labels.index(p.parent.name) for p in sorted(run.parent.glob("test/*/*.png"))]
    y = torch.tensor(labels)
    net_logits = lambda z: pred.model(pixel_values=(z - 0.5) / 0.5).logits  # noqa: E731 (spec: mean=std=0.5)
    with torch.no_grad():
        clean = (net_logits(x).argmax(-1) == y).float().mean()
    for kind in ATTACKS:
        eps = 16 / 255
        adv = attack(pred.model, pred.bundle.image, x, y, kind, eps)
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            acc = (net_logits(adv).argmax(-1) == y).float().mean()
        assert acc < clean, (kind, float(acc), float(clean))


def test_attack_sweep_is_the_attack_at_a_fraction_of_the_cost(square_run):
    """FGSM: one gradient for every epsilon, the same pixels as captum's FGSM. PGD: inputs already
    wrong (clean, or at a smaller epsilon) are not attacked and an input stops at the step it is
    fooled; every example stays in its budget, accuracy never rises with epsilon, and it is no
    higher than captum's PGD run per epsilon (never optimistic)."""
    run, _, _ = square_run
    pred = Predictor(run)
    files = sorted(run.parent.glob("test/*/*.png"))
    x = torch.stack([pred.decode(str(p), str(p)) for p in files]).float() / 255
    y = torch.tensor([pred.labels.index(p.parent.name) for p in files])
    net = lambda z: pred.model(pixel_values=(z - 0.5) / 0.5).logits  # noqa: E731 (spec: mean=std=0.5)
    with torch.no_grad():
        clean = net(x)
    levels = [2 / 255, 8 / 255, 16 / 255, 32 / 255]
    outs, advs = attack_sweep(pred.model, pred.bundle.image, x, y, "fgsm", levels, clean, keep=True)
    for eps, out, adv in zip(levels, outs, advs):
        assert torch.allclose(adv, attack(pred.model, pred.bundle.image, x, y, "fgsm", eps), atol=1e-6)
        with torch.no_grad():
            assert torch.allclose(out, net(adv), atol=1e-4)
    outs, advs = attack_sweep(pred.model, pred.bundle.image, x, y, "pgd", levels, clean, keep=True, seed=3)
    accs = [float((o.argmax(-1) == y).float().mean()) for o in outs]
    assert accs == sorted(accs, reverse=True) and accs[0] <= float((clean.argmax(-1) == y).float().mean())
    for eps, out, adv, acc in zip(levels, outs, advs, accs):
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            assert torch.allclose(out, net(adv), atol=1e-4)  # the logits are those of the example kept
            per_eps = float((net(attack(pred.model, pred.bundle.image, x, y, "pgd", eps)).argmax(-1) == y)
                            .float().mean())
        assert acc <= per_eps + 1 / len(y), (eps, acc, per_eps)
    assert accs[-1] < accs[0] or accs[0] == 0.0


def test_text_run_report_matches_the_evaluation(text_run, tmp_path):
    out = tmp_path / "rob"
    rep = robustness(text_run, suite="quick", out=out, quiet=True)
    saved = json.loads((out / "robustness.json").read_text())
    assert (out / "robustness.png").stat().st_size > 10_000
    res = saved["runs"]["run"]
    evaluated = json.loads((text_run / "eval.json").read_text())["test"]["accuracy"]
    assert res["clean"] == pytest.approx(evaluated, abs=1e-4)  # the same rows, the same model: the same score
    assert set(res["perturbations"]) == set(TEXT_PERTURBATIONS)
    for p in res["perturbations"].values():
        assert [r["severity"] for r in p["results"]] == [1, 3, 5]
        for r in p["results"]:
            assert 0 <= r["accuracy"] <= 1 and r["relative"] == pytest.approx(r["accuracy"] / res["clean"], abs=1e-3)
    # dropping 40% of the words removes the deciding word often: the score must fall
    assert res["perturbations"]["word_drop"]["results"][-1]["accuracy"] < res["clean"]
    assert rep["out"] == str(out)
    # seeded: a second call gives the same numbers
    again = robustness(text_run, suite="quick", out=tmp_path / "rob2", quiet=True)
    assert again["runs"] == saved["runs"]


def test_image_runs_side_by_side(square_run, tmp_path, capsys):
    run, test, _ = square_run
    import shutil

    other = tmp_path / "other"
    shutil.copytree(run, other)
    code = main(["robustness", str(run), str(other), "--data", str(test), "--suite", "quick", "-o",
                 str(tmp_path / "cmp"), "-q"])
    assert code == 0
    rep = json.loads((tmp_path / "cmp" / "robustness.json").read_text())
    assert list(rep["runs"]) == ["run", "other"]
    a, b = rep["runs"].values()
    assert a["perturbations"] == b["perturbations"]  # same weights, same perturbed inputs, same numbers
    assert set(a["perturbations"]) == set(IMAGE_CORRUPTIONS) | set(ATTACKS)
    assert a["perturbations"]["pgd"]["results"][-1]["accuracy"] <= a["clean"]


def test_bad_requests(text_run, square_run, tmp_path):
    with pytest.raises(ConfigError, match="choose one of: default, quick"):
        robustness(text_run, suite="hard")
    with pytest.raises(ConfigError, match="different inputs"):
        robustness([text_run, square_run[0]])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds other files"):
        robustness(text_run, suite="quick", out=tmp_path / "mine", quiet=True)


def test_augmented_batches_are_perturbed_and_reproducible(text_run, square_run):
    from fmtune.config import AugmentConfig
    from fmtune.data.prepare import make_dataset
    from fmtune.data.readers import read_any
    from fmtune.robustness import Augmented

    for run, aug in ((text_run, AugmentConfig(typos=0.2, word_drop=0.2)),
                     (square_run[0], AugmentConfig(noise=0.1, corruptions=0.5))):
        pred = Predictor(run)
        df = read_any(pred.config.data.test)
        ds, _ = make_dataset(df, pred.bundle, pred.task, pred.config.data)
        wrapped = Augmented(ds, aug, 7, pred.bundle)
        idx = [0, 3, 5, 8]
        a, b, plain = wrapped.collate(idx), wrapped.collate(idx), ds.collate(idx)
        key = "input_ids" if pred.kind == "text" else "pixel_values"
        assert torch.equal(a[key], b[key]) and torch.equal(a["labels"], plain["labels"])
        assert a[key].shape != plain[key].shape or not torch.equal(a[key], plain[key])
        if pred.kind == "image":  # another batch: other noise on the same first image
            assert not torch.equal(wrapped.collate([0, 3, 5, 9])[key][:1], a[key][:1])


def test_robust_training_runs_and_bad_combinations(square_run, text_run, tiny_bert, tiny_resnet, text_files, tmp_path):
    from conftest import cfg_dict

    import fmtune

    run, test, _ = square_run
    train = run.parent / "train"
    cfg = cfg_dict(tiny_resnet, train, out=str(tmp_path / "adv"), model={"image_size": 48}, data={"test": str(test)},
                   train={"epochs": 4, "lr": 3e-3, "adversarial": "fgsm", "adversarial_eps": 0.03,
                          "augment": {"noise": 0.05, "corruptions": 0.3}})
    res = fmtune.train(cfg, quiet=True)
    assert res["eval"]["test"]["accuracy"] >= 0.75
    info = json.loads((tmp_path / "adv" / "run.json").read_text())["fit"]
    assert info["samples_per_s"] > 0 and info["steps"] == 4 * 5  # 80 images / 16 per batch; copies not counted
    for sections, match in (
        ({"train": {"augment": {"typos": 0.1}}}, "perturb text, and this model reads images"),
        ({"train": {"adversarial": "pgd"}, "task": {"type": "multilabel"}}, "single-label classification"),
    ):
        with pytest.raises(ConfigError, match=match):
            fmtune.train(cfg_dict(tiny_resnet, train, out=str(tmp_path / "bad"), **sections), quiet=True)
    for train_cfg, match in (({"augment": {"noise": 0.1}}, "perturb images, and this model reads text"),
                             ({"adversarial": "fgsm"}, "image models only")):
        with pytest.raises(ConfigError, match=match):
            fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(tmp_path / "bad"), train=train_cfg),
                         quiet=True)
    with pytest.raises(ConfigError, match="train.augment.typos: must be in"):
        fmtune.train(cfg_dict(tiny_bert, text_files["train"], train={"augment": {"typos": 1.5}}), quiet=True)


def test_regression_and_multilabel_runs_are_explained_and_stressed(tiny_bert, text_files, tmp_path):
    from conftest import cfg_dict

    import fmtune
    from fmtune.explain import explain

    for task in ("regression", "multilabel"):
        run = tmp_path / task
        fmtune.train(cfg_dict(tiny_bert, text_files[f"{task}_train"], out=str(run), task={"type": task},
                              data={"test": str(text_files[f"{task}_test"])}, train={"epochs": 1}), quiet=True)
        rep = robustness(run, suite="quick", out=tmp_path / f"{task}-rob", quiet=True)
        res = rep["runs"][task]
        metric = rep["metric"]
        assert metric in res["perturbations"]["typos"]["results"][0] and res["clean"] is not None
        ex = explain(run, ["the movie was good"], out=tmp_path / f"{task}-ex", quiet=True)
        assert [w["word"] for w in ex["items"][0]["words"]] == ["the", "movie", "was", "good"]


def test_corruptions_on_onnxruntime_score_as_torch(square_run, tmp_path, monkeypatch):
    import importlib

    rob = importlib.import_module("fmtune.robustness")  # (fmtune.robustness is the verb)

    run, test, _ = square_run
    fast = robustness(run, test, suite="quick", attacks=False, out=tmp_path / "a", quiet=True)["runs"]["run"]
    assert fast["corruptions_scored_with"] == "onnxruntime"
    monkeypatch.setattr(rob, "_forward_model", lambda pred, quiet: (pred.model, "torch"))
    slow = robustness(run, test, suite="quick", attacks=False, out=tmp_path / "b", quiet=True)["runs"]["run"]
    assert slow["corruptions_scored_with"] == "torch" and slow["clean"] == fast["clean"]
    n = fast["examples"]
    for name, p in fast["perturbations"].items():
        for a, b in zip(p["results"], slow["perturbations"][name]["results"]):
            assert abs(a["accuracy"] - b["accuracy"]) <= 1 / n + 1e-9, (name, a, b)


def test_a_bf16_run_is_stressed_in_the_precision_it_is_evaluated_in(tiny_st_bert, text_files, tmp_path):
    """A run that predicts in bf16 (train.precision bf16; auto on a CPU with AMX) is scored clean and perturbed in
    bf16, so its clean score is eval.json's."""
    import fmtune

    run = tmp_path / "run"
    fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(run), data={"test": str(text_files["test"])},
                          train={"epochs": 1, "precision": "bf16"}), quiet=True)
    evaluated = json.loads((run / "eval.json").read_text())
    res = robustness(run, suite="quick", out=tmp_path / "rob", quiet=True)["runs"]["run"]
    assert evaluated["precision"] == res["precision"] == "bf16"
    assert res["clean"] == pytest.approx(evaluated["test"]["accuracy"], abs=1e-4)
