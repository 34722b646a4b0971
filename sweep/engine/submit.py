"""Submitted sweeps: `python -m sweep submit space.yaml --address http://HEAD:8265` sends the sweep to
a Ray cluster as a Ray job, so it runs on without the machine that submitted it. `status`, `stop`
and `resume` take the submission id (or the sweep folder's path on the cluster) with the same
`--address`.

What travels with the job: the space file and the local files it names (data, a local model or
chat-template folder), in the job's working directory. The job's first act copies them next to the
results, `RESULTS_DIR/.submitted/ID/`, so that the sweep folder's record of its space file stays
valid for `resume` after the job's working directory is gone. The sweep folder is `RESULTS_DIR/ID`,
decided here, so every later command finds it. Secrets are never sent: write `${VAR}` in the
space file and set the variables on the cluster's nodes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from sweep.config import TINY_MODELS, ConfigError, SweepConfig, yaml_scalar

Write = Callable[[str], None]
UPLOAD_LIMIT = 400 * 2**20  # Ray refuses working directories near 512 MiB; stay well below
SOURCES = ("model.id", "model.chat_template_from", "data.train", "data.eval")
ACTIVE = ("PENDING", "RUNNING")
RAY_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+INFO job_manager|Running entrypoint for job )")
HELPER_TIMEOUT = 900  # seconds a status/stop helper job may take


def _state(status: Any) -> str:
    """A Ray JobStatus as its bare name (RUNNING, SUCCEEDED, ...)."""
    return str(status).split(".")[-1]


def _free_id(taken: set[str], candidates: Any) -> str:
    """The first candidate submission id not used on the cluster yet."""
    return next(c for c in candidates if c not in taken)


def is_job_address(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    from ray.exceptions import AuthenticationError

    from sweep.folder.checks import reachable

    unreachable = reachable(address)  # seconds, not the HTTP client's long retries
    if unreachable:
        raise ConfigError(address, unreachable)
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise ConfigError(address, [f"--address {address}: the cluster wants its auth token (Ray's token authentication); copy the head node's "
                                    "~/.ray/auth_token here, or set RAY_AUTH_TOKEN, and set RAY_AUTH_MODE=token"]) from None  # fmt: skip
    except Exception as exc:  # connection refused, not a Ray dashboard, ...
        raise ConfigError(address, [f"--address {address}: no Ray job server answers there ({str(exc).splitlines()[0][:200]}); "
                                    "give the dashboard URL of the head node, e.g. http://HEAD:8265"]) from None  # fmt: skip


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _value(cfg: SweepConfig, key: str) -> str | None:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def stage(cfg: SweepConfig, folder: Path, dest: Path) -> list[str]:
    """Copy the space file and the local sources it names into `folder`; the overrides that point
    the job at the copies once `folder` is copied to `dest` (absolute: the job's run resolves a
    relative override against its temporary working folder). Refuses (ConfigError) what is too
    large to travel."""
    shutil.copy2(cfg.source, folder / "space.yaml")
    overrides, problems, total = [], [], 0
    for i, key in enumerate(SOURCES):
        value = _value(cfg, key)
        if not value or value in TINY_MODELS or not Path(value).is_absolute() or not Path(value).exists():
            continue  # a hub id (or a tiny test model): the cluster resolves it itself
        source = Path(value)
        size = _size(source)
        total += size
        if total > UPLOAD_LIMIT:
            problems.append(f"{key}: {source} ({size / 2**20:.0f} MiB) makes the upload {total / 2**20:.0f} MiB, over {UPLOAD_LIMIT // 2**20} MiB; "
                            "put it on the cluster's shared filesystem and give that path, or use a hub id")  # fmt: skip
            continue
        target = Path("inputs") / f"{i}-{source.name}"
        (folder / "inputs").mkdir(exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, folder / target)
        overrides.append(f"{key}={yaml_scalar(str(dest / target))}")
    if problems:
        raise ConfigError(str(cfg.source), problems)
    return overrides


def _check_results_dir(cfg: SweepConfig) -> None:
    """The sweep folder must be on the cluster's shared filesystem, named as the cluster sees it:
    the default (./sweeps) or a relative path would land in the job's temporary folder."""
    given = cfg.results_dir_given
    if not given:
        raise ConfigError(str(cfg.source), ["tracking.results_dir: required to submit; give a folder on the cluster's shared filesystem, "
                                            "e.g. tracking.results_dir=/shared/sweeps (the default, ./sweeps, would be inside the job's temporary folder)"])  # fmt: skip
    if not Path(given).expanduser().is_absolute():
        raise ConfigError(str(cfg.source), [f"tracking.results_dir: {given!r} is relative; to submit give an absolute folder on the cluster's shared "
                                            "filesystem, e.g. tracking.results_dir=/shared/sweeps (a relative one would be inside the job's temporary folder)"])  # fmt: skip


