"""A damaged or read-only sweep folder, and a study holding more than the sweep's trials: every
command says which file is wrong and what is wrong (exit 2, never a traceback), the commands that
only read never write, and run, status, list, best, report and estimate count the same trials.

The finished sweep is tests/finished_sweep.py's (sweep.json, an Optuna study and an MLflow store with a
parent run and its trials, built by hand): three trials ran (t000, t001
completed, t002 pruned); the study also holds what `run` leaves besides them: a proposal still
waiting in the queue for a worker when the sweep ended (closed stopped), an entry asked but never
sampled, and two start-up points still queued (WAITING)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sqlite3
import tempfile
from pathlib import Path

import pytest

from core.contract import ATTR_WORKER, STATUS, TrialStatus
from sweep.cli import main
from sweep.config import load_config
from tests.conftest import MINIMAL, write_space
from tests.finished_sweep import build_finished_sweep

RAN = {"completed": 2, "pruned": 1}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import optuna

    sweep = build_finished_sweep(tmp_path_factory.mktemp("faults"), concurrency=2, elapsed_seconds=60.0)
    study = sweep.study
    queued = study.ask()  # proposed for a worker of another method, still in the queue when the sweep ended: closed, never run
    sweep.define(queued)
    queued.set_user_attr(STATUS, str(TrialStatus.STOPPED))
    study.tell(queued, state=optuna.trial.TrialState.PRUNED)
    study.ask()  # asked, never sampled (its driver died in between): RUNNING without params
    study.enqueue_trial({"lora_r": 4})  # start-up points the sweep never reached: WAITING
    study.enqueue_trial({"lora_r": 8})
    return sweep.folder


@pytest.fixture()
def sweep_dir(built: Path, tmp_path: Path) -> Path:
    """A copy of the built sweep (its results folder: the sweep and the MLflow store) to damage."""
    results = tmp_path / "sweeps"
    shutil.copytree(built.parent, results)
    folder = results / built.name
    meta = json.loads((folder / "sweep.json").read_text())
    meta.update(optuna_storage=f"sqlite:///{folder / 'optuna.db'}", mlflow_uri=f"sqlite:///{results / 'mlflow.db'}")
    (folder / "sweep.json").write_text(json.dumps(meta))
    return folder


def as_live_driver(folder: Path) -> None:
    """driver.pid naming this (live) process: status and stop see a running driver."""
    (folder / "driver.pid").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))


# ----------------------------------------------------------------------------------------------
# a damaged sweep.json


DAMAGES = {
    "truncated": (lambda text: text[:100], "is not valid JSON ("),
    "empty": (lambda text: "", "is empty (0 bytes: truncated?)"),
    "a list": (lambda text: "[]", "holds a list, not an object"),
    "a missing key": (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "study_name"}), "lacks study_name"),
    "a wrong type": (lambda text: json.dumps({**json.loads(text), "num_trials": "three"}), "num_trials is 'three', not a number"),
}
FOLDER_COMMANDS = (["status"], ["status", "--json"], ["status", "--watch", "1"], ["report"], ["best"], ["best", "--json"], ["resume"], ["stop"], ["estimate"])


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_sweep_json_exits_2_naming_the_file_in_every_command(sweep_dir: Path, damage: str, capsys: pytest.CaptureFixture) -> None:
    change, said = DAMAGES[damage]
    meta_file = sweep_dir / "sweep.json"
    meta_file.write_text(change(meta_file.read_text()))
    before = sorted(p.name for p in sweep_dir.iterdir())
    for command in FOLDER_COMMANDS:
        assert main([command[0], str(sweep_dir), *command[1:]]) == 2, command
        captured = capsys.readouterr()
        assert captured.out == "" and f"{meta_file} {said}" in captured.err, (command, captured.err)
    assert sorted(p.name for p in sweep_dir.iterdir()) == before  # nothing written: no STOP, no report/, no driver.pid
    assert main(["list", str(sweep_dir.parent), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["sweeps"]
    assert entry["state"] == "broken" and said in entry["problem"] and str(meta_file) in entry["problem"]


# ----------------------------------------------------------------------------------------------
# the commands that only read write nothing


def test_list_leaves_an_empty_study_file_empty(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:
    study = sweep_dir / "optuna.db"
    study.write_bytes(b"")
    assert main(["list", str(sweep_dir.parent), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["sweeps"]
    assert entry["problem"] == f"study unreadable: {study} is empty (0 bytes: truncated?)" and entry["trials"] == {}
    assert study.stat().st_size == 0
    assert main(["status", str(sweep_dir)]) == 2  # and status still says why
    assert f"{study}: the sweep's Optuna study is empty (0 bytes: truncated?)" in capsys.readouterr().err


def test_a_study_file_of_another_schema_is_read_read_only(sweep_dir: Path) -> None:
    """A sqlite file without Optuna's tables: the fast reader falls back to Optuna, which would
    create its schema in it; opened read-only it cannot."""
    from sweep.config import ConfigError
    from sweep.folder.studyfile import read_study

    other = sweep_dir / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (text TEXT)")
    before = other.read_bytes()
    with pytest.raises(ConfigError, match="holds no Optuna study"):
        read_study(f"sqlite:///{other}", "t", sweep_dir)
    assert other.read_bytes() == before


def test_report_and_best_open_the_study_read_only(sweep_dir: Path) -> None:
    from sweep.readback.results import open_sweep

    sweep = open_sweep(sweep_dir)
    with pytest.raises(Exception) as info:
        sweep.study.set_user_attr("written", True)
    assert "attempt to write a readonly database" in str(info.value.__cause__)


# ----------------------------------------------------------------------------------------------
# one count of the trials


def test_run_status_list_best_report_and_estimate_count_the_same_trials(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:
    from sweep.readback.results import open_sweep

    assert main(["status", str(sweep_dir), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == RAN and (status["finished"], status["num_trials"]) == (3, 3)
    assert [row["trial"] for row in status["trials"]] == ["t000", "t001", "t002"] and all(row["config"] for row in status["trials"])
    assert main(["status", str(sweep_dir)]) == 0
    assert "trials: 3 of 3 done; 2 completed, 1 pruned" in capsys.readouterr().out
    assert main(["list", str(sweep_dir.parent), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)["sweeps"]
    assert entry["trials"] == RAN and entry["best"] == {"trial": "t001", "value": 1.75}
    assert main(["best", str(sweep_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == RAN
    assert open_sweep(sweep_dir).result.counts == RAN  # what report and run's summary count
    assert main(["estimate", str(sweep_dir), "--gpu-memory", "24", "--json"]) == 0
    assert [row["trial"] for row in json.loads(capsys.readouterr().out)["trials"]] == ["t000", "t001", "t002"]


def test_only_trials_a_worker_took_run_while_the_driver_lives(sweep_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A live sweep: one trial trains, one waits in the queue for a worker of its method; the
    queued start-up points and the entry never sampled wait too. One runs (not 5)."""
    import optuna

    from sweep.engine.study import DefineByRun

    study = optuna.load_study(study_name="t", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    cfg = load_config(json.loads((sweep_dir / "sweep.json").read_text())["space_file"])
    define = DefineByRun(cfg.space, cfg.fixed_hyperparams)
    for worker in ("w1", None):
        trial = study.ask()
        define(trial)
        if worker:
            trial.set_user_attr(ATTR_WORKER, worker)
    as_live_driver(sweep_dir)
    assert main(["status", str(sweep_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["counts"] == {**RAN, "running": 1} and len(info["trials"]) == 4


# ----------------------------------------------------------------------------------------------
# a read-only sweep folder


def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating anything in `folder` fails as on a read-only mount (chmod stops nothing for root)."""
    real_mkstemp, real_mkdir, real_write_text = tempfile.mkstemp, os.mkdir, Path.write_text

    def refused(path: object) -> bool:
        return Path(str(path)).resolve().is_relative_to(folder.resolve())

    def erofs(path: object) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def mkstemp(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:
        if dir is not None and refused(dir):
            raise erofs(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

    def mkdir(path: object, *args: object, **kwargs: object) -> None:
        if refused(path):
            raise erofs(path)
        real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

    def write_text(self: Path, *args: object, **kwargs: object) -> int:
        if refused(self):
            raise erofs(self)
        return real_write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(Path, "write_text", write_text)


def test_report_of_a_read_only_folder_exits_2(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    read_only(sweep_dir, monkeypatch)
    assert main(["report", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert f"report: cannot create {sweep_dir / 'report'} in {sweep_dir} (Read-only file system); make {sweep_dir} writable, or copy it" in err
    assert not (sweep_dir / "report").exists()


def test_stop_of_a_read_only_folder_names_the_driver_to_signal(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    (sweep_dir / "sweep.json").write_text(json.dumps({**meta, "state": "running"}))
    as_live_driver(sweep_dir)
    read_only(sweep_dir, monkeypatch)
    assert main(["stop", str(sweep_dir), "--wait", "0"]) == 2
    err = capsys.readouterr().err
    assert "cannot write STOP there (Read-only file system)" in err and f"send the driver SIGTERM (kill {os.getpid()} on {socket.gethostname()})" in err
    (sweep_dir / "driver.pid").unlink()
    assert main(["stop", str(sweep_dir)]) == 0  # no driver: nothing to tell
    assert "no driver is running" in capsys.readouterr().out
    assert not (sweep_dir / "STOP").exists()


# ----------------------------------------------------------------------------------------------
# a store whose password the folder does not keep


def test_a_password_given_literally_is_asked_for_not_tried(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`run space.yaml tracking.optuna_storage=postgresql://sweep:PASSWORD@...`: sweep.json keeps
    the override with *** for the password. Never connect with that (PostgreSQL's refusal came
    as a 110-line SQLAlchemy traceback); say what to do, and connect without it once the
    password is in PGPASSWORD, where PostgreSQL's client reads it."""
    from sweep.folder import SweepFolder

    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(sweep_dir / "no-pgpass"))
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    masked = "postgresql://sweep:***@127.0.0.1:1/optuna"  # port 1: nothing listens
    (sweep_dir / "sweep.json").write_text(json.dumps({**meta, "overrides": [f"tracking.optuna_storage={masked}"], "optuna_storage": masked}))
    assert main(["status", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert f"tracking.optuna_storage: {masked} is recorded without its password: it was given literally (on the command line)" in err
    assert "export PGPASSWORD" in err and "Traceback" not in err
    monkeypatch.setenv("PGPASSWORD", "the-password")
    assert SweepFolder(sweep_dir).optuna_storage == "postgresql://sweep@127.0.0.1:1/optuna"
    assert main(["status", str(sweep_dir)]) == 2  # nothing listens there: said in a line
    err = capsys.readouterr().err
    assert "postgresql://sweep@127.0.0.1:1/optuna: cannot read the sweep's Optuna study (" in err and "the-password" not in err


@pytest.mark.skipif(not os.environ.get("LORA_SWEEP_TEST_PG"), reason="LORA_SWEEP_TEST_PG is not set (no PostgreSQL server)")
def test_a_postgres_study_is_read_read_only_with_the_password_from_pgpassword(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """The same on a real PostgreSQL study: status and list read it with the password from
    PGPASSWORD, and an empty database they are pointed at gets no Optuna tables."""
    import uuid

    import optuna
    import psycopg

    base = os.environ["LORA_SWEEP_TEST_PG"]
    password = base.split(":")[2].split("@")[0]
    names = [f"lora_sweep_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(base + "/sweep_base", autocommit=True) as conn:
        for name in names:
            conn.execute(f"CREATE DATABASE {name}")
    full, empty = (f"{base}/{name}" for name in names)
    optuna.copy_study(from_study_name="t", from_storage=f"sqlite:///{sweep_dir / 'optuna.db'}", to_storage=full)
    monkeypatch.setenv("PGPASSFILE", str(sweep_dir / "no-pgpass"))
    meta = json.loads((sweep_dir / "sweep.json").read_text())
    for url, said in ((full, "trials: 3 of 3 done; 2 completed, 1 pruned"), (empty, "holds no Optuna study (an empty or unrelated database)")):
        masked = url.replace(f":{password}@", ":***@")
        (sweep_dir / "sweep.json").write_text(json.dumps({**meta, "overrides": [f"tracking.optuna_storage={masked}"], "optuna_storage": masked}))
        monkeypatch.delenv("PGPASSWORD", raising=False)
        assert main(["status", str(sweep_dir)]) == 2
        assert "is recorded without its password" in capsys.readouterr().err
        monkeypatch.setenv("PGPASSWORD", password)
        code = main(["status", str(sweep_dir)])
        captured = capsys.readouterr()
        assert code == (0 if url == full else 2) and said in captured.out + captured.err and password not in captured.out + captured.err
        assert main(["list", str(sweep_dir.parent)]) == 0
        assert ("2 completed, 1 pruned" if url == full else said) in capsys.readouterr().out
    with psycopg.connect(empty) as conn:
        assert conn.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'").fetchone() == (0,)


# ----------------------------------------------------------------------------------------------
# validate checks what run checks


BAD_DATA = {
    "invalid JSON": (b'{"prompt": "a", "completion": "b"}\n{"prompt": \n', " line 2: not valid JSON"),
    "not UTF-8": (b'{"prompt": "caf\xe9", "completion": "b"}\n', " line 1: byte 0xe9 at column 16 is not UTF-8"),
    "empty": (b"", ": no rows"),
    "no reply": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', " line 1: no assistant message"),
}


@pytest.mark.parametrize("fault", BAD_DATA)
def test_validate_refuses_the_data_run_refuses_and_writes_nothing(tmp_path: Path, fault: str, capsys: pytest.CaptureFixture) -> None:
    from sweep.engine.sweep import preflight
    from trainable.data import DataError

    content, said = BAD_DATA[fault]
    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(content)
    space = write_space(tmp_path, MINIMAL.replace("DEMO/train.jsonl", str(rows)) + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n")
    assert main(["validate", str(space)]) == 2
    captured = capsys.readouterr()
    assert f"{rows}{said}" in captured.err and captured.out == ""
    with pytest.raises(DataError) as run_said:  # what `run` says before it starts anything
        preflight(load_config(space), log=lambda line: None)
    assert str(run_said.value) in captured.err
    assert not (tmp_path / "out").exists()


def test_validate_passes_good_data_writing_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = write_space(tmp_path, MINIMAL.replace("max_seq_len: 128", "max_seq_len: 32") + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n")
    assert main(["validate", str(space), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any("longer than data.max_seq_len (32) lose the end of their reply" in note for note in notes)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# a moved or copied sweep folder


def tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size: what a command wrote there shows."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(params=["recorded", "earlier version"])
def original(built: Path, sweep_dir: Path, request: pytest.FixtureRequest) -> Path:
    """The finished sweep where it ran: sweep.json records the folder (`sweep_dir`), or, as one of an
    earlier version, does not (its place is told from the default study's path). Its MLflow
    artifact folders are its results folder's, as a sweep that ran there has them."""
    with sqlite3.connect(sweep_dir.parent / "mlflow.db") as db:
        old, new = built.parent.as_uri(), sweep_dir.parent.as_uri()
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    if request.param == "recorded":
        meta = json.loads((sweep_dir / "sweep.json").read_text())
        (sweep_dir / "sweep.json").write_text(json.dumps({**meta, "sweep_dir": str(sweep_dir.resolve())}))
    return sweep_dir


def read_commands_work(folder: Path, capsys: pytest.CaptureFixture) -> None:
    """status, best, list, estimate and report on `folder`, each reading its trials."""
    assert main(["status", str(folder), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["counts"] == RAN and status["best"] == {"trial": "t001", "value": 1.75}
    assert main(["best", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == RAN
    assert main(["list", str(folder.parent), "--json"]) == 0
    (entry,) = [e for e in json.loads(capsys.readouterr().out)["sweeps"] if e["folder"] == str(folder)]
    assert entry["trials"] == RAN and entry["best"] == {"trial": "t001", "value": 1.75}
    assert main(["estimate", str(folder), "--gpu-memory", "24", "--json"]) == 0
    assert [row["trial"] for row in json.loads(capsys.readouterr().out)["trials"]] == ["t000", "t001", "t002"]
    assert main(["report", str(folder)]) == 0
    assert "(3 trials" in capsys.readouterr().out and (folder / "report" / "report.html").is_file()


def test_a_moved_sweep_folder_reads_its_stores_at_its_new_place(original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """mv results/ elsewhere/: every read command finds the study and the MLflow store where they are now."""
    moved = tmp_path / "elsewhere" / "kept"
    moved.parent.mkdir()
    shutil.move(original.parent, moved)
    read_commands_work(moved / original.name, capsys)


def test_a_copied_sweep_folder_reads_and_writes_its_own_stores(original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """cp -r results/ laptop/: the copy's commands read the copy's stores, even once the original's
    are gone, and what they write (the report, logged to MLflow too) goes to the copy, never to the
    original; resume's config connects to the copy's stores."""
    from sweep.folder import SweepFolder

    copy = tmp_path / "laptop" / "sweeps"
    shutil.copytree(original.parent, copy)
    before = tree(original.parent)
    read_commands_work(copy / original.name, capsys)
    assert main(["best", str(copy / original.name), "--export", str(tmp_path / "export"), "--log-model"]) == 0
    assert "export/" in capsys.readouterr().out
    assert any(p.name == "export.json" for p in copy.rglob("*")), "the export logged to the copy's MLflow artifacts"
    assert tree(original.parent) == before  # nothing written to the original (the report's and export's MLflow artifacts included)
    folder = SweepFolder(copy / original.name)
    ours = (f"sqlite:///{copy.resolve() / 'mlflow.db'}", f"sqlite:///{folder.path / 'optuna.db'}")
    assert folder.stores() == ours and (folder.config.mlflow_uri, folder.config.optuna_storage(folder.path)) == ours  # what resume connects to
    (original / "optuna.db").unlink()
    (original.parent / "mlflow.db").unlink()
    read_commands_work(copy / original.name, capsys)


def test_a_store_missing_from_a_copied_folder_is_named_never_created(original: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """cp -r results/SWEEP laptop/ (the sweep folder alone): its MLflow store, beside it in the
    results folder, did not come along. best says which file is missing and where to copy it from
    (exit 2), never reads the original's nor makes an empty one; so does status for the study."""
    copy = tmp_path / "laptop" / original.name
    shutil.copytree(original, copy)
    assert main(["best", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy.parent / 'mlflow.db'}: the sweep's MLflow store is missing" in err
    assert f"copy {original.parent.resolve() / 'mlflow.db'} to {copy.parent / 'mlflow.db'}" in err
    assert not (copy.parent / "mlflow.db").exists()
    shutil.copy(original.parent / "mlflow.db", copy.parent / "mlflow.db")
    (copy / "optuna.db").unlink()
    assert main(["status", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"{copy / 'optuna.db'}: the sweep's Optuna study is missing" in err and f"copy {original.resolve() / 'optuna.db'} to {copy / 'optuna.db'}" in err
    assert not (copy / "optuna.db").exists()


def test_stores_outside_a_moved_folder_are_read_as_recorded(tmp_path: Path) -> None:
    """Only sqlite files in the sweep folder or directly beside it follow it: a server, s3 or a
    sqlite file elsewhere that the user gave are the same store wherever the folder is."""
    from sweep.folder import relocate

    was, here = Path("/data/sweeps/s-1"), Path("/laptop/kept/s-1")
    assert relocate("sqlite:////data/sweeps/s-1/optuna.db", here, was) == "sqlite:////laptop/kept/s-1/optuna.db"
    assert relocate("sqlite:////data/sweeps/mlflow.db?timeout=30", here, was) == "sqlite:////laptop/kept/mlflow.db?timeout=30"
    for url in ("sqlite:////data/shared/mlflow.db", "sqlite:////data/mlflow.db", "postgresql://u@db:5432/optuna", "http://mlflow:5000", "s3://b/x"):
        assert relocate(url, here, was) == url
    assert relocate("sqlite:////data/sweeps/s-1/optuna.db", was, was) == "sqlite:////data/sweeps/s-1/optuna.db"
    assert relocate("sqlite:////data/sweeps/s-1/optuna.db", here, None) == "sqlite:////data/sweeps/s-1/optuna.db"
