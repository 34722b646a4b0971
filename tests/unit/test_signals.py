"""SIGINT / SIGTERM in a driver's phases (sweep/signals.py): while starting each raises and is
noted, a signal whose exception Python lost in a garbage-collector callback is still acted on, and
once the trials have ended a signal waits for the wrap-up and sets the exit code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

import sweep.cli as cli
from tests.conftest import ROOT
from sweep.engine import signals as run
from sweep.engine.signals import Interrupt, Terminated, command_ended, received_signal, signals_raise, wrap_up


@pytest.fixture
def handlers():
    """Put back the process's handlers (and the unraisable hook) after the test."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook
    command_ended()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    sys.unraisablehook = hook
    command_ended()


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


def test_a_signal_while_wrapping_up_waits_for_the_wrap_up(tmp_path: Path, handlers: None) -> None:
    """The trials have ended: no STOP file (the sweep is not stopped), no exception in the middle
    of recording its end; the signal is kept for the command's exit code."""
    interrupt = Interrupt(tmp_path / "STOP", "python -m sweep resume X").install()
    try:
        wrap_up()
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.2)
        assert interrupt.signum is None and not (tmp_path / "STOP").exists()
    finally:
        interrupt.restore()
    assert command_ended() == signal.SIGTERM


def test_a_second_signal_while_wrapping_up_exits_at_once(tmp_path: Path) -> None:
    script = (
        "import os, signal, time\n"
        "from sweep.engine.signals import signals_raise, wrap_up\n"
        "signals_raise(); wrap_up()\n"
        "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
        "print('waited', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "print('not reached', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done
    assert "recording the sweep's end first" in done.stdout and "waited" in done.stdout and "not reached" not in done.stdout


def test_the_next_sweep_in_the_process_is_not_stopped_by_the_last_ones_wrap_up(tmp_path: Path, handlers: None) -> None:
    """run_sweep called twice in one process (no command around it to end the first)."""
    wrap_up()
    run._received.append(signal.SIGTERM)  # came while the first wrapped up
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


def test_a_signal_that_waited_for_the_wrap_up_sets_the_exit_code(handlers: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The command did its work (0), but a SIGTERM came while it wrapped up: 143, said."""

    def command(args: object) -> int:
        wrap_up()
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0.2)
        return 0

    monkeypatch.setattr(cli, "_command", command)
    assert cli.main(["run", "space.yaml"]) == 143
    assert "SIGTERM while starting or wrapping up" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is not run._raise_signal  # the caller's handlers are back


def test_tunes_save_race_on_an_early_stop_is_not_logged_but_other_save_failures_are() -> None:
    """A stop right as the trials start: Tune logs a temporary snapshot file renamed under its
    sync as a failed save (with a traceback), then saves again; sweep.engine.sweep filters that one only."""
    import logging

    from sweep.engine.sweep import _tune_environment

    _tune_environment()
    log = logging.getLogger("ray.tune.execution.experiment_state")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    log.addHandler(handler)
    try:
        for error in (FileNotFoundError("Failed to open local file '/tmp/ray/x/.78a4-tmp-searcher-state-1.pkl'"), PermissionError("/sweeps/tune: denied")):
            try:
                raise error
            except OSError as exc:
                log.error(f"Saving experiment state to storage at '/sweeps/tune' failed with exception: {exc}", exc_info=True)
    finally:
        log.removeHandler(handler)
    assert [type(r.exc_info[1]).__name__ for r in records] == ["PermissionError"]


def test_a_signal_while_the_sweeps_folder_is_made_waits_for_its_sweep_json(tmp_path: Path, handlers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the new sweep's folder, parent run and study are made (here: inside create_study)
    waits until sweep.json names them, then stops the sweep as before any trial ran: a folder
    `resume` continues. It left a folder with no sweep.json, which nothing could read or resume."""
    import json

    import mlflow

    from sweep.config import load_config
    from sweep.engine import study as study_module
    from sweep.engine import sweep as engine
    from tests.conftest import MINIMAL, write_space

    cfg = load_config(write_space(tmp_path, MINIMAL + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    monkeypatch.setattr(engine, "preflight", lambda cfg, log: types.SimpleNamespace(folder=tmp_path / "data"))
    monkeypatch.setattr(engine, "connect_ray", lambda address, log: False)
    monkeypatch.setattr(engine, "plan_workers_here", lambda cfg, trials, log: types.SimpleNamespace(concurrent=1))
    real = study_module.create_study

    def interrupted(*args: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        signal.sigtimedwait([], 0.2)  # a bytecode boundary: the handler runs here
        real(*args)

    monkeypatch.setattr(study_module, "create_study", interrupted)
    signals_raise()
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        engine.run_sweep(cfg, log=lines.append)
    (folder,) = (tmp_path / "out").glob("t-*")
    meta = json.loads((folder / "sweep.json").read_text())
    assert meta["state"] == "stopped" and any(line.startswith(f"sweep folder: {folder}") for line in lines)
    assert mlflow.MlflowClient(cfg.mlflow_uri).get_run(meta["parent_run_id"]).info.status == "KILLED"


def test_a_failure_while_the_sweeps_folder_is_made_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its copies of the space file go; its parent run ends FAILED; the error is the one shown."""
    import mlflow

    from sweep.config import load_config
    from sweep.engine import study as study_module
    from sweep.engine import sweep as engine
    from tests.conftest import MINIMAL, write_space

    cfg = load_config(write_space(tmp_path, MINIMAL + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))

    def unreachable(*args: object) -> None:
        raise ConnectionError("the study's store refused the connection")

    monkeypatch.setattr(study_module, "create_study", unreachable)
    with pytest.raises(ConnectionError, match="refused"):
        engine.new_sweep(cfg, types.SimpleNamespace(folder=tmp_path / "data"), types.SimpleNamespace(concurrent=1), None, "run", print)
    assert not list((tmp_path / "out").glob("t-*"))
    (run,) = mlflow.MlflowClient(cfg.mlflow_uri).search_runs([mlflow.MlflowClient(cfg.mlflow_uri).get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FAILED"


def test_a_sigterm_that_ray_init_swallows_still_ends_the_command(handlers: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init raises SIGTERM's exception from its own handler (SystemExit), and a part of it may
    catch it: the sweep then went on with a half-started Ray, whose first worker died (exit 1)."""
    import ray

    from sweep.engine import sweep as engine

    def init(**kwargs: object) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init does
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.2)
        except SystemExit:
            pass  # caught inside ray.init

    stopped = []
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(Terminated):
        engine.connect_ray(None, lambda line: None)
    assert stopped == [True]
    assert signal.set_wakeup_fd(-1) == -1  # the wakeup fd it used is gone again
