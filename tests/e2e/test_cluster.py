"""A sweep over a real two-node Ray cluster on this machine (`ray start` head + a second node on
loopback): trials spread over both nodes; the second node is killed mid-trial; its trial is retried
from its checkpoint on the survivor and every trial is accounted for."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import MINIMAL, write_space
from tests.e2e.conftest import mlflow_runs, study_trials
from tests.e2e.test_durability import Driver, env

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raylets() -> dict[int, str]:
    """pid -> command line of every raylet on this machine."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]): line for line in out.splitlines() if "raylet/raylet " in line}


@pytest.fixture()
def two_nodes(tmp_path: Path) -> Iterator[tuple[str, dict]]:
    port = free_port()
    cluster_env = {**env(), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(["ray", "stop", "--force"], env=cluster_env, capture_output=True)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=cluster_env, capture_output=True)
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    head = subprocess.run(["ray", "start", "--head", f"--port={port}", "--include-dashboard=false", *common], env=cluster_env, capture_output=True, text=True)
    assert head.returncode == 0, head.stdout + head.stderr
    worker = subprocess.run(["ray", "start", f"--address=127.0.0.1:{port}", *common], env=cluster_env, capture_output=True, text=True)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    yield f"127.0.0.1:{port}", cluster_env
    subprocess.run(["ray", "stop", "--force"], env=cluster_env, capture_output=True)


def test_sweep_spreads_over_two_nodes_and_survives_losing_one(tmp_path: Path, two_nodes: tuple[str, dict]) -> None:
    """Two workers of two trials each (one worker per node: a CPU each); the second node is killed
    while its worker trains: both its trials continue from their checkpoints on the other node
    (attempt 2), and every trial completes once."""
    address, cluster_env = two_nodes
    body = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 200, eval_every: 20, log_every: 20, batch: [2, 1]}").replace(
        "search: {num_trials: 2}", "search: {num_trials: 4, max_concurrent: 4, seed: 0, scheduler: {type: none}, max_retries: 1}"
    ).replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n") + (
        f"resources: {{cohort: 2}}\ntracking: {{results_dir: {tmp_path / 'out'}}}\n"
    )  # 4 distinct trials: a 2-point space would be spent after 2
    os.environ.update({k: cluster_env[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")})
    try:
        driver = Driver(write_space(tmp_path, body), tmp_path, extra=["--address", address])
        sweep_dir = driver.sweep_dir()
        driver.wait_for(r"workers: 2 of 1 CPU, each training up to 2 trials")
        # both workers training (a trial of each has been evaluated) before the second node goes
        deadline = time.monotonic() + 240
        while True:
            log = driver.log.read_text()
            workers = {m.group(2) for m in re.finditer(r"(t\d{3}) start .*\(worker (\w+), ", log)}
            evaluated = {m.group(1) for m in re.finditer(r"(t\d{3}) step\s+20/200", log)}
            starts = dict(re.findall(r"(t\d{3}) start .*\(worker (\w+), ", log))
            if len(workers) == 2 and len({starts[t] for t in evaluated if t in starts}) == 2:
                break
            assert time.monotonic() < deadline and driver.proc.poll() is None, log[-3000:]
            time.sleep(0.5)
        (second,) = [pid for pid, line in raylets().items() if "__internal_head__" not in line]
        os.kill(second, signal.SIGKILL)  # the second node is lost
        assert driver.proc.wait(timeout=600) == 0, driver.log.read_text()[-4000:]
    finally:
        for key in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
            os.environ.pop(key, None)
    log = driver.log.read_text()
    assert "attaching to " + address in log
    retried = re.findall(r"(t\d{3}) retrying  its worker died; attempt 2 continues from (its checkpoint at step-\d+|the start)", log)
    assert len(retried) == 2 and len({starts[t] for t, _ in retried}) == 1, log[-3000:]  # both trials of the lost worker

    import json

    from mlflow import MlflowClient

    meta = json.loads((sweep_dir / "sweep.json").read_text())
    _, children = mlflow_runs(meta["mlflow_uri"], meta["experiment"])
    # the four trials that ran, each once; every other entry of the study is a repeated proposal
    # of one of them, closed without a run
    trials = study_trials(sweep_dir)
    ran = [f"t{t.number:03d}" for t in trials if t.user_attrs.get("trial_status") != "duplicate"]
    assert sorted(r.data.tags["trial"] for r in children) == ran and len(ran) == 4, ran
    assert all(t.user_attrs["duplicate_of"] in ran for t in trials if t.user_attrs.get("trial_status") == "duplicate")
    assert {r.data.tags["trial_status"] for r in children} == {"completed"}
    assert sorted(r.data.tags["trial"] for r in children if r.data.tags.get("retries") == "1") == sorted(t for t, _ in retried)
    nodes = {r.data.params["ray_node"] for r in children}
    assert len(nodes) == 2, nodes  # the two workers ran on different nodes
    client = MlflowClient(meta["mlflow_uri"])
    for run in children:  # a retried trial's history: each step once, none missing
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(20, 220, 20)), (run.data.tags["trial"], steps)
