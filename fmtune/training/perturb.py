"""Perturbed inputs, shared by training and the analysis verbs: image corruptions and white-box
attacks (pixels in [0, 1]), text perturbations, and the training-time uses of both: batches
perturbed on the fly (``train.augment``) and adversarial copies of each batch
(``train.adversarial``). ``fmtune robustness`` scores runs under the same functions.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtune.data.dataset import TextData
from fmtune.errors import ConfigError
from fmtune.strategies import set_train_mode

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
PGD_STEPS = 10


class PixelModel(nn.Module):
    """The image model taking pixels in [0, 1] (normalisation inside): attributions and attacks
    then live in the space a person sees and the bounds are simply 0 and 1."""

    def __init__(self, model: nn.Module, image_spec: dict[str, Any]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(image_spec["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(image_spec["std"]).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=(pixels - self.mean) / self.std).logits


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


def attack_sweep(model: nn.Module, spec: dict[str, Any], pixels: torch.Tensor, targets: torch.Tensor, kind: str,
                 levels: list[float], clean_logits: torch.Tensor, steps: int = PGD_STEPS, seed: int = 0,
                 keep: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The model's logits under an L-inf attack at each epsilon of ``levels`` (increasing), for
    the evaluation suite; with ``keep``, the adversarial pixels too. The same attacks as
    ``attack`` at a fraction of the cost:

    - FGSM: the gradient at the clean input is the same for every epsilon: one backward pass,
      then one forward pass per epsilon (the same numbers as captum's FGSM, tested).
    - PGD (random start, ``steps`` of eps/4): an input the model already gets wrong is not
      attacked (clean, or fooled at a smaller epsilon: that example lies in every larger ball),
      and an input stops being attacked at the step it is fooled. Each remaining input gets the
      full attack, so accuracy under attack is what running PGD per epsilon measures, or lower
      (never optimistic); on a model that is not robust most inputs fall within a few steps.
    """
    net = PixelModel(model, spec).to(pixels.device).eval()
    x = pixels.detach()
    dev = x.device

    def forward_grad(z: torch.Tensor, t: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not grad:
            with torch.no_grad():
                return net(z).detach(), None
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            out = net(z)
            (g,) = torch.autograd.grad(nn.functional.cross_entropy(out.float(), t, reduction="sum"), z)
        return out.detach(), g

    def sign(g: torch.Tensor) -> torch.Tensor:  # as captum: a gradient under 1e-6 moves nothing
        return torch.where(g.abs() > 1e-6, g.sign(), torch.zeros_like(g))

    outs, advs = [], []
    if kind == "fgsm":
        _, g = forward_grad(x, targets)
        for eps in levels:
            adv = (x + eps * sign(g)).clamp(0, 1)
            outs.append(forward_grad(adv, targets, grad=False)[0])
            advs += [adv] if keep else []
        return outs, advs
    if kind != "pgd":
        raise ConfigError(f"unknown attack {kind!r}; choose one of: {', '.join(ATTACKS)}")
    gen = torch.Generator().manual_seed(seed)
    fooled = clean_logits.argmax(-1).to(dev) != targets
    best, best_x = clean_logits.clone().to(dev), x.clone() if keep else None
    for eps in levels:
        active = torch.nonzero(~fooled).flatten()
        if len(active):
            xa, ta = x[active], targets[active]
            adv = (xa + (torch.rand(xa.shape, generator=gen) * 2 - 1).to(dev) * eps).clamp(0, 1)
            final = torch.empty(len(active), best.shape[1], device=dev, dtype=best.dtype)
            alive = torch.arange(len(active), device=dev)
            for step in range(steps + 1):
                out, g = forward_grad(adv[alive], ta[alive], grad=step < steps)
                done = (out.argmax(-1) != ta[alive]) | (step == steps)
                final[alive[done]] = out[done].to(final.dtype)
                alive, g = alive[~done], g[~done] if g is not None else None
                if not len(alive):
                    break
                moved = adv[alive] + eps / 4 * sign(g)
                adv[alive] = torch.min(torch.max(moved, xa[alive] - eps), xa[alive] + eps).clamp(0, 1)
            best[active] = final
            fooled[active] = final.argmax(-1) != ta
            if keep:
                best_x[active] = adv
        outs.append(best.clone())
        advs += [best_x.clone()] if keep else []
    return outs, advs


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


def perturb_words(words: list[str], tags: list[str], name: str, rate: float,
                  rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """A tagged sentence (named entities: a tag per word) under one text perturbation, its tags kept true: typos
    and case changes within words (a word stays a word: one emptied by typos is kept as it was); word_drop drops
    words outside entities (tag ``O``) with their tags; word_swap swaps neighbours that are both outside entities."""
    words, tags = list(words), list(tags)
    if name in ("typos", "case_change"):
        return [perturb_text(w, name, rate, rng) if w.strip() else w for w in words], tags
    if name == "word_drop":
        keep = [t != "O" or rng.random() >= rate for t in tags]
        if not any(keep):
            keep[int(rng.integers(len(keep)))] = True
        return [w for w, k in zip(words, keep) if k], [t for t, k in zip(tags, keep) if k]
    if name == "word_swap":
        for i in range(len(words) - 1):
            if tags[i] == "O" and tags[i + 1] == "O" and rng.random() < rate:
                words[i], words[i + 1] = words[i + 1], words[i]
        return words, tags
    raise ConfigError(f"unknown text perturbation {name!r}; choose one of: {', '.join(TEXT_PERTURBATIONS)}")


# name -> (severity levels, what a level means); fmtune robustness of audio models
AUDIO_PERTURBATIONS: dict[str, tuple[list[float], str]] = {
    "noise": ([30.0, 20.0, 10.0, 5.0, 0.0], "SNR of added white noise, dB"),
    "shift": ([0.1, 0.25, 0.5, 1.0, 2.0], "seconds of silence before the clip"),
    "speed": ([1.05, 1.1, 1.2, 1.3, 1.5], "playback speed (resampled: pitch moves with it)"),
    "slow": ([0.95, 0.9, 0.8, 0.7, 0.6], "playback speed (resampled: pitch moves with it)"),
    "gain": ([-6.0, -12.0, -20.0, -30.0, -40.0], "level change, dB"),
}


def change_audio(wave: np.ndarray, rate: int, name: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """One clip under one perturbation of AUDIO_PERTURBATIONS at ``level``."""
    if name in ("speed", "slow"):
        from fractions import Fraction

        from scipy.signal import resample_poly

        f = Fraction(float(level)).limit_denominator(50)
        return wave if f == 1 else resample_poly(wave, f.denominator, f.numerator).astype(np.float32)
    if name == "shift":
        return np.concatenate([np.zeros(int(level * rate), dtype=np.float32), wave])
    if name == "gain":
        return (wave * np.float32(10 ** (level / 20))).astype(np.float32)
    if name == "noise":
        power = float(np.mean(wave.astype(np.float64) ** 2))
        if power == 0:
            return wave
        noise = rng.standard_normal(len(wave)).astype(np.float32)
        return (wave + noise * np.float32(math.sqrt(power / 10 ** (level / 10)))).astype(np.float32)
    raise ConfigError(f"unknown audio perturbation {name!r}; choose one of: {', '.join(AUDIO_PERTURBATIONS)}")


def perturb_audio(wave: np.ndarray, rate: int, augment: Any, rng: np.random.Generator) -> np.ndarray:
    """One training clip with ``train.augment``'s audio perturbations, drawn from ``rng``: speed
    (resampled: shorter and higher, or longer and lower), a delay (silence before the clip: the
    words of a transcript stay whole), gain, then white noise at an SNR between ``snr`` and 40 dB."""
    if augment.speed:
        wave = change_audio(wave, rate, "speed", rng.uniform(1 - augment.speed, 1 + augment.speed), rng)
    if augment.shift:
        wave = change_audio(wave, rate, "shift", rng.uniform(0, augment.shift), rng)
    if augment.gain:
        wave = change_audio(wave, rate, "gain", rng.uniform(-augment.gain, augment.gain), rng)
    if augment.snr is not None:
        wave = change_audio(wave, rate, "noise", rng.uniform(augment.snr, 40.0), rng)
    return np.asarray(wave, dtype=np.float32)


# --- robust training --------------------------------------------------------------------------


class Augmented(torch.utils.data.Dataset):
    """A training set whose batches are perturbed on the fly (``train.augment``).

    The randomness of a batch is a function of the seed and the batch's example indices, so an
    interrupted and resumed run sees exactly the same perturbations.
    """

    def __init__(self, ds: Any, augment: Any, seed: int, bundle: Any = None):
        self.ds, self.augment, self.seed, self.bundle = ds, augment, seed, bundle
        self.lengths, self.targets = getattr(ds, "lengths", None), getattr(ds, "targets", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> int:
        return i

    def _rng(self, idx: list[int]) -> np.random.Generator:
        return np.random.default_rng([self.seed, *map(int, idx)])

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rng = self._rng(idx)
        if hasattr(self.ds, "clips"):  # audio: the clips read again from their files, perturbed, as features
            return self._audio(idx, rng)
        if isinstance(self.ds, TextData):  # a pair of texts: both perturbed
            tok = self.bundle.tokenizer
            texts = [self.ds.pair(i, tok) if self.ds.pairs else (tok.decode(self.ds.input_ids[i],
                                                                            skip_special_tokens=True),) for i in idx]
            for name, rate in (("typos", self.augment.typos), ("word_drop", self.augment.word_drop)):
                if rate:
                    texts = [tuple(perturb_text(t, name, rate, rng) if t.strip() else t for t in row) for row in texts]
            texts = texts if self.ds.pairs else [row[0] for row in texts]
            return self.bundle.text_data(texts, self.ds.targets[idx]).collate(list(range(len(idx))))
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

    def _audio(self, idx: list[int], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        import copy

        from fmtune.data.audio import AudioSpec, features_of, load_audio

        spec = AudioSpec.from_dict(self.bundle.audio)
        waves = [perturb_audio(load_audio(self.ds.sources[i], spec.sampling_rate), spec.sampling_rate, self.augment,
                               rng) for i in idx]
        view = copy.copy(self.ds)  # the same dataset with this batch's perturbed clips in the rows asked for
        view.clips = list(self.ds.clips)
        for i, feats in zip(idx, features_of(waves, spec)):
            # a clip made longer than the window by speed or shift keeps its first window (training
            # clips are one window: a transcript cannot be split)
            view.clips[i] = feats[:1] if getattr(self.ds, "ids", None) is not None else feats
        return view.collate(idx)


def adversarial_batch(net: nn.Module, spec: dict[str, Any], batch: dict[str, torch.Tensor], targets: torch.Tensor,
                      kind: str, eps: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``batch`` with an adversarial copy of every image appended (the model attacked in eval mode).

    ``fgsm`` is FGSM from a random start with a step of 1.25 eps (Wong et al., 2020, "Fast is
    better than free"): plain FGSM training leaks the label into the perturbation and learns to
    resist FGSM alone (measured on digits: FGSM accuracy rising with eps while PGD's fell to 4%).
    ``pgd`` takes 3 steps of eps/2 from a random start."""
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
