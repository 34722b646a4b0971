"""SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) in a driver, in its three phases:

    starting      signals_raise(): each raises (KeyboardInterrupt, Terminated), so `finally`
                  blocks run and the command exits 130 / 143 saying where the sweep stands
    trials        Interrupt: the first does what `python -m sweep stop` does (a resumable stop),
                  a second exits at once
    wrapping up   wrap_up(): the trials have ended; a signal waits until the command has recorded
                  the sweep's end (study, parent run, sweep.json, a `train` adapter), then the
                  command exits 128 + the signal; a second exits at once

While a new sweep's folder is made (held()), a signal waits the second or two until its sweep.json
is written, then raises as while starting.

Each signal is also noted (`_received`): a raise that lands inside a garbage-collector callback
(SQLAlchemy has some) is printed by Python as "Exception ignored" and lost; the note is acted on
as the trials start (Interrupt.install) or when the command ends (command_ended).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # signals noted since the command started
_wrapping_up = False  # wrap_up() was called: signals wait for the command's end
_holding: int | None = None  # inside held(): the signals noted before it; signals wait for the end of the step


class Terminated(KeyboardInterrupt):
    """SIGTERM while starting: raised as Ctrl-C's KeyboardInterrupt is, so `finally` blocks still
    run (the local Ray stopped, the folder released) and the command exits 143. Without it,
    SIGTERM before ray.init kills the process outright, and after it Ray's driver handler exits
    with status 15, a code that says nothing."""

    def __init__(self) -> None:
        super().__init__("SIGTERM")


class Interrupted(Exception):
    """The driver got SIGINT / SIGTERM: its trials checkpointed and stopped, as with `stop`; the
    sweep resumes. The command exits with 128 + the signal (130, 143), as shells expect."""

    def __init__(self, signum: int, result: Any = None):
        self.signum, self.result, self.exit_code = signum, result, 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


def say(text: str) -> None:
    """Straight to the file descriptor: print() from a handler could re-enter a buffered write."""
    try:
        os.write(sys.stdout.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):
        pass


def _while_wrapping_up(signum: int) -> None:
    name = signal.Signals(signum).name
    if _received:
        say(f"\n{name} again: exiting now; `python -m sweep status DIR` shows where the sweep stands\n")
        os._exit(128 + signum)
    _received.append(signum)
    say(f"\n{name}: the trials have ended; recording the sweep's end first (send it again to exit at once) ...\n")


def _raise_signal(signum: int, frame: Any) -> None:
    if _wrapping_up:
        _while_wrapping_up(signum)
        return
    if _holding is not None:
        name = signal.Signals(signum).name
        if len(_received) > _holding:
            say(f"\n{name} again: exiting now; `python -m sweep status DIR` shows where the sweep stands\n")
            os._exit(128 + signum)
        _received.append(signum)
        say(f"\n{name}: the sweep's folder is being made; stopping once it is (send it again to exit at once) ...\n")
        return
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A step no signal cuts in half (a new sweep's folder, its study and parent run, and the
    sweep.json that names them: cut before sweep.json, it left a folder nothing could read or
    resume). A signal inside is noted and raised at the end, as signals_raise() raises it; a
    second one exits at once. The step waits on no Ray call, so it ends in seconds."""
    global _holding
    earlier = _holding = len(_received)
    try:
        yield
    finally:
        _holding = None
    if len(_received) > earlier:
        raise Terminated() if _received[earlier] == signal.SIGTERM else KeyboardInterrupt()


def signals_raise() -> None:
    """From here on SIGINT raises KeyboardInterrupt and SIGTERM raises Terminated, each noted
    (the main thread only: handlers live there). ray.init replaces the SIGTERM handler, so
    connect_ray calls this again after it."""
    global _unraisable
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _raise_signal)
        if sys.unraisablehook is not _quiet_when_noted:
            _unraisable, sys.unraisablehook = sys.unraisablehook, _quiet_when_noted


_unraisable: Callable[[Any], Any] = sys.unraisablehook


def _quiet_when_noted(info: Any) -> None:
    """A signal's exception lost in a garbage-collector callback is noted and acted on: no
    traceback for it. Every other unraisable exception is printed as Python would."""
    if isinstance(info.exc_value, KeyboardInterrupt) and _received:
        return
    _unraisable(info)


def wrap_up() -> None:
    """The trials have ended: from now on a signal waits for the command's end (see the module)."""
    global _wrapping_up
    _wrapping_up = True


def received_signal(clear: bool = False) -> int | None:
    """The first SIGINT / SIGTERM noted (None: none came)."""
    first = _received[0] if _received else None
    if clear:
        _received.clear()
    return first


def command_ended() -> int | None:
    """The command is done: the first signal noted, if any, for its exit code; the state reset."""
    global _wrapping_up
    _wrapping_up = False
    return received_signal(clear=True)


class Interrupt:
    """SIGINT and SIGTERM while the trials run.

    The first does what `python -m sweep stop` does: it writes the STOP file, so running trials
    checkpoint and end, nothing is marked finished, and `resume` continues them. A second exits at
    once, leaving what kill -9 leaves, which `resume` repairs too. Ray Tune's own SIGINT handler
    would instead end the experiment as if its time were up (trials stopped for good), so it is
    switched off (TUNE_DISABLE_SIGINT_HANDLER) and these handlers replace it, and Ray's SIGTERM
    handler, until `restore()`. After wrap_up() a signal waits for the command's end instead."""

    def __init__(self, stop_file: Path, resume: str):
        self.stop_file, self.resume = stop_file, resume
        self.signum: int | None = None  # a signal while the trials ran
        self._previous: dict[int, Any] = {}

    def install(self) -> "Interrupt":
        global _wrapping_up
        earlier = _wrapping_up  # an earlier sweep in this process wrapped up: its notes are not this one's
        _wrapping_up = False
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        lost = received_signal(clear=True)  # one while starting whose exception was lost: acted on now
        if lost is not None and not earlier:
            self._handle(lost, None)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if _wrapping_up:
            _while_wrapping_up(signum)
            return
        name = signal.Signals(signum).name
        if self.signum is not None:
            say(f"\n{name} again: exiting now; the sweep resumes with:  {self.resume}\n")
            os._exit(128 + signum)
        self.signum = signum
        try:
            self.stop_file.write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {name}")
        except OSError as exc:
            say(f"\n{name}: cannot write {self.stop_file} ({exc}); exiting now; resume with:  {self.resume}\n")
            os._exit(128 + signum)
        say(f"\n{name}: running trials checkpoint and stop (send it again to exit at once) ...\n")
