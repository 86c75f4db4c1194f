"""Segmentation at scale: the time and the memory of ``fmtune evaluate`` on a large test set of many classes.

    make bench-dense-memory          # writes bench/results-dense-memory-<date>.json
    .venv/bin/python bench/dense_memory.py [--images 600] [--classes 150] [--size 512] [--ref GIT_REF] > result.json

A test set of ``--images`` scenes of ``--size`` px with ``--classes`` classes (coloured squares on black, each a
class: the content does not matter here, the size of the logits does) and a tiny random SegFormer (two stages, logits
at stride 4: 150 classes at 512 px are 150 x 128 x 128 floats, 9.8 MB an image) trained one epoch on 16 scenes. The
run is then evaluated by ``fmtune evaluate`` in a process of its own, with fmtune as it is here and, with ``--ref``,
as it was at that git commit (a worktree of it, the same virtual environment), each on a copy of the run; a thread
samples the process's resident memory every 0.3 s: ``peak_anonymous_mb`` (what the process itself allocated:
RssAnon) and ``peak_file_mb`` (file pages mapped into it: RssFile + RssShmem, which the page cache holds while there
is room and evicts when there is not: the logits fmtune writes to disk past a quarter of the memory available).
Each run evaluates with the eval batch its fmtune version gives segmentation by default (``train.eval_batch_size``,
which is saved in the run's config.yaml: the bench sets it from each version's own default). Also reported: the
test metrics of each, which should agree.

No side-by-side tool: this measures fmtune against its own earlier self. Prints one JSON document on stdout; progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, add_version_options, fmtune_versions, log, measured, start  # noqa: E402


def make_data(root: Path, n_test: int, classes: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    side = size // 8
    for split, n in (("train", 16), ("val", 8), ("test", n_test)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask, img = np.zeros((size, size), np.uint8), np.zeros((size, size, 3), np.uint8)
            for _ in range(12):
                c = int(rng.integers(0, classes))
                y, x = rng.integers(0, size - side, 2)
                mask[y:y + side, x:x + side] = c
                img[y:y + side, x:x + side] = [(c * 37) % 256, (c * 91) % 256, (c * 13) % 256]
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
        (root / split / "classes.txt").write_text("\n".join(f"class{k}" for k in range(classes)))


def make_model(folder: Path, classes: int, size: int) -> None:
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    SegformerForSemanticSegmentation(SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
        num_labels=classes)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
         "size": {"height": size, "width": size}}))


def default_eval_batch(source: Path, cwd: Path) -> tuple[int, str]:
    """The eval batch fmtune at ``source`` gives segmentation unless told (its config resolution), and the file of the
    fmtune it imported (to show which version ran)."""
    code = ("import fmtune, fmtune.config as c; print(c.from_dict({'task': {'type': 'segmentation'}})"
            ".train.eval_batch_size, fmtune.__file__)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(source)}, cwd=cwd,
                         capture_output=True, text=True, check=True)
    size, file = out.stdout.split()
    return int(size), file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=600, help="test images (default 600)")
    ap.add_argument("--classes", type=int, default=150, help="classes (default 150, as ADE20K)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    add_version_options(ap, "evaluate", "2e27c2e")
    args = ap.parse_args()
    import yaml

    work, result = start(args.out, "fmtune-bench-dense-memory-")
    result.update(images=args.images, classes=args.classes, size=args.size,
                  logits_gb=round(args.images * args.classes * (args.size // 4) ** 2 * 4 / 1e9, 2))
    log(f"data and model in {work}")
    make_data(work / "data", args.images, args.classes, args.size)
    make_model(work / "segformer", args.classes, args.size)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    fmtune = [sys.executable, "-m", "fmtune"]
    subprocess.run([*fmtune, "train", "-q", "--task", "segmentation", "--model", str(work / "segformer"), "--data",
                    str(work / "data" / "train"), "--val", str(work / "data" / "val"), "--epochs", "1", "--no-report",
                    "--out", str(work / "run")], env=env, cwd=work, check=True)
    with fmtune_versions(work, args.ref) as versions:
        for name, source in versions.items():
            run = work / f"run-{name}"
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(work / "run", run)
            cfg = yaml.safe_load((run / "config.yaml").read_text())
            cfg["train"]["eval_batch_size"], imported = default_eval_batch(source, work)
            (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            log(f"evaluate with fmtune {name} (eval batch {cfg['train']['eval_batch_size']})")
            row = measured([*fmtune, "evaluate", str(run), "--data", str(work / "data" / "test"), "-q"],
                           {**os.environ, "PYTHONPATH": str(source)}, work, check=True)
            row.update(eval_batch_size=cfg["train"]["eval_batch_size"], fmtune_file=imported)
            row["test"] = json.loads((run / "eval.json").read_text())["test"]
            result["results"][name] = row
            log(json.dumps(row))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
