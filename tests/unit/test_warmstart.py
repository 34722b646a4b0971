"""Reading a finished sweep back (sweep.folder.SweepFolder) and warm-starting a new study from it
(sweep.engine.warmstart): a sweep folder made by hand, its study in sqlite, a `${VAR}` in its store URL."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from sweep.config import ConfigError, load_config
from sweep.config.secrets import redact
from sweep.folder import SweepFolder, write_meta
from sweep.engine.warmstart import apply
from tests.conftest import MINIMAL, write_space

optuna.logging.set_verbosity(optuna.logging.WARNING)
STORE = "tracking: {optuna_storage: 'sqlite:///${WARM_TEST_DIR}/optuna.db', mlflow_uri: 'sqlite:///${WARM_TEST_DIR}/mlflow.db'}\n"


@pytest.fixture()
def previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A finished sweep over lora_r 4/8/16 whose space file names its stores through ${WARM_TEST_DIR}."""
    store = tmp_path / "stores"
    store.mkdir()
    monkeypatch.setenv("WARM_TEST_DIR", str(store))
    space = write_space(tmp_path, MINIMAL.replace("lora_r: [4, 8]", "lora_r: [4, 8, 16]") + STORE, "old.yaml")
    cfg = load_config(space)
    folder = tmp_path / "results" / "t-1"
    folder.mkdir(parents=True)
    (folder / "space.yaml").write_text(redact(cfg.source_text))
    write_meta(folder, {"name": "t", "space_file": str(space), "overrides": [], "mlflow_uri": redact(cfg.tracking.mlflow_uri),
                        "optuna_storage": redact(cfg.tracking.optuna_storage), "study_name": "t", "parent_run_id": "p"})  # fmt: skip
    study = optuna.create_study(study_name="t", storage=cfg.optuna_storage(folder))
    dists = cfg.space.distributions()
    for r, state, value in ((4, "COMPLETE", 2.0), (8, "COMPLETE", 1.5), (16, "COMPLETE", 1.0), (8, "FAIL", None)):
        study.add_trial(optuna.trial.create_trial(params={"lora_r": r}, distributions=dists, value=value, state=optuna.trial.TrialState[state]))
    return folder


def test_the_folder_connects_with_the_variables_value_never_the_recorded_text(previous: Path) -> None:
    assert "${WARM_TEST_DIR}" in json.loads((previous / "sweep.json").read_text())["optuna_storage"]
    sweep = SweepFolder(previous)
    store = previous.parent.parent / "stores"
    assert sweep.stores() == (f"sqlite:///{store}/mlflow.db", f"sqlite:///{store}/optuna.db")
    assert len(optuna.load_study(study_name=sweep.study_name, storage=sweep.optuna_storage).trials) == 4 and sweep.parent_run_id == "p"


def test_without_the_variable_the_folder_says_which_one(previous: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WARM_TEST_DIR")
    with pytest.raises(ConfigError, match=r"refers to \$\{WARM_TEST_DIR\}, which is not set"):
        SweepFolder(previous).stores()


def test_a_masked_password_is_never_used_to_connect(previous: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)  # with it, PostgreSQL's client would be given the URL without a password
    monkeypatch.setenv("PGPASSFILE", str(previous / "no-pgpass"))
    meta = json.loads((previous / "sweep.json").read_text())
    Path(meta["space_file"]).unlink()
    (previous / "space.yaml").write_text("not: [a space file")  # nothing left that knows the password
    write_meta(previous, {**meta, "optuna_storage": "postgresql://u:***@db/optuna"})
    with pytest.raises(ConfigError, match="recorded without its password"):
        SweepFolder(previous).stores()


def new_config(tmp_path: Path, previous: Path, search: str = "search: {num_trials: 2"):
    body = MINIMAL.replace("search: {num_trials: 2", f"{search}, warm_start: {previous}, warm_start_top: 1")
    return load_config(write_space(tmp_path, body, "new.yaml"))


def test_warm_start_carries_what_fits_this_space_and_runs_the_best_first(tmp_path: Path, previous: Path) -> None:
    cfg = new_config(tmp_path, previous)
    study = optuna.create_study()
    report = apply(study, cfg, previous)
    assert report.carried == 2 and sum(report.skipped.values()) == 1 and "outside this space" in next(iter(report.skipped))
    assert report.enqueued == [{"lora_r": 8}] and report.differences == []
    trials = study.get_trials(deepcopy=False)
    assert [(t.params["lora_r"], t.value) for t in trials if t.state.name == "COMPLETE"] == [(4, 2.0), (8, 1.5)]
    assert all(t.user_attrs["warm_start_from"] == str(previous) for t in trials if t.state.name == "COMPLETE")
    assert "2 finished trials carried over" in report.describe() and "1 best configs run first" in report.describe()


def test_warm_start_refuses_another_objective(tmp_path: Path, previous: Path) -> None:
    cfg = new_config(tmp_path, previous, "search: {num_trials: 2, metric: train_loss")
    with pytest.raises(ConfigError, match="search.warm_start: t-1 optimised eval_loss"):
        apply(optuna.create_study(), cfg, previous)
