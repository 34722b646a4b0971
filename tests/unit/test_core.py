"""core/: the contract, the `auto` rules, the trial request and the estimator's arithmetic, each on
tiny inline values (no model, no framework)."""

from __future__ import annotations

import math

import pytest

from core import contract, rules
from core.contract import TrialStatus, missing_objectives
from core.estimate import (
    CONTEXT_BYTES,
    GB,
    STEP,
    ModelProfile,
    Placement,
    TextShape,
    TrialShape,
    estimate,
    layer_activation_bytes,
    trial_shape,
    wants_checkpointing,
)
from core.request import TrialRequest
from core.schema import SEARCHABLE, TrainSection

# ------------------------------------------------------------------------------------------------
# contract


def test_statuses_are_the_strings_mlflow_and_the_study_hold() -> None:
    assert [s.value for s in contract.FINAL_STATUSES] == ["completed", "pruned", "stopped", "oom", "nan", "failed", "infeasible"]
    assert TrialStatus.COMPLETED == "completed" and f"{TrialStatus.OOM:<5}|" == "oom  |" and str(TrialStatus.NAN) == "nan"
    assert {"pruned": 1}[TrialStatus.PRUNED] == 1  # hashes as its string: dicts keyed by either agree
    assert TrialStatus("retrying") is TrialStatus.RETRYING


def test_an_unreported_objective_is_named() -> None:
    done = {contract.STATUS: "completed", contract.EVAL_LOSS: 1.0}
    # an objective the trial never reported (peak_vram_gb on a CPU) makes it unrankable
    assert "peak_vram_gb" in missing_objectives(done, (contract.EVAL_LOSS, contract.PEAK_VRAM_GB))
    assert missing_objectives(done, (contract.EVAL_LOSS,)) is None


def test_metric_lists_use_the_names_a_trial_reports() -> None:
    assert contract.OBJECTIVE_METRICS == ("eval_loss", "train_loss", "tokens_per_sec", "peak_vram_gb", "peak_rss_gb")
    assert set(contract.OBJECTIVE_METRICS) - {contract.TRAIN_LOSS} <= set(contract.ROW_METRICS)
    assert set(contract.PLACEMENT_KEYS) == {"gpu_share", "estimated_vram_gb"}
    assert contract.finite(1) and not contract.finite(math.nan) and not contract.finite(True) and not contract.finite("1")


# ------------------------------------------------------------------------------------------------
# rules


def test_auto_optimizer_and_explicit_choices() -> None:
    assert rules.optimizer("auto", "qlora") == "paged_adamw_8bit"
    assert rules.optimizer("auto", "lora") == "adamw"
    assert rules.optimizer("adamw_8bit", "qlora") == "adamw_8bit"


def test_target_presets() -> None:
    assert rules.target_names("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert rules.target_names("all-linear") == rules.target_names("attention") + rules.target_names("mlp")
    assert rules.target_names(["q_proj", "v_proj"]) == ("q_proj", "v_proj")
    with pytest.raises(KeyError):
        rules.target_names("everything")


def test_auto_checkpointing_above_a_quarter_of_the_device() -> None:
    assert rules.gradient_checkpointing(True, 0, None) is True
    assert rules.gradient_checkpointing(False, 10 * GB, 1 * GB) is False
    assert rules.gradient_checkpointing("auto", 10 * GB, None) is False  # no device size: a CPU
    assert rules.gradient_checkpointing("auto", 10 * GB, 40 * GB) is False  # exactly a quarter
    assert rules.gradient_checkpointing("auto", 10 * GB + 1, 40 * GB) is True


# ------------------------------------------------------------------------------------------------
# request


def test_a_request_names_its_trial_and_travels_as_json() -> None:
    import dataclasses
    import json

    request = TrialRequest(label="t007", number=7, hyper={"lora_r": 8, "batch": [2, 4]}, checkpoint="/trials/t007/step-000040", attempt=2)
    again = TrialRequest(**json.loads(json.dumps(dataclasses.asdict(request))))  # as the workers' queue files carry it
    assert again == request
    with pytest.raises(ValueError, match="trial label 't008' does not name trial number 7"):
        TrialRequest(label="t008", number=7)
    with pytest.raises(ValueError, match="expected attempt >= 1"):
        TrialRequest(label="t007", number=7, attempt=0)


# ------------------------------------------------------------------------------------------------
# estimate


TEXT = TextShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=32)
PROFILE = ModelProfile(
    text=TEXT,
    linears={"q_proj": (8, 8, 2), "k_proj": (8, 4, 2), "v_proj": (8, 4, 2), "o_proj": (8, 8, 2), "gate_proj": (8, 16, 2), "up_proj": (8, 16, 2), "down_proj": (16, 8, 2)},
    embedding_params=32 * 8,
    tied=True,
    other_params=100,
)


