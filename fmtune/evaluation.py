"""The pretrained baseline: a linear probe fitted on the frozen pretrained backbone's features
(what the task's head reads: pooled vectors, or token states), scored like the fine-tuned model.
The probe itself (logistic/ridge regression, per token or per example) belongs to the task."""

from __future__ import annotations

from typing import Any

from fmtune.training.infer import infer


def probe_outputs(model: Any, task: Any, train_ds: Any, eval_sets: dict[str, Any], batch_size: int,
                  seed: int = 0, progress: Any = None, autocast_dtype: Any = None) -> dict[str, tuple[Any, Any]]:
    """Fit the task's probe (regularisation chosen by cross-validation) on frozen features of ``train_ds``;
    its (logits, targets) on each eval set, scored by the caller exactly as the fine-tuned model's (the features
    computed under ``autocast_dtype``: the precision the fine-tuned model is scored in)."""
    x_train, y_train = infer(model, train_ds, batch_size, features=True, progress=progress,
                             autocast_dtype=autocast_dtype)
    probe = task.fit_probe(x_train.numpy(), y_train, seed)
    out = {}
    for name, ds in eval_sets.items():
        x, y = infer(model, ds, batch_size, features=True, progress=progress, autocast_dtype=autocast_dtype)
        out[name] = (task.probe_logits(probe, x.numpy()), y)
    return out
