"""No behaviour change across refactors: classification, multi-label, regression and an image run
on tiny models give the same validation curve (metrics.jsonl) and test metrics (eval.json) as
recorded in tests/golden/runs.json, seed for seed. Recorded before the task registry was split
into modules; `FMTUNE_WRITE_GOLDEN=1 pytest tests/test_golden.py` records them again (only do that
for an intended change of behaviour, and say why in the commit)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from conftest import cfg_dict

import fmtune

GOLDEN = Path(__file__).parent / "golden" / "runs.json"
CASES = {
    "classification": ("tiny_st_bert", "train", "test", {}),
    "multilabel": ("tiny_st_bert", "multilabel_train", "multilabel_test", {"type": "multilabel"}),
    "regression": ("tiny_bert", "regression_train", "regression_test", {"type": "regression"}),
    "image": ("tiny_resnet", None, None, {}),
}


def _record(run: Path) -> dict:
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [{k: v for k, v in r.items() if k not in ("seconds", "eval_seconds", "samples_per_s", "lr")} for r in evals
             if r["type"] == "eval"]
    ev = json.loads((run / "eval.json").read_text())
    return {"evals": evals, "test": ev["test"], "baseline": ev.get("baseline")}


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} != {len(b)} entries"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=2e-3, abs_tol=2e-4) or (math.isnan(a) and math.isnan(b)), \
            f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_same_metrics_as_recorded(case, tmp_path, request, text_files, image_dirs):
    fixture, train, test, task = CASES[case]
    model = request.getfixturevalue(fixture)
    train_file = image_dirs["train"] if train is None else text_files[train]
    test_file = image_dirs["test"] if test is None else text_files[test]
    extra = {"model": {"image_size": 32}} if train is None else {}
    cfg = cfg_dict(model, train_file, out=str(tmp_path / "run"), task=task, data={"test": str(test_file)},
                   train={"epochs": 2, "baseline": True, "seed": 7}, **extra)
    fmtune.train(cfg, quiet=True, report=False)
    got = _record(tmp_path / "run")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if os.environ.get("FMTUNE_WRITE_GOLDEN") == "1":
        golden[case] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    assert case in golden, f"no recorded metrics for {case}: run with FMTUNE_WRITE_GOLDEN=1 once"
    _close(got, golden[case], case)
