"""The driver's bookkeeping in sweep.json (sweep.engine.sweep, without Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep.engine import sweep as run
from sweep.folder import write_meta


def test_elapsed_time_is_written_every_few_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver killed 25 s into a sweep has counted (nearly) all of it: the time budget left to
    its resume is not overstated."""
    now = [1000.0]
    monkeypatch.setattr(run.time, "monotonic", lambda: now[0])
    stores = {"mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "optuna_storage": f"sqlite:///{tmp_path / 'optuna.db'}"}
    write_meta(tmp_path, {"space_file": str(tmp_path / "space.yaml"), **stores, "study_name": "t", "parent_run_id": "p", "elapsed_seconds": 0.0, "state": "running"})
    beat = run.Heartbeat(tmp_path, elapsed_before=100.0)
    beat.beat(force=True)
    for _ in range(25):  # Tune's loop calls it about once a second
        now[0] += 1.0
        beat.beat()
    elapsed = json.loads((tmp_path / "sweep.json").read_text())["elapsed_seconds"]
    assert 100 + 25 - run.Heartbeat.INTERVAL <= elapsed <= 125, elapsed


def test_start_up_phases_read_in_order() -> None:
    """The driver's start-up line names each phase with its seconds, in the order they ran."""
    assert run.describe_phases({"a": 1.0, "b": 2.0, "c": 0.25}) == "a 1.0s, b 2.0s, c 0.2s"
