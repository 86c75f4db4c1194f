"""Speed benchmark: fmtune against the Hugging Face Trainer, side by side in one run.

    .venv/bin/python bench/speed.py [--train 2000 --test 1000 --epochs 2] > result.json
    python bench/speed.py --model DIR --data DIR --skip image   # any HF text model, your own csv files

On a CUDA machine everything (both trainers, the FLOP/s step, the matmul ceiling) runs on the GPU.

Same model (MiniLM-L6 + fmtune's mean-pooling head, built once per run), same real data
(rotten-tomatoes, seeded split), same epochs, batch size, learning rate and schedule:

0. `reference`: per strategy (full, LoRA, last_n) and seed (--seeds), the Trainer as an expert sets it
   up (see expert_trainer) against fmtune's defaults, and fmtune with torch's dropout
   (train.fast_dropout false). `predict`: fmtune's Predictor (torch in its default precision and in fp32,
   and ONNX; and without the CPU's padding cut of dataset.inference_batches) against a transformers
   pipeline, as it comes, batched, and batched in bf16 where the hardware has it (median of 3 timings each).
1. Trainer, standard recipe (tokenised with padding to max_length, as run_glue does) vs
   Trainer with group_by_length + dynamic padding (its best setting) vs `fmtune train --strategy full`
   (defaults; and with precision forced to fp32, to separate the effect of the precision choice).
2. `head` and `last_n` (last 2 blocks) with and without the frozen-prefix cache: seconds per
   epoch after the first, and test accuracy; for `last_n` also the cache stored as fp32 instead
   of the default (fp16 under mixed precision), and the most the cache can give in FLOPs (it
   removes the frozen blocks' forward; the trained blocks' forward and backward remain).
3. EfficientNet-Lite0 on digits: full fine-tuning, and `head` with and without the cache.
4. EfficientNet-Lite0 on digits with the images decoded per batch, collated inline vs ahead in a
   background thread (train.loader_threads).
5. Model FLOP/s of a full fine-tuning step on a fixed-length batch against the matmul ceiling
   measured in the same run, and where the step's time goes (profiler): the matmuls' share bounds
   what any saving outside them can give (``--skip reference predict trainer strategies image
   loader`` runs this part alone, in a minute).

Prints one JSON document on stdout; progress goes to stderr.
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
import unittest.mock
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import fmtune  # noqa: E402
from fmtune.config import ModelConfig, TrainConfig  # noqa: E402
from fmtune.data import dataset  # noqa: E402
from fmtune.data.dataset import TextData  # noqa: E402
from fmtune.fsutil import read_jsonl  # noqa: E402
from fmtune.models import build  # noqa: E402
from fmtune.tasks import Classification  # noqa: E402
from fmtune.training import hardware  # noqa: E402
from fmtune.training.infer import infer  # noqa: E402
from fmtune.training.optim import make_optimizer  # noqa: E402
from fmtune.zoo.datasets import export  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def hf_trainer(files: dict, args: argparse.Namespace, group_by_length: bool, out: Path, bf16: bool = False) -> dict:
    """The Trainer on the same model and data; accuracy from its predictions on the test split."""
    import pandas as pd
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, default_data_collator

    task = Classification(sorted(pd.read_csv(files["train"])["label"].astype(str).unique()))
    torch.manual_seed(args.seed)
    bundle = build.create(ModelConfig(name=args.model, max_length=args.max_length), task)
    tok = bundle.tokenizer

    def encode(path: Path) -> list[dict]:
        df = pd.read_csv(path)
        enc = tok(df["text"].tolist(), truncation=True, max_length=args.max_length,
                  padding=False if group_by_length else "max_length")
        labels = [task.labels.index(str(y)) for y in df["label"]]
        return [{"input_ids": i, "attention_mask": m, "labels": y}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    train, test = encode(files["train"]), encode(files["test"])
    targs = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0.06,
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=50, save_strategy="no", eval_strategy="no",
        report_to=[], seed=args.seed, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        dataloader_num_workers=0, disable_tqdm=True, bf16=bf16)
    collator = DataCollatorWithPadding(tok) if group_by_length else default_data_collator
    trainer = Trainer(model=bundle.model, args=targs, train_dataset=train, data_collator=collator)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its logs; stdout is the JSON
        trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "samples_per_s": round(len(train) * args.epochs / seconds, 1),
            "test_accuracy": test_accuracy(bundle.model, test, tok, task)}


def test_accuracy(model: torch.nn.Module, test: list[dict], tok: object, task: Classification) -> float:
    """A Trainer's model scored by the same code as fmtune's runs (the same model class, eval mode,
    each example without its padding)."""
    ds = TextData([x["input_ids"][: sum(x["attention_mask"])] for x in test],
                  torch.tensor([x["labels"] for x in test]), tok.pad_token_id)
    logits, targets = infer(model, ds, 128)
    return round(task.metrics(logits, targets)["accuracy"], 4)


def fmtune_run(files: dict, model: str, out: Path, strategy: str, epochs: int, lr: float, batch_size: int,
               max_length: int | None = None, **train: object) -> dict:
    cfg = {"model": {"name": model}, "out": str(out), "strategy": {"name": strategy, "n": 2},
           "data": {"train": str(files["train"]), "val": str(files["val"]), "test": str(files["test"])},
           "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "patience": None, "min_steps": None,
                     **train}}  # min_steps off: the Trainer's batch size, as given
    if max_length:
        cfg["model"]["max_length"] = max_length
    if model == "efficientnet-lite0":
        cfg["model"]["image_size"] = 64
    os.environ["FMTUNE_CACHE_DIR"] = str(out / "feature-cache")  # this run's own: its fill time is read below
    t0 = time.perf_counter()
    s = fmtune.train(cfg, quiet=True)
    total = time.perf_counter() - t0
    metas = [json.loads(p.read_text()) for p in (out / "feature-cache").glob("*/meta.json")]
    evals = [e for e in read_jsonl(out / "metrics.jsonl") if e.get("type") == "eval"]
    epoch_ends = [e["seconds"] for e in evals if e["step"] > 0 and float(e["epoch"]).is_integer()]  # not step 0
    per_epoch = np.diff(epoch_ends).tolist()  # seconds per epoch after the first (evaluation included)
    init = s.get("head_init", {}).get("seconds", 0.0)  # the probe the head starts from: solved before the fit
    fit = json.loads((out / "run.json").read_text())["fit"]
    return {"train_seconds": round(s["seconds"] + init, 2), "head_init_seconds": init,
            "wall_seconds_incl_setup_and_test": round(total, 2),
            "first_epoch_seconds": round(epoch_ends[0], 3),
            "later_epoch_seconds": round(float(np.mean(per_epoch)), 4) if per_epoch else None,
            "samples_per_s": fit["samples_per_s"], "best_val": fit["best"],
            "batch_size": yaml.safe_load((out / "config.yaml").read_text())["train"]["batch_size"],  # as trained
            "test_accuracy": round(s["eval"]["test"]["accuracy"], 4),
            **({"cache_fill_seconds": round(sum(m["seconds"] for m in metas), 3),
                "cache_mib": round(sum(p.stat().st_size for p in (out / "feature-cache").rglob("*.npy")) / 2**20, 1),
                "cache_stored_as": sorted({m["stored_as"] for m in metas})} if metas else {})}


def expert_trainer(files: dict, args: argparse.Namespace, strategy: str, seed: int, out: Path) -> dict:
    """The Trainer configured as an expert would for ``strategy``: dynamic padding, group_by_length, bf16
    where the hardware runs it natively, its fused AdamW with fmtune's parameter groups (the same body
    and head learning rates, no decay on biases and norms), linear schedule with the same warm-up, no
    evaluation or checkpoints while training (its fastest). lora: peft's LoraConfig with fmtune's
    defaults for BERT (r 8, alpha 16, dropout 0.1, query/value, the head's linear layer trained);
    last_n: everything frozen but the last 2 blocks and the head."""
    import pandas as pd
    import peft
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from fmtune.adapters import HEAD_LAYER, TARGETS
    from fmtune.config import DEFAULT_LR
    from fmtune.strategies import backbone_blocks

    task = Classification(sorted(pd.read_csv(files["train"])["label"].astype(str).unique()))
    torch.manual_seed(seed)
    bundle = build.create(ModelConfig(name=args.model, max_length=args.max_length), task)
    model, tok = bundle.model, bundle.tokenizer
    if strategy == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                           target_modules=TARGETS["bert"][0],
                                                           modules_to_save=[HEAD_LAYER]))
    elif strategy == "last_n":
        model.requires_grad_(False)
        for block in backbone_blocks(model.backbone)[-2:]:
            block.requires_grad_(True)
        model.head.requires_grad_(True)

    def encode(path: Path) -> list[dict]:
        df = pd.read_csv(path)
        enc = tok(df["text"].tolist(), truncation=True, max_length=args.max_length)
        return [{"input_ids": i, "attention_mask": m, "labels": task.labels.index(str(y))}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], df["label"])]

    train, test = encode(files["train"]), encode(files["test"])
    lr = DEFAULT_LR[strategy]
    targs = TrainingArguments(
        output_dir=str(out), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, warmup_steps=0.06, lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=50,
        save_strategy="no", eval_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
        train_sampling_strategy="group_by_length", dataloader_num_workers=0, disable_tqdm=True,
        bf16=hardware.choose().precision == "bf16")
    optimizer = make_optimizer(model, TrainConfig(lr=lr, weight_decay=0.01))
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                      optimizers=(optimizer, None))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 2), "samples_per_s": round(len(train) * args.epochs / seconds, 1),
            "test_accuracy": test_accuracy(trainer.model, test, tok, task)}


def reference_rows(files: dict, args: argparse.Namespace, work: Path) -> dict:
    """Per strategy and seed: the expert Trainer, fmtune with its defaults, and fmtune with torch's
    dropout (train.fast_dropout false) to show what the CPU dropout gives."""
    from fmtune.config import DEFAULT_LR

    # one untimed run of each first: the first training in a process pays one-time set-up (kernels, imports)
    log("warm-up: one short run of each")
    small = export("rotten-tomatoes", work / "warm", sizes=(64, 32, 32), seed=0)
    expert_trainer(small, argparse.Namespace(**{**vars(args), "epochs": 1}), "full", 0, work / "warm-hf")
    fmtune_run(small, args.model, work / "warm-ft", "full", 1, 5e-5, args.batch_size, args.max_length)
    res: dict = {}
    for strategy in args.strategies:
        rows: dict = {"trainer_expert": [], "fmtune": [], "fmtune_torch_dropout": []}
        for seed in args.seeds:
            tag = f"{strategy}-s{seed}"
            log(f"{strategy}, seed {seed}: Trainer (expert)")
            rows["trainer_expert"].append(expert_trainer(files, args, strategy, seed, work / f"hf-{tag}"))
            for name, fast in (("fmtune", True), ("fmtune_torch_dropout", False)):
                log(f"{strategy}, seed {seed}: {name}")
                run = fmtune_run(files, args.model, work / f"{name}-{tag}", strategy, args.epochs,
                                 DEFAULT_LR[strategy], args.batch_size, args.max_length, seed=seed,
                                 fast_dropout=fast)
                evals = [e for e in read_jsonl(work / f"{name}-{tag}" / "metrics.jsonl") if e.get("type") == "eval"]
                run["train_seconds_without_validation"] = round(
                    run["train_seconds"] - sum(e["eval_seconds"] for e in evals), 2)
                rows[name].append(run)
        summary = {}
        for name, runs in rows.items():
            secs = [r.get("seconds", r.get("train_seconds")) for r in runs]
            accs = [r["test_accuracy"] for r in runs]
            summary[name] = {"seconds_mean": round(float(np.mean(secs)), 2),
                             "accuracy_mean": round(float(np.mean(accs)), 4),
                             "accuracy_std": round(float(np.std(accs)), 4)}
        ref = summary["trainer_expert"]["seconds_mean"]
        for name in ("fmtune", "fmtune_torch_dropout"):
            summary[name]["speedup_vs_trainer_expert"] = round(ref / summary[name]["seconds_mean"], 2)
            no_val = float(np.mean([r["train_seconds_without_validation"] for r in rows[name]]))
            summary[name]["speedup_vs_trainer_expert_without_validation"] = round(ref / no_val, 2)
        res[strategy] = {"runs": rows, "summary": summary}
    return res


def predict_rows(files: dict, args: argparse.Namespace, work: Path) -> dict:
    """Prediction throughput on the test texts: fmtune's Predictor (the run's model, length-sorted
    batches; torch, and the ONNX export through onnxruntime) against a transformers pipeline on the
    same model exported as a Hugging Face folder, its default (one text at a time) and batched
    (batch_size 64)."""
    import pandas as pd
    from transformers import pipeline

    from fmtune.exporter import export
    from fmtune.predictor import load

    run = work / "predict-run"
    fmtune_run(files, args.model, run, "head", 1, 1e-3, args.batch_size, args.max_length)
    folder = Path(export(run, quiet=True)["out"])
    texts = pd.read_csv(files["test"])["text"].astype(str).tolist()
    torch.set_num_threads(hardware.choose().threads)
    res: dict = {"texts": len(texts), "repeats": 3}

    def timed(call) -> tuple[dict, object]:
        """Median of 3 timings (this machine is shared: one timing moves by 10 %), and the last output."""
        secs = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = call()
            secs.append(time.perf_counter() - t0)
        return {"seconds": round(float(np.median(secs)), 3), "all_seconds": [round(x, 3) for x in secs]}, out

    for name, backend, cut, precision in (("fmtune_predictor", "torch", True, None),
                                          ("fmtune_predictor_onnx", "onnx", True, None),
                                          ("fmtune_predictor_fp32", "torch", True, "fp32"),
                                          ("fmtune_predictor_no_padding_cut", "torch", False, None)):
        pred = load(run, backend=backend, precision=precision)
        res.setdefault("fmtune_predictor_precision", pred.metadata()["precision"])  # (the first: the default)
        pred.predict(texts[:64])  # warm-up
        with contextlib.ExitStack() as stack:
            if not cut:  # batches of 128 sorted by length, as before 2026-12-04 (dataset.inference_batches)
                stack.enter_context(unittest.mock.patch.object(dataset, "INFER_MIN_TOKENS", None))
            res[name], out = timed(lambda p=pred: [r["label"] for r in p.predict(texts)])
        if name == "fmtune_predictor":
            ours = out
        else:
            res[name]["same_label_as_fmtune"] = round(float(np.mean([a == b for a, b in zip(out, ours)])), 4)
    res["padding_cut_speedup"] = round(res["fmtune_predictor_no_padding_cut"]["seconds"]
                                       / res["fmtune_predictor"]["seconds"], 2)
    # the pipeline as it comes, batched, and batched in bf16 as an expert would run it where the CPU has AMX (or a
    # GPU: bf16 there) (the folder's weights are fp32; dtype casts them as they load)
    device = hardware.choose().device
    bf16 = device == "cuda" or hardware.inference_autocast("auto", device) is not None
    for name, batch, dtype in (("pipeline_default", None, None), ("pipeline_batch_64", 64, None),
                               *((("pipeline_batch_64_bf16", 64, torch.bfloat16),) if bf16 else ())):
        pipe = pipeline("text-classification", model=str(folder), trust_remote_code=True,
                        device=device, **({"dtype": dtype} if dtype else {}))
        kw = {"truncation": True, "max_length": args.max_length, **({"batch_size": batch} if batch else {})}
        pipe(texts[:64], **kw)
        res[name], out = timed(lambda p=pipe, kw=kw: p(texts, **kw))
        res[name]["same_label_as_fmtune"] = round(float(np.mean([o["label"] == y for o, y in zip(out, ours)])), 4)
    pipes = [k for k in ("pipeline_default", "pipeline_batch_64", "pipeline_batch_64_bf16") if k in res]
    for ours_name in ("fmtune_predictor", "fmtune_predictor_onnx", "fmtune_predictor_fp32"):
        for name in pipes:
            res[f"{ours_name}_speedup_vs_{name}"] = round(res[name]["seconds"] / res[ours_name]["seconds"], 2)
    for r in ("fmtune_predictor", "fmtune_predictor_onnx", "fmtune_predictor_fp32", "fmtune_predictor_no_padding_cut",
              *pipes):
        res[r]["texts_per_s"] = round(len(texts) / res[r]["seconds"], 1)
    return res


def backbone_depth(model: str) -> int:
    from fmtune.strategies import backbone_blocks

    bundle = build.create(ModelConfig(name=model), Classification(["a", "b"]))
    return len(backbone_blocks(bundle.model.backbone))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_ceiling(dtype: torch.dtype, device: str, reps: int = 10, trials: int = 5) -> float:
    """Best FLOP/s of large square matmuls and of the model's own GEMM shapes (tokens x 384 x 1536)."""
    best = 0.0
    big = 8192 if device == "cuda" else 2048
    for m, k, n in ((big, big, big), (4096, 384, 1536), (4096, 1536, 384)):
        a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
        for _ in range(3):
            a @ b
        for _ in range(trials):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def op_shares(step, device: str, steps: int = 3) -> dict:
    """Where a training step's time goes (torch.profiler, self time per op; CUDA: device time): the
    matmuls' share, and so the most that removing everything else could speed the step up."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    ops = {e.key: getattr(e, key) for e in prof.key_averages()}
    total = sum(ops.values())
    share = sum(v for k, v in ops.items() if k in MATMUL_OPS) / total
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {"matmul_share": round(share, 3), "speedup_bound_if_only_matmuls_remained": round(1 / share, 2),
            "top_ops_share": {k: round(v / total, 3) for k, v in top}}


def step_flops(args: argparse.Namespace, device: str) -> dict:
    """Achieved model FLOP/s of a full fine-tuning step (fixed length) vs the matmul ceiling, and
    (bf16, with fmtune's CPU dropout as in training) the share of the step spent in matmuls, at
    128 tokens and at 32 (about the length of the bench's sentences)."""
    from fmtune.training.dropout import fast_dropout

    task = Classification(["a", "b"])
    bundle = build.create(ModelConfig(name=args.model, max_length=128), task)
    model = bundle.model.to(device)
    cfg = model.config
    b = args.batch_size
    opt = make_optimizer(model, TrainConfig(lr=1e-5))  # fmtune's own (fused AdamW)
    dense = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embeddings" not in n)

    def batch(t: int):
        ids = torch.randint(1000, 20000, (b, t), device=device)
        return ids, torch.ones_like(ids), torch.randint(0, 2, (b,), device=device)

    def step(tensors, dtype) -> None:
        ids, mask, labels = tensors
        with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = task.loss(model(input_ids=ids, attention_mask=mask).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = 128
    tensors = batch(t)
    # 6 * dense params * tokens (forward + backward) + attention scores and values: 12 * L * B * T^2 * H
    flops = 6 * dense * b * t + 12 * cfg.num_hidden_layers * b * t * t * cfg.hidden_size
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.train()
        times = []
        for i in range(6 if device == "cpu" else 30):
            sync(device)
            t0 = time.perf_counter()
            step(tensors, dtype)
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        achieved = flops / float(np.median(times))
        ceiling = matmul_ceiling(torch.float32 if dtype is None else torch.bfloat16, device)
        out[name] = {"step_seconds": round(float(np.median(times)), 3), "model_gflops": round(achieved / 1e9, 1),
                     "matmul_ceiling_gflops": round(ceiling / 1e9, 1),
                     "fraction_of_ceiling": round(achieved / ceiling, 3)}
    precision = torch.bfloat16 if hardware.choose().precision == "bf16" else None
    with fast_dropout(model, device == "cpu"):
        for length in (128, 32):
            short = batch(length)
            step(short, precision)  # warm-up at this shape
            out[f"where_the_time_goes_{length}_tokens"] = op_shares(lambda s=short: step(s, precision), device)
    out["batch"] = [b, t]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=2000, help="training examples (rotten-tomatoes)")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="training seed of both trainers (the data split stays seed 0)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=128, help="run_glue's default max_seq_length")
    p.add_argument("--model", default="minilm-l6", help="text model: zoo name or Hugging Face folder")
    p.add_argument("--data", type=Path, help="folder with train.csv, val.csv, test.csv (text,label) "
                   "instead of the rotten-tomatoes split")
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["reference", "predict", "trainer", "strategies", "image", "loader", "flops"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="reference section: training seeds")
    p.add_argument("--strategies", nargs="+", default=["full", "lora", "last_n"], choices=["full", "lora", "last_n"],
                   help="reference section: strategies measured against the expert Trainer")
    args = p.parse_args()
    hw = hardware.choose()
    gpu = torch.cuda.get_device_name() if hw.device == "cuda" else None
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "gpu": gpu, "threads": hw.threads,
                                "fmtune_default": hw.describe(), "torch": torch.__version__},
                    "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    work = Path(tempfile.mkdtemp(prefix="fmtune-bench-"))
    os.environ.setdefault("FMTUNE_CACHE_DIR", str(work / "cache"))
    if args.data:
        text = {k: args.data / f"{k}.csv" for k in ("train", "val", "test")}
    else:
        text = export("rotten-tomatoes", work / "rt", sizes=(args.train, args.val, args.test), seed=0)
    common = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "max_length": args.max_length,
              "seed": args.seed}

    if "reference" not in args.skip:
        result["reference_expert_trainer"] = reference_rows(text, args, work)
    if "predict" not in args.skip:
        log("predict: fmtune's Predictor against a transformers pipeline")
        result["predict"] = predict_rows(text, args, work)
    if "trainer" not in args.skip:
        log("HF Trainer, padding to max_length")
        std = hf_trainer(text, args, False, work / "hf-std")
        log("HF Trainer, group_by_length + dynamic padding")
        grouped = hf_trainer(text, args, True, work / "hf-grouped")
        if hw.precision == "bf16":  # give the Trainer the precision fmtune picks on this hardware too
            log("HF Trainer, group_by_length + dynamic padding + bf16")
            result["hf_trainer_group_by_length_bf16"] = hf_trainer(text, args, True, work / "hf-grouped-bf16", True)
        log("fmtune full (defaults)")
        ours = fmtune_run(text, args.model, work / "ft-full", "full", **common)
        log("fmtune full (fp32)")
        ours32 = fmtune_run(text, args.model, work / "ft-full32", "full", precision="fp32", **common)
        result["full_finetuning"] = {
            "hf_trainer_padded_to_max_length": std, "hf_trainer_group_by_length": grouped,
            "fmtune_full": ours, "fmtune_full_fp32": ours32,
            "speedup_vs_trainer_standard": round(std["seconds"] / ours["train_seconds"], 2),
            "speedup_vs_trainer_grouped": round(grouped["seconds"] / ours["train_seconds"], 2),
            "speedup_fp32_vs_trainer_standard": round(std["seconds"] / ours32["train_seconds"], 2),
            "accuracy_delta_points_vs_trainer_standard": round(100 * (ours["test_accuracy"] - std["test_accuracy"]), 2),
        }
    if "strategies" not in args.skip:
        res = {}
        for strategy, lr in (("head", 1e-3), ("last_n", 1e-4)):
            for mode in ("off", "auto") if strategy == "head" else ("off", "auto", "fp32"):
                log(f"fmtune {strategy}, feature cache {mode}")
                res[f"{strategy}_cache_{mode}"] = fmtune_run(
                    text, args.model, work / f"{strategy}-{mode}", strategy, max(3, args.epochs), lr,
                    args.batch_size, args.max_length, feature_cache=mode, head_lr=1e-3)
            off, on = res[f"{strategy}_cache_off"], res[f"{strategy}_cache_auto"]
            res[f"{strategy}_later_epoch_speedup"] = round(off["later_epoch_seconds"] / on["later_epoch_seconds"], 1)
        # What the cache removes is the frozen blocks' forward pass; the trained blocks' forward and
        # backward (about 3 forwards each) remain. In FLOPs the most it can give is (k + 3n) / 3n for k
        # frozen and n trained blocks of equal size (the head, embeddings and validation aside).
        k, n = backbone_depth(args.model) - 2, 2
        res["last_n_frozen_and_trained_blocks"] = [k, n]
        res["last_n_flops_bound"] = round((k + 3 * n) / (3 * n), 2)
        result["text_strategies"] = res
    if "image" not in args.skip:
        digits = export("digits", work / "digits", sizes=(1200, 200, 397), seed=0)
        res = {}
        log("fmtune EfficientNet-Lite0 full")
        res["full"] = fmtune_run(digits, "efficientnet-lite0", work / "img-full", "full", 3, 2e-3, 32)
        for mode in ("off", "auto"):
            log(f"fmtune EfficientNet-Lite0 head, cache {mode}")
            res[f"head_cache_{mode}"] = fmtune_run(digits, "efficientnet-lite0", work / f"img-head-{mode}", "head", 4,
                                                   1e-3, 32, feature_cache=mode, head_lr=1e-2)
        res["head_later_epoch_speedup"] = round(res["head_cache_off"]["later_epoch_seconds"]
                                                / res["head_cache_auto"]["later_epoch_seconds"], 1)
        result["image"] = res
    if "loader" not in args.skip:
        # Images decoded per batch (what a dataset too large to hold decoded gets), collated inline
        # vs ahead in a background thread: same batches, so the same accuracy; only the time differs.
        from fmtune.data import dataset as dataset_mod

        digits = export("digits", work / "digits", sizes=(1200, 200, 397), seed=0)
        eager, dataset_mod.EAGER_IMAGE_BYTES = dataset_mod.EAGER_IMAGE_BYTES, 0
        res = {}
        try:
            for threads in (0, None):
                name = "inline" if threads == 0 else "background_thread"
                log(f"fmtune EfficientNet-Lite0 full, images decoded per batch, collated {name}")
                res[name] = fmtune_run(digits, "efficientnet-lite0", work / f"img-lazy-{name}", "full", 2, 2e-3, 32,
                                       loader_threads=threads)
        finally:
            dataset_mod.EAGER_IMAGE_BYTES = eager
        res["speedup"] = round(res["inline"]["train_seconds"] / res["background_thread"]["train_seconds"], 2)
        result["image_decoded_per_batch"] = res
    if "flops" not in args.skip:
        log("full fine-tuning step FLOP/s")
        result["full_step_flops"] = step_flops(args, hw.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
