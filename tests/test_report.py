"""report.html (self-contained, every section that applies), TensorBoard logs, compare, and a
render in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import cfg_dict

import fmtune
from fmtune import api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _inline_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_report_is_self_contained_and_complete(text_run):
    page = (text_run / "report.html").read_text()  # written at the end of training
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page  # nothing from a network
    for section in ("Test results", "fine-tuned", "Training",
                    "Confusion matrix", "Most confident mistakes", "Data", "Environment", "Config"):
        assert section in page, section
    from PIL import Image

    images = _inline_images(page)
    assert len(images) >= 4  # curves, confusion matrix, class balance, text lengths
    for data in images:
        Image.open(io.BytesIO(data)).verify()
    mistakes = json.loads((text_run / "eval.json").read_text())["mistakes"]
    assert mistakes and all(m["true"] != m["predicted"] for m in mistakes)
    assert [m["score"] for m in mistakes] == sorted((m["score"] for m in mistakes), reverse=True)
    assert mistakes[0]["input"] in page


def test_tensorboard_logs_scalars_and_hparams(text_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(text_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/accuracy", "val/loss"} <= tags
    evals = [json.loads(x) for x in (text_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e.value for e in acc.Scalars("val/accuracy")] == pytest.approx([e["accuracy"] for e in evals])
    assert (text_run / "tb" / "hparams").is_dir()


def test_no_report_and_compare(tmp_path, tiny_st_bert, text_files, text_run):
    s = fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "head"),
                              strategy={"name": "head"}, data={"test": str(text_files["test"])}), quiet=True,
                     report=False)
    assert not (tmp_path / "head" / "report.html").exists() and "report" not in s
    api.report(tmp_path / "head", quiet=True)
    assert (tmp_path / "head" / "report.html").exists()
    out = api.compare([text_run, tmp_path / "head"], tmp_path / "cmp.html", quiet=True)
    page = out.read_text()
    assert "head" in page and "full" in page and len(_inline_images(page)) == 1


def render(html_file: Path, png: Path) -> str:
    """Load a page in headless Chromium, screenshot it; returns what Chromium logged."""
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={png.parent / 'chromium-profile'}", "--enable-logging=stderr",
                           "--window-size=1200,2400", f"--screenshot={png}", html_file.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def check_render(run_dir: Path, tmp_path: Path) -> None:
    """The report renders: a real screenshot, every image decodes, nothing failed to load and no
    console error."""
    from PIL import Image, ImageStat

    png = tmp_path / f"{run_dir.name}-report.png"
    log = render(run_dir / "report.html", png)
    assert "Failed to load resource" not in log and "Uncaught" not in log and ":CONSOLE" not in log, log[-2000:]
    shot = Image.open(png).convert("L")
    assert shot.size == (1200, 2400) and ImageStat.Stat(shot).stddev[0] > 10  # not a blank page
    for data in _inline_images((run_dir / "report.html").read_text()):
        Image.open(io.BytesIO(data)).load()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_headless_chromium(text_run, tmp_path):
    check_render(text_run, tmp_path)


def test_trackers_missing_package_is_a_clear_error(tmp_path, tiny_st_bert, text_files, monkeypatch):
    import sys

    from fmtune.errors import ConfigError

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed (the dev extra installs it)

    with pytest.raises(ConfigError, match="train.tracker=mlflow: the mlflow package is not installed"):
        fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "r"),
                              train={"tracker": "mlflow"}), quiet=True)
    assert not (tmp_path / "r").exists()  # stopped before anything was written


def test_trackers_receive_params_and_every_logged_number(tmp_path, tiny_st_bert, text_files, monkeypatch):
    """The integration code, against stand-ins recording what mlflow / wandb would be told."""
    import sys
    from types import SimpleNamespace

    calls: dict[str, list] = {"params": [], "metrics": [], "uri": [], "ended": [], "wandb": []}
    fake_mlflow = SimpleNamespace(set_tracking_uri=calls["uri"].append, set_experiment=lambda name: None,
                                  start_run=lambda run_name: None, log_params=calls["params"].append,
                                  log_metrics=lambda m, step: calls["metrics"].append((step, m)),
                                  end_run=lambda: calls["ended"].append(True))
    run = SimpleNamespace(log=lambda m, step: calls["wandb"].append((step, m)), finish=lambda: calls["ended"].append(1))
    fake_wandb = SimpleNamespace(init=lambda **kw: calls["wandb"].append(kw) or run)
    monkeypatch.setitem(sys.modules, "mlflow", fake_mlflow)
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for tracker in ("mlflow", "wandb"):
        fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / tracker),
                              data={"test": str(text_files["test"])}, train={"tracker": tracker}),
                     quiet=True, report=False)
    assert calls["uri"] == [(tmp_path / "mlruns").as_uri()]
    assert calls["params"][0]["strategy.name"] == "full" and calls["ended"] == [True, 1]
    logged = {k for _, m in calls["metrics"] for k in m}
    assert {"train/loss", "val/accuracy", "test/accuracy"} <= logged
    assert calls["wandb"][0]["name"] == "wandb" and any("test/accuracy" in m for _, m in calls["wandb"][1:])


def test_mlflow_for_real(tmp_path, tiny_st_bert, text_files, monkeypatch):
    """The real mlflow package (mlflow-skinny, a dev extra) with its local file store: the run is
    there with its settings and every logged number, train, validation and test."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # fmtune sets it: restored after the test
    monkeypatch.chdir(tmp_path)  # anything mlflow writes on its own stays in the test's folder
    fmtune.train(cfg_dict(tiny_st_bert, text_files["train"], out=str(tmp_path / "runs" / "tracked"),
                          data={"test": str(text_files["test"])}, train={"tracker": "mlflow"}),
                 quiet=True, report=False)
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    exp = client.get_experiment_by_name("fmtune")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "full" and run.data.params["train.epochs"] == "2"
    assert {"train/loss", "val/accuracy", "test/accuracy"} <= set(run.data.metrics)
    evaluated = json.loads((tmp_path / "runs" / "tracked" / "eval.json").read_text())["test"]["accuracy"]
    assert run.data.metrics["test/accuracy"] == pytest.approx(evaluated)
    assert len(client.get_metric_history(run.info.run_id, "val/accuracy")) == 2  # one per epoch


