"""Ray Tune's trial folders are named after the Optuna trial they train (t003_<ray trial id>), and a
trial's checkpoints are still found by its Ray trial id. (tests/e2e/test_train_one.py sees a real
Tuner name a folder so.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from sweep.run import TrialDirname
from sweep.folder import CHECKPOINT_FILES, latest_checkpoint
from sweep.trials import Ledger


def test_a_lone_trial_folder_begins_with_its_optuna_label() -> None:
    ledger = Ledger()
    ledger.labels["5c1f2e9a"] = "t003"
    name = TrialDirname(ledger)
    assert name(SimpleNamespace(trial_id="5c1f2e9a", trainable_name="tune_trial")) == "t003_5c1f2e9a"
    # a Ray trial the searcher did not label (a cohort worker trains several trials) keeps Tune's prefix
    assert name(SimpleNamespace(trial_id="77aa0b1c", trainable_name="cohort_worker")) == "cohort_worker_77aa0b1c"


def test_the_named_folder_keeps_its_checkpoints_findable(tmp_path: Path) -> None:
    for step in (2, 4):
        ckpt = tmp_path / "tune" / "t003_5c1f2e9a" / f"checkpoint_00000{step // 2}"
        ckpt.mkdir(parents=True)
        for name in CHECKPOINT_FILES:
            (ckpt / name).write_text(f'{{"step": {step}}}' if name == "trainer_state.json" else "")
    assert latest_checkpoint(tmp_path, "5c1f2e9a") == str(tmp_path / "tune" / "t003_5c1f2e9a" / "checkpoint_000002")

