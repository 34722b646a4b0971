"""Ctrl-C never ends a sweep for good. SIGINT / SIGTERM to a real `python -m sweep run` behave like
`python -m sweep stop` (trials checkpoint, nothing is marked finished, exit 130 / 143) and `resume`
finishes the sweep; a seeded "chaos" run interrupts one sweep every way there is and checks that
it still ends whole. Everything through the command line, as a user would do it."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from sweep.engine.raywatch import servers_of
from sweep.engine.reaper import ray_processes
from tests.conftest import MINIMAL, write_space
from tests.e2e.conftest import mlflow_runs
from tests.e2e.test_durability import env

pytestmark = pytest.mark.e2e

STEPS = 12


def space(tmp_path: Path, trials: int, steps: int = STEPS) -> Path:
    body = MINIMAL.replace("train: {max_steps: 4, eval_every: 2, log_every: 1}", f"train: {{max_steps: {steps}, eval_every: 3, log_every: 3, batch: [2, 1]}}").replace(
        "search: {num_trials: 2}", f"search: {{num_trials: {trials}, max_concurrent: 2, seed: 0, scheduler: {{type: none}}}}"
    ).replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  learning_rate: {loguniform: [1.0e-3, 2.0e-2]}\n")
    return write_space(tmp_path, body + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n")


class Command:
    """`python -m sweep ARGS` in the background (its own process group), its output watched."""

    def __init__(self, cwd: Path, *args: str):
        n = len(list(cwd.glob("driver-*.log")))
        self.log = cwd / f"driver-{n}.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "sweep", *args], cwd=cwd, env=env(),
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 240) -> bool:
        """True once `pattern` appeared `count` times; False if the command ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.text())) >= count:
                return True
            if self.proc.poll() is not None:
                return len(re.findall(pattern, self.text())) >= count
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} x{count} within {timeout}s:\n{self.text()[-3000:]}")

    def sweep_dir(self) -> Path:
        assert self.wait_for(r"sweep folder: "), self.text()[-3000:]
        return Path(re.search(r"sweep folder: (\S+)", self.text()).group(1))

    def end(self, timeout: float = 300) -> int:
        return self.proc.wait(timeout=timeout)


def trial_workers(driver_pid: int) -> list[int]:
    """This driver's trial processes (Tune's function trainables), never another test's."""
    found = []
    for pid in ray_processes(driver_pid):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "ImplicitFunc" in name:
            found.append(pid)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def stores(sweep_dir: Path) -> tuple[dict, list, list]:
    """(sweep.json, the study's trials, the MLflow child runs)."""
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    study = optuna.load_study(study_name=meta["study_name"], storage=f"sqlite:///{sweep_dir}/optuna.db")
    parent, children = mlflow_runs(meta["mlflow_uri"], meta["experiment"])
    return meta, study.trials, [parent, *children]


def check_whole(sweep_dir: Path, trials: int, steps: int = STEPS) -> None:
    """The sweep ended as if nothing had happened: every trial ran once, to the end."""
    meta, study, (parent, *children) = stores(sweep_dir)
    assert meta["state"] == "finished" and parent.info.status == "FINISHED"
    # a proposal repeating a trial is closed as a duplicate (never trained): it takes a study
    # number but gets no child run, and names the trial it repeats
    ran = [t for t in study if t.user_attrs.get("trial_status") != "duplicate"]
    assert [t.state.name for t in ran] == ["COMPLETE"] * trials, [t.state.name for t in study]
    configs = [tuple(sorted(t.params.items())) for t in ran]
    assert len(set(configs)) == trials, configs  # no configuration run twice by accident
    labels = sorted(r.data.tags["trial"] for r in children)
    assert labels == [f"t{t.number:03d}" for t in ran], labels  # one child run per trial that ran
    assert all(t.user_attrs["duplicate_of"] in labels for t in study if t not in ran)
    assert {(r.info.status, r.data.tags["trial_status"]) for r in children} == {("FINISHED", "completed")}
    client = MlflowClient(meta["mlflow_uri"])
    for run in children:
        logged = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert logged == list(range(3, steps + 1, 3)), (run.data.tags["trial"], logged)  # each logged once


