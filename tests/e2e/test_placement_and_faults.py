"""Sweeps on a Ray cluster that advertises one GPU (trials still run on the CPU): memory-aware
placement with infeasible configs, and OOM / NaN trials that end cleanly while the sweep goes on."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from sweep.config import load_config
from sweep.engine.sweep import run_sweep
from tests.conftest import MINIMAL, write_space
from tests.e2e.conftest import mlflow_runs, study_trials

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fake_gpu_cluster() -> Iterator[None]:
    import ray

    # Ray workers inherit the environment of the process that starts Ray.
    os.environ["LORA_SWEEP_FAULTS"] = "oom@3:lora_r=8;nan@2:lora_r=32"  # (trials of the default rank, 16, train as usual)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()
    del os.environ["LORA_SWEEP_FAULTS"]


def sweep(tmp_path: Path, body: str):
    cfg = load_config(write_space(tmp_path, body + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    lines: list[str] = []
    return cfg, run_sweep(cfg, log=lines.append), "\n".join(lines)


def test_oom_and_nan_are_results(tmp_path: Path, fake_gpu_cluster: None) -> None:
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid, scheduler: {type: none}}").replace(
        "  lora_r: [4, 8]\n", "  lora_r: [4, 8, 32]\n"
    ) + "resources: {gpus_per_trial: 0}\n"
    cfg, result, out = sweep(tmp_path, body)
    by_r = {r["config"]["lora_r"]: r for r in result.trials}
    assert {r: row["status"] for r, row in by_r.items()} == {4: "completed", 8: "oom", 32: "nan"}, out
    assert "injected" in by_r[8]["error"] and "train loss is not finite at step 2" in by_r[32]["error"]
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    tags = {r.data.params["lora_r"]: r.data.tags for r in children}
    assert tags["8"]["trial_status"] == "oom" and "out of memory" in tags["8"]["error"]
    assert tags["32"]["trial_status"] == "nan" and tags["4"]["trial_status"] == "completed"
    study = {t.params["lora_r"]: t for t in study_trials(result.sweep_dir)}
    assert study[4].state.name == "COMPLETE"
    assert study[8].state.name == "FAIL" and study[8].user_attrs["trial_status"] == "oom" and "injected" in study[8].user_attrs["error"]
    assert study[32].state.name == "FAIL" and study[32].user_attrs["trial_status"] == "nan"


def test_auto_placement_shares_the_gpu_and_never_launches_infeasible_configs(tmp_path: Path, fake_gpu_cluster: None) -> None:
    # tiny model: micro-batch 2 needs ~0.26 GB of a 1.3 GB GPU; micro-batch 256 ~0.82 GB: too much
    body = MINIMAL.replace(
        "search: {num_trials: 2}",
        "search: {num_trials: 2, seed: 0, scheduler: {type: none}, points_to_evaluate: [{batch: [256, 1]}, {batch: [2, 1]}]}",
    ).replace("  lora_r: [4, 8]\n", "  batch: [[2, 1], [256, 1]]\n  learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n") + "resources: {gpus_per_trial: auto, gpu_memory_gb: 1.3}\n"
    # (the learning rate: two launched trials of the one feasible batch, not one configuration twice)
    cfg, result, out = sweep(tmp_path, body)
    launched = [r for r in result.trials if r["status"] != "infeasible"]
    infeasible = [r for r in result.trials if r["status"] == "infeasible"]
    assert len(launched) == 2 and {r["status"] for r in launched} == {"completed"}, out
    assert all(tuple(r["config"]["batch"]) == (2, 1) and r["config"]["estimated_vram_gb"] > 0 for r in launched)
    assert infeasible and infeasible[0]["label"] == "t000" and "exceeds one 1 GB GPU" in infeasible[0]["error"]
    assert "t000 infeasible" in out and "each worker fills one of 1 GPU(s) of 1 GB" in out
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    statuses = {r.data.tags["trial"]: r.data.tags["trial_status"] for r in children}
    assert statuses["t000"] == "infeasible" and list(statuses.values()).count("completed") == 2
    estimates = {r.data.params.get("estimated_vram_gb") for r in children if r.data.tags["trial_status"] == "completed"}
    assert len(estimates) == 1 and float(estimates.pop()) > 0  # each logged the estimate it was admitted by
    trials = study_trials(result.sweep_dir)
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["trial_status"] == "infeasible"
    assert {t.state.name for t in trials if t.user_attrs.get("trial_status") != "infeasible"} == {"COMPLETE"}


def test_a_space_where_nothing_fits_is_refused_before_any_trial(tmp_path: Path, fake_gpu_cluster: None) -> None:
    from sweep.config import ConfigError

    body = MINIMAL.replace("  lora_r: [4, 8]\n", "  batch: [[256, 1], [512, 1]]\n") + "resources: {gpus_per_trial: auto, gpu_memory_gb: 1.3}\n"
    with pytest.raises(ConfigError, match=r"resources: no configuration of this space fits one 1.3 GB GPU .*: the smallest needs an estimated 0\.\d GB"):
        sweep(tmp_path, body)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != ".cache"]  # no sweep folder (only the tokenized-data cache)
