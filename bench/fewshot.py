"""Few labels: fmtune (--strategy contrastive, and the linear probe) against the real SetFit library,
same all-MiniLM-L6-v2 weights (the local package), same samples, same seeds.

    make bench-fewshot        # installs setfit (+ datasets, evaluate) into .venv, then runs:
    .venv/bin/python bench/fewshot.py [--sizes 8,16,64 --seeds 5 --seeds-64 3] > result.json

Data: `fmtune datasets --export` of rotten-tomatoes (2 classes) and tweet-sentiment (3 classes),
split seed 0; `--datasets stdlib-modules` is a many-class set built here (24 classes: docstring
summary -> its standard-library module; see stdlib_modules), `--datasets package-modules` one with
150 (summary -> its module in the installed packages; see package_modules; package-modules-40: 40
of them). For every dataset, size (rows per
class) and seed, the rows are drawn from the training split (seeded, class-balanced) and both
tools train on exactly them; both are scored on the same test rows (--test-rows, drawn once).
Times are in this process, after the imports: `train_s` is loading the pretrained model +
training (fmtune: the whole `fmtune.train` with the run directory written; SetFit:
`SetFitModel.from_pretrained` + `Trainer.train`); predicting the test rows is timed apart. Both
run one after the other on the same cores.

SetFit runs with its defaults (batch 16, one epoch, body lr 2e-5, its "oversampling" pairs, the
logistic-regression head), except at sizes >= --iterations-from (64) where its default draws
every pair (tens of thousands: ~10x the time of the rest of the bench on 2 cores), so it gets
num_iterations=20, the SetFit paper's recipe; the output says which. fmtune runs with its
defaults for `--strategy contrastive` and for `--strategy head`.

--selftrain N: also 8 rows per class of rotten-tomatoes + --pool unlabelled training rows,
self-training (--unlabeled) against the same run without, for N seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

DATASETS = ("rotten-tomatoes", "tweet-sentiment")
MANY_CLASSES = "stdlib-modules"  # built by stdlib_modules below; not a zoo dataset
PACKAGE_MODULES = "package-modules"  # built by package_modules below (150 classes); not a zoo dataset


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def stats(values: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(values, dtype=float)
    return {"mean": round(float(a.mean()), 4), "std": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
            "n": len(a)}


def stdlib_modules(folder: Path) -> tuple:
    """A many-class set (--datasets stdlib-modules): the one-line docstring summaries of the offline
    stdlib-docstrings export, labelled with their top-level module (asyncio, email, logging ...),
    for the modules with at least 32 distinct summaries (24 on Python 3.11); a summary found in two
    places is dropped. Half of each module's rows (seeded) are the pool the samples are drawn from,
    the other half are the test rows."""
    import pandas as pd

    from fmtune.zoo.datasets import export

    files = export("stdlib-docstrings", folder, seed=0)
    rows = pd.concat([pd.read_json(files[k], lines=True) for k in ("train", "val", "test")])
    df = pd.DataFrame({"text": rows["summary"].astype(str).str.strip(),
                       "label": rows["module"].astype(str).str.split(".").str[0]})
    df = df.drop_duplicates("text", keep=False)
    counts = df["label"].value_counts()
    df = df[df["label"].isin(counts[counts >= 32].index)].reset_index(drop=True)
    pool = df.groupby("label", group_keys=False).sample(frac=0.5, random_state=0)
    return pool.reset_index(drop=True), df.drop(pool.index).reset_index(drop=True)


def package_modules(folder: Path, classes: int = 150, min_rows: int = 24) -> tuple:
    """A set with 150 classes (--datasets package-modules): the one-line docstring summaries of the
    functions and classes of the Python packages installed beside fmtune (numpy, scipy, pandas,
    scikit-learn, torch, transformers, matplotlib ...; read from their source, nothing imported),
    labelled with their module down to two levels (``scipy.stats``, ``torch.optim``). Of the modules
    with at least ``min_rows`` distinct summaries (--min-module-rows), ``classes`` are drawn (seed
    0); half of each module's rows are the pool, and up to 1,200 / ``classes`` (at least 8) of the
    other half per module the test rows (class-balanced, so the large modules do not make up the
    test). Which packages are installed decides the classes: the output records them."""
    import ast
    import sysconfig

    import pandas as pd

    from fmtune.zoo.datasets import _first_sentence

    test_per_class = max(8, -(-1200 // classes))
    cached = folder / "package-modules.csv"  # reading every installed package takes minutes
    if cached.exists():
        return _pool_and_test(pd.read_csv(cached), classes, min_rows, test_per_class)
    root = Path(sysconfig.get_paths()["purelib"])
    rows = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = rel.with_suffix("").parts
        if len(parts) < 2 or any(p.startswith(("test", "_")) or "dist-info" in p or p == "__init__" for p in parts[:2]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node, clean=True)
                summary = _first_sentence(doc) if doc else ""
                if summary and 3 <= len(summary.split()) <= 40:
                    rows.append({"text": summary, "label": ".".join(parts[:2])})
    df = pd.DataFrame(rows).drop_duplicates("text", keep=False)
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(cached, index=False)
    return _pool_and_test(df, classes, min_rows, test_per_class)


def _pool_and_test(df, classes: int, min_rows: int, test_per_class: int) -> tuple:
    import numpy as np

    counts = df["label"].value_counts()
    keep = counts[counts >= min_rows].index.tolist()
    keep = sorted(np.random.default_rng(0).choice(sorted(keep), min(classes, len(keep)), replace=False).tolist())
    df = df[df["label"].isin(keep)].reset_index(drop=True)
    pool = df.groupby("label", group_keys=False).sample(frac=0.5, random_state=0)
    rest = df.drop(pool.index)
    test = rest.sample(frac=1.0, random_state=0).groupby("label").head(test_per_class)
    return pool.reset_index(drop=True), test.reset_index(drop=True)


def run_setfit(train, test, seed: int, iterations: int | None, out: Path) -> dict:
    import numpy as np
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from fmtune.zoo.models import resolve

    labels = sorted(train["label"].astype(str).unique())
    index = {k: i for i, k in enumerate(labels)}
    ds = Dataset.from_dict({"text": train["text"].astype(str).tolist(),
                            "label": [index[k] for k in train["label"].astype(str)]})
    started = time.perf_counter()
    model = SetFitModel.from_pretrained(str(resolve("minilm-l6")[1]))
    kw = {"num_iterations": iterations} if iterations else {}
    args = TrainingArguments(output_dir=str(out), batch_size=16, num_epochs=1, seed=seed, report_to="none", **kw)
    Trainer(model=model, args=args, train_dataset=ds).train()
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    pred = np.asarray(model.predict(test["text"].astype(str).tolist()))
    predict_s = time.perf_counter() - started
    truth = np.array([index.get(k, -1) for k in test["label"].astype(str)])
    return {"accuracy": float((pred == truth).mean()), "train_s": round(train_s, 2), "predict_s": round(predict_s, 2)}


def setfit_version(tools: str) -> str | None:
    """SetFit's version, when it runs (it is installed for the bench only)."""
    if "setfit" not in tools.split(","):
        return None
    import setfit

    return setfit.__version__


