"""A real sweep in a folder whose path has spaces: the commands printed for the user are
shell-quoted; ended before num_trials (as its time budget would end it), `status` shows no time
left; then its study is deleted: `best` and `report` exit 2 naming the file and what MLflow still
holds, and create nothing."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from sweep.config import load_config
from sweep.engine.sweep import run_sweep
from tests.conftest import MINIMAL, write_space
from tests.unit.test_cli import sweep as sweep_cli

pytestmark = pytest.mark.e2e

BODY = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 2, max_concurrent: 1, scheduler: {type: none}}")


def test_a_time_budget_sweep_in_a_spaced_folder_then_its_study_lost(tmp_path: Path, ray_cluster: None) -> None:
    from sweep.readback.export import best
    from sweep.readback.status import sweep_status
    from sweep.folder import update_meta

    results = tmp_path / "my sweeps"
    cfg = load_config(write_space(tmp_path, BODY + f"tracking: {{results_dir: '{results}'}}\n"))
    lines: list[str] = []
    result = run_sweep(cfg, log=lines.append)
    out = "\n".join(lines)
    folder = result.sweep_dir
    assert result.counts == {"completed": 2}, out
    quoted = shlex.quote(str(folder))
    assert quoted != str(folder)
    assert f"python -m sweep report {quoted}    best adapter: python -m sweep best {quoted} --export DIR" in out
    assert f"(if the driver dies: python -m sweep resume {quoted})" in out
    assert f"--backend-store-uri {shlex.quote(cfg.mlflow_uri)}" in out

    # What a time budget leaves: a finished sweep short of num_trials (made so here rather than
    # by racing a budget against trial speed on a busy machine).
    assert update_meta(folder, num_trials=50)["state"] == "finished"
    status: list[str] = []
    info = sweep_status(folder, write=status.append)
    assert info["remaining_seconds"] is None and "left at the pace" not in "\n".join(status)
    assert any("ended after 2 of 50 trials" in line for line in status), status
    assert status[-1].startswith("its runs:  http://127.0.0.1:5000/#/experiments/")  # the MLflow runs table
    printed: list[str] = []
    best(folder, None, None, False, write=printed.append)
    assert f"export it (adapter, tokenizer, generation config, model card):  python -m sweep best {quoted} --export DIR" in printed, printed

    (folder / "optuna.db").unlink()
    for command in ("best", "report"):
        run = sweep_cli(command, str(folder), cwd=tmp_path)
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
        assert f"{folder / 'optuna.db'}: the sweep's Optuna study is missing (deleted or moved?). MLflow still holds every trial" in run.stderr
        assert not (folder / "optuna.db").exists()
