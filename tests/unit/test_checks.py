"""Checks before anything starts (writable folders, a reachable cluster, a new --sweep-dir), and
commands on a sweep whose stores are gone or damaged: a clear error, nothing created or changed.

Unwritable folders are made in ways that hold for root too (the tests may run as root, for whom
chmod stops nothing): a path below a regular file, sysfs (no user may create files there), and an
OS refusal simulated at the one call that probes."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from sweep.folder import checks
from sweep.folder.checks import (
    CLIENT_METHOD,
    CONNECT_TIMEOUT_S,
    GCS_METHOD,
    before_start,
    check_stores,
    host_port,
    ray_address_problems,
    reachable,
    writable,
)
from sweep.config import ConfigError, load_config
from tests.conftest import MINIMAL, write_space


def test_a_results_folder_below_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (problem,) = writable(tmp_path / "afile" / "sweeps", "tracking.results_dir")
    assert problem == f"tracking.results_dir: {tmp_path}/afile/sweeps cannot be a folder: {tmp_path}/afile is a file; choose another path"


def test_a_folder_the_os_refuses_to_write_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    (problem,) = writable(tmp_path / "new" / "sweeps", "tracking.results_dir")
    assert problem.startswith(f"tracking.results_dir: cannot create {tmp_path}/new/sweeps in {tmp_path} (Permission denied)")
    (problem,) = writable(tmp_path, "tracking.results_dir")
    assert problem.startswith(f"tracking.results_dir: cannot write in {tmp_path} (Permission denied)")


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_sysfs_is_unwritable_even_for_root() -> None:
    (problem,) = writable(Path("/sys/lora-sweep/sweeps"), "tracking.results_dir")
    assert "cannot create /sys/lora-sweep/sweeps in /sys" in problem


def test_writable_leaves_nothing_behind(tmp_path: Path) -> None:
    assert writable(tmp_path / "a" / "b", "k") == [] and list(tmp_path.iterdir()) == []


def test_an_existing_sweep_dir_is_refused_before_anything_starts(tmp_path: Path) -> None:
    cfg = load_config(write_space(tmp_path, MINIMAL + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    taken = tmp_path / "my sweep"
    taken.mkdir()
    with pytest.raises(ConfigError) as info:
        before_start(cfg, None, taken)
    assert info.value.problems == [f"--sweep-dir {taken}: exists already; a new sweep needs a new folder (resume is `python -m sweep resume '{taken}'`)"]
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_address_where_nothing_listens_fails_at_once() -> None:
    port = free_port()
    (problem,) = reachable(f"127.0.0.1:{port}")
    assert problem.startswith(f"--address 127.0.0.1:{port}: cannot reach 127.0.0.1:{port} (Connection refused")
    assert "ray start --head" in problem
    (problem,) = reachable(f"http://127.0.0.1:{port}")
    assert "dashboard" in problem


@contextlib.contextmanager
def fake_ray(method: str) -> Iterator[int]:
    """A gRPC server on loopback that answers `method` (and nothing else), as a Ray GCS answers its own."""
    from concurrent import futures

    import grpc

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            return grpc.unary_unary_rpc_method_handler(lambda request, context: b"") if details.method == method else None

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Handler()])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def test_a_ray_gcs_or_client_server_passes_and_other_grpc_services_do_not() -> None:
    with fake_ray(GCS_METHOD) as port:
        assert reachable(f"127.0.0.1:{port}") == [] and ray_address_problems(f"127.0.0.1:{port}") == []
        (problem,) = reachable(f"ray://127.0.0.1:{port}")  # a GCS is no Ray client server
        assert "answers gRPC without Ray's methods" in problem and "not a Ray client server (ray://HEAD:10001)" in problem
    with fake_ray(CLIENT_METHOD) as port:
        assert reachable(f"ray://127.0.0.1:{port}") == []
    assert reachable(None) == [] and reachable("auto") == [] and reachable("local") == []


def test_the_methods_asked_are_this_rays() -> None:
    """A Ray upgrade that renames them fails here, not every --address of the users."""
    import importlib.util

    generated = Path(importlib.util.find_spec("ray").submodule_search_locations[0]) / "core" / "generated"
    assert f"'{GCS_METHOD}'" in (generated / "gcs_service_pb2_grpc.py").read_text()
    assert f"'{CLIENT_METHOD}'" in (generated / "ray_client_pb2_grpc.py").read_text()


def test_a_port_that_accepts_and_never_answers_or_answers_http_fails_in_seconds() -> None:
    """ray.init hung for good on the first and took 26 s on the second (a proxy), then failed."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        (problem,) = ray_address_problems(f"127.0.0.1:{port}")
        assert time.monotonic() - started < CONNECT_TIMEOUT_S + 3
        assert f"127.0.0.1:{port} accepts connections but gives no reply in Ray's protocol (gRPC) within" in problem and "GCS port" in problem
        (problem,) = reachable(f"http://127.0.0.1:{port}", timeout=1)  # a dashboard URL: `submit`'s
        assert "gives no answer a Ray dashboard gives" in problem

    class Web(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>a proxy</html>")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Web)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        started = time.monotonic()
        (problem,) = ray_address_problems(f"127.0.0.1:{port}")
        assert "does not answer in Ray's protocol (gRPC)" in problem and time.monotonic() - started < 3
        (problem,) = reachable(f"http://127.0.0.1:{port}")
        assert "answers something other than a Ray dashboard" in problem
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("address", "says"),
    [("http://head:8265", "a dashboard URL is for `python -m sweep submit`"), ("https://head", "give its GCS address, head:6379"),
     ("head", "--address head: no port; give head:PORT"), ("ray://head", "no port"), ("grpc://head:6379", "unknown scheme grpc://")],
)  # fmt: skip
def test_address_forms_ray_cannot_take_are_refused_with_what_to_give(address: str, says: str) -> None:
    (problem,) = ray_address_problems(address)  # no connection tried: nothing to wait for
    assert says in problem, problem


