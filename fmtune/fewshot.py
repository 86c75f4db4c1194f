"""Few labels: SetFit-style contrastive tuning of a text encoder (``--strategy contrastive``), the
choice of a strategy from the labels per class (``--strategy auto``), and the defaults of a run
with few labels.

Contrastive tuning (Tunstall et al., 2022, "SetFit") teaches the encoder that texts of one label
embed close together and texts of different labels far apart, then solves a linear head on the
new embeddings. SetFit feeds one pair per example slot (two forward passes per pair) and builds
its pairs up front, so time and memory grow with examples x classes (SetFit #472, #249). Here a
step embeds a class-balanced batch of ``B`` examples once and scores every pair inside it:
B(B-1)/2 pairs for B forward passes, a fixed cost per step whatever the number of classes. The
loss is SetFit's (squared error between the cosine similarity and the pair's target: 1 same
label, 0 different; multi-label: the Jaccard overlap of the label sets), averaged over positive
and negative pairs separately so the rare positives are not drowned out.

A validation split of a few rows per class says nothing and costs training data: when it would
hold fewer than ``data.min_val_per_class`` rows of the median class, no split is made, every row
trains, a step budget decides when to stop, and the validation numbers are measured on the
training rows (the run says so). The median, not the rarest class: one rare class in a large set
does not take its validation split away (its rows are split like the others', and a label seen
once stays in training), nor turn ``--strategy auto`` to few-label strategies; and a split that
would hold that many rows per label on average is made however rare the median label.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fmtune import ui
from fmtune.config import head_start, lora_dropout
from fmtune.errors import ConfigError
from fmtune.training.dropout import fast_dropout
from fmtune.training.optim import adamw

# --strategy auto: a text encoder is tuned contrastively up to this many labels per class (beyond,
# plain fine-tuning has enough examples to learn from and is cheaper per example); an image backbone
# gets the linear probe up to PROBE_MAX; models above LARGE_MODEL parameters get LoRA, not full.
CONTRASTIVE_MAX = 64
PROBE_MAX = 16
# ... but a single-label task with MANY_CLASSES classes or more gets the linear probe instead (below
# MANY_CLASSES_FULL_FROM rows per class): pair training pulled apart what the pretrained embedding held. Probe minus
# contrastive (bench/fewshot.py, package-modules-N: docstring summary -> its module), 8 rows per class, 3
# samples each: +1.9 points at 10 classes, +6.7 at 40, +5.6 at 150 (and +4.3 at 24, stdlib-modules), the
# probe ahead in every sample; 40 classes at 16, 32 and 64 rows per class: +6.7 (2 samples), +3.8 and +1.8
# (1 each; full fine-tuning 12 and 10 points under the probe there). At 2-3 classes (sentiment) the two
# were within a point at 8 rows per class and contrastive 2.2 points ahead at 16.
MANY_CLASSES = 10
# ... up to MANY_CLASSES_FULL_FROM rows per class: from there full fine-tuning, which starts from the probe
# (train.head_init) and keeps it unless it does better on validation, scored above the probe at 40 classes
# (package-modules-40, 2 samples each): 32 rows per class 0.593 vs 0.580, 64 rows 0.655 vs 0.627, at about 10x
# the time (100-135 s vs 8-13 s on 2 cores; bench/results-2026-12-04-fewshot-manyclass-full-2core.json)
MANY_CLASSES_FULL_FROM = 32
LARGE_MODEL = 300_000_000
# A few-label run that trains by gradient (full, last_n, lora ...): at least this many optimizer steps,
# on batches of at most a quarter of the rows (3 epochs of 16 rows would be 3 steps of one batch).
FEW_MIN_STEPS = 50
MORE_STEPS_FROM = 16  # rows per class (the median class) from which contrastive tuning takes at least 30 steps


def contrastive_steps(n: int, batch: int, per_class: int = 0) -> int:
    """Default length of the contrastive phase: every row in about 15 batches, at least 15 steps
    (30 from MORE_STEPS_FROM rows per class on) and at most 400 (400 steps of 32 rows score 200k
    pairs). Chosen on validation samples of two sentiment sets (seeds 10-14, apart from the
    benchmark's): at 8 rows per class 15 steps scored as well as 30 or better (-0.5 and -2.6 points
    for 30), and lr 3e-5 (config.DEFAULT_LR) 0.5-1 point above 1e-4 and 1e-5; at 16 rows per class
    30 steps scored +1.7 and +0.1 points over 15 and 23 (45 steps: +1.4 and +0.2)."""
    floor = 30 if per_class >= MORE_STEPS_FROM else 15
    return int(min(max(math.ceil(15 * n / batch), floor), 400))


def target_matrix(targets: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Labels as an (n, L) 0/1 matrix: one-hot for classification, as given for multi-label."""
    if targets.dim() == 1:
        return F.one_hot(targets.clamp(min=0).long(), num_labels).float()
    return targets.float()