def test_report_shows_the_analysis_verbs_outputs(text_run):
    from fmtune.explain import explain
    from fmtune.report import write_report
    from fmtune.robustness import robustness

    explain(text_run, ["a really great film"], quiet=True)
    robustness(text_run, suite="quick", quiet=True)
    page = write_report(text_run).read_text()
    assert "Explanations (fmtune explain)" in page and "rgba(" in page and ">great</span>" in page
    assert "Robustness (fmtune robustness)" in page


def test_most_confused_pairs_and_a_readable_matrix_of_150_classes(tmp_path, text_run):
    import numpy as np
    from PIL import Image

    from fmtune import plots

    task = fmtune.tasks.Classification([f"class-{i:03d}" for i in range(150)])
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(3, 9, 150))
    cm[7, 42], cm[42, 7], cm[100, 3] = 5, 2, 3  # the errors, largest first: 7->42, 100->3, 42->7
    assert task.most_confused(cm, k=2) == [{"true": "class-007", "predicted": "class-042", "count": 5},
                                           {"true": "class-100", "predicted": "class-003", "count": 3}]
    assert len(task.most_confused(cm)) == 3 and task.most_confused(np.diag([4, 5])) == []
    path = plots.confusion_matrix(cm, task.labels, tmp_path / "cm.png", "150 classes")
    width, height = Image.open(path).size
    assert height >= 150 * 12  # at least 12 pixels a row: one class name per row, each legible
    # a run's evaluation lists them too (the tiny run confuses at least one pair)
    result = json.loads((text_run / "eval.json").read_text())
    report = (text_run / "classification_report.txt").read_text()
    assert result["most_confused"] and "most confused" in report
    for pair in result["most_confused"]:
        assert f"{pair['true']} -> {pair['predicted']}: {pair['count']}" in report
