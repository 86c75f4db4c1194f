"""Which time-frequency regions decided an audio classifier's label: integrated gradients over the
clip's log-mel spectrogram (captum), from silence (Whisper's log-mel floor) to the clip.

A raw-waveform model (wav2vec2, HuBERT, WavLM) is attributed over its input, the samples, from
white noise as loud as the clip (seeded): these models normalise their input, so a clip scaled
down toward silence reads the same until the very end of the path and integrated gradients from
silence would miss the change (measured: a third of it); each 10-ms frame's attribution is then
shared out over the mel bands by the mel power of the attribution signal in that frame, so the
map adds up to the same total and shows in which frequencies the evidence lies. Its picture is
the clip's log-mel at the model's rate. A spectrogram transformer (AST) is attributed over its
filterbank, from silence (the filterbank's floor) on the clip's own frames. w2v-BERT is attributed
over its stacked filterbank from white noise (unit variance: what a clip of noise reads as once each
band is normalised over the clip), not from zeros (a silent clip's normalised bands): its first layer
normalises each frame, so the path from zeros jumps in its first hundredth and integrated gradients
missed two thirds of the change (measured on a tiny model); drawn unstacked (mel bands x 10-ms frames).

    fmtune explain RUN --input clip.wav              # one clip, a folder of clips, or a table of paths
    fmtune explain RUN --misclassified 8             # the 8 most confident mistakes on the test set

Each clip gives a PNG: its log-mel spectrogram, and the same with the evidence for the explained
label drawn over it (time in seconds across, mel bands up); ``attributions.json`` names the
strongest second and frequency band of each clip. Long clips are explained over their first window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtune import ui
from fmtune.data.audio import (
    ENCODER_FRONTENDS,
    FBANK,
    STACKED,
    WAVEFORM,
    AudioData,
    AudioSpec,
    Fbank,
    LogMel,
    StackedFbank,
    features_of,
    read_audio_folder,
)
from fmtune.data.prepare import make_dataset, read_data
from fmtune.data.readers import AUDIO_SUFFIXES, TABLE_SUFFIXES, list_files, read_table, row_label, table_base
from fmtune.errors import ConfigError, DataError
from fmtune.explain_inputs import choose_items
from fmtune.fsutil import atomic_dir, check_output_dir
from fmtune.training.infer import infer

AUDIO_METHODS = ("ig",)
AUDIO_BASELINES = ("silence", "noise")  # log-mel models from silence; raw-waveform models and w2v-BERT from noise


def collect(pred: Any, inputs: list[str], limit: int) -> list[dict[str, Any]]:
    """--input values (audio files, folders of them, tables of paths) -> at most ``limit`` items
    {name, wave, true}; a class sub-folder names the true label, as does a table's label column."""
    cfg = pred.config.data
    items: list[dict[str, Any]] = []
    for value in inputs:
        path = Path(value)
        rows: list[tuple[str, Path, str | None]] = []
        if path.is_dir():
            subs = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
            if subs:
                df = read_audio_folder(path, held_out=False)  # (every clip the user points at)
                rows = [(Path(f).name, Path(f), lab) for f, lab in zip(df["audio"], df["label"])]
            else:
                rows = [(f.name, f, None) for f in list_files(path, AUDIO_SUFFIXES)]
            if not rows:
                raise DataError(f"--input {value}: no audio files in this folder ({', '.join(sorted(AUDIO_SUFFIXES))})")
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            df = read_table(path, cfg.encoding, cfg.audio_column, cfg)
            column = pred.task.input_column(df, cfg.audio_column)
            if column not in df.columns:
                cols = ", ".join(map(str, df.columns))
                raise DataError(f"{path}: no audio path column {column!r}; columns are: {cols}")
            truth = df[cfg.label_column] if cfg.label_column in df.columns else [None] * len(df)
            for i, (p, t) in enumerate(zip(df[column].astype(str), truth)):
                f = Path(p) if Path(p).is_absolute() else table_base(df) / p
                rows.append((row_label(df, i).split(": ", 1)[-1], f, None if t is None else str(t)))
        elif path.is_file():
            rows = [(path.name, path, None)]
        else:
            raise DataError(f"--input {value}: no such file (this run's model reads audio files)")
        for name, f, true in rows:
            items.append({"name": name, "wave": pred.decode(str(f), str(f)), "true": true})
            if len(items) >= limit:
                return items
    return items