def pair_targets(y: torch.Tensor) -> torch.Tensor:
    """Similarity targets of every pair of rows of ``y`` (n, L): the Jaccard overlap of their label
    sets (1 the same label(s), 0 none in common); two rows without labels count as the same."""
    inter = y @ y.T
    size = y.sum(1)
    union = size[:, None] + size[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-9), torch.ones_like(inter))


def pair_loss(emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SetFit's cosine-similarity loss over every pair of the batch, positives (target > 0.5) and
    negatives averaged separately and weighted equally."""
    e = F.normalize(emb.float(), dim=-1)
    iu = torch.triu_indices(len(e), len(e), 1, device=e.device)
    sim = (e @ e.T)[iu[0], iu[1]]
    t = target[iu[0], iu[1]].to(sim.device)
    err = (sim - t) ** 2
    pos = t > 0.5
    parts = [err[m].mean() for m in (pos, ~pos) if m.any()]
    return torch.stack(parts).mean()


def supcon_loss(emb: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al., 2020) over the batch: each row's softmax over the
    cosine similarities to every other row (divided by ``temperature``) should put its mass on the
    rows of its label. Multi-label: positives weighted by the pair target (the Jaccard overlap).
    Rows without a positive in the batch are skipped."""
    e = F.normalize(emb.float(), dim=-1)
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    logits = (e @ e.T / temperature).masked_fill(eye, float("-inf"))
    logp = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    w = target.to(e.device).float().masked_fill(eye, 0.0)
    has = w.sum(1) > 0
    if not has.any():
        return e.sum() * 0.0
    per_row = -(w * logp).sum(1)[has] / w.sum(1)[has]
    return per_row.mean()


class BalancedBatches:
    """Batches of ``size`` row positions drawn so that every class in a batch has at least two
    rows (a positive pair) and every row is used before any is used again. Single-label: up to
    size/2 classes per batch, taken in turn from a shuffled order; multi-label: rows at random."""

    def __init__(self, labels: np.ndarray | None, n: int, size: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.n, self.size = n, min(size, n)
        self.labels = labels
        if labels is not None:
            self.classes = [np.flatnonzero(labels == k) for k in np.unique(labels)]
            self.queues: list[list[int]] = [[] for _ in self.classes]
            self.order: list[int] = []
        else:
            self.queue: list[int] = []

    def _take(self, k: int, m: int) -> list[int]:
        m = min(m, len(self.classes[k]))
        queue = self.queues[k]
        out = queue[:m]
        del queue[:m]
        if len(out) < m:  # this class's rows are used up: a fresh order, without the ones just taken
            fresh = [i for i in self.rng.permutation(self.classes[k]).tolist() if i not in out]
            need = m - len(out)
            out += fresh[:need]
            queue[:] = fresh[need:]
        return out

    def __call__(self) -> list[int]:
        if self.labels is None:
            if len(self.queue) < self.size:
                self.queue += self.rng.permutation(self.n).tolist()
            out, self.queue = self.queue[: self.size], self.queue[self.size:]
            return sorted(set(out))
        n_classes = len(self.classes)
        per_batch = min(n_classes, max(2, self.size // 2))
        if len(self.order) < per_batch:
            self.order += self.rng.permutation(n_classes).tolist()
        chosen, self.order = self.order[:per_batch], self.order[per_batch:]
        each = max(2, self.size // per_batch)
        return [i for k in chosen for i in self._take(k, each)]


def contrastive(bundle: Any, task: Any, ds: Any, scfg: Any, tcfg: Any, device: Any, quiet: bool) -> dict[str, Any]:
    """Tune ``bundle.model``'s encoder in place on ``ds`` (its training rows, tokenised) by pair
    training; with ``strategy.encoder=lora`` through a LoRA adapter folded into the weights after.
    The head is untouched. Returns what was done (for run.json and the report)."""
    from fmtune import adapters
    from fmtune.strategies import keep_token_embeddings, set_train_mode

    if bundle.kind != "text" or bundle.family != "hf":
        raise ConfigError(f"strategy contrastive tunes a text encoder on pairs of texts; {bundle.source} reads "
                          "images: use strategy head (the probe) or full")
    if not task.labels or task.level != "pooled":
        raise ConfigError(f"strategy contrastive needs labels of whole texts (classification or multilabel), not "
                          f"the {task.name} task")
    n = len(ds)
    if n < 2:
        raise ConfigError("strategy contrastive needs at least two training rows")
    y = target_matrix(ds.targets, len(task.labels))
    single = ds.targets.dim() == 1
    batch = min(scfg.pairs_batch, n)
    per_class = int(np.median(y.sum(0).numpy()))  # rows per label, the median label
    steps = scfg.contrastive_steps or contrastive_steps(n, batch, per_class)
    sampler = BalancedBatches(ds.targets.numpy() if single else None, n, batch, tcfg.seed)
    model = bundle.model
    trainable_before = {name: p.requires_grad for name, p in model.named_parameters()}
    frozen = 0  # token-embedding weights kept as pretrained
    if scfg.encoder == "lora":
        import peft

        targets, _ = adapters.resolve_targets(bundle, scfg)
        pc = peft.LoraConfig(r=scfg.r, lora_alpha=scfg.alpha, lora_dropout=lora_dropout(scfg), target_modules=targets)
        with adapters._quiet():
            model = peft.get_peft_model(model, pc)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(True)
        frozen = keep_token_embeddings(bundle, model.backbone, scfg)  # as full fine-tuning does
        params = [p for p in model.backbone.parameters() if p.requires_grad]
    base = adapters.base_model(model)
    decay = [p for p in params if p.dim() > 1]
    rest = [p for p in params if p.dim() <= 1]
    opt = adamw([{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], tcfg.lr)
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    supcon = scfg.pair_loss == "supcon"
    loss_of = functools.partial(supcon_loss, temperature=scfg.temperature) if supcon else pair_loss
    gen = torch.Generator().manual_seed(tcfg.seed)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))  # dropout masks, seeded
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    with ui.CountProgress(f"contrastive pairs ({batch} rows, {batch * (batch - 1) // 2} pairs a step)", steps,
                          quiet) as bar, fast_dropout(model, torch.device(device).type == "cpu" and tcfg.fast_dropout):
        for _ in range(steps):
            idx = sampler()
            host = ds.collate(idx)
            host.pop("labels", None)
            emb = base.features(**{k: v.to(device) for k, v in host.items()})
            loss = loss_of(emb, pair_targets(y[idx]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tcfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar(1)
    if scfg.encoder == "lora":
        model = model.merge_and_unload()
        bundle.model = model
    for name, p in model.named_parameters():
        p.requires_grad_(trainable_before.get(name, False))
    model.eval()
    set_train_mode(model)
    seconds = time.perf_counter() - started
    k = max(1, len(losses) // 10)
    info = {"steps": steps, "rows_per_step": batch, "pairs_per_step": batch * (batch - 1) // 2,
            "pairs_seen": steps * batch * (batch - 1) // 2, "encoder": scfg.encoder, "lr": tcfg.lr,
            **({"frozen_embedding_params": frozen} if frozen else {}),
            "pair_loss": scfg.pair_loss, **({"temperature": scfg.temperature} if supcon else {}),
            "seconds": round(seconds, 2), "loss_first": round(float(np.mean(losses[:k])), 5),
            "loss_last": round(float(np.mean(losses[-k:])), 5), "loss": [round(v, 5) for v in losses]}
    if not quiet:
        ui.console.print(f"  contrastive: {steps} steps of {batch} rows ({info['pairs_seen']:,} pairs) in "
                         f"{seconds:.1f}s, encoder {scfg.encoder}"
                         + (" (token embeddings kept as pretrained)" if frozen else "")
                         + f", lr {tcfg.lr:g}; pair loss {info['loss_first']:.4f} -> {info['loss_last']:.4f}")
    return info


def choose_strategy(cfg: Any, kind: str, n_params: int, per_class: int | None, task: Any) -> tuple[str, str]:
    """--strategy auto: (strategy, why) from the model's kind and size and the labels per class."""
    big = n_params > LARGE_MODEL
    tuned = "lora" if big else "full"
    size = f"{n_params / 1e6:.0f}M parameters"
    if per_class is None:
        return tuned, f"{task.name} has no classes to count; {tuned} fine-tuning ({size})"
    few = f"{per_class} labelled rows per class (the median class)"
    budget = cfg.train.max_minutes
    quick = budget is not None and budget < 2
    if kind == "text" and task.level == "pooled" and per_class <= CONTRASTIVE_MAX:
        if task.hf_problem_type == "single_label_classification" and len(task.labels) >= MANY_CLASSES:
            starts_from_probe = head_start(cfg.train, tuned, len(task.labels)) == "probe"
            if per_class >= MANY_CLASSES_FULL_FROM and starts_from_probe and not quick:
                return tuned, (f"{few} in {len(task.labels)} classes (at least {MANY_CLASSES}): {tuned} fine-tuning "
                               f"({size}) from the linear probe, which it keeps unless it does better on validation "
                               f"(from {MANY_CLASSES_FULL_FROM} rows per class it scored above the probe)")
            return "head", (f"{few}, at most {CONTRASTIVE_MAX}, in {len(task.labels)} classes (at least "
                            f"{MANY_CLASSES}): a linear probe on the frozen encoder (with this many classes pair "
                            "training scored lower)")
        return "contrastive", (f"{few} (at most {CONTRASTIVE_MAX}): contrastive pair training of the encoder "
                               f"({tuned}), then a linear head")
    # images and audio: a pretrained encoder's pooled features with a probe beat gradient fine-tuning at this
    # size (audio: 105 Sonic Pi recordings of 10 instruments, 6-18 per class: probe 0.70 test accuracy, full
    # fine-tuning 0.57, LoRA 0.47 on validation)
    if kind in ("image", "audio") and per_class <= PROBE_MAX:
        return "head", f"{few} (at most {PROBE_MAX}): a linear probe on the frozen backbone"
    if quick:
        return "head", f"{few}, but a time budget of {budget:g} min: a linear probe on the frozen backbone"
    return tuned, f"{few}: enough to fine-tune; {tuned} ({size})"
