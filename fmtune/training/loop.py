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
from fmtune.training.distributed import broadcast_flag, gathered_infer, params_in_sync, shard
from fmtune.training.infer import infer
from fmtune.training.optim import make_optimizer, make_scheduler
from fmtune.training.perturb import adversarial_batch

METRICS_FILE, TB_DIR = "metrics.jsonl", "tb"


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
                   if k not in ("type", "step", "epoch", "seconds", "best") and isinstance(v, (int, float))}
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
        eval_first: bool = False) -> FitResult:
    """Train ``bundle.model`` on ``train_ds``; evaluate on ``val_ds``; save the best via ``save_best``.

    ``net`` is what the batches are fed to when it is not the model itself (the model seen
    from the feature cache); its parameters are the model's. ``penalty(logits, aux)`` is added
    to the task's loss (continual learning), ``aux`` being the batch's ``aux_*`` tensors.
    ``eval_first``: validate (and keep as the best so far) the model as it starts, at step 0.
    """
    # A process may train several times with different precisions (or after a Trainer): drop the
    # previous run's accelerator settings, keeping the process group of a distributed launch.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=hardware.device == "cpu", mixed_precision=hardware.precision)
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(cfg.seed)
    model = bundle.model.to(accelerator.device)  # before the optimizer, so it can pick fused kernels
    sharded = world > 1 and cfg.distributed == "fsdp"
    whole = None  # FSDP: rank 0's unsharded copy, what checkpoints are written from and the caller gets
    if sharded:
        if net is not None:
            raise TrainingError("internal: FSDP shards the whole model; the feature cache cannot feed it")
        if main:  # copied on the CPU: a second whole model on the accelerator would defeat the point
            whole = copy.deepcopy(model.cpu())
            model.to(accelerator.device)
        fsdp.shard(model)
        if main:
            bundle.model = whole
    net = net if net is not None else model
    metric = resolve_metric(task, cfg)
    greater = task.greater_is_better(metric)

    batches_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    if sharded:
        optimizer = accelerator.prepare(optimizer)  # the model stays as FSDP made it (no DDP wrapper)
    else:
        net, optimizer = accelerator.prepare(net, optimizer)
    device = accelerator.device
    # a host sync per step would stall a GPU's queue; with several processes a decision taken on
    # one rank's own loss could leave the others waiting: both check the (reduced) loss when logging
    deferred_checks = device.type != "cpu" or world > 1
    plain_net = accelerator.unwrap_model(net)

    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "best": None, "best_step": 0, "bad_evals": 0,
             "history": [], "seconds": 0.0, "samples": 0, "stopped_early": False, "done": False, "out_of_time": False}
    if resume:
        state.update(checkpoint.load_state(run_dir, model, optimizer, scheduler,
                                           sharded=fsdp.load_full if sharded else None))
    log = _Log(run_dir / METRICS_FILE, state["step"] if resume else None, trackers) if main else _NoLog()

    def gather_whole() -> None:
        """FSDP: the trained weights into rank 0's whole copy (every rank takes part)."""
        full = fsdp.full_state(model)
        if main:
            whole.load_state_dict(full)

    # A head-like strategy (at most 5% of the weights train) keeps its best weights in memory and in
    # every resume point, and writes model/ once: when training ends, stops or fails. Writing the
    # whole model at each improvement cost more than an epoch of training on cached features.
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    deferred = not sharded and n_trainable <= 0.05 * sum(p.numel() for p in model.parameters())
    best_state: dict[str, dict[str, torch.Tensor] | None] = {
        "weights": checkpoint.load_best(run_dir) if resume and deferred else None}

    def save_best_here() -> None:
        if sharded:
            gather_whole()
        if deferred:
            best_state["weights"] = checkpoint.changing_state(model)
        elif main:
            save_best()

    def write_deferred_best() -> None:
        """model/ from the best weights kept in memory (the model keeps its current ones)."""
        if not (deferred and main and best_state["weights"] is not None):
            return
        current = checkpoint.changing_state(model)
        model.load_state_dict(best_state["weights"], strict=False)
        try:
            save_best()
        finally:
            model.load_state_dict(current, strict=False)

    def save_resume_point(rng: dict[str, Any] | None = None) -> None:
        if sharded:  # every rank takes part in gathering the whole states; rank 0 writes them
            weights, moments = fsdp.full_state(model), fsdp.full_optimizer_state(model, optimizer.optimizer)
            if main:
                checkpoint.save_state(run_dir, model, optimizer, scheduler, state, rng=rng, weights=weights,
                                      optimizer_state=moments)
        elif main:
            checkpoint.save_state(run_dir, model, optimizer, scheduler, state, rng=rng, best=best_state["weights"])

    def evaluate() -> None:
        if world > 1:
            logits, targets = gathered_infer(plain_net, val_ds, cfg.eval_batch_size, device, accelerator)
        else:
            logits, targets = infer(net, val_ds, cfg.eval_batch_size, device)
        res = task.metrics(logits, targets)
        epoch = state["step"] / steps_per_epoch
        rec = {"step": state["step"], "epoch": round(epoch, 3), "seconds": round(time.perf_counter() - started, 3),
               **{k: round(v, 6) for k, v in res.items()}}
        if _improved(res[metric], state["best"], greater, cfg.min_delta):
            state.update(best=res[metric], best_step=state["step"], bad_evals=0)
            save_best_here()  # the best checkpoint first: a crash after it still leaves the best model
            rec["best"] = True
        else:
            state["bad_evals"] += 1
        state["history"].append(rec)
        log.write(type="eval", **rec)
        if progress:
            progress.evaluated(rec, metric)
        if cfg.patience is not None and state["bad_evals"] >= cfg.patience:
            state["stopped_early"] = True
        if on_eval is not None:
            on_eval(rec)
        net.train()
        set_train_mode(plain_net)

    started = time.perf_counter() - state["seconds"]
    last_save = time.perf_counter()
    if progress:
        progress.start(total_steps, state["step"])
    if eval_first and not resume:  # a head that starts solved: the candidate every epoch must beat
        evaluate()
    net.train()
    set_train_mode(plain_net)
    window_loss, window_n, window_local, window_t = 0.0, 0, 0, time.perf_counter()
    # Ctrl-C stops at the next step boundary and saves a resume point there that continues bit
    # for bit (a second Ctrl-C stops at once, saving only if the model still sits at a boundary:
    # partial gradient accumulation is discarded, and the boundary's RNG state is kept here).
    boundary_rng, at_boundary = checkpoint.rng_state(), True
    stop = _StopRequest()
    try:
        while not state["done"] and state["step"] < total_steps and not state["stopped_early"]:
            batches = epoch_batches(len(train_ds), cfg.batch_size, cfg.seed, state["epoch"],
                                    getattr(train_ds, "lengths", None))
            micro = 0
            first = state["batch_in_epoch"]
            # this rank's share of each batch (a batch smaller than the world: every rank takes it whole),
            # collated ahead in the background (prefetch.batches: the same batches, in the same order)
            mine = [shard(idx, rank, world) if world > 1 and len(idx) >= world else idx for idx in batches[first:]]
            with contextlib.closing(prefetch.batches(train_ds.collate, mine, hardware.loader)) as feed:
                for bi, host_batch in zip(range(first, len(batches)), feed):
                    if at_boundary:  # several processes stop at the same step: rank 0 decides
                        if broadcast_flag(stop.requested, accelerator) if world > 1 else stop.requested:
                            raise KeyboardInterrupt
                    examples = len(batches[bi])  # counted once, over all ranks
                    batch = {k: v.to(device, non_blocking=True) for k, v in host_batch.items()}
                    targets = batch.pop("labels")
                    aux = {k: batch.pop(k) for k in [k for k in batch if k.startswith("aux_")]}
                    local = len(targets)
                    if cfg.adversarial != "none":
                        batch, targets = adversarial_batch(plain_net, bundle.image, batch, targets, cfg.adversarial,
                                                           cfg.adversarial_eps)
                    with accelerator.autocast():
                        logits = net(**batch).logits
                    loss = task.loss(logits, targets)
                    if penalty is not None:
                        loss = loss + penalty(logits, aux)
                    if not deferred_checks and not torch.isfinite(loss):
                        raise _diverged(loss.item(), state, run_dir)
                    accelerator.backward(loss / cfg.grad_accum)
                    micro += 1
                    window_loss += loss.detach().float() * local  # stays on the device: no sync per step
                    window_local += local
                    window_n += examples
                    state["samples"] += examples
                    last_of_epoch = bi == len(batches) - 1
                    if micro % cfg.grad_accum and not last_of_epoch:
                        continue
                    # an optimizer step: clip, step, schedule, flush the gradients as soon as we can
                    at_boundary = False
                    if cfg.grad_clip:
                        accelerator.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    state["batch_in_epoch"] = bi + 1
                    if state["step"] % cfg.log_every == 0 or last_of_epoch:
                        dt = time.perf_counter() - window_t
                        totals = torch.stack([torch.as_tensor(window_loss, dtype=torch.float32, device=device),
                                              torch.tensor(float(window_local), device=device)])
                        if world > 1:
                            totals = accelerator.reduce(totals, "sum")
                        mean_loss = float(totals[0]) / max(float(totals[1]), 1.0)
                        if not math.isfinite(mean_loss):  # on a GPU, found here (up to log_every steps late)
                            raise _diverged(mean_loss, state, run_dir)
                        log.write(type="train", step=state["step"], epoch=round(state["step"] / steps_per_epoch, 3),
                                  loss=round(mean_loss, 6), lr=scheduler.get_last_lr()[0],
                                  samples_per_s=round(window_n / max(dt, 1e-9), 2))
                        if progress:
                            progress.trained(state["step"], mean_loss)
                        window_loss, window_n, window_local, window_t = 0.0, 0, 0, time.perf_counter()
                    if last_of_epoch:
                        state["epoch"] += 1
                        state["batch_in_epoch"] = 0
                    at_end = state["step"] >= total_steps
                    if cfg.max_minutes and not at_end:
                        late = time.perf_counter() - started >= cfg.max_minutes * 60
                        if broadcast_flag(late, accelerator) if world > 1 else late:
                            at_end = state["out_of_time"] = True
                    if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or (
                            not cfg.eval_every and last_of_epoch) or at_end:
                        if not (state["history"] and state["history"][-1]["step"] == state["step"]):
                            evaluate()
                    state["seconds"] = time.perf_counter() - started
                    due = (cfg.save_every_steps and state["step"] % cfg.save_every_steps == 0) or \
                        (time.perf_counter() - last_save) / 60 >= cfg.save_every_minutes or \
                        (state["history"] and state["history"][-1]["step"] == state["step"])
                    if due or at_end or state["stopped_early"]:
                        state["done"] = at_end or state["stopped_early"]
                        save_resume_point()
                        last_save = time.perf_counter()
                    boundary_rng, at_boundary = checkpoint.rng_state(), True
                    if at_end or state["stopped_early"]:
                        break
    except KeyboardInterrupt:
        if progress:
            progress.stop()
        if at_boundary and not state["done"]:
            state["seconds"] = time.perf_counter() - started
            save_resume_point(rng=boundary_rng)
            if world > 1:  # every rank left at this boundary; let rank 0 finish writing
                accelerator.wait_for_everyone()
        write_deferred_best()
        raise Interrupted(f"interrupted; the resume checkpoint in {run_dir / 'state'} is at step "
                          f"{checkpoint.saved_step(run_dir)}: continue with  fmtune train --resume {run_dir}") from None
    except BaseException:  # a failure: the best model goes to disk, as the error message says
        write_deferred_best()
        raise
    finally:
        stop.restore()
        log.close()
    if progress:
        progress.stop()
    write_deferred_best()
    seconds = time.perf_counter() - started
    # accelerate wrapped the forward in autocast: take it off, so what runs after training (the
    # test split, the baseline, the caller) computes what a fresh load of the model computes
    accelerator.unwrap_model(net, keep_fp32_wrapper=False)
    # FSDP: each rank holds its shard, in sync by construction; rank 0's whole copy gets the final weights
    in_sync = params_in_sync(model, accelerator) if world > 1 and not sharded else None
    held = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()) / 2**20
    if sharded:
        gather_whole()
        if main:
            bundle.model = whole.to(device)
    return FitResult(metric, state["best"], state["best_step"], state["step"], state["step"] / steps_per_epoch,
                     state["stopped_early"], state["out_of_time"], seconds, state["samples"] / max(seconds, 1e-9),
                     state["history"], world, in_sync, round(held, 3) if world > 1 else None)