def mistakes(pred: Any, data: str | Path, n: int, quiet: bool, split: str = "test") -> list[dict[str, Any]]:
    """The ``n`` most confident wrong predictions on ``data`` (a labelled folder or table; of a table whose column
    names each row's split, its ``split`` rows)."""
    from fmtune.data.audio import load_audio

    cfg = pred.config
    df = read_data(data, pred.task, cfg.data, split=split)
    ds, _ = make_dataset(df, pred.bundle, pred.task, cfg.data)
    with ui.CountProgress("finding mistakes", len(ds), quiet) as bar:
        logits, targets = infer(pred.model, ds, pred.batch_size, progress=bar)
    rate = int(pred.bundle.audio["sampling_rate"])
    return [{"name": Path(ds.names[i]).name if isinstance(ds.sources[i], str) else ds.names[i],
             "wave": load_audio(ds.sources[i], rate),
             "true": pred.task.labels[int(targets[i])]} for i, _, _ in pred.task.mistake_positions(logits, targets, n)]


def attributions(model: torch.nn.Module, feats: torch.Tensor, target: int, steps: int,
                 spec: AudioSpec | None = None) -> torch.Tensor:
    """Integrated gradients of the ``target`` logit over one window's log-mel (n_mels x frames),
    from silence: every frame at the window's floor value; or over a window's waveform (samples,
    a 1-d tensor) from ``noise_like`` it; or over a filterbank window (``spec`` fbank: n_mels x
    frames) from silence (the filterbank's floor), its padding as the model reads it in both; or over
    w2v-BERT's stacked filterbank (``spec`` stacked-fbank: features x frames) from ``noise_like`` it (see the
    module doc). The attributions have ``feats``' shape."""
    from captum.attr import IntegratedGradients

    mask, frames_last = None, True  # (frames_last: x holds feats as they are, not transposed)
    if feats.dim() == 1:  # the waveform
        key, x = "input_values", feats[None].clone()
        base = noise_like(feats)[None]
        mask = torch.ones((1, feats.shape[0]), dtype=torch.long)
    elif spec is not None and spec.frontend == FBANK:  # (1, frames, mel bins), padded to the model's frames
        key, x = "input_values", torch.full((1, spec.frames, spec.n_mels), spec.fbank_padding)
        x[0, : feats.shape[-1]] = feats.T
        base = x.clone()
        base[0, : feats.shape[-1]] = Fbank(spec)(np.zeros(Fbank.FRAME, dtype=np.float32)).min()  # silence
        frames_last = False
    elif spec is not None and spec.frontend == STACKED:  # (1, frames, features), unpadded
        key, x, frames_last = "input_features", feats.T[None].clone(), False
        base = noise_like(x)
        mask = torch.ones((1, x.shape[1]), dtype=torch.long)
    else:
        key, floor = "input_features", float(feats.max() - 2.0)  # (log-mel max - 8 decades + 4) / 4: silence
        width = feats.shape[-1] + 2  # as AudioData pads a window: two frames of silence after it
        x = torch.full((1, feats.shape[0], width), floor)
        x[0, :, : feats.shape[-1]] = feats
        mask = torch.ones((1, width), dtype=torch.long)
        mask[0, feats.shape[-1]:] = 0
        base = torch.full_like(x, floor)
    device = next(model.parameters()).device

    def forward(inp: torch.Tensor) -> torch.Tensor:
        n = inp.shape[0]
        masks = {} if mask is None else {"frame_mask": mask.to(device).expand(n, -1)}
        return model(**{key: inp}, **masks, clip_index=torch.arange(n, device=device)).logits

    ig = IntegratedGradients(forward)
    attr = ig.attribute(x.to(device), baselines=base.to(device), target=target,
                        n_steps=steps, internal_batch_size=8)
    if not frames_last:  # a filterbank: back to (mel bins, the window's own frames)
        return attr[0, : feats.shape[-1]].T.detach().float().cpu()
    return attr[0, ..., : feats.shape[-1]].detach().float().cpu()


