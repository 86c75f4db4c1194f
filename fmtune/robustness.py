"""How much does the model's score fall under noise, corruptions and attacks?

    fmtune robustness RUN --data test.csv                  # -> RUN/robustness/robustness.json + .png
    fmtune robustness RUN_PLAIN RUN_ROBUST --data test.csv  # both runs side by side

Audio: white noise at an SNR, a delay, faster and slower playback, quieter, at five levels each.
Images: Gaussian noise, Gaussian blur, brightness, contrast, JPEG compression and an occluding
patch at five severities each (in the spirit of ImageNet-C), and white-box L-inf attacks (FGSM,
and PGD with 10 steps and a random start; captum.robust) at several epsilons, in pixel units of
[0, 1]. Text: character typos, dropped words, swapped neighbouring words, changed case, at five
rates (named entities: the same on each sentence's words with their tags kept true: only words outside entities are
dropped or swapped; generation: each prompt, answered again and scored on ROUGE-L). Speech recognition: the audio
perturbations, scored on WER. Every perturbation is seeded by
(seed, perturbation, severity), so two runs see the same perturbed inputs. The same functions give training-time
augmentation (``train.augment``) and adversarial training (``train.adversarial``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fmtune import paths, ui
from fmtune.data.dataset import ImageData
from fmtune.data.prepare import make_dataset, read_data
from fmtune.data.readers import text_columns
from fmtune.errors import ConfigError, DataError
from fmtune.fsutil import atomic_dir, check_output_dir, output_tensor
from fmtune.training.hardware import precision_name
from fmtune.training.infer import infer
from fmtune.training.perturb import (  # noqa: F401  (re-exported: the suite's parts)
    ATTACKS,
    AUDIO_PERTURBATIONS,
    IMAGE_CORRUPTIONS,
    PGD_STEPS,
    TEXT_PERTURBATIONS,
    Augmented,
    adversarial_batch,
    attack,
    attack_sweep,
    blur,
    change_audio,
    corrupt_images,
    perturb_text,
    perturb_words,
)

SUITES = ("default", "quick")


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


def _forward_model(pred: Any, quiet: bool) -> tuple[Any, str]:
    """What the corrupted images are scored with: the run's ONNX export on onnxruntime (made, or
    reused, in RUN/export/onnx, and checked against the run's model to 1e-4 by the exporter; 4.8x
    faster than eager torch for EfficientNet-Lite0 on 2 cores), else the torch model."""
    from fmtune.predictor import Predictor

    try:
        return Predictor(pred.run_dir, batch_size=pred.batch_size, backend="onnx").model, "onnxruntime"
    except Exception as e:  # an export that fails (data gone, an operator ONNX lacks): torch does it all
        if not quiet:
            ui.console.print(f"[yellow]note:[/] scoring corruptions with torch: no ONNX export of {pred.run_dir} ({e})")
        return pred.model, "torch"


def evaluate_run(pred: Any, df: Any, suite: str, seed: int, attacks: bool, quiet: bool) -> dict[str, Any]:
    """Clean and perturbed scores of one loaded run (a Predictor) on the rows of ``df``. Clean
    inputs, text and attacks run on the torch model; corrupted images on the run's ONNX export
    (``_forward_model``). Text and audio are scored in the precision the run predicts in
    (``Predictor.autocast``: bf16 on a CPU with AMX), as eval.json's scores are; images in fp32, as their
    ONNX export and the attacks' gradients run."""
    task, bundle, cfg = pred.task, pred.bundle, pred.config
    metric = task.default_metric
    model = pred.model.eval()
    transcribes = task.level == "lm" and pred.kind == "audio"  # speech recognition: each clip transcribed again,
    # the transcripts scored on WER
    tagged = task.level == "tokens"  # named entities: each sentence's words perturbed, their tags kept true
    answers = task.level == "lm" and pred.kind == "text"  # generation: each prompt perturbed and answered again
    if answers:
        df = df[df["kind"] != "text"]  # (plain text has no prompt to perturb)
        if df.empty:
            raise DataError(f"{df.attrs.get('source', 'the data')}: robustness perturbs the prompts of a generation "
                            "run's rows; these rows are plain text, without prompts")
    ds, kept = make_dataset(df, bundle, task, cfg.data)
    bs = pred.batch_size

    def score(logits: torch.Tensor, targets: torch.Tensor) -> float:
        return float(task.metrics(logits, targets)[metric])

    results: dict[str, Any] = {"metric": metric, "examples": len(ds)}
    if pred.kind == "text":  # a run on pairs of texts: both texts of a pair are perturbed
        if answers:
            rows = df.iloc[kept]
        elif tagged:
            sentences = list(zip(df["tokens"].iloc[kept], df["tags"].iloc[kept]))
        else:
            texts = list(df[text_columns(cfg.data)].iloc[kept].astype(str).itertuples(index=False, name=None))
        plan = {k: (_pick(v[0], suite), v[1]) for k, v in TEXT_PERTURBATIONS.items()}
    elif pred.kind == "audio":  # the clips read again from their files, perturbed as waveforms
        from fmtune.data.audio import AudioData, AudioSpec, features_of, load_audio

        spec = AudioSpec.from_dict(bundle.audio)
        waves = [load_audio(src, spec.sampling_rate) for src in ds.sources]
        plan = {k: (_pick(v[0], suite), v[1]) for k, v in AUDIO_PERTURBATIONS.items()}
    else:
        batches = _image_batches(ds, bs)
        forward, results["corruptions_scored_with"] = _forward_model(pred, quiet)
        plan = {k: (_pick(v[0], suite), v[1]) for k, v in IMAGE_CORRUPTIONS.items()}
        if attacks and task.supports("attacks"):
            plan.update({k: (_pick(v[0], suite) if suite == "default" else [(2, v[0][1]), (4, v[0][3])], v[1])
                         for k, v in ATTACKS.items()})
    dtype = pred.autocast if pred.kind in ("text", "audio") and not transcribes else None  # (transcripts: as predict)
    results["precision"] = precision_name(dtype)
    if transcribes:
        results["lower_is_better"] = True  # (relative: the error rate perturbed over the clean one)
        clean = _transcripts_scored(pred, ds, ds.references)
    elif answers:
        clean = _answers_scored(pred, ds, ds.references)
    else:
        clean_logits, _ = infer(model, ds, bs, autocast_dtype=dtype)
        clean = score(clean_logits, ds.targets)
    results["clean"] = round(clean, 4)
    per: dict[str, Any] = {}
    # the bar counts rows: every perturbation at every severity reads them all once
    total = len(ds) * sum(len(levels) for levels, _ in plan.values())
    with ui.CountProgress(f"robustness of {pred.run_dir.name}", total, quiet) as bar:
        for name, (levels, unit) in plan.items():
            values = []
            if name in ATTACKS:  # every epsilon in one sweep per batch (perturb.attack_sweep)
                bar.describe(f"robustness of {pred.run_dir.name}: {name}, {len(levels)} epsilons")
                device = next(model.parameters()).device
                sweeps, start = [], 0
                for raw, targets in batches:
                    n = len(targets)
                    outs, _ = attack_sweep(model, bundle.image, (raw.float() / 255).to(device), targets.to(device),
                                           name, [lv for _, lv in levels], clean_logits[start:start + n],
                                           seed=_seed(seed, name, 0))
                    sweeps.append([o.cpu() for o in outs])
                    start += n
                    bar(n * len(levels))
                values = [score(torch.cat([b[k] for b in sweeps]), ds.targets) for k in range(len(levels))]
            for k, (severity, level) in enumerate(levels):
                if name not in ATTACKS:
                    bar.describe(f"robustness of {pred.run_dir.name}: {name}, severity {severity}")
                    rng = np.random.default_rng(_seed(seed, name, severity))  # (images: a torch generator of it)
                if name in ATTACKS:
                    value = values[k]
                elif answers:
                    changed_ds, _ = task.dataset(perturb_prompts(rows, name, level, rng), bundle, cfg.data,
                                                 with_targets=False)
                    value = _answers_scored(pred, changed_ds, ds.references)
                    bar(len(rows))
                elif tagged:
                    pairs = [perturb_words(w, t, name, level, rng) for w, t in sentences]
                    frame = pd.DataFrame({"tokens": [w for w, _ in pairs], "tags": [t for _, t in pairs]})
                    frame.attrs = dict(df.attrs)
                    changed_ds, _ = task.dataset(frame, bundle, cfg.data, allow_unknown=True)
                    value = score(*infer(model, changed_ds, bs, progress=bar, autocast_dtype=dtype))
                elif pred.kind == "text":
                    changed = [tuple(perturb_text(t, name, level, rng) for t in row) for row in texts]
                    changed = changed if pred.pair_column else [row[0] for row in changed]
                    value = score(*infer(model, bundle.text_data(changed, ds.targets), bs, progress=bar,
                                         autocast_dtype=dtype))
                elif pred.kind == "audio":
                    changed = [change_audio(w, spec.sampling_rate, name, level, rng) for w in waves]
                    if transcribes:
                        value = _transcripts_scored(pred, task.inputs(changed, bundle), ds.references)
                        bar(len(changed))
                    else:
                        value = score(*infer(model, AudioData(features_of(changed, spec), ds.targets, spec), bs,
                                             progress=bar, autocast_dtype=dtype))
                else:
                    gen = torch.Generator().manual_seed(_seed(seed, name, severity))
                    logits, start = None, 0
                    for raw, _targets in batches:
                        x = corrupt_images(raw.float() / 255, name, level, gen)
                        out = infer(forward, ImageData((x * 255).round().clamp(0, 255), None, ds.spec), bs)[0]
                        if logits is None:  # (a segmenter's: on disk past fsutil.spill_bytes, as infer's own)
                            logits = output_tensor((len(ds), *out.shape[1:]))
                        logits[start:start + len(raw)] = out
                        start += len(raw)
                        bar(len(raw))
                    value = score(logits, ds.targets)
                per.setdefault(name, {"unit": unit, "results": []})["results"].append(
                    {"severity": severity, "level": round(level, 5), metric: round(value, 4),
                     "relative": round(value / clean, 4) if clean else None})
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
        lower = res.get("lower_is_better", False)  # (an error rate: perturbed over clean, above 1 is worse)
        ax.set_title(f"{name}\nmean {metric} " + ("perturbed / clean" if lower else "relative")
                     + f": {res['mean_relative']}", fontsize=9)
        eps = next((p["results"] for pname, p in res["perturbations"].items() if pname in ATTACKS), [])
        levels = ", ".join(f"{r['level'] * 255:.3g}/255" for r in eps)
        ax.set_xlabel(f"severity (attacks: epsilon {levels})" if eps else "severity")
        ax.set_xticks(range(1, 6))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(metric)
    lower = any(r.get("lower_is_better") for r in runs.values())
    axes[0][-1].legend(fontsize=7, loc="upper left" if lower else "lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _transcripts_scored(pred: Any, ds: Any, references: list[str]) -> float:
    """The error rate (the task's metric, WER) of a speech recognition run's transcripts of ``ds`` against
    ``references``, transcribed as ``predict`` does."""
    from fmtune.generation import transcripts
    from fmtune.tasks.speech import error_rates

    return float(error_rates(transcripts(pred.bundle, pred.task, ds, pred.batch_size), references,
                             pred.task.wer_normalizer)[pred.task.default_metric])


def _answers_scored(pred: Any, ds: Any, references: list[str]) -> float:
    """The metric (ROUGE-L) of a generation run's greedy answers to the prompts of ``ds`` against ``references``."""
    from fmtune.tasks.generation import generate, score

    texts = generate(pred.model, pred.bundle.tokenizer, ds.prompts, pred.task.settings, pred.device)
    return float(score(texts, references)[pred.task.default_metric])


def perturb_prompts(rows: pd.DataFrame, name: str, level: float, rng: np.random.Generator) -> pd.DataFrame:
    """Generation rows with their prompts perturbed (a chat: every user turn); the completions kept."""
    out = rows.copy()
    prompts, chats = out["prompt"].tolist(), out["messages"].tolist() if "messages" in out.columns else None
    for i, kind in enumerate(out["kind"].tolist()):
        if kind == "messages":
            turns = json.loads(chats[i])
            chats[i] = json.dumps([{**m, "content": perturb_text(m["content"], name, level, rng)}
                                   if m["role"] == "user" and str(m["content"]).strip() else m for m in turns])
        elif kind == "prompt" and str(prompts[i]).strip():
            prompts[i] = perturb_text(str(prompts[i]), name, level, rng)
    out["prompt"] = prompts
    if chats is not None:
        out["messages"] = chats
    return out


def _loaded(run: Path) -> Any:
    """A run loaded for robustness: its Predictor, or for a generation run (Predictor refuses one) its Generator with
    what ``evaluate_run`` reads of a Predictor: the model, a batch size and the run's eval settings (answers in fp32,
    as fmtune generate gives them)."""
    from fmtune.generation import Generator, settings
    from fmtune.predictor import Predictor
    from fmtune.run import read_task

    task = read_task(run)
    if task.level != "lm" or task.modality == "audio":
        return Predictor(run)
    gen = Generator(run)
    gen.task.settings = settings(gen.config)
    gen.model, gen.batch_size, gen.autocast = gen.bundle.model, gen.task.settings.batch_size, None
    return gen


ROWS = 1000  # rows scored unless --limit says otherwise ...
ROWS_TRANSCRIBED = 100  # ... of a speech recognition or generation run (every clip transcribed, every prompt
# answered again under every perturbation)


def robustness(runs: str | Path | list[str | Path], data: str | Path | None = None, *, suite: str = "default",
               out: str | Path | None = None, limit: int | None = None, seed: int = 0, attacks: bool = True,
               quiet: bool = False) -> dict[str, Any]:
    """Score each run on ``data`` (default: the first run's test file) clean and perturbed; write
    robustness.json and robustness.png to ``out`` (default: RUN/robustness for one run,
    <first run>-robustness-compare beside it for several). ``limit``: rows sampled with ``seed`` (default
    ROWS, a speech recognition run's ROWS_TRANSCRIBED; 0: all)."""
    run_list = [Path(runs)] if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    if not run_list:
        raise ConfigError("give at least one run directory")
    if suite not in SUITES:
        raise ConfigError(f"--suite {suite!r}: choose one of: {', '.join(SUITES)}")
    target = Path(out) if out else (run_list[0] / "robustness" if len(run_list) == 1
                                    else run_list[0].parent / f"{run_list[0].name}-robustness-compare")
    check_output_dir(target, "robustness.json")  # before the work, not after
    preds = [_loaded(paths.check(r, "run")) for r in run_list]
    for p in preds:
        p.task.require("robustness", f"fmtune robustness ({p.run_dir})")
    kinds = {p.kind for p in preds}
    if len(kinds) > 1:
        raise ConfigError("these runs read different inputs (text, images or audio); compare runs of one kind")
    source = data or preds[0].config.data.test
    if source is None:
        raise DataError(f"{run_list[0]}: no test data configured; pass --data FILE")
    df = read_data(Path(source), preds[0].task, preds[0].config.data)
    if limit is None:
        limit = ROWS_TRANSCRIBED if preds[0].task.level == "lm" else ROWS
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


