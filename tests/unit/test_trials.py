"""How a trial ended, and how it is named: the one rule MLflow, Optuna and the terminal share."""

from sweep.trials import Ledger, outcome, param_value, summary


def test_outcome() -> None:
    assert outcome({"trial_status": "completed"}, False, False) == "completed"
    assert outcome({"trial_status": "completed"}, False, True) == "completed"  # ASHA's max_t stop of a finished trial
    assert outcome({"trial_status": "running"}, False, True) == "pruned"
    assert outcome({"trial_status": "running"}, False, False) == "stopped"  # time budget / user
    assert outcome({"trial_status": "oom"}, False, False) == "oom"
    assert outcome({"trial_status": "nan"}, False, False) == "nan"
    assert outcome(None, True, False) == "failed"
    assert outcome({"trial_status": "running"}, True, True) == "failed"


def test_summary_and_params() -> None:
    hyper = {"method": "qlora", "lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch": (4, 8), "target_modules": "attention"}
    assert summary(hyper) == "qlora r16 a32 lr2e-4 b4x8 attention"
    assert summary({"lora_alpha": 8.5, "target_modules": ("q_proj", "v_proj")}) == "a8.5 q_proj+v_proj"
    assert summary({"learning_rate": 0.0151}) == "lr2e-2" and summary({"learning_rate": 1.0}) == "lr1e0"
    assert param_value((4, 8)) == "[4, 8]" and param_value("x") == "x"


def test_ledger() -> None:
    ledger = Ledger()
    ledger.labels["abc"] = "t003"
    ledger.stopped["abc"] = 20
    assert ledger.label("abc") == "t003" and ledger.label("zzz") == "zzz"
    assert ledger.pruned("abc") and not ledger.pruned("zzz")