def test_activation_arithmetic_by_hand() -> None:
    # per token and layer: 4 x hidden + (2 heads + 2 kv_heads) x head_dim + 4 x intermediate = 32 + 24 + 64 values
    assert layer_activation_bytes(TEXT, tokens=10) == 2 * 10 * 120 * 2
    assert not wants_checkpointing(TEXT, 10, device_bytes=4 * 4800)  # exactly a quarter
    assert wants_checkpointing(TEXT, 10, device_bytes=4 * 4800 - 1)


def test_estimate_parts_by_hand() -> None:
    shape = TrialShape(method="lora", lora_r=2, targets=("q_proj", "v_proj"), lora_dropout=0.0, embeddings="frozen", optimizer="adamw", micro_batch=1, seq_len=4)
    parts = estimate(PROFILE, shape).parts
    decoder_linears = 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128)
    assert parts["weights"] == decoder_linears * 2 + (256 + 100) * 2  # bf16, tied head
    lora = 2 * (8 + 8) * 2 + 2 * (8 + 4) * 2  # r x (in + out) x layers, q and v
    assert parts["adapter"] == lora * (4 + 4 + 8)  # fp32 weight + grad + two fp32 moments
    assert "embeddings" not in parts and "dequantized" not in parts
    assert parts["logits"] == min(4 * 0.5, 4096) * 32 * 12  # chunked: reply tokens through the head
    assert estimate(PROFILE, shape).gb == pytest.approx(sum(parts.values()) / GB)


def test_trial_shape_applies_the_rules() -> None:
    hyper = TrainSection(method="qlora", target_modules="attention", batch=(2, 8)).model_dump()
    shape = trial_shape(hyper, 64, TEXT)
    assert shape.optimizer == "paged_adamw_8bit" and shape.targets == rules.target_names("attention")
    assert shape.micro_batch == 2 and shape.checkpointing is False  # no device size: never auto-on
    assert trial_shape(hyper, 64, TEXT, device_bytes=1).checkpointing is True


def test_placement_rounds_shares_up_and_refuses_what_exceeds_a_gpu() -> None:
    fixed = TrainSection().model_dump()
    need = estimate(PROFILE, trial_shape(fixed, 64, TEXT, "frozen", 4 * GB)).total

    def placement(gpu_bytes: float) -> Placement:
        return Placement(PROFILE, gpu_bytes, margin=0.2, max_seq_len=64, embeddings="frozen", attn="sdpa", loss="chunked", fixed=fixed)

    verdict = placement(4 * GB).judge({})
    raw = (need * 1.2 + CONTEXT_BYTES) / (4 * GB)
    assert verdict.feasible and verdict.share == pytest.approx(math.ceil(raw / STEP) * STEP) and verdict.share >= raw
    refused = placement(CONTEXT_BYTES).judge({})
    assert not refused.feasible and refused.share > 1 and refused.reason.startswith("infeasible: estimated peak")
