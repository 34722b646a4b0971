"""A driver killed with kill -9 takes its local Ray's processes with it (sweep.engine.reaper)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sweep.engine.reaper import proc_stat
from tests.conftest import ROOT

# A "driver" that starts the watcher, then a long-lived child that looks like one of Ray's
# processes (its command line names a .../ray/... file), as the raylet's agents do.
DRIVER = """
import subprocess, sys, time
from sweep.engine import reaper
r = reaper.start()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "/site-packages/ray/agent.py"])
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    return (s := proc_stat(pid)) is not None and s.state != "Z"  # a zombie is dead, only not yet reaped


def test_proc_stat_reads_a_name_with_spaces_and_parentheses_and_a_zombie(tmp_path: Path) -> None:
    sleep = tmp_path / "a) (b c"  # the name sits in parentheses in /proc/<pid>/stat
    shutil.copy(shutil.which("sleep"), sleep)
    proc = subprocess.Popen([str(sleep), "60"])
    try:
        time.sleep(0.2)
        s = proc_stat(proc.pid)
        assert s is not None and (s.ppid, s.name, s.state) == (os.getpid(), "a) (b c", "S")
        assert s.start >= proc_stat(os.getpid()).start  # started after this test's process
        proc.kill()  # not reaped yet: a zombie, with its start time kept
        time.sleep(0.2)
        assert proc_stat(proc.pid) == s._replace(state="Z")
    finally:
        proc.kill()
        proc.wait()
    assert proc_stat(proc.pid) is None  # reaped: no such process


def test_a_killed_drivers_ray_processes_end_within_seconds(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    child = int(driver.stdout.readline())
    try:
        time.sleep(2.5)  # the watcher notes the driver's Ray processes every second
        assert alive(child)
        driver.kill()  # kill -9
        driver.wait()
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(child), "the Ray-like child outlived its killed driver"
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_driver_that_shut_ray_down_leaves_its_watcher_done(tmp_path: Path) -> None:
    from sweep.engine import reaper

    watcher = reaper.start()
    assert watcher is not None
    time.sleep(1.2)
    watcher.done()
    assert watcher.proc.poll() == 0
