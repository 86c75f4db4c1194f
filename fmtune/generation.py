"""The verbs of text generation: train (``fmtune train --task generation``) and generate
(``fmtune generate RUN``). Training shares the one loop (``fmtune.training.loop.fit``), the run
directory and the report with every other task; what differs is the model (a causal LM or a text
encoder-decoder, ``fmtune.models.causal_lm``), its strategies (LoRA by default) and the evaluation (the task
scores generated answers, ``fmtune.tasks.generation``).
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate.utils import set_seed
from sklearn.model_selection import train_test_split

from fmtune import adapters, ui
from fmtune import config as config_mod
from fmtune.data.prepare import columns_read_line, read_data, settle_columns, split_by_column
from fmtune.errors import ConfigError, DataError
from fmtune.fsutil import read_json, write_json, write_text_atomic
from fmtune.models import build, causal_lm
from fmtune.run import EVAL_FILE, INFO_FILE, new_run_dir, open_run, read_task, write_start
from fmtune.tasks import task_class
from fmtune.tasks.generation import (
    Completion,
    GenerationSettings,
    QueuedStream,
    StreamSink,
    complete,
    fit_prompt,
    generate,
    generation_config,
    prompt_ids,
    read_rows,
    uses_template,
)
from fmtune.training import hardware, memory, optim
from fmtune.training.loop import fit

BASELINE_FILE, ANSWERS_FILE = "baseline.json", "test_answers.jsonl"
SHOWN_SAMPLES = 12  # answers side by side in eval.json and the report


def settings(cfg: config_mod.Config) -> GenerationSettings:
    # answers are decoded a token at a time for the whole batch: on a CPU each step reads every weight
    # (memory-bound: SmolLM2 at batch 8 and 16 costs about the same per step), so batches are large;
    # prompts are sorted by length so their padding stays small
    return GenerationSettings(cfg.eval.max_new_tokens, cfg.eval.samples, min(cfg.train.eval_batch_size, 32))


def _frames(cfg: config_mod.Config, task: Any) -> dict[str, pd.DataFrame]:
    if not cfg.data.train:
        raise ConfigError("data.train: no training data given (--data FILE or data.train in the config)")
    train = read_data(cfg.data.train, task, cfg.data, split=None)
    train.attrs["settled"] = settle_columns(train, cfg.data, task)  # (a speech table's clips folder: media_root)
    train, parts = split_by_column(train, cfg.data)  # (settled first: its validation and test rows read the same)
    if cfg.data.max_train_samples and cfg.data.max_train_samples < len(train):
        attrs = dict(train.attrs)
        train = train.sample(n=cfg.data.max_train_samples, random_state=cfg.train.seed)
        train.attrs.update(attrs)
    if "val" in parts:
        val = parts["val"]
    elif cfg.data.val:
        val = read_data(cfg.data.val, task, cfg.data, split="val")
    else:
        if len(train) < 4:
            raise DataError(f"{cfg.data.train}: {len(train)} rows is too few to split off a validation set; "
                            "give --val FILE")
        source = train.attrs
        train, val = train_test_split(train, test_size=max(1, round(len(train) * cfg.data.val_fraction)),
                                      random_state=cfg.train.seed)
        train.attrs, val.attrs = dict(source), dict(source)
    out = {"train": train, "val": val}
    if "test" in parts or cfg.data.test:
        out["test"] = parts["test"] if "test" in parts else read_data(cfg.data.test, task, cfg.data)
    return out


def _display_prompt(row: dict[str, Any]) -> str:
    if "audio" in row:  # speech recognition: the clip
        return str(row["audio"])
    if row["kind"] == "messages":
        users = [m["content"] for m in json.loads(row["messages"]) if m["role"] == "user"]
        return users[-1] if users else ""
    return row["prompt"] or ""


def train(cfg: config_mod.Config, run_dir: Path | None = None, *, overwrite: bool = False, quiet: bool = False,
          report: bool = True, on_eval: Any = None) -> dict[str, Any]:
    """Fine-tune a model that generates (a causal LM: text generation; an encoder-decoder speech
    model: speech recognition) as configured (``run_dir``: resume that run). Returns the run summary."""
    resume = run_dir is not None
    _check_settings(cfg)
    hw = hardware.choose(cfg.train.device, cfg.train.precision, cfg.train.num_threads, cfg.train.loader_threads)
    set_seed(cfg.train.seed)
    if resume:
        task = read_task(run_dir)
    else:
        cls = task_class(cfg.task.type)
        task = cls(**cls.options_from(cfg.task, cfg.data))
    frames = _frames(cfg, task)
    if not resume:  # what the training rows tell the task (generation: whether they hold chats)
        task = cls.from_train(frames["train"][cls.target_column(cfg.data)], frames["train"],
                              **cls.options_from(cfg.task, cfg.data))
    task.settings = settings(cfg)
    if hasattr(task, "use_transcripts"):
        task.use_transcripts(frames["train"])
    small = None
    if not resume:  # a resumed run's config holds the batch it trained
        cfg, small = config_mod.enough_steps(cfg, len(frames["train"]))
    bundle = build.create(cfg.model, task)
    built = {name: task.dataset(df, bundle, cfg.data) for name, df in frames.items()}
    data = {name: ds for name, (ds, _) in built.items()}
    data["train"] = task.training_set(data["train"])
    bundle.model.to(hw.device)  # (before the memory left for activations is measured there)
    micro = None
    if not resume and bundle.family not in causal_lm.TEXT_FAMILIES:  # speech: clips of up to 30 s (a causal LM's
        cfg, micro = memory.fit_training(cfg, bundle.model, data["train"], hw.device)  # tokens: checkpointing below)
    if not resume:
        run_dir = new_run_dir(cfg, overwrite)
        write_start(run_dir, cfg, task)
    out = ui.console
    if not quiet:
        read_as = sorted({tuple(pair) for df in frames.values() for pair in df.attrs.get("read_as", [])})
        _print_plan(cfg, bundle, task, data, run_dir, hw, small, read_as)
        if micro:
            out.print(f"  memory: {micro['why']}")
        if frames["train"].attrs.get("settled"):
            out.print(f"  {columns_read_line(frames['train'].attrs['settled'])}")
    if cfg.train.packing:
        causal_lm.check_packing(bundle)
    test_sample = task.sample(data["test"], cfg.eval.test_samples or len(data["test"])) if "test" in data else []
    baseline = read_json(run_dir / BASELINE_FILE, {}) if resume else {}
    if "test" in data and not baseline:  # the pretrained model, before any strategy touches it
        baseline = _score(bundle, task, data["test"], test_sample, cfg, hw, quiet, "baseline (zero-shot)")
        write_json(run_dir / BASELINE_FILE, baseline)
    counts = causal_lm.apply_strategy(bundle, cfg.strategy)
    counts.update(optim.memory_note(counts, cfg.train))
    if not quiet:
        share = 100 * counts["trainable_params"] / counts["total_params"]
        out.print(f"  strategy {cfg.strategy.name}: trainable {counts['trainable_params']:,} of "
                  f"{counts['total_params']:,} parameters ({share:.2f}%); lr {cfg.train.lr:g}")
    net = lm_net(bundle)
    train_ds = data["train"]
    train_ds.packed = cfg.train.packing
    recompute = None
    if bundle.family in causal_lm.TEXT_FAMILIES:  # tokens of a causal LM or a text encoder-decoder
        recompute = causal_lm.checkpointing(bundle, cfg.train, train_ds.lengths, hw.device)
    if recompute and not quiet:
        out.print(f"  gradient checkpointing {recompute}")
    if cfg.train.augment.audio_on():  # speech: the clips perturbed on the fly, read again from their files
        from fmtune.training.perturb import Augmented

        train_ds = Augmented(train_ds, cfg.train.augment, cfg.train.seed, bundle)
    result = fit(bundle, task, train_ds, data["val"], cfg.train, run_dir, hardware=hw, resume=resume,
                 save_best=lambda: build.save(bundle, run_dir / "model"), progress=ui.FitProgress(quiet), net=net,
                 on_eval=on_eval, eval_first=True)
    said = {"small_training_set": small} if small else {}  # in run.json and the summary alike
    if micro:
        said["micro_batches"] = micro
    if frames["train"].attrs.get("settled"):
        said["columns_read"] = frames["train"].attrs["settled"]
    info = {"params": counts, "hardware": hw.describe(),
            "data": {k: {"rows": len(v), "source": frames[k].attrs.get("source"), **_size(v)} for k, v in data.items()},
            "fit": {k: v for k, v in vars(result).items() if k not in ("history", "processes", "params_in_sync",
                                                                       "weights_per_rank_mib")},
            "generation": {**_settings_info(bundle, task), "gradient_checkpointing": recompute},
            "versions": {"python": platform.python_version(), "torch": torch.__version__}, **said}
    write_json(run_dir / INFO_FILE, info)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "metric": result.metric, "best": result.best,
                               "best_step": result.best_step, "stopped_early": result.stopped_early,
                               "seconds": result.seconds, **said}
    if not quiet:
        best = f"{result.best:.4f}" if result.best is not None else "never finite"
        out.print(f"  finished after {result.steps} steps ({result.epochs:.2f} epochs) in {result.seconds:.0f}s; "
                  f"best val {result.metric} {best} at step {result.best_step}"
                  + (" (the pretrained model: fine-tuning did not beat it)" if result.best_step == 0 else ""))
    if "test" in data:
        build.load_weights(bundle, run_dir / "model")
        tuned = _score(bundle, task, data["test"], test_sample, cfg, hw, quiet, "test")
        kept = frames["test"].iloc[built["test"][1]]  # (unreadable clips are left out, up to data.max_bad_fraction)
        summary["eval"] = _write_eval(run_dir, kept, data["test"], test_sample, baseline, tuned, cfg, task, quiet)
    if report:
        from fmtune.report import write_report

        summary["report"] = str(write_report(run_dir))
        if not quiet:
            out.print(f"report: {summary['report']}")
    return summary


def lm_net(bundle: build.Bundle) -> torch.nn.Module:
    """What training and evaluation feed batches to: logits at the trained positions only."""
    if bundle.family == causal_lm.SPEECH_FAMILY:
        from fmtune.models.speech import SpeechLogits

        return SpeechLogits(bundle.model, bundle.tokenizer, bundle.audio)
    if bundle.family == causal_lm.CTC_FAMILY:  # log-probabilities per frame
        from fmtune.models.ctc import CTCLogits

        return CTCLogits(bundle.model, bundle.tokenizer)
    if bundle.family == causal_lm.SEQ2SEQ_FAMILY:  # the prompt through the encoder, the completion's logits
        return causal_lm.Seq2SeqLogits(bundle.model, bundle.tokenizer)
    return causal_lm.TargetLogits(bundle.model, bundle.tokenizer)


def transcripts(bundle: build.Bundle, task: Any, ds: Any, batch_size: int, on_batch: Any = None) -> list[str]:
    """``bundle``'s transcript of every clip of ``ds`` (a speech recognition run's data), as predict gives them;
    ``on_batch(n)`` is told of each batch's clips done."""
    from fmtune.training.infer import model_device

    return lm_net(bundle).transcribe(ds, list(range(len(ds))), batch_size, model_device(bundle.model), task.language,
                                     on_batch=on_batch)


