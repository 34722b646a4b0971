"""`status` and `list` stay quick (no MLflow, Ray, torch or Optuna import: the study is read straight
from its sqlite file) and `status --watch` draws a table of the trials until the sweep's driver ends.

The sweep is built by hand: sweep.json, resolved.yaml, an Optuna study of three trials (t000
completed, t001 pruned, t002 open) and Ray Tune's result.json of t002; MLflow is a tracking
server that is never contacted (status no longer reads it)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweep.cli import main
from sweep.config import load_config
from tests.conftest import MINIMAL, ROOT, write_space

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sweep folder whose driver is gone: t000 completed, t001 pruned, t002 stopped at step 4 of 8."""
    import optuna

    from core.contract import STATUS, TrialStatus
    from sweep.engine.study import DefineByRun, name_objectives

    base = tmp_path_factory.mktemp("watch")
    body = MINIMAL.replace("max_steps: 4", "max_steps: 8") + "tracking: {mlflow_uri: 'http://127.0.0.1:9', experiment: t}\n"
    space = write_space(base, body)
    cfg = load_config(space)
    folder = base / "sweeps" / "t-20260101-000000"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(space.read_text())
    (folder / "resolved.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
    storage = f"sqlite:///{folder / 'optuna.db'}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="t", storage=storage, direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    name_objectives(study, ["eval_loss"])
    define = DefineByRun(cfg.space, cfg.fixed_hyperparams)
    for number, ray_id in enumerate(("aaaa0000", "bbbb1111", "cccc2222")):
        trial = study.ask()
        define(trial)
        trial.set_user_attr("ray_trial_id", ray_id)
        trial.report(3.0 - number / 10, step=2)
        if number == 0:
            trial.report(2.0, step=8)
            trial.set_user_attr(STATUS, str(TrialStatus.COMPLETED))
            study.tell(trial, 2.0)
        elif number == 1:
            trial.set_user_attr(STATUS, str(TrialStatus.PRUNED))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    trial_dir = folder / "trials" / "t002"  # what its worker writes at each evaluation
    trial_dir.mkdir(parents=True)
    reports = [{"step": 2, "eval_loss": 2.8, "tokens_per_sec": 1000.0, "peak_rss_gb": 0.5, "trial_status": "running", "time": 1_700_000_010.0},
               {"step": 4, "eval_loss": 2.6, "tokens_per_sec": 1234.0, "peak_rss_gb": 0.75, "trial_status": "running", "time": 1_700_000_014.0}]  # fmt: skip
    (trial_dir / "reports.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reports))
    meta = {"name": "t", "space_file": str(space), "overrides": [], "mlflow_uri": "http://127.0.0.1:9", "experiment": "t", "experiment_id": "1",
            "parent_run_id": "p", "optuna_storage": storage, "study_name": "t", "metric": "eval_loss", "num_trials": 4, "concurrency": 1,
            "started": "2026-01-01T00:00:00", "elapsed_seconds": 60.0, "state": "stopped"}  # fmt: skip
    (folder / "sweep.json").write_text(json.dumps(meta))
    return folder


def test_status_reads_the_study_and_the_trial_folders(stopped: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["status", str(stopped), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {"completed": 1, "pruned": 1, "stopped": 1} and info["finished"] == 3 and info["num_trials"] == 4
    assert info["best"] == {"trial": "t000", "value": 2.0}
    t000, t001, t002 = info["trials"]
    assert (t000["status"], t000["step"], t000["eval_loss"]) == ("completed", 8, 2.0)
    assert (t001["status"], t001["step"], t001["eval_loss"], t001["tokens_per_sec"]) == ("pruned", 2, 2.9, None)  # no reports of its own: the study's last eval
    assert (t002["status"], t002["step"], t002["max_steps"], t002["eval_loss"], t002["tokens_per_sec"], t002["peak_rss_gb"]) == ("stopped", 4, 8, 2.6, 1234.0, 0.75)
    assert t002["eta_seconds"] is None and t002["config"].startswith("lora r")


def test_the_study_file_reads_as_optuna_reads_it(stopped: Path) -> None:
    from sweep.folder.studyfile import _read_optuna, read_study

    storage = f"sqlite:///{stopped / 'optuna.db'}"
    assert read_study(storage, "t", stopped) == _read_optuna(storage, "t", stopped)
    with pytest.raises(KeyError):
        read_study(storage, "no-such-study", stopped)


def test_status_and_list_import_neither_mlflow_nor_ray_nor_torch(stopped: Path) -> None:
    code = (
        "import sys; from sweep.cli import main; "
        f"assert main(['status', {str(stopped)!r}]) == 0; assert main(['list', {str(stopped.parent)!r}]) == 0; "
        "print('HEAVY', sorted(m for m in ('mlflow', 'ray', 'torch', 'optuna', 'sqlalchemy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=stopped.parent, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
    assert "t-20260101-000000: stopped" in result.stdout and "1 completed, 1 pruned, 1 stopped" in result.stdout


def test_watch_of_a_sweep_without_a_driver_draws_once_and_exits_0(stopped: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sweep", "status", str(stopped), "--watch", "1"], cwd=stopped.parent, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("TRIAL  STATUS") == 1 and "no driver is running it; nothing more will change" in out, out
    assert "t002   stopped    4/8   2.6000     1234   0.75 GB RSS" in out, out


def test_watch_redraws_while_the_driver_lives_and_ctrl_c_exits_0(stopped: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / stopped.name
    shutil.copytree(stopped, folder)
    meta = json.loads((folder / "sweep.json").read_text())
    (folder / "sweep.json").write_text(json.dumps({**meta, "state": "running"}))
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # the "driver"
    try:
        (folder / "driver.pid").write_text(json.dumps({"pid": stand_in.pid, "host": socket.gethostname()}))
        # started with SIGINT ignored, as a parent that ignores it leaves it (inherited across exec): Ctrl-C still leaves
        watch = subprocess.Popen([sys.executable, "-m", "sweep", "status", str(folder), "--watch", "0.2"], cwd=tmp_path, env=ENV,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
        seen, deadline = [], time.monotonic() + 180  # generous: CI shares 2 cores with other work
        while sum("TRIAL  STATUS" in line for line in seen) < 2 and time.monotonic() < deadline:
            seen.append(watch.stdout.readline())
        watch.send_signal(signal.SIGINT)
        try:
            rest, err = watch.communicate(timeout=180)
        finally:
            if watch.poll() is None:
                watch.kill()
        assert watch.returncode == 0, err
    finally:
        stand_in.kill()
        stand_in.wait()
    out = "".join(seen) + rest
    assert out.count("TRIAL  STATUS") >= 2, out  # redrawn
    assert "running (driver pid" in out and "every 0.2s; Ctrl-C to leave" in out
    row = next(line for line in out.splitlines() if line.startswith("t002"))
    assert "running" in row and " 4/8 " in row and "0m08s" in row, row  # 4 steps left at 2 s a step (10 s at step 2, 14 s at step 4)
