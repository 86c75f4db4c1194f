"""``fmtune report RUN`` and ``fmtune compare RUN...``: one self-contained HTML page per run (or
per comparison), made from what the run directory already holds. Plots are matplotlib (Agg)
PNGs inlined as data URIs; no script, stylesheet or font comes from the network.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
from pathlib import Path
from typing import Any

import yaml

from fmtune.errors import RunDirError
from fmtune.fsutil import read_json, read_jsonl, write_text_atomic

REPORT_FILE, COMPARE_FILE = "report.html", "compare.html"
CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1080px;
color:#222;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;
font-size:.9rem}th{background:#f4f4f4}img{max-width:100%}pre{background:#f7f7f7;padding:.8rem;overflow:auto;
font-size:.8rem}.num{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return _img_tag(buf.getvalue())


def _img_tag(data: bytes, alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="num">{v:.4f}</td>'
        if isinstance(v, int):
            return f'<td class="num">{v:,}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _curves(log: list[dict[str, Any]], metric: str, best_step: int | None) -> str:
    plt = _plt()
    train = [r for r in log if r.get("type") == "train"]
    evals = [r for r in log if r.get("type") == "eval"]
    if not train and not evals:
        return '<p class="muted">no training log</p>'
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals and "loss" in evals[0]:
        axes[0].plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val loss")
    axes[0].set_title("loss")
    axes[0].legend()
    if evals:
        axes[1].plot([r["step"] for r in evals], [r.get(metric) for r in evals], "o-", color="tab:green")
        if best_step is not None:
            axes[1].axvline(best_step, color="tab:red", ls="--", label=f"best (step {best_step})")
            axes[1].legend()
    axes[1].set_title(f"validation {metric}")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:purple")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _data_section(cfg: dict[str, Any], info: dict[str, Any]) -> str:
    plt = _plt()
    data = info.get("data") or {}
    parts = []
    rows = [[name, d.get("rows", ""), d.get("source") or ("split off train" if name == "val" else "")]
            for name, d in data.items() if isinstance(d, dict)]
    parts.append(_table(["split", "rows", "source"], rows))
    counts = {name: d["label_counts"] for name, d in data.items() if isinstance(d, dict) and d.get("label_counts")}
    if counts:
        labels = sorted({lab for c in counts.values() for lab in c})
        many = len(labels) > 40  # a wider figure, names upright and small: one name per bar (150 classes)
        fig, ax = plt.subplots(figsize=(min(2 + 0.13 * len(labels), 30) if many else
                                        min(3 + 0.5 * len(labels) * len(counts), 12), 3.6 if many else 3))
        width = 0.8 / len(counts)
        for j, (name, c) in enumerate(counts.items()):
            total = sum(c.values()) or 1
            ax.bar([i + j * width for i in range(len(labels))], [c.get(lab, 0) / total for lab in labels], width,
                   label=name)
        ax.set_xticks([i + width * (len(counts) - 1) / 2 for i in range(len(labels))], labels,
                      rotation=90 if many else 45 if len(labels) > 6 else 0,
                      ha="center" if many or len(labels) <= 6 else "right", fontsize=6 if many else None)
        ax.set_ylabel("share of rows")
        ax.set_title("class balance per split")
        ax.legend()
        parts.append(_png(fig))
    train = (cfg.get("data") or {}).get("train")
    col = (cfg.get("data") or {}).get("text_column", "text")
    if train and Path(train).is_dir():  # an image folder: the sizes the images came in
        from PIL import Image

        from fmtune.data.dataset import upright_size
        from fmtune.data.readers import list_images

        sizes = []
        for f in list_images(Path(train))[:5000]:
            try:
                with Image.open(f) as im:  # reads the header only
                    sizes.append(upright_size(im))
            except OSError:
                continue
        if sizes:
            fig, ax = plt.subplots(figsize=(6, 2.8))
            ax.hist([w for w, _ in sizes], bins=30, alpha=0.6, label="width")
            ax.hist([h for _, h in sizes], bins=30, alpha=0.6, label="height")
            ax.set_xlabel("pixels (training images, before resizing)")
            ax.set_ylabel("images")
            ax.legend()
            parts.append(_png(fig))
            parts.append(f'<p class="muted">sizes of {len(sizes):,} training images before resizing</p>')
    elif train and Path(train).is_file():
        try:
            from fmtune.config import from_dict
            from fmtune.data.prepare import read_data

            data_cfg = from_dict({"data": cfg.get("data") or {}}).data
            df = read_data(train, (cfg.get("task") or {}).get("type", "classification"), data_cfg, split="train")
            if col in df:
                lengths = df[col].dropna().astype(str).str.split().str.len()
                fig, ax = plt.subplots(figsize=(6, 2.8))
                ax.hist(lengths, bins=40, color="tab:blue")
                ax.set_xlabel("words per text (training data)")
                ax.set_ylabel("rows")
                parts.append(_png(fig))
                parts.append(f'<p class="muted">words per text in the training data (median '
                             f'{int(lengths.median())}, longest {int(lengths.max())})</p>')
        except Exception:  # the histogram is a nicety; the data may have moved since
            parts.append('<p class="muted">training file not readable any more: no length histogram</p>')
    return "\n".join(parts)


def run_summary(run_dir: Path) -> dict[str, Any]:
    """The facts of a run that reports and comparisons show."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir} is not an fmtune run directory (config.yaml missing)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    info = read_json(run_dir / "run.json", {})
    ev = read_json(run_dir / "eval.json", {})
    fit = info.get("fit") or {}
    params = info.get("params") or {}
    return {"run": run_dir.name, "dir": str(run_dir), "model": (cfg.get("model") or {}).get("name"),
            "strategy": (cfg.get("strategy") or {}).get("name"), "task": (cfg.get("task") or {}).get("type"),
            "trainable_params": params.get("trainable_params"), "total_params": params.get("total_params"),
            "seconds": fit.get("seconds"), "epochs": fit.get("epochs"), "metric": fit.get("metric"),
            "best_val": fit.get("best"), "best_step": fit.get("best_step"), "test": ev.get("test") or {},
            "baseline": ev.get("baseline") or {}, "cfg": cfg, "info": info, "eval": ev}