def _size(ds: Any) -> dict[str, Any]:
    if hasattr(ds, "clips"):  # audio: seconds of speech
        return {"seconds": round(float(sum(w.shape[-1] for c in ds.clips for w in c) * ds.hop_seconds), 1)}
    return {"tokens": int(ds.lengths.sum())}


def _settings_info(bundle: build.Bundle, task: Any) -> dict[str, Any]:
    tok = bundle.tokenizer
    from fmtune.tasks.speech import NORMALIZERS, case_of

    if bundle.family == causal_lm.CTC_FAMILY:
        return {"decoding": "greedy CTC", "blank": tok.pad_token,
                "word_delimiter": getattr(tok, "word_delimiter_token", None),  # (Parakeet's pieces: none)
                "transcripts_cased": case_of(tok), "window_seconds": bundle.audio.get("window_seconds"),
                "vocabulary": len(tok), "new_head": not tok.name_or_path,
                "wer_normalizer": NORMALIZERS[task.wer_normalizer]}
    if bundle.family == causal_lm.SPEECH_FAMILY:
        from fmtune.data.audio import LOG_MEL, WAVEFORM
        from fmtune.models import speech

        if bundle.audio.get("frontend") == WAVEFORM:  # (Moonshine)
            reads = {"reads_clips": "the waveform, padded to the longest of a batch"}
        elif bundle.audio.get("frontend", LOG_MEL) != LOG_MEL:  # (Speech2Text)
            reads = {"reads_clips": "a filterbank, padded to the longest of a batch and masked"}
        else:
            reads = {"bucket_seconds": speech.BUCKET_SECONDS, "reads_clips": "in buckets" if bundle.audio.get(
                speech.BUCKETED) else "in the whole window (not yet trained by fmtune)"}
        return {"prefix": tok.convert_ids_to_tokens(speech.prefix_ids(tok, task.language, bundle.model)),
                "transcripts_cased": case_of(tok), "window_seconds": bundle.audio.get("window_seconds"), **reads,
                "eos_token": tok.eos_token, "wer_normalizer": NORMALIZERS[task.wer_normalizer]}
    info = {"chat_template": uses_template(tok, task.chat_template), "train_on_prompt": task.train_on_prompt,
            "max_length": bundle.max_length, "eos_token": tok.eos_token, "pad_token": tok.pad_token}
    if bundle.family == causal_lm.SEQ2SEQ_FAMILY:  # (max_length: of the prompt, and of the completion)
        start = causal_lm.decoder_start(bundle.model)
        info.update(encoder_decoder=True, decoder_start=tok.convert_ids_to_tokens(start))
    return info


