"""`python -m sweep list [RESULTS_DIR]`: every sweep in a results folder, one line each (or one
JSON document): its state, trials by status, best trial and value, when it started and how long it ran.

Cheap: it reads sweep.json and the study (a sqlite study straight from its file: sweep.folder.studyfile),
never MLflow, and loads no space file unless a store URL needs a secret that sweep.json holds only
redacted. A folder it cannot read is listed with its problem; one sweep's trouble never hides the
others.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from core.contract import EVAL_LOSS, TrialStatus
from sweep.config import ConfigError
from sweep.folder import META, driver, read_meta

Write = Callable[[str], None]

NOT_SWEEPS = {"mlartifacts"}  # what `run` keeps beside the sweep folders (the artifacts of a sqlite MLflow store)


def list_sweeps(results_dir: Path, write: Write = print) -> list[dict[str, Any]]:
    """One entry per sub-folder of `results_dir`, oldest first; printed as a table by `write`."""
    results_dir = Path(results_dir).resolve()
    folders = [p for p in results_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in NOT_SWEEPS]
    entries = sorted((describe(p) for p in folders), key=lambda e: (e["started"] or "", e["folder"]))
    if not entries:
        write(f"{results_dir}: no sweeps")
        return entries
    lines = [("NAME", "STATE", "TRIALS", "BEST", "STARTED", "ELAPSED", "FOLDER")]
    for e in entries:
        trials = ", ".join(f"{n} {s}" for s, n in sorted(e["trials"].items())) or "-"
        best = f"{e['best']['trial']}  {e['metric']} {e['best']['value']:.4f}" if e["best"] is not None else "-"
        elapsed = _duration(e["elapsed_seconds"]) if e["elapsed_seconds"] is not None else "-"
        state = e["state"] if not e["problem"] else f"{e['state']}: {e['problem']}"
        lines.append((e["name"] or "?", state, trials, best, e["started"] or "-", elapsed, e["folder"]))
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]) - 1)]
    for row in lines:
        write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return entries


def describe(folder: Path) -> dict[str, Any]:
    """A sweep folder in a few fields; `problem` says what could not be read (None when all was)."""
    entry: dict[str, Any] = {"name": None, "folder": str(folder), "state": "?", "trials": {}, "metric": EVAL_LOSS, "best": None,
                             "started": None, "elapsed_seconds": None, "problem": None}  # fmt: skip
    if not (folder / META).is_file():
        entry.update(state="not a sweep", problem=f"no {META}")
        return entry
    try:
        meta = read_meta(folder)
    except ConfigError as exc:
        entry.update(state="broken", problem=f"{META} unreadable: " + "; ".join(exc.problems))
        return entry
    state = str(meta.get("state", "?"))
    if state == "running" and driver(folder) is None:
        state = "interrupted"
    entry.update(name=meta.get("name"), state=state, metric=meta.get("metric", EVAL_LOSS), started=meta.get("started"), elapsed_seconds=meta.get("elapsed_seconds"))
    try:
        _read_study(folder, meta, entry)
    except ConfigError as exc:  # a store it cannot open (a server down, a password it lacks)
        entry["problem"] = "; ".join(exc.problems)
    except Exception as exc:  # noqa: BLE001 - a damaged store is reported, the listing goes on
        from sweep.config.secrets import redact

        entry["problem"] = redact(f"study unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return entry


def _read_study(folder: Path, meta: dict[str, Any], entry: dict[str, Any]) -> None:
    from sweep.folder.checks import sqlite_file, study_file_trouble
    from sweep.readback.status import trial_status
    from sweep.folder.studyfile import read_study

    storage = _storage(folder, meta)
    path = sqlite_file(storage)
    if path is not None and not path.is_file():
        entry["problem"] = f"its study is missing ({path})"
        return
    trouble = study_file_trouble(path, meta["study_name"]) if path is not None else None
    if trouble:  # read as status reads it: checked first, never opened for writing
        entry["problem"] = f"study unreadable: {path} {trouble}"
        return
    study = read_study(storage, meta["study_name"], folder)
    if study.metric_names:
        entry["metric"] = study.metric_names[0]
    live = driver(folder) is not None
    counts: dict[str, int] = {}
    best = None
    for t in study.trials:
        status = trial_status(t, live)
        if status is None:
            continue  # a previous sweep's trial, told to this study's sampler; or one never launched
        counts[status] = counts.get(status, 0) + 1
        if t.state == "COMPLETE" and t.values and status == TrialStatus.COMPLETED:
            value = t.values[0]
            if best is None or (value < best["value"] if study.minimize else value > best["value"]):
                best = {"trial": t.label, "value": value}  # as `status --json` gives it
    entry.update(trials=counts, best=best)


def _storage(folder: Path, meta: dict[str, Any]) -> str:
    """The study's storage URL: sweep.json's copy, unless it is redacted or refers to ${VAR}s the
    environment lacks; then the sweep's config says it (SweepFolder)."""
    from sweep.config.secrets import MASK, expand_env

    url = str(meta["optuna_storage"])
    try:
        url = expand_env(url)
    except KeyError:
        url = MASK
    if MASK in url:
        from sweep.folder import SweepFolder

        return SweepFolder(folder).optuna_storage
    from sweep.folder import recorded_dir, relocate

    here = folder.resolve()
    return relocate(url, here, recorded_dir(here, meta))


def _duration(seconds: float) -> str:
    from sweep.readback.status import _duration as duration

    return duration(float(seconds))
