"""fmtune continue: head extension, the memory, the EWC penalty, the lineage, RUN left as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import cfg_dict, make_text_rows, save_square_images

import fmtune
from fmtune import continual
from fmtune.errors import ConfigError
from fmtune.models import build
from fmtune.report import write_report
from fmtune.run import open_run
from fmtune.tasks import Classification


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _new_task_rows(n: int, seed: int) -> pd.DataFrame:
    """The keyword data with its positive class renamed: 'upbeat' is new, 'pos' no longer occurs."""
    df = make_text_rows(n, seed)
    df["label"] = df["label"].replace({"pos": "upbeat"})
    return df


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_bert, text_files):
    out = tmp_path_factory.mktemp("cl") / "A"
    fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(out), data={"test": str(text_files["test"])},
                          train={"epochs": 2}), quiet=True, report=False)
    return out


@pytest.fixture(scope="module")
def new_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cl-new")
    out = {}
    for name, n, seed in (("train", 160, 5), ("test", 60, 6)):
        out[name] = d / f"b_{name}.csv"
        _new_task_rows(n, seed).to_csv(out[name], index=False)
    return out


def _logits_before_and_after(old, grown) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's model and the grown one on the same two texts, in eval mode."""
    enc = old.bundle.tokenizer(["the movie was good", "awful plot really"], return_tensors="pt", padding=True)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    old.bundle.model.eval()
    grown.model.eval()
    with torch.no_grad():
        return old.bundle.model(**batch).logits, grown.model(**batch).logits


def test_head_extension_keeps_the_old_logits(base_run):
    old = open_run(base_run)
    task = Classification(old.task.labels + ["upbeat"])
    grown = build.create(old.config.model, task)
    continual.extend_head(grown.model, old.bundle.model.state_dict())
    before, after = _logits_before_and_after(old, grown)
    assert after.shape == (2, 3)
    torch.testing.assert_close(after[:, :2], before, rtol=0, atol=1e-6)
    assert not torch.equal(after[:, 2], torch.zeros(2))  # the new output is initialised, not left out


def test_memory_is_bounded_and_balanced():
    df = pd.DataFrame({"text": [f"t{i}" for i in range(130)], "label": ["a"] * 100 + ["b"] * 25 + ["c"] * 5})
    mem = continual.balanced_sample(df, "label", 45, seed=0)
    counts = mem["label"].value_counts().to_dict()
    assert len(mem) == 45 and counts == {"a": 20, "b": 20, "c": 5}  # c gives all it has; a and b share the rest
    assert mem.equals(continual.balanced_sample(df, "label", 45, seed=0))  # seeded
    assert not mem.equals(continual.balanced_sample(df, "label", 45, seed=1))
    assert len(continual.balanced_sample(df, "label", 1000, seed=0)) == 130  # never more than there is
    even = continual.balanced_sample(df.iloc[:125], "label", 10, seed=0)["label"].value_counts().to_dict()
    assert even == {"a": 5, "b": 5}


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_fisher():
    model = torch.nn.Linear(3, 2)
    fisher = {"weight": torch.ones(2, 3), "bias": torch.tensor([0.0, 4.0])}
    ewc = continual.EWC(model, fisher, lam=2.0)
    assert ewc().item() == 0.0
    with torch.no_grad():
        model.bias += torch.tensor([10.0, 0.5])  # a move along a zero-Fisher direction costs nothing
    assert ewc().item() == pytest.approx(0.5 * 2.0 * 4.0 * 0.25)
    ewc().backward()
    assert model.bias.grad.tolist() == pytest.approx([0.0, 2.0 * 4.0 * 0.5])


def test_fisher_is_zero_for_the_new_outputs(base_run):
    old = open_run(base_run)
    task = Classification(old.task.labels + ["upbeat"])
    grown = build.create(old.config.model, task)
    continual.extend_head(grown.model, old.bundle.model.state_dict())
    from fmtune.data.prepare import make_dataset

    ds = make_dataset(make_text_rows(8, 3), grown, old.task, old.config.data)[0]
    fisher = continual.fisher_diagonal(grown.model, ds, list(range(8)), 2, "cpu", seed=0)
    head = [k for k in fisher if k.endswith("weight") and fisher[k].shape[0] == 3][-1]
    assert fisher[head][2].abs().sum() == 0 and fisher[head][:2].abs().sum() > 0
    assert all(torch.isfinite(f).all() for f in fisher.values())