def write_report(run: str | Path) -> Path:
    """Write ``RUN/report.html`` and return its path."""
    s = run_summary(Path(run))
    run_dir = Path(s["dir"])
    cfg, info, ev = s["cfg"], s["info"], s["eval"]
    sections = [f"<h1>fmtune run {html.escape(s['run'])}</h1>",
                f"<p>{html.escape(str(s['model']))} &middot; task {html.escape(str(s['task']))} &middot; strategy "
                f"{html.escape(str(s['strategy']))} &middot; {s['trainable_params'] or 0:,} of "
                f"{s['total_params'] or 0:,} parameters trained</p>"]
    if s["test"]:
        keys = list(s["test"])
        rows = []
        if s["baseline"]:
            rows.append([ev.get("baseline_label", "pretrained baseline (linear probe)"),
                         *[s["baseline"].get(k, float("nan")) for k in keys]])
        rows.append(["fine-tuned", *[s["test"][k] for k in keys]])
        sections += [f"<h2>Test results ({ev.get('n_test', '?')} examples)</h2>", _table(["model", *keys], rows)]
        if s["baseline"]:
            sections.append(f'<p class="muted">baseline: {html.escape(ev.get("baseline_method", ""))}</p>')
    cont = read_json(run_dir / "continual.json", {})
    if cont.get("tasks"):  # fmtune continue: every task of the lineage, before and after
        rows = [[t["task"], t.get("examples", ""), t["before"]["accuracy"], t["after"]["accuracy"],
                 -t["forgetting"] if "forgetting" in t else t.get("gain", "")] if "after" in t else
                [t["task"], "", "", "", t.get("note", "")] for t in cont["tasks"]]
        sections += [f"<h2>Continual learning ({html.escape(cont['method'])}, from "
                     f"{html.escape(Path(cont['source']).name)})</h2>",
                     _table(["task", "examples", "accuracy before", "accuracy after", "change"], rows),
                     f'<p class="muted">mean forgetting on the old tasks {cont.get("mean_forgetting")}; '
                     f'labels added: {html.escape(", ".join(cont["labels"]["added"]) or "none")}; memory of '
                     f'{cont["memory"]["examples"]} old examples</p>']
    sections += _few_labels_section(run_dir, info)
    log = read_jsonl(run_dir / "metrics.jsonl")
    sections += _generation_section(log, ev)
    sections += ["<h2>Training</h2>", _curves(log, s["metric"] or "", s["best_step"])]
    fit = info.get("fit") or {}
    if fit:
        stop = ("stopped early (patience)" if fit.get("stopped_early") else
                "stopped at the time budget" if fit.get("out_of_time") else "ran all epochs")
        sections.append(f"<p>{fit.get('steps')} steps ({fit.get('epochs', 0):.2f} epochs) in "
                        f"{fit.get('seconds', 0):.0f} s, "
                        f"{fit.get('samples_per_s', 0):.1f} samples/s; {stop}; best validation {fit.get('metric')} "
                        f"{fit.get('best') if fit.get('best') is not None else 'n/a'} at step {fit.get('best_step')} "
                        "(the checkpoint kept)</p>")
    init = info.get("head_init")
    if init:
        kept = (" Training never did better on validation: the checkpoint kept is that probe on the untrained "
                "backbone." if init.get("kept_as_is") else "")
        again = init.get("every_row") or {}
        if again:
            metric = next(k for k in again if k.startswith("val_"))
            kept += (f" The head was then solved again on all {again['rows']:,} training rows (validation "
                     f"{metric[4:]} {again[metric]:g}): "
                     + ("the run's model." if again["kept"] else "not kept, validation put the sample's first."))
        sections.append(f"<p>The head started from the linear probe solved on {init['rows']} training rows' "
                        f"features ({init['seconds']:.1f} s), validated at step 0.{kept}</p>")
    moved = info.get("recentred")
    if moved:
        metric = next(k for k in moved if k.startswith("val_"))
        sections.append(f"<p>Recentred: mean target minus mean prediction on {moved['rows']:,} training rows "
                        f"{moved['shift']:+.4g}, added to the head's output (validation {metric[4:]} "
                        f"{moved[metric]:g}" + ("" if moved["kept"] else ": worse, not kept") + ").</p>")
    cut = info.get("thresholds")
    if cut:
        if cut.get("chosen"):
            metric, values = cut["metric"], cut["thresholds"]
            what = cut.get("what", "decision thresholds")
            sections.append(
                f"<p>{what[0].upper() + what[1:]} chosen on {cut['rows']:,} validation {cut.get('unit', 'rows')} for "
                f"{metric} (validation "
                f"{cut['before'][f'val_{metric}']:g} at {cut['before']['threshold']:g} -> {cut[f'val_{metric}']:g}): "
                + html.escape(", ".join(f"{k} {v:g}" for k, v in values.items())) + ".</p>")
        else:
            sections.append(f"<p>Decision thresholds not chosen: {html.escape(cut['why'])}.</p>")
    for title, name in (("Confusion matrix (test)", "confusion_matrix.png"),
                        ("Precision-recall (test)", "precision_recall.png")):
        if (run_dir / name).is_file():
            sections += [f"<h2>{title}</h2>", _img_tag((run_dir / name).read_bytes(), title)]
    if (run_dir / "classification_report.txt").is_file():
        sections.append(f"<pre>{html.escape((run_dir / 'classification_report.txt').read_text())}</pre>")
    mistakes = ev.get("mistakes") or []
    if mistakes:
        sections.append("<h2>Test images with the lowest pixel accuracy (image, truth, prediction)</h2>"
                        if "pixel_accuracy" in mistakes[0] else
                        "<h2>Test images: truth beside the predictions</h2>" if "gallery" in mistakes[0] else
                        "<h2>Most confident mistakes (test)</h2>")
        if "input" in mistakes[0]:
            sections.append(_table(["true", "predicted", "score", "input"],
                                   [[m["true"], m["predicted"], m["score"], m["input"]] for m in mistakes]))
        elif (run_dir / "mistakes.png").is_file():
            sections.append(_img_tag((run_dir / "mistakes.png").read_bytes(), "most confident mistakes"))
    for title, name in (("Explanations (fmtune explain)", "explain/grid.png"),
                        ("Features before and after fine-tuning (fmtune embed)", "embed/embed.png"),
                        ("Robustness (fmtune robustness)", "robustness/robustness.png")):
        if (run_dir / name).is_file():  # written by the analysis verbs, when they were run
            sections += [f"<h2>{title}</h2>", _img_tag((run_dir / name).read_bytes(), title)]
        if name.startswith("explain/") and (run_dir / "explain" / "attributions.html").is_file():
            page = (run_dir / "explain" / "attributions.html").read_text()
            body = page.split("<body>", 1)[-1].rsplit("</body>", 1)[0]
            sections += [f"<h2>{title}</h2>", body]
    sections += _fairness_section(run_dir)
    sections += ["<h2>Data</h2>", _data_section(cfg, info)]
    env = [["hardware", info.get("hardware", "")], ["params", json.dumps(info.get("params", {}))],
           *[[k, v] for k, v in (info.get("versions") or {}).items()], ["report made with python",
                                                                          platform.python_version()]]
    sections += ["<h2>Environment</h2>", _table(["", ""], env),
                 "<h2>Config</h2>", f"<pre>{html.escape(yaml.safe_dump(cfg, sort_keys=False))}</pre>"]
    page = _page(f"fmtune report: {s['run']}", "\n".join(sections))
    out = run_dir / REPORT_FILE
    write_text_atomic(out, page)
    return out


