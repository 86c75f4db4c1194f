"""How much does the model's score fall under noise, corruptions and attacks?

    fmtune robustness RUN --data test.csv                  # -> RUN/robustness/robustness.json + .png
    fmtune robustness RUN_PLAIN RUN_ROBUST --data test.csv  # both runs side by side

Images: Gaussian noise, Gaussian blur, brightness, contrast, JPEG compression and an occluding
patch at five severities each (in the spirit of ImageNet-C), and white-box L-inf attacks (FGSM,
and PGD with 10 steps and a random start; captum.robust) at several epsilons, in pixel units of
[0, 1]. Text: character typos, dropped words, swapped neighbouring words, changed case, at five
rates. Every perturbation is seeded by (seed, perturbation, severity), so two runs see the same
perturbed inputs. The same functions give training-time augmentation (``train.augment``) and
adversarial training (``train.adversarial``).
"""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtune import ui
from fmtune.data.dataset import ImageData, TextData
from fmtune.data.prepare import make_dataset, read_data
from fmtune.errors import ConfigError, DataError
from fmtune.fsutil import atomic_dir, check_output_dir
from fmtune.training.infer import infer

# name -> (severity levels, what a level means)
IMAGE_CORRUPTIONS: dict[str, tuple[list[float], str]] = {
    "gaussian_noise": ([0.04, 0.08, 0.12, 0.18, 0.26], "noise std, pixel units"),
    "gaussian_blur": ([0.5, 1.0, 1.5, 2.0, 3.0], "blur sigma, pixels per 64 px of image side"),
    "brightness": ([0.1, 0.2, 0.3, 0.4, 0.5], "added to every pixel"),
    "contrast": ([0.8, 0.6, 0.45, 0.3, 0.2], "contrast kept (1 = unchanged)"),
    "jpeg": ([80, 50, 30, 15, 7], "JPEG quality"),
    "occlusion": ([0.1, 0.2, 0.3, 0.4, 0.5], "side of a grey square, fraction of the image side"),
}
ATTACKS: dict[str, tuple[list[float], str]] = {
    "fgsm": ([1 / 255, 2 / 255, 4 / 255, 8 / 255], "L-inf epsilon, pixel units"),
    "pgd": ([1 / 255, 2 / 255, 4 / 255, 8 / 255], "L-inf epsilon, pixel units (10 steps of eps/4)"),
}
TEXT_PERTURBATIONS: dict[str, tuple[list[float], str]] = {
    "typos": ([0.02, 0.05, 0.1, 0.15, 0.2], "share of letters swapped, dropped, doubled or replaced"),
    "word_drop": ([0.05, 0.1, 0.2, 0.3, 0.4], "share of words dropped"),
    "word_swap": ([0.05, 0.1, 0.2, 0.3, 0.4], "share of words swapped with the next one"),
    "case_change": ([0.1, 0.25, 0.5, 0.75, 1.0], "share of words upper-cased, lower-cased or capitalised"),
}
SUITES = ("default", "quick")
PGD_STEPS = 10


