"""Multi-node stores, for real: MLflow through `mlflow server` on a PostgreSQL backend, the Optuna
study on PostgreSQL. Also: no secret (a password written in a store URI, a hub token in the
environment) reaches the logs, MLflow or the results folder.

Needs a PostgreSQL server: LORA_SWEEP_TEST_PG=postgresql://USER:PASSWORD@HOST:PORT for a role that
may create databases (.ci/run installs and starts one); skipped otherwise."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import MINIMAL, ROOT, write_space

pytestmark = pytest.mark.e2e
needs_postgres = pytest.mark.skipif(not os.environ.get("LORA_SWEEP_TEST_PG"), reason="LORA_SWEEP_TEST_PG is not set (no PostgreSQL server)")
FAKE_TOKEN = "hf_FAKE0123456789abcdefTOKEN"
FAKE_AWS = "FAKEawsSECRET0123456789abcdefghijklmnop"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_database(base: str) -> str:
    import psycopg

    name = f"lora_sweep_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base + "/sweep_base", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    backend = create_database(os.environ["LORA_SWEEP_TEST_PG"])
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--default-artifact-root", (tmp_path / "artifacts").as_uri(),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],  # fmt: skip
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(1)
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "mlflow-server.log").read_text()[-3000:])
    else:
        raise AssertionError("mlflow server did not come up")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@needs_postgres
def test_sweep_on_mlflow_server_and_postgres_keeps_secrets(tmp_path: Path, mlflow_server: str) -> None:
    import optuna
    from mlflow import MlflowClient

    optuna_url = create_database(os.environ["LORA_SWEEP_TEST_PG"])
    password = optuna_url.split(":")[2].split("@")[0]
    body = MINIMAL + f"tracking: {{mlflow_uri: '{mlflow_server}', optuna_storage: '{optuna_url}', results_dir: {tmp_path / 'out'}, experiment: shared}}\n"
    space = write_space(tmp_path, body)
    env = {**os.environ, "HF_TOKEN": FAKE_TOKEN, "AWS_SECRET_ACCESS_KEY": FAKE_AWS, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "sweep", "run", str(space)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the local Ray's session folder (logs, runtime envs), named after the driver that started it
    (ray_session,) = Path(os.environ.get("RAY_TMPDIR", "/tmp"), "ray").glob(f"session_*_{proc.pid}")

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    statuses = {r.data.tags["trial"]: r.data.tags["trial_status"] for r in children}
    assert len(children) == 2 and set(statuses.values()) <= {"completed", "pruned"}
    assert all(r.data.metrics["eval_loss"] > 0 for r in children)
    (sweep_dir,) = (tmp_path / "out").glob("t-*")
    study = optuna.load_study(study_name=json.loads((sweep_dir / "sweep.json").read_text())["study_name"], storage=optuna_url)
    # the trials that ran (a proposal repeating one is closed as a duplicate, with no child run)
    ran = {f"t{t.number:03d}": t.state.name for t in study.trials if t.user_attrs.get("trial_status") != "duplicate"}
    assert ran == {label: {"completed": "COMPLETE", "pruned": "PRUNED"}[status] for label, status in statuses.items()}, (ran, statuses)
    assert not (sweep_dir / "optuna.db").exists()

    # the secrets: nowhere in what the sweep printed, wrote, or logged to MLflow, nor in what its Ray wrote
    for secret in (password, FAKE_TOKEN, FAKE_AWS):
        assert secret not in result.stdout and secret not in result.stderr
        for path in [*sweep_dir.rglob("*"), *ray_session.rglob("*")]:
            if path.is_file() and not path.is_socket():
                assert secret.encode() not in path.read_bytes(), path
        for run in runs:
            texts = list(run.data.params.values()) + list(run.data.tags.values())
            assert not any(secret in t for t in texts), run.info.run_name
        artifact = client.download_artifacts(parent.info.run_id, "space.yaml", str(tmp_path / "dl"))
        assert secret not in Path(artifact).read_text()
    assert "***@127.0.0.1" in (sweep_dir / "space.yaml").read_text()

    # status and resume find the study through the original space file (which has the password)
    status = subprocess.run([sys.executable, "-m", "sweep", "status", str(sweep_dir)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "2 of 2 done;" in status.stdout, status.stdout + status.stderr


@needs_postgres
def test_sweeps_of_one_name_on_one_store_keep_their_own_trials(tmp_path: Path, mlflow_server: str) -> None:
    """Three sweeps named `t` on one PostgreSQL study store and one MLflow server: the first alone,
    then two at once (separate results folders, as on two machines, started the same second). Each
    has a study of its own and a parent run of its own, holding its own two trials only, and its
    `status` counts them alone. (They shared the study `t`: the second failed, or took the first's
    queued start-up points and trials.)"""
    import optuna
    from mlflow import MlflowClient

    optuna_url = create_database(os.environ["LORA_SWEEP_TEST_PG"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    def start(n: int) -> tuple[subprocess.Popen, Path]:
        results = tmp_path / f"machine{n}"
        body = MINIMAL + f"tracking: {{mlflow_uri: '{mlflow_server}', optuna_storage: '{optuna_url}', results_dir: {results}, experiment: shared}}\n"
        space = write_space(tmp_path, body, f"space{n}.yaml")
        log = open(tmp_path / f"sweep{n}.log", "w")
        return subprocess.Popen([sys.executable, "-m", "sweep", "run", str(space)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), results

    def finished(proc: subprocess.Popen, results: Path, n: int) -> Path:
        assert proc.wait(timeout=600) == 0, (tmp_path / f"sweep{n}.log").read_text()[-3000:]
        (folder,) = results.glob("t-*")
        return folder

    folders = [finished(*start(0), 0)]
    at_once = [start(1), start(2)]
    folders += [finished(proc, results, n) for n, (proc, results) in enumerate(at_once, 1)]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("shared").experiment_id
    metas = [json.loads((folder / "sweep.json").read_text()) for folder in folders]
    assert len({m["study_name"] for m in metas}) == 3 and len({m["parent_run_id"] for m in metas}) == 3, metas
    assert sorted(optuna.get_all_study_names(optuna_url)) == sorted(m["study_name"] for m in metas)  # one study per sweep, no other
    for folder, meta in zip(folders, metas):
        study = optuna.load_study(study_name=meta["study_name"], storage=optuna_url)
        ran = sorted(f"t{t.number:03d}" for t in study.trials if t.user_attrs.get("trial_status") != "duplicate")
        assert len(ran) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials if f"t{t.number:03d}" in ran), (folder.name, ran)
        children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{meta['parent_run_id']}'")
        assert sorted(r.data.tags["trial"] for r in children) == ran, folder.name  # its own trials' runs, and no other sweep's
        status = subprocess.run([sys.executable, "-m", "sweep", "status", str(folder)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert status.returncode == 0 and "2 of 2 done;" in status.stdout, status.stdout + status.stderr
    assert len(client.search_runs([experiment])) == 3 + 6  # three parents, two children each


def test_a_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """Every port the local Ray's processes listen on (GCS, raylet, object manager, agents, workers)."""
    code = (
        "import os, psutil; from sweep.engine.sweep import connect_ray, shutdown_ray; from sweep.engine.reaper import ray_processes; "
        "connect_ray(None, print); import ray; print('GCS', ray.get_runtime_context().gcs_address); "
        "pids = set(ray_processes(os.getpid())); "
        "print('LISTEN', *sorted({c.laddr.ip for c in psutil.net_connections('inet') if c.status == 'LISTEN' and c.pid in pids})); shutdown_ray()"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "GCS 127.0.0.1:" in out.stdout, out.stdout + out.stderr
    listening = out.stdout.split("LISTEN", 1)[1].splitlines()[0].split()
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


@needs_postgres
def test_estimate_and_warm_start_read_a_store_whose_url_holds_a_password_variable(tmp_path: Path, mlflow_server: str) -> None:
    """The space file says `${PGPASSWORD}`, sweep.json keeps it so: what reads a finished sweep back
    (`estimate SWEEP_DIR`, `search.warm_start`) connects with the variable's value, never the text."""
    base = os.environ["LORA_SWEEP_TEST_PG"]
    password = base.split(":")[2].split("@")[0]
    env = {**os.environ, "PGPASSWORD": password, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

    def sweep(name: str, search: str) -> tuple[subprocess.CompletedProcess, Path]:
        url = create_database(base).replace(f":{password}@", ":${PGPASSWORD}@")
        body = MINIMAL.replace("search: {num_trials: 2}", search) + (
            f"tracking: {{mlflow_uri: '{mlflow_server}', optuna_storage: '{url}', results_dir: {tmp_path / name}, experiment: {name}}}\n"
        )
        space = write_space(tmp_path, body, f"{name}.yaml")
        result = subprocess.run([sys.executable, "-m", "sweep", "run", str(space)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (folder,) = (tmp_path / name).glob("t-*")
        return result, folder

    _, first = sweep("first", "search: {num_trials: 2, scheduler: {type: none}}")
    recorded = json.loads((first / "sweep.json").read_text())["optuna_storage"]
    assert "${PGPASSWORD}" in recorded and password not in recorded

    estimate = subprocess.run([sys.executable, "-m", "sweep", "estimate", str(first), "--gpu-memory", "80"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert estimate.returncode == 0, estimate.stdout[-3000:] + estimate.stderr[-3000:]
    assert estimate.stdout.splitlines()[0].startswith(f"{first.name}: 2 trials"), estimate.stdout

    second, _ = sweep("second", f"search: {{num_trials: 1, warm_start: {first}, warm_start_top: 1, scheduler: {{type: none}}}}")
    assert f"warm start from {first.name}: 2 finished trials carried over" in second.stdout, second.stdout[-3000:]
