"""Continual fine-tuning: absorb new data into a finished run without forgetting the old.

    fmtune continue RUN --data new.csv --test new_test.csv --method replay --out RUN2

RUN2 starts from RUN's model, labels and preprocessing; labels new in ``new.csv`` extend the head
(the old classes' weights are kept, so the old logits are unchanged at the start), and labels
that no longer occur stay known. RUN is only read. Against forgetting (``continual.method``):

- ``replay``: a class-balanced memory of old training examples (``continual.memory``) is mixed
  into the new training data;
- ``ewc``: elastic weight consolidation, a penalty ``lambda/2 * sum F (w - w_old)^2`` on the
  trainable weights, with the Fisher information F of RUN's model estimated on the memory
  (labels drawn from the model's own predictions: the true Fisher, not the empirical one);
- ``lwf``: learning without forgetting, distillation of RUN's outputs on the new data into the
  old classes' logits;
- ``naive``: plain fine-tuning on the new data, the baseline the others are measured against.

Every continued run keeps its memory in ``RUN2/continual/`` (texts, or copies of the images):
a later ``fmtune continue RUN2`` draws its memory from it and RUN2's own data, so a chain
A -> B -> C remembers all of them without needing A's files. After training, every task of the
lineage that has a test set is scored with RUN's model (before) and RUN2's (after):
``continual.json`` holds the scores, the forgetting on the old tasks, the gain on the new one,
and the lineage.
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score

from fmtune import adapters, ui
from fmtune.data.dataset import WithAux
from fmtune.data.prepare import make_dataset, read_frames
from fmtune.data.readers import absolute_paths, read_any
from fmtune.errors import ConfigError, DataError, RunDirError
from fmtune.fsutil import read_json, read_jsonl, write_json
from fmtune.models import build
from fmtune.run import OpenRun, open_run
from fmtune.tasks import Classification, task_class
from fmtune.training.infer import infer
from fmtune.training.loop import METRICS_FILE

DIR, MEMORY_FILE, REPORT_FILE = "continual", "memory.csv", "continual.json"
AUX = "aux_old_logits"  # the batch key that carries RUN's logits to the lwf loss


def check(cfg: Any) -> None:
    task_class(cfg.task.type).require("continual", "continual learning (fmtune continue)")
    if cfg.continual.method == "lwf" and cfg.train.adversarial != "none":
        raise ConfigError("continual.method lwf distils on the new data's batches as they are; it does not mix "
                          "with train.adversarial")
    from fmtune.training.distributed import world_size

    if cfg.continual.method == "ewc" and cfg.train.distributed == "fsdp" and world_size() > 1:
        raise ConfigError("continual.method ewc anchors the whole weights of every process; use "
                          "train.distributed=ddp (or method replay / lwf) with FSDP")
    if cfg.model.init != "pretrained":
        raise ConfigError("continual learning starts from a trained run's weights; model.init does not apply")


def balanced_sample(df: pd.DataFrame, label_column: str, size: int, seed: int) -> pd.DataFrame:
    """At most ``size`` rows, as equal a share per label as the data allows (a label with fewer
    rows gives all of them and the others share what it leaves), drawn with ``seed``."""
    if size <= 0 or df.empty:
        return df.iloc[:0]
    rng = np.random.default_rng(seed)
    labels = df[label_column].astype(str).to_numpy()
    groups = {k: rng.permutation(np.flatnonzero(labels == k)) for k in sorted(set(labels))}
    take = {k: 0 for k in groups}
    left = min(size, len(df))
    while left > 0:  # hand out the budget one round at a time over the labels that still have rows
        open_ = [k for k in groups if take[k] < len(groups[k])]
        share = max(1, left // len(open_))
        for k in open_:
            n = min(share, len(groups[k]) - take[k], left)
            take[k] += n
            left -= n
            if left == 0:
                break
    rows = np.sort(np.concatenate([groups[k][: take[k]] for k in groups]))
    return df.iloc[rows]


class Setup:
    """What a continued run needs besides an ordinary one: the run it starts from, its memory of
    old examples, the extended task, the start weights and the anti-forgetting loss."""

    def __init__(self, cfg: Any, run_dir: Path | None):
        check(cfg)
        self.cfg, self.cc = cfg, cfg.continual
        try:
            self.source: OpenRun = open_run(self.cc.source)
        except RunDirError as e:
            raise RunDirError(f"continual.source: {e}") from None
        self.source.task.require("continual", f"continual learning from {self.source.dir}")
        wanted = self.cfg.strategy.name if adapters.is_peft(self.cfg.strategy.name) else None
        if (self.source.bundle.adapter or None) != wanted:
            how = (f"continue it with the same adapter strategy ({self.source.bundle.adapter}): its weights are that "
                   "adapter's" if self.source.bundle.adapter else "its weights are the whole model, and an adapter "
                   "is saved and read back on the pretrained backbone: continue it with full, last_n, bitfit or head")
            raise ConfigError(f"strategy: {self.source.dir} was trained with strategy "
                              f"{self.source.config.strategy.name}; {how}")
        self.old_labels = list(self.source.task.labels)
        self.memory = self._read_memory(run_dir) if run_dir is not None else self._draw_memory()

    # --- the memory of old examples -----------------------------------------------------------
    def _column(self) -> str:
        return self.cfg.data.text_column if self.source.bundle.kind == "text" else self.cfg.data.image_column

    def _old_rows(self) -> tuple[pd.DataFrame | None, str | None]:
        """RUN's own memory plus its training rows; None and why when they cannot be read."""
        src, scfg = self.source, self.source.config
        parts = []
        inherited = src.dir / DIR / MEMORY_FILE
        if inherited.is_file():
            parts.append(self._load_memory_file(inherited))
        old = pd.concat(parts, ignore_index=True) if parts else None
        try:
            train = read_frames(scfg.data, "classification", scfg.train.seed).train
        except (DataError, ConfigError, OSError) as e:
            return old, f"the training data of {src.dir} cannot be read ({e})"
        # RUN's column names, renamed to this run's (they differ only when --set says so)
        names = {(scfg.data.text_column if src.bundle.kind == "text" else scfg.data.image_column): self._column(),
                 scfg.data.label_column: self.cfg.data.label_column}
        missing = [c for c in names if c not in train.columns]
        if missing:
            return old, f"{scfg.data.train} has no column {missing[0]!r}"
        attrs = dict(train.attrs)  # where the rows come from: relative image paths need it
        train = train[list(names)].rename(columns=names)
        train.attrs = attrs
        if src.bundle.kind == "image":
            train = absolute_paths(train, self._column())
        return pd.concat([*parts, train], ignore_index=True), None

    def _draw_memory(self) -> pd.DataFrame:
        rows, why = self._old_rows()
        needs = self.cc.method in ("replay", "ewc")
        if rows is None:
            if needs:
                raise DataError(f"continual.method {self.cc.method} needs examples of the old task, and {why}; "
                                "restore that file, or use method lwf or naive")
            ui.console.print(f"[yellow]warning:[/] no memory of old examples is kept: {why}")
            return pd.DataFrame(columns=[self._column(), self.cfg.data.label_column])
        mem = balanced_sample(rows, self.cfg.data.label_column, self.cc.memory, self.cfg.train.seed)
        if needs and mem.empty:
            raise ConfigError(f"continual.method {self.cc.method} needs continual.memory > 0")
        mem = mem.reset_index(drop=True)
        mem.attrs["source"] = f"the memory of {self.source.dir}"
        return mem

    def _load_memory_file(self, path: Path) -> pd.DataFrame:
        df = read_any(path)
        return absolute_paths(df, self._column()) if self.source.bundle.kind == "image" else df

    def _read_memory(self, run_dir: Path) -> pd.DataFrame:
        path = run_dir / DIR / MEMORY_FILE
        if not path.is_file():
            raise RunDirError(f"{run_dir}: {DIR}/{MEMORY_FILE} is missing; this continued run cannot be resumed")
        return self._load_memory_file(path)

    def write_memory(self, run_dir: Path) -> None:
        """The memory into ``RUN2/continual/``: texts as they are, images copied beside it."""
        folder = run_dir / DIR
        folder.mkdir(parents=True, exist_ok=True)
        mem = self.memory.copy()
        if self.source.bundle.kind == "image" and len(mem):
            (folder / "images").mkdir(exist_ok=True)
            names, lost = [], []
            for i, p in enumerate(mem[self._column()].astype(str)):
                name = f"images/{i:06d}{Path(p).suffix.lower() or '.png'}"
                try:
                    shutil.copyfile(p, folder / name)
                except OSError as e:  # an old image gone since: the memory is a little smaller
                    lost.append(f"{p}: {e.strerror or e}")
                    name = None
                names.append(name)
            mem[self._column()] = names
            mem = mem[mem[self._column()].notna()].reset_index(drop=True)
            if lost:
                ui.console.print(f"[yellow]warning:[/] {len(lost)} old image(s) could not be copied into the memory "
                                 f"(first: {lost[0]})")
        tmp = folder / f".{MEMORY_FILE}.tmp"
        mem.to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)  # every text quoted: line breaks stay inside
        tmp.replace(folder / MEMORY_FILE)
        if self.source.bundle.kind == "image":  # from now on the copies are the memory
            self.memory = self._load_memory_file(folder / MEMORY_FILE)

    def with_memory(self, frames: Any) -> Any:
        """Replay: the memory mixed into the new training rows (validation stays new data only)."""
        if self.cc.method != "replay" or self.memory.empty:
            return frames
        col = self._column()
        train = absolute_paths(frames.train, col) if self.source.bundle.kind == "image" else frames.train
        mixed = pd.concat([train, self.memory], ignore_index=True)
        mixed.attrs = dict(frames.train.attrs)
        frames.train = mixed
        return frames

    # --- task and start weights ---------------------------------------------------------------
    def task(self, train: pd.DataFrame) -> Classification:
        """RUN's labels, then the labels new in ``train`` (sorted); class weights on ``train``."""
        col = self.cfg.data.label_column
        if col not in train.columns:
            raise DataError(f"{train.attrs.get('source')}: no label column {col!r}")
        seen = {str(v) for v in train[col].dropna()}
        new = sorted(seen - set(self.old_labels))
        task = Classification(self.old_labels + new, threshold=self.source.task.threshold)
        if self.cfg.task.class_weights:
            ids = task.encode(train[col], train, col)
            counts = torch.bincount(ids, minlength=len(task.labels)).float()
            task.class_weights = counts.sum() / (len(task.labels) * counts.clamp(min=1))
        return task

    def start_from_source(self, bundle: build.Bundle) -> None:
        """Give ``bundle`` (built for the grown task, its strategy applied: an adapter run's model
        is wrapped the same way as RUN's) RUN's weights, the head grown by one row per new label
        (new rows freshly initialised, old rows as they were)."""
        extend_head(bundle.model, self.source.bundle.model.state_dict())

    # --- the loss against forgetting ----------------------------------------------------------
    def penalty(self, model: torch.nn.Module, raw_train: Any, train: Any, device: Any,
                quiet: bool) -> tuple[Any, Any]:
        """(the training set, the penalty for ``fit``), from the model at its start weights: lwf
        gives the training set ``train`` RUN's logits on ``raw_train`` (its uncached inputs) to
        distil from; ewc a penalty on the trainable weights; replay and naive neither."""
        method = self.cc.method
        if method == "lwf":
            k = len(self.old_labels)
            with ui.CountProgress("previous model's outputs (lwf)", len(raw_train), quiet) as bar:
                old, _ = infer(model, raw_train, self.cfg.train.eval_batch_size, device, progress=bar)
            return WithAux(train, {AUX: old[:, :k].contiguous()}), lwf_loss(self.cc.lwf_alpha, self.cc.lwf_temperature)
        if method == "ewc":
            ds = make_dataset(self.memory, self.source.bundle, Classification(self.old_labels), self.cfg.data,
                              allow_unknown=True)[0]
            n = min(self.cc.fisher_samples, len(ds))
            pick = np.random.default_rng(self.cfg.train.seed).choice(len(ds), size=n, replace=False)
            with ui.CountProgress("Fisher information (ewc)", n, quiet) as bar:
                fisher = fisher_diagonal(model, ds, sorted(int(i) for i in pick), len(self.old_labels), device,
                                         self.cfg.train.seed, bar)
            lam = self.cc.ewc_lambda
            if lam is None:
                lam = self.old_examples() / max(len(train), 1)
            self.ewc_info = {"lambda": lam, "fisher_samples": n,
                             "fisher_mean": float(torch.cat([f.flatten() for f in fisher.values()]).mean())}
            self.ewc = EWC(model, fisher, lam)
            return train, self.ewc
        return train, None

    def old_examples(self) -> int:
        """How many old training examples the lineage saw (EWC's default weight)."""
        prior = read_json(self.source.dir / REPORT_FILE, {})
        if prior:
            return int(sum(step.get("train_examples", 0) for step in prior.get("lineage", [])))
        info = self.source.info().get("data", {}).get("train", {})
        return int(info.get("rows") or len(self.memory))

    # --- after training: before / after on every task -----------------------------------------
    def lineage(self) -> list[dict[str, Any]]:
        prior = read_json(self.source.dir / REPORT_FILE, {})
        if prior.get("lineage"):
            return list(prior["lineage"])
        scfg = self.source.config
        return [{"run": str(self.source.dir), "task": _task_name(scfg.data.train, 1), "train": scfg.data.train,
                 "test": scfg.data.test, "labels": self.old_labels, "method": None,
                 "train_examples": int(self.source.info().get("data", {}).get("train", {}).get("rows") or 0)}]

    def report(self, run_dir: Path, bundle: build.Bundle, task: Classification, train_rows: int,
               quiet: bool) -> dict[str, Any]:
        started = time.perf_counter()
        chain = self.lineage()
        name = self.cc.task_name or _task_name(self.cfg.data.train, len(chain) + 1)
        names = {s["task"] for s in chain}
        while name in names:
            name += "'"
        step = {"run": str(run_dir), "task": name, "train": self.cfg.data.train, "test": self.cfg.data.test,
                "labels": sorted({*task.labels} - set(self.old_labels)) or None, "method": self.cc.method,
                "train_examples": train_rows}
        chain.append(step)
        rows = []
        for s in chain:
            if not s.get("test"):
                rows.append({"task": s["task"], "test": None, "note": "no test data"})
                continue
            df = read_any(s["test"], self.cfg.data.encoding, media=self.cfg.data)  # (its data.media_root, templates)
            ds = make_dataset(df, bundle, task, self.cfg.data, allow_unknown=True)[0]  # one preprocessing: RUN's
            before = score(self.source.bundle.model, self.old_labels, ds, task, self.cfg.train.eval_batch_size)
            after = score(bundle.model, task.labels, ds, task, self.cfg.train.eval_batch_size)
            row = {"task": s["task"], "test": s["test"], "examples": before.pop("examples"), "before": before,
                   "after": {k: v for k, v in after.items() if k != "examples"}}
            if s is step:
                row["gain"] = row["after"]["accuracy"] - row["before"]["accuracy"]
            else:
                row["forgetting"] = row["before"]["accuracy"] - row["after"]["accuracy"]
            rows.append(row)
        old = [r["forgetting"] for r in rows if "forgetting" in r]
        scored = [r for r in rows if "after" in r]
        out = {"method": self.cc.method, "source": str(self.source.dir), "run": str(run_dir), "new_task": name,
               "labels": {"kept": self.old_labels, "added": step["labels"] or []},
               "tasks": rows,
               "mean_forgetting": float(np.mean(old)) if old else None,
               "new_task_gain": next((r.get("gain") for r in rows if r["task"] == name and "gain" in r), None),
               "average_accuracy_after": float(np.mean([r["after"]["accuracy"] for r in scored])) if scored else None,
               "memory": {"examples": len(self.memory), "file": f"{DIR}/{MEMORY_FILE}",
                          "per_label": self.memory[self.cfg.data.label_column].astype(str).value_counts()
                          .sort_index().to_dict() if len(self.memory) else {}},
               "settings": {k: v for k, v in vars(self.cc).items() if k != "source"},
               "lineage": chain, "seconds": round(time.perf_counter() - started, 2)}
        if getattr(self, "ewc", None) is not None:
            out["ewc"] = {**self.ewc_info, **self._ewc_strength(run_dir, quiet)}
        write_json(run_dir / REPORT_FILE, out)
        if not quiet:
            table = [[r["task"], r.get("examples", ""), r["before"]["accuracy"] if "before" in r else "",
                      r["after"]["accuracy"] if "after" in r else "",
                      (-r["forgetting"] if "forgetting" in r else r.get("gain", "")) if "after" in r else r.get("note")]
                     for r in rows]
            ui.console.print(ui.table(f"continual ({self.cc.method}): accuracy per task", ["task", "examples",
                                      f"before ({self.source.dir.name})", "after", "change"], table))
            ui.console.print(f"continual: {run_dir / REPORT_FILE}")
        return out

    def _ewc_strength(self, run_dir: Path, quiet: bool) -> dict[str, Any]:
        """The penalty of the kept model against its validation loss: whether EWC held anything."""
        with torch.no_grad():
            penalty = float(self.ewc())
        kept = [e for e in read_jsonl(run_dir / METRICS_FILE) if e.get("type") == "eval" and e.get("best")]
        loss = kept[-1].get("loss") if kept else None
        out = {"penalty_of_kept_model": penalty, "val_loss_of_kept_model": loss}
        if loss and penalty < 0.01 * loss:
            out["note"] = (f"the penalty ({penalty:.2g}) is under 1% of the validation loss ({loss:.3g}): it held the "
                           "weights barely; raise continual.ewc_lambda (--ewc-lambda) by 100-1000x")
            if not quiet:
                ui.console.print(f"[yellow]ewc:[/] {out['note']}")
        return out


