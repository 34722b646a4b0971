"""The compose stack for real, where a Docker engine runs: docker/build.sh builds the CPU and GPU
images (and, without a registry, the stand-in base and PostgreSQL images), the stack comes up on
loopback (PostgreSQL, the MLflow server with basic-auth, a Ray head, one CPU worker standing in
for the GPU worker), a tiny sweep goes in with `python -m sweep submit --address`, and the stores
hold its trials. Its worker trains two trials at a time on one base model. Then the faults: the
worker container killed during its trials (both are retried from their checkpoints once the worker
is back), the MLflow container restarted mid-sweep (no run lost, none twice), `down` + `up` (the
named volumes keep every finished trial).

One long test, marked `docker` and `e2e` (`pytest -m docker`): on 2 cores about 7.5 min with
the images cached, 12-13 with a cold build of both images, a few more the first time on a
machine (the stand-in base, the wheelhouse download). It skips, saying why, where no Docker engine answers or
no image can be built here. .ci/run installs Debian's docker.io and starts `dockerd` first."""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from base64 import b64encode
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.conftest import DEMO_DATA, ROOT
from tests.e2e.conftest import mlflow_runs
from tests.e2e.test_cluster import free_port

pytestmark = [pytest.mark.docker, pytest.mark.e2e]

DOCKER = ROOT / "docker"
SERVICES = ["postgres", "mlflow", "ray-head", "ray-worker-cpu"]
NAME = "dock"
SPACE = f"""\
name: {NAME}
model: {{id: tiny-gemma3}}
data: {{train: data/train.jsonl, eval: data/eval.jsonl, max_seq_len: 128}}
train: {{max_steps: 300, eval_every: 20, log_every: 10, batch: [2, 1]}}
search: {{num_trials: 3, max_concurrent: 2, seed: 0, scheduler: {{type: none}}, max_retries: 2}}
space:
  lora_r: [4, 8]
  learning_rate: {{loguniform: [1.0e-3, 2.0e-2]}}
tracking:
  mlflow_uri: http://mlflow:5000
  optuna_storage: postgresql://sweep@postgres:5432/optuna
  results_dir: /shared/sweeps
"""


def step(message: str) -> None:
    """A step of the story, on the terminal as it happens (pytest -s) and in the report."""
    print(f"[docker e2e {time.strftime('%H:%M:%S')}] {message}", file=sys.__stderr__, flush=True)


