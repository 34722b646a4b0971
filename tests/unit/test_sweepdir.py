"""The sweep folder's driver lock: atomic, and never in the way once its driver is gone."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from sweep.config import ConfigError
from sweep.folder import LOCK, claim, driver, release


def _race(folder: str, start: "multiprocessing.synchronize.Barrier", results: "multiprocessing.Queue", hold: "multiprocessing.synchronize.Event") -> None:
    # A slow host lookup (a busy NFS client, say) widens the window between looking at the lock
    # and taking it, which a non-atomic claim loses deterministically.
    slow = socket.gethostname

    def gethostname() -> str:
        time.sleep(0.2)
        return slow()

    socket.gethostname = gethostname
    start.wait()
    try:
        claim(Path(folder))
        results.put("won")
    except ConfigError as exc:
        results.put(str(exc))
    hold.wait(30)  # keep the lock (and the process) until the test has looked


def test_two_claims_at_the_same_moment_one_wins(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start, results, hold = ctx.Barrier(2), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, results, hold)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=30) for _ in procs]
    finally:
        hold.set()
        for p in procs:
            p.join(30)
    assert outcomes.count("won") == 1, outcomes
    assert "a driver is running it already" in next(o for o in outcomes if o != "won")


def test_a_killed_drivers_lock_is_taken_over_and_a_live_ones_refused(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, hold = ctx.Event(), ctx.Event()

    def hold_lock() -> None:
        claim(tmp_path)
        ready.set()
        hold.wait(30)

    child = ctx.Process(target=hold_lock)
    child.start()
    try:
        assert ready.wait(30)
        assert driver(tmp_path)["pid"] == child.pid
        with pytest.raises(ConfigError, match=rf"a driver is running it already \(pid {child.pid} "):
            claim(tmp_path)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # as kill -9 would: the file stays, the lock goes
        child.join(30)
    assert (tmp_path / LOCK).exists() and driver(tmp_path) is None
    claim(tmp_path)
    claim(tmp_path)  # the same driver again (run, then its trials): fine
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    release(tmp_path)
    assert not (tmp_path / LOCK).exists()
    release(tmp_path)  # twice: nothing to do


def test_a_driver_on_another_machine_is_assumed_alive(tmp_path: Path) -> None:
    (tmp_path / LOCK).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    with pytest.raises(ConfigError, match=r"pid 1 on elsewhere.example"):
        claim(tmp_path)
