"""`python -m sweep train`: one configuration as a one-trial sweep. Which configuration it trains
(every searched dimension pinned, never a value the user did not choose), and that the folder it
makes reloads as the same configuration for `resume`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sweep.cli import main
from sweep.config import ConfigError
from sweep.engine.single import load_one
from sweep.config.space import Choice, Ratio
from tests.conftest import MINIMAL, write_space

SEARCHED = MINIMAL.replace("  lora_r: [4, 8]\n", "  lora_r: [4, 8]\n  lora_alpha: {ratio_of: lora_r, choices: [1, 2]}\n  learning_rate: {loguniform: [1.0e-5, 1.0e-3]}\n  batch: {pairs: [[1, 2], [2, 1]]}\n")


def test_every_unpinned_dimension_is_an_error_naming_the_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    space = write_space(tmp_path, SEARCHED + f"tracking: {{results_dir: {tmp_path / 'out'}}}\n")
    assert main(["train", str(space), "train.max_steps=0"]) == 2
    err = capsys.readouterr().err
    assert "5 problems" in err and "train.max_steps: Input should be greater than 0" in err  # every problem at once
    assert "space.lora_r: searched ([4, 8]); `train` trains one configuration: pin it with train.lora_r=VALUE (e.g. train.lora_r=4), or give it one value in the file" in err
    assert "space.lora_alpha: searched (lora_r x [1.0, 2.0]); `train` trains one configuration: pin it with train.lora_alpha=VALUE (the value itself, not the ratio" in err
    assert "space.learning_rate: searched (loguniform [1e-05, 0.001]); `train` trains one configuration: pin it with train.learning_rate=VALUE (a value in" in err
    assert "space.batch: searched ([1x2, 2x1]); `train` trains one configuration: pin it with train.batch=VALUE (e.g. train.batch=[1, 2])" in err
    assert not (tmp_path / "out").exists()  # nothing started
    assert main(["train", str(space), "train.lora_r=8", "train.lora_alpha=16", "train.batch=[1, 2]", "--sweep-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "1 problem" in err and "space.learning_rate: searched" in err


def test_overrides_pin_the_searched_dimensions_and_the_search_is_one_trial(tmp_path: Path) -> None:
    space = write_space(tmp_path, SEARCHED)
    cfg = load_one(space, ["train.lora_r=8", "train.lora_alpha=32", "train.learning_rate=2.0e-4", "train.batch=[2, 1]", "train.max_steps=6"])
    dims = {d.name: d for d in cfg.space.dims}
    assert dims["lora_r"] == Choice("lora_r", (8,)) and dims["lora_alpha"] == Choice("lora_alpha", (32.0,))
    assert dims["learning_rate"] == Choice("learning_rate", (2e-4,)) and dims["batch"] == Choice("batch", ((2, 1),))
    assert cfg.train.max_steps == 6  # not searched: an ordinary override
    assert (cfg.search.algorithm, cfg.num_trials, cfg.search.scheduler.type, cfg.search.max_concurrent, cfg.resources.cohort) == ("random", 1, "none", 1, 1)
    assert "space.lora_r=[8]" in cfg.overrides and "train.lora_r=8" not in cfg.overrides  # what sweep.json records
    timed = write_space(tmp_path, SEARCHED.replace("search: {num_trials: 2}", "search: {num_trials: 2, time_budget: 1h}"), "timed.yaml")
    pins = ["train.lora_r=8", "train.lora_alpha=32", "train.learning_rate=2.0e-4", "train.batch=[2, 1]"]
    assert load_one(timed, pins).search.time_budget is None  # to completion: the sweep's budget does not apply
    assert load_one(timed, [*pins, "search.time_budget=30m"]).search.time_budget == 1800  # the command line's does


def test_one_value_dimensions_are_pinned_as_best_export_writes_them(tmp_path: Path) -> None:
    body = MINIMAL.replace("  lora_r: [4, 8]\n", "  lora_r: [16]\n  lora_alpha: {ratio_of: lora_r, choices: [2]}\n")
    cfg = load_one(write_space(tmp_path, body))
    dims = {d.name: d for d in cfg.space.dims}
    assert dims["lora_r"] == Choice("lora_r", (16,)) and isinstance(dims["lora_alpha"], Ratio)
    assert cfg.space.decode({"lora_r": 16, "lora_alpha_ratio": 2.0}, cfg.fixed_hyperparams) == {"lora_r": 16, "lora_alpha": 32}


def test_a_file_without_a_space_trains_its_train_values(tmp_path: Path) -> None:
    body = MINIMAL.replace("space:\n  lora_r: [4, 8]\n", "").replace("train: {max_steps: 4,", "train: {method: qlora, lora_r: 4, max_steps: 4,")
    cfg = load_one(write_space(tmp_path, body))
    (dim,) = cfg.space.dims
    assert dim == Choice("lora_alpha", (16.0,))  # the first hyperparameter the file leaves at its default, kept as a one-value dimension
    assert cfg.fixed_hyperparams["method"] == "qlora" and cfg.fixed_hyperparams["lora_r"] == 4


def test_bad_values_are_reported_as_for_any_override(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_one(write_space(tmp_path, MINIMAL), ["train.lora_r=-1"])
    assert any(p.startswith("space.lora_r[0]: got -1") for p in info.value.problems), info.value.problems


def test_the_folder_of_a_train_run_reloads_as_the_same_configuration(tmp_path: Path) -> None:
    """resume reads sweep.json's overrides (the derived ones) with the space file, as for any sweep."""
    from sweep.folder import load_sweep_config

    space = write_space(tmp_path, SEARCHED)
    cfg = load_one(space, ["train.lora_r=8", "train.lora_alpha=8", "train.learning_rate=1.0e-4", "train.batch=[1, 2]"])
    folder = tmp_path / "sweeps" / "t-20260101-000000"
    folder.mkdir(parents=True)
    shutil.copy(space, folder / "space.yaml")
    stores = {"mlflow_uri": f"sqlite:///{folder.parent / 'mlflow.db'}", "optuna_storage": f"sqlite:///{folder / 'optuna.db'}", "study_name": "t", "parent_run_id": "p"}
    (folder / "sweep.json").write_text(json.dumps({"space_file": str(space), "overrides": list(cfg.overrides), **stores, "command": "train"}))
    again = load_sweep_config(folder)
    assert again.space == cfg.space and again.num_trials == 1 and again.search.scheduler.type == "none"


def test_the_space_file_best_export_writes_trains_as_it_is(tmp_path: Path) -> None:
    """The command an export points to: `train` takes the winner's space file without a pin."""
    import yaml

    from sweep.config import load_config
    from sweep.readback.export import winner_space

    cfg = load_config(write_space(tmp_path, SEARCHED))
    winner = {"label": "t001", "config": {"lora_r": 8, "lora_alpha": 16, "learning_rate": 3.0e-4, "batch": (2, 1)}}
    exported = tmp_path / "export" / "space.yaml"
    exported.parent.mkdir()
    exported.write_text(yaml.safe_dump(winner_space(cfg, winner), sort_keys=False))
    one = load_one(exported, ["train.max_steps=20"])
    hyper = {**one.fixed_hyperparams, **one.space.decode({d.name: d.labels[0] for d in one.space.dims}, one.fixed_hyperparams)}
    assert (hyper["lora_r"], hyper["lora_alpha"], hyper["learning_rate"], hyper["batch"]) == (8, 16, 3.0e-4, (2, 1))
    assert one.train.max_steps == 20 and one.num_trials == 1