def _task_name(train: Any, k: int) -> str:
    return Path(str(train)).stem if train else f"task{k}"


def score(model: torch.nn.Module, labels: list[str], ds: Any, task: Classification, batch_size: int) -> dict:
    """Accuracy and macro-F1 of a model whose outputs are ``labels`` on a dataset labelled with
    ``task``'s labels: a row whose label the model does not know counts as wrong."""
    logits, targets = infer(model, ds, batch_size)
    pred = [labels[int(i)] for i in logits.argmax(-1)]
    true = [task.labels[int(t)] if t >= 0 else "<unknown>" for t in targets]
    f1 = f1_score(true, pred, labels=sorted(set(true) | set(pred)), average="macro", zero_division=0)
    return {"examples": len(true), "accuracy": float(np.mean([p == t for p, t in zip(pred, true)])),
            "macro_f1": float(f1)}


def extend_head(model: torch.nn.Module, old: dict[str, torch.Tensor]) -> None:
    """Load ``old`` (a trained model's state) into ``model``, whose head has as many or more
    outputs: every weight is copied, the head's rows for the old outputs too; the new rows keep
    their fresh initialisation."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in old]
    if missing:
        raise RunDirError(f"the run's model does not fit this architecture (no weights for {missing[:3]})")
    for k, v in old.items():
        if k not in mine:
            raise RunDirError(f"the run's model does not fit this architecture (unexpected {k})")
        target = mine[k]
        if target.shape == v.shape:
            target.copy_(v)
        elif target.dim() >= 1 and target.shape[1:] == v.shape[1:] and target.shape[0] > v.shape[0]:
            target[: v.shape[0]].copy_(v)  # the head: old outputs first
        else:
            raise RunDirError(f"the run's weight {k} has shape {tuple(v.shape)}, this model {tuple(target.shape)}")


def lwf_loss(alpha: float, temperature: float) -> Any:
    """Distillation of the previous model's logits (batch key AUX) into the old outputs' logits."""
    def loss(logits: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        old = aux[AUX].float()
        mine = logits[:, : old.shape[1]].float()
        t = temperature
        return alpha * t * t * F.kl_div(F.log_softmax(mine / t, -1), F.log_softmax(old / t, -1),
                                        log_target=True, reduction="batchmean")

    return loss


def fisher_diagonal(model: torch.nn.Module, ds: Any, idx: list[int], k_old: int, device: Any, seed: int,
                    progress: Any = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher information of ``model``'s first ``k_old`` outputs, per trainable weight:
    the mean over examples of the squared gradient of log p(y|x), y drawn from the model itself."""
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    for i in idx:
        batch = {k: v.to(device) for k, v in ds.collate([i]).items() if k != "labels"}
        logits = model(**batch).logits[:, :k_old].float()
        logp = F.log_softmax(logits, -1)
        y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=gen).to(logp.device)
        model.zero_grad(set_to_none=True)
        logp.gather(1, y).sum().backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        if progress is not None:
            progress(1)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / max(len(idx), 1) for n, f in fisher.items()}


