"""Every path argument of every verb (taken from the parser: a new verb is covered without
editing this test) answers a missing, wrong-kind or unwritable path with one line naming it and
exit 2, never a traceback; and predict reads stdin, plain .txt files and texts on the command line."""

from __future__ import annotations

import argparse
import io
import json
import sys

import pandas as pd
import pytest

from fmtune.cli import PATH_ARGS, build_parser, main

# arguments that name paths by convention; each must be in PATH_ARGS or take texts as well
PATH_LIKE = {"run", "runs", "config", "data", "val", "test", "out", "output", "resume"}
TEXT_OR_PATH = {("predict", "inputs"), ("explain", "input")}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_path_like_argument_is_declared():
    for verb, sp in _subparsers().items():
        for action in sp._actions:
            if action.dest in PATH_LIKE and (verb, action.dest) not in TEXT_OR_PATH:
                assert action.dest in PATH_ARGS.get(verb, {}), f"fmtune {verb}: {action.dest} is not in cli.PATH_ARGS"


def _bad_values(kind: str, tmp) -> list[tuple[str, str]]:
    a_file = tmp / "a-file.txt"
    a_file.write_text("x\n")
    a_dir = tmp / "a-folder"
    a_dir.mkdir(exist_ok=True)
    return {
        "run": [(str(tmp / "no-such-run"), "does not exist"), (str(a_file), "expected a run directory")],
        "input": [(str(tmp / "missing.csv"), "does not exist")],
        "input-file": [(str(tmp / "missing.yaml"), "does not exist"), (str(a_dir), "expected a file")],
        "output-file": [(str(tmp / "no" / "such" / "out.csv"), "does not exist"), (str(a_dir), "is a folder")],
        "output-dir": [(str(a_file), "expected a folder"), (str(a_file / "sub"), "is a file")],
    }[kind]


def _valid(kind: str, tmp) -> str:
    ok = {"run": tmp / "ok-run", "input": tmp / "ok.csv", "input-file": tmp / "ok.yaml",
          "output-file": tmp / "ok-out.csv", "output-dir": tmp / "ok-out"}[kind]
    if kind == "run":
        ok.mkdir(exist_ok=True)
    elif kind.startswith("input"):
        ok.write_text("text,label\na,b\n")
    return str(ok)


def _argv(verb: str, sp: argparse.ArgumentParser, dest: str, value: str, tmp) -> list[str]:
    argv = [verb]
    for action in sp._actions:
        if action.dest in ("help",):
            continue
        given = value if action.dest == dest else None
        needed = not action.option_strings and action.nargs not in ("?", "*") or action.required
        if given is None and not needed:
            continue
        if given is None:
            given = _valid(PATH_ARGS[verb].get(action.dest, "input"), tmp)
        argv += [given] if not action.option_strings else [action.option_strings[-1], given]
    return argv


CASES = [(verb, dest, kind) for verb, args in PATH_ARGS.items() for dest, kind in args.items()]


@pytest.mark.parametrize("verb, dest, kind", CASES, ids=[f"{v}-{d}" for v, d, _ in CASES])
def test_bad_paths_are_one_line_and_exit_2(verb, dest, kind, tmp_path, capsys):
    sp = _subparsers()[verb]
    for value, why in _bad_values(kind, tmp_path):
        rc = main(_argv(verb, sp, dest, value, tmp_path))
        captured = capsys.readouterr()
        out = captured.out + captured.err
        assert rc == 2, (verb, dest, value, out)
        assert value in out.replace("\n", "") and why in out, (verb, dest, value, out)
        assert "Traceback" not in out


# --- predict: stdin, .txt, texts on the command line -----------------------------------------

def test_predict_missing_input_and_unwritable_output(text_run, tmp_path, capsys):
    assert main(["predict", str(text_run), str(tmp_path / "nonexistent.csv")]) == 2
    assert "nonexistent.csv does not exist" in capsys.readouterr().err
    good = tmp_path / "in.csv"
    good.write_text("text\ngood movie\n")
    assert main(["predict", str(text_run), str(good), "-o", str(tmp_path / "no" / "dir" / "out.csv")]) == 2
    err = capsys.readouterr().err
    assert "out.csv" in err and "does not exist" in err and "Traceback" not in err


@pytest.mark.parametrize("fmt, body", [
    ("lines", "good movie really\n\nthe plot was awful\n"),
    ("csv", "id,text\n1,good movie really\n2,the plot was awful\n"),
    ("jsonl", '{"text": "good movie really"}\n{"text": "the plot was awful"}\n'),
])
def test_predict_from_stdin(fmt, body, text_run, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(body))
    assert main(["predict", str(text_run), "-", "-q"]) == 0
    out = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert out["text"].tolist() == ["good movie really", "the plot was awful"]
    assert out["label"].tolist() == ["pos", "neg"]