def ours_crashed(out: str) -> bool:
    """A traceback through this project's code. Ray Tune may log one of its own when a stop meets
    its experiment-state sync (a temporary file renamed under it: `Saving experiment state ...
    failed`); it retries at the end and nothing is lost, so that one is not counted."""
    return bool(re.search(r'File "[^"]*/(sweep|trainable|core)/[^"]*\.py"', out))


def check_interrupted(command: Command, sweep_dir: Path, code: int, may_finish: bool = False) -> None:
    """Ended by a signal like `stop` ends it: its exit code, how to resume, nothing finished.
    `may_finish`: the signal came with only a few steps left (a resumed trial), so on a loaded
    machine the trial may reach its last step before its stop takes effect: completed, not lost."""
    assert command.end(120) == code, command.text()[-3000:]
    out = command.text()
    assert f"continue with:  python -m sweep resume {shlex.quote(str(sweep_dir))}" in out, out[-3000:]
    assert not ours_crashed(out), out[-3000:]
    meta, study, (parent, *children) = stores(sweep_dir)
    assert meta["state"] == "stopped" and parent.info.status == "KILLED"
    runs = {r.data.tags["trial"]: (r.info.status, r.data.tags["trial_status"]) for r in children}
    ran = {f"t{t.number:03d}": t.state.name for t in study if t.user_attrs.get("trial_status") != "duplicate"}
    allowed = {("RUNNING", ("KILLED", "stopped"))}  # resumable, not pruned
    if may_finish:
        allowed.add(("COMPLETE", ("FINISHED", "completed")))
    assert set(ran) == set(runs) and all((state, runs[label]) in allowed for label, state in ran.items()), (ran, runs)
    assert not (sweep_dir / "driver.pid").exists()


def test_sigint_and_sigterm_stop_the_sweep_resumably_and_resume_finishes_it(tmp_path: Path) -> None:
    """Ctrl-C to `run` (exit 130); SIGTERM to the whole process group of the `resume` that
    continues it, as `timeout` or a scheduler sends it, which takes the local Ray's GCS and raylet
    down with the driver (exit 143 within seconds, saying so: it waited a minute for the GCS, then
    exited 1 with the sweep `running`); SIGTERM to the next `resume`'s driver alone (exit 143);
    the next `resume`'s raylet killed alone (exit 1 within seconds, saying so, the sweep recorded
    stopped: it exited 1 at once, silently, with the sweep `running`, when tune.with_parameters
    had put objects of the driver in the raylet's object store); then a `resume` that finishes it."""
    steps = 30
    driver = Command(tmp_path, "run", str(space(tmp_path, 2, steps)))
    sweep_dir = driver.sweep_dir()
    assert driver.wait_for(r"t000 step\s+3/"), driver.text()[-3000:]  # a trial has reported
    os.kill(driver.proc.pid, signal.SIGINT)
    check_interrupted(driver, sweep_dir, 130)

    resumed = Command(tmp_path, "resume", str(sweep_dir))
    assert resumed.wait_for(r"t000 step"), resumed.text()[-3000:]
    # both trials the worker held (max_concurrent 2) continue, each from its own checkpoint
    assert re.search(r"continuing 2 \(t000 from step-\d+, t00\d from step-\d+\)", resumed.text()), resumed.text()[-3000:]
    signalled = time.monotonic()
    os.killpg(resumed.proc.pid, signal.SIGTERM)  # Command starts its own session: the driver's group, its Ray's servers in it
    check_interrupted(resumed, sweep_dir, 143)
    assert time.monotonic() - signalled < 15
    assert "Ray's own processes ended (" in resumed.text() and "SIGTERM came to the whole process group" in resumed.text(), resumed.text()[-3000:]

    again = Command(tmp_path, "resume", str(sweep_dir))
    assert again.wait_for(r"t000 step"), again.text()[-3000:]
    os.kill(again.proc.pid, signal.SIGTERM)
    check_interrupted(again, sweep_dir, 143, may_finish=True)

    lone = Command(tmp_path, "resume", str(sweep_dir))
    assert lone.wait_for(r"t000 step"), lone.text()[-3000:]
    (raylet,) = [pid for pid, (name, _) in servers_of(lone.proc.pid).items() if name == "raylet"]
    signalled = time.monotonic()
    os.kill(raylet, signal.SIGTERM)  # the trials' workers end with it (their owner's node is gone)
    check_interrupted(lone, sweep_dir, 1, may_finish=True)
    assert time.monotonic() - signalled < 20
    assert "Ray's own processes ended (raylet: killed, or out of memory?)" in lone.text(), lone.text()[-3000:]

    final = Command(tmp_path, "resume", str(sweep_dir))
    assert final.end(400) == 0, final.text()[-3000:]
    check_whole(sweep_dir, 2, steps)


