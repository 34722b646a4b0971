"""Submitted sweeps against a real Ray head (with its job server) started here on loopback:
`submit` sends the sweep as a Ray job with its local data; `status`, `stop` and `resume` find it by
submission id; bad input submits nothing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import DEMO_DATA, MINIMAL, ROOT
from tests.e2e.conftest import mlflow_runs, study_trials
from tests.e2e.test_cluster import free_port
from tests.e2e.test_durability import env

pytestmark = pytest.mark.e2e


@pytest.fixture()
def head(tmp_path: Path) -> Iterator[tuple[str, dict]]:
    """A one-node Ray cluster with its dashboard (the job server), token authentication as Ray 2.60
    sets it up by default."""
    cluster_env = {**env(), "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(["ray", "stop", "--force"], env=cluster_env, capture_output=True)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=cluster_env, capture_output=True)
    dashboard = free_port()
    started = subprocess.run(
        ["ray", "start", "--head", f"--port={free_port()}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"],  # fmt: skip
        env=cluster_env, capture_output=True, text=True,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    yield f"http://127.0.0.1:{dashboard}", cluster_env
    subprocess.run(["ray", "stop", "--force"], env=cluster_env, capture_output=True)


def cli(cluster_env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep", *args], cwd=cwd, env=cluster_env, capture_output=True, text=True, timeout=600)


def job_status(jobs, submission: str) -> str:
    return str(jobs.get_job_status(submission)).split(".")[-1]


def wait_job(jobs, submission: str, timeout: float = 600) -> str:
    deadline = time.monotonic() + timeout
    while (status := job_status(jobs, submission)) in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(1)
    return status


def test_submit_status_stop_resume(tmp_path: Path, head: tuple[str, dict]) -> None:
    address, cluster_env = head
    os.environ.update({k: cluster_env[k] for k in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")})
    try:
        from ray.job_submission import JobSubmissionClient

        jobs = JobSubmissionClient(address)
        # the space file sits beside its own data, named by relative paths: both must travel
        project = tmp_path / "project"
        (project / "data").mkdir(parents=True)
        for name in ("train.jsonl", "eval.jsonl"):
            shutil.copy(DEMO_DATA / name, project / "data" / name)
        body = (MINIMAL.replace("DEMO/train.jsonl", "data/train.jsonl").replace("DEMO/eval.jsonl", "data/eval.jsonl")
                .replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", "train: {max_steps: 600, eval_every: 40, log_every: 40, batch: [2, 1]}")
                .replace("search: {num_trials: 2}", "search: {num_trials: 2, max_concurrent: 1, seed: 0, scheduler: {type: none}}")
                .replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n"))  # fmt: skip
        (project / "space.yaml").write_text(body)
        results = tmp_path / "cluster-disk" / "sweeps"

        # bad input: nothing is submitted
        before = len(jobs.list_jobs())
        missing = cli(cluster_env, "submit", "space.yaml", "--address", address, cwd=project)
        assert missing.returncode == 2 and "tracking.results_dir: required to submit" in missing.stderr, missing.stderr
        nowhere = cli(cluster_env, "submit", "space.yaml", f"tracking.results_dir={results}", "--address", f"http://127.0.0.1:{free_port()}", cwd=project)
        assert nowhere.returncode == 2 and "cannot reach 127.0.0.1" in nowhere.stderr and "job server" in nowhere.stderr, nowhere.stderr
        # the cluster's secrets need not be set here: everything else is checked, then the address fails
        secret = cli(cluster_env, "submit", "space.yaml", f"tracking.results_dir={results}", "tracking.mlflow_uri=postgresql://u:${NOT_SET_HERE}@db/x",
                     "--address", f"http://127.0.0.1:{free_port()}", cwd=project)  # fmt: skip
        assert secret.returncode == 2 and "cannot reach 127.0.0.1" in secret.stderr, secret.stderr
        bad = cli(cluster_env, "submit", "space.yaml", f"tracking.results_dir={results}", "space.lora_r=[0]", "--address", address, cwd=project)
        assert bad.returncode == 2 and "space.lora_r" in bad.stderr, bad.stderr
        assert len(jobs.list_jobs()) == before

        sent = cli(cluster_env, "submit", "space.yaml", f"tracking.results_dir={results}", "--address", address, cwd=project)
        assert sent.returncode == 0, sent.stderr
        submission = re.search(r"submitted (\S+) to", sent.stdout).group(1)
        assert f"sweep folder (on the cluster): {results / submission}" in sent.stdout
        sweep_dir = results / submission

        deadline = time.monotonic() + 300
        while "t000 step" not in jobs.get_job_logs(submission) and time.monotonic() < deadline:
            assert job_status(jobs, submission) in ("PENDING", "RUNNING"), jobs.get_job_logs(submission)[-3000:]
            time.sleep(1)
        # the job copied its inputs next to the results; the sweep reads its data from there
        assert (results / ".submitted" / submission / "inputs" / "2-train.jsonl").read_text() == (DEMO_DATA / "train.jsonl").read_text()
        status = cli(cluster_env, "status", submission, "--address", address, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        assert f"job {submission} (run): RUNNING" in status.stdout and f"{submission}: running" in status.stdout, status.stdout

        stopped = cli(cluster_env, "stop", submission, "--address", address, cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert job_status(jobs, submission) == "SUCCEEDED", jobs.get_job_logs(submission)[-3000:]
        assert '"state": "stopped"' in (sweep_dir / "sweep.json").read_text()

        # the status of a folder only the cluster can see: read there, by a helper job
        from sweep.engine.submit import _helper

        lines: list[str] = []
        assert _helper(jobs, ["status", str(sweep_dir)], lines.append)
        assert f"{submission}: stopped" in lines and any(line.startswith("trials: ") for line in lines), lines
        assert not any("job_manager" in line for line in lines)

        again = cli(cluster_env, "resume", submission, "--address", address, cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        resumed = f"{submission}-resume-1"
        assert f"submitted {resumed}" in again.stdout
        twice = cli(cluster_env, "resume", submission, "--address", address, cwd=tmp_path)
        assert twice.returncode == 2 and "is still driving it" in twice.stderr, twice.stdout + twice.stderr
        assert wait_job(jobs, resumed) == "SUCCEEDED", jobs.get_job_logs(resumed)[-3000:]
        continued = re.search(r"resuming \S+: [01] trials finished; continuing 1 \((t\d{3}) from step-\d+\)", jobs.get_job_logs(resumed))
        assert continued, jobs.get_job_logs(resumed)[-3000:]

        final = cli(cluster_env, "status", submission, "--address", address, cwd=tmp_path)
        assert final.returncode == 0 and f"job {resumed} (resume): SUCCEEDED" in final.stdout, final.stdout + final.stderr
        assert "trials: 2 of 2 done" in final.stdout, final.stdout
        _, children = mlflow_runs(f"sqlite:///{results}/mlflow.db", "t")
        # the two trials that ran, not always t000 and t001: a proposal repeating one that ran takes a
        # number and is closed without a run (sweep.engine.study.twin_of)
        trials = study_trials(sweep_dir)
        ran = [f"t{t.number:03d}" for t in trials if t.user_attrs.get("trial_status") != "duplicate"]
        assert sorted(r.data.tags["trial"] for r in children) == ran and len(ran) == 2 and continued.group(1) in ran, ran
        assert all(t.user_attrs["duplicate_of"] in ran for t in trials if t.user_attrs.get("trial_status") == "duplicate")
        assert {r.data.tags["trial_status"] for r in children} == {"completed"}
        unknown = cli(cluster_env, "status", "no-such-sweep", "--address", address, cwd=tmp_path)
        assert unknown.returncode == 2 and "no submitted sweep of that id" in unknown.stderr
    finally:
        for key in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
            os.environ.pop(key, None)
    assert ROOT.exists()
