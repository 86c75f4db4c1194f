"""fmtune embed: before/after feature maps, and numbers that say whether fine-tuning separated the classes."""

from __future__ import annotations

import importlib.util
import json

import pytest

from fmtune.cli import main
from fmtune.embed import embed
from fmtune.errors import ConfigError


def test_fine_tuning_separates_the_classes(text_run, tmp_path):
    res = embed(text_run, out=tmp_path / "e", quiet=True)
    saved = json.loads((tmp_path / "e" / "embed.json").read_text())
    assert saved["methods"] == ["pca", "tsne"] and saved["rows"] == 80
    before, after = saved["separation"]["pretrained"], saved["separation"]["fine-tuned"]
    # the keyword data: a random-init encoder does not separate the labels, the trained one does
    assert after["silhouette_cosine"] > before["silhouette_cosine"] + 0.1
    assert after["knn5_accuracy_cv"] > 0.9 > before["knn5_accuracy_cv"]
    assert (tmp_path / "e" / "embed.png").stat().st_size > 20_000
    assert res["out"] == str(tmp_path / "e")


def test_embed_cli_and_bad_methods(text_run, tmp_path):
    assert main(["embed", str(text_run), "--method", "pca", "-o", str(tmp_path / "p"), "-q"]) == 0
    assert json.loads((tmp_path / "p" / "embed.json").read_text())["methods"] == ["pca"]
    with pytest.raises(ConfigError, match="choose from pca, tsne, umap"):
        embed(text_run, methods=("lda",))
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(ConfigError, match="pip install umap-learn"):
            embed(text_run, methods=("umap",), out=tmp_path / "u", quiet=True)