def _check_settings(cfg: config_mod.Config) -> None:
    """Settings of other tasks that a generation run would otherwise silently ignore."""
    unsupported = {"semi.unlabeled / --unlabeled (self-training)": cfg.semi.unlabeled,
                   "continual.source (fmtune continue, fmtune train --resume-from)": cfg.continual.source,
                   "train.adversarial": cfg.train.adversarial != "none",
                   "train.augment.typos / word_drop / noise / corruptions": cfg.train.augment.text_on()
                   or cfg.train.augment.image_on(),
                   "train.augment.snr / shift / gain / speed (audio)": cfg.train.augment.audio_on()
                   and task_class(cfg.task.type).modality != "audio",
                   "task.group_weights": cfg.task.group_weights}
    from fmtune.training import distributed

    unsupported["several processes (--num-processes)"] = distributed.world_size() > 1
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: not available for {cfg.task.type} runs")


def _score(bundle: build.Bundle, task: Any, ds: Any, sample: list[int], cfg: config_mod.Config, hw: Any,
           quiet: bool, what: str) -> dict[str, Any]:
    net = lm_net(bundle)
    started = time.perf_counter()
    with ui.CountProgress(f"{what}: answers", len(sample), quiet) as bar:
        metrics = task.evaluate_model(net, ds, cfg.train.eval_batch_size, hw.device, sample=sample, progress=bar)
    return {"metrics": metrics, "answers": list(task.last_answers), "seconds": round(time.perf_counter() - started, 2)}