def test_continue_with_replay_then_again(base_run, new_files, tmp_path):
    before = _digest(base_run)
    b = tmp_path / "B"
    res = fmtune.continue_run(base_run, new_files["train"], test=new_files["test"], out=b, quiet=True,
                                 report=False, overrides=["continual.memory=50", "train.epochs=2"])
    assert _digest(base_run) == before  # RUN is only read
    labels = json.loads((b / "labels.json").read_text())["labels"]
    assert labels == ["neg", "pos", "upbeat"]  # old order kept, the new label appended, 'pos' still known
    report = json.loads((b / "continual.json").read_text())
    assert report == res["continual"]
    assert report["method"] == "replay" and report["labels"]["added"] == ["upbeat"]
    assert [t["task"] for t in report["tasks"]] == ["train", "b_train"]
    old, new = report["tasks"]
    assert old["forgetting"] == pytest.approx(old["before"]["accuracy"] - old["after"]["accuracy"])
    assert new["gain"] == pytest.approx(new["after"]["accuracy"] - new["before"]["accuracy"])
    assert new["before"]["accuracy"] < 0.75  # RUN cannot say 'upbeat': those rows count as wrong
    a_eval = json.loads((base_run / "eval.json").read_text())["test"]["accuracy"]
    assert old["before"]["accuracy"] == pytest.approx(a_eval)  # 'before' is RUN's own test score
    mem = pd.read_csv(b / "continual" / "memory.csv")
    assert len(mem) == 50 and mem["label"].value_counts().to_dict() == {"neg": 25, "pos": 25}
    assert report["memory"]["examples"] == 50
    page = write_report(b).read_text()
    assert "Continual learning (replay" in page and "b_train" in page
    # --resume rebuilds the continued run (RUN's weights, grown head, B's memory) and lands on the same model
    again = fmtune.train(None, resume=b, quiet=True, report=False)["continual"]
    assert [t["after"] for t in again["tasks"]] == [t["after"] for t in report["tasks"]]
    assert again["memory"] == report["memory"]
    saved = yaml.safe_load((b / "config.yaml").read_text())
    assert saved["continual"]["source"] == str(base_run.resolve()) and saved["data"]["test"] == str(new_files["test"])
    # a chain: C continues B; its lineage has three tasks and its memory holds all three labels
    c = tmp_path / "C"
    res_c = fmtune.continue_run(b, new_files["train"], test=new_files["test"], out=c, quiet=True,
                                   report=False, method="naive",
                                   overrides=["continual.memory=60", "continual.task_name=again", "train.epochs=1"])
    chain = res_c["continual"]["lineage"]
    assert [s["task"] for s in chain] == ["train", "b_train", "again"]
    assert [t["task"] for t in res_c["continual"]["tasks"]] == ["train", "b_train", "again"]
    assert set(pd.read_csv(c / "continual" / "memory.csv")["label"]) == {"neg", "pos", "upbeat"}


@pytest.mark.parametrize("method", ["ewc", "lwf"])
def test_continue_with_ewc_and_lwf(base_run, new_files, tmp_path, method):
    res = fmtune.continue_run(base_run, new_files["train"], test=new_files["test"], out=tmp_path / method,
                                 method=method, quiet=True, report=False,
                                 overrides=["train.epochs=1", "continual.fisher_samples=16"])
    report = res["continual"]
    assert report["method"] == method and len(report["tasks"]) == 2
    assert all(np.isfinite(t["after"]["accuracy"]) for t in report["tasks"])
    if method == "ewc":
        assert report["ewc"]["fisher_samples"] == 16 and report["ewc"]["fisher_mean"] > 0
        assert report["ewc"]["penalty_of_kept_model"] > 0 and report["ewc"]["val_loss_of_kept_model"] > 0
        rows = json.loads((tmp_path / method / "run.json").read_text())["data"]["train"]["rows"]
        assert report["ewc"]["lambda"] == pytest.approx(
            json.loads((base_run / "run.json").read_text())["data"]["train"]["rows"] / rows)


def test_a_run_cannot_be_continued_into_itself(base_run, new_files):
    with pytest.raises(ConfigError, match="never modified"):
        fmtune.continue_run(base_run, new_files["train"], out=base_run, overwrite=True, quiet=True)
    with pytest.raises(ConfigError, match="never modified"):
        fmtune.continue_run(base_run, new_files["train"], out=base_run / "inner", quiet=True)


