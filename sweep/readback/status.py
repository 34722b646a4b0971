"""`python -m sweep status DIR [--watch [SECONDS]]` and `python -m sweep stop DIR`: read a sweep back
while it runs (or after), and ask its driver to checkpoint and stop.

Status is quick (well under a second and a half): it reads sweep.json, the Optuna study (straight
from its sqlite file: sweep.folder.studyfile) and the last report of each trial in Ray Tune's trial
folders; it imports neither MLflow nor Ray nor torch (only a sweep from before sweep.json recorded
its MLflow experiment id asks MLflow for it). `--watch` redraws it (sweep/watch.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from core.contract import EVAL_LOSS, PEAK_RSS_GB, PEAK_VRAM_GB, REPORTS_FILE, STATUS, STEP, TOKENS_PER_SEC, TRIALS_DIR, TrialStatus, is_sweep_trial
from sweep.folder.checks import quote
from sweep.config import ConfigError
from sweep.folder.studyfile import StudyTrial, StudyView, read_study
from sweep.folder import STOP, SweepFolder, driver, mlflow_links, read_meta, say_mlflow
from sweep.readback.results import not_run

Write = Callable[[str], None]


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def remaining_seconds(meta: dict, finished: int, durations: list[float]) -> float | None:
    """Time left at the pace of the completed trials; None when unknown, or when the sweep has
    finished (its time budget can end it before num_trials: nothing is left to run then)."""
    num_trials = int(meta.get("num_trials", 0))
    if not durations or num_trials <= finished or meta.get("state") == "finished":
        return None
    return (num_trials - finished) * sum(durations) / len(durations) / max(1, int(meta.get("concurrency", 1)))


_STATES = {"COMPLETE": TrialStatus.COMPLETED, "FAIL": TrialStatus.FAILED, "PRUNED": TrialStatus.PRUNED}  # a trial without a status attribute
NOT_COUNTED = (TrialStatus.RUNNING, TrialStatus.RETRYING, TrialStatus.INFEASIBLE)  # not "done"


def trial_status(trial: StudyTrial, live: bool) -> str | None:
    """A trial's status as its MLflow run's tag says it, read from the study; None for entries of
    the study that are no trial of this sweep (core.contract.is_sweep_trial: a warm start's, a
    start-up point still queued, one asked but never launched, a duplicate proposal).
    An open trial runs while the driver lives; without one it waits, stopped, for `resume`."""
    if not is_sweep_trial(trial):
        return None
    if trial.user_attrs.get(STATUS):
        return str(trial.user_attrs[STATUS])
    if trial.state == "RUNNING":
        return str(TrialStatus.RUNNING if live else TrialStatus.STOPPED)
    return str(_STATES.get(trial.state, trial.state.lower()))


def study_of(sweep: SweepFolder) -> StudyView:
    """The sweep's study, after its stores were checked (nothing is created)."""
    sweep.check_stores()
    try:
        return read_study(sweep.optuna_storage, sweep.study_name, sweep.path)
    except KeyError:
        from sweep.config.secrets import redact

        raise ConfigError(str(sweep.path), [f"{redact(sweep.optuna_storage)}: holds no study named {sweep.study_name!r}; MLflow still holds every trial "
                                            f"({mlflow_links(sweep.mlflow_uri, None)['command'] or redact(sweep.mlflow_uri)})"]) from None  # fmt: skip