WRAPPING_UP = "wrapping up (no trial was running)"


def test_sigterm_while_starting_exits_143_and_resume_finishes_the_sweep(tmp_path: Path) -> None:
    """SIGTERM before any trial runs: inside ray.init (whose own handler would exit with status
    15), and once Ray has started and the sweep's folder is made. Either way the command exits
    143, says so, and stops its Ray; the folder made resumes to a whole sweep."""
    for point, delay in (("ray: starting a local instance", 0.5), ("sweep folder: ", 0.0)):
        driver = Command(tmp_path, "run", str(space(tmp_path, 2)))
        assert driver.wait_for(point), driver.text()[-3000:]
        time.sleep(delay)
        ray = ray_processes(driver.proc.pid)
        os.kill(driver.proc.pid, signal.SIGTERM)
        out = (driver.end(120), driver.text())
        assert out[0] == 143, (point, out[1][-3000:])
        if "interrupted (interrupted by SIGTERM)" not in out[1]:  # the trials had started: a resumable stop
            assert f"SIGTERM while starting or {WRAPPING_UP}" in out[1], (point, out[1][-3000:])
        assert not ours_crashed(out[1]), (point, out[1][-3000:])
        deadline = time.monotonic() + 15
        while [p for p in ray if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in ray if alive(p)], (point, "Ray processes outlived the stopped driver")
    # the second left a sweep folder (stopped while it set up, or in its first trial): resume finishes it
    sweep_dir = driver.sweep_dir()
    assert json.loads((sweep_dir / "sweep.json").read_text())["state"] == "stopped"
    final = Command(tmp_path, "resume", str(sweep_dir))
    assert final.end(400) == 0, final.text()[-3000:]
    check_whole(sweep_dir, 2)


CHAOS_SEED = int(os.environ.get("LORA_SWEEP_CHAOS_SEED", "13"))


