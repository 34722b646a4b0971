"""A finished sweep built by hand for the read-back tests (tests/unit/test_morning_after.py,
tests/unit/test_folder_faults.py): sweep.json, an Optuna study and an MLflow store with a parent run
and its trials, written in milliseconds instead of run in minutes."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.contract import ATTR_WORKER, EVAL_LOSS, PEAK_VRAM_GB, STATUS, TrialStatus
from sweep.config import load_config
from tests.conftest import MINIMAL, write_space

# the trials that ran: t000 and t001 completed (t001 the best), t002 pruned
LOSSES = {0: (TrialStatus.COMPLETED, 2.5), 1: (TrialStatus.COMPLETED, 1.75), 2: (TrialStatus.PRUNED, 3.0)}


@dataclass
class FinishedSweep:
    folder: Path  # <results>/t-20260101-000000, beside <results>/mlflow.db
    space: Path
    experiment: str
    study: Any  # optuna.Study: a test may add what `run` leaves besides the trials
    define: Callable[[Any], Any]  # the sweep's DefineByRun: samples a trial as the sweep does


def build_finished_sweep(base: Path, *, concurrency: int, elapsed_seconds: float,
                         log_more: Callable[[Any, str], None] | None = None) -> FinishedSweep:  # fmt: skip
    """The sweep of LOSSES under `base`; `log_more(client, run_id)` logs more to each trial's run."""
    import optuna
    from mlflow import MlflowClient

    from sweep.engine.study import DefineByRun

    space = write_space(base, MINIMAL)
    cfg = load_config(space)
    results = base / "sweeps"
    folder = results / "t-20260101-000000"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(space.read_text())
    storage, mlflow_uri = f"sqlite:///{folder / 'optuna.db'}", f"sqlite:///{results / 'mlflow.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="t", storage=storage, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("t", artifact_location=(results / "artifacts").as_uri())  # `report` logs there, not in ./mlruns
    parent = client.create_run(experiment, run_name=folder.name).info.run_id
    define = DefineByRun(cfg.space, cfg.fixed_hyperparams)
    for number, (status, loss) in LOSSES.items():
        trial = study.ask()
        define(trial)
        trial.set_user_attr(STATUS, str(status))
        trial.set_user_attr(ATTR_WORKER, "w0")  # taken by a worker, as every trial that ran
        run = client.create_run(experiment, tags={"mlflow.parentRunId": parent, "trial": f"t{number:03d}", STATUS: str(status)}).info.run_id
        client.log_metric(run, EVAL_LOSS, loss)
        client.log_metric(run, PEAK_VRAM_GB, 1.0 + number)
        if log_more is not None:
            log_more(client, run)
        client.set_terminated(run)
        if status == TrialStatus.COMPLETED:
            study.tell(trial, loss)
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    meta = {"name": "t", "space_file": str(space), "overrides": [], "mlflow_uri": mlflow_uri, "experiment": "t", "experiment_id": experiment,
            "parent_run_id": parent, "optuna_storage": storage, "study_name": "t", "metric": EVAL_LOSS, "num_trials": len(LOSSES),
            "concurrency": concurrency, "started": "2026-01-01T00:00:00", "elapsed_seconds": elapsed_seconds, "state": "finished"}  # fmt: skip
    (folder / "sweep.json").write_text(json.dumps(meta))
    return FinishedSweep(folder=folder, space=space, experiment=experiment, study=study, define=define)
