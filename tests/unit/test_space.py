"""Space dimensions -> Optuna: sampling, decoding, grids, sizes, user points."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from sweep.config import load_config
from sweep.engine.study import DefineByRun, make_sampler, tell
from tests.conftest import MINIMAL, write_space

SPACE = """\
  method: [lora, qlora]
  lora_r: [4, 8, 16]
  lora_alpha: {ratio_of: lora_r, choices: [0.5, 1, 2]}
  learning_rate: {loguniform: [1e-5, 1e-2]}
  lora_dropout: {uniform: [0.0, 0.1], step: 0.05}
  target_modules: [attention, [q_proj, v_proj]]
  batch: {pairs: [[1, 8], [2, 4]]}
"""


@pytest.fixture()
def cfg(tmp_path: Path):
    return load_config(write_space(tmp_path, MINIMAL.replace("  lora_r: [4, 8]\n", SPACE)))


def test_sampled_values_are_decoded_and_ratios_derived(cfg) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    fn = DefineByRun(cfg.space, cfg.fixed_hyperparams)
    seen_pairs, seen_targets = set(), set()
    for _ in range(40):
        trial = study.ask()
        values = fn(trial)
        assert values["lora_alpha"] == pytest.approx(values["lora_r"] * trial.params["lora_alpha_ratio"])
        assert 1e-5 <= values["learning_rate"] <= 1e-2
        assert values["lora_dropout"] in (0.0, 0.05, 0.1)
        seen_pairs.add(values["batch"])
        seen_targets.add(values["target_modules"])
        # the study holds readable scalar labels
        assert trial.params["batch"] in ("1x8", "2x4")
        assert cfg.space.decode(trial.params, cfg.fixed_hyperparams) == values
        study.tell(trial, 1.0)
    assert seen_pairs == {(1, 8), (2, 4)}
    assert seen_targets == {"attention", ("q_proj", "v_proj")}


def test_ratio_of_a_fixed_value_uses_the_train_section(tmp_path: Path) -> None:
    body = MINIMAL.replace("train: {max_steps: 4", "train: {lora_r: 12, max_steps: 4").replace(
        "  lora_r: [4, 8]\n", "  lora_alpha: {ratio_of: lora_r, choices: [2]}\n"
    )
    cfg = load_config(write_space(tmp_path, body))
    trial = optuna.create_study().ask()
    assert DefineByRun(cfg.space, cfg.fixed_hyperparams)(trial) == {"lora_alpha": 24}


def test_size_and_grid(tmp_path: Path) -> None:
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {algorithm: grid}").replace(
        "  lora_r: [4, 8]\n",
        "  lora_r: {uniform: [4, 12], step: 4}\n  lora_alpha: {ratio_of: lora_r, choices: [1, 2]}\n  lora_dropout: {uniform: [0.0, 0.1], step: 0.05}\n",
    )
    cfg = load_config(write_space(tmp_path, body))
    assert cfg.space.size() == 3 * 2 * 3 == cfg.num_trials
    assert cfg.space.grid() == {"lora_r": [4, 8, 12], "lora_alpha_ratio": [1.0, 2.0], "lora_dropout": [0.0, 0.05, 0.1]}
    study = optuna.create_study(sampler=make_sampler(cfg))
    fn = DefineByRun(cfg.space, cfg.fixed_hyperparams)
    seen = set()
    for _ in range(cfg.num_trials):
        trial = study.ask()
        v = fn(trial)
        seen.add((v["lora_r"], v["lora_alpha"], v["lora_dropout"]))
        tell(study, trial, 0.0)
    assert len(seen) == 18  # every grid point exactly once


def test_encode_user_points(cfg) -> None:
    errors: list[str] = []
    point = cfg.space.encode(
        {"lora_r": 8, "batch": [2, 4], "target_modules": ["q_proj", "v_proj"], "lora_alpha_ratio": 2, "learning_rate": 1e-3},
        "p",
        errors,
    )
    assert errors == []
    assert point == {"lora_r": 8, "batch": "2x4", "target_modules": "q_proj,v_proj", "lora_alpha_ratio": 2, "learning_rate": 1e-3}
    cfg.space.encode({"learning_rate": 1.0, "batch": [3, 3], "lora_alpha": 8}, "p", errors)
    assert errors[0].startswith("p.learning_rate: got 1.0; expected a number in loguniform")
    assert errors[1].startswith("p.batch: got [3, 3]; expected one of [1x8, 2x4]")
    assert errors[2].startswith("p.lora_alpha: not a searched parameter; give lora_alpha_ratio")


def test_enqueued_point_is_sampled_first(cfg) -> None:
    errors: list[str] = []
    point = cfg.space.encode({"lora_r": 16, "lora_alpha_ratio": 1, "batch": [1, 8]}, "p", errors)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    study.enqueue_trial(point)
    values = DefineByRun(cfg.space, cfg.fixed_hyperparams)(study.ask())
    assert values["lora_r"] == 16 and values["lora_alpha"] == 16 and values["batch"] == (1, 8)