def noise_like(wave: torch.Tensor) -> torch.Tensor:
    """White noise with the input's standard deviation (seeded: the same clip, the same noise)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(wave.shape, generator=g) * wave.float().std()


def spread(attr: torch.Tensor, shown: AudioSpec) -> torch.Tensor:
    """Attributions of a waveform's samples as a (mel band, frame) map: each frame's sum, shared out
    over the bands by the mel power of the attributions in that frame (the map's total is theirs)."""
    mel = LogMel(shown)
    n, hop = mel.frames(len(attr)), shown.hop_length
    sums = torch.zeros(n * hop)
    sums[: len(attr)] = attr
    power = mel.mel_power(attr.numpy())
    share = power / power.sum(0, keepdim=True).clamp(min=1e-20)
    return share * sums.view(n, hop).sum(1)[None, :]


def _png(item: dict[str, Any], feats: torch.Tensor, heat: torch.Tensor, spec: AudioSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = feats.shape[-1] * spec.hop_length / spec.sampling_rate
    extent = (0.0, seconds, 0, feats.shape[0])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 4.6), sharex=True)
    top.imshow(feats.numpy(), origin="lower", aspect="auto", extent=extent, cmap="magma")
    top.set_title(f"{item['name']}: log-mel", fontsize=8)
    top.set_ylabel("mel band")
    bottom.imshow(feats.numpy(), origin="lower", aspect="auto", extent=extent, cmap="gray")
    h = heat.clamp(min=0)
    h = (h / h.max()).numpy() if float(h.max()) > 0 else h.numpy()
    rgba = plt.cm.jet(h)
    rgba[..., 3] = 0.1 + 0.7 * h
    bottom.imshow(rgba, origin="lower", aspect="auto", extent=extent)
    title = f"pred {item['predicted']} ({item['score']:.2f})" + (f" | true {item['true']}" if item.get("true") else "")
    if item["target"] != item["predicted"]:
        title += f" | explaining {item['target']}"
    bottom.set_title(f"integrated gradients: evidence for the explained label ({title})", fontsize=8)
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("mel band")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explain_audio(pred: Any, inputs: list[str], *, method: str, target: str | None, misclassified: int,
                  data: str | Path | None, out: str | Path | None, limit: int, steps: int, baseline: str | None,
                  quiet: bool) -> dict[str, Any]:
    """``fmtune explain`` of an audio classification run (see the module doc)."""
    if method not in ("auto", *AUDIO_METHODS):
        raise ConfigError(f"--method {method!r} does not apply to audio models; choose one of: "
                          f"{', '.join(AUDIO_METHODS)}")
    if baseline not in (None, *AUDIO_BASELINES):
        raise ConfigError(f"--baseline {baseline!r} is not one for audio runs; choose one of "
                          f"{', '.join(AUDIO_BASELINES)}")
    labels = pred.labels
    if target is not None and target not in labels:
        raise ConfigError(f"--target {target!r} is not a label of this run; labels: {', '.join(labels)}")
    items = choose_items(pred, inputs, misclassified, data, limit, quiet, mistakes, collect,
                         "an audio file, a folder or a table")
    out_dir = Path(out) if out else pred.run_dir / "explain"
    check_output_dir(out_dir, "explain.json")
    spec = AudioSpec.from_dict(pred.bundle.audio)
    waveform = spec.frontend == WAVEFORM
    expected = "noise" if spec.frontend in ENCODER_FRONTENDS else "silence"
    reads = {WAVEFORM: "it reads the waveform", STACKED: "it normalises each frame of its filterbank"}
    if baseline not in (None, expected):
        raise ConfigError(f"--baseline {baseline!r}: this run's model is explained from {expected} "
                          f"({reads.get(spec.frontend, 'it reads mel spectrograms')})")
    summary: dict[str, Any] = {"method": "ig", "baseline": expected, "run": str(pred.run_dir), "out": str(out_dir),
                               "items": []}
    if not items:
        summary["note"] = "no misclassified examples" if misclassified else "no inputs"
        return summary
    windows = [w[0].float() for w in features_of([it["wave"] for it in items], spec)]
    logits = infer(pred.model, AudioData([[w.half()] for w in windows], None, spec), pred.batch_size)[0]
    shown = AudioSpec(sampling_rate=spec.sampling_rate) if waveform else spec  # the picture: a log-mel
    for item, row in zip(items, logits):
        k = labels.index(target) if target is not None else int(row.argmax())
        item.update(predicted=labels[int(row.argmax())], score=float(row.float().softmax(-1).max()),
                    target=labels[k], target_idx=k)
    model = pred.model.eval()

    def write(tmp: Path) -> None:
        records, heats = [], []
        with ui.CountProgress("explaining (ig)", len(items), quiet) as bar:
            for n, (item, feats) in enumerate(zip(items, windows)):
                heat = attributions(model, feats, item["target_idx"], steps, spec)
                if waveform:
                    heat, feats = spread(heat, shown), LogMel(shown)(feats.numpy())
                elif spec.frontend == STACKED:  # (mel bands, 10-ms frames) again
                    heat, feats = StackedFbank.unstacked(spec, heat), StackedFbank.unstacked(spec, feats)
                heats.append(heat)
                name = f"{n + 1:03d}-{Path(item['name']).stem.replace(' ', '_')}.png"
                _png(item, feats, heat, shown, tmp / name)
                pos = heat.clamp(min=0)
                frame = int(pos.sum(0).argmax())
                band = int(pos.sum(1).argmax())
                records.append({k: item[k] for k in ("name", "predicted", "score", "target", "true")}
                               | {"file": name,
                                  "peak_second": round(frame * shown.hop_length / shown.sampling_rate, 2),
                                  "peak_mel_band": band, "peak_hz": round(_mel_centre_hz(band, shown), 1),
                                  "total_attribution": round(float(heat.sum()), 5)})
                bar(1)
        np.savez_compressed(tmp / "heatmaps.npz", *[h.numpy().astype(np.float16) for h in heats])
        (tmp / "attributions.json").write_text(json.dumps(records, indent=1))
        summary["files"] = [r["file"] for r in records] + ["attributions.json", "heatmaps.npz"]
        summary["items"] = records
        (tmp / "explain.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "out"}, indent=1))

    atomic_dir(out_dir, write)
    return summary


def _mel_centre_hz(band: int, spec: AudioSpec) -> float:
    """The centre frequency of mel band ``band`` (Slaney's mel scale from 0 Hz, as Whisper's filters; Kaldi's from
    20 Hz for a filterbank, as AST's and w2v-BERT's)."""
    from transformers.audio_utils import hertz_to_mel, mel_to_hertz

    scale, low = ("kaldi", 20.0) if spec.frontend in (FBANK, STACKED) else ("slaney", 0.0)
    mels = np.linspace(hertz_to_mel(low, mel_scale=scale), hertz_to_mel(spec.sampling_rate / 2, mel_scale=scale),
                       spec.n_mels + 2)
    return float(mel_to_hertz(mels[band + 1], mel_scale=scale))
