"""A sweep's trial runs read back from a sqlite MLflow store, fast, for `best` and `estimate`.

As sweep.folder.studyfile reads the study: with the standard library's sqlite3, read-only, because
importing MLflow costs two to three seconds, more than `best` should take. The tables read are
MLflow's SQLAlchemy store's (runs, tags, params, latest_metrics), what MlflowClient.search_runs
reads for a run's latest metrics, tags and params; a store on a server, or a file whose schema
differs, is read through MLflow instead (None here).
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from core.contract import TAG_PARENT


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    status: str  # FINISHED, KILLED, FAILED, RUNNING
    experiment_id: str


@dataclass(frozen=True)
class RunData:
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # each metric's latest value, as MLflow's run.data.metrics


@dataclass(frozen=True)
class Run:
    """A run as much as mlflow.entities.Run's `info` and `data` the read-back commands use."""

    info: RunInfo
    data: RunData


def child_runs(mlflow_uri: str, parent_run_id: str) -> list[Run] | None:
    """The active child runs of `parent_run_id`; None when the store is not a sqlite file this
    reader knows (read it through MLflow then)."""
    from sweep.folder.checks import sqlite_file

    path = sqlite_file(mlflow_uri)
    if path is None or not path.is_file():
        return None
    try:
        return _read(path, parent_run_id)
    except sqlite3.Error:  # not the schema this reader knows: MLflow knows it
        return None


def _read(path: Path, parent_run_id: str) -> list[Run]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        rows = db.execute(
            "SELECT r.run_uuid, r.status, r.experiment_id FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = ? AND t.value = ? AND r.lifecycle_stage = 'active' ORDER BY r.start_time DESC",
            (TAG_PARENT, parent_run_id),
        ).fetchall()
        ids = [run_id for run_id, _, _ in rows]
        tags: dict[str, dict[str, str]] = {i: {} for i in ids}
        params: dict[str, dict[str, str]] = {i: {} for i in ids}
        metrics: dict[str, dict[str, float]] = {i: {} for i in ids}
        for start in range(0, len(ids), 500):  # sqlite's limit on bound values
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for run_id, key, value in db.execute(f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", chunk):
                tags[run_id][key] = value
            for run_id, key, value in db.execute(f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})", chunk):
                params[run_id][key] = value
            for run_id, key, value, is_nan in db.execute(f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({marks})", chunk):
                metrics[run_id][key] = math.nan if is_nan else float(value)
    finally:
        db.close()
    return [Run(RunInfo(run_id, status, str(experiment)), RunData(tags[run_id], params[run_id], metrics[run_id])) for run_id, status, experiment in rows]
