"""Named-entity recognition (token classification): every word of a sentence gets a tag (IOB2),
entities are read from the tags, scored with seqeval at entity level.

The head reads every token's last hidden state (``level = "tokens"``); a word is labelled and
predicted at its first sub-token (``task.label_all_subtokens`` also trains the rest). Long
sentences are read in overlapping windows (``fmtune.data.tokens``), so no word is ever dropped.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fmtune import plots
from fmtune.data.conll import read_tokens, split_words
from fmtune.data.tokens import IGNORE, Layout, TokenData, TokenTargets, encode_sentences
from fmtune.errors import DataError
from fmtune.tasks.base import TASKS, Task

OUTSIDE = "O"


def entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, end word) of each entity in IOB2 tags; an I- that continues nothing
    starts an entity (seqeval's default reading)."""
    out: list[tuple[str, int, int]] = []
    cur: list[Any] | None = None
    for i, tag in enumerate(list(tags) + [OUTSIDE]):
        prefix, _, typ = str(tag).partition("-")
        if cur is not None and (prefix != "I" or typ != cur[0]):
            out.append((cur[0], cur[1], i))
            cur = None
        if prefix in ("B", "I") and cur is None and typ:
            cur = [typ, i]
    return out


@TASKS.register("ner")
class TokenClassification(Task):
    name = "ner"
    description = "named entities: a tag per word (IOB2/IOBES), entity-level F1 (seqeval)"
    default_metric = "entity_f1"
    metric_names = ("entity_f1", "entity_precision", "entity_recall", "macro_f1", "token_accuracy", "loss")
    level = "tokens"
    hf_problem_type = "token_classification"
    capabilities = frozenset({"explain", "robustness"})  # (robustness: typos, case, dropped / swapped words outside
    # entities, the tags kept true; fmtune.training.perturb.perturb_words)
    accepts_word_lists = True
    # batches of 8, as transformers' run_ner recipe: WNUT-2016 (1,695 tweets, MiniLM-L6, full, 3 epochs), test entity
    # F1 0.361 / 0.377 (seeds 0 / 1) at batches of 32 (153 steps, still improving at the last), 0.446 / 0.404 at 8
    # (bench/batch_size.py; bench/results-2026-12-02-ner-batch-2core.json)
    default_train = {"batch_size": 8}
    baseline_method = ("linear probe (scikit-learn logistic regression) on the frozen pretrained backbone's token "
                       "states, at each word's first sub-token")

    # --- reading data ------------------------------------------------------------------------
    @classmethod
    def read_file(cls, path, data_cfg):
        return read_tokens(path, data_cfg.encoding, data_cfg.text_column, data_cfg.format, data_cfg.label_names)

    @classmethod
    def target_column(cls, data_cfg):
        return "tags"

    @classmethod
    def options_from(cls, task_cfg, data_cfg):
        return {"column": "tags", "class_weights": task_cfg.class_weights,
                "label_all_subtokens": task_cfg.label_all_subtokens, "window_stride": task_cfg.window_stride}

    @classmethod
    def from_train(cls, values, df, column="tags", class_weights=False, **kw):
        _check_labelled(values, df)
        types = sorted({t.partition("-")[2] for tags in values for t in tags if t != OUTSIDE})
        if not types:
            raise DataError(f"{df.attrs.get('source')}: no entity is tagged in the training data (every tag is O)")
        labels = [OUTSIDE] + [f"{p}-{t}" for t in types for p in ("B", "I")]
        task = cls(labels, **kw)
        if class_weights:
            ids = np.concatenate([[task.labels.index(t) for t in tags] for tags in values])
            counts = torch.bincount(torch.from_numpy(ids), minlength=len(labels)).float()
            task.class_weights = counts.sum() / (len(labels) * counts.clamp(min=1))
        return task

    @property
    def types(self) -> list[str]:
        return [lab[2:] for lab in self.labels if lab.startswith("B-")]

    def encode(self, values, df, column, allow_unknown=False):
        """Per sentence, per word: the label id (-100 for a tag unseen in training, when allowed)."""
        _check_labelled(values, df)
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for r, tags in enumerate(values):
            ids = [index.get(t, IGNORE) for t in tags]
            if not allow_unknown and IGNORE in ids:
                bad = tags[ids.index(IGNORE)]
                raise DataError(f"{_where(df, r)}: tag {bad!r} was not seen in training (known types: "
                                f"{', '.join(self.types[:20])}); fix it or pass --set data.unknown_labels=unknown")
            out.append(ids)
        return out

    def dataset(self, df, bundle, data_cfg, with_targets=True, allow_unknown=False):
        words = list(df["tokens"])
        labels = self.encode(df["tags"], df, "tags", allow_unknown) if with_targets else None
        inside = {i: self.labels.index("I-" + lab[2:]) for i, lab in enumerate(self.labels) if lab.startswith("B-")}
        ids, train, layout = encode_sentences(words, bundle.tokenizer, bundle.max_length,
                                              self.options.get("window_stride", 0.25), labels,
                                              self.options.get("label_all_subtokens", False), inside)
        targets = TokenTargets(train, [list(t) for t in df["tags"]], layout) if with_targets else None
        pad = bundle.tokenizer.pad_token_id if bundle.tokenizer.pad_token_id is not None else 0
        texts = list(df["text"]) if "text" in df.columns else None
        offsets = list(df["offsets"]) if "offsets" in df.columns else None
        return TokenData(ids, targets, pad, layout, texts, offsets), np.arange(len(df))

    def input_column(self, df, default):
        return "tokens" if default not in df.columns and "tokens" in df.columns else default

    def inputs(self, items, bundle):
        """Raw texts (split into words) or lists of words, to predict."""
        texts, words, offsets = [], [], []
        for it in items:
            if isinstance(it, str):
                w, o = split_words(it)
                text = it
            else:
                from fmtune.data.conll import join_words

                w = [str(x) for x in it]
                text, o = join_words(w)
            texts.append(text)
            words.append(w)
            offsets.append(o)
        df = pd.DataFrame({"tokens": words, "text": texts, "offsets": offsets})
        ds, _ = self.dataset(df, bundle, None, with_targets=False)
        return ds

    # --- training and evaluation -----------------------------------------------------------------
    def loss(self, logits, targets):
        w = self.class_weights.to(logits.device) if self.class_weights is not None else None
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), weight=w, ignore_index=IGNORE)

    def word_predictions(self, logits: torch.Tensor, layout: Layout) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per sentence: each word's predicted label id and its probability."""
        probs = logits.float().softmax(-1)
        ids_w, p_w = [], []
        for w in range(len(layout.sentence)):
            p = probs[w, torch.from_numpy(layout.word_pos[w])]
            best = p.max(-1)
            ids_w.append(best.indices.numpy())
            p_w.append(best.values.numpy())
        return layout.per_sentence(ids_w, -1), layout.per_sentence(p_w, np.float32(0))

    def _tag_lists(self, logits: torch.Tensor, targets: TokenTargets) -> tuple[list[list[str]], list[list[str]]]:
        pred_ids, _ = self.word_predictions(logits, targets.layout)
        pred = [[self.labels[int(i)] for i in ids] for ids in pred_ids]
        return [list(g) for g in targets.gold], pred

    def metrics(self, logits, targets):
        from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

        gold, pred = self._tag_lists(logits, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # seqeval warns about types without a gold entity
            out = {"entity_f1": float(f1_score(gold, pred, zero_division=0)),
                   "entity_precision": float(precision_score(gold, pred, zero_division=0)),
                   "entity_recall": float(recall_score(gold, pred, zero_division=0)),
                   "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
                   "token_accuracy": float(accuracy_score(gold, pred)) if gold else 0.0}
        labels = targets.collate(list(range(len(targets))), logits.shape[1])
        keep = labels != IGNORE
        out["loss"] = float(F.cross_entropy(logits.float()[keep], labels[keep]).item()) if keep.any() else float("nan")
        return out

    # --- output ------------------------------------------------------------------------------
    def postprocess(self, logits, ds=None):
        pred_ids, probs = self.word_predictions(logits, ds.layout)
        out = []
        for s, (ids, p) in enumerate(zip(pred_ids, probs)):
            tags = [self.labels[int(i)] for i in ids]
            text, offsets = ds.texts[s], ds.offsets[s]
            spans = []
            for typ, a, b in entities(tags):
                start, end = int(offsets[a][0]), int(offsets[b - 1][1])
                spans.append({"text": text[start:end], "label": typ, "start": start, "end": end,
                              "score": round(float(np.mean(p[a:b])), 4)})
            out.append({"entities": spans, "tags": tags})
        return out

    def prediction_columns(self):
        return ["entities", "tags"]

    hf_parameters = ("aggregation_strategy",)

    def hf_output(self, record: dict[str, Any], parameters: dict[str, Any]) -> Any:
        """The entities as the token-classification API groups them (aggregation_strategy simple)."""
        if parameters.get("aggregation_strategy") not in (None, "simple"):
            raise DataError(f"parameters.aggregation_strategy: {parameters['aggregation_strategy']!r}; this service "
                            "answers whole entities (simple)")
        return [{"entity_group": e["label"], "score": e["score"], "word": e["text"], "start": e["start"],
                 "end": e["end"]} for e in record["entities"]]

    def flatten(self, record):
        return {"entities": record["entities"], "tags": " ".join(record["tags"])}

    # --- the test report ---------------------------------------------------------------------
    def text_report(self, logits, targets) -> str:
        from seqeval.metrics import classification_report

        gold, pred = self._tag_lists(logits, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            text = classification_report(gold, pred, digits=4, zero_division=0)
        w = targets.layout.split_sentences()
        unseen = sum(1 for g in gold for t in g if t not in self.labels)
        text += (f"\n{w['sentences']} sentences read in {w['windows']} windows; {w['sentences_in_several_windows']} "
                 f"sentence(s) ({w['words_in_them']} words) were longer than one window and read in overlapping "
                 "windows: every word was predicted and scored\n")
        if unseen:
            text += f"{unseen} word(s) carry a tag unseen in training: their entities count as missed\n"
        return text

    def report_files(self, logits, targets, folder: Path, title: str) -> dict[str, Any]:
        from seqeval.metrics.sequence_labeling import precision_recall_fscore_support

        gold, pred = self._tag_lists(logits, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, r, f, n = precision_recall_fscore_support(gold, pred, average=None, zero_division=0)
        from seqeval.metrics.sequence_labeling import get_entities

        names = sorted({e[0] for e in get_entities(gold)} | {e[0] for e in get_entities(pred)})
        per_type = {t: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
                    for i, t in enumerate(names)}
        rows, cols = self.types + ["(none: spurious)"], self.types + ["(none: missed)"]
        extra = sorted({t for t in names if t not in self.types})
        rows = extra + rows
        cm = np.zeros((len(rows), len(cols)), dtype=np.int64)
        for g, q in zip(gold, pred):
            gs = {(a, b): t for t, a, b in entities(g)}
            ps = {(a, b): t for t, a, b in entities(q)}
            for span, t in gs.items():
                cm[rows.index(t), cols.index(ps[span]) if span in ps else len(cols) - 1] += 1
            for span, t in ps.items():
                if span not in gs:
                    cm[len(rows) - 1, cols.index(t)] += 1
        path = plots.confusion_matrix(cm, rows, folder / "confusion_matrix.png",
                                      f"{title}: entity types (exact spans)", xnames=cols, xlabel="predicted type",
                                      ylabel="true type")
        return {"confusion_matrix": path.name, "per_type": per_type, "windows": targets.layout.split_sentences()}

    # --- the baseline: a linear probe on frozen token states -----------------------------------
    def _word_features(self, x: np.ndarray, layout: Layout) -> np.ndarray:
        return np.concatenate([x[w, layout.word_pos[w]] for w in range(len(layout.sentence))]) if len(x) else x

    def fit_probe(self, x, targets, seed):
        from sklearn.linear_model import LogisticRegression

        from fmtune.tasks.probe import scaled

        feats = self._word_features(x, targets.layout)
        y = np.concatenate([t[pos] for t, pos in zip(targets.train, targets.layout.word_pos)])
        keep = y != IGNORE
        feats, y = feats[keep], y[keep]
        rng = np.random.default_rng(seed)
        if len(y) > 30000:  # a probe on 30,000 words is as good as on all, and fits in seconds
            pick = rng.choice(len(y), 30000, replace=False)
            feats, y = feats[pick], y[pick]
        # C chosen on a held-out fifth of the words, then refitted on all
        order = rng.permutation(len(y))
        cut = max(1, len(y) // 5)
        best, best_acc = 1.0, -1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c in (0.01, 0.1, 1.0):
                m = scaled(LogisticRegression(C=c, max_iter=300)).fit(feats[order[cut:]], y[order[cut:]])
                acc = float((m.predict(feats[order[:cut]]) == y[order[:cut]]).mean())
                if acc > best_acc:
                    best, best_acc = c, acc
            return scaled(LogisticRegression(C=best, max_iter=500)).fit(feats, y)

    def probe_logits(self, probe, x):
        n, width, h = x.shape
        proba = np.full((n * width, len(self.labels)), 1e-12)
        proba[:, probe.classes_] = probe.predict_proba(x.reshape(-1, h))
        return torch.from_numpy(np.log(proba)).float().view(n, width, -1)


def _where(df: pd.DataFrame, r: int) -> str:
    src = df.attrs.get("source")
    if "line" not in df.columns:
        return f"{src}: sentence {r + 1}"
    return f"{src}: {df.attrs.get('line_unit', 'line')} {df['line'].iloc[r]}"


def _check_labelled(values: pd.Series, df: pd.DataFrame) -> None:
    for r, tags in enumerate(values):
        if tags is None or (isinstance(tags, float) and np.isnan(tags)):
            raise DataError(f"{_where(df, r)}: the sentence has no tags; labelled data needs a tag per word")
