"""Hyper-parameter search with optuna: ``fmtune search config.yaml --trials 20``.

The space is the config's ``search:`` section, one entry per dotted setting::

    search:
      train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
      train.batch_size: {type: categorical, choices: [16, 32]}
      strategy.name: {type: categorical, choices: [head, last_n]}
      strategy.r: {type: int, low: 4, high: 32, log: true}

Each trial is an ordinary ``fmtune train`` run (``<study>/trials/trial-<n>``) maximising (or
minimising, for losses) the validation metric; bad trials are pruned from their per-epoch
validation (median or hyperband). The study lives in a SQLite file in the study folder, so
rerunning the command continues it; with ``--storage postgresql://...`` (any optuna RDB URL)
several machines work on one study at once. The study folder gets ``best.yaml`` (a config ready
for ``fmtune train``), ``trials.csv``, ``history.png`` and ``importance.png``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from fmtune import config as config_mod
from fmtune import ui
from fmtune.errors import ConfigError, FmtuneError
from fmtune.fsutil import write_text_atomic

PRUNERS = ("median", "hyperband", "none")


def _require_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("fmtune search needs optuna: pip install optuna") from None
    return optuna


def check_space(space: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``search:`` section, checked: every key a real setting, every spec complete."""
    if not space:
        raise ConfigError("the config has no search: section; add one, e.g.\n"
                          "search:\n  train.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}")
    valid = {k for k, _, _ in config_mod.describe()}
    out = {}
    for key, spec in space.items():
        where = f"search.{key}"
        if key not in valid:
            raise ConfigError(f"{where}: not a setting (see `fmtune config`)")
        if not isinstance(spec, dict) or spec.get("type") not in ("float", "int", "categorical"):
            raise ConfigError(f"{where}: expected {{type: float|int|categorical, ...}}, got {spec!r}")
        if spec["type"] == "categorical":
            if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        else:
            for bound in ("low", "high"):
                if not isinstance(spec.get(bound), (int, float)):
                    raise ConfigError(f"{where}: {spec['type']} needs numeric low and high")
            if spec["low"] > spec["high"]:
                raise ConfigError(f"{where}: low {spec['low']} is above high {spec['high']}")
            if spec.get("log") and spec["low"] <= 0:
                raise ConfigError(f"{where}: a log scale needs low > 0")
        unknown = set(spec) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        out[key] = spec
    return out


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = {}
    for key, spec in space.items():
        if spec["type"] == "categorical":
            params[key] = trial.suggest_categorical(key, spec["choices"])
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                            log=bool(spec.get("log", False)))
        else:
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                              log=bool(spec.get("log", False)))
    return params


def trial_config(base: dict[str, Any], params: dict[str, Any], out: Path | None) -> config_mod.Config:
    """The user's own settings with the trial's values; defaults (such as the learning rate of a
    searched strategy) are resolved per trial."""
    data = copy.deepcopy(base)
    data.pop("search", None)
    for key, value in params.items():
        config_mod.set_dotted(data, key, value)
    if "train.batch_size" in params and "min_steps" not in data.get("train", {}):
        config_mod.set_dotted(data, "train.min_steps", None)  # a searched batch size is the one each trial trains
    data["out"], data["name"] = (str(out), out.name) if out else (None, None)
    return config_mod.from_dict(data)


def open_study(url: str | None, folder: Path, name: str, **kwargs: Any) -> tuple[Any, str]:
    """The study (created or loaded) and its storage URL, also when several workers start at once.

    The first worker on a new database creates its tables; one starting beside it would try too
    and fail ("table studies already exists", a duplicate ``alembic_version`` row). Workers on a
    local SQLite file wait on a lock file beside it; on other databases a failed attempt is
    retried, and finds the tables made.
    """
    import contextlib
    import fcntl
    import time

    optuna = _require_optuna()
    import sqlalchemy  # optuna's own dependency

    url = url or f"sqlite:///{(folder / 'study.db').resolve()}"
    local = url.startswith("sqlite:///") and url != "sqlite:///:memory:"
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    with contextlib.ExitStack() as stack:
        if local:
            lock = stack.enter_context(open(f"{url.removeprefix('sqlite:///')}.lock", "a"))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        attempt = 0
        while True:
            try:
                store = optuna.storages.RDBStorage(url, engine_kwargs=engine)
                return optuna.create_study(study_name=name, storage=store, load_if_exists=True, **kwargs), url
            except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
                attempt += 1
                if attempt == 5:
                    raise
                time.sleep(0.2 * attempt)


