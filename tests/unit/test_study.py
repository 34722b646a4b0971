"""The sweep's Optuna study across driver runs: a resumed sweep never re-proposes what ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from sweep.config import load_config
from sweep.study import SweepSearch
from sweep.trials import Ledger
from tests.conftest import MINIMAL, write_space

SPACE = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 6, seed: 0, algorithm: ALGO, n_startup_trials: 5}") + "  learning_rate: {loguniform: [1.0e-5, 1.0e-2]}\n"


def run_trials(search: SweepSearch, ids: list[str]) -> list[dict]:
    """What the searcher proposes for these Ray trials, each then completed."""
    configs = []
    for i, trial_id in enumerate(ids):
        configs.append(search.suggest(trial_id))
        search.on_trial_complete(trial_id, {"step": 4, "trial_status": "completed", "eval_loss": 1.0 + i})
    return configs


@pytest.mark.parametrize("algorithm", ["random", "tpe"])
def test_a_resumed_seeded_sweep_proposes_new_configurations(tmp_path: Path, algorithm: str) -> None:
    cfg = load_config(write_space(tmp_path, SPACE.replace("ALGO", algorithm)))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(SweepSearch(cfg, storage, Ledger()), ["a", "b"])
    # the driver died; `resume` builds a new searcher on the same study, with the same seed
    again = run_trials(SweepSearch(cfg, storage, Ledger()), ["c", "d"])
    rates = [c["learning_rate"] for c in first + again]
    assert len(set(rates)) == 4, rates

    # ... and it is still reproducible: the same history gives the same proposals
    storage2 = f"sqlite:///{tmp_path}/optuna2.db"
    first2 = run_trials(SweepSearch(cfg, storage2, Ledger()), ["a", "b"])
    again2 = run_trials(SweepSearch(cfg, storage2, Ledger()), ["c", "d"])
    assert [c["learning_rate"] for c in first2 + again2] == rates


def test_points_to_evaluate_run_once_across_resumes(tmp_path: Path) -> None:
    body = SPACE.replace("ALGO", "random").replace("seed: 0,", "seed: 0, points_to_evaluate: [{lora_r: 8, learning_rate: 0.001}],")
    cfg = load_config(write_space(tmp_path, body))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = run_trials(SweepSearch(cfg, storage, Ledger()), ["a"])
    assert first[0]["learning_rate"] == 0.001
    again = run_trials(SweepSearch(cfg, storage, Ledger()), ["b", "c"])
    assert 0.001 not in [c["learning_rate"] for c in again], again
