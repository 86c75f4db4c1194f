"""Text generation benchmark: fmtune against TRL's SFTTrainer, side by side in one run.

    make bench-generation        # installs trl for the bench only, writes bench/results-generation-<date>.json
    .venv/bin/python bench/generation.py [--train 320 --val 40 --test 60 --epochs 1] > result.json
    .venv/bin/python bench/generation.py --corpus debian-descriptions > result.json   # prose

Same model (SmolLM2-135M-Instruct, fp32, from the offline GGUF), same real data (Python standard
library functions -> the first sentence of their docstring, split by module; or, with
``--corpus debian-descriptions``, this machine's Debian package descriptions -> their one-line
synopsis, split by source package), same prompt (the instruction and the input in the chat
template, one user turn; the target is the assistant's answer), same LoRA (r 8, alpha 16,
dropout 0 (fmtune's default here) on q/k/v/o/gate/up/down), learning rate, linear schedule with
6% warm-up, weight decay, batch size, epochs and seed; loss on the completion only for every run
except the prompt-masking control. ``--precision fp32`` runs fmtune and expert TRL in fp32: on a
CPU with native bf16, what a CPU without it gets.

Runs:
1. ``fmtune train --task generation`` (defaults: length-bucketed batches, logits only where the
   next token is trained, validation answers scored at step 0 and at the end);
2. TRL SFTTrainer, its standard recipe (prompt-completion data, completion-only loss; SFTConfig's
   defaults turn on bf16 autocast and gradient checkpointing: on a CPU without native bf16 a step
   takes minutes, so only ``--trl-standard-steps`` steps are timed and no model is scored);
3. the same with bf16 off (fp32, what fmtune picks on such a CPU);
4. TRL as an expert would set it here: bf16 autocast only where the CPU has native bf16 (fmtune's
   rule too; fp32 otherwise), no gradient checkpointing, batches grouped by length
   (``train_sampling_strategy="group_by_length"``; padding-free batches and packing need
   FlashAttention, which a CPU does not have);
5. fmtune with ``task.train_on_prompt`` (the effect of prompt masking).

Every trained model is then scored by the same code: validation loss (completion tokens) and
ROUGE-L / exact match of greedy answers to the test prompts (batched, KV cache). Prints one JSON
document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from fmtune import api, config  # noqa: E402
from fmtune.fsutil import read_jsonl  # noqa: E402
from fmtune.models import build, causal_lm, wrapped  # noqa: E402
from fmtune.tasks.generation import Generation, GenerationSettings, read_rows  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402
from fmtune.zoo.models import resolve  # noqa: E402

# corpus -> (input column, target column, instruction)
CORPORA = {"stdlib-docstrings": ("code", "summary", "Summarise this Python function in one sentence."),
           "debian-descriptions": ("description", "synopsis", "Summarise this Debian package description in one line.")}
DPKG_STATUS = Path("/var/lib/dpkg/status")
DEBIAN_MAX_WORDS = 150  # keeps 98% of descriptions; the longest batches then fit in memory without checkpointing


def debian_descriptions(out: Path, sizes: tuple[int, int, int], seed: int) -> dict[str, Path]:
    """A second real text-to-text corpus, prose rather than code: the package descriptions of this
    machine's dpkg status file (the extended description -> its one-line synopsis), one row per
    distinct description, split by source package so that no source is in two splits. Not a zoo
    dataset: what is installed differs between machines."""
    import re

    import pandas as pd

    from fmtune.zoo.datasets import split

    rows: dict[str, tuple[str, str]] = {}
    for para in DPKG_STATUS.read_text(encoding="utf-8").split("\n\n"):
        fields: dict[str, str] = {}
        key = None
        for line in para.split("\n"):
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        synopsis, _, extended = fields.get("Description", "").partition("\n")
        lines = ["" if ln.strip() == "." else ln[1:] for ln in extended.split("\n")]
        description = re.sub(r"[ \t]+", " ", "\n".join(lines)).strip()
        if synopsis and description and len(description.split()) <= DEBIAN_MAX_WORDS:
            rows.setdefault(description, (synopsis, fields.get("Source", fields.get("Package", "")).split()[0]))
    df = pd.DataFrame([{"description": d, "synopsis": s, "group": g} for d, (s, g) in rows.items()])
    if len(df) < sum(sizes):
        raise SystemExit(f"{DPKG_STATUS} gives {len(df)} descriptions, fewer than the {sum(sizes)} asked for")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in zip(("train", "val", "test"), split(df, sizes, seed)):
        files[name] = out / f"{name}.jsonl"
        part.rename(columns={"group": "source"}).to_json(files[name], orient="records", lines=True, force_ascii=False)
    return files
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def score(model: torch.nn.Module, tokenizer, files: dict[str, Path], args: argparse.Namespace) -> dict:
    """Validation loss on the completion tokens and test ROUGE of greedy answers: one code for every run."""
    column, target, instruction = CORPORA[args.corpus]
    task = Generation(instruction=instruction)
    task.settings = GenerationSettings(args.max_new_tokens, args.test, 32)
    data_cfg = config.from_dict({"data": {"input_column": column, "target_column": target}}).data
    bundle = build.Bundle(model, "text", causal_lm.FAMILY, "none", tokenizer=tokenizer, max_length=args.max_length)
    causal_lm.set_pad(tokenizer, wrapped.plain(model))
    net = causal_lm.TargetLogits(model, tokenizer)
    val = task.dataset(read_rows(files["val"], data_cfg), bundle, data_cfg)[0]
    test = task.dataset(read_rows(files["test"], data_cfg), bundle, data_cfg)[0]
    started = time.perf_counter()
    v = task.evaluate_model(net, val, 32, "cpu", sample=[])
    t = task.evaluate_model(net, test, 32, "cpu", sample=list(range(len(test))))
    return {"val_loss": round(v["loss"], 4), "test_loss": round(t["loss"], 4),
            "test_rougeL": round(t["rougeL"], 4), "test_rouge1": round(t["rouge1"], 4),
            "test_exact_match": round(t["exact_match"], 4), "scoring_seconds": round(time.perf_counter() - started, 1),
            "examples": [{"reference": r, "answer": a} for r, a in zip(test.references[:3], task.last_answers[:3])]}


def run_fmtune(files: dict[str, Path], out: Path, args: argparse.Namespace, train_on_prompt: bool = False,
               packing: bool = False) -> dict:
    column, target, instruction = CORPORA[args.corpus]
    cfg = config.from_dict({
        "model": {"name": "smollm2-135m", "max_length": args.max_length},
        "task": {"type": "generation", "instruction": instruction, "train_on_prompt": train_on_prompt},
        "data": {"train": str(files["train"]), "val": str(files["val"]), "input_column": column,
                 "target_column": target},
        "strategy": {"name": "lora", "r": 8, "alpha": 16, "dropout": args.lora_dropout},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "lr": args.lr, "seed": args.seed,
                  "warmup_ratio": 0.06, "weight_decay": 0.01, "patience": None, "packing": packing,
                 "precision": args.precision},
        "eval": {"samples": args.val_answers, "max_new_tokens": args.max_new_tokens},
        "out": str(out)})
    started = time.perf_counter()
    summary = api.train(cfg, overwrite=True, quiet=True, report=False)
    wall = time.perf_counter() - started
    info = json.loads((out / "run.json").read_text())
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("type") == "eval"]
    bundle = build.load(out / "model")
    return {"train_seconds": round(info["fit"]["seconds"], 1), "process_seconds_to_trained": round(wall, 1),
            "validation_seconds_inside_fit": round(sum(e.get("eval_seconds", 0) for e in evals), 1),
            "train_seconds_without_validation": round(info["fit"]["seconds"] - sum(e.get("eval_seconds", 0)
                                                                                   for e in evals), 1),
            "steps": info["fit"]["steps"], "evaluations": len(evals), "best_step": summary["best_step"],
            "trained_tokens": info["data"]["train"]["tokens"],
            "tokens_per_s": round(info["data"]["train"]["tokens"] * args.epochs / info["fit"]["seconds"], 1),
            **score(bundle.model, bundle.tokenizer, files, args)}


def run_trl(files: dict[str, Path], out: Path, args: argparse.Namespace, mode: str) -> dict:
    """mode: standard (SFTConfig's defaults: bf16 autocast and gradient checkpointing; a few steps
    only, see the module doc), fp32 (the defaults with bf16 off), expert (bf16 where native, no gradient
    checkpointing, batches grouped by length)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    path = resolve("smollm2-135m")[1]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    column, target, instruction = CORPORA[args.corpus]

    def rows(name: str) -> list[dict]:
        out = []
        for r in read_jsonl(files[name]):
            out.append({"prompt": [{"role": "user", "content": f"{instruction}\n\n{r[column]}"}],
                        "completion": [{"role": "assistant", "content": r[target]}]})
        return out

    changes = {"standard": {"max_steps": args.trl_standard_steps},
               "fp32": {"bf16": False},
               "expert": {"bf16": hardware.choose("auto", args.precision, None).precision == "bf16",
                          "gradient_checkpointing": False, "train_sampling_strategy": "group_by_length"}}[mode]
    sft = SFTConfig(output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch,
                    learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.01,
                    max_length=args.max_length, logging_steps=10, save_strategy="no", eval_strategy="no",
                    report_to="none", seed=args.seed, use_cpu=True, dataloader_num_workers=0, **changes)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=args.lora_dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_list(rows("train")),
                         processing_class=tok, peft_config=lora)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its log lines; stdout is the JSON
        result = trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    settings = {"bf16": sft.bf16, "gradient_checkpointing": sft.gradient_checkpointing,
                "train_sampling_strategy": sft.train_sampling_strategy}
    if mode == "standard":
        return {"settings": settings, "measured_steps": result.global_step,
                "seconds_per_step": round(seconds / result.global_step, 1),
                "steps_per_epoch": -(-len(trainer.train_dataset) // args.batch)}
    model = trainer.model.eval()
    return {"settings": settings, "train_seconds": round(seconds, 1), "steps": result.global_step,
            "seconds_per_step": round(seconds / result.global_step, 2), "trained_tokens": tokens,
            "tokens_per_s": round(tokens * args.epochs / seconds, 1), "train_loss": round(result.training_loss, 4),
            **score(model, tok, files, args)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", choices=sorted(CORPORA), default="stdlib-docstrings",
                   help="stdlib-docstrings (code -> docstring sentence, the demo's) or debian-descriptions (this "
                   "machine's package descriptions -> their synopsis; prose)")
    p.add_argument("--train", type=int, default=320)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--test", type=int, default=60)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--val-answers", type=int, default=24, help="fmtune: validation rows answered per evaluation")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="both tools (fmtune's default for generation)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "fp32"], default="auto",
                   help="fmtune's train.precision, and expert TRL's bf16 with it: fp32 measures, on a CPU with native "
                   "bf16, what a CPU without it gets")
    p.add_argument("--trl-standard-steps", type=int, default=1,
                   help="steps of TRL's default recipe measured (bf16 autocast on a CPU without native bf16 takes "
                   "minutes per step)")
    p.add_argument("--skip", default="", help="comma-separated: fmtune, trl-standard, trl, trl-expert, masking, "
                   "packing (fmtune with train.packing)")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    hw = hardware.choose("auto", args.precision, None)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "hardware": hw.describe(), "torch": torch.__version__},
                     "settings": vars(args), "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = (args.train, args.val, args.test)
        files = (debian_descriptions(tmp / "data", sizes, args.seed) if args.corpus == "debian-descriptions"
                 else export(args.corpus, tmp / "data", sizes=sizes, seed=args.seed))
        log("pretrained (zero-shot)")
        model_cfg = config.from_dict({"model": {"name": "smollm2-135m", "max_length": args.max_length}}).model
        model, tokenizer, _ = causal_lm.create(model_cfg, Generation())
        results["runs"]["pretrained_zero_shot"] = score(model, tokenizer, files, args)
        del model
        plan = [("fmtune", "fmtune", lambda: run_fmtune(files, tmp / "fmtune", args)),
                ("trl-standard", "trl_sft_standard", lambda: run_trl(files, tmp / "trl0", args, "standard")),
                ("trl", "trl_sft_fp32", lambda: run_trl(files, tmp / "trl", args, "fp32")),
                ("trl-expert", "trl_sft_expert", lambda: run_trl(files, tmp / "trl2", args, "expert")),
                ("masking", "fmtune_train_on_prompt", lambda: run_fmtune(files, tmp / "fmtune-prompt", args, True)),
                ("packing", "fmtune_packed", lambda: run_fmtune(files, tmp / "fmtune-packed", args, packing=True))]
        for key, name, run in plan:
            if key in skip:
                continue
            log(name)
            results["runs"][name] = run()
            log(f"RESULT {name} {json.dumps(results['runs'][name])}")  # kept in the log if a later run fails
    runs = results["runs"]
    if "fmtune" not in runs:
        print(json.dumps(results, indent=2))
        return
    ours, bare = runs["fmtune"]["train_seconds"], runs["fmtune"]["train_seconds_without_validation"]
    # TRL's time has no validation in it; fmtune's validates (answers included) at step 0 and at the end
    steps = runs["fmtune"]["steps"]
    results["speedup"] = {k: {"train_seconds_with_fmtune_validation": round(v["train_seconds"] / ours, 2),
                              "train_seconds_without": round(v["train_seconds"] / bare, 2)}
                          for k, v in runs.items() if k.startswith("trl") and "train_seconds" in v}
    if "trl_sft_standard" in runs:  # measured seconds per step, against fmtune's seconds per step without validation
        results["speedup"]["trl_sft_standard"] = {
            "seconds_per_step": round(runs["trl_sft_standard"]["seconds_per_step"] / (bare / steps), 2)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
