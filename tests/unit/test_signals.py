"""SIGINT / SIGTERM outside the trials (sweep.run.signals_raise): each raises and is noted, and a
signal whose exception Python lost in a garbage-collector callback is still acted on."""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path

import pytest

import sweep.__main__ as cli
from sweep import run
from sweep.run import Interrupt, Terminated, received_signal, signals_raise


@pytest.fixture
def handlers():
    """Put back the process's handlers (and the unraisable hook) after the test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    received_signal(clear=True)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    sys.unraisablehook = hook
    received_signal(clear=True)


def test_sigterm_raises_terminated_and_is_noted(handlers: None) -> None:
    signals_raise()
    with pytest.raises(Terminated):
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.5)  # a bytecode boundary for the handler to run at
    assert received_signal(clear=True) == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt) as raised:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.5)
    assert not isinstance(raised.value, Terminated)
    assert received_signal() == signal.SIGINT


def test_a_signal_lost_during_set_up_stops_the_trials_as_they_start(tmp_path: Path, handlers: None) -> None:
    """Its exception was swallowed (an "Exception ignored" callback): Interrupt acts on the note."""
    run._received.append(signal.SIGTERM)
    interrupt = Interrupt(tmp_path / "STOP", "python -m sweep resume X").install()
    try:
        assert interrupt.signum == signal.SIGTERM
        assert (tmp_path / "STOP").read_text().endswith("SIGTERM")
        assert received_signal() is None  # acted on once
    finally:
        interrupt.restore()


def test_no_signal_noted_leaves_the_trials_alone(tmp_path: Path, handlers: None) -> None:
    interrupt = Interrupt(tmp_path / "STOP", "python -m sweep resume X").install()
    interrupt.restore()
    assert interrupt.signum is None and not (tmp_path / "STOP").exists()


def test_a_lost_signal_prints_no_traceback_but_other_lost_exceptions_do(handlers: None, capsys: pytest.CaptureFixture) -> None:
    seen: list = []
    sys.unraisablehook = seen.append  # stands in for Python's printer
    signals_raise()
    lost = lambda exc: types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None, err_msg=None, object=None)  # noqa: E731
    run._received.append(signal.SIGTERM)
    sys.unraisablehook(lost(Terminated()))
    assert seen == []
    other = lost(ValueError("a real bug"))
    sys.unraisablehook(other)
    assert seen == [other]


def test_a_signal_lost_while_wrapping_up_sets_the_exit_code(handlers: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The command had finished its work (0), but a SIGTERM came and its exception was lost: 143."""

    def command(args: object) -> int:
        run._received.append(signal.SIGTERM)
        return 0

    monkeypatch.setattr(cli, "_command", command)
    assert cli.main(["run", "space.yaml"]) == 143
    assert "SIGTERM while starting or wrapping up" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not run._raise_signal  # the caller's handlers are back