def _generation_section(log: list[dict[str, Any]], ev: dict[str, Any]) -> list[str]:
    """Text generation: validation perplexity per evaluation, and test answers side by side."""
    samples = ev.get("samples") or []
    evals = [r for r in log if r.get("type") == "eval" and "perplexity" in r]
    if not samples and not evals:
        return []
    out = []
    if evals:
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 2.8))
        ax.plot([r["step"] for r in evals], [r["perplexity"] for r in evals], "o-", color="tab:orange")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        out += ["<h2>Validation perplexity</h2>", _png(fig)]
    if samples:
        cut = lambda t: t if len(t) <= 400 else t[:399] + "…"  # noqa: E731
        asked = "audio" if "audio" in samples[0] else "prompt"  # speech recognition: the clip transcribed
        out += [f"<h2>{'Transcripts' if asked == 'audio' else 'Answers'} (test, {len(samples)} of "
                f"{ev.get('n_generated', len(samples))} generated; all in test_answers.jsonl)</h2>",
                _table([asked, "reference", "pretrained (zero-shot)", "fine-tuned"],
                       [[cut(a[asked]), a["reference"], a["baseline"], a["fine_tuned"]] for a in samples])]
    return out


def _gap(m: dict[str, Any]) -> str:
    if m["value"] is None:
        return "-"
    lo, hi = m["ci"]
    return f"{m['value']:.4f} [{lo:.4f}, {hi:.4f}]" if lo is not None else f"{m['value']:.4f}"


