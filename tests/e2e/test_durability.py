"""A sweep survives the night: the driver killed (kill -9) at several points and resumed, a sweep
stopped and resumed, a worker killed and its trials retried from their checkpoints, `status`
throughout. Everything through the command line, as a user would do it; one worker trains two
trials at a time (max_concurrent 2)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from tests.conftest import MINIMAL, ROOT, write_space
from tests.e2e.conftest import mlflow_runs

pytestmark = pytest.mark.e2e

BODY = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 40, eval_every: 10, log_every: 5, batch: [2, 1]}").replace(
    "search: {num_trials: 2}", "search: {num_trials: 3, max_concurrent: 2, seed: 0, scheduler: {type: none}}"
).replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-3, 2.0e-2]}\n")


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def sweep_cli(*args: str, cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)


class Driver:
    """`python -m sweep run` in the background, its output watched line by line."""

    def __init__(self, space: Path, cwd: Path, extra: list[str] | None = None):
        self.log = cwd / "driver.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "sweep", "run", str(space), *(extra or [])], cwd=cwd, env=env(),
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def wait_for(self, pattern: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            match = re.search(pattern, text)
            if match:
                return match.group(0)
            if self.proc.poll() is not None:
                raise AssertionError(f"the driver ended before {pattern!r}:\n{text[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def sweep_dir(self) -> Path:
        return Path(self.wait_for(r"sweep folder: (\S+)").split("sweep folder: ")[1])

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)  # the driver alone, as a crash would
        self.proc.wait()


def check_finished(sweep_dir: Path, trials: int = 3) -> dict[str, object]:
    """Every trial finished exactly once: the study has no open trial, MLflow one child run each."""
    import json

    meta = json.loads((sweep_dir / "sweep.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=f"sqlite:///{sweep_dir}/optuna.db")
    # A kill that lands between the sampler's ask and its sampling leaves an empty trial: resume
    # closes it as lost (FAIL, no parameters, nothing ran) and launches the trial it owes instead.
    lost = [t for t in study.trials if t.user_attrs.get("trial_status") == "lost"]
    assert all(t.state.name == "FAIL" and not t.params for t in lost) and len(lost) <= 1, [(t.state.name, t.params) for t in lost]
    states = [t.state.name for t in study.trials if t not in lost]
    assert states == ["COMPLETE"] * trials, states
    parent, children = mlflow_runs(meta["mlflow_uri"], meta["experiment"])
    assert parent.info.run_id == meta["parent_run_id"] and parent.info.status == "FINISHED"
    labels = sorted(r.data.tags["trial"] for r in children)
    assert labels == [f"t{t.number:03d}" for t in study.trials if t not in lost], labels  # t000.. with a lost number skipped
    assert {r.data.tags["trial_status"] for r in children} == {"completed"}
    client = MlflowClient(meta["mlflow_uri"])
    histories = {}
    for run in children:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(5, 45, 5)), (run.data.tags["trial"], steps)  # each logged once, none missing
        histories[run.data.tags["trial"]] = run
    assert meta["state"] == "finished"
    return histories


@pytest.mark.parametrize(
    ("point", "pattern"),
    [
        ("before any trial reports", r"t000 start"),
        ("mid-trial", r"t000 step\s+20/40"),
        ("between trials", r"t000 completed"),
    ],
)
def test_resume_after_the_driver_is_killed(tmp_path: Path, point: str, pattern: str) -> None:
    driver = Driver(write_space(tmp_path, BODY + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"), tmp_path)
    sweep_dir = driver.sweep_dir()
    driver.wait_for(pattern)
    driver.kill()

    status = sweep_cli("status", str(sweep_dir), cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "interrupted (its driver is gone; resume it)" in status.stdout

    resumed = sweep_cli("resume", str(sweep_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    if point == "mid-trial":  # both trials the worker held continue from their own checkpoints
        assert re.search(r"continuing 2 \(t000 from step-\d+, t00\d from step-\d+\)", resumed.stdout), resumed.stdout
    if point == "between trials":
        assert re.search(r"resuming \S+: [12] trials finished", resumed.stdout), resumed.stdout
    check_finished(sweep_dir)
    again = sweep_cli("resume", str(sweep_dir), cwd=tmp_path)
    assert again.returncode == 2 and "finished already" in again.stderr


def test_stop_checkpoints_and_resume_continues(tmp_path: Path) -> None:
    driver = Driver(write_space(tmp_path, BODY + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"), tmp_path)
    sweep_dir = driver.sweep_dir()
    driver.wait_for(r"t000 step\s+10/40")
    stopped = sweep_cli("stop", str(sweep_dir), cwd=tmp_path)
    assert stopped.returncode == 0 and "stopped. Continue with:" in stopped.stdout, stopped.stdout + stopped.stderr
    assert driver.proc.wait(timeout=120) == 0
    assert "stopped on request; continue with:" in driver.log.read_text()

    status = sweep_cli("status", str(sweep_dir), cwd=tmp_path)
    assert f"{sweep_dir.name}: stopped" in status.stdout and "2 stopped" in status.stdout, status.stdout
    import json

    meta = json.loads((sweep_dir / "sweep.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=f"sqlite:///{sweep_dir}/optuna.db")
    assert [t.state.name for t in study.trials if t.user_attrs.get("trial_status") != "duplicate"] == ["RUNNING"] * 2  # resumable, not pruned

    resumed = sweep_cli("resume", str(sweep_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert re.search(r"continuing 2 \(t000 from step-\d+, t00\d from step-\d+\)", resumed.stdout), resumed.stdout
    check_finished(sweep_dir)
    status = sweep_cli("status", str(sweep_dir), cwd=tmp_path)
    assert f"{sweep_dir.name}: finished" in status.stdout and "3 of 3 done; 3 completed" in status.stdout, status.stdout


def test_the_trials_of_a_worker_that_dies_are_retried_from_their_checkpoints(tmp_path: Path) -> None:
    driver = Driver(write_space(tmp_path, BODY + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"), tmp_path)
    sweep_dir = driver.sweep_dir()
    driver.wait_for(r"t000 step\s+20/40")
    workers = subprocess.run(["pgrep", "-f", "ray::ImplicitFunc"], capture_output=True, text=True).stdout.split()
    assert workers, "no trial worker process found"
    for pid in workers:
        os.kill(int(pid), signal.SIGKILL)
    assert driver.proc.wait(timeout=400) == 0, driver.log.read_text()[-3000:]
    histories = check_finished(sweep_dir)
    assert histories["t000"].data.tags.get("retries") == "1"
    log = driver.log.read_text()
    assert "t000 failed" not in log and re.search(r"t000 retrying  its worker died; attempt 2 continues from its checkpoint at step-\d+", log), log[-3000:]
    assert len(re.findall(r"retrying  its worker died; attempt 2", log)) == 2  # both trials it held
