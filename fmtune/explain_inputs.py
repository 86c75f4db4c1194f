"""What ``fmtune explain`` explains: the inputs given, or a run's most confident mistakes (shared by
the text/image explainer, ``fmtune.explain``, and the audio one, ``fmtune.explain_audio``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmtune.errors import ConfigError, DataError


def choose_items(pred: Any, inputs: list[str] | None, misclassified: int, data: str | Path | None,
                 limit: int, quiet: bool, find_mistakes: Any, collect: Any, what: str) -> list[dict[str, Any]]:
    """What to explain: the ``misclassified`` most confident mistakes on ``data`` (default: the
    run's test, else validation file), or the ``inputs`` given (at most ``limit``)."""
    if misclassified:
        source = data or pred.config.data.test or pred.config.data.val
        if source is None:
            raise DataError("--misclassified needs labelled data: pass --data FILE (the run has no test file)")
        split = "val" if not (data or pred.config.data.test) else "test"  # (of a table whose column names splits)
        return find_mistakes(pred, source, misclassified, quiet, split)
    if inputs:
        return collect(pred, inputs, limit)
    raise ConfigError(f"nothing to explain: give --input ({what}) or --misclassified N")
