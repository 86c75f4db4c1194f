"""ONNX and int8 exports: usable without fmtune, numerically checked against the run's model,
refused (and nothing written) when the check fails; the onnx backend predicts like torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import cfg_dict

import fmtune
from fmtune.errors import ModelError
from fmtune.exporter import export


def test_onnx_runs_without_fmtune_on_any_batch_and_length(text_run):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    res = export(text_run, format="onnx", quiet=True)
    assert res["max_abs_diff"] <= 1e-4 and res["checked_rows"] == 64
    folder = text_run / "export" / "onnx"
    prep = json.loads((folder / "preprocessing.json").read_text())
    assert prep["labels"] == ["neg", "pos"] and prep["inputs"] == ["input_ids", "attention_mask"]
    assert json.loads((folder / "export.json").read_text())["max_abs_diff"] == res["max_abs_diff"]
    session = ort.InferenceSession(str(folder / "model.onnx"))
    tok = AutoTokenizer.from_pretrained(folder)
    p = fmtune.load(text_run)
    for texts in (["good"], ["the movie was awful really", "fine", "a film story music scene was very good"]):
        enc = tok(texts, padding=True, truncation=True, max_length=prep["max_length"], return_tensors="np")
        logits = session.run(["logits"], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0]
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        want = [r["probabilities"]["pos"] for r in p.predict(texts)]
        assert probs[:, 1] == pytest.approx(want, abs=1e-4)


def test_int8_reports_the_metric_change_and_refuses_beyond_the_bound(text_run):
    res = export(text_run, format="onnx-int8", quiet=True)
    m = res["metric"]
    assert m["name"] == "accuracy" and m["rows"] == 80 and m["drop"] <= 0.01
    assert (text_run / "export" / "onnx-int8" / "model.onnx").stat().st_size < \
        (text_run / "export" / "onnx" / "model.onnx").stat().st_size
    with pytest.raises(ModelError, match="int8 export refused: test accuracy .* more than --max-drop -1"):
        export(text_run, text_run / "strict-int8", format="onnx-int8", max_drop=-1, quiet=True)
    assert not (text_run / "strict-int8").exists()


def test_onnx_backend_predicts_like_torch(text_run, text_files):
    import pandas as pd

    texts = pd.read_csv(text_files["test"])["text"].tolist()[:20]
    torch_p, onnx_p = fmtune.load(text_run), fmtune.load(text_run, backend="onnx")
    assert onnx_p.metadata()["backend"] == "onnx"
    a, b = torch_p.predict(texts), onnx_p.predict(texts)
    assert [x["label"] for x in a] == [x["label"] for x in b]
    assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=1e-4)
    # an export of other weights (the run was resumed since) is made again before it is served
    record = text_run / "export" / "onnx" / "export.json"
    stale = {**json.loads(record.read_text()), "model_version": "older"}
    record.write_text(json.dumps(stale))
    fmtune.load(text_run, backend="onnx")
    assert json.loads(record.read_text())["model_version"] == torch_p.version


def test_image_and_lora_runs_export_to_onnx(tmp_path, image_dirs, tiny_bert, text_files):
    fmtune.train(cfg_dict("mobilenet-v2", image_dirs["train"], out=str(tmp_path / "img"), model={"image_size": 32},
                          train={"epochs": 1}), quiet=True)
    assert export(tmp_path / "img", format="onnx", quiet=True)["max_abs_diff"] <= 1e-4
    fmtune.train(cfg_dict(tiny_bert, text_files["train"], out=str(tmp_path / "lora"), strategy={"name": "lora"},
                          train={"epochs": 1}), quiet=True)
    assert export(tmp_path / "lora", format="onnx", quiet=True)["max_abs_diff"] <= 1e-4  # merged on the way


def test_hf_export_never_loads_silently_wrong_and_has_a_sentence_transformers_encoder(text_run, text_files,
                                                                                      tmp_path):
    """Without trust_remote_code transformers refuses the folder (it used to build a stock BERT with
    random weights); with it, the run's logits. The encoder alone loads with sentence-transformers
    and plain AutoModel (no remote code) and embeds as the run's head reads."""
    import pandas as pd
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    from fmtune.models import build

    res = export(text_run, tmp_path / "exp", quiet=True)
    folder = tmp_path / "exp"
    assert res["kind"] == "model" and res["sentence_transformers"] == build.ST_FOLDER
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(folder)
    texts = pd.read_csv(text_files["test"])["text"].tolist()[:8]
    run = build.load(text_run / "model")
    enc = run.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        features = run.model.features(**enc)
        logits = run.model(**enc).logits
    hf = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(hf(**enc).logits, logits, atol=1e-5)
    st = folder / build.ST_FOLDER
    emb = SentenceTransformer(str(st), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(emb, features, atol=1e-4)
    plain = AutoModel.from_pretrained(st).eval()  # no remote code: a plain BERT encoder
    tok = AutoTokenizer.from_pretrained(st)
    e = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = plain(**e).last_hidden_state
    mask = e["attention_mask"].unsqueeze(-1).float()
    assert torch.allclose((hidden * mask).sum(1) / mask.sum(1), features, atol=1e-4)
