"""Why did the model say that? Attributions with captum, for one input or the model's worst mistakes.

    fmtune explain RUN --input photo.jpg                 # Grad-CAM (CNN) / integrated gradients (ViT)
    fmtune explain RUN --input "a dull, lifeless film"   # token attributions (layer IG on the embeddings)
    fmtune explain RUN --input clip.wav                  # audio: IG over the log-mel (fmtune.explain_audio)
    fmtune explain RUN --misclassified 8                 # the 8 most confident mistakes on the test split

Images are explained in pixel space ([0, 1], before normalisation): integrated gradients from the
normalisation's mean colour (what the model sees as zero; a black baseline gives no attribution to
dark pixels), occlusion with a patch of that colour, Grad-CAM on the backbone's last convolution. Each
input gives a PNG (the input beside its heat map, predicted / true / explained label and score in
the title); several give a grid. Text is explained by layer integrated gradients on the token
embeddings from a baseline of [PAD] tokens (or [MASK] / [UNK]: attributions depend on it), and
gives an HTML page of shaded words and a JSON file with each word's attribution and the top
positive / negative words. Everything goes to RUN/explain/ (or
``out``), written atomically.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtune import ui
from fmtune.data.dataset import model_texts
from fmtune.data.prepare import make_dataset, read_data
from fmtune.data.readers import (
    IMAGE_SUFFIXES,
    TABLE_SUFFIXES,
    list_images,
    media_cell,
    media_name,
    read_any,
    require_column,
    require_text_column,
    row_label,
    table_base,
)
from fmtune.errors import ConfigError, DataError
from fmtune.explain_inputs import choose_items
from fmtune.fsutil import atomic_dir, check_output_dir
from fmtune.onnx_export import TextLogits
from fmtune.predictor import Predictor
from fmtune.training.infer import infer
from fmtune.training.perturb import PixelModel

IMAGE_METHODS = ("gradcam", "ig", "occlusion")
TEXT_METHODS = ("ig",)


# --- the model seen from captum -------------------------------------------------------------


def last_conv(model: nn.Module) -> nn.Module | None:
    """The backbone's last convolution (its LoRA wrapper, when it has one); None for a ViT."""
    found = None
    for name, module in model.named_modules():
        patchify = module.kernel_size == module.stride and module.kernel_size[0] > 1 if isinstance(
            module, nn.Conv2d) else False  # a ViT's patch embedding is a convolution too
        if isinstance(module, nn.Conv2d) and "lora_" not in name and not patchify:
            found = name
    if found is None:
        return None
    if found.endswith(".base_layer"):  # peft wraps it: explain what the adapted layer outputs
        found = found[: -len(".base_layer")]
    return model.get_submodule(found)


def word_embeddings(model: nn.Module, vocab_size: int) -> nn.Module:
    """The token embedding table (the nn.Embedding with one row per vocabulary entry)."""
    candidates = [m for n, m in model.named_modules() if isinstance(m, nn.Embedding) and "lora_" not in n]
    for m in candidates:
        if m.num_embeddings >= vocab_size:
            return m
    if candidates:
        return candidates[0]
    raise ConfigError("this text model has no embedding layer for token attributions")


def check_method(kind: str, method: str, model: nn.Module) -> str:
    """The method to use ('auto' resolved); a ConfigError naming the valid ones otherwise."""
    valid = TEXT_METHODS if kind == "text" else IMAGE_METHODS
    if method == "auto":
        return "ig" if kind == "text" or last_conv(model) is None else "gradcam"
    if method not in valid:
        raise ConfigError(f"--method {method!r} does not apply to {kind} models; choose one of: {', '.join(valid)}")
    if method == "gradcam" and last_conv(model) is None:
        raise ConfigError("--method gradcam needs a convolutional backbone and this one has no convolution "
                          "(a vision transformer?); use ig or occlusion")
    return method


# --- attributions ---------------------------------------------------------------------------


IMAGE_BASELINES = ("mean", "blur", "black")
TEXT_BASELINES = ("pad", "mask", "unk")  # the token each word is replaced by at the path's start


