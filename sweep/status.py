"""`python -m sweep status DIR` and `python -m sweep stop DIR`: read a sweep back while it runs
(or after), and ask its driver to checkpoint and stop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from core.contract import EVAL_LOSS, LOAD_SECONDS, STATUS, TRAIN_SECONDS, TrialStatus
from sweep.checks import quote
from sweep.sweepdir import STOP, SweepFolder, driver, mlflow_links, read_meta, say_mlflow

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


def sweep_status(folder: Path, write: Write = print) -> dict[str, Any]:
    sweep = SweepFolder(folder)
    meta = sweep.meta
    sweep.check_stores()  # before MLflow / optuna would create a missing store
    import optuna

    holder = driver(folder)
    state = meta.get("state", "?")
    if state == "running" and holder is None:
        state = "interrupted (its driver is gone; resume it)"
    elif holder is not None:
        state = f"running (driver pid {holder['pid']} on {holder['host']})"
    client = sweep.mlflow()
    children = sweep.children(client)
    counts: dict[str, int] = {}
    for run in children:
        status = run.data.tags.get(STATUS, "?")
        counts[status] = counts.get(status, 0) + 1
    study = optuna.load_study(study_name=sweep.study_name, storage=sweep.optuna_storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and "warm_start_from" not in t.user_attrs]
    best = (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(complete, key=lambda t: t.value) if complete else None
    elapsed = float(meta.get("elapsed_seconds", 0.0))
    num_trials = int(meta.get("num_trials", 0))
    finished = sum(n for s, n in counts.items() if s not in (TrialStatus.RUNNING, TrialStatus.RETRYING, TrialStatus.INFEASIBLE))
    durations = [r.data.metrics.get(TRAIN_SECONDS, 0) + r.data.metrics.get(LOAD_SECONDS, 0) for r in children if r.data.tags.get(STATUS) == TrialStatus.COMPLETED]
    remaining = remaining_seconds(meta, finished, durations)
    links = mlflow_links(sweep.mlflow_uri, sweep.experiment_id(client))
    info = {"name": meta.get("name"), "folder": str(folder), "metric": meta.get("metric", EVAL_LOSS), "mlflow": links, "state": state, "counts": counts, "finished": finished, "num_trials": num_trials, "elapsed_seconds": elapsed,
            "remaining_seconds": remaining, "best": {"trial": f"t{best.number:03d}", "value": best.value} if best else None}  # fmt: skip
    write(f"{folder.name}: {state}")
    write(f"trials: {finished} of {num_trials} done; " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none started"))
    if best:
        write(f"best so far: t{best.number:03d}  {meta.get('metric', EVAL_LOSS)} {best.value:.4f}  {best.params}")
    else:
        write("best so far: none completed")
    eta = f"; about {_duration(remaining)} left at the pace so far" if remaining is not None else ""
    if meta.get("state") == "finished" and finished < num_trials:
        eta = f"; ended after {finished} of {num_trials} trials (its time budget ran out, or the space had no more to try)"
    write(f"elapsed: {_duration(elapsed)}{eta}")
    say_mlflow(links, write)
    return info


def stop_sweep(folder: Path, wait: float, write: Write = print) -> bool:
    """Ask the driver to stop: trials checkpoint and end; `resume` continues them. True once stopped."""
    meta = read_meta(folder)
    if meta.get("state") == "finished":
        write(f"{folder.name}: finished already")
        return True
    (folder / STOP).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
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
