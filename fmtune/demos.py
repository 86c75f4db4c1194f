"""`fmtune demo`: fine-tune a real pretrained model on real data, offline, in under 3 minutes on
2 CPU cores, and compare it with the pretrained baseline on a held-out test split.

The sizes below were chosen by measuring on a 2-core Zen 3 machine (see the README); the demo
prints them so the user knows what was run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fmtune import api, ui
from fmtune.zoo.datasets import export

DEMOS: dict[str, dict[str, Any]] = {
    "text": {
        "dataset": "rotten-tomatoes",
        "sizes": (2400, 400, 1000),
        "config": {
            "model": {"name": "minilm-l6", "max_length": 64},
            "strategy": {"name": "full"},
            "train": {"epochs": 2, "batch_size": 32, "lr": 8e-5, "baseline": True, "patience": None,
                      "max_minutes": 1.7},
        },
        "why": "MiniLM-L6 fully fine-tuned for 2 epochs on 2,400 snippets (max 64 tokens, length-bucketed "
               "batches); 400 validation, 1,000 test; training capped at 1.7 min on slower machines",
    },
    "ner": {
        "dataset": "wnut16-ner",
        "sizes": (None, 200, 400),
        "config": {
            "model": {"name": "minilm-l6", "max_length": 64},
            "task": {"type": "ner"},
            "strategy": {"name": "full"},
            "train": {"epochs": 3, "batch_size": 16, "lr": 1e-4, "baseline": True, "patience": None,
                      "max_minutes": 1.7},
        },
        "why": "MiniLM-L6 fully fine-tuned to tag named entities (10 types) in 1,695 WNUT-2016 tweets for 3 epochs "
               "(max 64 sub-tokens per window); 200 validation, 400 test tweets; training capped at 1.7 min",
    },
    "fairness": {
        "dataset": "adult",
        "sizes": (2000, 500, 1500),
        "config": {
            "model": {"name": "minilm-l6", "max_length": 96},
            "strategy": {"name": "full"},
            "train": {"epochs": 1, "batch_size": 16, "lr": 5e-5, "patience": None, "max_minutes": 2.5},
        },
        "fairness": {"groups": ["sex", "race"], "baseline": True, "fit": "demographic_parity",
                     "threshold_groups": ["sex"]},
        "why": "MiniLM-L6 fully fine-tuned for 1 epoch on 2,000 Adult census rows written out as text (income "
               ">50K?); 500 validation, 1,500 test; then fmtune fairness by sex and race: the pretrained baseline, "
               "the fine-tuned model, and per-sex thresholds for demographic parity fitted on the validation rows",
    },
    "regression": {
        "dataset": "compas-deciles",
        "sizes": (1200, 300, 600),
        "config": {
            "model": {"name": "minilm-l6"},
            "task": {"type": "regression"},
            "strategy": {"name": "full"},
            "train": {"epochs": 2, "batch_size": 16, "baseline": True, "patience": None, "max_minutes": 1.7},
        },
        "fairness": {"groups": ["race", "sex"], "baseline": True},
        "why": "MiniLM-L6 fully fine-tuned for 2 epochs (batches of 16) on 1,200 COMPAS defendants' records written "
               "out as text -> the COMPAS risk decile score (1-10); 300 validation, 600 test; then fmtune fairness "
               "by race and sex: each group's error and mean predicted score, the pretrained baseline's and the "
               "fine-tuned model's; training capped at 1.7 min",
    },
    "multilabel": {
        "dataset": "wnut16-entity-types",
        "sizes": (None, 229, 459),
        "config": {
            "model": {"name": "minilm-l6"},
            "task": {"type": "multilabel"},
            "strategy": {"name": "full"},
            "train": {"baseline": True, "max_minutes": 1.7},
        },
        "why": "MiniLM-L6 fully fine-tuned with fmtune's defaults on 1,607 WNUT-2016 tweets -> the types of named "
               "entity each mentions (any of 10, or none); 229 validation tweets, on which each type's decision "
               "threshold is chosen, 459 test; training capped at 1.7 min",
    },
    "generation": {
        "dataset": "stdlib-docstrings",
        "sizes": (160, 40, 40),
        "config": {
            "model": {"name": "smollm2-135m", "max_length": 384},
            "task": {"type": "generation", "instruction": "Summarise this Python function in one sentence."},
            "data": {"input_column": "code", "target_column": "summary"},
            "strategy": {"name": "lora"},
            "train": {"epochs": 1, "batch_size": 8, "patience": None, "max_minutes": 4.0},
            "eval": {"samples": 16, "test_samples": 40, "max_new_tokens": 32},
        },
        "why": "SmolLM2-135M-Instruct (GGUF weights, dequantised) with LoRA on every attention and MLP projection, 1 "
               "epoch on 160 Python standard-library functions -> the first sentence of their docstring; about 40 "
               "validation and 40 test functions from other modules (whole modules); the loss is on the summary "
               "only",
    },
    "audio-classification": {
        "dataset": "espeak-commands",
        "origin": "speech synthesised offline by espeak-ng: no recordings of these words by many speakers ship in "
                  "a package",
        "sizes": (None, 100, 200),
        "config": {
            "model": {"name": "whisper-tiny-en"},
            "task": {"type": "audio-classification"},
            "strategy": {"name": "full"},
            "train": {"epochs": 3, "batch_size": 32, "baseline": True, "patience": None, "max_minutes": 4.0},
        },
        "why": "Whisper tiny.en's encoder (converted from the CTranslate2 weights) fully fine-tuned for 3 epochs to "
               "tell 20 spoken words apart (commands and digits, synthesised by espeak-ng in 48 voices with noise at "
               "0-20 dB SNR); 660 training clips, 100 validation and 200 test clips of voices never heard in "
               "training; training capped at 4 min",
    },
    "speech-recognition": {
        "dataset": "espeak-sentences",
        "origin": "real sentences read by espeak-ng offline in 48 voices: the one real recorded set that ships "
                  "(asterisk-prompts) has a single voice",
        "sizes": (400, 50, 100),
        "config": {
            "model": {"name": "whisper-tiny-en"},
            "task": {"type": "speech-recognition"},
            "strategy": {"name": "lora"},
            "train": {"epochs": 1, "batch_size": 16, "patience": None, "max_minutes": 3.0},
            "eval": {"samples": 24, "test_samples": 100},
        },
        "why": "Whisper tiny.en (converted from the CTranslate2 weights) with LoRA on every attention and "
               "feed-forward projection of encoder and decoder, 1 epoch on 400 Rotten Tomatoes sentences read by "
               "espeak-ng voices with noise at 0-20 dB SNR; 50 validation and 100 test clips of voices and sentences "
               "never heard in training; the best checkpoint has the lowest validation WER; training capped at 3 min",
    },
    "segmentation": {
        "dataset": "digit-scenes",
        "origin": "real MNIST digits blended onto real photos: no labelled masks ship in a package",
        "sizes": (400, 60, 100),
        "config": {
            "model": {"name": "mobilenet-v2", "image_size": 192},
            "task": {"type": "segmentation"},
            "strategy": {"name": "full"},
            "train": {"epochs": 4, "batch_size": 8, "baseline": True, "patience": None, "max_minutes": 3.5},
        },
        "why": "MobileNetV2 (ImageNet) with an LR-ASPP decoder, fully fine-tuned for 4 epochs to label every pixel of "
               "400 scenes (192x192) as background or one of the digits 0-9, with random crops and flips; 60 "
               "validation and 100 test scenes of digits never seen in training; then the baseline: the same decoder "
               "trained on the frozen backbone (its maps computed once and cached, no crops or flips); each "
               "training capped at 3.5 min",
    },
    "detection": {
        "dataset": "digit-scenes",
        "origin": "real MNIST digits blended onto real photos: no labelled boxes ship in a package",
        "sizes": (400, 60, 100),
        "data": "annotations.json",
        "config": {
            "model": {"name": "mobilenet-v2", "image_size": 192},
            "task": {"type": "detection"},
            "strategy": {"name": "full"},
            "train": {"epochs": 5, "batch_size": 8, "baseline": True, "patience": None, "max_minutes": 3.0},
        },
        "why": "MobileNetV2 (ImageNet) with a feature pyramid and an FCOS head, fully fine-tuned for 5 epochs to box "
               "and name the digits (0-9) in 400 scenes (192x192, COCO JSON), with random crops, zooms and flips; 60 "
               "validation and 100 test scenes of digits never seen in training; then the baseline: the same head "
               "trained on the frozen backbone (its maps computed once and cached, no crops or flips); each "
               "training capped at 3 min",
    },
    "image": {
        "dataset": "digits",
        "sizes": (1200, 200, 397),
        "config": {
            "model": {"name": "efficientnet-lite0", "image_size": 64},
            "strategy": {"name": "full"},
            "train": {"epochs": 5, "batch_size": 32, "lr": 2e-3, "baseline": True, "patience": None,
                      "max_minutes": 1.5},
        },
        "why": "EfficientNet-Lite0 (ImageNet) fully fine-tuned for 5 epochs on 1,200 8x8 digits upscaled to 64px; "
               "200 validation, 397 test; training capped at 1.5 min on slower machines",
    },
}


def demo(task: str = "text", out: str | Path | None = None, seed: int = 0, overwrite: bool = False,
         quiet: bool = False) -> dict[str, Any]:
    """Run the offline demo for ``task`` (a key of DEMOS); returns train()'s summary."""
    spec = DEMOS[task]
    run_dir = Path(out) if out else Path("runs") / f"demo-{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    started = time.perf_counter()
    if not quiet:
        ui.console.print(f"[bold]fmtune demo ({task})[/]: {spec['why']}.")
        how = {"ner": "seeded split", "multilabel": "seeded split", "generation": "seeded split by module",
               "regression": "seeded split by record (defendants with the same record in one split)",
               "audio-classification": "seeded split by voice",
               "speech-recognition": "seeded split by voice",
               "segmentation": "seeded split; every digit image in one scene only",
               "detection": "seeded split; every digit image in one scene only"}.get(task, "seeded stratified split")
        ui.console.print(f"  data: {spec['dataset']} ({spec.get('origin', 'real, offline')}), {how}, seed {seed}")
    # the split is written as ordinary files beside the runs, so the regular readers are exercised
    data_dir = run_dir.parent / ".demo-data" / f"{spec['dataset']}-{'-'.join(map(str, spec['sizes']))}-seed{seed}"
    files = export(spec["dataset"], data_dir, sizes=spec["sizes"], seed=seed)
    if "data" in spec:  # a file inside each split's folder (detection: the COCO annotations)
        files = {k: v / spec["data"] for k, v in files.items()}
    # each demo's batch size and epochs were measured together with its learning rate: train.min_steps off
    cfg = {**spec["config"], "out": str(run_dir), "name": run_dir.name,
           "data": {**spec["config"].get("data", {}), "train": str(files["train"]), "val": str(files["val"]),
                    "test": str(files["test"])},
           "train": {"min_steps": None, **spec["config"]["train"]}}
    summary = api.train(cfg, overwrite=overwrite, quiet=quiet)
    if "fairness" in spec:
        from fmtune.fairness import run_fairness

        summary["fairness"] = run_fairness(run_dir, quiet=quiet, **spec["fairness"])
        from fmtune.report import write_report

        write_report(run_dir)
    summary["wall_seconds"] = time.perf_counter() - started
    if not quiet:
        ui.console.print(f"\n[bold]run directory:[/] {run_dir}  (report.html, eval.json, model/, metrics.jsonl, "
                         "config.yaml, tb/)")
        ui.console.print(f"open the report: {run_dir / 'report.html'}")
        ui.console.print(f"demo finished in {summary['wall_seconds']:.0f}s")
    return summary