def run_fmtune(train_csv: Path, test_csv: Path, out: Path, seed: int, strategy: str, **extra) -> dict:
    import fmtune

    cfg = {"model": {"name": "minilm-l6"}, "strategy": {"name": strategy},
           "data": {"train": str(train_csv), **extra}, "out": str(out), "train": {"seed": seed}}
    started = time.perf_counter()
    fmtune.train(cfg, overwrite=True, quiet=True, report=False)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    ev = fmtune.api.evaluate(out, test_csv, quiet=True)
    predict_s = time.perf_counter() - started
    res = {"accuracy": ev["test"]["accuracy"], "train_s": round(train_s, 2), "predict_s": round(predict_s, 2)}
    info = json.loads((out / "run.json").read_text())
    if "contrastive" in info.get("few_labels", {}):
        c = info["few_labels"]["contrastive"]
        res["contrastive"] = {k: c[k] for k in ("steps", "rows_per_step", "pairs_seen", "seconds")}
    return res


def main() -> None:
    import contextlib

    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the trainers print as they go; stdout is the JSON alone
        result = bench()
    print(json.dumps(result, indent=2), file=real_stdout)


def bench() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,16,64", help="rows per class")
    ap.add_argument("--seeds", type=int, default=5, help="seeds (samples) per size")
    ap.add_argument("--first-seed", type=int, default=0,
                    help="the first seed: --first-seed 5 --seeds 5 draws samples 5-9, new ones beside a run of 0-4")
    ap.add_argument("--tools", default="setfit,contrastive,head",
                    help="which to run: setfit, contrastive (fmtune's), head (fmtune's probe), full (fmtune's "
                    "full fine-tuning with its few-label defaults)")
    ap.add_argument("--seeds-64", type=int, default=3, help="seeds at sizes >= --iterations-from")
    ap.add_argument("--iterations-from", type=int, default=64)
    ap.add_argument("--test-rows", type=int, default=1000)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--min-module-rows", type=int, default=24,
                    help="package-modules: draw the classes from modules with at least this many distinct summaries "
                    "(140: every class has 64 rows to sample and a test half)")
    ap.add_argument("--selftrain", type=int, default=0, help="seeds of the self-training comparison (0: none)")
    ap.add_argument("--pool", type=int, default=2000, help="unlabelled rows for self-training")
    ap.add_argument("--out", help="working folder (default: a temporary one)")
    a = ap.parse_args()

    import pandas as pd
    import torch

    import fmtune
    from fmtune.transfer import per_class
    from fmtune.zoo.datasets import export

    work = Path(a.out or tempfile.mkdtemp(prefix="fmtune-fewshot-bench-"))
    result = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "python": platform.python_version(), "versions": {"fmtune": fmtune.__version__,
                                                                "setfit": setfit_version(a.tools),
                                                                "torch": torch.__version__},
              "test_rows": a.test_rows, "results": {}}
    sizes = [int(s) for s in a.sizes.split(",")]
    def data(name: str) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
        """The export's training rows, and --test-rows of its test rows (drawn once) and their file."""
        if name == MANY_CLASSES:
            train, test = stdlib_modules(work / "data" / name)
        elif name.startswith(PACKAGE_MODULES):  # package-modules-40: 40 of its classes
            classes = int(name.removeprefix(PACKAGE_MODULES).strip("-") or 150)
            train, test = package_modules(work / "data" / PACKAGE_MODULES, classes, a.min_module_rows)
            result.setdefault(name, {"classes": sorted(train["label"].unique()), "pool_rows": len(train),
                                     "pool_rows_per_class_median": float(train["label"].value_counts().median()),
                                     "min_module_rows": a.min_module_rows, "test_rows": len(test)})
        else:
            files = export(name, work / "data" / name, seed=0)
            train, test = pd.read_csv(files["train"]), pd.read_csv(files["test"])
        test = test.sample(min(a.test_rows, len(test)), random_state=0)
        (work / "data" / name).mkdir(parents=True, exist_ok=True)
        test_csv = work / "data" / name / f"test-{len(test)}.csv"
        test.to_csv(test_csv, index=False)
        return train, test, test_csv

    for name in a.datasets.split(","):
        train_all, test, test_csv = data(name)
        for size in sizes:
            big = size >= a.iterations_from
            iterations = 20 if big else None
            rows: dict[str, list[dict]] = {t: [] for t in ("setfit", "fmtune contrastive", "fmtune head", "fmtune full")
                                           if t.split()[-1] in a.tools.split(",")}
            seeds = list(range(a.first_seed, a.first_seed + (a.seeds_64 if big else a.seeds)))
            for seed in seeds:
                train = per_class(train_all, "label", size, seed)
                train_csv = work / "data" / name / f"train-{size}-{seed}.csv"
                train.to_csv(train_csv, index=False)
                for tool in rows:
                    log(f"{name} {size}/class seed {seed}: {tool} ...")
                    if tool == "setfit":
                        rows[tool].append(run_setfit(train, test, seed, iterations, work / "setfit-checkpoints"))
                    else:
                        strategy = tool.split()[-1]
                        rows[tool].append(run_fmtune(train_csv, test_csv, work / "runs" / strategy, seed, strategy))
                    log(f"  {rows[tool][-1]}")
            entry = {tool: {"accuracy": stats([r["accuracy"] for r in runs]),
                            "train_s": stats([r["train_s"] for r in runs]), "runs": runs}
                     for tool, runs in rows.items()}
            entry["seeds"] = seeds
            entry["sample_rows_per_class_median"] = float(train["label"].value_counts().median())  # the last seed's
            if "setfit" in rows and "fmtune contrastive" in rows:
                entry["fmtune contrastive minus setfit"] = stats([c["accuracy"] - s["accuracy"] for c, s in
                                                                  zip(rows["fmtune contrastive"], rows["setfit"])])
            if "setfit" in rows:
                entry["setfit"]["recipe"] = (f"num_iterations={iterations}" if iterations else
                                             "defaults (oversampling of every pair)")
            result["results"][f"{name} {size}/class"] = entry
            log("RESULT " + json.dumps({f"{name} {size}/class": entry}))  # kept if the bench is stopped later
            log(f"{name} {size}/class: " + ", ".join(
                f"{t} {entry[t]['accuracy']['mean']:.3f} +- {entry[t]['accuracy']['std']:.3f} "
                f"in {entry[t]['train_s']['mean']:.1f}s" for t in rows))
    if a.selftrain:
        name = "rotten-tomatoes"
        train_all, _, test_csv = data(name)
        plain, selft = [], []
        for seed in range(a.selftrain):
            train = per_class(train_all, "label", 8, seed)
            pool = train_all.drop(train.index).sample(a.pool, random_state=seed)
            train_csv, pool_csv = work / "data" / f"st-train-{seed}.csv", work / "data" / f"st-pool-{seed}.csv"
            train.to_csv(train_csv, index=False)
            pool.to_csv(pool_csv, index=False)  # its labels only count the right pseudo-labels
            log(f"self-training seed {seed} ...")
            plain.append(run_fmtune(train_csv, test_csv, work / "runs" / "p", seed, "contrastive"))
            selft.append(run_fmtune_selftrain(train_csv, pool_csv, test_csv, work / "runs" / "s", seed))
            log(f"  without {plain[-1]['accuracy']}, with {selft[-1]['accuracy']}")
        result["selftrain"] = {"data": f"{name} 8/class + {a.pool} unlabelled training rows",
                               "without": {"accuracy": stats([r["accuracy"] for r in plain]), "runs": plain},
                               "with": {"accuracy": stats([r["accuracy"] for r in selft]), "runs": selft}}
    return result


def run_fmtune_selftrain(train_csv: Path, pool_csv: Path, test_csv: Path, out: Path, seed: int) -> dict:
    import fmtune

    cfg = {"model": {"name": "minilm-l6"}, "strategy": {"name": "contrastive"},
           "data": {"train": str(train_csv), "test": str(test_csv)}, "semi": {"unlabeled": str(pool_csv)},
           "out": str(out), "train": {"seed": seed}}
    started = time.perf_counter()
    summary = fmtune.train(cfg, overwrite=True, quiet=True, report=False)
    return {"accuracy": summary["eval"]["test"]["accuracy"], "train_s": round(time.perf_counter() - started, 2),
            "rounds": [{k: r.get(k) for k in ("round", "pseudo_labelled", "pseudo_right", "test")}
                       for r in summary["selftrain"]["rounds"]]}


if __name__ == "__main__":
    main()