def _fairness_gap_rows(fair: dict[str, Any], models: list[str], label: str = "") -> list[list[Any]]:
    rows = []
    for grouping, entry in fair["models"][models[0]].items():
        for gap in entry["gaps"] or {"(no gap judged)": None}:
            rows.append([*([label] if label else []), grouping, gap,
                         *[_gap(fair["models"][m][grouping]["gaps"][gap]) if gap in fair["models"][m][grouping]["gaps"]
                           else "-" for m in models]])
    return rows


def selftrain_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """selftrain.json's rounds as a table (header, rows): for the console and the report."""
    metrics = list(result["rounds"][-1].get("test", {}))
    rows = [[r["round"], r["labelled"], r["pseudo_labelled"],
             "" if r.get("pseudo_right") is None else f"{r['pseudo_right']}/{r['pseudo_labelled']}",
             *[r.get("test", {}).get(k, "") for k in metrics]] for r in result["rounds"]]
    return ["round", "labelled", "pseudo-labelled", "pseudo-labels right", *metrics], rows


def _few_labels_section(run_dir: Path, info: dict[str, Any]) -> list[str]:
    """Few labels: what strategy auto chose and why, the contrastive phase, the validation choice,
    and self-training's rounds (fmtune.fewshot, fmtune.semi)."""
    few = info.get("few_labels") or {}
    st = read_json(run_dir / "selftrain.json", {})
    if not few and not st:
        return []
    out = ["<h2>Few labels</h2>"]
    if few.get("auto"):
        out.append(f"<p>strategy auto chose <b>{html.escape(few['auto']['strategy'])}</b>: "
                   f"{html.escape(few['auto']['why'])}</p>")
    c = few.get("contrastive")
    if c:
        out.append(f"<p>contrastive pair training: {c['steps']} steps of {c['rows_per_step']} rows "
                   f"({c['pairs_seen']:,} pairs) in {c['seconds']:.1f} s, encoder {html.escape(c['encoder'])}"
                   f"{' (token embeddings kept as pretrained)' if c.get('frozen_embedding_params') else ''}, "
                   f"lr {c['lr']:g}; pair loss {c['loss_first']:.4f} &rarr; {c['loss_last']:.4f}</p>")
    if few.get("no_validation_split"):
        out.append(f'<p class="muted">{html.escape(few["no_validation_split"])}</p>')
    if st.get("rounds"):
        out += [f"<h3>Self-training ({st['pool_rows']} unlabelled rows of {html.escape(Path(st['unlabeled']).name)})"
                "</h3>", _table(*selftrain_table(st)),
                f'<p class="muted">every round trains from the pretrained weights; {st["per_round"]} more '
                "pseudo-labels per class each round, the most probable first; rounds before the last are in "
                "rounds/</p>"]
    return out


