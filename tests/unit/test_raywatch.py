"""The driver's watch over its local Ray's servers (sweep/engine/raywatch.py), on stand-in processes:
a server that ends, or a GCS port that closes, calls the phase's handler within a second; a driver
that changes the handler waits for one that runs."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

from sweep.engine.raywatch import WATCH_INTERVAL, RayWatch
from sweep.engine.reaper import proc_stat


def server(name: str) -> tuple[subprocess.Popen, dict[int, tuple[str, int]]]:
    proc = subprocess.Popen(["sleep", "60"])
    return proc, {proc.pid: (name, proc_stat(proc.pid).start)}


def called(watch: RayWatch, within: float) -> list[list[str]]:
    calls: list[list[str]] = []
    watch.set(calls.append)
    deadline = time.monotonic() + within
    while not calls and time.monotonic() < deadline:
        time.sleep(0.05)
    return calls


def test_a_server_that_ends_calls_the_handler_within_a_second() -> None:
    proc, servers = server("raylet")
    watch = RayWatch(servers).begin()
    try:
        assert called(watch, 3 * WATCH_INTERVAL) == []  # alive: nothing
        proc.kill()  # not reaped yet: a zombie, as Ray's servers are until Ray reaps them
        assert called(watch, 1 + 2 * WATCH_INTERVAL) == [["raylet"]]
    finally:
        watch.stop()
        proc.kill()
        proc.wait()


def test_a_gcs_whose_port_closes_counts_as_ended_before_its_process_does() -> None:
    """Told to stop (SIGTERM), a GCS closes its port at once and its process lingers for seconds."""
    proc, servers = server("gcs_server")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    watch = RayWatch(servers, f"127.0.0.1:{listener.getsockname()[1]}").begin()
    try:
        assert called(watch, 3 * WATCH_INTERVAL) == []
        listener.close()
        assert called(watch, 1 + 2 * WATCH_INTERVAL) == [["gcs_server"]]
    finally:
        watch.stop()
        proc.kill()
        proc.wait()


def test_a_handler_that_runs_keeps_the_driver_from_changing_it() -> None:
    """The driver's own recording of the sweep's end (finish) never runs beside a handler's."""
    proc, servers = server("raylet")
    running, release = threading.Event(), threading.Event()

    def handler(names: list[str]) -> None:
        running.set()
        release.wait(5)

    watch = RayWatch(servers).begin()
    try:
        watch.set(handler)
        proc.kill()
        assert running.wait(3)
        changed = threading.Thread(target=watch.set, args=(None,))
        changed.start()
        changed.join(0.5)
        assert changed.is_alive()  # waits for the handler (which ends the process, in a driver)
        release.set()
        changed.join(2)
        assert not changed.is_alive()
    finally:
        watch.stop()
        proc.wait()