def evaluate(opened: Any, source: str | Path, baseline: bool, quiet: bool) -> dict[str, Any]:
    """``fmtune evaluate`` of a run that generates: its test metrics on ``source`` (speech: WER, CER and the loss;
    text: the answers' scores and the loss) over ``eval.test_samples`` rows, and with ``baseline`` the pretrained
    model's (before fine-tuning: zero-shot) on the same rows; eval.json and test_answers.jsonl written as training
    writes them."""
    cfg, task, bundle = opened.config, opened.task, opened.bundle
    task.settings = settings(cfg)
    hw = hardware.choose(cfg.train.device, "fp32", cfg.train.num_threads)
    df = read_data(source, task, cfg.data)
    ds, keep = task.dataset(df, bundle, cfg.data)
    sample = task.sample(ds, cfg.eval.test_samples or len(ds))
    before: dict[str, Any] = {}
    if baseline:
        if bundle.family == causal_lm.CTC_FAMILY and cfg.data.train and Path(cfg.data.train).exists():
            # (a CTC head made from their characters)
            task.use_transcripts(read_data(cfg.data.train, task, cfg.data, split="train"))
        set_seed(cfg.train.seed)  # (a fresh head starts as training's did)
        pre = build.create(cfg.model, task)  # the pretrained model, as training scores it before any strategy
        pre.model.to(hw.device)
        before = _score(pre, task, ds, sample, cfg, hw, quiet, "baseline (zero-shot)")
        del pre
    bundle.model.to(hw.device)
    tuned = _score(bundle, task, ds, sample, cfg, hw, quiet, "test")
    return _write_eval(opened.dir, df.iloc[keep], ds, sample, before, tuned, cfg, task, quiet, source)