# --- image corruptions (pixels in [0, 1], shape (N, 3, H, W)) ----------------------------------


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) with ``sigma`` in pixels (separable, replicate padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = nn.functional.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return nn.functional.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    from PIL import Image

    out = []
    for img in (x * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255


def corrupt_images(x: torch.Tensor, name: str, level: float, gen: torch.Generator) -> torch.Tensor:
    """One corruption at one level; ``gen`` (a CPU generator) makes it reproducible."""
    if name == "gaussian_noise":
        y = x + level * torch.randn(x.shape, generator=gen)
    elif name == "gaussian_blur":
        y = blur(x, level * x.shape[-1] / 64)
    elif name == "brightness":
        y = x + level
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = (x - mean) * level + mean
    elif name == "jpeg":
        y = _jpeg(x, level)
    elif name == "occlusion":
        y = x.clone()
        n, _, h, w = x.shape
        side = max(1, round(level * min(h, w)))
        tops = torch.randint(0, h - side + 1, (n,), generator=gen)
        lefts = torch.randint(0, w - side + 1, (n,), generator=gen)
        for i in range(n):
            y[i, :, tops[i]: tops[i] + side, lefts[i]: lefts[i] + side] = 0.5
    else:
        raise ConfigError(f"unknown image corruption {name!r}; choose one of: {', '.join(IMAGE_CORRUPTIONS)}")
    return y.clamp(0, 1)


def attack(model: nn.Module, spec: dict[str, Any], pixels: torch.Tensor, targets: torch.Tensor, kind: str,
           eps: float, steps: int = PGD_STEPS, step_size: float | None = None) -> torch.Tensor:
    """White-box L-inf adversarial pixels (in [0, 1]) against the true ``targets`` (captum.robust).
    PGD starts at a random point of the eps-ball and takes ``steps`` of ``step_size`` (eps/4)."""
    from captum.robust import FGSM, PGD

    from fmtune.explain import PixelModel

    net = PixelModel(model, spec).to(pixels.device)
    pixels = pixels.detach().clone().requires_grad_(True)

    def loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.float(), t, reduction="none")  # per example, as captum wants

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not already require gradients.*")
        if kind == "fgsm":
            adv = FGSM(net, loss, lower_bound=0.0, upper_bound=1.0).perturb(pixels, eps, targets)
        elif kind == "pgd":
            adv = PGD(net, loss, lower_bound=0.0, upper_bound=1.0).perturb(
                pixels, eps, step_size or eps / 4, steps, targets, random_start=True, norm="Linf")
        else:
            raise ConfigError(f"unknown attack {kind!r}; choose one of: {', '.join(ATTACKS)}")
    return adv.detach()


# --- text perturbations -----------------------------------------------------------------------


def perturb_text(text: str, name: str, rate: float, rng: np.random.Generator) -> str:
    words = text.split()
    if name == "typos":
        chars, out = list(text), []
        letters = "abcdefghijklmnopqrstuvwxyz"
        i = 0
        while i < len(chars):
            c = chars[i]
            if c.isalpha() and rng.random() < rate:
                op = rng.integers(4)
                if op == 0 and i + 1 < len(chars):  # swap with the next character
                    out += [chars[i + 1], c]
                    i += 2
                    continue
                if op == 1:  # drop
                    pass
                elif op == 2:  # double
                    out += [c, c]
                else:  # replace
                    out.append(letters[rng.integers(26)])
            else:
                out.append(c)
            i += 1
        new = "".join(out)
        return new if new.strip() else text
    if name == "word_drop":
        kept = [w for w in words if rng.random() >= rate]
        return " ".join(kept) if kept else words[int(rng.integers(len(words)))]
    if name == "word_swap":
        for i in range(len(words) - 1):
            if rng.random() < rate:
                words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    if name == "case_change":
        fns = (str.upper, str.lower, str.capitalize)
        return " ".join(fns[rng.integers(3)](w) if rng.random() < rate else w for w in words)
    raise ConfigError(f"unknown text perturbation {name!r}; choose one of: {', '.join(TEXT_PERTURBATIONS)}")


# --- the report -------------------------------------------------------------------------------


def _seed(seed: int, name: str, severity: int) -> int:
    return (seed * 1_000_003 + sum(map(ord, name)) * 101 + severity) % (2**31)


def _pick(levels: list[float], suite: str) -> list[tuple[int, float]]:
    pairs = list(enumerate(levels, start=1))
    return pairs if suite == "default" else [pairs[0], pairs[len(pairs) // 2], pairs[-1]]


def _image_batches(ds: ImageData, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 images, targets) in batches, decoding lazily stored ones."""
    out = []
    for s in range(0, len(ds), batch_size):
        idx = list(range(s, min(len(ds), s + batch_size)))
        out.append((ds.raw(idx), ds.targets[idx]))
    return out


def evaluate_run(pred: Any, df: Any, suite: str, seed: int, attacks: bool, quiet: bool) -> dict[str, Any]:
    """Clean and perturbed scores of one loaded run (a Predictor) on the rows of ``df``."""
    task, bundle, cfg = pred.task, pred.bundle, pred.config
    metric = task.default_metric
    model = pred.model.eval()
    ds, kept = make_dataset(df, bundle, task, cfg.data)
    bs = pred.batch_size

    def score(logits: torch.Tensor, targets: torch.Tensor) -> float:
        return float(task.metrics(logits, targets)[metric])

    results: dict[str, Any] = {"metric": metric, "examples": len(ds)}
    if pred.kind == "text":
        texts = [str(t) for t in df[cfg.data.text_column].iloc[kept]]
        plan = {k: (_pick(v[0], suite), v[1]) for k, v in TEXT_PERTURBATIONS.items()}
    else:
        batches = _image_batches(ds, bs)
        plan = {k: (_pick(v[0], suite), v[1]) for k, v in IMAGE_CORRUPTIONS.items()}
        if attacks and task.supports("attacks"):
            plan.update({k: (_pick(v[0], suite) if suite == "default" else [(2, v[0][1]), (4, v[0][3])], v[1])
                         for k, v in ATTACKS.items()})
    clean = score(*infer(model, ds, bs))
    results["clean"] = round(clean, 4)
    total = sum(len(levels) for levels, _ in plan.values())
    per: dict[str, Any] = {}
    with ui.CountProgress(f"robustness of {pred.run_dir.name}", total, quiet) as bar:
        for name, (levels, unit) in plan.items():
            rows = []
            for severity, level in levels:
                if pred.kind == "text":
                    rng = np.random.default_rng(_seed(seed, name, severity))
                    changed = [perturb_text(t, name, level, rng) for t in texts]
                    enc = bundle.tokenizer(changed, truncation=True, max_length=bundle.max_length)
                    value = score(*infer(model, TextData(enc["input_ids"], ds.targets, ds.pad_id), bs))
                else:
                    gen = torch.Generator().manual_seed(_seed(seed, name, severity))
                    logits = []
                    for raw, targets in batches:
                        x = raw.float() / 255
                        if name in ATTACKS:
                            device = next(model.parameters()).device
                            x = attack(model, bundle.image, x.to(device), targets.to(device), name, level).cpu()
                        else:
                            x = corrupt_images(x, name, level, gen)
                        pixels = ((x * 255).round() if name not in ATTACKS else x * 255).clamp(0, 255)
                        logits.append(infer(model, ImageData(pixels, None, ds.spec), bs)[0])
                    value = score(torch.cat(logits), ds.targets)
                rows.append({"severity": severity, "level": round(level, 5), metric: round(value, 4),
                             "relative": round(value / clean, 4) if clean else None})
                bar(1)
            per[name] = {"unit": unit, "results": rows}
    results["perturbations"] = per
    rel = [r["relative"] for p in per.values() for r in p["results"] if r["relative"] is not None]
    results["mean_relative"] = round(float(np.mean(rel)), 4) if rel else None
    return results


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    metric = report["metric"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 4.2), squeeze=False, sharey=True)
    for ax, (name, res) in zip(axes[0], runs.items()):
        for i, (pname, p) in enumerate(res["perturbations"].items()):
            xs = [r["severity"] for r in p["results"]]
            ys = [r[metric] for r in p["results"]]
            ax.plot(xs, ys, marker="o", linestyle="--" if pname in ATTACKS else "-", label=pname,
                    color=plt.cm.tab10(i % 10))
        ax.axhline(res["clean"], color="black", linewidth=1, linestyle=":", label=f"clean {res['clean']:.3f}")
        ax.set_title(f"{name}\nmean relative {metric}: {res['mean_relative']}", fontsize=9)
        eps = next((p["results"] for pname, p in res["perturbations"].items() if pname in ATTACKS), [])
        levels = ", ".join(f"{r['level'] * 255:.3g}/255" for r in eps)
        ax.set_xlabel(f"severity (attacks: epsilon {levels})" if eps else "severity")
        ax.set_xticks(range(1, 6))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness(runs: str | Path | list[str | Path], data: str | Path | None = None, *, suite: str = "default",
               out: str | Path | None = None, limit: int | None = 1000, seed: int = 0, attacks: bool = True,
               quiet: bool = False) -> dict[str, Any]:
    """Score each run on ``data`` (default: the first run's test file) clean and perturbed; write
    robustness.json and robustness.png to ``out`` (default: RUN/robustness for one run,
    <first run>-robustness-compare beside it for several)."""
    from fmtune.predictor import Predictor

    run_list = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    if not run_list:
        raise ConfigError("give at least one run directory")
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: choose one of: {', '.join(SUITES)}")
    target = Path(out) if out else (run_list[0] / "robustness" if len(run_list) == 1
                                    else run_list[0].parent / f"{run_list[0].name}-robustness-compare")
    check_output_dir(target, "robustness.json")  # before the work, not after
    preds = [Predictor(r) for r in run_list]
    for p in preds:
        p.task.require("robustness", f"fmtune robustness ({p.run_dir})")
    kinds = {p.kind for p in preds}
    if len(kinds) > 1:
        raise ConfigError("these runs read different inputs (text and images); compare runs of one kind")
    source = data or preds[0].config.data.test
    if source is None:
        raise DataError(f"{run_list[0]}: no test data configured; pass --data FILE")
    df = read_data(Path(source), preds[0].task, preds[0].config.data)
    if limit and len(df) > limit:
        df = df.sample(n=limit, random_state=seed).sort_index()
    names = [p.run_dir.name for p in preds]
    if len(set(names)) < len(names):
        names = [str(p.run_dir) for p in preds]
    report: dict[str, Any] = {"data": str(source), "rows": len(df), "suite": suite, "seed": seed,
                              "metric": preds[0].task.default_metric, "runs": {}}
    for name, pred in zip(names, preds):
        report["runs"][name] = evaluate_run(pred, df, suite, seed, attacks, quiet)

    def write(tmp: Path) -> None:
        (tmp / "robustness.json").write_text(json.dumps(report, indent=1))
        plot(report, tmp / "robustness.png")

    atomic_dir(target, write)
    report["out"] = str(target)
    return report


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    """Rows for a printed table: run, perturbation, then the metric per severity."""
    metric = report["metric"]
    rows = []
    for name, res in report["runs"].items():
        rows.append([name, "clean", f"{res['clean']:.3f}"])
        for pname, p in res["perturbations"].items():
            cells = [""] * 5  # one column per severity; the quick suite leaves some empty
            for r in p["results"]:
                cells[r["severity"] - 1] = f"{r[metric]:.3f}"
            rows.append(["", pname, *cells])
    return rows



# --- robust training --------------------------------------------------------------------------


class Augmented(torch.utils.data.Dataset):
    """A training set whose batches are perturbed on the fly (``train.augment``).

    The randomness of a batch is a function of the seed and the batch's example indices, so an
    interrupted and resumed run sees exactly the same perturbations.
    """

    def __init__(self, ds: Any, augment: Any, seed: int, tokenizer: Any = None, max_length: int | None = None):
        self.ds, self.augment, self.seed = ds, augment, seed
        self.tokenizer, self.max_length = tokenizer, max_length
        self.lengths, self.targets = getattr(ds, "lengths", None), ds.targets

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        return i

    def _rng(self, idx: list[int]) -> np.random.Generator:
        return np.random.default_rng([self.seed, *map(int, idx)])

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rng = self._rng(idx)
        if isinstance(self.ds, TextData):
            texts = [self.tokenizer.decode(self.ds.input_ids[i], skip_special_tokens=True) for i in idx]
            for name, rate in (("typos", self.augment.typos), ("word_drop", self.augment.word_drop)):
                if rate:
                    texts = [perturb_text(t, name, rate, rng) if t.strip() else t for t in texts]
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
            return TextData(enc["input_ids"], self.ds.targets[idx], self.ds.pad_id).collate(list(range(len(idx))))
        batch = self.ds.collate(idx)
        mean, std = self.ds.mean, self.ds.std
        x = batch["pixel_values"] * std + mean
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        if self.augment.corruptions:
            names = list(IMAGE_CORRUPTIONS)
            for i in range(len(x)):
                if rng.random() < self.augment.corruptions:
                    name = names[int(rng.integers(len(names)))]
                    level = IMAGE_CORRUPTIONS[name][0][int(rng.integers(3))]
                    x[i: i + 1] = corrupt_images(x[i: i + 1], name, level, gen)
        if self.augment.noise:  # a strength per image, from none to the maximum: clean images stay in the mix
            sigma = self.augment.noise * torch.rand((len(x), 1, 1, 1), generator=gen)
            x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        batch["pixel_values"] = (x - mean) / std
        return batch


def adversarial_batch(net: nn.Module, spec: dict[str, Any], batch: dict[str, torch.Tensor], targets: torch.Tensor,
                      kind: str, eps: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``batch`` with an adversarial copy of every image appended (the model attacked in eval mode).

    ``fgsm`` is FGSM from a random start with a step of 1.25 eps (Wong et al., 2020, "Fast is
    better than free"): plain FGSM training leaks the label into the perturbation and learns to
    resist FGSM alone (measured on digits: FGSM accuracy rising with eps while PGD's fell to 4%).
    ``pgd`` takes 3 steps of eps/2 from a random start."""
    from fmtune.strategies import set_train_mode

    mean = torch.tensor(spec["mean"], device=targets.device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], device=targets.device).view(1, 3, 1, 1)
    pixels = (batch["pixel_values"] * std + mean).clamp(0, 1)
    net.eval()
    if kind == "fgsm":
        adv = attack(net, spec, pixels, targets, "pgd", eps, steps=1, step_size=1.25 * eps)
    else:
        adv = attack(net, spec, pixels, targets, "pgd", eps, steps=3, step_size=eps / 2)
    set_train_mode(net)
    return {"pixel_values": torch.cat([batch["pixel_values"], (adv - mean) / std])}, torch.cat([targets, targets])
