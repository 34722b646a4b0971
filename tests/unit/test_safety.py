"""Safe defaults: nothing a space file names is executed, one sweep never overwrites another's
folder, secrets are redacted."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sweep.config import ConfigError, load_config
from sweep.engine.sweep import new_sweep_dir, preflight
from sweep.config.secrets import redact
from tests.conftest import MINIMAL, write_space
from trainable.tiny import ensure_tiny


def test_code_shipped_with_a_checkpoint_is_never_run(tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(ensure_tiny(), model)
    marker = tmp_path / "executed"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import Gemma3TextConfig as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    cfg = load_config(write_space(tmp_path, MINIMAL.replace("id: tiny-gemma3", f"id: {model}") + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    try:
        preflight(cfg, log=lambda s: None)
    except ConfigError:
        pass  # refusing the model is fine too; running its code is not
    assert not marker.exists()


def test_a_sweep_never_overwrites_another_folder(tmp_path: Path) -> None:
    cfg = load_config(write_space(tmp_path, MINIMAL + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n"))
    first = new_sweep_dir(cfg)
    (first / "keep.txt").write_text("mine")
    others = {new_sweep_dir(cfg) for _ in range(5)}  # the same second: suffixes, never the same folder
    assert first not in others and len(others) == 5
    assert (first / "keep.txt").read_text() == "mine"


def test_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    text = "postgresql://sweep:hunter2@db:5432/optuna and http://u:p%40ss@h:5000 token hf_abcdefghijkl"
    assert redact(text) == "postgresql://sweep:***@db:5432/optuna and http://u:***@h:5000 token ***"
    assert redact("postgresql://u:${PGPASSWORD}@db/x") == "postgresql://u:${PGPASSWORD}@db/x"  # a reference is no secret


def test_store_uris_read_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEP_DB_PW", "s3cr3t")
    body = MINIMAL + "tracking: {optuna_storage: 'postgresql://u:${SWEEP_DB_PW}@db/optuna'}\n"
    cfg = load_config(write_space(tmp_path, body))
    assert cfg.optuna_storage(tmp_path) == "postgresql://u:s3cr3t@db/optuna"
    assert "s3cr3t" not in json.dumps(cfg.resolved())
    monkeypatch.delenv("SWEEP_DB_PW")
    with pytest.raises(ConfigError, match=r"tracking.optuna_storage: refers to \$\{SWEEP_DB_PW\}, which is not set"):
        load_config(write_space(tmp_path, body))
    assert os.environ.get("SWEEP_DB_PW") is None


def test_a_password_from_the_environment_may_hold_any_character(monkeypatch: pytest.MonkeyPatch) -> None:
    from sweep.config.secrets import expand_env

    monkeypatch.setenv("PW", "p@ss:w/rd #1%")
    monkeypatch.setenv("HOST", "db.example:5432")
    assert expand_env("postgresql://sweep:${PW}@${HOST}/optuna") == "postgresql://sweep:p%40ss%3Aw%2Frd%20%231%25@db.example:5432/optuna"
    monkeypatch.setenv("URL", "postgresql://u:p@db/x")  # a whole URI in a variable is taken as it is
    assert expand_env("${URL}") == "postgresql://u:p@db/x"
    from sqlalchemy.engine import make_url

    assert make_url(expand_env("postgresql://sweep:${PW}@${HOST}/optuna")).password == "p@ss:w/rd #1%"


def test_an_installed_copy_reports_the_commit_it_was_built_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    from sweep.engine import recorder as tracking

    monkeypatch.setenv("LORA_SWEEP_GIT_COMMIT", "abc123")
    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 128, "", "not a git repository"))
    assert tracking.git_commit() == "abc123"


def test_no_credential_reaches_the_runtime_env_ray_tune_gives_its_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Tune copies AWS credentials from the driver into each trainable's runtime env, and Ray's
    runtime-env agent logged them in clear text (7 times) into its world-readable session folder.
    While the trials run (Sweep.run), Tune finds none; after, the driver has them back."""
    from ray.tune.execution.class_cache import _ActorClassCache

    from sweep.config.secrets import SECRET_ENV, SHIPPED_BY_TUNE, KeptFromTune

    secrets = {name: f"secret-value-of-{name}" for name in (*SECRET_ENV, *SHIPPED_BY_TUNE)}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)

    class Trainable:  # what Tune registers for the sweep's workers
        pass

    with KeptFromTune():
        runtime_env = json.dumps(_ActorClassCache().get(Trainable)._default_options.get("runtime_env"))
    assert not [name for name, value in secrets.items() if value in runtime_env], runtime_env
    assert all(os.environ[name] == value for name, value in secrets.items())
