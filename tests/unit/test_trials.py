"""How a trial is named: the labels and summaries MLflow, Optuna, the terminal and status share (core.contract)."""

from core.contract import param_value, rate_text, summary, trial_label


def test_summary_and_params() -> None:
    hyper = {"method": "qlora", "lora_r": 16, "lora_alpha": 32, "learning_rate": 2e-4, "batch": (4, 8), "target_modules": "attention"}
    assert summary(hyper) == "qlora r16 a32 lr2e-4 b4x8 attention"
    assert summary({"lora_alpha": 8.5, "target_modules": ("q_proj", "v_proj")}) == "a8.5 q_proj+v_proj"
    assert summary({"learning_rate": 0.0151}) == "lr2e-2" and summary({"learning_rate": 1.0}) == "lr1e0"
    assert summary({"lora_alpha": 16.0}) == "a16"
    assert param_value((4, 8)) == "[4, 8]" and param_value("x") == "x"
    assert param_value(2.0593557e-05) == "2.059e-05" and param_value(0.05) == "0.05" and param_value(16) == "16"  # whole in a table cell
    assert trial_label(7) == "t007" and trial_label(1234) == "t1234" and rate_text(3e-5) == "3e-5"
