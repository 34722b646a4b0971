"""The morning-after commands without friction: the MLflow runs-table link, `--json` on status /
best / estimate / validate, `list`, named study objectives, `--version`, `--help`, the console script.

The finished sweep is tests/finished_sweep.py's (sweep.json, an Optuna study and an MLflow store with a
parent run and its trials), built by hand, not run: milliseconds, not minutes."""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest

from core.contract import EVAL_LOSS, PEAK_VRAM_GB
from sweep.cli import main
from sweep.config import load_config
from tests.conftest import MINIMAL, ROOT, write_space
from tests.finished_sweep import build_finished_sweep



@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(a finished sweep's folder, its MLflow experiment id): three trials, t001 the best; written
    before the scheduled learning rate's metric was renamed `lr` (it is `learning_rate` here)."""

    def old_rate_metric(client: Any, run: str) -> None:
        for step, rate in ((1, 2e-4), (2, 3.6e-6)):  # written before the rename: the scheduled rate under the param's name
            client.log_metric(run, "learning_rate", rate, step=step)

    sweep = build_finished_sweep(tmp_path_factory.mktemp("morning"), concurrency=1, elapsed_seconds=754.0, log_more=old_rate_metric)
    return sweep.folder, sweep.experiment


def runs_link(experiment: str, folder: Path) -> str:
    """The runs table of a sweep written before its view was an experiment tag: the URL sorts by the
    objective and keeps the sweep's trials (MLflow 3 honours orderByKey, orderByAsc, searchFilter)."""
    parent = json.loads((folder / "sweep.json").read_text())["parent_run_id"]
    return (f"http://127.0.0.1:5000/#/experiments/{experiment}/runs?workflowType=machine_learning"
            f"&searchFilter=tags.mlflow.parentRunId%20%3D%20%27{parent}%27&orderByKey=metrics.%60eval_loss%60&orderByAsc=true")  # fmt: skip


def test_status_prints_the_runs_table_link_and_json(finished: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    folder, experiment = finished
    assert main(["status", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"open the MLflow UI:  mlflow ui --backend-store-uri sqlite:///{folder.parent / 'mlflow.db'} --port 5000" in out  # the link's port
    assert f"its runs:  {runs_link(experiment, folder)}" in out
    # the best as every other command labels a trial, not the study's dict of raw floats
    assert re.search(r"^best so far: t001  eval_loss 1\.7500  \(lora r\d+ a\d+ lr\d+e-\d+ b\d+x\d+ \S+\)$", out, re.M), out
    assert main(["status", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # stdout is the JSON document and nothing else
    assert info["counts"] == {"completed": 2, "pruned": 1} and info["finished"] == 3 and info["num_trials"] == 3
    assert info["best"] == {"trial": "t001", "value": 1.75}
    assert info["mlflow"]["runs"] == runs_link(experiment, folder) and info["elapsed_seconds"] == 754.0


def test_best_prints_the_link_and_json(finished: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    folder, experiment = finished
    assert main(["best", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "best trial: t001  eval_loss 1.7500" in out and f"its runs:  {runs_link(experiment, folder)}" in out
    assert main(["best", str(folder), "--json", "--where", "peak_vram_gb<=1.5"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["best"]["trial"] == "t000" and info["best"]["eval_loss"] == 2.5 and info["where"] == "peak_vram_gb<=1.5"
    assert info["best"]["space"]["name"] == "t-t000" and info["best"]["space"]["train"]["method"] == "lora"  # ready to run
    assert info["mlflow"]["runs"] == runs_link(experiment, folder)
    assert main(["best", str(folder), "--json", "--where", "peak_vram_gb<=0.5"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["best"] is None and info["counts"] == {"completed": 2, "pruned": 1}


def test_best_where_names_what_the_sweep_has(finished: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    folder, _ = finished
    assert main(["best", str(folder), "--where", "peak_rss_gb<=2"]) == 2  # a GPU sweep: no peak_rss_gb
    err = capsys.readouterr().err
    assert "--where peak_rss_gb<=2: peak_rss_gb is neither a metric this sweep recorded nor a hyperparameter" in err
    assert "its metrics: eval_loss, lr, peak_vram_gb; or hyperparameters: method, lora_r, " in err  # the old learning_rate metric reads as lr
    assert main(["best", str(folder), "--where", "lora_r>=1, method==lora, target_modules==all-linear, batch==4x8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["trial"] == "t001"
    assert main(["best", str(folder), "--where", "method==qlora"]) == 1
    assert "no completed trial with method==qlora" in capsys.readouterr().out
    assert main(["best", str(folder), "--where", "lora_r=4"]) == 2 and "unknown comparison '='" in capsys.readouterr().err


def test_a_sweep_written_before_the_lr_rename_reads_back(finished: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    """Its `learning_rate` metric (the last scheduled value) is read as `lr`; `learning_rate` in
    --where is the hyperparameter (the peak, 2e-4), never that metric; status and report work."""
    folder, _ = finished
    assert main(["best", str(folder), "--where", "lr<1e-5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["trial"] == "t001"
    assert main(["best", str(folder), "--where", "learning_rate>=1e-4"]) == 0
    assert "best trial with learning_rate>=1e-4: t001" in capsys.readouterr().out
    assert main(["best", str(folder), "--where", "learning_rate<=1e-5"]) == 1  # the metric's 3.6e-6 would have passed
    assert main(["status", str(folder)]) == 0
    assert main(["report", str(folder)]) == 0
    assert (folder / "report" / "report.html").is_file()


def test_json_is_all_a_fresh_process_prints_on_stdout(finished: tuple[Path, str]) -> None:
    from tests.unit.test_cli import sweep

    folder, experiment = finished
    result = sweep("status", str(folder), "--json", cwd=folder.parent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["mlflow"]["runs"] == runs_link(experiment, folder)


def test_the_experiment_id_is_looked_up_when_sweep_json_lacks_it(finished: tuple[Path, str]) -> None:
    from sweep.folder import SweepFolder

    folder, experiment = finished
    sweep = SweepFolder(folder)
    assert sweep.experiment_id() == experiment
    del sweep.meta["experiment_id"]  # a sweep started before it was recorded
    assert sweep.experiment_id() == experiment


def test_links_of_a_tracking_server() -> None:
    from sweep.folder import mlflow_links, run_link

    links = mlflow_links("https://user:secret@mlflow.example.com/", "7")
    assert links == {"command": None, "ui": "https://user:***@mlflow.example.com", "runs": "https://user:***@mlflow.example.com/#/experiments/7/runs?workflowType=machine_learning"}
    assert run_link(links, "abc") == "https://user:***@mlflow.example.com/#/experiments/7/runs/abc?workflowType=machine_learning"  # not MLflow's GenAI run page
    assert mlflow_links("sqlite:////tmp/my runs/mlflow.db", None) == {"command": "mlflow ui --backend-store-uri 'sqlite:////tmp/my runs/mlflow.db' --port 5000", "ui": "http://127.0.0.1:5000", "runs": None}


def test_list_shows_each_sweep_and_each_broken_folder_with_its_problem(finished: tuple[Path, str], capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    import shutil

    folder, _ = finished
    results = tmp_path / "sweeps"
    shutil.copytree(folder, results / folder.name)
    (results / "mlartifacts").mkdir()  # MLflow's artifacts beside the sweeps: not a sweep, not listed
    (results / "notes").mkdir()
    (results / "broken").mkdir()
    (results / "broken" / "sweep.json").write_text("{not json")
    lost = results / "t-lost"
    shutil.copytree(folder, lost)
    (lost / "optuna.db").unlink()
    meta = json.loads((lost / "sweep.json").read_text())
    (lost / "sweep.json").write_text(json.dumps({**meta, "optuna_storage": f"sqlite:///{lost / 'optuna.db'}", "started": "2026-02-01T00:00:00"}))
    (results / "t-damaged").mkdir()
    (results / "t-damaged" / "optuna.db").write_bytes(b"x" * 100)
    (results / "t-damaged" / "sweep.json").write_text(json.dumps({**meta, "optuna_storage": f"sqlite:///{results / 't-damaged' / 'optuna.db'}", "state": "running"}))

    assert main(["list", str(results), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_folder = {Path(e["folder"]).name: e for e in listing["sweeps"]}
    assert sorted(by_folder) == ["broken", "notes", "t-20260101-000000", "t-damaged", "t-lost"]
    good = by_folder[folder.name]
    assert good["trials"] == {"completed": 2, "pruned": 1} and good["best"] == {"trial": "t001", "value": 1.75} and good["metric"] == EVAL_LOSS
    assert good["state"] == "finished" and good["started"] == "2026-01-01T00:00:00" and good["elapsed_seconds"] == 754.0 and good["problem"] is None
    assert by_folder["notes"]["problem"] == "no sweep.json" and by_folder["broken"]["problem"].startswith("sweep.json unreadable")
    assert by_folder["t-lost"]["problem"] == f"its study is missing ({lost / 'optuna.db'})" and not (lost / "optuna.db").exists()
    assert by_folder["t-damaged"]["state"] == "interrupted" and by_folder["t-damaged"]["problem"].startswith("study unreadable")

    assert main(["list", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["NAME", "STATE", "TRIALS", "BEST", "STARTED", "ELAPSED"]
    row = next(line for line in lines if line.endswith(str(results / folder.name)))
    assert "finished" in row and "2 completed, 1 pruned" in row and "t001  eval_loss 1.7500" in row and "12m34s" in row


def test_list_of_a_missing_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["list", str(tmp_path / "nowhere")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no such folder" in captured.err


def test_validate_and_estimate_json(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = write_space(tmp_path, MINIMAL)
    assert main(["validate", str(space), "search.num_trials=3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["valid"] and info["num_trials"] == 3 and info["max_steps"] == 4 and info["config"]["name"] == "t"
    assert info["space"].startswith("2")
    assert main(["estimate", str(space), "--gpu-memory", "24", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "tiny-gemma3" and info["gpu_memory_gb"] == 24 and len(info["corners"]) >= 1


def test_estimate_json_of_a_finished_sweep(finished: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    folder, _ = finished
    assert main(["estimate", str(folder), "--gpu-memory", "24", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["trial"] for r in info["trials"]] == ["t000", "t001", "t002"]
    assert [r["measured_gb"] for r in info["trials"]] == [1.0, 2.0, 3.0]
    assert main(["estimate", str(folder), "--gpu-memory", "24"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:2] == ["trial", "method"] and [line.split()[0] for line in lines[3:]] == ["t000", "t001", "t002"]  # whose row is whose


def test_version_and_each_help_begins_with_what_the_command_does(capsys: pytest.CaptureFixture) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lora-sweep {version('lora-sweep')}"
    summaries = {
        "validate": "Check a space file;", "run": "Run a sweep.", "submit": "Send the sweep to a Ray cluster", "resume": "Finish a sweep",
        "status": "A sweep's trials by status", "stop": "Running trials checkpoint and stop", "report": "An HTML report",
        "best": "The best trial", "estimate": "Predicted peak GPU memory", "list": "The sweeps of a results folder",
    }  # fmt: skip
    for command, summary in summaries.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert text.startswith(summary), (command, text[:80])
        assert f"usage: python -m sweep {command}" in text


def test_the_console_script_is_the_cli() -> None:
    import importlib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["lora-sweep"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_the_study_names_its_objectives() -> None:
    import optuna

    from sweep.engine.study import name_objectives

    study = optuna.create_study(directions=["minimize", "minimize"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's ExperimentalWarning stays out of the sweep's output
        name_objectives(study, [EVAL_LOSS, PEAK_VRAM_GB])
        name_objectives(study, [EVAL_LOSS, PEAK_VRAM_GB])  # a resumed sweep: again, harmlessly
    assert study.metric_names == [EVAL_LOSS, PEAK_VRAM_GB]
    trial = study.ask()
    study.tell(trial, [1.0, 2.0])
    assert list(study.trials_dataframe(multi_index=True)["values"].keys()) == [EVAL_LOSS, PEAK_VRAM_GB]


def test_the_new_study_names_its_objectives(tmp_path: Path) -> None:
    """Where the study is created: optuna-dashboard says eval_loss, not Objective 0."""
    import optuna

    from sweep.engine.study import create_study

    for body, names in ((MINIMAL, [EVAL_LOSS]), (MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 2, objectives: [{eval_loss: min}, {peak_vram_gb: min}]}"), [EVAL_LOSS, PEAK_VRAM_GB])):
        folder = tmp_path / str(len(names))
        folder.mkdir()
        cfg = load_config(write_space(folder, body))
        storage = f"sqlite:///{folder / 'optuna.db'}"
        with warnings.catch_warnings():
            warnings.simplefilter("error", optuna.exceptions.ExperimentalWarning)
            create_study(cfg, storage, cfg.name)
        assert optuna.load_study(study_name="t", storage=storage).metric_names == names
        assert sqlite3.connect(folder / "optuna.db").execute("SELECT count(*) FROM studies").fetchone() == (1,)


# ----------------------------------------------------------------------------------------------
# part two: what a shell sees


def test_options_and_arguments_in_any_order(finished: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """As users type them: an option before the overrides, --watch before the folder."""
    space = write_space(tmp_path, MINIMAL)
    assert main(["validate", str(space), "--json", "search.num_trials=3"]) == 0
    assert json.loads(capsys.readouterr().out)["num_trials"] == 3
    assert main(["estimate", "--json", str(space), "--gpu-memory", "24", "search.num_trials=3"]) == 0
    assert json.loads(capsys.readouterr().out)["gpu_memory_gb"] == 24
    folder, _ = finished
    assert main(["status", "--watch", str(folder)]) == 0  # no driver runs it: drawn once
    assert "t001" in capsys.readouterr().out
    assert main(["-v", "best", "--json", str(folder)]) == 0 and json.loads(capsys.readouterr().out)["best"]["trial"] == "t001"
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(space), "--json", "--bogus"])
    assert exit_.value.code == 2 and "usage: python -m sweep validate" in capsys.readouterr().err  # the command's own usage


def test_the_installed_command_names_itself(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.argv", ["/usr/local/bin/lora-sweep", "--help"])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "usage: lora-sweep " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["status", "--help"])
    assert "usage: lora-sweep status" in capsys.readouterr().out


def test_validate_json_of_an_invalid_file_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = write_space(tmp_path, MINIMAL.replace("num_trials: 2", "num_trials: zero"))
    assert main(["validate", str(space), "--json"]) == 2
    captured = capsys.readouterr()
    info = json.loads(captured.out)  # one JSON document, not nothing
    assert info["valid"] is False and info["source"] == str(space)
    assert any(p.startswith("search.num_trials: Input should be a valid integer") for p in info["problems"])
    assert "search.num_trials" in captured.err  # the error still on stderr


def test_quiet_by_default_and_verbose_on_request(tmp_path: Path) -> None:
    """The libraries' INFO lines and progress bars stay out (MLflow creating its tables, datasets
    saving a dataset, Optuna creating a study); -v brings them back."""
    code = (
        "import sys\n"
        "from sweep.cli import _Quiet\n"
        "def work():\n"
        "    import datasets, optuna\n"
        "    from mlflow import MlflowClient\n"
        f"    MlflowClient('sqlite:///{tmp_path}/' + sys.argv[1] + '.db').search_experiments()\n"
        f"    optuna.create_study(storage='sqlite:///{tmp_path}/' + sys.argv[1] + '-optuna.db')\n"
        f"    datasets.Dataset.from_dict({{'a': list(range(50))}}).save_to_disk('{tmp_path}/' + sys.argv[1] + '-data')\n"
        "if sys.argv[1] == 'quiet':\n"
        "    with _Quiet(no_bars=False):\n"
        "        work()\n"
        "else:\n"
        "    work()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key in _quiet_env():
        env.pop(key, None)
    loud = subprocess.run([sys.executable, "-c", code, "loud"], capture_output=True, text=True, env=env, timeout=120)
    quiet = subprocess.run([sys.executable, "-c", code, "quiet"], capture_output=True, text=True, env=env, timeout=120)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr[-2000:] + quiet.stderr[-2000:]
    for noise in ("INFO mlflow", "A new study created", "Saving the dataset"):  # noqa: the loud run shows each
        assert noise in loud.stderr, noise  # what the libraries print on their own ...
        assert noise not in quiet.stderr + quiet.stdout, noise  # ... and not under the CLI
    from sweep.cli import parse_args

    assert parse_args(["-v", "run", "x.yaml"]).verbose and parse_args(["run", "x.yaml", "--verbose"]).verbose and not parse_args(["run", "x.yaml"]).verbose


def _quiet_env() -> list[str]:
    from sweep.cli import _Quiet

    return [*_Quiet.ENV, *_Quiet.BARS]


def test_dashboard_serves_the_sweeps_study(finished: tuple[Path, str], capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (the test extra has it)")
    from sweep.readback.dashboard import dashboard

    folder, _ = finished
    served: dict = {}
    dashboard(folder, "127.0.0.1", 8099, print, serve=lambda storage, host, port: served.update(storage=storage, host=host, port=port))
    assert served == {"storage": f"sqlite:///{folder / 'optuna.db'}", "host": "127.0.0.1", "port": 8099}
    assert re.search(r"optuna-dashboard of t-20260101-000000 \(study 't'\): http://127\.0\.0\.1:8099/dashboard/studies/\d+", capsys.readouterr().out)
    # the app optuna-dashboard serves on that storage lists the study, its three trials
    from optuna_dashboard import wsgi

    app = wsgi(served["storage"])
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/studies", "QUERY_STRING": "", "wsgi.input": io.BytesIO(), "wsgi.errors": io.StringIO(),
               "SERVER_NAME": "x", "SERVER_PORT": "1", "wsgi.url_scheme": "http"}  # fmt: skip
    body = b"".join(app(environ, lambda status, headers, exc_info=None: None))
    (study,) = json.loads(body)["study_summaries"]
    assert study["study_name"] == "t"


def test_dashboard_without_optuna_dashboard_says_what_to_install(finished: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    folder, _ = finished
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import optuna_dashboard raises ImportError
    assert main(["dashboard", str(folder)]) == 2
    err = capsys.readouterr().err
    assert 'optuna-dashboard is not installed; install it with  pip install -e ".[dashboard]"' in err
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("optuna-dashboard") for r in extras["dashboard"])


def test_the_store_files_read_as_mlflow_reads_them(finished: tuple[Path, str]) -> None:
    """best and estimate read a sqlite MLflow store's runs without MLflow (sweep.folder.runsfile):
    the same runs, tags, params and latest metrics as MlflowClient.search_runs gives."""
    from sweep.folder import SweepFolder
    from sweep.folder.runsfile import child_runs

    folder, _ = finished
    sweep = SweepFolder(folder)
    fast = {r.info.run_id: r for r in child_runs(sweep.mlflow_uri, sweep.parent_run_id)}
    slow = {r.info.run_id: r for r in sweep.children(sweep.mlflow())}
    assert set(fast) == set(slow) and len(fast) == 3
    for run_id, run in slow.items():
        mine = fast[run_id]
        assert (mine.info.status, mine.info.experiment_id) == (run.info.status, run.info.experiment_id)
        assert mine.data.tags == run.data.tags and mine.data.params == run.data.params and mine.data.metrics == run.data.metrics
    assert child_runs("http://mlflow-host:5000", sweep.parent_run_id) is None  # a server: read through MLflow


def test_best_and_estimate_answer_without_mlflow_optuna_or_torch(finished: tuple[Path, str]) -> None:
    """`best` took 4-6 s and `estimate` 8-12 s, most of it importing MLflow, Optuna, torch and
    transformers' Gemma 3: sqlite stores are read from their files, the model's counts cached."""
    folder, _ = finished
    code = (
        "import sys\n"
        "from sweep.cli import main\n"
        f"assert main(['best', {str(folder)!r}]) == 0\n"
        f"assert main(['estimate', {str(folder)!r}, '--gpu-memory', '24']) == 0\n"  # the counts: cached by the fixture's estimates before
        "print(sorted(m for m in ('mlflow', 'optuna', 'torch', 'transformers') if m in sys.modules))\n"
    )
    assert main(["estimate", str(folder), "--gpu-memory", "24"]) == 0  # fills the cache, as `run` does
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_the_model_counts_are_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import trainable.model
    from sweep.readback.memory import load_profile

    cfg = load_config(write_space(tmp_path, MINIMAL))
    first = load_profile(cfg)
    monkeypatch.setattr(trainable.model, "meta_model", lambda *a, **k: pytest.fail("built the model again"))
    assert load_profile(cfg) == first