def run(*args: str, timeout: float = 600, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def docker_or_skip() -> tuple[list[str], list[str]]:
    """(docker, compose) command prefixes, or skip saying why not."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI (.ci/run installs Debian's docker.io and starts dockerd)")
    info = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers (docker info: {(info.stderr or info.stdout).strip()[:300]}); .ci/run starts dockerd where it can")
    if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60).returncode == 0:
        compose = [docker, "compose"]
    elif shutil.which("docker-compose"):
        compose = [shutil.which("docker-compose")]
    else:
        pytest.skip("neither the Compose plugin nor docker-compose is installed")
    registry = subprocess.run([docker, "image", "inspect", "python:3.11.17-slim-bookworm"], capture_output=True).returncode == 0
    if not registry and not (shutil.which("debootstrap") and os.geteuid() == 0):
        registry = subprocess.run(["timeout", "120", docker, "pull", "-q", "python:3.11.17-slim-bookworm"], capture_output=True).returncode == 0
        if not registry:
            pytest.skip("no registry reachable for python:3.11.17-slim-bookworm and no stand-in base can be made (docker/local-base.sh needs root and debootstrap)")
    return [docker], compose


PROJECT_PREFIX = "lora-sweep-e2e-"


def remove_stale_projects(docker: list[str]) -> list[str]:
    """Remove the containers, volumes and networks of earlier runs of this test whose pytest is gone
    (killed before its `down -v`): with the vfs storage driver a stopped container pins its image, a
    full copy of it, and such leftovers filled CI's disk once. Returns the projects removed."""
    def listed(kind: list[str], field: str) -> list[tuple[str, str]]:
        out = run(*docker, *kind, "--filter", "label=com.docker.compose.project",
                  "--format", f'{{{{.{field}}}}} {{{{.Label "com.docker.compose.project"}}}}', check=False).stdout
        return [tuple(line.split(" ", 1)) for line in out.splitlines() if " " in line]  # type: ignore[misc]

    def stale(project: str) -> bool:
        pid = project.removeprefix(PROJECT_PREFIX)
        return project.startswith(PROJECT_PREFIX) and pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists()

    containers = [(c, p) for c, p in listed(["ps", "-a"], "ID") if stale(p)]
    volumes = [(v, p) for v, p in listed(["volume", "ls"], "Name") if stale(p)]
    networks = [(n, p) for n, p in listed(["network", "ls"], "Name") if stale(p)]
    if containers:
        run(*docker, "rm", "-f", "-v", *[c for c, _ in containers], check=False)
    if volumes:
        run(*docker, "volume", "rm", "-f", *[v for v, _ in volumes], check=False)
    if networks:
        run(*docker, "network", "rm", *[n for n, _ in networks], check=False)
    return sorted({p for _, p in containers + volumes + networks})


def engine_nofile(docker: list[str]) -> int:
    """The open-files hard limit containers may get: that of dockerd (here, the test's own)."""
    pid = subprocess.run(["pgrep", "-xo", "dockerd"], capture_output=True, text=True).stdout.strip()
    try:
        line = next(l for l in Path(f"/proc/{pid}/limits").read_text().splitlines() if l.startswith("Max open files"))
        return int(line.split()[4])
    except (StopIteration, OSError, ValueError, IndexError):
        return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def wait(what: str, condition: Callable[[], Any], timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def http_status(url: str, auth: tuple[str, str] | None = None, bearer: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    if bearer:
        request.add_header("Authorization", f"Bearer {bearer}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


def ray_job(address: str, token: str, submission: str, what: str = "") -> dict:
    """Ray's job REST API (GET /api/jobs/ID[/logs]) with the token, over plain HTTP: Ray's own
    client would load token auth into this process (it keeps the first token it reads), and every
    local ray.init of the tests after this one would then fail with InvalidAuthToken."""
    request = urllib.request.Request(f"{address}/api/jobs/{submission}{what}")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read().decode())


@pytest.mark.timeout(3600)
def test_compose_stack_runs_a_sweep_through_worker_kill_mlflow_restart_and_down_up(tmp_path: Path) -> None:
    docker, compose_cmd = docker_or_skip()
    t_start = time.monotonic()
    stale = remove_stale_projects(docker)
    if stale:
        step(f"removed what earlier, killed runs of this test left: {', '.join(stale)}")

    # ---- 1. build ---------------------------------------------------------------------------
    # the GPU image too (it cannot run here, but it must build; LORA_SWEEP_DOCKER_GPU=0 skips it)
    targets = ["cpu", "gpu", "postgres"] if os.environ.get("LORA_SWEEP_DOCKER_GPU", "1") != "0" else ["cpu", "postgres"]
    step(f"building the images: docker/build.sh {' '.join(targets)}")
    t0 = time.monotonic()
    built = run(str(DOCKER / "build.sh"), *targets, timeout=2400)
    step(f"build: {time.monotonic() - t0:.0f}s\n{built.stdout.strip()}")
    images = dict(re.findall(r"^(BASE_IMAGE|POSTGRES_IMAGE)=(\S+)$", built.stdout, re.MULTILINE))
    assert images.keys() == {"BASE_IMAGE", "POSTGRES_IMAGE"}, built.stdout

    # ---- 2. the stack on loopback -----------------------------------------------------------
    project = f"{PROJECT_PREFIX}{os.getpid()}"
    pg_port, mlflow_port, ray_port = free_port(), free_port(), free_port()
    secrets_ = {k: secrets.token_hex(16) for k in ("POSTGRES_PASSWORD", "SWEEP_DB_PASSWORD", "RAY_AUTH_TOKEN", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY")}
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {
        **secrets_, **images, "COMPOSE_PROJECT_NAME": project, "BIND_ADDRESS": "127.0.0.1", "POSTGRES_PORT": pg_port,
        "MLFLOW_PORT": mlflow_port, "RAY_DASHBOARD_PORT": ray_port, "RAY_HEAD_SHM_SIZE": "1gb", "RAY_WORKER_CPU_SHM_SIZE": "1gb",
        "RAY_NOFILE": min(65536, engine_nofile(docker))}.items()))  # fmt: skip
    env_file.chmod(0o600)
    compose = [*compose_cmd, "-p", project, "-f", str(DOCKER / "compose.yaml"), "--env-file", str(env_file)]
    mlflow_url, address = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{ray_port}"
    admin = ("admin", secrets_["MLFLOW_ADMIN_PASSWORD"])
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets_["RAY_AUTH_TOKEN"], "MLFLOW_TRACKING_USERNAME": admin[0],
                  "MLFLOW_TRACKING_PASSWORD": admin[1], "RAY_USAGE_STATS_ENABLED": "0"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in client_env}
    os.environ.update(client_env)

    def container(service: str) -> str:
        return run(*compose, "ps", "-q", service).stdout.strip()

    def healthy(service: str) -> bool:
        cid = container(service)
        return bool(cid) and run(*docker, "inspect", "-f", "{{.State.Health.Status}}", cid, check=False).stdout.strip() == "healthy"

    def up() -> None:
        t0 = time.monotonic()
        run(*compose, "up", "-d", "--no-build", *SERVICES, timeout=900)
        wait("every service healthy", lambda: all(healthy(s) for s in SERVICES), 600, every=5)
        step(f"compose up: all of {SERVICES} healthy in {time.monotonic() - t0:.0f}s")

    try:
        step(f"compose up (project {project}): PostgreSQL {images['POSTGRES_IMAGE']}, MLflow :{mlflow_port}, Ray head :{ray_port}, a CPU worker")
        up()
        python = run(*docker, "exec", container("ray-head"), "python", "-c", "import platform, torch, ray, sweep; print(platform.python_version(), torch.__version__, ray.__version__)").stdout
        step(f"ray-head: Python, torch, Ray {python.strip()}")
        ports = run(*docker, "ps", "--filter", f"label=com.docker.compose.project={project}", "--format", "{{.Ports}}").stdout
        published = re.findall(r"([\d.:\[\]]+):\d+->", ports)
        assert published and all(a.startswith("127.0.0.1") for a in published), ports

        # ---- 3. who may reach what ----------------------------------------------------------
        search = f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(f"{mlflow_url}/health") == 200
        assert http_status(search) == 401, "the MLflow server answered a request without credentials"
        assert http_status(search, ("admin", "wrong")) == 401
        assert http_status(search, admin) == 200
        # Ray's job API (raw HTTP: Ray's client keeps the first token it read for the process)
        assert http_status(f"{address}/api/jobs/") in (401, 403), "Ray's job API answered without a token"
        assert http_status(f"{address}/api/jobs/", bearer="not-the-token") in (401, 403)
        assert http_status(f"{address}/api/jobs/", bearer=secrets_["RAY_AUTH_TOKEN"]) == 200

        step("MLflow refuses requests without (or with wrong) credentials, accepts admin's; Ray's job API refuses no token and a wrong one")

        # ---- 4. submit ------------------------------------------------------------------------
        folder = tmp_path / "project"
        (folder / "data").mkdir(parents=True)
        for name in ("train.jsonl", "eval.jsonl"):
            shutil.copy(DEMO_DATA / name, folder / "data" / name)
        (folder / "space.yaml").write_text(SPACE)
        sent = subprocess.run([sys.executable, "-m", "sweep", "submit", "space.yaml", "--address", address], cwd=folder,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        submission = re.search(r"submitted (\S+) to", sent.stdout).group(1)
        step(f"submitted {submission}: python -m sweep submit space.yaml --address {address}")
        token = secrets_["RAY_AUTH_TOKEN"]

        def logs() -> str:
            return ray_job(address, token, submission, "/logs").get("logs", "")

        def job_status() -> str:
            return str(ray_job(address, token, submission).get("status", "?"))

        job_log = tmp_path / "job.log"

        def running_log(pattern: str, timeout: float = 900, accept: Callable[[re.Match], bool] = lambda m: True) -> re.Match:
            def found() -> re.Match | None:
                status = job_status()
                text = logs()
                job_log.write_text(text)
                match = next((m for m in re.finditer(pattern, text) if accept(m)), None)
                sweep_lines = "\n".join(line for line in text.splitlines() if re.search(r"\bt00\d\b|Error|error", line))
                assert status in ("PENDING", "RUNNING") or match, f"job {status} before {pattern!r} (whole log: {job_log}):\n{sweep_lines[-6000:]}"
                return match
            return wait(f"{pattern!r} in the job's log", found, timeout, every=1.0)

        # ---- 5. fault: the worker container killed during a trial ----------------------------
        running_log(r"t000 step\s+(\d+)/300", accept=lambda m: 40 <= int(m.group(1)) <= 240)
        worker = container("ray-worker-cpu")
        run(*docker, "kill", worker)
        step(f"docker kill {worker[:12]} (ray-worker-cpu) during t000")
        time.sleep(5)
        if run(*docker, "inspect", "-f", "{{.State.Running}}", worker).stdout.strip() != "true":
            run(*docker, "start", worker)
            step("worker container started again (docker start: `docker kill` counts as a manual stop for restart: unless-stopped)")
        retried = running_log(r"t000 retrying  its worker died; attempt 2 continues from (its checkpoint at step-0*(\d+)|the start)", timeout=600)
        assert retried.group(2), f"t000 was retried from {retried.group(1)}, not from its checkpoint"
        step(f"t000 retried from its checkpoint at step {retried.group(2)} once the worker was back (with the other trial its worker held)")

        # ---- 6. fault: the MLflow container restarted mid-sweep ------------------------------
        running_log(r"t001 step\s+\d+/300")
        run(*docker, "restart", container("mlflow"), timeout=120)
        step("docker restart mlflow during t001")
        wait("the MLflow server healthy again", lambda: healthy("mlflow"), 300, every=3)

        status = wait("the sweep's job to end", lambda: (s := job_status()) not in ("PENDING", "RUNNING") and s, 1500, every=5)
        job_log.write_text(logs())
        assert status == "SUCCEEDED", f"job {status} (whole log: {job_log}):\n{logs()[-5000:]}"
        step(f"the sweep's job {status}")

        # ---- 7. the stores hold the trials ----------------------------------------------------
        import optuna

        storage = f"postgresql+psycopg://sweep:{secrets_['SWEEP_DB_PASSWORD']}@127.0.0.1:{pg_port}/optuna"

        def stored() -> tuple[dict[str, str], list[tuple[int, str]]]:
            _, children = mlflow_runs(mlflow_url, NAME)
            trials = sorted(r.data.tags["trial"] for r in children)
            assert len(trials) == len(set(trials)) == 3, f"MLflow child runs {trials}: one per trial, none twice"
            assert {r.data.tags.get("trial_status") for r in children} == {"completed"}, [r.data.tags for r in children]
            assert {r.info.status for r in children} == {"FINISHED"}
            (name,) = [n for n in optuna.get_all_study_names(storage) if n.startswith(f"{NAME}-")]  # the sweep's own study: NAME-<time>-<id>
            study = optuna.load_study(study_name=name, storage=storage)
            states = [(t.number, t.state.name) for t in study.trials]
            assert [s for _, s in states].count("COMPLETE") == 3, states
            return {r.data.tags["trial"]: r.info.run_id for r in children} | {"retries t000": next(r.data.tags.get("retries") for r in children if r.data.tags["trial"] == "t000")}, states

        before, states = stored()
        assert before["retries t000"] == "1", before
        step(f"MLflow (through basic-auth) holds 3 finished child runs, t000 with retries=1; its Optuna study in PostgreSQL: {states}")

        # ---- 8. down + up keeps every finished trial -------------------------------------------
        t0 = time.monotonic()
        run(*compose, "down", timeout=300)
        assert not container("mlflow")
        step(f"compose down in {time.monotonic() - t0:.0f}s (volumes kept)")
        up()
        after, states_after = stored()
        assert after == before and states_after == states, (before, after, states, states_after)
        step("after down + up: the same MLflow runs (same ids) and the same Optuna trials")
        step(f"whole story in {time.monotonic() - t_start:.0f}s")
    except BaseException:
        for service in SERVICES:
            cid = container(service) if run(*compose, "ps", "-q", check=False).returncode == 0 else ""
            if cid:
                step(f"--- logs of {service} ---\n{run(*docker, 'logs', '--tail', '60', cid, check=False).stdout[-4000:]}"
                     f"{run(*docker, 'logs', '--tail', '60', cid, check=False).stderr[-4000:]}")
        raise
    finally:
        run(*compose, "down", "-v", "--remove-orphans", timeout=300, check=False)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
