"""Cohort sweeps end to end (issue 15, resources.cohort): real Ray, Optuna, MLflow, tiny Gemma 3 on
CPU, through the command line. A pruned member is replaced by a new trial; a driver killed while a
cohort trains resumes with every member continuing from its own checkpoint; Ctrl-C stops every
member resumably (issue 13) and `resume` finishes them."""

from __future__ import annotations

import json
import os
import re
import signal
from typing import Iterator
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from tests.conftest import write_space
from tests.e2e.conftest import logical_gpus, mlflow_runs
from tests.e2e.test_durability import Driver, sweep_cli

pytestmark = pytest.mark.e2e

SPACE = """\
name: c
model: {id: tiny-gemma3, embeddings: frozen}
data: {train: DEMO/train.jsonl, eval: DEMO/eval.jsonl, max_seq_len: 128}
train: {max_steps: STEPS, eval_every: EVAL, log_every: EVAL, batch: [2, 1], lora_dropout: 0.0, warmup_ratio: 0.0}
resources: {cohort: COHORT}
space:
  lora_r: [4, 8]
  learning_rate: {loguniform: [1.0e-5, 2.0e-2]}
"""


def space(tmp_path: Path, steps: int, every: int, search: str, cohort: int = 3) -> Path:
    body = SPACE.replace("STEPS", str(steps)).replace("EVAL", str(every)).replace("COHORT", str(cohort)) + f"search: {search}\ntracking: {{results_dir: {tmp_path / 'out'}}}\n"
    return write_space(tmp_path, body)


def stores(sweep_dir: Path) -> tuple[dict, list, dict]:
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    trials = optuna.load_study(study_name=meta["study_name"], storage=f"sqlite:///{sweep_dir}/optuna.db").trials
    parent, children = mlflow_runs(meta["mlflow_uri"], meta["experiment"])
    assert parent.info.run_id == meta["parent_run_id"]
    runs = {}
    for run in children:
        assert run.data.tags["trial"] not in runs, f"two child runs for {run.data.tags['trial']}"
        runs[run.data.tags["trial"]] = run
    return meta, trials, runs


