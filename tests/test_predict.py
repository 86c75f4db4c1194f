"""Batch prediction streams its input in chunks, reports bad rows by line without stopping
(unless strict), writes its output atomically; fmtune.load gives the same predictions."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cfg_dict, make_text_rows

import fmtune
from fmtune import api
from fmtune.errors import DataError


def test_streams_in_chunks_and_matches_the_in_memory_answer(tmp_path, text_run, monkeypatch):
    src = tmp_path / "many.csv"
    make_text_rows(2500, seed=9).to_csv(src, index=False)
    whole = api.predict(text_run, src, quiet=True, chunk_rows=100_000)
    seen = []
    real = api._predict_chunk
    monkeypatch.setattr(api, "_predict_chunk", lambda pred, df, *a: seen.append(len(df)) or real(pred, df, *a))
    out = tmp_path / "preds.csv"
    summary = api.predict(text_run, src, out, quiet=True, chunk_rows=300)
    assert summary == {"rows": 2500, "errors": 0, "output": str(out)}
    assert max(seen) == 300 and sum(seen) == 2500  # never more than one chunk of rows at a time
    streamed = pd.read_csv(out)
    assert list(streamed.columns) == ["text", "label", "predicted_label", "score", "prob_neg", "prob_pos", "error"]
    assert (streamed["predicted_label"] == whole["predicted_label"]).all()
    assert streamed["score"].to_numpy() == pytest.approx(whole["score"].to_numpy(), abs=1e-6)
    assert not list(tmp_path.glob(".preds.csv.tmp-*"))


def test_bad_rows_are_reported_by_line_and_the_rest_predicted(tmp_path, text_run):
    src = tmp_path / "bad.csv"
    src.write_text('text,label\ngood movie,pos\n,neg\n"the plot, really",x,y\n"a long\nreview",pos\nawful plot,neg\n')
    with pytest.warns(UserWarning, match="2 of 5 row"):
        df = api.predict(text_run, src, quiet=True)
    assert len(df) == 5  # one output row per input row
    assert df["error"].iloc[1] == f"{src}: row 2 (line 3): column 'text': the text is empty"
    assert "row 3 (line 4) has 3 fields, the header has 2" in df["error"].iloc[2]
    assert df["error"].iloc[[0, 3, 4]].isna().all() and df["predicted_label"].iloc[[0, 3, 4]].notna().all()
    assert df["text"].iloc[3] == "a long\nreview"
    with pytest.raises(DataError, match=r"row 2 \(line 3\): column 'text': the text is empty"):
        api.predict(text_run, src, tmp_path / "strict.csv", quiet=True, strict=True)
    assert not (tmp_path / "strict.csv").exists() and not list(tmp_path.glob(".strict.csv.tmp-*"))


def test_jsonl_and_parquet_inputs(tmp_path, text_run):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "good film"}\nnot json\n\n{"text": 5}\n{"text": "bad plot"}\n')
    with pytest.warns(UserWarning):
        df = api.predict(text_run, src, quiet=True, chunk_rows=2)
    assert list(df["error"].notna()) == [False, True, True, False]
    assert "row 2 (line 2) cannot be read" in df["error"].iloc[1]
    assert df["error"].iloc[2].endswith("row 4: column 'text': expected text, got int")
    pq = tmp_path / "in.parquet"
    make_text_rows(50, seed=3).to_parquet(pq)
    assert api.predict(text_run, pq, quiet=True, chunk_rows=7)["error"].isna().all()


def test_load_gives_a_predictor_with_the_same_answers(tmp_path, text_run, text_files):
    p = fmtune.load(text_run)
    texts = pd.read_csv(text_files["test"])["text"].tolist()[:10]
    got = p.predict(texts)
    ref = api.predict(text_run, text_files["test"], quiet=True).head(10)
    assert [g["label"] for g in got] == ref["predicted_label"].tolist()
    assert [g["score"] for g in got] == pytest.approx(ref["score"].tolist(), abs=1e-6)
    one = p.predict(texts[0])  # alone: no padding, so equal up to float rounding
    assert one["label"] == got[0]["label"] and one["score"] == pytest.approx(got[0]["score"], abs=1e-5)
    assert p.predict([]) == []
    meta = p.metadata()
    assert meta["labels"] == ["neg", "pos"] and meta["task"] == "classification" and len(meta["model_version"]) == 12
    json.dumps(meta)
    with pytest.raises(DataError, match="input 1: the text is empty"):
        p.predict(["fine", "  "])


def test_load_image_predictor_takes_paths_bytes_and_pil(tmp_path, image_dirs):
    from PIL import Image

    fmtune.train(cfg_dict("mobilenet-v2", image_dirs["train"], out=str(tmp_path / "img"),
                          model={"image_size": 32}, train={"epochs": 1}), quiet=True)
    p = fmtune.load(tmp_path / "img")
    f = sorted((image_dirs["test"] / "top").iterdir())[0]
    a, b, c = p.predict([str(f), f.read_bytes(), Image.open(f)])
    assert a["label"] == b["label"] == c["label"] and a["score"] == pytest.approx(c["score"], abs=1e-6)
    with pytest.raises(DataError, match="input 0: not a readable image"):
        p.predict(b"not an image")
    # several image files on the command line (a shell's glob): a row each, in the order given; a table among them
    # is one input too many ("one input at a time: a.jpg, b.jpg" was said even of image files alone)
    from fmtune.cli import main

    files = sorted((image_dirs["test"] / "top").iterdir())[:2] + sorted((image_dirs["test"] / "bottom").iterdir())[:1]
    out = tmp_path / "several.csv"
    assert main(["predict", str(tmp_path / "img"), *map(str, files), "-o", str(out), "-q"]) == 0
    got = pd.read_csv(out)
    assert got["image"].tolist() == [str(f.resolve()) for f in files]
    assert got["label"].tolist() == [r["label"] for r in p.predict([str(f) for f in files])]
    table = tmp_path / "t.csv"
    pd.DataFrame({"image": [str(files[0])]}).to_csv(table, index=False)
    assert main(["predict", str(tmp_path / "img"), str(files[0]), str(table)]) == 2


def test_inference_precision_follows_the_run_and_amx():
    """auto: bf16 only on a CPU with AMX (measured faster there); fp32 elsewhere, GPUs included (unmeasured);
    what a run or a user asks for otherwise, fp16 never on a CPU; an unknown name is refused with the choices."""
    from fmtune.errors import ConfigError
    from fmtune.training import hardware

    real = hardware._cpu_flags
    try:
        hardware._cpu_flags = lambda: "flags : fpu avx512f avx512_bf16 amx_bf16 amx_tile"
        assert hardware.inference_autocast("auto", "cpu") == torch.bfloat16
        assert hardware.inference_autocast("auto", "cuda") is None
        assert hardware.inference_autocast("auto", None) is None  # onnxruntime runs it
        hardware._cpu_flags = lambda: "flags : fpu avx512f avx512_bf16"  # AVX512-BF16 without AMX: unmeasured
        assert hardware.inference_autocast("auto", "cpu") is None
    finally:
        hardware._cpu_flags = real
    assert hardware.inference_autocast("fp32", "cpu") is None
    assert hardware.inference_autocast("bf16", "cpu") == torch.bfloat16
    assert hardware.inference_autocast("fp16", "cpu") is None
    assert hardware.inference_autocast("fp16", "cuda") == torch.float16
    with pytest.raises(ConfigError, match="'half' is not one of auto, fp32, bf16"):
        hardware.inference_autocast("half", "cpu")


def test_predict_and_evaluate_take_a_precision(tmp_path, text_run, text_files, capsys, monkeypatch):
    """The run trained with train.precision fp32 predicts in fp32; --precision bf16 predicts under bf16 autocast
    (other probabilities, close ones), and evaluate / metadata say which."""
    from fmtune.cli import main

    run = tmp_path / "run"  # (evaluate rewrites eval.json: a copy of the shared run)
    shutil.copytree(text_run, run)
    texts = pd.read_csv(text_files["test"])["text"].tolist()
    fp32, bf16 = fmtune.load(run), fmtune.load(run, precision="bf16")
    assert (fp32.metadata()["precision"], bf16.metadata()["precision"]) == ("fp32", "bf16")
    a, b = fp32.predict(texts), bf16.predict(texts)
    pa = np.array([list(r["probabilities"].values()) for r in a])
    pb = np.array([list(r["probabilities"].values()) for r in b])
    assert not np.array_equal(pa, pb) and np.abs(pa - pb).max() < 0.05
    assert np.mean([x["label"] == y["label"] for x, y in zip(a, b)]) >= 0.9
    out = tmp_path / "p.csv"
    main(["predict", str(run), str(text_files["test"]), "-o", str(out), "--precision", "bf16", "--quiet"])
    assert pd.read_csv(out)["score"].to_numpy() == pytest.approx([r["score"] for r in b], abs=1e-6)
    main(["evaluate", str(run), "--precision", "bf16", "--quiet"])
    assert json.loads((run / "eval.json").read_text())["precision"] == "bf16"
    from fmtune import evaluation

    seen, real = [], evaluation.infer  # the baseline's features: in the precision the model is scored in
    monkeypatch.setattr(evaluation, "infer", lambda *a, **k: seen.append(k.get("autocast_dtype")) or real(*a, **k))
    assert "baseline" in api.evaluate(run, baseline=True, precision="bf16", quiet=True)
    assert len(seen) == 2 and set(seen) == {torch.bfloat16}  # training rows, test rows
    main(["evaluate", str(run), "--quiet"])
    assert json.loads((run / "eval.json").read_text())["precision"] == "fp32"
    with pytest.raises(SystemExit):
        main(["predict", str(run), "some text", "--precision", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err