def test_an_address_from_the_environment_is_named_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    cfg = load_config(write_space(tmp_path, MINIMAL + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS http://head:8265: a dashboard URL is for"):
        before_start(cfg, None)


@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.1:6379", ("10.0.0.1", 6379)), ("ray://head:10001", ("head", 10001)), ("http://head:8265/", ("head", 8265)),
     ("http://head", ("head", 80)), ("[::1]:6379", ("::1", 6379)), ("head", ("head", None))],
)  # fmt: skip
def test_host_port(address: str, expected: tuple) -> None:
    assert host_port(address) == expected


# ----------------------------------------------------------------------------------------------
# a sweep folder whose stores are gone or damaged


def sweep_folder(tmp_path: Path) -> Path:
    """A sweep folder as `run` leaves it, with a real Optuna study and an MLflow file that holds a run."""
    import optuna

    space = write_space(tmp_path, MINIMAL)
    folder = tmp_path / "results" / "t-1"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(space.read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name="t", storage=f"sqlite:///{folder / 'optuna.db'}")
    with sqlite3.connect(folder.parent / "mlflow.db") as db:  # what check_stores reads of MLflow's schema
        db.execute("CREATE TABLE runs (run_uuid TEXT)")
        db.execute("INSERT INTO runs VALUES ('abc')")
    meta = {"name": "t", "space_file": str(space), "overrides": [], "mlflow_uri": f"sqlite:///{folder.parent / 'mlflow.db'}", "study_name": "t",
            "optuna_storage": f"sqlite:///{folder / 'optuna.db'}", "parent_run_id": "abc", "num_trials": 2, "state": "running"}  # fmt: skip
    (folder / "sweep.json").write_text(json.dumps(meta))
    return folder


def test_intact_stores_pass(tmp_path: Path) -> None:
    folder = sweep_folder(tmp_path)
    check_stores(folder, f"sqlite:///{folder.parent / 'mlflow.db'}", f"sqlite:///{folder / 'optuna.db'}", "t")


def test_a_deleted_study_is_reported_and_not_recreated(tmp_path: Path) -> None:
    from sweep.readback.results import open_sweep
    from sweep.engine.sweep import resume_sweep
    from sweep.readback.status import sweep_status

    folder = sweep_folder(tmp_path)
    (folder / "optuna.db").unlink()
    for command in (sweep_status, open_sweep, resume_sweep):  # status; report and best; resume
        with pytest.raises(ConfigError) as info:
            command(folder)
        (problem,) = info.value.problems
        assert problem.startswith(f"{folder / 'optuna.db'}: the sweep's Optuna study is missing (deleted or moved?). MLflow still holds every trial")
        assert f"mlflow ui --backend-store-uri sqlite:///{folder.parent / 'mlflow.db'}" in problem
        assert not (folder / "optuna.db").exists() and not (folder / "driver.pid").exists()