def test_continue_an_image_run_keeps_copies_of_old_images(square_run, tmp_path, tiny_resnet):
    run, _, _ = square_run
    before = _digest(run)
    new = tmp_path / "new"
    save_square_images(new, 8, seed=3)
    (new / "blue").rename(new / "purple")  # a new label; red stays
    res = fmtune.continue_run(run, new, out=tmp_path / "B", quiet=True, report=False,
                                 overrides=["continual.memory=10", "train.epochs=1"])
    assert _digest(run) == before
    mem = pd.read_csv(tmp_path / "B" / "continual" / "memory.csv")
    assert len(mem) == 10 and set(mem["label"]) == {"red", "blue"}
    assert all((tmp_path / "B" / "continual" / p).is_file() for p in mem["image"])  # copies, not links to RUN's data
    assert res["continual"]["labels"]["added"] == ["purple"]
    # replay: the new rows left after the validation split (16 - 2) and the memory
    assert json.loads((tmp_path / "B" / "run.json").read_text())["data"]["train"]["rows"] == 14 + 10


def test_continue_an_image_run_on_tables_whose_images_are_in_another_folder(square_run, tmp_path):
    """Tables naming images relative to data.media_root: the new data and its test table are read from there, for
    training and for the before / after scores of every step."""
    run, _, _ = square_run
    root = tmp_path / "images"
    for split, seed in (("train", 3), ("test", 4)):
        save_square_images(root / split, 6, seed=seed)
        files = sorted((root / split).glob("*/*.png"))
        pd.DataFrame({"image": [str(f.relative_to(root)) for f in files],
                      "label": [f.parent.name for f in files]}).to_csv(tmp_path / f"{split}.csv", index=False)
    res = fmtune.continue_run(run, tmp_path / "train.csv", test=tmp_path / "test.csv", out=tmp_path / "B", quiet=True,
                              report=False, overrides=["continual.memory=10", "train.epochs=1",
                                                       f"data.media_root={root}"])
    rows = res["continual"]["tasks"]
    assert len(rows) == 2 and all("after" in r for r in rows) and res["continual"]["new_task_gain"] is not None


def test_continual_refuses_what_it_cannot_do(text_files, tiny_bert, tmp_path):
    run = tmp_path / "reg"
    fmtune.train(cfg_dict(tiny_bert, text_files["regression_train"], out=str(run), task={"type": "regression"},
                          train={"epochs": 1}), quiet=True, report=False)
    with pytest.raises(ConfigError, match="classification"):
        fmtune.continue_run(run, text_files["regression_train"], out=tmp_path / "B", quiet=True)