def search(config: str | Path | dict, *, trials: int = 20, storage: str | None = None, study: str | None = None,
           out: str | Path | None = None, pruner: str = "median", seed: int | None = None,
           quiet: bool = False) -> dict[str, Any]:
    """Run trials until the study holds ``trials`` finished ones; write the study's results."""
    from fmtune import api

    optuna = _require_optuna()
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner {pruner!r}: choose one of {', '.join(PRUNERS)}")
    user = copy.deepcopy(config) if isinstance(config, dict) else _read_yaml(Path(config))
    first = config_mod.from_dict(user)  # every setting checked before any trial
    space = check_space(first.search)
    base = {k: v for k, v in user.items() if k != "search"}
    name = study or first.name or (Path(config).stem if not isinstance(config, dict) else "study")
    folder = Path(out) if out else Path("runs") / f"search-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    from fmtune.data.prepare import make_task, read_frames
    from fmtune.training.loop import resolve_metric

    frames = read_frames(first.data, first.task.type, first.train.seed)
    task = make_task(first.task, first.data, frames.train)
    metric = resolve_metric(task, first.train)
    direction = "maximize" if task.greater_is_better(metric) else "minimize"
    pruners = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
               "hyperband": optuna.pruners.HyperbandPruner(), "none": optuna.pruners.NopPruner()}
    sampler = optuna.samplers.TPESampler(seed=seed) if seed is not None else None
    st, url = open_study(storage, folder, name, direction=direction, pruner=pruners[pruner], sampler=sampler)
    if st.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in {url} optimises in the other direction; give another --study")

    def objective(trial: Any) -> float:
        params = suggest(trial, space)
        run = folder / "trials" / f"trial-{trial.number:04d}"
        cfg = trial_config(base, params, run)

        def report(rec: dict[str, Any]) -> None:
            value = rec.get(metric)
            if value is None or not math.isfinite(value):
                return
            trial.report(value, step=int(round(rec["epoch"] * 1000)))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {rec['epoch']}: {metric} {value:.4f}")

        trial.set_user_attr("run_dir", str(run))
        try:
            summary = api.train(cfg, overwrite=True, quiet=True, report=False, on_eval=report)
        except FmtuneError as e:  # a bad combination of settings fails this trial (state FAIL), not the study
            trial.set_user_attr("error", str(e))
            raise
        if summary.get("best") is None:
            return float("nan")  # optuna records the trial as failed
        if "eval" in summary:
            trial.set_user_attr("test", summary["eval"]["test"])
        return float(summary["best"])

    def finished() -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        return len(st.get_trials(deepcopy=False, states=states))

    done_before = finished()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if done_before < trials:
        if not quiet:
            goal = "maximising" if direction == "maximize" else "minimising"
            ui.console.print(f"[bold]fmtune search[/] study {name!r} ({url}): {done_before} trials done, "
                             f"running up to {trials}; {goal} val {metric}")
        stop = optuna.study.MaxTrialsCallback(trials, states=None)

        def show(study: Any, t: Any) -> None:
            if not quiet:
                value = "" if t.value is None else f" {metric} {t.value:.4f}"
                value = t.state.name.lower() + value
                ui.console.print(f"  trial {t.number}: {value}  {t.params}", markup=False, highlight=False)

        st.optimize(objective, n_trials=trials - done_before, callbacks=[stop, show], catch=(FmtuneError,))
    return write_results(st, folder, base, metric, quiet)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def write_results(st: Any, folder: Path, base: dict[str, Any], metric: str, quiet: bool) -> dict[str, Any]:
    optuna = _require_optuna()
    complete = [t for t in st.trials if t.state == optuna.trial.TrialState.COMPLETE]
    df = st.trials_dataframe(attrs=("number", "value", "params", "state", "duration", "user_attrs"))
    write_text_atomic(folder / "trials.csv", df.to_csv(index=False))  # a temp file of its own: workers share the folder
    summary: dict[str, Any] = {"study": st.study_name, "folder": str(folder), "metric": metric,
                               "trials": len(st.trials), "complete": len(complete),
                               "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in st.trials)}
    if not complete:
        summary["note"] = "no trial completed"
        return summary
    best = st.best_trial
    data = trial_config(base, best.params, None).to_dict()
    import yaml

    write_text_atomic(folder / "best.yaml", f"# fmtune search {st.study_name}: trial {best.number}, val {metric} "
                      f"{best.value:.4f}\n" + yaml.safe_dump(data, sort_keys=False))
    summary.update(best_value=best.value, best_params=best.params, best_trial=best.number,
                   best_run=best.user_attrs.get("run_dir"), best_yaml=str(folder / "best.yaml"))
    _plots(st, folder, metric)
    if not quiet:
        ui.console.print(f"best: trial {best.number}, val {metric} {best.value:.4f}, {best.params}", markup=False,
                         highlight=False)
        ui.console.print(f"{folder / 'best.yaml'}  (fmtune train {folder / 'best.yaml'})\n{folder / 'trials.csv'}")
    return summary


def _plots(st: Any, folder: Path, metric: str) -> None:
    import optuna

    from fmtune.plots import pyplot, save_atomic

    plt = pyplot()
    done = [t for t in st.trials if t.value is not None]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    xs = [t.number for t in done]
    ys = [t.value for t in done]
    ax.scatter(xs, ys, s=18, label="trial")
    better = max if st.direction == optuna.study.StudyDirection.MAXIMIZE else min
    running = [better(ys[: i + 1]) for i in range(len(ys))]
    ax.step(xs, running, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"val {metric}")
    ax.set_title(f"{st.study_name}: optimisation history", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_atomic(fig, folder / "history.png", dpi=100)
    if len(done) >= 2 and len(st.best_trial.params) >= 1:
        try:
            imp = optuna.importance.get_param_importances(st)
        except (RuntimeError, ValueError):  # e.g. every trial used the same values
            return
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(imp))))
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title(f"{st.study_name}: parameter importances", fontsize=9)
        fig.tight_layout()
        save_atomic(fig, folder / "importance.png", dpi=100)