def _fairness_section(run_dir: Path) -> list[str]:
    """fmtune fairness, when it was run: gaps per grouping and model, the per-group plot, overall
    metrics (what thresholds cost), counterfactual flips."""
    fair = read_json(run_dir / "fairness.json", {})
    if not fair.get("models"):
        return []
    models = list(fair["models"])
    conf = int(round(100 * fair.get("confidence", 0.95)))
    out = [f"<h2>Fairness (fmtune fairness: {fair['n']} rows of {html.escape(Path(fair['data']).name)}, groups "
           f"{html.escape(', '.join(fair['groups']))})</h2>",
           _table(["grouping", "gap", *models], _fairness_gap_rows(fair, models)),
           f'<p class="muted">{conf}% bootstrap intervals ({fair.get("bootstrap")} resamples); groups under '
           f'{fair.get("min_group_size")} examples are flagged and left out of the gaps'
           + (f"; positive label {html.escape(str(fair['positive']))}" if fair.get("positive") else "") + "</p>"]
    keys = list(next(iter(fair["overall"].values())))
    out.append(_table(["model (all rows)", *keys], [[m, *[fair["overall"][m].get(k, "") for k in keys]]
                                                    for m in models]))
    if (run_dir / "fairness.png").is_file():
        out.append(_img_tag((run_dir / "fairness.png").read_bytes(), "metrics by group"))
    cf = (fair.get("counterfactual") or {}).get("by") or {}
    if cf:
        out += [f"<p>Counterfactuals: {html.escape(fair['counterfactual']['method'])}</p>",
                _table(["swap", "rows", "decision flipped", "mean change", "largest change"],
                       [[k, c["rows"], c["flip_rate"], c["mean_change"], c["max_change"]] for k, c in cf.items()])]
    out += [f'<p class="muted">{html.escape(n)}</p>' for n in fair.get("notes", [])]
    return out


def _page(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def compare(runs: list[str | Path], out: str | Path) -> tuple[Path, list[str], list[list[Any]]]:
    """Write a side-by-side HTML of ``runs``; returns its path and the table (header, rows)."""
    summaries = [run_summary(Path(r)) for r in runs]
    metrics = list(dict.fromkeys(k for s in summaries for k in s["test"]))
    header = ["run", "model", "strategy", "trainable params", "train s", "epochs", "best val", *metrics]
    rows = [[s["run"], s["model"], s["strategy"], s["trainable_params"] or 0, float(s["seconds"] or 0),
             float(s["epochs"] or 0), float(s["best_val"]) if s["best_val"] is not None else "",
             *[float(s["test"][m]) if m in s["test"] else "" for m in metrics]] for s in summaries]
    plt = _plt()
    figs = ""
    if metrics:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(summaries) * len(metrics)), 3.2))
        width = 0.8 / len(metrics)
        for j, m in enumerate(metrics):
            ax.bar([i + j * width for i in range(len(summaries))], [s["test"].get(m, 0) for s in summaries], width,
                   label=m)
        ax.set_xticks([i + width * (len(metrics) - 1) / 2 for i in range(len(summaries))],
                      [s["run"] for s in summaries], rotation=20, ha="right")
        ax.set_title("test metrics")
        ax.legend()
        figs = _png(fig)
    fair_rows = []
    for s in summaries:
        fair = read_json(Path(s["dir"]) / "fairness.json", {})
        if fair.get("models"):
            fair_rows += _fairness_gap_rows(fair, [m for m in fair["models"] if m != "pretrained baseline"][:1],
                                            s["run"])
    if fair_rows:
        figs += ("<h2>Fairness gaps (each run's last fmtune fairness; fine-tuned model)</h2>"
                 + _table(["run", "grouping", "gap", "value [interval]"], fair_rows))
    body = (f"<h1>fmtune: {len(summaries)} runs compared</h1>" + _table(header, rows) + figs
            + "".join(f'<p class="muted">{html.escape(s["run"])}: {html.escape(s["dir"])}</p>' for s in summaries))
    out = Path(out)
    write_text_atomic(out, _page("fmtune compare", body))
    return out, header, rows