@pytest.mark.parametrize(("size", "trouble"), [(0, "is empty (0 bytes: truncated?)"), (100, "cannot be read: database disk image is malformed")])
def test_a_truncated_study_is_reported_and_left_as_it_is(tmp_path: Path, size: int, trouble: str) -> None:
    from sweep.readback.status import sweep_status

    folder = sweep_folder(tmp_path)
    with open(folder / "optuna.db", "r+b") as f:
        f.truncate(size)
    before = (folder / "optuna.db").read_bytes()
    with pytest.raises(ConfigError) as info:
        sweep_status(folder)
    assert info.value.problems[0].startswith(f"{folder / 'optuna.db'}: the sweep's Optuna study {trouble}")
    assert (folder / "optuna.db").read_bytes() == before


def test_a_missing_mlflow_store_is_reported_and_not_recreated(tmp_path: Path) -> None:
    from sweep.readback.status import sweep_status

    folder = sweep_folder(tmp_path)
    (folder.parent / "mlflow.db").unlink()
    with pytest.raises(ConfigError) as info:
        sweep_status(folder)
    (problem,) = info.value.problems
    assert problem.startswith(f"{folder.parent / 'mlflow.db'}: the sweep's MLflow store is missing (deleted or moved?). The Optuna study still holds")
    assert not (folder.parent / "mlflow.db").exists()


def test_status_of_a_broken_sweep_exits_2_without_a_traceback(tmp_path: Path) -> None:
    from tests.unit.test_cli import sweep

    folder = sweep_folder(tmp_path)
    (folder / "optuna.db").unlink()
    result = sweep("status", str(folder), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the sweep's Optuna study is missing" in result.stderr
    assert not (folder / "optuna.db").exists()


# ----------------------------------------------------------------------------------------------
# status and the commands printed for the user


def test_a_finished_sweep_shows_no_time_left() -> None:
    from sweep.readback.status import remaining_seconds

    assert remaining_seconds({"state": "running", "num_trials": 4, "concurrency": 1}, 2, [10.0, 20.0]) == 30.0
    assert remaining_seconds({"state": "finished", "num_trials": 4, "concurrency": 1}, 2, [10.0, 20.0]) is None  # ended by its time budget
    assert remaining_seconds({"state": "running", "num_trials": 4}, 2, []) is None


def test_printed_commands_are_shell_quoted(tmp_path: Path) -> None:
    from sweep.readback.status import stop_sweep

    folder = tmp_path / "my sweeps" / "t-1"
    folder.mkdir(parents=True)
    stores = {"mlflow_uri": f"sqlite:///{folder.parent / 'mlflow.db'}", "optuna_storage": f"sqlite:///{folder / 'optuna.db'}"}
    (folder / "sweep.json").write_text(json.dumps({"space_file": str(tmp_path / "space.yaml"), **stores, "study_name": "t", "parent_run_id": "p", "state": "running"}))
    lines: list[str] = []
    stop_sweep(folder, 0, write=lines.append)
    assert lines == [f"t-1: no driver is running; it will resume with:  python -m sweep resume '{folder}'"]
    assert checks.quote(folder) == f"'{folder}'" and checks.quote("/plain/path") == "/plain/path"


def test_checks_import_nothing_heavy() -> None:
    import subprocess
    import sys

    code = "import sys, sweep.folder.checks; print(sorted(m for m in ('ray', 'torch', 'mlflow', 'optuna') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2], env={**os.environ})
    assert out.stdout.strip() == "[]", out.stderr


def test_sqlite_stores_outside_the_results_folder_are_checked_too(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    tracking = f"tracking: {{results_dir: {tmp_path / 'out'}, mlflow_uri: 'sqlite:///{tmp_path}/afile/m.db', optuna_storage: 'sqlite:///{tmp_path}/afile/o.db'}}\n"
    cfg = load_config(write_space(tmp_path, MINIMAL + tracking))
    with pytest.raises(ConfigError) as info:
        before_start(cfg)
    assert [p.split(":")[0] for p in info.value.problems] == ["tracking.mlflow_uri", "tracking.optuna_storage"]
    assert all(f"{tmp_path}/afile is a file" in p for p in info.value.problems)