def test_the_cli_continues_a_run_and_names_what_is_wrong(base_run, new_files, tmp_path, capsys):
    from fmtune.cli import main

    out = tmp_path / "cli"
    assert main(["continue", str(base_run), "--data", str(new_files["train"]), "--test", str(new_files["test"]),
                 "--method", "naive", "--epochs", "1", "--memory", "20", "--out", str(out), "-q", "--no-report"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "naive" and printed["memory"]["examples"] == 20
    assert json.loads((out / "continual.json").read_text()) == printed
    assert main(["continue", str(tmp_path / "nowhere"), "--data", str(new_files["train"]), "-q"]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err.replace("\n", "")


@pytest.mark.parametrize("strategy", ["lora", "prompt"])
def test_adapter_runs_continue_with_their_adapter(tiny_bert, text_files, new_files, tmp_path, strategy):
    """An adapter run continues with the same adapter: its trained adapter and head rows are the
    start (old logits unchanged), the grown head is saved with the adapter, and the run loads."""
    from fmtune.strategies import apply_strategy

    src = tmp_path / "A"
    fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(src), strategy={"name": strategy},
                          train={"epochs": 1}), quiet=True, report=False)
    old = open_run(src)
    cfg = fmtune.load_config(src / "config.yaml")
    grown = build.create(cfg.model, Classification(old.task.labels + ["upbeat"]))
    apply_strategy(grown, cfg.strategy)
    continual.extend_head(grown.model, old.bundle.model.state_dict())
    before, after = _logits_before_and_after(old, grown)
    torch.testing.assert_close(after[:, :2], before, rtol=0, atol=1e-6)
    res = fmtune.continue_run(src, new_files["train"], test=new_files["test"], out=tmp_path / "B", quiet=True,
                                 report=False, overrides=["train.epochs=1"])
    assert res["continual"]["labels"]["added"] == ["upbeat"]
    again = open_run(tmp_path / "B")
    assert again.bundle.adapter == strategy and again.task.labels == ["neg", "pos", "upbeat"]
    assert fmtune.evaluate(tmp_path / "B", new_files["test"], quiet=True)["test"]["accuracy"] == pytest.approx(
        res["continual"]["tasks"][1]["after"]["accuracy"])
    with pytest.raises(ConfigError, match="same adapter strategy"):
        fmtune.continue_run(src, new_files["train"], out=tmp_path / "C", quiet=True,
                               overrides=["strategy.name=full"])


def test_the_memory_keeps_texts_with_line_breaks_whole(tiny_bert, new_files, tmp_path):
    import csv

    rows = make_text_rows(60, seed=9)
    rows.loc[:29, "text"] = rows.loc[:29, "text"] + "\rthe plot"  # an old Mac line break, alone in its field
    rows.loc[30:39, "text"] = rows.loc[30:39, "text"] + "\r\nwas fine"  # a Windows one
    data = tmp_path / "a.csv"
    rows.to_csv(data, index=False, quoting=csv.QUOTE_ALL)
    fmtune.train(cfg_dict(tiny_bert, data, out=str(tmp_path / "A"), train={"epochs": 1}), quiet=True, report=False)
    fmtune.continue_run(tmp_path / "A", new_files["train"], out=tmp_path / "B", quiet=True, report=False,
                           overrides=["train.epochs=1"])
    from fmtune.data.readers import read_any

    mem = read_any(tmp_path / "B" / "continual" / "memory.csv")
    train_rows = json.loads((tmp_path / "A" / "run.json").read_text())["data"]["train"]["rows"]
    assert len(mem) == train_rows and mem["label"].notna().all()
    assert mem["text"].str.contains("\r", regex=False).sum() >= 1


def test_continue_with_another_strategy_takes_its_default_learning_rate(text_run, tmp_path):
    import shutil

    import yaml

    from fmtune.config import DEFAULT_LR
    from fmtune.continual import continue_config

    src = tmp_path / "A"
    shutil.copytree(text_run, src)
    cfg = yaml.safe_load((src / "config.yaml").read_text())
    cfg["train"]["lr"] = DEFAULT_LR["full"]  # trained at full fine-tuning's default rate
    (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    lora = continue_config(src, "new.csv", out=tmp_path / "B", overrides=["strategy.name=lora"])
    assert lora.train.lr == DEFAULT_LR["lora"]
    same = continue_config(src, "new.csv", out=tmp_path / "C")
    assert same.train.lr == DEFAULT_LR["full"]
    by_hand = continue_config(src, "new.csv", out=tmp_path / "D", overrides=["strategy.name=lora", "train.lr=1e-4"])
    assert by_hand.train.lr == 1e-4
    cfg["train"]["lr"] = 3e-5  # a rate set by hand for the source run is kept
    (src / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert continue_config(src, "new.csv", out=tmp_path / "E", overrides=["strategy.name=lora"]).train.lr == 3e-5


def test_train_resume_from_a_run_trains_its_model_on_the_data_with_more_labels(base_run, text_files, tmp_path,
                                                                             capsys):
    """The active-learning loop's last step: `fmtune train --resume-from RUN --data more.csv` starts
    from RUN's fine-tuned model on all the labels (no replay), keeps RUN's test file, leaves RUN as it
    was; the model/task/config of RUN cannot be changed by flags."""
    from fmtune.cli import main

    before = _digest(base_run)
    more = tmp_path / "more.csv"
    pd.concat([pd.read_csv(text_files["train"]), make_text_rows(40, 11)]).to_csv(more, index=False)
    out = tmp_path / "more-labels"
    assert main(["train", "--resume-from", str(base_run), "--data", str(more), "--epochs", "1", "--out", str(out),
                 "-q", "--no-report"]) == 0
    assert _digest(base_run) == before
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["train"] == str(more) and cfg["data"]["test"] == str(text_files["test"])
    assert cfg["continual"]["method"] == "naive" and cfg["train"]["epochs"] == 1
    report = json.loads((out / "continual.json").read_text())
    a_eval = json.loads((base_run / "eval.json").read_text())["test"]["accuracy"]
    assert report["tasks"][0]["before"]["accuracy"] == pytest.approx(a_eval)  # started from RUN's model
    rows = json.loads((out / "run.json").read_text())["data"]
    assert rows["train"]["rows"] + rows["val"]["rows"] == len(pd.read_csv(more))  # all of it, no replayed memory
    # no --data: RUN's own training file, read again
    again = tmp_path / "again"
    fmtune.train_from(base_run, out=again, overrides=["train.epochs=1"], quiet=True, report=False)
    assert yaml.safe_load((again / "config.yaml").read_text())["data"]["train"] == str(text_files["train"])
    capsys.readouterr()
    assert main(["train", "--resume-from", str(base_run), "--model", "minilm-l6", "-q"]) == 2
    assert "--model cannot change them" in capsys.readouterr().err.replace("\n", " ")
