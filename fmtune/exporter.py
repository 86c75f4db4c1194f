"""``fmtune export``: a trained run's model as a folder that other tools load.

- plain runs (full, head, last_n, bitfit): the run's model folder, a transformers model
  (``AutoModelFor...Classification.from_pretrained(dir, trust_remote_code=True)``);
- adapter runs (lora, dora, ia3, prompt): the peft adapter folder (``PeftModel.from_pretrained``
  on the base model), or with ``merge`` the plain model with the adapter folded into its
  weights, loadable without peft.

Every export is loaded back and compared with the run's model on real rows of the run's data;
a difference above ``tolerance`` fails the export and nothing is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from fmtune import adapters, ui
from fmtune.data.prepare import make_dataset
from fmtune.data.readers import read_any
from fmtune.errors import DataError, ModelError, RunDirError
from fmtune.fsutil import atomic_dir
from fmtune.models import build
from fmtune.run import open_run
from fmtune.training.infer import infer

CHECK_ROWS = 64


def check_rows(opened: Any) -> Any:
    """Up to CHECK_ROWS real inputs from the run's data (test, else val, else train), as a dataset."""
    cfg = opened.config
    for source in (cfg.data.test, cfg.data.val, cfg.data.train):
        if source and Path(source).exists():
            df = read_any(Path(source), cfg.data.encoding)
            return make_dataset(df.head(CHECK_ROWS), opened.bundle, opened.task, cfg.data, with_targets=False)[0]
    raise DataError(f"{opened.dir}: none of the run's data files exist any more ({cfg.data.test}, {cfg.data.val}, "
                    f"{cfg.data.train}); the export cannot be checked against real inputs")


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module, ds: Any) -> float:
    ya, _ = infer(a, ds, 32)
    yb, _ = infer(b, ds, 32)
    return float((ya - yb).abs().max()) if len(ds) else 0.0


def export(run: str | Path, out: str | Path | None = None, *, merge: bool = False, overwrite: bool = False,
           tolerance: float = 1e-4, quiet: bool = False) -> dict[str, Any]:
    """Write the run's model to ``out`` (default ``RUN/export/merged|adapter|model``); returns what was
    written and the measured difference to the run's model."""
    opened = open_run(run)
    bundle = opened.bundle
    kind = "merged" if merge and bundle.adapter else ("adapter" if bundle.adapter else "model")
    target = Path(out) if out is not None else opened.dir / "export" / kind
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise RunDirError(f"{target} already exists; pass --overwrite to replace it, or -o another folder")
    ds = check_rows(opened)
    if kind == "merged":
        plain = build.Bundle(adapters.merge(bundle.model, bundle.adapter), bundle.kind, bundle.family, bundle.pooling,
                             tokenizer=bundle.tokenizer, image=bundle.image, max_length=bundle.max_length,
                             source=bundle.source)
        reference = build.load(opened.dir / "model")  # merging changed the loaded model in place
        write = lambda tmp: build.save(plain, tmp / "m")  # noqa: E731
    else:
        reference = bundle
        write = lambda tmp: shutil.copytree(opened.dir / "model", tmp / "m")  # noqa: E731

    def build_and_check(tmp: Path) -> None:
        write(tmp)
        diff = max_abs_diff(reference.model, build.load(tmp / "m").model, ds)
        result["max_abs_diff"] = diff
        if not diff <= tolerance:
            raise ModelError(f"export check failed: the exported model's outputs differ from the run's by {diff:.3g} "
                             f"(> {tolerance:g}) on {len(ds)} rows of the run's data; nothing was written")
        for f in (tmp / "m").iterdir():
            shutil.move(str(f), tmp / f.name)
        (tmp / "m").rmdir()

    result: dict[str, Any] = {"run": str(opened.dir), "out": str(target), "kind": kind, "strategy": bundle.adapter
                              or opened.config.strategy.name, "checked_rows": len(ds)}
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(target, build_and_check)
    if not quiet:
        loader = "transformers (trust_remote_code=True)" if bundle.family == "hf" else "fmtune.load"
        how = {"merged": f"adapter merged into the weights; loads with {loader}, no peft needed",
               "adapter": "peft adapter folder: PeftModel.from_pretrained on the base model",
               "model": f"loads with {loader}" + ("; nothing to merge" if merge else "")}[kind]
        ui.console.print(f"exported {opened.dir} -> {target} ({how}); max |difference| to the run's model "
                         f"{result['max_abs_diff']:.2e} on {len(ds)} rows")
    return result
