"""Sweeps run in-process against a local Ray: ASHA pruning, QLoRA trials, grid search."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.config import load_config
from sweep.engine.sweep import run_sweep
from tests.conftest import MINIMAL, write_space
from tests.e2e.conftest import mlflow_runs, study_trials

pytestmark = pytest.mark.e2e


def sweep(tmp_path: Path, body: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config(write_space(tmp_path, body + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    lines: list[str] = []
    result = run_sweep(cfg, log=lines.append)
    return cfg, result, "\n".join(lines)


def test_asha_prunes_a_poor_trial_and_everyone_agrees(tmp_path: Path, ray_cluster: None) -> None:
    body = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 6, eval_every: 2, log_every: 1, batch: [2, 1]}").replace(
        "search: {num_trials: 2}",
        """search:
  num_trials: 2
  max_concurrent: 1
  scheduler: {type: asha, grace_period: 2, reduction_factor: 2}
  points_to_evaluate: [{learning_rate: 2.0e-2}, {learning_rate: 1.0e-6}]""",
    ).replace("  lora_r: [4, 8]\n", "  learning_rate: {loguniform: [1.0e-6, 5.0e-2]}\n")
    cfg, result, out = sweep(tmp_path, body)
    assert result.counts == {"completed": 1, "pruned": 1}, out
    assert result.best["label"] == "t000"
    parent, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    tags = {r.data.tags["trial"]: r.data.tags for r in children}
    assert tags["t000"]["trial_status"] == "completed"
    assert tags["t001"]["trial_status"] == "pruned" and tags["t001"]["stopped_at_step"] == "2"
    trials = study_trials(result.sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    assert list(trials[1].intermediate_values) == [2]  # reported by training step
    assert list(trials[0].intermediate_values) == [2, 4, 6]
    assert trials[1].params["learning_rate"] == pytest.approx(1e-6)
    assert "t001 pruned" in out and "best trial: t000" in out


def test_a_qlora_trial_on_cpu(tmp_path: Path, ray_cluster: None) -> None:
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid}").replace("  lora_r: [4, 8]\n", "  method: [qlora]\n")
    cfg, result, out = sweep(tmp_path, body)
    assert result.counts == {"completed": 1}, out
    _, (child,) = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    assert child.data.params["method"] == "qlora" and child.data.params["quantization"] == "nf4-double-quant"
    assert child.data.tags["trial_status"] == "completed"
    assert child.data.metrics["eval_loss"] > 0


def test_grid_covers_every_point_once(tmp_path: Path, ray_cluster: None) -> None:
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid, scheduler: {type: none}}").replace(
        "  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  batch: [[1, 2], [2, 1]]\n"
    )
    cfg, result, _ = sweep(tmp_path, body)
    assert result.counts == {"completed": 4}
    seen = {(r["config"]["lora_r"], tuple(r["config"]["batch"])) for r in result.trials}
    assert seen == {(4, (1, 2)), (4, (2, 1)), (8, (1, 2)), (8, (2, 1))}


def test_a_spent_space_ends_the_sweep_without_training_anything_twice(tmp_path: Path, ray_cluster: None) -> None:
    """lora_r 4 or 8 and 5 trials asked: TPE proposes the two, then only what ran. Those
    proposals are closed as duplicates (never trained), and the sweep ends after the two."""
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 5, max_concurrent: 1, seed: 0, scheduler: {type: none}}")
    cfg, result, out = sweep(tmp_path, body)
    assert result.counts == {"completed": 2}, out
    assert sorted(r["config"]["lora_r"] for r in result.trials) == [4, 8]
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    assert len(children) == 2  # duplicates get no MLflow run: they never ran
    trials = study_trials(result.sweep_dir)
    duplicates = [t for t in trials if t.user_attrs.get("trial_status") == "duplicate"]
    by_label = {f"t{t.number:03d}": t for t in trials}
    assert len(duplicates) >= 20 and all(t.user_attrs["duplicate_of"] in out for t in duplicates)
    # one at a time: each twin had completed, so its result is told again (what TPE learns from)
    assert all((t.state.name, t.value) == ("COMPLETE", by_label[t.user_attrs["duplicate_of"]].value) for t in duplicates)
    assert "duplicate" in out and "the space looks spent; no new trials start" in out, out


def test_time_budget_stops_running_trials(tmp_path: Path, ray_cluster: None) -> None:
    body = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 100000, eval_every: 5, log_every: 5, batch: [1, 1]}").replace(
        "search: {num_trials: 2}", "search: {num_trials: 4, time_budget: 25s, scheduler: {type: none}}"
    )
    cfg, result, out = sweep(tmp_path, body)
    assert set(result.counts) == {"stopped"}, out
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    assert {r.data.tags["trial_status"] for r in children} == {"stopped"}
    # lora_r 4 or 8: a proposal repeating a running trial is closed as a duplicate, FAIL (its twin's
    # result unknown: sweep.study.close_duplicate); every trial that ran was stopped (PRUNED)
    trials = study_trials(result.sweep_dir)
    duplicates = [t for t in trials if t.user_attrs.get("trial_status") == "duplicate"]
    assert {t.state.name for t in trials if t not in duplicates} == {"PRUNED"} and {t.state.name for t in duplicates} <= {"FAIL"}
    assert "best trial: none completed" in out


def test_a_trial_that_raises_is_recorded_as_failed(tmp_path: Path, ray_cluster: None) -> None:
    # flash-attention is not installed on a CPU machine: loading the model fails inside the trial.
    body = MINIMAL.replace("log_every: 1}", "log_every: 1, attn_implementation: flash_attention_2}").replace(
        "search: {num_trials: 2}", "search: {algorithm: grid}"
    ).replace("  lora_r: [4, 8]\n", "  lora_r: [4]\n")
    cfg, result, out = sweep(tmp_path, body)
    assert result.counts == {"failed": 1}, out
    _, (child,) = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    assert child.data.tags["trial_status"] == "failed" and child.info.status == "FAILED"
    assert "flash" in child.data.tags["error"].lower()
    assert [t.state.name for t in study_trials(result.sweep_dir)] == ["FAIL"]
    assert "t000 failed" in out


STATE_OF = {"completed": "COMPLETE", "pruned": "PRUNED", "stopped": "PRUNED", "oom": "FAIL", "nan": "FAIL", "failed": "FAIL"}


def _agree(cfg, result) -> dict[str, str]:
    """MLflow's trial_status and the study's state, trial by trial; returns label -> status."""
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    status = {r.data.tags["trial"]: r.data.tags["trial_status"] for r in children}
    trials = study_trials(result.sweep_dir)
    assert len(trials) == len(status)
    for t in trials:
        assert STATE_OF[status[f"t{t.number:03d}"]] == t.state.name, (t.number, status, t.state)
        assert t.user_attrs["trial_status"] == status[f"t{t.number:03d}"]
    return status


def test_median_stopping_prunes_by_training_step(tmp_path: Path, ray_cluster: None) -> None:
    body = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 6, eval_every: 2, log_every: 1, batch: [2, 1]}").replace(
        "search: {num_trials: 2}",
        """search:
  num_trials: 2
  max_concurrent: 1
  scheduler: {type: median, grace_period: 2, min_samples: 1}
  points_to_evaluate: [{learning_rate: 2.0e-2}, {learning_rate: 1.0e-6}]""",
    ).replace("  lora_r: [4, 8]\n", "  learning_rate: {loguniform: [1.0e-6, 5.0e-2]}\n")
    cfg, result, out = sweep(tmp_path, body)
    assert _agree(cfg, result) == {"t000": "completed", "t001": "pruned"}, out
    assert [r["step"] for r in result.trials if r["label"] == "t001"] == [2]


def test_hyperband_prunes_in_its_brackets(tmp_path: Path, ray_cluster: None) -> None:
    """search.scheduler hyperband: Optuna's Hyperband pruner (brackets of successive halving, each
    trial in one by its number) judges the trials at their evaluations; none is paused. Whatever it
    prunes, the study, MLflow and the rows agree, and every trial's history is whole. One trial at a
    time: a bracket's pruning depends on the order its trials reach a rung, which concurrent
    trials' timing would decide."""
    body = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 4, eval_every: 2, log_every: 1, batch: [2, 1]}").replace(
        "search: {num_trials: 2}",
        """search:
  num_trials: 6
  max_concurrent: 1
  seed: 1
  scheduler: {type: hyperband, reduction_factor: 2}
  points_to_evaluate: [{learning_rate: 2.0e-2}, {learning_rate: 1.0e-6}, {learning_rate: 1.0e-2},
                       {learning_rate: 2.0e-2}, {learning_rate: 1.0e-6}, {learning_rate: 3.0e-6}]""",
    ).replace("  lora_r: [4, 8]\n", "  learning_rate: {loguniform: [1.0e-6, 5.0e-2]}\n")
    cfg, result, out = sweep(tmp_path, body)
    status = _agree(cfg, result)
    assert set(status.values()) == {"completed", "pruned"} and len(status) == 6, (status, out)
    assert {r["step"] for r in result.trials if r["status"] == "pruned"} == {2} and {r["step"] for r in result.trials if r["status"] == "completed"} == {4}
    from mlflow import MlflowClient

    client = MlflowClient(cfg.mlflow_uri)
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(1, len(steps) + 1)), (run.info.run_name, steps)


