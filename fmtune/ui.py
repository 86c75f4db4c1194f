"""Terminal output: one rich console on stderr (stdout stays clean for data), progress bars."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True, highlight=False, soft_wrap=True)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """Numbers right-aligned, text (and the first column) left-aligned; short words are not wrapped, prose is."""
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        cells = [r[i] for r in rows if i < len(r)]
        numbers = i > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in cells)
        longest = max((len(str(v)) for v in cells), default=0)
        t.add_column(c, justify="right" if numbers else "left", no_wrap=longest <= 30,
                     ratio=1 if longest > 60 else None)  # (prose takes the width left)
    for r in rows:
        t.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in r])
    return t


def records_table(df: Any, width: int = 60) -> Table:
    """Predictions for a few inputs: the input and what was predicted (no per-label columns);
    entity lists as "text (label score)"."""
    cols = [c for c in df.columns if not str(c).startswith("prob_") and c != "error"]
    if "error" in df.columns and df["error"].notna().any():
        cols.append("error")

    def cell(v: Any) -> str:
        if isinstance(v, list):
            return ", ".join(f"{d.get('text')} ({d.get('label')} {d.get('score', 0):.2f})" if isinstance(d, dict)
                             else str(d) for d in v) or "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        text = "" if v is None else str(v)
        return text if len(text) <= width else text[: width - 1] + "…"

    t = Table(title="predictions", title_justify="left")
    for c in cols:
        t.add_column(str(c), overflow="fold")
    for _, r in df.iterrows():
        t.add_row(*[cell(r[c]) for c in cols])
    return t


class FitProgress:
    """Progress of fit(): a bar over optimizer steps with the running loss and validation metric."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.loss = self.val = ""

    def start(self, total: int, done: int) -> None:
        if self.quiet:
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                                 TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def _info(self) -> str:
        return " ".join(x for x in (self.loss, self.val) if x)

    def trained(self, step: int, loss: float) -> None:
        self.loss = f"loss {loss:.4f}"
        if self.progress:
            self.progress.update(self.task, completed=step, info=self._info())

    def evaluated(self, rec: dict[str, Any], metric: str) -> None:
        self.val = f"val {metric} {rec[metric]:.4f}"
        if self.progress:
            self.progress.update(self.task, completed=rec["step"], info=self._info())
        if not self.quiet:
            mark = "  [green]best: saved[/]" if rec.get("best") else ""
            console.print(f"  epoch {rec['epoch']:.2f} step {rec['step']}: val {metric} {rec[metric]:.4f}{mark}")

    def stop(self) -> None:
        if self.progress:
            self.progress.stop()
            self.progress = None


class CountProgress:
    """A bar over examples, for inference over a data split."""

    def __init__(self, label: str, total: int, quiet: bool = False):
        self.progress = None if quiet else Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                                    MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                                    transient=True)
        self.total, self.label = total, label

    def __enter__(self) -> CountProgress:
        if self.progress:
            self.progress.start()
            self.task = self.progress.add_task(self.label, total=self.total)
        return self

    def describe(self, label: str) -> None:
        """Say what is being counted now (e.g. which perturbation)."""
        if self.progress:
            self.progress.update(self.task, description=label)

    def __call__(self, n: int) -> None:
        if self.progress:
            self.progress.advance(self.task, n)

    def __exit__(self, *exc: Any) -> None:
        if self.progress:
            self.progress.stop()