def reference_images(pixels: torch.Tensor, mean: torch.Tensor, kind: str) -> torch.Tensor:
    """What an input is compared with (ig's path start, occlusion's patch): the normalisation's
    mean colour (0 as the model sees it), a heavy blur of the input (keeps colour and layout,
    drops shapes), or black."""
    if kind == "mean":
        return mean.expand_as(pixels).contiguous()
    if kind == "black":
        return torch.zeros_like(pixels)
    if kind == "blur":
        from fmtune.training.perturb import blur

        return blur(pixels, max(1.0, pixels.shape[-1] / 10))
    raise ConfigError(f"--baseline {kind!r}: choose one of {', '.join(IMAGE_BASELINES)}")


def image_heatmaps(model: nn.Module, spec: dict[str, Any], pixels: torch.Tensor, targets: torch.Tensor,
                   method: str, steps: int = 32, baseline: str = "mean") -> torch.Tensor:
    """(N, H, W) maps in [0, 1]: where the evidence for each target class lies."""
    from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion

    net = PixelModel(model, spec).to(pixels.device).eval()
    size = pixels.shape[-1]
    reference = reference_images(pixels, net.mean, baseline)
    if method == "gradcam":
        cam = LayerGradCam(net, last_conv(model)).attribute(pixels, target=targets, relu_attributions=True)
        heat = LayerAttribution.interpolate(cam, (size, size), interpolate_mode="bilinear")[:, 0]
    elif method == "ig":
        attr = IntegratedGradients(net).attribute(pixels, baselines=reference, target=targets,
                                                  n_steps=steps, internal_batch_size=max(1, 4 * len(pixels)))
        heat = attr.abs().sum(1)
        heat = nn.functional.avg_pool2d(heat[:, None], 3, stride=1, padding=1)[:, 0]  # pixel noise -> regions
    else:  # occlusion: how much the target's score drops when a grey patch covers each place
        win = max(2, size // 8)
        attr = Occlusion(net).attribute(pixels, sliding_window_shapes=(3, win, win), strides=(3, max(1, win // 2),
                                        max(1, win // 2)), baselines=reference, target=targets,
                                        perturbations_per_eval=16)
        heat = attr.sum(1).clamp(min=0)
    heat = heat.detach().float()
    top = heat.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (heat / top).cpu()


def baseline_token(tokenizer: Any, kind: str) -> int:
    """The token id a text baseline puts in place of every word."""
    token = {"pad": tokenizer.pad_token_id, "mask": tokenizer.mask_token_id, "unk": tokenizer.unk_token_id}[kind]
    if token is None:
        if kind == "pad":
            return 0
        raise ConfigError(f"--baseline {kind}: this model's tokenizer has no {kind} token; "
                          f"choose one of {', '.join(TEXT_BASELINES)}")
    return int(token)


def text_attributions(model: nn.Module, tokenizer: Any, text: str | tuple[str, str], max_length: int, target: int,
                      steps: int = 50, baseline: str = "pad", segments: bool = False) -> list[dict[str, Any]]:
    """Layer integrated gradients on the token embeddings, from a baseline where every token but
    the special ones is ``baseline`` ([PAD], [MASK] or [UNK]); summed per word of the original text.
    ``text`` may be a (first, second) pair, read as the run reads pairs (``segments``: with segment
    ids); each word then says which text (``text``: 0 or 1) it is in. Returns [{word, attribution}]
    in order."""
    from captum.attr import LayerIntegratedGradients

    texts = (text,) if isinstance(text, str) else tuple(text)
    enc = tokenizer(*texts, truncation=True, max_length=max_length, return_tensors="pt",
                    return_offsets_mapping=getattr(tokenizer, "is_fast", False))
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    special = torch.tensor([[i in set(tokenizer.all_special_ids) for i in ids[0].tolist()]], device=device)
    token = baseline_token(tokenizer, baseline)
    baseline_ids = torch.where(special, ids, torch.full_like(ids, token))
    net = TextLogits(model).eval()
    lig = LayerIntegratedGradients(net, word_embeddings(model, len(tokenizer)))
    pair = len(texts) == 2  # segment ids only for a pair, as the run was trained (one text: none)
    extra = (mask, enc["token_type_ids"].to(device)) if pair and segments and "token_type_ids" in enc else (mask,)
    attr = lig.attribute(ids, baselines=baseline_ids, target=target, additional_forward_args=extra, n_steps=steps,
                         internal_batch_size=steps)
    per_token = attr.sum(-1)[0].detach().float().cpu()
    words: list[dict[str, Any]] = []
    if "offset_mapping" in enc:  # group word pieces into the words of the original text(s)
        word_ids, seq_ids = enc.word_ids(0), enc.sequence_ids(0)
        offsets = enc["offset_mapping"][0].tolist()
        last = None
        for t, (wid, seq, (a, b)) in enumerate(zip(word_ids, seq_ids, offsets)):
            if wid is None or special[0, t]:
                continue
            if (seq, wid) == last:
                words[-1]["end"] = b
                words[-1]["attribution"] += float(per_token[t])
            else:
                words.append({"start": a, "end": b, "attribution": float(per_token[t]), **({"text": seq} if pair
                                                                                          else {})})
            last = (seq, wid)
        for w in words:
            w["word"] = texts[w.get("text", 0)][w["start"]: w["end"]]
    else:
        toks = tokenizer.convert_ids_to_tokens(ids[0].tolist())
        words = [{"word": tok, "attribution": float(per_token[t])} for t, tok in enumerate(toks) if not special[0, t]]
    return [{**w, "attribution": round(w["attribution"], 5)} for w in words]


# --- inputs ---------------------------------------------------------------------------------


def _looks_like_image(value: str) -> bool:
    return Path(value).suffix.lower() in IMAGE_SUFFIXES


def _pair_or_text(pred: Predictor, value: str) -> Any:
    """An --input for a run on pairs of texts is a JSON list of the two: '["first", "second"]'."""
    if pred.pair_column and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"--input {value!r}: not a JSON list of two texts ({e})") from None
    return value


def collect_inputs(pred: Predictor, inputs: list[str], limit: int) -> list[dict[str, Any]]:
    """--input values -> at most ``limit`` items {name, input (text or uint8 image), true (or None)};
    clear errors for the wrong modality, missing files and unreadable images. Only the items
    kept are read (a folder of 10,000 images with --limit 24 decodes 24)."""
    items: list[dict[str, Any]] = []
    cfg = pred.config.data

    def table(path: Path, column: str, what: str, key: str) -> Any:
        df = read_any(path, cfg.encoding, cfg.text_column, media=cfg)  # (the run's media_root and templates)
        require_column(df, column, what, key)
        truth = df[cfg.label_column] if cfg.label_column in df.columns else [None] * len(df)
        return df, [None if t is None else str(t) for t in truth]

    def add(name: str, value: Any, true: str | None) -> bool:
        items.append({"name": name, "input": value, "true": true})
        return len(items) >= limit

    for value in inputs:
        path = Path(value)
        if pred.kind == "text":
            if _looks_like_image(value) or path.is_dir():
                raise DataError(f"--input {value}: this run's model reads text, and this is "
                                f"{'a folder' if path.is_dir() else 'an image file'}; give a text or a table file")
            if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:  # (a .txt: one text a line, or a table)
                df, truth = table(path, cfg.text_column, "text", "data.text_column")
                require_text_column(df, cfg.text_column, pred.pair_column)
                for i, (text, true) in enumerate(zip(model_texts(df, cfg), truth)):  # texts, or pairs
                    where = row_label(df, i)
                    if add(where.split(": ", 1)[-1], pred.check_text(text, where), true):
                        return items
            elif add(f"text{len(items) + 1}", pred.check_text(_pair_or_text(pred, value), "--input"), None):
                return items
        elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
            df, truth = table(path, cfg.image_column, "image path", "data.image_column")
            for i, (cell, true) in enumerate(zip(df[cfg.image_column], truth)):
                source, name = media_cell(cell, table_base(df))  # a path, or an image embedded in the table
                if source is None:
                    raise DataError(f"{row_label(df, i)}: column {cfg.image_column!r} is empty")
                if add(media_name(source, name), pred.decode(source, row_label(df, i)), true):
                    return items
        else:
            if path.is_dir():
                files = list_images(path)
                if not files:
                    raise DataError(f"--input {value}: no images in this folder ({', '.join(sorted(IMAGE_SUFFIXES))})")
            elif path.is_file():
                files = [path]
            elif not _looks_like_image(value) and not path.suffix:
                raise DataError(f"--input {value!r}: this run's model reads images; give an image file, "
                                "a folder of images or a table with an image column")
            else:
                raise DataError(f"--input {value}: no such file")
            for f in files:  # class sub-folders name the true label
                true = f.parent.name if path.is_dir() and f.parent != path else None
                if add(f.name, pred.decode(str(f), str(f)), true):
                    return items
    return items


def mistakes(pred: Predictor, data: str | Path, n: int, quiet: bool, split: str = "test") -> list[dict[str, Any]]:
    """The ``n`` most confident wrong predictions on ``data`` (a labelled file; of a table whose column names each
    row's split, its ``split`` rows)."""
    if not pred.task.supports("mistakes"):
        raise ConfigError(f"--misclassified needs a single-label classification run, not {pred.task.name}")
    cfg = pred.config
    df = read_data(Path(data), pred.task, cfg.data, split=split)
    ds, kept = make_dataset(df, pred.bundle, pred.task, cfg.data)
    with ui.CountProgress("finding mistakes", len(ds), quiet) as bar:
        logits, targets = infer(pred.model, ds, pred.batch_size, progress=bar)
    items = []
    for i, _, _ in pred.task.mistake_positions(logits, targets, n):
        row = int(kept[i])
        if pred.kind == "text":
            value = str(df[cfg.data.text_column].iloc[row])
            if pred.pair_column:
                value = (value, str(df[pred.pair_column].iloc[row]))
        else:
            value = ds.raw([i])[0]
        if pred.kind == "image" and cfg.data.image_column in df.columns:
            name = media_name(*media_cell(df[cfg.data.image_column].iloc[row], Path(".")))
        else:
            name = f"row {row + 2}" if Path(data).suffix.lower() in (".csv", ".tsv") else f"row {row + 1}"
        items.append({"name": name, "input": value, "true": pred.task.labels[int(targets[i])]})
    return items


# --- drawing --------------------------------------------------------------------------------


def _title(item: dict[str, Any]) -> str:
    t = f"pred {item['predicted']} ({item['score']:.2f})"
    if item.get("true") is not None:
        t += f" | true {item['true']}"
    if item["target"] != item["predicted"]:
        t += f"\nexplaining {item['target']}"
    return t


def draw_overlay(ax: Any, image: torch.Tensor, heat: torch.Tensor, title: str) -> None:
    """The image, with the heat drawn over it more opaque where it is stronger (weak evidence
    leaves the image visible)."""
    import matplotlib.pyplot as plt

    ax.imshow(image.permute(1, 2, 0).numpy())
    h = heat.clamp(0, 1).numpy()
    rgba = plt.cm.jet(h)
    rgba[..., 3] = 0.15 + 0.6 * h
    ax.imshow(rgba)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_image_pngs(items: list[dict[str, Any]], heats: torch.Tensor, folder: Path, method: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for k, (item, heat) in enumerate(zip(items, heats)):
        fig, (left, right) = plt.subplots(1, 2, figsize=(5.6, 3.2))  # the input as is, and under its heat map
        left.imshow(item["input"].permute(1, 2, 0).numpy())
        left.set_title(item["name"], fontsize=8)
        left.axis("off")
        draw_overlay(right, item["input"], heat, f"{method}: {_title(item)}")
        fig.tight_layout()
        name = f"{k + 1:03d}-{Path(item['name']).stem.replace(' ', '_')}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        files.append(name)
    if len(items) > 1:
        cols = min(6, len(items))
        rows = (len(items) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.7 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, item, heat in zip(axes.flat, items, heats):
            draw_overlay(ax, item["input"], heat, _title(item))
        fig.suptitle(f"{method}: heat = evidence for the explained class", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "grid.png", dpi=100)
        plt.close(fig)
        files.append("grid.png")
    return files


def text_html(items: list[dict[str, Any]]) -> str:
    """Self-contained HTML: each text with its words shaded, green for evidence for the explained
    label and red against it (opacity relative to the text's largest attribution)."""
    blocks = []
    for item in items:
        top = max((abs(w["attribution"]) for w in item["words"]), default=0) or 1.0
        texts = (item["input"],) if isinstance(item["input"], str) else tuple(item["input"])
        spans, end, seq = [], 0, 0
        for w in item["words"]:
            if w.get("text", 0) != seq:  # the second text of a pair: on a line of its own
                seq, end = w["text"], 0
                spans.append('<br><span style="font:12px sans-serif;color:#555">second text:</span> ')
            a = w["attribution"] / top
            colour = f"rgba(0,150,0,{a:.2f})" if a >= 0 else f"rgba(210,0,0,{-a:.2f})"
            # the text between words as written (spaces, or none before punctuation), when offsets are known
            gap = html.escape(texts[seq][end: w["start"]]) if "start" in w else " "
            end = w.get("end", end)
            spans.append(f'{gap}<span title="{w["attribution"]:+.4f}" style="background:{colour};padding:1px 1px;'
                         f'border-radius:3px">{html.escape(w["word"])}</span>')
        meta = html.escape(_title(item).replace("\n", "; "))
        blocks.append(f'<div class="fmtune-attr" style="margin:10px 0"><div style="font:12px sans-serif;'
                      f'color:#555">{html.escape(item["name"])}: {meta}</div><div style="font:15px/1.9 serif">'
                      f'{"".join(spans)}</div></div>')
    legend = ('<p style="font:12px sans-serif">Layer integrated gradients on the token embeddings. '
              '<span style="background:rgba(0,150,0,.6)">green</span>: pushes towards the explained label; '
              '<span style="background:rgba(210,0,0,.6)">red</span>: pushes away. Hover a word for its value.</p>')
    return ('<!doctype html><html><head><meta charset="utf-8"><title>fmtune explain</title></head><body>'
            + legend + "\n".join(blocks) + "</body></html>\n")


# --- the command ----------------------------------------------------------------------------


def _explain_tokens(pred: Predictor, inputs: list[str], misclassified: int, target: str | None, out: Any,
                    limit: int, steps: int, baseline: str, quiet: bool) -> dict[str, Any]:
    """Token-level runs: the words behind each predicted entity (fmtune.explain_entities)."""
    from fmtune.explain_entities import explain_entities

    if misclassified:
        raise ConfigError("--misclassified is for classification runs; for entities give --input TEXT (or a file)")
    if not inputs:
        raise ConfigError("nothing to explain: give --input (a text, or a text/table file)")
    types = pred.task.types
    if target is not None and target not in types:
        raise ConfigError(f"--target {target!r} is not an entity type of this run; types: {', '.join(types)}")
    texts = [(it["name"], it["input"]) for it in collect_inputs(pred, inputs, limit)]
    out_dir = Path(out) if out else pred.run_dir / "explain"
    check_output_dir(out_dir, "explain.json")
    summary: dict[str, Any] = {"method": "ig", "baseline": baseline, "run": str(pred.run_dir), "out": str(out_dir)}
    tok = pred.bundle.tokenizer
    with ui.CountProgress("explaining entities (ig)", limit, quiet) as bar:
        items = explain_entities(pred, texts, target, steps, baseline_token(tok, baseline),
                                 word_embeddings(pred.model, len(tok)), limit, bar)
    if not items:
        summary.update(items=[], note="no entity predicted in the inputs" + (f" of type {target}" if target else ""))
        return summary

    def write(tmp: Path) -> None:
        (tmp / "attributions.html").write_text(text_html(items))
        (tmp / "attributions.json").write_text(json.dumps(items, indent=1))
        summary["files"] = ["attributions.html", "attributions.json"]
        summary["items"] = [{**it, "top_positive": sorted([w for w in it["words"] if w["attribution"] > 0],
                                                          key=lambda w: -w["attribution"])[:5]} for it in items]
        (tmp / "explain.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "out"}, indent=1))

    atomic_dir(out_dir, write)
    return summary


def explain(run: str | Path, inputs: list[str] | None = None, *, method: str = "auto", target: str | None = None,
            misclassified: int = 0, data: str | Path | None = None, out: str | Path | None = None,
            limit: int = 24, steps: int = 32, baseline: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Explain the run's predictions for ``inputs`` or for its ``misclassified`` most confident
    mistakes on ``data`` (default: the run's test file). Returns a summary; files go to ``out``."""
    pred = Predictor(run)
    pred.task.require("explain", "fmtune explain")
    if pred.kind == "audio":  # saliency over the log-mel spectrogram (fmtune.explain_audio)
        from fmtune.explain_audio import explain_audio

        return explain_audio(pred, inputs or [], method=method, target=target, misclassified=misclassified,
                             data=data, out=out, limit=limit, steps=steps, baseline=baseline, quiet=quiet)
    if pred.task.level == "dense":  # a class region or a box: Grad-CAM (fmtune.explain_dense)
        from fmtune.explain_dense import explain_dense

        if misclassified:
            raise ConfigError(f"--misclassified: a {pred.task.name} run has no single wrong label per image; give "
                              "images with --input")
        return explain_dense(pred, inputs or [], method, target, out, limit, quiet, collect_inputs=collect_inputs,
                             save_image_pngs=save_image_pngs)
    model = pred.model
    method = check_method(pred.kind, method, model)
    choices = TEXT_BASELINES if pred.kind == "text" else IMAGE_BASELINES
    baseline = baseline or choices[0]
    if baseline not in choices:
        raise ConfigError(f"--baseline {baseline!r} is not one for {pred.kind} runs; "
                          f"choose one of {', '.join(choices)}")
    if pred.kind == "text":
        baseline_token(pred.bundle.tokenizer, baseline)  # a tokenizer without that token: said before any work
    if pred.task.level == "tokens":
        return _explain_tokens(pred, inputs or [], misclassified, target, out, limit, max(steps, 20), baseline, quiet)
    items = choose_items(pred, inputs, misclassified, data, limit, quiet, mistakes, collect_inputs,
                         "text, image, folder or table")
    labels = pred.labels
    target_idx = None
    if target is not None:
        if target not in labels:
            raise ConfigError(f"--target {target!r} is not a label of this run; labels: {', '.join(labels)}")
        target_idx = labels.index(target)
    out_dir = Path(out) if out else pred.run_dir / "explain"
    check_output_dir(out_dir, "explain.json")
    summary: dict[str, Any] = {"method": method, "run": str(pred.run_dir), "out": str(out_dir), "items": []}
    if method != "gradcam":
        summary["baseline"] = baseline
    if not items:
        summary["note"] = "no misclassified examples" if misclassified else "no inputs"
        return summary

    if pred.kind == "text":
        logits = infer(model, pred.text_data([it["input"] for it in items]), pred.batch_size)[0]
    else:
        logits = infer(model, pred.image_data([it["input"] for it in items]), pred.batch_size)[0]
    post = pred.task.postprocess(logits)
    for item, p, row in zip(items, post, logits):
        k = target_idx if target_idx is not None else int(row.argmax())
        item.update(predicted=p.get("label", labels[int(row.argmax())] if labels else "value"),
                    score=float(p.get("score", row.max())), target=labels[k] if labels else "value", target_idx=k)

    def write(tmp: Path) -> None:
        if pred.kind == "text":
            with ui.CountProgress(f"explaining ({method})", len(items), quiet) as bar:
                for item in items:
                    item["words"] = text_attributions(model, pred.bundle.tokenizer, item["input"],
                                                      pred.bundle.max_length, item["target_idx"], max(steps, 20),
                                                      baseline, segments=pred.bundle.uses_segments())
                    bar(1)
            (tmp / "attributions.html").write_text(text_html(items))
            records = []
            for item in items:
                ranked = sorted(item["words"], key=lambda w: w["attribution"])
                records.append({k: item[k] for k in ("name", "input", "predicted", "score", "target", "true")}
                               | {"words": item["words"],
                                  "top_positive": [w for w in ranked[::-1][:5] if w["attribution"] > 0],
                                  "top_negative": [w for w in ranked[:5] if w["attribution"] < 0]})
            (tmp / "attributions.json").write_text(json.dumps(records, indent=1))
            summary["files"] = ["attributions.html", "attributions.json"]
            summary["items"] = records
        else:
            pixels = torch.stack([it["input"] for it in items]).float() / 255.0
            device = next(model.parameters()).device
            heats = []
            with ui.CountProgress(f"explaining ({method})", len(items), quiet) as bar:
                for s in range(0, len(items), 8):
                    chunk = pixels[s: s + 8].to(device)
                    tgt = torch.tensor([it["target_idx"] for it in items[s: s + 8]], device=device)
                    heats.append(image_heatmaps(model, pred.bundle.image, chunk, tgt, method, steps, baseline))
                    bar(len(chunk))
            heat = torch.cat(heats)
            summary["files"] = save_image_pngs(items, heat, tmp, method)
            summary["items"] = [{k: it[k] for k in ("name", "predicted", "score", "target", "true")} for it in items]
            np.save(tmp / "heatmaps.npy", heat.numpy().astype(np.float16))
        (tmp / "explain.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "out"}, indent=1))

    atomic_dir(out_dir, write)
    return summary
