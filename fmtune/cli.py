"""The command line: a table of verbs, each parsing its arguments and calling one api function."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmtune.config import INFERENCE_PRECISIONS, STRATEGY_NAMES
from fmtune.errors import FmtuneError, Interrupted, PeerError

MODEL_HELP = ("zoo name (fmtune models), a local Hugging Face model folder, a hub id (downloaded once into Hugging "
              "Face's cache; from there offline too), a GGUF file (a causal LM), a "
              "CTranslate2 Whisper folder (faster-whisper's format), a torchvision or timm ResNet's weights file "
              "(.pth / .safetensors) or timm folder, or a torchvision MobileNetV2's; GGUF, CTranslate2 and the "
              "ResNets are converted once into ~/.cache/fmtune/models (FMTUNE_MODELS_DIR). Detection and "
              "segmentation put their head on an image backbone, or fine-tune a whole detector (RT-DETR, D-FINE, "
              "DETR, YOLOS ...) or segmenter with its decode head (SegFormer, UperNet, Mask2Former, MaskFormer ...) "
              "as it is")


def _config_epilog() -> str:
    from fmtune.config import describe

    lines = ["settings (YAML keys, or --set KEY=VALUE):"]
    for key, default, help_ in describe():
        lines.append(f"  {key:<26} {help_} [default: {default}]")
    return "\n".join(lines)


def cmd_demo(a: argparse.Namespace) -> None:
    from fmtune.demos import demo

    demo(a.task, a.out, seed=a.seed, overwrite=a.overwrite, quiet=a.quiet)


DIST_FLAGS = ("--num-processes", "--num-machines", "--machine-rank", "--main-process-ip", "--main-process-port")


def _without_dist_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in DIST_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in DIST_FLAGS)):
            out.append(arg)
    return out


def cmd_train(a: argparse.Namespace) -> None:
    from fmtune import api, config
    from fmtune.errors import ConfigError
    from fmtune.training import distributed

    if (a.num_processes > 1 or a.num_machines > 1) and distributed.world_size() == 1:
        code = distributed.launch(_without_dist_flags(a.argv), a.num_processes, a.num_machines, a.machine_rank,
                                  a.main_process_ip, a.main_process_port)
        if code:
            raise SystemExit(code)
        return
    if a.resume:
        api.train(None, resume=a.resume, quiet=a.quiet, report=not a.no_report)
        return
    if a.resume_from:
        given = [f"--{k}" for k in ("model", "task") if getattr(a, k)] + (["a config file"] if a.config else [])
        if given:
            raise ConfigError(f"--resume-from {a.resume_from} takes the model, task and settings of that run; "
                              f"{', '.join(given)} cannot change them (use --set KEY=VALUE for a setting)")
        overrides = list(a.set) + [f"{k}={v}" for k, v in (("strategy.name", a.strategy), ("train.epochs", a.epochs),
                                                           ("semi.unlabeled", a.unlabeled), ("name", a.name),
                                                           ("train.tracker", a.tracker)) if v is not None]
        if a.baseline:
            overrides.append("train.baseline=true")
        api.train_from(a.resume_from, a.data, val=a.val, test=a.test, out=a.out, overrides=overrides,
                       overwrite=a.overwrite, quiet=a.quiet, report=not a.no_report)
        return
    flags = {"model.name": a.model, "data.train": a.data, "data.val": a.val, "data.test": a.test,
             "task.type": a.task, "strategy.name": a.strategy, "train.epochs": a.epochs, "out": a.out,
             "name": a.name, "train.baseline": True if a.baseline else None, "train.tracker": a.tracker,
             "semi.unlabeled": a.unlabeled}
    cfg = config.load(a.config, overrides=a.set, base={k: v for k, v in flags.items() if v is not None})
    api.train(cfg, overwrite=a.overwrite, quiet=a.quiet, report=not a.no_report)


def cmd_continue(a: argparse.Namespace) -> None:
    from fmtune.api import continue_run

    overrides = list(a.set)
    for key, value in (("continual.memory", a.memory), ("continual.ewc_lambda", a.ewc_lambda),
                       ("continual.lwf_alpha", a.lwf_alpha), ("continual.task_name", a.task_name),
                       ("train.epochs", a.epochs)):
        if value is not None:
            overrides.append(f"{key}={value}")
    res = continue_run(a.run, a.data, val=a.val, test=a.test, method=a.method, out=a.out, overrides=overrides,
                       overwrite=a.overwrite, quiet=a.quiet, report=not a.no_report)
    if a.quiet:
        print(json.dumps(res.get("continual", {}), indent=2, default=float))


def cmd_transfer(a: argparse.Namespace) -> None:
    import time

    from fmtune import config
    from fmtune.transfer import parse_sizes, transfer

    flags = {"model.name": a.model, "data.train": a.data, "data.val": a.val, "data.test": a.test,
             "strategy.name": a.strategy, "train.epochs": a.epochs}
    cfg = config.load(a.config, overrides=a.set, base={k: v for k, v in flags.items() if v is not None})
    out = a.out or f"runs/transfer-{Path(cfg.model.name).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    res = transfer(cfg, sizes=parse_sizes(a.sizes), out=out, methods=tuple(m.strip() for m in a.methods.split(",")),
                   seeds=a.seeds, min_steps=a.min_steps, lr_scratch=a.scratch_lr, keep_models=a.keep_models,
                   quiet=a.quiet)
    if a.quiet:
        print(json.dumps({k: res[k] for k in ("summary", "gain_over_scratch")}, indent=2, default=float))


def cmd_select(a: argparse.Namespace) -> None:
    import time

    from fmtune import active, ui
    from fmtune.errors import ConfigError

    if a.simulate:
        from fmtune import config

        flags = {"model.name": a.model, "strategy.name": a.train_strategy}
        cfg = config.load(None, overrides=a.set, base={k: v for k, v in flags.items() if v is not None})
        if not a.test:
            raise ConfigError("fmtune select --simulate scores every round on test data: give --test FILE")
        out = a.out or f"runs/active-{time.strftime('%Y%m%d-%H%M%S')}"
        res = active.simulate(cfg, a.pool, a.test, out, start=a.start, step=a.n, rounds=a.rounds,
                              strategies=tuple(s.strip() for s in a.strategies.split(",")), seed=a.seed,
                              quiet=a.quiet)
        rounds = zip(*res["curves"].values())  # each round: one point per strategy, same label count
        ui.console.print(ui.table("active learning (test accuracy)", ["labels", *res["curves"]],
                                  [[pts[0]["labels"], *(f"{p['accuracy']:.4f}" for p in pts)] for pts in rounds]))
        ui.console.print(f"active learning: {out}/active.json, {out}/active.png")
        return
    if not a.run:
        raise ConfigError("fmtune select: give the RUN whose model ranks the pool (or --simulate)")
    out = a.output or f"{Path(a.pool).stem}-to-label.csv"
    active.select(a.run, a.pool, a.n, strategy=a.strategy, output=out, seed=a.seed, quiet=a.quiet)


def cmd_evaluate(a: argparse.Namespace) -> None:
    from fmtune import api

    res = api.evaluate(a.run, a.data, baseline=a.baseline, quiet=a.quiet, precision=a.precision)
    if a.groups:
        from fmtune.data.tabular import split_names
        from fmtune.fairness import run_fairness

        res["fairness"] = run_fairness(a.run, a.data, split_names(a.groups), baseline=a.baseline, quiet=a.quiet,
                                       precision=a.precision)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))


def cmd_fairness(a: argparse.Namespace) -> None:
    from fmtune.data.tabular import split_names
    from fmtune.fairness import run_fairness

    res = run_fairness(a.run, a.data, split_names(a.groups), baseline=a.baseline, missing=a.missing,
                       min_group_size=a.min_group_size, n_boot=a.bootstrap, confidence=a.confidence,
                       positive=a.positive, fit=a.fit_thresholds, fit_data=a.fit_data,
                       threshold_groups=split_names(a.threshold_groups) or None,
                       counterfactual=a.counterfactual, terms=a.terms, max_counterfactual_rows=a.limit,
                       quiet=a.quiet, precision=a.precision)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))


def cmd_predict(a: argparse.Namespace) -> None:
    from fmtune import api, ui
    from fmtune.errors import ConfigError
    from fmtune.paths import looks_like_path

    files = [x for x in a.inputs if x == "-" or looks_like_path(x)]
    texts = [x for x in a.inputs if x not in files] + list(a.text)
    if files and texts:
        raise ConfigError(f"give either an input file ({files[0]}) or texts to predict, not both")
    if len(files) > 1:
        api.predict_files(a.run, files, a.output or "-", quiet=a.quiet, batch_size=a.batch_size, strict=a.strict,
                          save_images=a.save_images, precision=a.precision)
    elif texts:
        df = api.predict_texts(a.run, texts, a.output, batch_size=a.batch_size, quiet=a.quiet, precision=a.precision)
        if not a.output:
            ui.console.print(ui.records_table(df))
    elif files == ["-"]:
        api.predict_stdin(a.run, sys.stdin, a.output or "-", fmt=a.format, quiet=a.quiet, batch_size=a.batch_size,
                          strict=a.strict, precision=a.precision)
    elif files:
        api.predict(a.run, files[0], a.output or "-", quiet=a.quiet, batch_size=a.batch_size, strict=a.strict,
                    save_images=a.save_images, media_root=a.media_root, precision=a.precision)
    else:
        raise ConfigError("nothing to predict: give an input file, - for stdin, or texts (--text)")


def cmd_generate(a: argparse.Namespace) -> None:
    from fmtune.generation import generate_texts

    records = generate_texts(a.run, a.prompt or None, a.file, a.output, max_new_tokens=a.max_new_tokens,
                             temperature=a.temperature, top_p=a.top_p, seed=a.seed, batch_size=a.batch_size,
                             backend=a.backend, quiet=a.quiet)
    if a.output is None:
        for r in records:
            print(json.dumps(r, ensure_ascii=False))


def cmd_export(a: argparse.Namespace) -> None:
    from fmtune.exporter import export

    res = export(a.run, a.output, format=a.format, merge=a.merge, overwrite=a.overwrite, max_drop=a.max_drop,
                 quiet=a.quiet)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))


def cmd_serve(a: argparse.Namespace) -> None:
    from fmtune.serve import Limits, serve

    limits = Limits(max_batch=a.max_batch, max_wait_ms=a.max_wait_ms, max_items=a.max_items,
                    max_body_mb=a.max_body_mb, max_text_chars=a.max_text_chars, long_text=a.long_text,
                    max_new_tokens=a.max_new_tokens)
    serve(a.run, a.host, a.port, api_key=a.api_key or os.environ.get("FMTUNE_API_KEY") or None, limits=limits,
          backend=a.backend, quiet=a.quiet, precision=a.precision)


def cmd_report(a: argparse.Namespace) -> None:
    from fmtune import api

    api.report(a.run, quiet=a.quiet)


def cmd_compare(a: argparse.Namespace) -> None:
    from fmtune import api

    api.compare(a.runs, a.output, quiet=a.quiet)


def cmd_explain(a: argparse.Namespace) -> None:
    from fmtune.explain import explain
    from fmtune.ui import console

    res = explain(a.run, a.input, method=a.method, target=a.target, misclassified=a.misclassified, data=a.data,
                  out=a.output, limit=a.limit, steps=a.steps, baseline=a.baseline, quiet=a.quiet)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))
        return
    for it in res["items"]:
        line = f"  {it['name']}: pred {it['predicted']} ({it['score']:.2f})"
        if it.get("true") is not None:
            line += f", true {it['true']}"
        if "top_positive" in it:
            line += "; for " + repr(it["target"]) + ": " + ", ".join(w["word"] for w in it["top_positive"][:3])
        console.print(line, markup=False, highlight=False)
    if res.get("note"):
        console.print(f"  {res['note']}")
    for f in res.get("files", []):
        console.print(f"{Path(res['out']) / f}")


def cmd_robustness(a: argparse.Namespace) -> None:
    from rich.table import Table

    from fmtune.robustness import robustness, table_rows
    from fmtune.ui import console

    res = robustness(a.runs, a.data, suite=a.suite, out=a.output, limit=a.limit, seed=a.seed,
                     attacks=not a.no_attacks, quiet=a.quiet)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))
        return
    t = Table(title=f"{res['metric']} under perturbation ({res['rows']} rows of {res['data']}), by severity")
    for col in ("run", "perturbation", "1", "2", "3", "4", "5"):
        t.add_column(col)
    for row in table_rows(res):
        t.add_row(*row)
    console.print(t)
    console.print(f"{Path(res['out']) / 'robustness.json'}\n{Path(res['out']) / 'robustness.png'}")


def cmd_embed(a: argparse.Namespace) -> None:
    from fmtune.embed import embed
    from fmtune.ui import console

    res = embed(a.run, a.data, methods=tuple(a.method.split(",")), out=a.output, limit=a.limit or None, seed=a.seed,
                quiet=a.quiet)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))
        return
    for k, v in res.get("separation", {}).items():
        console.print(f"  {k:>10}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    console.print(f"{Path(res['out']) / 'embed.png'}")


def cmd_search(a: argparse.Namespace) -> None:
    from fmtune.search import search

    res = search(a.config, trials=a.trials, storage=a.storage, study=a.study, out=a.output, pruner=a.pruner,
                 seed=a.seed, quiet=a.quiet)
    if a.quiet:
        print(json.dumps(res, indent=2, default=float))


def cmd_models(a: argparse.Namespace) -> None:
    from fmtune import api, ui

    rows = [[m["name"], m["kind"], m["description"], m["package"]] for m in api.models()]
    ui.console.print(ui.table("offline models (--model NAME, or a local Hugging Face folder)",
                              ["name", "kind", "description", "package"], rows))
    ui.console.print("--model also takes a local Hugging Face folder (any encoder, causal LM, Whisper, wav2vec2-style "
                     "or AST model; for speech recognition also Moonshine, Speech2Text and Parakeet CTC; a "
                     "T5/BART: the whole model for --task generation, else its encoder; of a "
                     "CLIP/SigLIP the tower that reads the data), a GGUF "
                     "file (a causal LM, dequantised) or a CTranslate2 Whisper folder (faster-whisper's format); the "
                     "last two are converted once into ~/.cache/fmtune/models (FMTUNE_MODELS_DIR).")


def cmd_datasets(a: argparse.Namespace) -> None:
    from pathlib import Path

    from fmtune import api, ui

    if a.export:
        from fmtune.errors import ConfigError
        from fmtune.zoo.datasets import export

        sizes = None
        if a.sizes:
            try:
                parts = [None if p.strip() == "rest" else int(p) for p in a.sizes.split(",")]
                assert len(parts) == 3 and all(p is None or p > 0 for p in parts) and None not in parts[1:]
            except (ValueError, AssertionError):
                raise ConfigError(f"--sizes: expected TRAIN,VAL,TEST row counts (TRAIN may be 'rest'), got "
                                  f"{a.sizes!r}") from None
            sizes = tuple(parts)
        paths = export(a.export[0], Path(a.export[1]), sizes=sizes, seed=a.seed)
        for k, v in paths.items():
            print(f"{k}: {v}")
        return
    rows = [[d["name"], d["kind"], d["package"], d["description"]] for d in api.datasets()]
    ui.console.print(ui.table("offline datasets (fmtune datasets --export NAME DIR writes train/val/test files)",
                              ["name", "kind", "package", "description"], rows))


def cmd_tasks(a: argparse.Namespace) -> None:
    from fmtune import ui
    from fmtune.tasks import TASKS

    rows = []
    for name in TASKS.names():
        t = TASKS.get(name)
        rows.append([name, t.description, t.level, f"{t.default_metric} (also: "
                     f"{', '.join(m for m in t.metric_names if m != t.default_metric)})",
                     ", ".join(sorted(t.capabilities)) or "-"])
    ui.console.print(ui.table("tasks (--task NAME, or task.type in a config)",
                              ["name", "what it predicts", "head reads", "selection metric", "also supports"], rows))


def cmd_config(a: argparse.Namespace) -> None:
    print(_config_epilog())


# The path arguments of each verb and what they must be (fmtune.paths.check): checked before any
# work, so a missing, unreadable or wrong-kind path is one clear line and exit 2 for every verb.
# predict's inputs and explain's --input may also be texts: those verbs check them themselves.
PATH_ARGS: dict[str, dict[str, str]] = {
    "demo": {"out": "output-dir"},
    "train": {"config": "input-file", "data": "input", "val": "input", "test": "input", "out": "output-dir",
              "resume": "run", "resume_from": "run", "unlabeled": "input"},
    "select": {"run": "run", "pool": "input", "output": "output-file", "test": "input", "out": "output-dir"},
    "continue": {"run": "run", "data": "input", "val": "input", "test": "input", "out": "output-dir"},
    "transfer": {"config": "input-file", "data": "input", "val": "input", "test": "input", "out": "output-dir"},
    "evaluate": {"run": "run", "data": "input"},
    "fairness": {"run": "run", "data": "input", "fit_data": "input", "terms": "input-file"},
    "predict": {"run": "run", "output": "output-file"},
    "export": {"run": "run", "output": "output-dir"},
    "generate": {"run": "run", "file": "input", "output": "output-file"},
    "serve": {"run": "run"},
    "report": {"run": "run"},
    "compare": {"runs": "run", "output": "output-file"},
    "explain": {"run": "run", "data": "input", "output": "output-dir"},
    "robustness": {"runs": "run", "data": "input", "output": "output-dir"},
    "embed": {"run": "run", "data": "input", "output": "output-dir"},
    "search": {"config": "input-file", "output": "output-dir"},
}


def check_paths(args: argparse.Namespace) -> None:
    """Every path argument of the verb, checked as PATH_ARGS says (a DataError naming it)."""
    from fmtune import paths

    for dest, kind in PATH_ARGS.get(args.verb, {}).items():
        values = getattr(args, dest, None)
        if kind == "input" and isinstance(values, str) and (folder := paths.hub_dataset(values)) is not None:
            setattr(args, dest, values := str(folder))  # (a dataset id: its files in the Hugging Face cache)
        for v in values if isinstance(values, list) else [values]:
            if v is not None and not (kind == "output-file" and v == "-"):
                paths.check(v, kind, "--" + dest.replace("_", "-") if dest not in ("run", "runs", "config") else "")


def precision_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=INFERENCE_PRECISIONS,
                   help="what the torch model predicts in (default: the run's train.precision; auto: bf16 on a CPU "
                   "with AMX, 1.6-2.8x faster than fp32 there, the same class for 99.5-100%% of rows, else fp32; "
                   "speech recognition and the onnx backends: fp32)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmtune", description="Fine-tune a pretrained foundation model for one task: "
                                "train, evaluate against the pretrained baseline, predict.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    fmt = argparse.RawDescriptionHelpFormatter

    def verb(name: str, fn: Callable, help_: str, **kw: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=fmt, **kw)
        sp.set_defaults(fn=fn)
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress output")
        return sp

    d = verb("demo", cmd_demo, "fine-tune a real model on real data, offline (about 3 min on 2 cores; fairness: 5)")
    d.add_argument("--task", choices=["text", "image", "ner", "multilabel", "regression", "fairness", "generation",
                                      "audio-classification", "speech-recognition", "segmentation", "detection"],
                   default="text",
                   help="text: MiniLM-L6 on rotten-tomatoes; image: EfficientNet-Lite0 on digits; ner: MiniLM-L6 "
                   "tagging named entities in WNUT-2016 tweets; multilabel: MiniLM-L6 telling which types of named "
                   "entity a WNUT-2016 tweet mentions, with a decision threshold per type chosen on validation; "
                   "regression: MiniLM-L6 predicting the COMPAS risk "
                   "decile from defendants' records, then the errors and mean predictions per race and sex; fairness: "
                   "MiniLM-L6 on Adult census rows, then "
                   "the per-group audit before and after per-group thresholds; generation: SmolLM2-135M with LoRA "
                   "summarising Python standard-library functions in one sentence; audio-classification: Whisper "
                   "tiny.en's encoder telling 20 spoken words apart (espeak-ng voices, needs Debian's espeak-ng); "
                   "speech-recognition: Whisper tiny.en with LoRA transcribing real sentences read by espeak-ng; "
                   "segmentation: MobileNetV2 + an LR-ASPP decoder labelling every pixel of scenes of real digits "
                   "on real photos; detection: MobileNetV2 + an FCOS head boxing the digits of those scenes, against "
                   "the head trained on the frozen backbone")
    d.add_argument("--out", help="run directory (default: runs/demo-<task>-<time>)")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/val/test split")
    d.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    t = verb("train", cmd_train, "fine-tune a model; writes a run directory", epilog=_config_epilog())
    t.add_argument("config", nargs="?", help="YAML config file (flags and --set override it)")
    t.add_argument("--model", help=MODEL_HELP)
    t.add_argument("--data", help="training data (a file or folder; a Hugging Face dataset id, owner/name, reads its "
                   "files in the hub cache): CSV/JSONL/Parquet/TXT/XLSX (columns text and label, else the one "
                   "column of a usual name: sentence, review ...; intent, category, airline_sentiment, Class Index "
                   "...; else its columns of free text (Title, Description: read as one) and its one column of "
                   "values that repeat; images / audio: the column of their "
                   "paths, or of ids their files near the table are named by, train_images/{id}.png; said before "
                   "training; sentence1 / sentence2 ... read as pairs; multi-label 0/1 columns; a CSV or a .txt of "
                   "'text;label' lines without a header, or of fastText's '__label__pos text' lines; a file not "
                   "UTF-8 in the encoding found; Label Studio's JSON "
                   "export; any of these compressed: .gz, .bz2, .xz, a .zip of one table), or a folder of class "
                   "sub-folders of images, text files (aclImdb's pos/*.txt) or "
                   "audio files (--task audio-classification; a table names the files in data.audio_column; a "
                   "folder of the files themselves, each named by its class: cat.0.jpg, Abyssinian_12.jpg, or by "
                   "data.label_pattern; a folder with Speech Commands' validation_list.txt / testing_list.txt is "
                   "validated and tested on them), or "
                   "a folder of train/, val/, test/ sub-folders or of train, dev, test files (its splits); "
                   "a table with a 'split' column "
                   "(train / validation / test) trains, validates and tests on its rows of each; "
                   "ner: CoNLL, JSONL, Parquet, Label Studio's JSON, or a CSV of one word a row (Sentence #, Word, "
                   "Tag); "
                   "speech-recognition: a table of audio paths and transcripts, or a folder with metadata.csv "
                   "(or LibriSpeech's *.trans.txt files, or LJSpeech's metadata.csv and wavs/, or each clip's "
                   "transcript in a .txt / .lab file of its name: VCTK, TIMIT, MFA corpora); "
                   "segmentation: a folder with images/ and masks/ (same names; or JPEGImages/ + "
                   "SegmentationClass/; or a_mask.png beside a.jpg), or a table of image and mask paths "
                   "(data.image_column, data.mask_column), or a COCO or Label Studio JSON file of polygons; "
                   "detection: a COCO JSON file, a YOLO dataset YAML (or images/ folder with labels/ beside it), "
                   "a Pascal VOC folder (Annotations/, JPEGImages/), or a CSV of one box a row (filename, class, "
                   "xmin, ymin, xmax, ymax; a folder with _annotations.csv), or Label Studio's JSON / JSON-MIN "
                   "export of rectangles")
    t.add_argument("--val", help="validation data (default: split off --data, or the folder's validation_list.txt, "
                   "or the table's rows its split column marks validation)")
    t.add_argument("--test", help="test data: the best checkpoint is evaluated on it at the end")
    t.add_argument("--task", help="what to predict: classification (default), multilabel, regression, ner, "
                   "generation, audio-classification, speech-recognition, segmentation ... (`fmtune tasks` lists "
                   "them)")
    t.add_argument("--strategy", choices=list(STRATEGY_NAMES),
                   help="what to train: full, head, last_n (strategy.n), lora/dora (strategy.r, strategy.alpha, "
                   "strategy.targets), ia3, prompt (strategy.virtual_tokens), bitfit, contrastive (few labels: "
                   "SetFit-style pair training of a text encoder, then a linear head; strategy.encoder=lora), "
                   "auto (chosen from the labels per class, the number of classes and the model: e.g. text with at "
                   "most 64 rows per class -> contrastive, or with 10 classes or more the linear probe; run.json "
                   "says why); see `fmtune config`")
    t.add_argument("--unlabeled", metavar="FILE",
                   help="self-training: pseudo-label these unlabelled texts in rounds (semi.rounds, semi.threshold, "
                   "class-balanced) and train again on them; OUT/selftrain.json has each round")
    t.add_argument("--epochs", type=int, help="passes over the training data (default: 3; detection and "
                   "segmentation 12, on batches of 8: a dense head needs many steps)")
    t.add_argument("--out", help="run directory (default: runs/<name>)")
    t.add_argument("--name", help="run name (default: <model>-<strategy>-<time>)")
    t.add_argument("--baseline", action="store_true", help="also score the pretrained baseline on --test")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set train.lr=3e-5 (repeatable)")
    t.add_argument("--overwrite", action="store_true", help="replace the run directory if it exists")
    t.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")
    t.add_argument("--resume-from", metavar="RUN",
                   help="start from a finished run's fine-tuned model (its model, task and settings) and train it on "
                   "--data (default: RUN's own training file, read again: e.g. after adding the rows `fmtune select` "
                   "picked and you labelled); --val/--test default to RUN's; RUN is only read, a new run is written "
                   "(with continual.json: the test scores before and after)")
    t.add_argument("--no-report", action="store_true", help="do not write report.html at the end")
    t.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes on this machine (DDP via torchrun; on CPU they "
                   "share the cores, gloo); train.batch_size stays the global batch")
    t.add_argument("--num-machines", type=int, default=1, help="machines taking part (run the same command on each)")
    t.add_argument("--machine-rank", type=int, default=0, help="this machine's rank, 0 .. num-machines-1")
    t.add_argument("--main-process-ip", help="address of machine rank 0 (several machines)")
    t.add_argument("--main-process-port", type=int, default=29500, help="port on machine rank 0 (default: 29500)")
    t.add_argument("--tracker", choices=["tensorboard", "mlflow", "wandb"],
                   help="also log to MLflow (file store runs/mlruns) or W&B (offline); tb/ is always written")

    c = verb("continue", cmd_continue, "keep a model current: train a finished run on new data without forgetting "
             "the old; new labels extend its head; RUN is only read; writes a new run with continual.json (accuracy "
             "on every task of the lineage before and after, forgetting, gain)")
    c.add_argument("run", help="the finished run to continue from")
    c.add_argument("--data", required=True, help="the new training data (same columns as the run's)")
    c.add_argument("--val", help="validation data (default: split off --data)")
    c.add_argument("--test", help="the new task's test data (the old tasks' test files come from the lineage)")
    c.add_argument("--method", choices=["replay", "ewc", "lwf", "naive"], default="replay",
                   help="replay: mix a class-balanced memory of old examples into training; ewc: elastic weight "
                   "consolidation; lwf: distil the previous model's outputs; naive: plain fine-tuning "
                   "(default: replay)")
    c.add_argument("--memory", type=int, help="old examples kept (class-balanced; default 1000)")
    c.add_argument("--ewc-lambda", type=float, help="ewc: penalty strength (default: old examples / new examples)")
    c.add_argument("--lwf-alpha", type=float, help="lwf: weight of the distillation loss (default 1)")
    c.add_argument("--task-name", help="name of the new task in continual.json (default: the --data file's name)")
    c.add_argument("--epochs", type=int, help="passes over the new data (default: the run's)")
    c.add_argument("--out", help="the new run directory (default: runs/<run>-<method>-<time>)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting of the run's config, e.g. --set train.lr=1e-5 (repeatable)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--no-report", action="store_true", help="do not write report.html at the end")

    se = verb("select", cmd_select, "active learning: rank unlabelled rows by what labelling them would teach the "
              "run's model (uncertainty, diversity, or both), and write the next ones to label; --simulate runs "
              "the whole loop on a labelled set with its labels hidden")
    se.add_argument("run", nargs="?", help="the trained run whose model ranks the pool (not with --simulate)")
    se.add_argument("--pool", required=True, help="CSV/JSONL/Parquet of unlabelled texts (data.text_column)")
    se.add_argument("-n", type=int, default=50, help="rows to pick (--simulate: per round) (default: 50)")
    se.add_argument("--strategy", default="mix", choices=["mix", "entropy", "margin", "kcenter", "random"],
                    help="mix: the 3n smallest margins, then k-center among them (default); entropy / margin: "
                    "most uncertain first; kcenter: farthest from everything labelled (embeddings); random")
    se.add_argument("-o", "--output", help="where the picked rows go (default: <pool>-to-label.csv)")
    se.add_argument("--seed", type=int, default=0)
    se.add_argument("--simulate", action="store_true",
                    help="labels of --pool hidden; start from --start rows per class, then --rounds rounds of -n "
                    "rows per strategy (--strategies), training again each round (--model, --train-strategy) "
                    "and scoring on --test; writes active.json/csv/png to --out")
    se.add_argument("--test", help="--simulate: test data scored every round")
    se.add_argument("--start", type=int, default=4, help="--simulate: labelled rows per class at the start")
    se.add_argument("--rounds", type=int, default=4, help="--simulate: rounds of picking")
    se.add_argument("--strategies", default="random,mix,margin,kcenter", help="--simulate: compared strategies")
    se.add_argument("--model", help="--simulate: the model trained each round (default: minilm-l6)")
    se.add_argument("--train-strategy", choices=list(STRATEGY_NAMES),
                    help="--simulate: how each round trains (default: full; auto picks by labels per class)")
    se.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--simulate: any setting")
    se.add_argument("--out", help="--simulate: output folder (default: runs/active-<time>)")

    tr = verb("transfer", cmd_transfer, "does pre-training help here? the same architecture trained from scratch, as "
              "a linear probe on the frozen pretrained backbone, and fine-tuned, with the same budget, at several "
              "training-set sizes; a table, transfer.json/csv and a plot")
    tr.add_argument("config", nargs="?", help="YAML config file (flags and --set override it)")
    tr.add_argument("--model", help=MODEL_HELP)
    tr.add_argument("--data", help="training data to draw the training sets from")
    tr.add_argument("--val", help="validation data, the same for every run (default: split off --data once)")
    tr.add_argument("--test", help="test data every run is scored on (required)")
    tr.add_argument("--sizes", default="8,32,128,all",
                    help="training examples per class, comma-separated; 'all' = the whole training data "
                    "(default: 8,32,128,all)")
    tr.add_argument("--methods", default="scratch,probe,finetune",
                    help="scratch (random init, all trained), probe (linear head, frozen pretrained backbone), "
                    "finetune (pretrained, --strategy) (default: all three)")
    tr.add_argument("--strategy", choices=list(STRATEGY_NAMES), help="how finetune trains (default: full)")
    tr.add_argument("--epochs", type=int, help="the budget: epochs over each training set (default: 3) ...")
    tr.add_argument("--min-steps", type=int, default=30, help="... but at least this many optimizer steps, the "
                    "same for every method at a size (default: 30)")
    tr.add_argument("--seeds", type=int, default=1, help="repeat with this many seeds (draws and training); mean "
                    "and spread reported (default: 1)")
    tr.add_argument("--scratch-lr", type=float,
                    help="learning rate of the from-scratch runs (default: 10x the fine-tuning lr, within 1e-4..2e-3)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any setting for every run, e.g. --set train.lr=2e-3 (repeatable)")
    tr.add_argument("--out", help="output folder (default: runs/transfer-<model>-<time>)")
    tr.add_argument("--keep-models", action="store_true", help="keep every run's model/ (default: only the "
                    "metrics and logs, to save disk)")

    e = verb("evaluate", cmd_evaluate, "score a trained run on a labelled file; writes eval.json, a report and "
             "a confusion matrix (generation and speech recognition: the answers or transcripts of up to "
             "eval.test_samples rows, scored as in training, in test_answers.jsonl)")
    e.add_argument("run", help="run directory")
    e.add_argument("--data", help="labelled data (default: the run's test file)")
    e.add_argument("--baseline", action="store_true",
                   help="also fit and score the pretrained baseline (linear probe on the frozen backbone; generation "
                   "and speech recognition: the pretrained model itself, zero-shot)")
    e.add_argument("--groups", help="also audit fairness over these columns of the data (comma-separated): "
                   "as fmtune fairness RUN --groups with its defaults")
    precision_arg(e)

    fa = verb("fairness", cmd_fairness, "metrics per group (columns of the data, and their intersection) with "
              "bootstrap intervals, the largest gaps between groups, optional per-group decision thresholds and "
              "counterfactuals (speech recognition: WER and CER per group of clips); RUN/fairness.json, "
              "fairness.png and a section of the report")
    fa.add_argument("run", help="run directory")
    fa.add_argument("--data", help="labelled data holding the group columns (default: the run's test file)")
    fa.add_argument("--groups", required=True, help="group columns, comma-separated, e.g. sex,race (several: each, "
                    "and their intersection)")
    fa.add_argument("--baseline", action="store_true", help="also audit the pretrained baseline (linear probe on "
                    "the frozen backbone; speech recognition: the pretrained model's transcripts): did fine-tuning "
                    "widen a gap?")
    fa.add_argument("--missing", choices=["error", "group"], default="error", help="an empty group cell: stop "
                    "naming the row (default), or count those rows as a group '(missing)'")
    fa.add_argument("--min-group-size", type=int, default=30, help="groups with fewer examples are flagged and left "
                    "out of the gaps (default: 30)")
    fa.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default: "
                    "1000)")
    fa.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default: 0.95)")
    fa.add_argument("--positive", help="two labels: the one whose selection rate and TPR/FPR are reported "
                    "(default: the second in sorted order)")
    fa.add_argument("--fit-thresholds", metavar="CONSTRAINT", choices=["demographic_parity", "equalized_odds",
                    "true_positive_rate_parity", "false_positive_rate_parity"],
                    help="fit per-group decision thresholds (fairlearn ThresholdOptimizer, best accuracy under the "
                    "constraint) on --fit-data, store them in the run (predict and serve apply them; delete "
                    "RUN/fairness_thresholds.json to stop) and audit them beside the model")
    fa.add_argument("--threshold-groups", help="the columns the thresholds are per (comma-separated, intersected; "
                    "default: --groups). A group under --min-group-size rows or with one label in the fitting data "
                    "gets no threshold and keeps the model's decision")
    fa.add_argument("--fit-data", help="labelled data the thresholds are fitted on (default: the run's validation "
                    "split, never the data audited)")
    fa.add_argument("--counterfactual", action="store_true", help="how often the decision moves when only the "
                    "group changes: tabular runs (data.text_columns/text_template) swap the group column's value; "
                    "text runs swap identity terms (--terms; default: gender word pairs)")
    fa.add_argument("--terms", help="JSON of term pairs to swap: [[\"he\", \"she\"], ...] or "
                    "{\"name\": [[...], ...]}")
    fa.add_argument("--limit", type=int, default=1000, help="counterfactuals: rows sampled (default: 1000)")
    precision_arg(fa)

    pr = verb("predict", cmd_predict, "predict labels for new inputs, streamed in chunks (any size, constant "
              "memory); CSV with labels, probabilities and an error column for rows that could not be predicted")
    pr.add_argument("run", help="run directory")
    pr.add_argument("inputs", nargs="*", help="a CSV/TSV/JSONL/Parquet file with the text (or image / audio path) "
                    "column, a .txt file of one text per line, a CoNLL file (.conll/.bio/.iob: each sentence; its "
                    "tags, if any, stay beside the predicted ones), an image or audio folder or file, or several "
                    "such files (clips/*.wav: a row each, in order; what the run reads; a text run: a folder of text "
                    "files, one text a file); "
                    "- reads stdin; anything else that is not a path is a text to predict (a small table is printed)")
    pr.add_argument("--text", action="append", default=[], metavar="TEXT", help="a text to predict (repeatable)")
    pr.add_argument("--format", choices=["auto", "lines", "csv", "tsv", "jsonl"], default="auto",
                    help="stdin (-): one text per line, CSV/TSV with a header, or JSONL (default auto: JSONL when the "
                    "first line is an object, CSV/TSV when its header names the text column, else lines)")
    pr.add_argument("-o", "--output", help="output file: .jsonl for JSON lines, else CSV (default: stdout)")
    pr.add_argument("--batch-size", type=int, help="examples per forward pass")
    pr.add_argument("--save-images", metavar="DIR", help="segmentation: write each predicted mask into DIR as a PNG "
                    "of class indices (same name as its image) and an overlay on the image (NAME_overlay.jpg), named "
                    "in the mask_file column (default: the mask as base64 PNG in mask_png); detection: each image "
                    "with its boxes drawn (NAME.jpg, named in image_file)")
    pr.add_argument("--strict", action="store_true",
                    help="stop at the first row that cannot be predicted (default: report it in the error "
                    "column and go on)")
    pr.add_argument("--media-root", metavar="DIR", help="the folder relative image / audio paths in the table are "
                    "read from (default: the run's data.media_root, else the table's own folder)")
    precision_arg(pr)

    g = verb("generate", cmd_generate, "answer prompts with a trained generation run (--task generation): greedy "
             "by default, batched with a KV cache; JSON lines {prompt, answer} to stdout or -o")
    g.add_argument("run", help="run directory of a generation run")
    g.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt (repeatable); the run's instruction and chat template are applied as in training")
    g.add_argument("--file", help="prompts: JSONL rows {prompt} or {messages} (as in training, without the answer), "
                   "or CSV/Parquet with the run's data.input_column")
    g.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
    g.add_argument("--max-new-tokens", type=int, help="most tokens per answer (default: the run's eval.max_new_tokens)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this share of probability mass")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampling: row i is drawn with seed + i, "
                   "whatever --batch-size")
    g.add_argument("--batch-size", type=int, default=16, help="prompts answered together (default: 16)")
    g.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="what decodes: torch, or onnxruntime on the run's ONNX export (prefill and decode graphs, made "
                   "and checked on first use in RUN/export/onnx: minutes for a 100M model; slower than torch on "
                   "this CPU, for deploying without torch) (default: torch)")

    x = verb("export", cmd_export, "write a run's model as a folder other tools load, checked against the run's "
             "model on real rows of its data")
    x.add_argument("run", help="run directory")
    x.add_argument("-o", "--output", help="output folder (default: RUN/export/model|adapter|merged|onnx|onnx-int8)")
    x.add_argument("--format", choices=["hf", "onnx", "onnx-int8"], default="hf",
                   help="hf: the model folder (transformers/peft); onnx: model.onnx with dynamic batch and sequence "
                   "axes (a whole RT-DETR, RT-DETRv2 or D-FINE detector: one image at a time), checked within "
                   "1e-4; a decoder-only generation run: prefill.onnx and decode.onnx, checked to give the run's "
                   "greedy answers; onnx-int8: dynamically quantised, checked on the run's test split "
                   "(default: hf). ONNX folders carry the tokenizer and preprocessing.json")
    x.add_argument("--max-drop", type=float, default=0.01,
                   help="onnx-int8: refuse when the test metric drops by more than this (default: 0.01)")
    x.add_argument("--merge", action="store_true",
                   help="lora/dora/ia3 runs: fold the adapter into the weights: a plain model, no peft needed")
    x.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")

    sv = verb("serve", cmd_serve, "serve a run over HTTP: POST /predict, GET /health, GET /metadata, docs at /docs; "
              "concurrent requests are micro-batched; bad input gets a 4xx JSON error. A generation run answers "
              "POST /generate. OpenAI's API under /v1, for the openai clients (base_url http://HOST:PORT/v1): "
              "chat/completions, completions and responses (generation runs; greedy unless a temperature is "
              "sent; Anthropic's POST /v1/messages for the anthropic clients, base_url http://HOST:PORT; Ollama's "
              "/api/generate and /api/chat too), embeddings (text classification, multi-label and "
              "regression runs), audio/transcriptions (speech "
              "recognition runs), models. POST /invocations (MLflow's and SageMaker's scoring protocol) and "
              "POST /v1/models/NAME:predict (KServe / TF Serving v1), and the Open Inference Protocol under /v2 "
              "(KServe v2, Triton: tritonclient) for prediction runs. POST / answers in the "
              "Hugging Face Inference API's format, for "
              "huggingface_hub's InferenceClient(model=URL)")
    sv.add_argument("run", help="run directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                    "0.0.0.0 to accept other machines)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--backend", choices=["torch", "onnx", "onnx-int8"], default="torch",
                    help="what runs the model: torch, or onnxruntime on the run's ONNX export (made and checked on "
                    "first use, in RUN/export/) (default: torch)")
    sv.add_argument("--api-key", help="require this key (X-API-Key or Authorization: Bearer) on every request but "
                    "/health; also read from $FMTUNE_API_KEY")
    sv.add_argument("--max-batch", type=int, default=64,
                    help="items per forward pass; generation runs: prompts per decoding, greedy, sampled and "
                    "streamed requests alike (default: 64; 1: one request at a time)")
    sv.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="requests that arrive while a forward pass runs share the next one; this makes a batch "
                    "that is not full wait that much longer for more (default: 0)")
    sv.add_argument("--max-items", type=int, default=256, help="inputs per request (default: 256; more: 413)")
    sv.add_argument("--max-body-mb", type=float, default=16.0, help="request body size limit (default: 16; more: 413)")
    sv.add_argument("--max-text-chars", type=int, default=20_000, help="characters per text (default: 20000)")
    sv.add_argument("--long-text", choices=["truncate", "reject"], default="truncate",
                    help="a longer text (generation runs: a prompt longer than the model's max_length in tokens): "
                    "cut it (the response lists which in \"truncated\") or answer 413 (default: truncate)")
    sv.add_argument("--max-new-tokens", type=int, default=512,
                    help="generation runs: the most tokens one answer may ask for (default: 512; more: 422)")
    precision_arg(sv)

    rp = verb("report", cmd_report, "write RUN/report.html: one self-contained page with the config, data summary, "
              "training curves, test results against the baseline, confusion matrix, confident mistakes, environment")
    rp.add_argument("run", help="run directory")
    cp = verb("compare", cmd_compare, "compare runs side by side: strategy, trainable parameters, time, metrics "
              "(a table here and an HTML page)")
    cp.add_argument("runs", nargs="+", help="run directories")
    cp.add_argument("-o", "--output", default="compare.html", help="HTML file to write (default: compare.html)")

    ex = verb("explain", cmd_explain, "show why the model predicts what it does: heat maps over images (Grad-CAM, "
              "integrated gradients, occlusion), shaded words (integrated gradients) or audio's log-mel "
              "(integrated gradients over time and frequency); to RUN/explain/")
    ex.add_argument("run", help="run directory")
    ex.add_argument("--input", action="append", default=[], metavar="X",
                    help="a text, a text/table file, an image, a folder of images, an audio file or a folder of "
                    "them (repeatable); a run on pairs of texts takes a JSON list of the two: '[\"a\", \"b\"]'")
    ex.add_argument("--misclassified", type=int, default=0, metavar="N",
                    help="explain the N most confident mistakes on --data (default: the run's test file)")
    ex.add_argument("--data", help="labelled data for --misclassified")
    ex.add_argument("--method", default="auto", choices=["auto", "gradcam", "ig", "occlusion"],
                    help="images: gradcam (CNN backbones: last convolution), ig (integrated gradients), occlusion; "
                    "text: ig on the token embeddings; audio: ig over the log-mel (a raw-waveform model: over "
                    "the samples, shown over the log-mel) (default auto: gradcam for CNNs, else ig)")
    ex.add_argument("--target", metavar="LABEL", help="explain this label instead of the predicted one")
    ex.add_argument("-o", "--output", help="output folder (default: RUN/explain, replaced on each call)")
    ex.add_argument("--limit", type=int, default=24, help="explain at most this many inputs (default: 24)")
    ex.add_argument("--steps", type=int, default=32, help="integration steps for ig (default: 32; text at least 20)")
    ex.add_argument("--baseline", choices=["mean", "blur", "black", "pad", "mask", "unk", "silence", "noise"],
                    help="what the input is compared with (ig, occlusion). Images: the normalisation's mean colour "
                    "(default), a heavy blur of the input, or black (black gives dark pixels no attribution). Text: "
                    "every word replaced by [PAD] (default), [MASK] or [UNK]; attributions depend on it, so a "
                    "word that stands out under two baselines is the safer reading. Audio: silence (its log-mel "
                    "floor) for Whisper; noise as loud as the clip (seeded) for raw-waveform models (wav2vec2, HuBERT, "
                    "WavLM), which normalise their input so that a path from silence tells nothing; silence (the "
                    "filterbank's floor) for AST")

    rb = verb("robustness", cmd_robustness, "score runs under noise, corruptions and white-box attacks (images), "
              "typos, dropped/swapped words, case changes (text; named entities: their tags kept true; generation: "
              "the prompts, answers scored on ROUGE-L), or noise, delay, speed and level (audio; speech "
              "recognition: on WER), five severities each; robustness.json and a plot")
    rb.add_argument("runs", nargs="+", help="run directories (several: side by side, on the same perturbed inputs)")
    rb.add_argument("--data", help="labelled data (default: the first run's test file)")
    rb.add_argument("--suite", choices=["default", "quick"], default="default",
                    help="default: every severity; quick: severities 1, 3, 5 and two attack epsilons")
    rb.add_argument("--limit", type=int, default=None, help="rows used, sampled with --seed (default: 1000; speech "
                    "recognition and generation: 100, every clip transcribed or prompt answered again under each "
                    "perturbation; 0: all)")
    rb.add_argument("--seed", type=int, default=0, help="seed of the sample and of every perturbation")
    rb.add_argument("--no-attacks", action="store_true", help="skip FGSM and PGD (images)")
    rb.add_argument("-o", "--output", help="output folder (default: RUN/robustness; several runs: "
                    "<first run>-robustness-compare beside it)")

    em = verb("embed", cmd_embed, "2-D map of the penultimate features, coloured by label: the pretrained backbone "
              "beside the fine-tuned model, with how well the classes separate; to RUN/embed/")
    em.add_argument("run", help="run directory")
    em.add_argument("--data", help="labelled data (default: the run's test file)")
    em.add_argument("--method", default="pca,tsne", help="projections, comma-separated: pca, tsne, umap (umap "
                    "needs umap-learn) (default: pca,tsne)")
    em.add_argument("--limit", type=int, default=1000, help="rows used, sampled with --seed (default: 1000; 0: all)")
    em.add_argument("--seed", type=int, default=0, help="seed of the sample and the projections")
    em.add_argument("-o", "--output", help="output folder (default: RUN/embed)")

    se = verb("search", cmd_search, "hyper-parameter search with optuna over the config's search: section; each "
              "trial is a training run, bad ones pruned; best.yaml, trials.csv, plots in the study folder")
    se.add_argument("config", help="YAML config with a search: section, e.g. "
                    "search: {train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}}")
    se.add_argument("--trials", type=int, default=20, help="finished trials the study should hold (default: 20); "
                    "rerunning continues the study up to this number")
    se.add_argument("--storage", help="optuna storage URL (default: sqlite in the study folder); a shared database "
                    "(postgresql://...) lets several machines run one study")
    se.add_argument("--study", help="study name (default: the config's name or file name)")
    se.add_argument("-o", "--output", help="study folder (default: runs/search-<study>)")
    se.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median",
                    help="stop unpromising trials from their per-epoch validation (default: median)")
    se.add_argument("--seed", type=int, help="seed of the sampler (default: random)")

    verb("models", cmd_models, "list the models available offline")
    ds = verb("datasets", cmd_datasets, "list the datasets available offline, or export one to files")
    ds.add_argument("--export", nargs=2, metavar=("NAME", "DIR"), help="write NAME's train/val/test files into DIR")
    ds.add_argument("--seed", type=int, default=0, help="seed of the exported split")
    ds.add_argument("--sizes", metavar="TRAIN,VAL,TEST", help="rows per split, stratified by label; TRAIN may be "
                    "'rest' (default: 10%% val, 20%% test, the rest train)")
    verb("tasks", cmd_tasks, "list the tasks: what each predicts, its metrics and what it supports")
    verb("config", cmd_config, "list every setting with its default and meaning")
    return p


_SHOWN: set[str] = set()  # the warnings said so far: a file read again (by the report, evaluation) says it once


def _show_warning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    """Warnings meant for the user (unreadable rows, images): one line, no source location, each once."""
    from rich.markup import escape

    from fmtune.ui import console

    if str(message) in _SHOWN:
        return
    _SHOWN.add(str(message))
    console.print(f"[yellow]warning:[/] {escape(str(message))}")


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. A rank of a launched run (torchrun sets WORLD_SIZE) ends its
    process here instead (``distributed.exit_rank``)."""
    code = _command(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # (distributed.world_size's test; that module imports torch)
        from fmtune.training.distributed import exit_rank

        exit_rank(code)
    return code


def _command(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*TRANSFORMERS_CACHE.*")
    warnings.showwarning = _show_warning
    _SHOWN.clear()  # (once per command)
    try:
        check_paths(args)
        args.fn(args)
    except Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except PeerError:  # rank 0 printed why
        return 2
    except FmtuneError as e:
        from rich.markup import escape

        from fmtune.ui import console

        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; continue a training run with: fmtune train --resume RUN", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fmtune predict RUN in.csv | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
