"""e2e fixtures: one local Ray per test module, reading MLflow and the Optuna study afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    yield from logical_gpus(0)


def logical_gpus(n: int) -> Iterator[None]:
    """A local Ray cluster of 2 CPUs advertising `n` logical GPUs (trials still train on the CPU),
    for a fixture to yield from."""
    import ray

    ray.init(num_cpus=2, num_gpus=n or None, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def mlflow_runs(uri: str, experiment: str) -> tuple[Any, list[Any]]:
    """(parent run, child runs) of the single sweep in `experiment`."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def study_trials(sweep_dir: Path) -> list[Any]:
    """The trials of the sweep's own study (sweep.json names it: the sweep's name is not enough)."""
    import json

    import optuna

    name = json.loads((Path(sweep_dir) / "sweep.json").read_text())["study_name"]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db").trials