def test_chaos_one_sweep_interrupted_every_way_still_ends_whole(tmp_path: Path) -> None:
    """SIGINT, SIGTERM, SIGTERM to the whole process group (what `timeout` and schedulers send: it
    takes Ray's GCS and raylet down with the driver), kill -9 of the driver, kill -9 of a trial's
    worker, and a worker killed just before the driver, in a seeded random order at seeded random
    points, a resume after each; then the sweep's invariants."""
    rng = random.Random(CHAOS_SEED)
    actions = ["SIGINT", "SIGTERM", "SIGTERM group", "kill driver", "kill worker", "kill worker, then driver"]
    rng.shuffle(actions)
    trials = 8  # room for every action before the sweep ends by itself (each waits 1-3 evaluations, 4 per trial)
    spec = space(tmp_path, trials)
    cmd = Command(tmp_path, "run", str(spec))
    sweep_dir = cmd.sweep_dir()
    started = time.monotonic()
    done = []
    after_end = False  # the last signal came after the command had ended by itself
    for action in actions:
        # a random point: after 1-3 more evaluations of this driver, plus up to a second
        seen = len(re.findall(r"t\d{3} step", cmd.text()))
        if not cmd.wait_for(r"t\d{3} step", count=seen + rng.randint(1, 3)):
            break  # the sweep finished first: the rest is checked as it is
        time.sleep(rng.uniform(0, 1.0))
        if action.startswith("kill worker"):
            workers = trial_workers(cmd.proc.pid)
            if not workers:
                continue  # between trials: nothing to kill here
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            if action == "kill worker":
                done.append(action)
                continue  # the driver retries the trial from its checkpoint by itself
        ray = ray_processes(cmd.proc.pid)
        signalled = time.monotonic()
        if action == "SIGTERM group":
            os.killpg(cmd.proc.pid, signal.SIGTERM)  # Command starts its own session: the group is the driver's and its Ray's
        else:
            os.kill(cmd.proc.pid, {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}.get(action, signal.SIGKILL))
        code = cmd.end(120)
        after_end = json.loads((sweep_dir / "sweep.json").read_text())["state"] == "finished"
        if code == 0 or WRAPPING_UP in cmd.text() or after_end:
            # it had finished on its own just then: the signal came while it wrapped up, or once the
            # command had ended and the process was exiting (its handlers back to the defaults: the
            # signal's own status, the sweep whole)
            break
        assert code == {"SIGINT": 130, "SIGTERM": 143, "SIGTERM group": 143}.get(action, -9), (action, cmd.text()[-3000:])
        done.append(action)
        if action.endswith("driver"):
            # its Ray goes with it within seconds (not a minute later), and its time was counted
            deadline = time.monotonic() + 15
            while [p for p in ray if alive(p)] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not [p for p in ray if alive(p)], "Ray processes outlived the killed driver"
            assert json.loads((sweep_dir / "sweep.json").read_text())["elapsed_seconds"] > 0
        else:  # like `stop`: the interrupted trial stays open in the study, its run is resumable
            assert time.monotonic() - signalled < 15, (action, "the stop took longer than 15 s")
            if action == "SIGTERM group":  # Ray's servers went with the driver: it says so and how to go on, at once
                assert "Ray's own processes ended" in cmd.text() and "SIGTERM came to the whole process group" in cmd.text(), cmd.text()[-3000:]
            out = cmd.text()
            assert f"continue with:  python -m sweep resume {shlex.quote(str(sweep_dir))}" in out and not ours_crashed(out), out[-3000:]
            meta, study, (parent, *children) = stores(sweep_dir)
            assert meta["state"] == "stopped" and parent.info.status == "KILLED" and not (sweep_dir / "driver.pid").exists()
            assert "PRUNED" not in [t.state.name for t in study]
            assert "RUNNING" not in [r.info.status for r in children]
        # every open trial with a complete checkpoint continues from it, never from step 0
        meta, study, _ = stores(sweep_dir)
        saved = {f"t{t.number:03d}" for t in study if t.state.name == "RUNNING" and list((sweep_dir / "trials" / f"t{t.number:03d}").glob("step-*/member.json"))}
        cmd = Command(tmp_path, "resume", str(sweep_dir))
        assert cmd.wait_for(r"resuming \S+: .*; \d+ new to run"), cmd.text()[-3000:]
        continuing = dict(re.findall(r"(t\d{3}) from (step-\d+|the start)", cmd.text().split("resuming ", 1)[1].splitlines()[0]))
        assert all(continuing.get(label, "").startswith("step-") for label in saved), (action, saved, continuing)
    code = cmd.end(400)
    # a signal while it wrapped up: the exit code of that signal; the sweep is whole all the same
    assert code == 0 or (code in (130, 143) and WRAPPING_UP in cmd.text()) or after_end, cmd.text()[-3000:]
    print(f"chaos seed {CHAOS_SEED}: {', '.join(done)} in {time.monotonic() - started:.0f}s")
    assert len(done) >= 4, (done, cmd.text()[-3000:])
    check_whole(sweep_dir, trials)
