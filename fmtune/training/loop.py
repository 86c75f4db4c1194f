"""fit(): the one training loop every task and strategy shares.

Forward, loss (owned by the task), backward, clip, step, evaluate, keep the best checkpoint,
write the resume checkpoint, stop early. Built on accelerate.Accelerator so multi-process runs
need no rewrite.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from fmtune.data.dataset import epoch_batches
from fmtune.errors import ConfigError, Interrupted, TrainingError
from fmtune.strategies import set_train_mode
from fmtune.training import checkpoint, fsdp, prefetch
from fmtune.training.distributed import broadcast_flag, gathered_infer, params_in_sync, same_layers, shard
from fmtune.training.dropout import fast_dropout
from fmtune.training.infer import infer
from fmtune.training.optim import make_optimizer, make_scheduler
from fmtune.training.perturb import adversarial_batch

METRICS_FILE, TB_DIR = "metrics.jsonl", "tb"
WEIGHT_KEY = "aux_weight"  # a batch's per-example loss weights (task.group_weights)
NOT_SCALARS = ("type", "step", "epoch", "seconds", "eval_seconds", "best")  # log keys that are no metric


@dataclass
class FitResult:
    metric: str
    best: float | None
    best_step: int
    steps: int
    epochs: float
    stopped_early: bool
    out_of_time: bool
    seconds: float
    samples_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    processes: int = 1
    params_in_sync: bool | None = None  # several processes: every rank ended with the same weights
    weights_per_rank_mib: float | None = None  # several processes: the model weights one rank holds


class _Log:
    """metrics.jsonl, appended line by line, and the same numbers as TensorBoard scalars in
    ``tb/``; on resume, what was logged after the checkpoint is dropped from both."""

    def __init__(self, path: Path, keep_until_step: int | None, trackers: list[Any] = ()):
        self.path, self.trackers = path, list(trackers)
        if keep_until_step is not None and path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= keep_until_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif keep_until_step is None:
            path.write_text("")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(path.parent / TB_DIR), purge_step=(keep_until_step or 0) + 1
                                if keep_until_step else None)

    def write(self, **record: Any) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, default=float) + "\n")
        kind = {"train": "train", "eval": "val"}.get(record.get("type", ""), record.get("type", "log"))
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k not in NOT_SCALARS and isinstance(v, (int, float))}
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, record.get("step", 0))
        self.tb.flush()
        for t in self.trackers:
            t.log(scalars, record.get("step", 0))

    def close(self) -> None:
        self.tb.close()


class _NoLog:
    """What ranks other than 0 log: nothing."""

    def write(self, **record: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _improved(value: float, best: float | None, greater: bool, min_delta: float) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if greater else value < best - min_delta


def _better(res: dict[str, float], best: float | None, best_rec: dict[str, Any] | None, metric: str, greater: bool,
            min_delta: float) -> bool:
    """``res`` beats the best evaluation so far: on the metric, or on a tie of the metric (a word error
    rate or an accuracy on a small validation set often ties) by a lower validation loss. ``best_rec``
    is the best evaluation's log record (values rounded to 6 digits, as ``res`` is compared)."""
    if _improved(res[metric], best, greater, min_delta):
        return True
    return (metric != "loss" and best_rec is not None and "loss" in res and "loss" in best_rec
            and round(res[metric], 6) == best_rec.get(metric) and round(res["loss"], 6) < best_rec["loss"])