def sweep_status(folder: Path, write: Write = print) -> dict[str, Any]:
    """Print (with `write`) and return a sweep's state, its trials by status, the best so far, the
    elapsed and remaining time, where its runs are in MLflow, and (`trials`) one row per trial."""
    sweep = SweepFolder(folder)
    meta = sweep.meta
    study = study_of(sweep)
    holder = driver(folder)
    state = meta.get("state", "?")
    if state == "running" and holder is None:
        state = "interrupted (its driver is gone; resume it)"
    elif holder is not None:
        state = f"running (driver pid {holder['pid']} on {holder['host']})"
    own = [(t, status) for t in study.trials if (status := trial_status(t, holder is not None)) is not None]
    counts: dict[str, int] = {}
    for _, status in own:
        counts[status] = counts.get(status, 0) + 1
    complete = [t for t, status in own if t.state == "COMPLETE" and t.values]
    best = (min if study.minimize else max)(complete, key=lambda t: t.values[0]) if complete else None
    elapsed = float(meta.get("elapsed_seconds", 0.0))
    num_trials = int(meta.get("num_trials", 0))
    finished = sum(n for s, n in counts.items() if s not in NOT_COUNTED)
    durations = [(t.completed - t.started).total_seconds() for t, status in own if status == TrialStatus.COMPLETED and t.started and t.completed]
    remaining = remaining_seconds(meta, finished, durations)
    links = sweep.links(ascending=study.minimize)
    metric = meta.get("metric", EVAL_LOSS)
    rows = trial_rows(sweep, own, metric)
    gaps = not_run(study.trials)
    info = {"name": meta.get("name"), "folder": str(folder), "metric": metric, "mlflow": links, "state": state, "counts": counts, "finished": finished, "num_trials": num_trials, "elapsed_seconds": elapsed,
            "remaining_seconds": remaining, "best": {"trial": best.label, "value": best.values[0]} if best else None,
            "trials": rows, "not_run": [{"trial": label, "why": why} for label, why in gaps]}  # fmt: skip
    write(f"{folder.name}: {state}")
    write(f"trials: {finished} of {num_trials} done; " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none started"))
    if best:
        label = next(r["config"] for r in rows if r["trial"] == best.label)  # as `run`, `best` and MLflow name it
        write(f"best so far: {best.label}  {metric} {best.values[0]:.4f}  ({label})")
    else:
        write("best so far: none completed")
    for label, why in gaps:  # the numbers missing between the trials, and why
        write(f"{label} {why}")
    eta = f"; about {_duration(remaining)} left at the pace so far" if remaining is not None else ""
    if meta.get("state") == "finished" and finished < num_trials:
        eta = f"; ended after {finished} of {num_trials} trials (its time budget ran out, or the space had no more to try)"
    write(f"elapsed: {_duration(elapsed)}{eta}")
    say_mlflow(links, write)
    return info


# ----------------------------------------------------------------------------------------------
# one row per trial: the study says who and how it ended; its Tune folder says how far it got


def trial_rows(sweep: SweepFolder, trials: list[tuple[StudyTrial, str]], metric: str) -> list[dict[str, Any]]:
    """Per trial: status, step (of max_steps), eval loss, tokens/s, peak memory, time left, config.

    Step, throughput and memory come from the trial's own reports (trials/t007/reports.jsonl, a
    line per evaluation, written by its worker); a trial of an earlier version's sweep from the study
    (the step of its last evaluation; no throughput or memory)."""
    max_steps = _max_steps(sweep.path)
    describe = _describer(sweep)
    now = time.time()
    rows = []
    for t, status in trials:
        lines = _reports(sweep.path, t.label)
        # each metric's latest value: a trial's last line (a stop's, say) may carry only its step
        last = {k: v for line in lines for k, v in line.items() if v is not None}
        step = last.get(STEP, max(t.intermediate) if t.intermediate else None)
        if status == TrialStatus.COMPLETED and max_steps:
            step = max_steps
        loss = last.get(EVAL_LOSS)
        if loss is None and metric == EVAL_LOSS and t.intermediate:
            loss = t.intermediate[max(t.intermediate)]
        if status == TrialStatus.COMPLETED and t.values and metric == EVAL_LOSS:
            loss = t.values[0]
        eta = None
        if status == TrialStatus.RUNNING and step and max_steps and step < max_steps:
            eta = (max_steps - step) * _seconds_per_step(lines, t, step, now)
        rows.append({"trial": t.label, "status": status, "step": step, "max_steps": max_steps, EVAL_LOSS: loss, TOKENS_PER_SEC: last.get(TOKENS_PER_SEC),
                     PEAK_VRAM_GB: last.get(PEAK_VRAM_GB), PEAK_RSS_GB: last.get(PEAK_RSS_GB), "eta_seconds": eta, "config": describe(t)})  # fmt: skip
    return rows


def _max_steps(folder: Path) -> int | None:
    """train.max_steps of the sweep, from resolved.yaml (written before any trial started)."""
    import yaml

    try:
        return int(yaml.safe_load((folder / "resolved.yaml").read_text())["train"]["max_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def _reports(folder: Path, label: str) -> list[dict[str, Any]]:
    """A trial's reports, one JSON object a line (the last may be half written: left out)."""
    out = []
    try:
        text = (folder / TRIALS_DIR / label / REPORTS_FILE).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _seconds_per_step(lines: list[dict[str, Any]], trial: StudyTrial, step: int, now: float) -> float:
    """The trial's pace: between its first and last report of this attempt, else since it started."""
    timed = [line for line in lines if "time" in line and line.get(STEP)]
    if len(timed) >= 2 and timed[-1][STEP] > timed[0][STEP]:
        return (timed[-1]["time"] - timed[0]["time"]) / (timed[-1][STEP] - timed[0][STEP])
    if trial.started is not None:
        return max(0.0, now - trial.started.timestamp()) / step
    return 0.0


def _describer(sweep: SweepFolder) -> Callable[[StudyTrial], str]:
    """Trial -> 'qlora r16 a32 lr2e-4 b4x8 attention' (its params as stored, if the config no longer loads)."""
    from core.contract import summary

    try:
        cfg = sweep.config
    except ConfigError:
        cfg = None

    def describe(t: StudyTrial) -> str:
        if cfg is not None:
            try:
                return summary({**cfg.fixed_hyperparams, **cfg.space.decode(t.params, cfg.fixed_hyperparams)})
            except (KeyError, ValueError, TypeError):
                pass
        return " ".join(f"{k}={v}" for k, v in t.params.items())

    return describe


def _memory(row: dict[str, Any]) -> str:
    if row.get(PEAK_VRAM_GB) is not None:
        return f"{row[PEAK_VRAM_GB]:.1f} GB VRAM"
    if row.get(PEAK_RSS_GB) is not None:
        return f"{row[PEAK_RSS_GB]:.2f} GB RSS"
    return "-"


TABLE_COLUMNS = ("TRIAL", "STATUS", "STEP", "EVAL LOSS", "TOK/S", "MEMORY", "ETA", "CONFIG")


def table_cells(row: dict[str, Any]) -> tuple[str, ...]:
    """A trial row as the text of each of TABLE_COLUMNS."""
    step = "-" if row["step"] is None else f"{row['step']}/{row['max_steps']}" if row["max_steps"] else str(row["step"])
    loss = f"{row[EVAL_LOSS]:.4f}" if row.get(EVAL_LOSS) is not None else "-"
    speed = f"{row[TOKENS_PER_SEC]:.0f}" if row.get(TOKENS_PER_SEC) is not None else "-"
    eta = _duration(row["eta_seconds"]) if row.get("eta_seconds") is not None else "-"
    return (row["trial"], row["status"], step, loss, speed, _memory(row), eta, row["config"])


def trial_table(rows: list[dict[str, Any]]) -> list[str]:
    """The per-trial table as plain lines, columns aligned."""
    cells = [TABLE_COLUMNS] + [table_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1] for row in cells]


def stop_sweep(folder: Path, wait: float, write: Write = print) -> bool:
    """Ask the driver to stop: trials checkpoint and end; `resume` continues them. True once stopped."""
    meta = read_meta(folder)
    if meta.get("state") == "finished":
        write(f"{folder.name}: finished already")
        return True
    try:
        (folder / STOP).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
    except OSError as exc:  # a read-only folder: a driver cannot be told this way (without one, nothing needs telling)
        holder = driver(folder)
        if holder is not None:
            raise ConfigError(str(folder), [f"{folder}: cannot write {STOP} there ({exc.strerror or exc}), which is how a stop is asked; make the folder "
                                            f"writable, or send the driver SIGTERM (kill {holder['pid']} on {holder['host']}): it checkpoints and stops"]) from None  # fmt: skip
    holder = driver(folder)
    if holder is None:
        write(f"{folder.name}: no driver is running; it will resume with:  python -m sweep resume {quote(folder)}")
        return True
    write(f"{folder.name}: asked the driver (pid {holder['pid']}) to stop; trials checkpoint and end ...")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if driver(folder) is None:
            write(f"stopped. Continue with:  python -m sweep resume {quote(folder)}")
            return True
        time.sleep(1)
    write(f"still stopping after {wait:.0f}s; it will finish on its own. Then:  python -m sweep resume {quote(folder)}")
    return False
