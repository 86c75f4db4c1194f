"""Tabular rows as text, so a table of columns can be fine-tuned on with any text encoder:
``data.text_columns`` (``age: 39, workclass: State-gov, ...``) or ``data.text_template`` (a
Python format string over column names: ``"{age} year old {sex}, works as {occupation}"``).
Applied wherever rows are read (training, evaluation, predict, serve), so a model always
reads its rows written out the same way."""

from __future__ import annotations

import string
from typing import Any

import pandas as pd

from fmtune.errors import ConfigError, DataError


def split_names(value: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]`` (a comma-separated option)."""
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def template_columns(template: str) -> list[str]:
    """The column names a format string refers to; a malformed template is a ConfigError."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"data.text_template: {e} in {template!r} (write a literal brace as {{{{ or }}}})") from None
    bad = [f for f in fields if not f or not f.replace("_", "").replace("-", "").replace(" ", "").isalnum()]
    if bad:
        raise ConfigError(f"data.text_template: {{{bad[0]}}} is not a column name; write {{COLUMN}} for each value")
    return list(dict.fromkeys(fields))


def uses_columns(data_cfg: Any) -> bool:
    return bool(getattr(data_cfg, "text_template", None) or getattr(data_cfg, "text_columns", None))


def render(df: pd.DataFrame, data_cfg: Any, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    """``df`` with ``data.text_column`` written from its other columns as configured (unchanged
    when neither option is set). ``text_columns: all`` means every column but the label (or the
    ``data.label_columns`` of a multi-label run) and ``exclude``. A missing value is written as an empty string."""
    if not uses_columns(data_cfg):
        return df
    template = data_cfg.text_template
    if template:
        columns = template_columns(template)
    else:
        columns = split_names(data_cfg.text_columns)
        if columns == ["all"]:
            skip = {data_cfg.label_column, data_cfg.text_column, *split_names(getattr(data_cfg, "label_columns", None)),
                    *exclude}
            columns = [c for c in df.columns if c not in skip]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        option = "data.text_template" if template else "data.text_columns"
        raise DataError(f"{df.attrs.get('source', 'the data')}: {option} names column {missing[0]!r}, which is not "
                        f"there; columns are: {', '.join(map(str, df.columns))}")
    values = {c: df[c].astype(object).where(df[c].notna(), "").astype(str).str.strip() for c in columns}
    if template:
        key = {c: f"c{i}" for i, c in enumerate(columns)}  # column names need not be identifiers
        fmt = template
        for c, k in key.items():
            fmt = fmt.replace("{" + c + "}", "{" + k + "}")
        text = [fmt.format(**{key[c]: values[c].iat[i] for c in columns}) for i in range(len(df))]
    else:
        text = [", ".join(f"{c}: {values[c].iat[i]}" for c in columns) for i in range(len(df))]
    out = df.copy()
    out[data_cfg.text_column] = text
    out.attrs = dict(df.attrs)
    return out