class _StopRequest:
    """While training, the first SIGINT or SIGTERM (Ctrl-C; a scheduler's preemption; torchrun
    passing a Ctrl-C on) asks to stop at the next step boundary and save there; a second one
    interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def resolve_metric(task: Any, cfg: Any) -> str:
    """The validation metric that picks the best checkpoint; unknown names are a ConfigError."""
    metric = task.default_metric if cfg.metric == "auto" else cfg.metric
    if metric not in task.metric_names:
        raise ConfigError(f"train.metric: {metric!r} is not computed for task {task.name!r}; "
                          f"choose one of: {', '.join(task.metric_names)}")
    return metric


def _diverged(loss: float, state: dict, run_dir: Path) -> TrainingError:
    return TrainingError(
        f"the training loss became {loss} at epoch {state['epoch'] + 1}, step {state['step']}; "
        f"stopped. The best checkpoint ({run_dir / 'model'}, step {state['best_step']}) is intact. "
        "Try a lower train.lr, train.grad_clip, or check the targets for extreme values")


def fit(bundle: Any, task: Any, train_ds: Any, val_ds: Any, cfg: Any, run_dir: Path, *, hardware: Any,
        resume: bool = False, save_best: Callable[[], None], progress: Any = None,
        net: torch.nn.Module | None = None, trackers: list[Any] = (),
        on_eval: Callable[[dict], None] | None = None,
        penalty: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None,
        eval_first: bool = False, keep_last: bool = False, steps: int | None = None) -> FitResult:
    """Train ``bundle.model`` on ``train_ds``; evaluate on ``val_ds``; save the best via ``save_best``.

    ``net`` is what the batches are fed to when it is not the model itself (the model seen
    from the feature cache); its parameters are the model's. ``penalty(logits, aux)`` is added
    to the task's loss (continual learning), ``aux`` being the batch's ``aux_*`` tensors.
    ``eval_first``: validate (and keep as the best so far) the model as it starts, at step 0.
    ``keep_last``: every evaluation counts as the best (the validation set is no held-out set).
    ``steps``: the step budget, instead of the config's (0: only the evaluation of ``eval_first``).
    """
    run = _Fit(bundle, task, train_ds, val_ds, cfg, run_dir, hardware=hardware, save_best=save_best,
               progress=progress, net=net, on_eval=on_eval, penalty=penalty)
    run.keep_last = keep_last
    if steps is not None:
        run.total_steps = steps
    run.start(resume, trackers)
    if run.world == 1:
        return run.train(eval_first and not resume)
    with same_layers(run.model) as off:
        if off and run.main:
            drops = ", ".join(f"{k} {v}" for k, v in off.items())
            warnings.warn(f"LayerDrop off while {run.world} processes train ({drops}): each would skip other layers "
                          "and wait on the others for good", stacklevel=2)
        return run.train(eval_first and not resume)


class _Fit:
    """The state of one fit(): set up in named steps (accelerator and placement, optimizer,
    counters and log), then trained batch by batch (forward/backward, optimizer step, logging,
    evaluation, resume points), ended by finish()."""

    def __init__(self, bundle: Any, task: Any, train_ds: Any, val_ds: Any, cfg: Any, run_dir: Path, *,
                 hardware: Any, save_best: Callable[[], None], progress: Any, net: torch.nn.Module | None,
                 on_eval: Callable[[dict], None] | None, penalty: Any) -> None:
        self.bundle, self.task, self.train_ds, self.val_ds, self.cfg, self.run_dir = \
            bundle, task, train_ds, val_ds, cfg, run_dir
        self.hardware, self._save_best, self.progress, self.on_eval, self.penalty = \
            hardware, save_best, progress, on_eval, penalty
        self.metric = resolve_metric(task, cfg)
        self.keep_last = False
        self.greater = task.greater_is_better(self.metric)
        self._accelerator()
        self._place(net)
        self._optimizer()
        # a head-like strategy (at most 5% of the weights train) keeps its best weights in memory and in
        # every resume point, and writes model/ once: when training ends, stops or fails. Writing the
        # whole model at each improvement cost more than an epoch of training on cached features.
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.deferred = not self.sharded and n_trainable <= 0.05 * sum(p.numel() for p in self.model.parameters())

    # -- set-up steps ------------------------------------------------------------------------------

    def _accelerator(self) -> None:
        # A process may train several times with different precisions (or after a Trainer): drop the
        # previous run's accelerator settings, keeping the process group of a distributed launch.
        AcceleratorState._reset_state(reset_partial_state=False)
        acc = self.accelerator = Accelerator(cpu=self.hardware.device == "cpu",
                                             mixed_precision=self.hardware.precision)
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.device = acc.device
        set_seed(self.cfg.seed)

    def _place(self, net: torch.nn.Module | None) -> None:
        """The model onto the device (before the optimizer, so it can pick fused kernels); FSDP:
        sharded over the ranks, rank 0 keeping an unsharded copy on the CPU (what checkpoints are
        written from and the caller gets; a second whole model on the accelerator would defeat the point)."""
        self.model = self.bundle.model.to(self.device)
        self.sharded = self.world > 1 and self.cfg.distributed == "fsdp"
        self.whole = None
        if self.sharded:
            if net is not None:
                raise TrainingError("internal: FSDP shards the whole model; the feature cache cannot feed it")
            if self.main:
                self.whole = copy.deepcopy(self.model.cpu())
                self.model.to(self.device)
            fsdp.shard(self.model)
            if self.main:
                self.bundle.model = self.whole
        self.net = net if net is not None else self.model

    def _optimizer(self) -> None:
        cfg = self.cfg
        batches_per_epoch = math.ceil(len(self.train_ds) / cfg.batch_size)
        self.steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.total_steps)
        if self.sharded:  # the model stays as FSDP made it (no DDP wrapper)
            self.optimizer = self.accelerator.prepare(self.optimizer)
        else:
            if self.world > 1:  # images come channels_last (faster convolutions), so do a convolution's weight
                # gradients, which DDP copies into its buckets: a note on speed for torch's developers, not users
                warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.net, self.optimizer = self.accelerator.prepare(self.net, self.optimizer)
        self.plain_net = self.accelerator.unwrap_model(self.net)
        # a host sync per step would stall a GPU's queue; with several processes a decision taken on
        # one rank's own loss could leave the others waiting: both check the (reduced) loss when logging
        self.deferred_checks = self.device.type != "cpu" or self.world > 1

    def start(self, resume: bool, trackers: list[Any]) -> None:
        """The counters (from the resume checkpoint when resuming), the best weights kept in memory,
        and the log (rank 0 only)."""
        self.state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": None, "best_step": 0, "bad_evals": 0,
                      "history": [], "seconds": 0.0, "samples": 0, "stopped_early": False, "done": False,
                      "out_of_time": False}
        if resume:
            self.state.update(checkpoint.load_state(self.run_dir, self.model, self.optimizer, self.scheduler,
                                                    sharded=fsdp.load_full if self.sharded else None))
        self.best_weights = checkpoint.load_best(self.run_dir) if resume and self.deferred else None
        self.log = _Log(self.run_dir / METRICS_FILE, self.state["step"] if resume else None, trackers) \
            if self.main else _NoLog()

    # -- checkpoints -------------------------------------------------------------------------------

    def _gather_whole(self) -> None:
        """FSDP: the trained weights into rank 0's whole copy (every rank takes part)."""
        full = fsdp.full_state(self.model)
        if self.main:
            self.whole.load_state_dict(full)

    def _keep_best(self) -> None:
        if self.sharded:
            self._gather_whole()
        if self.deferred:
            self.best_weights = checkpoint.changing_state(self.model)
        elif self.main:
            self._save_best()

    def _write_deferred_best(self) -> None:
        """model/ from the best weights kept in memory (the model keeps its current ones)."""
        if not (self.deferred and self.main and self.best_weights is not None):
            return
        current = checkpoint.changing_state(self.model)
        self.model.load_state_dict(self.best_weights, strict=False)
        try:
            self._save_best()
        finally:
            self.model.load_state_dict(current, strict=False)

    def _save_resume_point(self, rng: dict[str, Any] | None = None) -> None:
        if self.sharded:  # every rank takes part in gathering the whole states; rank 0 writes them
            weights = fsdp.full_state(self.model)
            moments = fsdp.full_optimizer_state(self.model, self.optimizer.optimizer)
            if self.main:
                checkpoint.save_state(self.run_dir, self.model, self.optimizer, self.scheduler, self.state,
                                      rng=rng, weights=weights, optimizer_state=moments)
        elif self.main:
            checkpoint.save_state(self.run_dir, self.model, self.optimizer, self.scheduler, self.state, rng=rng,
                                  best=self.best_weights)

    # -- evaluation --------------------------------------------------------------------------------

    def _evaluate(self) -> None:
        state, cfg = self.state, self.cfg
        began = time.perf_counter()
        if hasattr(self.task, "evaluate_model"):  # a task that scores the model itself (generation)
            # loss and answers in the training's mixed precision (bf16 decoding: half the time of fp32 on a
            # CPU with native bf16; SmolLM2's validation loss the same to 4 decimals). The test split and the
            # baseline are scored after training in fp32, as `fmtune generate` answers
            with self.accelerator.autocast():
                res = self.task.evaluate_model(self.plain_net, self.val_ds, cfg.eval_batch_size, self.device)
        else:
            if self.world > 1:
                logits, targets = gathered_infer(self.plain_net, self.val_ds, cfg.eval_batch_size, self.device,
                                                 self.accelerator)
            else:
                logits, targets = infer(self.net, self.val_ds, cfg.eval_batch_size, self.device)
            res = self.task.validation_metrics(logits, targets, self.metric)
        rec = {"step": state["step"], "epoch": round(state["step"] / self.steps_per_epoch, 3),
               "seconds": round(time.perf_counter() - self.started, 3), **{k: round(v, 6) for k, v in res.items()},
               "eval_seconds": round(time.perf_counter() - began, 3)}
        best_rec = next((h for h in reversed(state["history"]) if h.get("best")), None)
        if self.keep_last or _better(res, state["best"], best_rec, self.metric, self.greater, cfg.min_delta):
            state.update(best=res[self.metric], best_step=state["step"], bad_evals=0)
            self._keep_best()  # the best checkpoint first: a crash after it still leaves the best model
            rec["best"] = True
        else:
            state["bad_evals"] += 1
        state["history"].append(rec)
        self.log.write(type="eval", **rec)
        if self.progress:
            self.progress.evaluated(rec, self.metric)
        if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
            state["stopped_early"] = True
        if self.on_eval is not None:
            self.on_eval(rec)
        self._train_mode()

    def _train_mode(self) -> None:
        self.net.train()
        set_train_mode(self.plain_net)

    # -- training ----------------------------------------------------------------------------------

    def train(self, eval_first: bool) -> FitResult:
        """Epochs until the step budget, early stopping or the time budget; Ctrl-C stops at the next
        step boundary and saves a resume point there that continues bit for bit (a second Ctrl-C
        stops at once, saving only if the model still sits at a boundary: partial gradient
        accumulation is discarded, and the boundary's RNG state is kept here)."""
        state = self.state
        self.started = time.perf_counter() - state["seconds"]
        self.last_save = time.perf_counter()
        if self.progress:
            self.progress.start(self.total_steps, state["step"])
        if eval_first:  # a head that starts solved: the candidate every epoch must beat
            self._evaluate()
        self._train_mode()
        self._reset_window()
        self.boundary_rng, self.at_boundary = checkpoint.rng_state(), True
        stop = _StopRequest()
        try:
            with fast_dropout(self.model, self.device.type == "cpu" and self.cfg.fast_dropout):
                while not state["done"] and state["step"] < self.total_steps and not state["stopped_early"]:
                    self._epoch(stop)
        except KeyboardInterrupt:
            self._interrupted()
        except BaseException:  # a failure: the best model goes to disk, as the error message says
            self._write_deferred_best()
            raise
        finally:
            stop.restore()
            self.log.close()
        if self.progress:
            self.progress.stop()
        self._write_deferred_best()
        return self._finish()

    def _epoch(self, stop: _StopRequest) -> None:
        """The rest of the current epoch: this rank's share of each batch (a batch smaller than the
        world: every rank takes it whole), collated ahead in the background (prefetch.batches: the
        same batches, in the same order)."""
        state, cfg = self.state, self.cfg
        batches = epoch_batches(len(self.train_ds), cfg.batch_size, cfg.seed, state["epoch"],
                                getattr(self.train_ds, "lengths", None))
        first, micro = state["batch_in_epoch"], 0
        mine = [shard(idx, self.rank, self.world) if self.world > 1 and len(idx) >= self.world else idx
                for idx in batches[first:]]
        with contextlib.closing(prefetch.batches(self.train_ds.collate, mine, self.hardware.loader)) as feed:
            for bi, host_batch in zip(range(first, len(batches)), feed):
                if self.at_boundary:  # several processes stop at the same step: rank 0 decides
                    if broadcast_flag(stop.requested, self.accelerator) if self.world > 1 else stop.requested:
                        raise KeyboardInterrupt
                self._forward_backward(host_batch, examples=len(batches[bi]))  # counted once, over all ranks
                micro += 1
                last_of_epoch = bi == len(batches) - 1
                if micro % cfg.grad_accum and not last_of_epoch:
                    continue
                self.at_boundary = False
                self._optimizer_step()
                state["batch_in_epoch"] = bi + 1
                if state["step"] % cfg.log_every == 0 or last_of_epoch:
                    self._log_window()
                if last_of_epoch:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
                at_end = self._at_end()
                if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or (
                        not cfg.eval_every and last_of_epoch) or at_end:
                    if not self._evaluated_here():
                        self._evaluate()
                state["seconds"] = time.perf_counter() - self.started
                if self._save_due() or at_end or state["stopped_early"]:
                    state["done"] = at_end or state["stopped_early"]
                    self._save_resume_point()
                    self.last_save = time.perf_counter()
                self.boundary_rng, self.at_boundary = checkpoint.rng_state(), True
                if at_end or state["stopped_early"]:
                    return

    def _forward_backward(self, host_batch: dict[str, torch.Tensor], examples: int) -> None:
        cfg = self.cfg
        batch = {k: v.to(self.device, non_blocking=True) for k, v in host_batch.items()}
        targets = batch.pop("labels")
        aux = {k: batch.pop(k) for k in [k for k in batch if k.startswith("aux_")]}
        local = len(targets)
        if cfg.adversarial != "none":
            batch, targets = adversarial_batch(self.plain_net, self.bundle.image, batch, targets, cfg.adversarial,
                                               cfg.adversarial_eps)
        with self.accelerator.autocast():
            logits = self.net(**batch).logits
        weights = aux.pop(WEIGHT_KEY, None)
        loss = self.task.loss(logits, targets) if weights is None else self.task.loss(logits, targets, weights.float())
        if self.penalty is not None:
            loss = loss + self.penalty(logits, aux)
        if not self.deferred_checks and not torch.isfinite(loss):
            raise _diverged(loss.item(), self.state, self.run_dir)
        self.accelerator.backward(loss / cfg.grad_accum)
        self.window_loss += loss.detach().float() * local  # stays on the device: no sync per step
        self.window_local += local
        self.window_n += examples
        self.state["samples"] += examples

    def _optimizer_step(self) -> None:
        """Clip, step, schedule, and flush the gradients as soon as we can."""
        if self.cfg.grad_clip:
            self.accelerator.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1

    def _reset_window(self) -> None:
        self.window_loss, self.window_n, self.window_local, self.window_t = 0.0, 0, 0, time.perf_counter()

    def _log_window(self) -> None:
        """The mean training loss since the last log line (over all ranks), checked for divergence."""
        dt = time.perf_counter() - self.window_t
        totals = torch.stack([torch.as_tensor(self.window_loss, dtype=torch.float32, device=self.device),
                              torch.tensor(float(self.window_local), device=self.device)])
        if self.world > 1:
            totals = self.accelerator.reduce(totals, "sum")
        mean_loss = float(totals[0]) / max(float(totals[1]), 1.0)
        if not math.isfinite(mean_loss):  # on a GPU, found here (up to log_every steps late)
            raise _diverged(mean_loss, self.state, self.run_dir)
        step = self.state["step"]
        self.log.write(type="train", step=step, epoch=round(step / self.steps_per_epoch, 3),
                       loss=round(mean_loss, 6), lr=self.scheduler.get_last_lr()[0],
                       samples_per_s=round(self.window_n / max(dt, 1e-9), 2))
        if self.progress:
            self.progress.trained(step, mean_loss)
        self._reset_window()

    def _at_end(self) -> bool:
        """The step budget is spent, or the time budget (decided on rank 0 for every rank)."""
        if self.state["step"] >= self.total_steps:
            return True
        if self.cfg.max_minutes:
            late = time.perf_counter() - self.started >= self.cfg.max_minutes * 60
            if broadcast_flag(late, self.accelerator) if self.world > 1 else late:
                self.state["out_of_time"] = True
                return True
        return False

    def _evaluated_here(self) -> bool:
        history = self.state["history"]
        return bool(history) and history[-1]["step"] == self.state["step"]

    def _save_due(self) -> bool:
        cfg = self.cfg
        return bool((cfg.save_every_steps and self.state["step"] % cfg.save_every_steps == 0)
                    or (time.perf_counter() - self.last_save) / 60 >= cfg.save_every_minutes
                    or self._evaluated_here())

    def _interrupted(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.at_boundary and not self.state["done"]:
            self.state["seconds"] = time.perf_counter() - self.started
            self._save_resume_point(rng=self.boundary_rng)
            if self.world > 1:  # every rank left at this boundary; let rank 0 finish writing
                self.accelerator.wait_for_everyone()
        self._write_deferred_best()
        raise Interrupted(f"interrupted; the resume checkpoint in {self.run_dir / 'state'} is at step "
                          f"{checkpoint.saved_step(self.run_dir)}: continue with  fmtune train --resume "
                          f"{self.run_dir}") from None

    def _finish(self) -> FitResult:
        state, model = self.state, self.model
        seconds = time.perf_counter() - self.started
        # accelerate wrapped the forward in autocast: take it off, so what runs after training (the
        # test split, the baseline, the caller) computes what a fresh load of the model computes
        self.accelerator.unwrap_model(self.net, keep_fp32_wrapper=False)
        # FSDP: each rank holds its shard, in sync by construction; rank 0's whole copy gets the final weights
        in_sync = params_in_sync(model, self.accelerator) if self.world > 1 and not self.sharded else None
        held = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()) / 2**20
        if self.sharded:
            self._gather_whole()
            if self.main:
                self.bundle.model = self.whole.to(self.device)
        return FitResult(self.metric, state["best"], state["best_step"], state["step"],
                         state["step"] / self.steps_per_epoch, state["stopped_early"], state["out_of_time"],
                         seconds, state["samples"] / max(seconds, 1e-9), state["history"], self.world, in_sync,
                         round(held, 3) if self.world > 1 else None)
