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


def test_a_few_rows_are_mapped_and_one_is_an_error(text_run, tmp_path):
    """Two to four rows: mapped (t-SNE's perplexity under the rows, no silhouette where every point is its own
    label, neighbours no more than a fold holds; each raised from scikit-learn); one row is an error that says
    so."""
    import pandas as pd

    from fmtune.errors import DataError

    for n in (2, 3, 4):  # (4: two folds of 2 rows, fewer than 5 neighbours)
        rows = pd.DataFrame({"text": ["good movie", "bad movie", "a film", "bad one"][:n],
                             "label": ["pos", "neg", "pos", "neg"][:n]})
        rows.to_csv(tmp_path / f"{n}.csv", index=False)
        res = embed(text_run, tmp_path / f"{n}.csv", out=tmp_path / f"e{n}", quiet=True)
        assert res["rows"] == n and ("silhouette_cosine" in res["separation"]["fine-tuned"]) == (n > 2)
        assert ("knn5_accuracy_cv" in res["separation"]["fine-tuned"]) == (n == 4)
    pd.DataFrame({"text": ["good movie"], "label": ["pos"]}).to_csv(tmp_path / "1.csv", index=False)
    with pytest.raises(DataError, match="1 usable row"):
        embed(text_run, tmp_path / "1.csv", out=tmp_path / "e1", quiet=True)