def test_a_pruned_member_is_replaced_and_every_member_is_a_full_trial(tmp_path: Path) -> None:
    search = ("{num_trials: 6, max_concurrent: 3, algorithm: random, seed: 0, scheduler: {type: asha, grace_period: 2, reduction_factor: 3}, "
              "points_to_evaluate: [{lora_r: 8, learning_rate: 2.0e-2}, {lora_r: 4, learning_rate: 1.0e-5}]}")  # fmt: skip
    out = sweep_cli("run", str(space(tmp_path, 6, 2, search)), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    log = out.stdout
    assert re.search(r"workers: 1 of 1 CPU, each training up to 3 trials", log), log[-3000:]
    sweep_dir = Path(re.search(r"sweep folder: (\S+)", log).group(1))
    meta, trials, runs = stores(sweep_dir)
    assert sorted(runs) == [f"t{i:03d}" for i in range(6)] and len(trials) == 6

    # t001 (lr 1e-5) is worse than t000 (lr 2e-2) at the first rung: pruned there, and a new trial took its slot
    states = {f"t{t.number:03d}": t.state.name for t in trials}
    assert states["t001"] == "PRUNED" and states["t000"] == "COMPLETE", states
    assert trials[1].intermediate_values == {2: pytest.approx(runs["t001"].data.metrics["eval_loss"])}
    assert log.index("t001 pruned") < log.index("t003 start"), log[-3000:]

    worker = runs["t000"].data.params["cohort"]
    for t in trials:
        label = f"t{t.number:03d}"
        run = runs[label]
        status = {"COMPLETE": "completed", "PRUNED": "pruned", "FAIL": "failed"}[t.state.name]
        assert run.data.tags["trial_status"] == t.user_attrs["trial_status"] == status, (label, run.data.tags, t.user_attrs)
        assert t.user_attrs["ray_trial_id"] == worker  # the worker (its Ray Tune trial) that trained it
        assert run.data.params["cohort"] == worker and run.data.params["cohort_size"] == "3"
        assert run.data.params["lora_r"] == str(t.params["lora_r"]) and run.data.params["effective_batch"] == "2"
        for metric in ("eval_loss", "train_loss", "tokens_per_sec", "loss_tokens_per_sec", "peak_rss_gb", "member_vram_share_gb"):
            assert metric in run.data.metrics, (label, metric)
        assert run.data.metrics["member_vram_share_gb"] < run.data.metrics["peak_rss_gb"] * 100  # an estimate, named apart from the measurement
        if status == "completed":
            assert t.value == pytest.approx(run.data.metrics["eval_loss"]) and "train_seconds" in run.data.metrics
            assert run.info.status == "FINISHED" and run.data.tags["last_step"] == "6"
        if status == "pruned":
            assert run.data.tags["stopped_at_step"] == str(max(t.intermediate_values))
    assert meta["state"] == "finished"
    status = sweep_cli("status", str(sweep_dir), cwd=tmp_path)
    assert status.returncode == 0 and "6 of 6 done" in status.stdout, status.stdout

    # the winner's adapter exports from its member checkpoint, as a lone trial's does
    best = sweep_cli("best", str(sweep_dir), "--export", str(tmp_path / "best"), cwd=tmp_path)
    assert best.returncode == 0, best.stdout[-3000:] + best.stderr[-3000:]
    adapter = tmp_path / "best" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and list(adapter.glob("adapter_model.*")), best.stdout[-2000:]


def test_kill_9_while_a_cohort_trains_then_resume(tmp_path: Path) -> None:
    search = "{num_trials: 3, max_concurrent: 3, seed: 0, scheduler: {type: none}}"
    driver = Driver(space(tmp_path, 20, 5, search), tmp_path)
    sweep_dir = driver.sweep_dir()
    driver.wait_for(r"t002 step\s+10/20")
    driver.kill()

    resumed = sweep_cli("resume", str(sweep_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    for label in ("t000", "t001", "t002"):  # each from its own checkpoint (at step 10 or later: the worker outlives its driver briefly)
        step = int(re.search(rf"{label} from step-(\d+)", resumed.stdout).group(1))
        assert 10 <= step < 20 and re.search(rf"{label} start .* from its checkpoint at step {step}\b", resumed.stdout), resumed.stdout[-3000:]
    meta, trials, runs = stores(sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert sorted(runs) == ["t000", "t001", "t002"]  # exactly one child run per trial
    client = MlflowClient(meta["mlflow_uri"])
    for label, run in runs.items():
        assert run.data.tags["trial_status"] == "completed" and run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == [5, 10, 15, 20], (label, steps)  # each log_every window once, none missing
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [5, 10, 15, 20]
    assert meta["state"] == "finished"


def test_ctrl_c_stops_every_member_resumably_then_resume_finishes_them(tmp_path: Path) -> None:
    """SIGINT to `run` once a member has reported: every member checkpoints at its current step and
    ends resumable (RUNNING in the study, KILLED / stopped in MLflow), exit 130; `resume` continues
    each from that checkpoint and finishes the sweep with one child run per trial."""
    search = "{num_trials: 4, max_concurrent: 2, seed: 0, scheduler: {type: none}}"
    driver = Driver(space(tmp_path, 16, 4, search, cohort=2), tmp_path)
    sweep_dir = driver.sweep_dir()
    driver.wait_for(r"t00[01] step\s+4/16")
    os.kill(driver.proc.pid, signal.SIGINT)
    assert driver.proc.wait(timeout=120) == 130, driver.log.read_text()[-4000:]
    out = driver.log.read_text()
    assert "continue with:  python -m sweep resume" in out and "Traceback" not in out, out[-4000:]
    meta, trials, runs = stores(sweep_dir)
    assert meta["state"] == "stopped"
    assert trials and {t.state.name for t in trials} == {"RUNNING"}, [(t.number, t.state.name) for t in trials]  # nothing finished, nothing pruned
    assert sorted(runs) == [f"t{t.number:03d}" for t in trials]
    stopped_at = {}
    for label, run in runs.items():
        assert (run.info.status, run.data.tags["trial_status"]) == ("KILLED", "stopped"), (label, run.info.status, run.data.tags)
        stopped_at[label] = int(run.data.tags["last_step"])
    assert max(stopped_at.values()) >= 4, stopped_at

    resumed = sweep_cli("resume", str(sweep_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    for label, step in stopped_at.items():  # each from the checkpoint it saved when it stopped (at its current step)
        where = f"from step-{step:06d}" if step else "from the start"
        assert f"{label} {where}" in resumed.stdout, (label, step, resumed.stdout[-3000:])
    meta, trials, runs = stores(sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted(runs) == ["t000", "t001", "t002", "t003"]  # exactly one child run per trial
    client = MlflowClient(meta["mlflow_uri"])
    for label, run in runs.items():
        assert (run.info.status, run.data.tags["trial_status"]) == ("FINISHED", "completed"), label
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        # each log_every window once, none missing (the stop cut one window in two: its step too)
        assert steps == sorted(set(steps)) and {4, 8, 12, 16} <= set(steps) and len(steps) <= 5, (label, steps)
    assert meta["state"] == "finished"


@pytest.fixture()
def two_gpus() -> Iterator[None]:
    yield from logical_gpus(2)


def test_two_cohort_workers_one_per_gpu_each_member_one_child_run(tmp_path: Path, two_gpus: None) -> None:
    """resources.cohort auto on a cluster of two logical GPUs (members still train on the CPU): one
    worker per GPU, the trials shared out between them, and the stores see every member once, with
    the worker and GPU it trained on (issue 17's placement with cohorts)."""
    from sweep.config import load_config
    from sweep.engine.sweep import run_sweep

    search = "{num_trials: 6, max_concurrent: 6, seed: 0, scheduler: {type: none}}"
    body = SPACE.replace("STEPS", "4").replace("EVAL", "2").replace("{cohort: COHORT}", "{cohort: auto, gpus_per_trial: auto, gpu_memory_gb: 24, cpus_per_trial: 0.5}")
    cfg = load_config(write_space(tmp_path, body + f"search: {search}\ntracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    lines: list[str] = []
    result = run_sweep(cfg, log=lines.append)
    out = "\n".join(lines)
    assert re.search(r"workers: 2 of 1 GPU", out), out[-3000:]
    assert result.counts == {"completed": 6}, out[-3000:]
    meta, trials, runs = stores(Path(result.sweep_dir))
    assert sorted(runs) == [f"t{i:03d}" for i in range(6)] and [t.state.name for t in trials] == ["COMPLETE"] * 6
    workers = {label: (run.data.params["cohort"], run.data.params["gpu_ids"]) for label, run in runs.items()}
    assert len({w for w, _ in workers.values()}) == 2, workers  # two workers ...
    assert {g for _, g in workers.values()} == {"0", "1"}, workers  # ... one on each GPU
    # a fair share each at once (cohort_size 3 below); a worker whose members end first may take
    # more of the queue (continuous cohorts), so the totals need not be 3 + 3 on a loaded machine
    per_worker = {w: sum(1 for x, _ in workers.values() if x == w) for w, _ in workers.values()}
    assert len(per_worker) == 2 and min(per_worker.values()) >= 1, per_worker
    for label, run in runs.items():
        t = trials[int(label[1:])]
        assert t.user_attrs["ray_trial_id"] == run.data.params["cohort"] and run.data.params["cohort_size"] == "3", (label, run.data.params)
        assert t.value == pytest.approx(run.data.metrics["eval_loss"]) and run.info.status == "FINISHED"
        # the placement estimate each member was judged by, logged as a lone trial's (bench/packing reads it back)
        assert t.user_attrs["estimated_vram_gb"] > 0 and float(run.data.params["estimated_vram_gb"]) == pytest.approx(t.user_attrs["estimated_vram_gb"]), run.data.params
    assert meta["state"] == "finished"


def test_the_time_budget_ends_every_member_stopped_and_the_sweep_on_time(tmp_path: Path) -> None:
    """search.time_budget with cohorts: members that would train for hours end `stopped` at the
    budget (PRUNED in the study), no new member joins, and the sweep ends soon after the budget
    with nothing reported as the best; no trial completed, so the command exits 1 and says why."""
    import time

    search = "{num_trials: 4, max_concurrent: 4, seed: 0, time_budget: 30s, scheduler: {type: none}}"
    start = time.monotonic()
    out = sweep_cli("run", str(space(tmp_path, 100000, 5, search, cohort=2)), cwd=tmp_path)
    wall = time.monotonic() - start
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]
    assert re.search(r"no trial completed: \d+ stopped; the time budget \(search.time_budget: 30s\) ended every trial before it completed", out.stdout), out.stdout[-2000:]
    assert wall < 30 + 90, wall  # the budget, start-up and the members' last saves; not the 100,000 steps
    sweep_dir = Path(re.search(r"sweep folder: (\S+)", out.stdout).group(1))
    meta, trials, runs = stores(sweep_dir)
    assert trials and {t.state.name for t in trials} == {"PRUNED"}, [(t.number, t.state.name) for t in trials]
    assert sorted(runs) == [f"t{t.number:03d}" for t in trials]
    for label, run in runs.items():
        assert run.data.tags["trial_status"] == "stopped" and int(run.data.tags["last_step"]) >= 1, (label, run.data.tags)
    assert "best trial: none completed" in out.stdout, out.stdout[-2000:]
