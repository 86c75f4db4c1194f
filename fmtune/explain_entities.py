"""``fmtune explain`` for token-level runs (named entities): which words made the model tag an
entity. For each predicted entity, layer integrated gradients on the token embeddings of the
window that holds it, towards the sum of the entity's tag logits at its words (each word's
first sub-token), from a baseline where every token but the special ones is [PAD] / [MASK] /
[UNK]; sub-token attributions are summed per word of the text."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from fmtune.training.infer import infer


class _EntityScore(nn.Module):
    """ids, mask -> the sum of the entity's tag logits at its words' positions (one number per row)."""

    def __init__(self, model: nn.Module, positions: list[int], tags: list[int]):
        super().__init__()
        self.model, self.positions, self.tags = model, positions, tags

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[:, self.positions, self.tags].sum(-1)


def explain_entities(pred: Any, texts: list[tuple[str, str]], target: str | None, steps: int,
                     baseline_id: int, embeddings: nn.Module, limit: int, progress: Any = None) -> list[dict[str, Any]]:
    """One record per predicted entity of ``texts`` ((name, text) pairs), at most ``limit``: the
    entity and every word of its window with its attribution."""
    from captum.attr import LayerIntegratedGradients

    task, model = pred.task, pred.model
    ds = task.inputs([t for _, t in texts], pred.bundle)
    logits, _ = infer(model, ds, pred.batch_size)
    records = task.postprocess(logits, ds)
    device = next(model.parameters()).device
    special = set(pred.bundle.tokenizer.all_special_ids)
    out: list[dict[str, Any]] = []
    for s, ((name, text), rec) in enumerate(zip(texts, records)):
        offsets = ds.offsets[s]
        for ent in rec["entities"]:
            if target is not None and ent["label"] != target:
                continue
            if len(out) >= limit:
                return out
            first = next(i for i, (a, _) in enumerate(offsets) if a == ent["start"])
            last = next(i for i, (_, b) in enumerate(offsets) if b == ent["end"])
            w = ds.layout.window_of(s, first)
            spans = {int(r[0]): (int(r[1]), int(r[2])) for r in ds.layout.spans[w]}
            words = [i for i in range(first, last + 1) if i in spans]
            tags = [task.labels.index(rec["tags"][i]) for i in words]
            ids = torch.tensor([ds.input_ids[w]], device=device)
            mask = torch.ones_like(ids)
            base = torch.tensor([[i if i in special else baseline_id for i in ds.input_ids[w]]], device=device)
            net = _EntityScore(model, [spans[i][0] for i in words], tags).eval()
            lig = LayerIntegratedGradients(net, embeddings)
            attr = lig.attribute(ids, baselines=base, additional_forward_args=(mask,), n_steps=steps,
                                 internal_batch_size=steps)
            per_token = attr.sum(-1)[0].detach().float().cpu().numpy()
            shaded = [{"word": text[offsets[i][0]:offsets[i][1]], "start": int(offsets[i][0]),
                       "end": int(offsets[i][1]), "attribution": round(float(np.sum(per_token[a:b])), 5)}
                      for i, (a, b) in sorted(spans.items())]
            out.append({"name": f"{name}: {ent['text']}", "input": text, "predicted": ent["label"],
                        "score": ent["score"], "target": ent["label"], "true": None, "entity": ent, "words": shaded})
            if progress is not None:
                progress(1)
    return out