def test_predict_texts_on_the_command_line(text_run, tmp_path, capsys):
    assert main(["predict", str(text_run), "good movie really", "--text", "the plot was awful"]) == 0
    err = capsys.readouterr().err
    assert "good movie really" in err and "pos" in err and "neg" in err
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(text_run), "--text", "good film", "-o", str(out), "-q"]) == 0
    assert json.loads(out.read_text().splitlines()[0])["label"] == "pos"


def test_txt_file_one_text_per_line_with_empty_lines_counted(text_run, tmp_path, capsys):
    import fmtune

    src = tmp_path / "texts.txt"
    src.write_text("good movie really\n\n   \nthe plot was awful\n")
    with pytest.warns(UserWarning, match="2 empty line"):
        df = fmtune.predict(text_run, src, quiet=True)
    assert df["text"].tolist() == ["good movie really", "the plot was awful"] and df["label"].tolist() == ["pos", "neg"]


def test_a_missing_text_column_is_named_before_the_size_of_the_file(tmp_path):
    import fmtune
    from fmtune.errors import DataError

    src = tmp_path / "tiny.csv"
    src.write_text("phrase,label\ngood,pos\nbad,neg\n")
    with pytest.raises(DataError, match=r"tiny.csv: no text column 'text'; columns are: phrase"):
        fmtune.train({"data": {"train": str(src)}}, quiet=True)


def test_a_hugging_face_dataset_id_reads_its_files_from_the_hub_cache(text_run, text_files, tiny_st_bert, tmp_path,
                                                                       monkeypatch, capsys):
    """`--data stanfordnlp/imdb` as a user who loaded the dataset once has it in the Hugging Face cache (its Parquet
    files under a configuration's folder, as the hub holds them): it was "does not exist". Now the id is its files'
    folder in the cache (offline too), read as a folder of split files: evaluate scores its test split; an id of
    several configurations asks for one; an id the cache has not is "does not exist" as any path."""
    import shutil

    from conftest import hf_parquet
    from huggingface_hub import constants

    from fmtune.paths import hub_dataset

    cache = tmp_path / "hub"
    repo = cache / "datasets--someone--reviews"
    snapshot = repo / "snapshots" / ("b" * 40)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("b" * 40)
    names = ["neg", "pos"]
    for config in ("plain_text",):
        (snapshot / config).mkdir(parents=True)
        for split, key in (("train", "train"), ("test", "test")):
            df = pd.read_csv(text_files[key])
            hf_parquet(snapshot / config / f"{split}-00000-of-00001.parquet",
                       {"text": df["text"].tolist(), "label": [names.index(v) for v in df["label"]]},
                       {"label": names}, set())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert hub_dataset("someone/reviews") == snapshot / "plain_text"
    run = tmp_path / "run"
    shutil.copytree(text_run, run)  # (evaluate writes into it: the session's run stays as trained)
    assert main(["evaluate", str(run), "--data", "someone/reviews", "-q"]) == 0
    assert json.loads((run / "eval.json").read_text())["n_test"] == len(pd.read_csv(text_files["test"]))
    # the Python API (and a config file) take the id too: it was "does not exist" there
    from conftest import cfg_dict

    import fmtune

    summary = fmtune.train(cfg_dict(tiny_st_bert, "someone/reviews", out=str(tmp_path / "api"),
                                    train={"max_steps": 2}), quiet=True)
    assert summary["eval"]["n_test"] == len(pd.read_csv(text_files["test"]))  # its test split found beside
    saved = fmtune.config.load(tmp_path / "api" / "config.yaml").data.train
    assert saved.startswith(str(snapshot / "plain_text"))
    (snapshot / "other").mkdir()
    for split in ("train", "validation"):
        (snapshot / "other" / f"{split}.csv").write_text("text,label\na,b\n")
    assert main(["evaluate", str(run), "--data", "someone/reviews", "-q"]) == 2
    assert "has several configurations (other, plain_text); name one: --data someone/reviews/other" in (
        capsys.readouterr().err)
    assert hub_dataset("someone/reviews/plain_text") == snapshot / "plain_text"
    assert hub_dataset("someone/missing") is None and hub_dataset(str(tmp_path)) is None
    assert main(["evaluate", str(run), "--data", "someone/missing", "-q"]) == 2
    assert "someone/missing does not exist" in capsys.readouterr().err
