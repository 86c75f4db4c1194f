"""Few labels: do the class names help as training rows? A validation study (not a default of
fmtune; see the result).

    .venv/bin/python bench/fewshot_label_names.py [--size 8 --datasets ...] > result.json

For every dataset and seed (10-14: validation samples, apart from bench/fewshot.py's 0-9), --size
rows per class are drawn from the training split and fmtune `--strategy contrastive` (its defaults,
all-MiniLM-L6-v2) trains twice: on those rows, and on those rows plus one row per class whose text
is the class name ("fresh", "negative", "asyncio"; underscores as spaces), which then takes part
in both the pair training and the head. Both are scored on 600 other rows of the training split
(seeded), so the test rows stay untouched. The output has both accuracies per seed and the paired
difference (mean and standard error).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fewshot as fb  # noqa: E402  (bench/fewshot.py: its data and its fmtune runner)


def main() -> None:
    import contextlib

    import numpy as np
    import pandas as pd

    from fmtune.transfer import per_class
    from fmtune.zoo.datasets import export

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8, help="rows per class")
    ap.add_argument("--seeds", default="10,11,12,13,14")
    ap.add_argument("--datasets", default="rotten-tomatoes,tweet-sentiment,stdlib-modules")
    ap.add_argument("--score-rows", type=int, default=600)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fmtune-label-names-"))
    result: dict = {"size": a.size, "score_rows": a.score_rows, "results": {}}
    real_stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        for name in a.datasets.split(","):
            if name == fb.MANY_CLASSES:
                train_all, _ = fb.stdlib_modules(work / name)
            else:
                train_all = pd.read_csv(export(name, work / name, seed=0)["train"])
            runs = []
            for seed in map(int, a.seeds.split(",")):
                train = per_class(train_all, "label", a.size, seed)
                rest = train_all.drop(train.index).sample(a.score_rows, random_state=seed)
                plain, named, scored = work / "plain.csv", work / "named.csv", work / "scored.csv"
                train.to_csv(plain, index=False)
                rest.to_csv(scored, index=False)
                labels = sorted(train["label"].astype(str).unique())
                pd.concat([train, pd.DataFrame({"text": [k.replace("_", " ") for k in labels], "label": labels})]
                          ).to_csv(named, index=False)
                without = fb.run_fmtune(plain, scored, work / "run", seed, "contrastive")["accuracy"]
                with_names = fb.run_fmtune(named, scored, work / "run", seed, "contrastive")["accuracy"]
                runs.append({"seed": seed, "without": round(without, 4), "with_names": round(with_names, 4)})
                fb.log(f"{name} seed {seed}: {runs[-1]}")
            diff = np.array([r["with_names"] - r["without"] for r in runs])
            result["results"][name] = {
                "without": fb.stats([r["without"] for r in runs]),
                "with_names": fb.stats([r["with_names"] for r in runs]),
                "difference": {"mean": round(float(diff.mean()), 4),
                               "se": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4) if len(diff) > 1 else None},
                "runs": runs}
    print(json.dumps(result, indent=2), file=real_stdout)


if __name__ == "__main__":
    main()