class EWC:
    """``lambda/2 * sum F (w - w_anchor)^2`` over the trainable weights; zero at the anchor."""

    def __init__(self, model: torch.nn.Module, fisher: dict[str, torch.Tensor], lam: float):
        self.lam = lam
        named = dict(model.named_parameters())
        self.terms = [(named[n], f, named[n].detach().clone()) for n, f in fisher.items()]

    def __call__(self, logits: torch.Tensor | None = None, aux: dict | None = None) -> torch.Tensor:
        total = sum((f * (p - a) ** 2).sum() for p, f, a in self.terms)
        return 0.5 * self.lam * total


def continue_config(source: str | Path, data: str | Path, *, val: str | Path | None = None,
                    test: str | Path | None = None, method: str = "replay", out: str | Path | None = None,
                    overrides: list[str] | None = None) -> Any:
    """The config of a new run that continues the finished run ``source`` on new data (``fmtune
    continue``; ``api.continue_run`` trains it).

    The new run takes ``source``'s config (model, strategy, training settings, columns), with
    ``data``/``val``/``test`` as its data and ``overrides`` (``key=value``) on top; ``source``
    itself is only read.
    """
    from fmtune import config
    from fmtune.run import read_config

    src = Path(source)
    trained = read_config(src)
    base = trained.to_dict()
    open_run(src)  # a finished run: its model must be there
    base.update(name=None, out=None, search={})
    base["data"].update(train=str(data), val=None if val is None else str(val),
                        test=None if test is None else str(test), max_train_samples=None)
    base["continual"] = {**base.get("continual", {}), "source": str(src.resolve()), "method": method,
                         "task_name": None}
    # a run trained at its strategy's default rate, continued with another strategy, takes that
    # strategy's default (LoRA at full fine-tuning's 5e-5 barely moves); a rate set by hand is kept
    set_keys = {config.parse_override(o)[0] for o in overrides or []}
    if ("train.lr" not in set_keys and trained.strategy.name in config.DEFAULT_LR
            and trained.train.lr == config.default_lr(trained.strategy, trained.task.type, trained.model.name)):
        base["train"]["lr"] = None
    cfg = config.load(None, overrides, base)
    if cfg.name is None and cfg.out is None:
        cfg.name = f"{src.name}-{cfg.continual.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out is not None:
        cfg.out = str(out)
    target = Path(cfg.out or Path("runs") / cfg.name).resolve()
    if target == src.resolve() or src.resolve() in target.parents:
        raise ConfigError(f"--out {target}: the run being continued ({src}) is never modified; give another folder")
    return cfg