def submit(cfg: SweepConfig, address: str, write: Write = print) -> str:
    """Send the sweep as a Ray job; its submission id (also the sweep folder's name)."""
    _check_results_dir(cfg)
    jobs = client(address)
    results = Path(cfg.tracking.results_dir or "")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    taken = {j.submission_id for j in jobs.list_jobs()}
    submission = _free_id(taken, (f"{cfg.name}-{stamp}" + (f"-{n}" if n > 1 else "") for n in range(1, 1000)))
    sweep_dir, inputs = results / submission, results / ".submitted" / submission
    with tempfile.TemporaryDirectory(prefix="lora-sweep-submit-") as tmp:
        overrides = stage(cfg, Path(tmp), inputs)
        run = ["python", "-m", "sweep", "run", str(inputs / "space.yaml"), *cfg.overrides, *overrides, f"tracking.results_dir={yaml_scalar(str(results))}", "--sweep-dir", str(sweep_dir)]
        entrypoint = f"mkdir -p {shlex.quote(str(inputs))} && cp -R . {shlex.quote(str(inputs))}/ && exec {shlex.join(run)}"
        jobs.submit_job(entrypoint=entrypoint, submission_id=submission, runtime_env={"working_dir": tmp},
                        metadata={"lora_sweep": "run", "sweep_dir": str(sweep_dir), "name": cfg.name})  # fmt: skip
    write(f"submitted {submission} to {address}")
    write(f"sweep folder (on the cluster): {sweep_dir}")
    flag = f"--address {shlex.quote(address)}"
    write(f"follow it:  python -m sweep status {submission} {flag}   |   logs: ray job logs {submission} {flag} --follow")
    write(f"stop it:    python -m sweep stop {submission} {flag}      |   continue: python -m sweep resume {submission} {flag}")
    return submission


def sweep_dir_of(jobs: Any, target: str) -> tuple[str, list[Any]]:
    """(the sweep folder on the cluster, the jobs that drove it, oldest first) for a submission id
    or a sweep folder path."""
    mine = [j for j in jobs.list_jobs() if (j.metadata or {}).get("lora_sweep")]
    by_id = {j.submission_id: j for j in mine}
    if target in by_id:
        folder = by_id[target].metadata["sweep_dir"]
    elif target.startswith("/"):
        folder = target.rstrip("/")
    else:
        known = ", ".join(sorted(j.submission_id for j in mine if j.metadata.get("lora_sweep") == "run")[-5:]) or "none"
        raise ConfigError(target, [f"{target}: no submitted sweep of that id on this cluster (recent: {known}); give a submission id or the sweep folder's path on the cluster"])
    drivers = sorted((j for j in mine if j.metadata.get("sweep_dir") == folder and j.metadata.get("lora_sweep") in ("run", "resume")), key=lambda j: j.start_time or 0)
    return folder, drivers


def _helper(jobs: Any, args: list[str], write: Write) -> bool:
    """Run `python -m sweep ARGS` on the cluster (where the sweep folder is) and print its output."""
    helper = jobs.submit_job(entrypoint=shlex.join(["python", "-m", "sweep", *args]), metadata={"lora_sweep": "helper"})
    deadline = time.monotonic() + HELPER_TIMEOUT
    while (status := _state(jobs.get_job_status(helper))) in ACTIVE and time.monotonic() < deadline:
        time.sleep(0.5)
    for line in jobs.get_job_logs(helper).splitlines():
        if not RAY_LINE.match(line):  # Ray's own lines about setting the job up
            write(line)
    return status == "SUCCEEDED"


def _job_line(job: Any) -> str:
    started = datetime.fromtimestamp(job.start_time / 1000).isoformat(timespec="seconds") if job.start_time else "?"
    return f"job {job.submission_id} ({job.metadata.get('lora_sweep')}): {_state(job.status)}, started {started}"


def remote_status(address: str, target: str, write: Write = print) -> bool:
    jobs = client(address)
    folder, drivers = sweep_dir_of(jobs, target)
    for job in drivers:
        write(_job_line(job))
    if Path(folder, "sweep.json").is_file():  # the shared filesystem is mounted here too
        from sweep.readback.status import sweep_status

        sweep_status(Path(folder), write)
        return True
    return _helper(jobs, ["status", folder], write)


def remote_stop(address: str, target: str, wait: float, write: Write = print) -> bool:
    """The stop file, written on the cluster: trials checkpoint and end, then the driver job ends."""
    jobs = client(address)
    folder, drivers = sweep_dir_of(jobs, target)
    if not any(_state(j.status) in ACTIVE for j in drivers):
        write(f"{Path(folder).name}: no job is driving it (" + ("; ".join(_job_line(j) for j in drivers) or "none found") + ")")
    ok = _helper(jobs, ["stop", folder, "--wait", str(wait)], write)
    deadline = time.monotonic() + 60
    while any(_state(jobs.get_job_status(j.submission_id)) in ACTIVE for j in drivers) and time.monotonic() < deadline:
        time.sleep(0.5)
    return ok


def remote_resume(address: str, target: str, write: Write = print) -> str:
    """A new driver job for the sweep: `python -m sweep resume FOLDER` on the cluster."""
    jobs = client(address)
    folder, drivers = sweep_dir_of(jobs, target)
    active = [j for j in drivers if _state(j.status) in ACTIVE]
    if active:
        raise ConfigError(target, [f"{Path(folder).name}: job {active[0].submission_id} is still driving it; stop it first (python -m sweep stop {shlex.quote(target)} --address {shlex.quote(address)})"])
    taken = {j.submission_id for j in jobs.list_jobs()}
    base = Path(folder).name
    submission = _free_id(taken, (f"{base}-resume-{n}" for n in range(1, 10_000)))
    jobs.submit_job(entrypoint=shlex.join(["python", "-m", "sweep", "resume", folder]), submission_id=submission,
                    metadata={"lora_sweep": "resume", "sweep_dir": folder})  # fmt: skip
    write(f"submitted {submission}: resumes {folder}")
    write(f"follow it:  python -m sweep status {shlex.quote(base)} --address {shlex.quote(address)}")
    return submission
