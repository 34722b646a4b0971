"""The driver's bookkeeping in sweep.json (sweep.run, without Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep import run
from sweep.folder import write_meta


def test_elapsed_time_is_written_every_few_seconds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver killed 25 s into a sweep has counted (nearly) all of it: the time budget left to
    its resume is not overstated."""
    now = [1000.0]
    monkeypatch.setattr(run.time, "monotonic", lambda: now[0])
    write_meta(tmp_path, {"elapsed_seconds": 0.0, "state": "running"})
    beat = run.Heartbeat(tmp_path, elapsed_before=100.0)
    beat.beat(force=True)
    for _ in range(25):  # Tune's loop calls it about once a second
        now[0] += 1.0
        beat.beat()
    elapsed = json.loads((tmp_path / "sweep.json").read_text())["elapsed_seconds"]
    assert 100 + 25 - run.Heartbeat.INTERVAL <= elapsed <= 125, elapsed


def test_the_terminal_judges_a_multi_objective_trial_as_mlflow_and_optuna_do(tmp_path: Path) -> None:
    """A trial that finished without one of the objectives is `failed` everywhere, the terminal too."""
    from types import SimpleNamespace

    from sweep.config import load_config
    from sweep.progress import Progress
    from sweep.retries import Retries
    from sweep.trials import Ledger
    from tests.conftest import MINIMAL, write_space

    body = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 2, objectives: [{eval_loss: min}, {peak_rss_gb: min}]}")
    sweep = run.Sweep(load_config(write_space(tmp_path, body)), tmp_path, None, None, None)
    sweep.ledger, sweep.search, sweep.trial_runs, sweep.heartbeat = Ledger(), None, None, run.Heartbeat(tmp_path, 0.0)
    callbacks = sweep.make_callbacks()
    assert isinstance(callbacks[0], Retries)  # it decides before the others read the Ledger
    (progress,) = [c for c in callbacks if isinstance(c, Progress)]
    assert progress.objectives == ("eval_loss", "peak_rss_gb")
    lines: list[str] = []
    progress.log = lines.append
    progress.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={"step": 4, "trial_status": "completed", "eval_loss": 1.0}))
    assert " failed " in lines[0], lines



def test_start_up_phases_read_in_order() -> None:
    """The driver's start-up line names each phase with its seconds, in the order they ran."""
    assert run.describe_phases({"a": 1.0, "b": 2.0, "c": 0.25}) == "a 1.0s, b 2.0s, c 0.2s"