def _write_eval(run_dir: Path, df: pd.DataFrame, ds: Any, sample: list[int], baseline: dict[str, Any],
                tuned: dict[str, Any], cfg: config_mod.Config, task: Any, quiet: bool,
                source: str | Path | None = None) -> dict[str, Any]:
    rows = df.to_dict("records")
    answers = [{"line": ds.lines[i], task.input_name: _display_prompt(rows[i]), "reference": ds.references[i],
                "baseline": (baseline.get("answers") or [""] * len(sample))[j],
                "fine_tuned": tuned["answers"][j]} for j, i in enumerate(sample)]
    write_text_atomic(run_dir / ANSWERS_FILE, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    result = {"test": tuned["metrics"], "n_test": len(ds), "n_generated": len(sample),
              "data": str(source or cfg.data.test),
              "baseline": baseline.get("metrics", {}), "baseline_method": task.baseline_method,
              "baseline_label": "pretrained (zero-shot)", "samples": answers[:SHOWN_SAMPLES],
              "seconds": {"baseline": baseline.get("seconds"), "fine_tuned": tuned["seconds"]}}
    write_json(run_dir / EVAL_FILE, result)
    if not quiet:
        keys = list(result["test"])
        rows_ = [["fine-tuned", *[result["test"][k] for k in keys]]]
        if result["baseline"]:
            rows_.insert(0, ["pretrained (zero-shot)", *[result["baseline"].get(k, float("nan")) for k in keys]])
        ui.console.print(ui.table(f"test ({len(ds)} rows; {len(sample)} answered)", ["model", *keys], rows_))
        for a in answers[:3]:
            asked = task.input_name
            ui.console.print(f"[bold]{asked}[/] {a[asked][:200]!r}\n  reference  {a['reference']!r}\n"
                             + (f"  zero-shot  {a['baseline']!r}\n" if result["baseline"] else "")
                             + f"  fine-tuned {a['fine_tuned']!r}")
        ui.console.print(f"eval: {run_dir / EVAL_FILE}; every answer: {run_dir / ANSWERS_FILE}")
    return result


def _print_plan(cfg: config_mod.Config, bundle: build.Bundle, task: Any, data: dict[str, Any], run_dir: Path,
                hw: Any, small: str | None = None, read_as: list[tuple[str, str]] | None = None) -> None:
    out = ui.console
    out.print(f"[bold]fmtune train[/] -> {run_dir}")
    speech = bundle.kind == "audio"
    kind = {causal_lm.SPEECH_FAMILY: "encoder-decoder speech model", causal_lm.CTC_FAMILY: "CTC speech model",
            causal_lm.SEQ2SEQ_FAMILY: "encoder-decoder"}.get(bundle.family, "causal LM")
    out.print(f"  model {cfg.model.name} ({kind}, {sum(p.numel() for p in bundle.model.parameters()):,} parameters)"
              f"  task {task.name}")
    tok = bundle.tokenizer
    if speech:
        info = _settings_info(bundle, task)
        wer = "WER on lower-cased text without punctuation" + (
            " (and Whisper's English normaliser: task.wer_normalizer)" if task.wer_normalizer == "english" else "")
        if bundle.family == causal_lm.CTC_FAMILY:
            fresh = " (a new CTC head over the training transcripts' characters)" if info["new_head"] else ""
            out.print(f"  the waveform in windows of at most {info['window_seconds']:g} s; {info['vocabulary']} "
                      f"tokens{fresh} (blank {info['blank']!r}, words split at {info['word_delimiter']!r}, transcripts "
                      f"{info['transcripts_cased']}-cased); greedy CTC decoding; {wer}")
        else:
            from fmtune.models.speech import BUCKETED

            first = ("the model (trained by fmtune before) reads" if bundle.audio.get(BUCKETED) else
                     f"the pretrained model reads clips in its whole {info['window_seconds']:g}-s window (zero-shot "
                     "baseline, first validation); training and the trained model read")
            out.print(f"  {first} clips in buckets of {info['bucket_seconds']:g} s (at most {info['window_seconds']:g} "
                      f"s); decoder prefix {''.join(info['prefix'])}; every transcript ends with {tok.eos_token!r}; "
                      f"{wer}")
        sizes = ", ".join(f"{k} {len(v)} clips ({_size(v)['seconds']:,.0f} s)" for k, v in data.items())
        out.print(f"  data: {sizes}; validation transcripts {min(cfg.eval.samples, len(data['val']))} clips")
    else:
        out.print(f"  prompts {'in the chat template' if uses_template(tok, task.chat_template) else 'as plain text'}"
                  f"{', instruction: ' + repr(task.instruction) if task.instruction else ''}; loss on "
                  f"{'prompt and completion' if task.train_on_prompt else 'the completion only'}; every target ends "
                  f"with {tok.eos_token!r}; padding {tok.pad_token!r}; max {bundle.max_length} tokens"
                  + (" each for the prompt (the encoder's input) and the completion (the decoder's)"
                     if bundle.family == causal_lm.SEQ2SEQ_FAMILY else ""))
        for inp, tgt in read_as or []:
            out.print(f"  data: {inp!r} read as the prompt and {tgt!r} as the completion (a known dataset layout; "
                      "data.input_column / data.target_column choose others)")
        sizes = ", ".join(f"{k} {len(v)} rows ({int(v.lengths.sum()):,} tokens)" for k, v in data.items())
        out.print(f"  data: {sizes}"
                  + f"; validation answers {min(cfg.eval.samples, len(data['val']))} rows (max "
                  f"{cfg.eval.max_new_tokens} new tokens)")
    out.print(f"  {hw.describe()}")
    if small:
        out.print(f"  small training set: {small}")
    if "test" in data:
        out.print(f"  the pretrained model {'transcribes the test clips' if speech else 'answers the test prompts'} "
                  "first (the zero-shot baseline)")


# --- generate ----------------------------------------------------------------------------------------

class Generator:
    """A trained generation run loaded once: answers prompts as training asked them (the run's
    instruction and chat template). Used by ``fmtune generate`` and ``fmtune serve``."""

    generates = True
    kind = "text"

    def __init__(self, run: str | Path, opened: Any = None, backend: str = "torch"):
        """``opened``: the run already loaded (``fmtune.run.open_run``); ``backend``: torch, or onnx (onnxruntime on
        the run's ONNX export, made and checked in RUN/export/onnx on first use)."""
        from fmtune.fsutil import folder_digest

        opened = opened or open_run(run)
        if opened.task.modality == "audio":
            raise ConfigError(f"{run} is a {opened.task.name} run; transcribe audio files with  fmtune predict {run} "
                              "FILES  (or serve it: POST /predict)")
        if opened.task.level != "lm":
            raise ConfigError(f"{run} is a {opened.task.name} run; answering prompts needs a generation run "
                              "(use fmtune predict)")
        self.run_dir, self.config, self.task, self.bundle = opened.dir, opened.config, opened.task, opened.bundle
        self.template = uses_template(self.bundle.tokenizer, self.task.chat_template)
        self.device = hardware.choose(self.config.train.device, "fp32", self.config.train.num_threads).device
        self.backend = backend
        self.version = folder_digest(self.run_dir / "model")
        if backend == "onnx":
            _onnx_exportable(self)
            from fmtune.onnx_export import OnnxCausalLM
            from fmtune.run import exported_from

            folder = self.run_dir / "export" / "onnx"
            if exported_from(folder) != self.version:  # none yet, or of older weights
                export_run(opened, folder, "onnx", quiet=True)
            self.bundle.model, self.device = OnnxCausalLM(folder), torch.device("cpu")
            self.version = folder_digest(folder)
        elif backend != "torch":
            raise ConfigError(f"backend {backend!r}: a generation run decodes with torch or onnx")
        self.bundle.model.to(self.device).eval()

    def metadata(self) -> dict[str, Any]:
        return {"run": self.run_dir.name, "model_version": self.version, "backend": self.backend,
                "model": self.config.model.name, "kind": "text", "task": "generation", "labels": [],
                "strategy": self.config.strategy.name, "max_length": self.bundle.max_length,
                "instruction": self.task.instruction, "chat_template": self.template,
                "max_new_tokens": self.config.eval.max_new_tokens,
                "test_metrics": read_json(self.run_dir / EVAL_FILE, {}).get("test")}

    @property
    def prompt_room(self) -> int:
        """The most tokens of a prompt the model reads (a causal LM keeps one of its max_length for the answer)."""
        return self.bundle.max_length - (0 if self.bundle.family == causal_lm.SEQ2SEQ_FAMILY else 1)

    def prompt_ids(self, row: dict[str, Any]) -> tuple[list[int], int]:
        """The tokens of one row ({prompt} or {messages}), cut to ``prompt_room`` (a causal LM's prompt loses its
        start, an encoder-decoder's its end); how many tokens the whole prompt has (more than it keeps: it was cut)."""
        ids = prompt_ids(self.bundle.tokenizer, row, self.task.instruction, self.template, self.task.chats)
        seq2seq = self.bundle.family == causal_lm.SEQ2SEQ_FAMILY
        return fit_prompt(ids, self.prompt_room, self.bundle.tokenizer, seq2seq), len(ids)

    def complete(self, rows: list[dict[str, Any]], max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, batch_size: int = 16, on_batch: Any = None,
                 sinks: list[StreamSink | None] | None = None,
                 options: list[dict[str, Any]] | None = None) -> list[Completion]:
        """Each row's answer with its token count and whether it ended at the EOS: greedy, or sampled at
        ``temperature`` and ``top_p``, row ``i`` with seed ``seed + i`` (its answer the same however the rows are
        batched); ``options`` gives each row its own (temperature, top_p, seed: the service's requests);
        ``sinks``: the rows whose text is streamed while it is decoded (``tasks.generation.complete``)."""
        ids = [self.prompt_ids(r)[0] for r in rows]
        s = GenerationSettings(max_new_tokens or self.config.eval.max_new_tokens, 0, batch_size)
        if options is None:
            options = [{"temperature": temperature, "top_p": top_p, "seed": seed + i} for i in range(len(rows))]
        return complete(self.bundle.model, self.bundle.tokenizer, ids, s, self.device, options, on_batch=on_batch,
                        sinks=sinks)

    def answer(self, rows: list[dict[str, Any]], max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, batch_size: int = 16, on_batch: Any = None) -> list[str]:
        return [c.text for c in self.complete(rows, max_new_tokens, temperature, top_p, seed, batch_size, on_batch)]

    def stream(self, row: dict[str, Any], max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0, info: dict[str, Any] | None = None, cancel: Any = None) -> Any:
        """The answer to one row as pieces of text, yielded as the tokens are decoded (KV cache;
        generation runs in a background thread). Closing the generator early (a client that went
        away, a stop string found) stops the decoding at the next token, and so does setting
        ``cancel`` (a ``threading.Event``) from another thread. ``info``, when given, gets ``tokens``
        and ``stopped`` (as ``Completion`` has them) once the answer is complete. (The service streams
        through its batches instead: ``serve_base.open_stream``, the same pieces.)"""
        import threading

        stream, out = QueuedStream(cancel), {}

        def work() -> None:
            try:
                out["answer"] = self.complete([row], max_new_tokens, temperature, top_p, seed, sinks=[stream.sink])[0]
            except Exception as e:  # raised where the answer is read, not lost in this thread
                out["error"] = e
            finally:
                stream.done()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from stream.pieces()
        finally:
            thread.join()
        if "error" in out:
            raise out["error"]
        if info is not None:
            info["tokens"], info["stopped"] = out["answer"].tokens, out["answer"].stopped


def generate_texts(run: str | Path, prompts: list[str] | None = None, file: str | Path | None = None,
                   output: str | Path | None = None, *, max_new_tokens: int | None = None,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                   backend: str = "torch", quiet: bool = False) -> list[dict[str, Any]]:
    """Answers of a trained generation run to prompts given directly or in a file (JSONL rows as
    in training, without the completion; CSV/Parquet through data.input_column). Writes JSONL to
    ``output`` when given; returns the records."""
    if (prompts is None) == (file is None):
        raise ConfigError("give --prompt TEXT (repeatable) or --file FILE")
    gen = Generator(run, backend=backend)
    if file is not None:
        df = read_rows(file, gen.config.data, with_targets=False)
    else:
        df = pd.DataFrame([{"kind": "prompt", "prompt": p, "completion": None, "messages": None, "line": i + 1}
                           for i, p in enumerate(prompts)])
    rows = df.to_dict("records")
    cut = sum(gen.prompt_ids(r)[1] > gen.prompt_room for r in rows)
    started = time.perf_counter()
    with ui.CountProgress("generate", len(rows), quiet) as bar:
        answers = gen.answer(rows, max_new_tokens, temperature, top_p, seed, batch_size, on_batch=bar)
    records = [{"prompt": _display_prompt(r), "answer": a} for r, a in zip(rows, answers)]
    if cut and not quiet:
        lost = "end" if gen.bundle.family == causal_lm.SEQ2SEQ_FAMILY else "start"  # (Generator.prompt_ids)
        ui.console.print(f"[yellow]warning:[/] {cut} prompt(s) longer than {gen.bundle.max_length} tokens lost their "
                         f"{lost}")
    if output is not None:
        write_text_atomic(Path(output), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        if not quiet:
            ui.console.print(f"wrote {len(records)} answers to {output} ({time.perf_counter() - started:.1f}s)")
    return records


EXPORT_CHECK_PROMPTS = 8


def _export_source(opened: Any) -> Path:
    """The first of the run's test, validation and training files that still exists (what an
    export is checked on)."""
    cfg = opened.config
    source = next((f for f in (cfg.data.test, cfg.data.val, cfg.data.train) if f and Path(f).exists()), None)
    if source is None:
        raise DataError(f"{opened.dir}: none of the run's data files exist any more; the export cannot be checked")
    return Path(source)


def _checked_export(opened: Any, target: Path, kind: str, quiet: bool, *, auto: Any, extra: Any, outputs: Any,
                    reference: list[str], what: tuple[str, str, str], source: Path, save: Any = None) -> dict[str, Any]:
    """Write the run's model as a transformers folder (``kind``: model, adapter, or merged: the
    adapter folded in, ``auto.from_pretrained`` loads it without peft; ``extra(folder)`` adds what
    else the folder needs; or onnx: ``save(folder)`` writes it and returns it loaded), load it back, and keep it
    only if ``outputs(loaded_model)`` equals ``reference`` (the run's own outputs). ``what``: (the outputs' noun,
    export.json's key, the verb). An export.json already in the folder (transformers' manifest of an ONNX export)
    keeps its keys."""
    import shutil

    from fmtune.fsutil import atomic_dir, folder_digest

    bundle = opened.bundle
    noun, key, verb = what
    result: dict[str, Any] = {"run": str(opened.dir), "model_version": folder_digest(opened.dir / "model"),
                              "out": str(target), "format": "onnx" if kind == "onnx" else "hf", "kind": kind,
                              "strategy": opened.config.strategy.name, f"checked_{noun}": len(reference),
                              "source": str(source)}

    def write(tmp: Path) -> None:
        if save is not None:
            loaded = save(tmp)
        elif kind == "merged":
            causal_lm.merged(bundle).save_pretrained(tmp, safe_serialization=True)
            bundle.tokenizer.save_pretrained(tmp)
            extra(tmp)
            loaded = auto.from_pretrained(tmp, dtype=torch.float32)
        else:
            shutil.copytree(opened.dir / "model", tmp, dirs_exist_ok=True)
            loaded = build.load(tmp).model
        same = sum(a == b for a, b in zip(outputs(loaded), reference))
        result[key] = same
        if same != len(reference):
            raise DataError(f"export check failed: the exported model {verb} {len(reference) - same} of "
                            f"{len(reference)} {noun} of {source} differently from the run; nothing was written")
        (tmp / "export.json").write_text(json.dumps(read_json(tmp / "export.json", {}) | result, indent=2))

    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_dir(target, write)
    if not quiet:
        how = {"merged": f"adapter folded into the weights: {auto.__name__}.from_pretrained(folder), no peft",
               "adapter": "peft adapter folder: PeftModel.from_pretrained on the base model",
               "model": f"{auto.__name__}.from_pretrained(folder)",
               "onnx": "prefill.onnx and decode.onnx, the KV cache their inputs and outputs; "
                       "transformers.exporters.ExportedModel.from_pretrained(folder) runs them on onnxruntime, "
                       "fmtune generate/serve --backend onnx decode with them"}[kind]
        ui.console.print(f"exported {opened.dir} -> {target} ({how}); checked: the same {key[5:].replace('_', ' ')} "
                         f"as the run for {len(reference)} {noun} of {source}")
    return result


def export_run(opened: Any, target: Path, kind: str, quiet: bool = False) -> dict[str, Any]:
    """``fmtune export`` of a generation run (``kind``: model, adapter or merged; onnx: ``_save_onnx``): the folder
    is loaded back and must give the same greedy answers as the run to up to 8 prompts of the
    run's data, or nothing is written. A speech recognition run: the same transcripts of up to
    8 clips (the folder holds the feature extractor too)."""
    if opened.task.modality == "audio":
        if kind == "onnx":
            raise ConfigError(f"--format onnx: a {opened.task.name} run exports as a Hugging Face folder (--format hf)")
        return _export_speech(opened, target, kind, quiet)
    gen = Generator(opened.dir, opened)
    cfg, bundle = gen.config, gen.bundle
    if kind == "onnx":
        _onnx_exportable(gen)
    source = _export_source(opened)
    rows = read_rows(source, cfg.data, with_targets=False).head(EXPORT_CHECK_PROMPTS).to_dict("records")
    prompts = [gen.prompt_ids(r)[0] for r in rows]
    s = GenerationSettings(cfg.eval.max_new_tokens, 0, EXPORT_CHECK_PROMPTS)
    reference = generate(bundle.model, bundle.tokenizer, prompts, s, gen.device)
    save = (lambda tmp: _save_onnx(gen, prompts, tmp, quiet)) if kind == "onnx" else None
    device = torch.device("cpu") if kind == "onnx" else gen.device  # (onnxruntime on the CPU)
    return _checked_export(opened, target, kind, quiet, auto=causal_lm.auto_class(bundle.family),
                           extra=lambda tmp: None,
                           outputs=lambda m: generate(m.to(device), bundle.tokenizer, prompts, s, device),
                           reference=reference, what=("prompts", "same_greedy_answers", "answers"), source=source,
                           save=save)


def _onnx_exportable(gen: Generator) -> None:
    if gen.bundle.family == causal_lm.SEQ2SEQ_FAMILY:
        raise ConfigError("--format onnx: ONNX export of generation covers decoder-only models; an encoder-decoder "
                          "run exports as a Hugging Face folder (--format hf)")
    if gen.bundle.adapter == "prompt":
        raise ConfigError("--format onnx: prompt-tuned runs cannot be exported to ONNX (the virtual tokens are not "
                          "part of the weights); serve them with the torch backend")
    from transformers import DynamicCache

    config = adapters.base_model(gen.bundle.model).config
    kinds = sorted({type(layer).__name__ for layer in DynamicCache(config=config).layers} - {"DynamicLayer"})
    if kinds:  # tested: Mistral's and Gemma 2's decode graphs give other logits than the model from the 2nd token
        raise ConfigError(f"--format onnx: this {config.model_type} model keeps a cache with {', '.join(kinds)} "
                          "layers, which transformers' exporter does not decode exactly (sliding-window attention, "
                          "state-space layers); export it as a Hugging Face folder (--format hf)")


def _save_onnx(gen: Generator, prompts: list[list[int]], folder: Path, quiet: bool) -> Any:
    """The run's model (its adapter folded in) as ``onnx_export.export_generation``'s two graphs, with the tokenizer,
    the greedy generation_config fmtune decodes with, and preprocessing.json (how prompts are written); returns it
    loaded (``onnx_export.OnnxCausalLM``). Traced from two of the check's prompts, left-padded."""
    from fmtune.onnx_export import PREP_FILE, OnnxCausalLM, export_generation

    bundle, tok = gen.bundle, gen.bundle.tokenizer
    plain = causal_lm.merged(bundle)  # (in place, as the merged export does: the run's answers are already taken)
    sample = sorted(prompts, key=len)[-2:] if len(prompts) > 1 else (prompts or [[tok.eos_token_id]]) * 2
    if len(sample[0]) == len(sample[1]):  # a padded row, so the graph is traced with its mask's zeros
        sample = [sample[0][1:] or sample[0], sample[1]]
    width = max(map(len, sample))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in sample])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in sample])
    with contextlib.nullcontext() if quiet else ui.console.status(
            f"export onnx: tracing prefill and decode of {type(plain).__name__} (minutes for a 100M model)"):
        export_generation(plain.to("cpu"), ids, mask, folder)
    tok.save_pretrained(folder)
    generation_config(tok, gen.config.eval.max_new_tokens).save_pretrained(folder)
    prep = {"kind": "text", "task": "generation", "instruction": gen.task.instruction, "chat_template": gen.template,
            "max_length": bundle.max_length, "max_new_tokens": gen.config.eval.max_new_tokens,
            "prompts": "left-padded token ids and attention_mask; position_ids count a row's real tokens; prefill "
                       "gives the logits and the cache, decode takes one token per row and the cache"}
    (folder / PREP_FILE).write_text(json.dumps(prep, indent=2))
    return OnnxCausalLM(folder)