def test_warm_start_feeds_the_sampler_and_runs_the_best_first(tmp_path: Path, ray_cluster: None) -> None:
    grid = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid, scheduler: {type: none}}").replace(
        "  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: [1.0e-3, 1.0e-2]\n"
    )
    first_cfg, first, _ = sweep(tmp_path / "a", grid)
    assert first.counts == {"completed": 4}
    best_r = first.best["config"]["lora_r"]

    # learning rate 1e-3 is no longer a choice: those two trials stay behind
    body = MINIMAL.replace(
        "search: {num_trials: 2}", f"search: {{num_trials: 1, warm_start: {first.sweep_dir}, warm_start_top: 1, scheduler: {{type: none}}}}"
    ).replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8, 16]\n  learning_rate: [1.0e-2, 2.0e-2]\n")
    cfg, result, out = sweep(tmp_path / "b", body)
    assert "2 finished trials carried over, skipped: 2 outside this space (learning_rate)" in out, out
    trials = study_trials(result.sweep_dir)
    warm = [t for t in trials if "warm_start_from" in t.user_attrs]
    assert len(warm) == 2 and {t.params["learning_rate"] for t in warm} == {1e-2}
    assert all(t.state.name == "COMPLETE" for t in warm)
    (own,) = [t for t in trials if "warm_start_from" not in t.user_attrs]
    assert own.params == {"lora_r": min(warm, key=lambda t: t.value).params["lora_r"], "learning_rate": 1e-2}
    assert result.trials[0]["config"]["learning_rate"] == 1e-2

    # lora_r fixed now: only the previous trials that ran with r = 8 carry over
    body = MINIMAL.replace(
        "search: {num_trials: 2}", f"search: {{num_trials: 1, warm_start: {first.sweep_dir}, scheduler: {{type: none}}}}"
    ).replace("  lora_r: [4, 8]\n", "  learning_rate: [1.0e-3, 1.0e-2]\n").replace("train: {max_steps: 4", "train: {lora_r: 8, max_steps: 4")
    cfg, result, out = sweep(tmp_path / "c", body)
    assert "2 finished trials carried over, skipped: 2 ran with another fixed lora_r" in out, out
    assert best_r in (4, 8)

    # a different metric cannot warm-start
    body = MINIMAL.replace("search: {num_trials: 2}", f"search: {{num_trials: 1, metric: train_loss, warm_start: {first.sweep_dir}}}")
    with pytest.raises(Exception, match="optimised eval_loss"):
        sweep(tmp_path / "d", body)
