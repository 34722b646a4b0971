"""The driver notices at once when the local Ray it started loses its own servers.

A signal to the driver's whole process group (what `timeout 150 python -m sweep run ...` and many
schedulers send) reaches the GCS and the raylet too: Ray started them in the driver's group (its
workers have groups of their own). Ray's driver then waits a minute for its GCS and exits with
status 1, or is ended by Ray when its node is declared dead, with nothing recorded: sweep.json
still `running`, MLflow runs RUNNING, no resume command. Killing the GCS or the raylet alone, or
the OOM killer, does the same.

    watch = RayWatch.start()           # after ray.init of a local Ray: its GCS and raylet, watched
    watch.set(handler)                 # what the driver does then, in its present phase (None: nothing)
    watch.hold                         # held while the driver writes what a handler would read
    watch.stop()                       # before ray.shutdown

Every WATCH_INTERVAL seconds a thread checks that the servers live (and that the GCS still
listens: told to stop, it closes its port at once and ends seconds later); when one is gone it calls the
phase's handler (in that thread: the main thread may be stuck inside Ray), which records the
sweep's state, says so with the resume command and ends the process (`lost`). Linux only (/proc);
elsewhere nothing is watched.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

from sweep.engine.reaper import proc_stat

SERVERS = ("gcs_server", "raylet")
WATCH_INTERVAL = 0.5  # s
SIGNAL_GRACE = 1.0  # s: a signal to the process group reaches the driver with its Ray; its handler notes it within this


def servers_of(driver: int) -> dict[int, tuple[str, int]]:
    """The Ray servers this driver started (its children named gcs_server, raylet): pid -> (name, start time)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (s := proc_stat(int(entry))) is not None and s.ppid == driver and s.name in SERVERS:
            found[int(entry)] = (s.name, s.start)
    return found


class RayWatch:
    """A daemon thread of the driver: calls `on_lost(names)` once a watched server is gone."""

    def __init__(self, servers: dict[int, tuple[str, int]], gcs_address: str | None = None):
        self.servers = servers
        self.gcs_address = gcs_address  # a GCS told to stop closes its port at once, its process ends seconds later
        self.on_lost: Callable[[list[str]], None] | None = None
        # held by a handler while it runs (to the process's end), and by the driver while it changes
        # the handler or writes what one reads (a new sweep's folder): so a handler never runs
        # beside the driver's own recording of the sweep's end
        self.hold = threading.RLock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-sweep ray watch", daemon=True)

    @classmethod
    def start(cls) -> "RayWatch | None":
        if not os.path.isdir("/proc/self/task"):
            return None
        import ray

        servers = servers_of(os.getpid())
        if not servers:
            return None
        return cls(servers, ray.get_runtime_context().gcs_address).begin()

    def begin(self) -> "RayWatch":
        """Start watching (a thread of this process)."""
        self._thread.start()
        return self

    def gone(self) -> list[str]:
        """The watched servers that have ended (a zombie has: Ray reaps its children late)."""
        out = set()
        for pid, (name, started) in self.servers.items():
            s = proc_stat(pid)
            if s is None or s.start != started or s.state in "ZX":
                out.add(name)
        if self.gcs_address and "gcs_server" not in out and _refused(self.gcs_address):
            out.add("gcs_server")
        return sorted(out)

    def set(self, handler: Callable[[list[str]], None] | None) -> None:
        """The handler from now on; waits for (the process's end by) a handler that runs already."""
        with self.hold:
            self.on_lost = handler

    def stop(self) -> None:
        """The driver stops its Ray itself: nothing to watch from here on."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL):
            names = self.gone()
            if names and self.on_lost is not None and not self._stopped.is_set():
                with self.hold:
                    if not self._stopped.is_set() and self.on_lost is not None:
                        self.on_lost(names)
                return


def _refused(address: str) -> bool:
    """Nothing listens at host:port any more (a slow or busy listener is not refused: the kernel accepts for it)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=WATCH_INTERVAL).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def signal_with(noted: Callable[[], int | None]) -> int | None:
    """The signal the driver got with its Ray's end (`noted()` says; None: none came within SIGNAL_GRACE)."""
    deadline = time.monotonic() + SIGNAL_GRACE
    while (signum := noted()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return signum


def lost(names: list[str], signum: int | None, what: str) -> None:
    """Say that Ray's servers ended and `what` (the sweep's state, how to go on), then end the
    process: 128 + the signal the driver got with them, else 1."""
    cause = (f"{signal.Signals(signum).name} came to the whole process group, which holds Ray's servers too" if signum is not None
             else "killed, or out of memory?")  # fmt: skip
    text = f"\nRay's own processes ended ({', '.join(names)}: {cause}); {what}\n"
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):
        pass
    os._exit(128 + signum if signum is not None else 1)
