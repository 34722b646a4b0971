"""A local Ray dies with the driver that started it, kill -9 included.

Ray ties its GCS and raylet to the driver (the kernel kills them when it dies), but the agents the
raylet starts (dashboard agent, runtime-env agent) and idle workers only notice a minute or more
later, or never when their GCS is gone. `start(driver_pid)` spawns this module as a small watcher
in its own session: it notes the driver's Ray processes every second, and when the driver's end of
a pipe closes without a word (the driver died) it ends those still alive. A driver that shuts Ray
down itself says so first (`Reaper.done`), and the watcher leaves at once.

    python -m sweep.engine.reaper DRIVER_PID      (stdin: the pipe; not meant to be run by hand)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from typing import NamedTuple

INTERVAL = 1.0
DONE = b"done\n"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Reaper:
    """The driver's end: keep it (its pipe) open while Ray runs; `done()` after ray.shutdown()."""

    def __init__(self, proc: subprocess.Popen, fd: int):
        self.proc, self.fd = proc, fd

    def done(self) -> None:
        if self.fd < 0:
            return
        try:
            os.write(self.fd, DONE)
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def start(driver_pid: int | None = None) -> Reaper | None:
    """Watch this process (the driver) and its Ray processes; None where /proc is missing."""
    if not os.path.isdir("/proc/self/task"):
        return None
    read, write = os.pipe()  # both non-inheritable: only the watcher gets `read`, as its stdin
    proc = subprocess.Popen(
        [sys.executable, "-m", "sweep.engine.reaper", str(driver_pid or os.getpid())],
        stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C to the driver's process group is not for the watcher
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)},
    )  # fmt: skip
    os.close(read)
    return Reaper(proc, write)


class ProcStat(NamedTuple):
    """What /proc/<pid>/stat says of a process that the reaper and the driver's Ray watch use."""

    ppid: int
    start: int  # clock ticks after boot: with the pid, names this process and not a later one with its pid
    name: str  # the executable's name (comm), at most 15 characters
    state: str  # one letter: R running, S sleeping, Z zombie (ended, not yet reaped), X dead, ...


def proc_stat(pid: int) -> ProcStat | None:
    """The process `pid` as /proc/<pid>/stat describes it, or None when there is none (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    # the name sits in parentheses and may itself hold spaces and parentheses: the last ")" ends it
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return ProcStat(ppid=int(fields[1]), start=int(fields[19]), name=name, state=fields[0])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_processes(root: int) -> dict[int, int]:
    """Ray's processes below `root` (pid -> start time): its servers, agents and workers."""
    stats: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := proc_stat(int(entry))) is not None:
            stats[int(entry)] = s
    children: dict[int, list[int]] = {}
    for pid, s in stats.items():
        children.setdefault(s.ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if pid == os.getpid():
            continue
        if "ray" in stats[pid].name.lower() or "/ray/" in _cmdline(pid) or "ray::" in _cmdline(pid):
            found[pid] = stats[pid].start
    return found


def _end(procs: dict[int, int]) -> None:
    """SIGTERM, then SIGKILL after 3 s, to each process still the one that was noted."""
    alive = lambda: {p: t for p, t in procs.items() if (s := proc_stat(p)) is not None and s.start == t}  # noqa: E731
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 0.0)):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)


def watch(driver_pid: int) -> None:
    seen: dict[int, int] = {}
    while True:
        ready, _, _ = select.select([0], [], [], INTERVAL)
        if ready:
            if os.read(0, 64).startswith(DONE):
                return  # the driver shut Ray down itself
            break  # EOF: the driver is gone
        seen.update(ray_processes(driver_pid))
    _end(seen)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