def _export_speech(opened: Any, target: Path, kind: str, quiet: bool) -> dict[str, Any]:
    from transformers import AutoModelForCTC, AutoModelForSpeechSeq2Seq

    from fmtune.models import ctc, speech

    cfg, bundle, task = opened.config, opened.bundle, opened.task
    is_ctc = bundle.family == causal_lm.CTC_FAMILY
    device = hardware.choose(cfg.train.device, "fp32", cfg.train.num_threads).device
    source = _export_source(opened)
    rows = read_data(source, task, cfg.data, split=None).head(EXPORT_CHECK_PROMPTS)  # (any rows: their inputs)
    ds, _ = task.dataset(rows, bundle, cfg.data, with_targets=False)
    rows = list(range(len(ds)))

    def outputs(model: torch.nn.Module) -> list[str]:
        if is_ctc:
            return ctc.transcribe(model.to(device), bundle.tokenizer, ds, rows, EXPORT_CHECK_PROMPTS, device)
        return speech.transcribe(model.to(device), bundle.tokenizer, ds, rows, EXPORT_CHECK_PROMPTS, device,
                                 task.language, full_window=not bundle.audio.get(speech.BUCKETED, False))

    return _checked_export(opened, target, kind, quiet,
                           auto=AutoModelForCTC if is_ctc else AutoModelForSpeechSeq2Seq,
                           extra=lambda tmp: (ctc if is_ctc else speech).write_extra(bundle, tmp), outputs=outputs,
                           reference=outputs(bundle.model), what=("clips", "same_transcripts", "transcribes"),
                           source=source)
