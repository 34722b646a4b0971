"""bench/seed_vs_ours.py (issue 30): every ours row has an HF Trainer tuned anchor at its own
micro-batch, every "x HF" is against that anchor in the same run, and HF Trainer's rows count the
tokens of the timed steps over their wall time (pure: no model, no Trainer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from seed_vs_ours import SEED_RECIPE, StepWindow, comparisons, hf_recipe, label, rows_for  # noqa: E402


@pytest.mark.parametrize("size,ablations", [("1b", False), ("1b", True), ("12b", False), ("12b", True)])
def test_every_ours_micro_batch_has_its_hf_trainer_tuned_anchor_before_it(size: str, ablations: bool) -> None:
    rows = rows_for(size, ablations)
    for i, row in enumerate(rows):
        if row["kind"] != "ours":
            continue
        micro = row["settings"]["batch"][0]
        anchors = [r for r in rows[:i] if r["kind"] == "hf" and r["recipe"]["batch"][0] == micro and not r["recipe"]["compile"]]
        assert anchors, f"{row['name']}: no HF Trainer tuned row at micro-batch {micro} before it"
    micros = {r["settings"]["batch"][0] for r in rows if r["kind"] == "ours"}
    tuned = [r["recipe"]["batch"][0] for r in rows if r["kind"] == "hf" and not r["recipe"]["compile"]]
    assert sorted(tuned) == sorted(micros)  # exactly one plain anchor per micro-batch
    assert {8, 16, 32} <= micros if size == "1b" else {2, 4, 8} <= micros
    compiled = {r["recipe"]["batch"][0] for r in rows if r["kind"] == "hf" and r["recipe"]["compile"]}
    assert compiled == ({8, 16, 32} if size == "1b" else {4, 8})
    assert len({r["name"] for r in rows}) == len(rows)  # labels tell every row apart (--only, estimator_error)


def test_hf_trainer_tuned_settings_and_label() -> None:
    recipe = hf_recipe(16)
    assert recipe == dict(batch=(16, 2), attn="sdpa", ckpt=False, optim="adamw_torch_fused", embeddings="frozen", liger=True, packed=True,
                          lora_dtype="bfloat16", compile=False)  # fmt: skip
    assert label("hf", recipe) == "HF Trainer tuned: mb 16x2, sdpa, ckpt off, adamw_torch_fused, emb frozen, LoRA bf16, liger loss, packed"
    assert label("hf", hf_recipe(32, compile=True)).endswith("liger loss, packed, torch_compile")
    assert label("seed", SEED_RECIPE).startswith("seed (HF Trainer): mb 1x32, eager, ckpt on, paged_adamw_8bit, emb full, LoRA fp32, model loss")


def row(run: str, kind: str, micro: int, tps: float, compile: bool = False) -> dict:
    return {"size": "1b", "run": run, "kind": kind, "micro_batch": micro, "compile": compile, "tokens_per_sec": tps, "peak_vram_gb": 10.0, "mfu": 0.1}


def test_x_hf_is_against_the_faster_tuned_row_at_the_same_micro_batch() -> None:
    rows = [
        row("seed", "seed", 1, 1_000.0),
        row("hf 8", "hf", 8, 20_000.0),
        row("hf 8 compiled", "hf", 8, 25_000.0, compile=True),
        row("ours 8", "ours", 8, 30_000.0),
        row("hf 16", "hf", 16, 40_000.0),
        row("hf 16 compiled", "hf", 16, 38_000.0, compile=True),
        row("ours 16", "ours", 16, 50_000.0),
        row("ours 32", "ours", 32, 60_000.0),  # no anchor measured at 32 in this run
        {"size": "1b", "run": "ours 32 flex", "kind": "ours", "trial_status": "skipped"},
        {"size": "1b", "run": "ours: mb 16x2, an older file's row", "kind": "ours", "tokens_per_sec": 48_000.0},  # no micro_batch: its label's
    ]
    by = {c["run"]: c for c in comparisons(rows)}
    assert by["ours 8"]["hf_anchor"] == "hf 8 compiled" and by["ours 8"]["x_hf"] == pytest.approx(1.2)
    assert by["ours 16"]["hf_anchor"] == "hf 16" and by["ours 16"]["x_hf"] == pytest.approx(1.25)
    assert by["hf 16 compiled"]["x_hf"] == pytest.approx(0.95)
    assert by["ours 32"]["x_hf"] is None and by["ours 32"]["hf_anchor"] is None  # never another micro-batch's anchor
    assert by["ours 32"]["x_seed"] == pytest.approx(60.0)
    assert "ours 32 flex" not in by
    assert by["ours: mb 16x2, an older file's row"]["hf_anchor"] == "hf 16"


def test_step_window_is_the_wall_time_of_the_timed_steps_synced_at_each_end_only() -> None:
    now = [0.0]
    syncs = []
    window = StepWindow(warmup=2, timed=3, sync=lambda: syncs.append(now[0]), clock=lambda: now[0])
    durations = [5.0, 1.0, 1.0, 2.0, 1.5, 9.0]  # a slow first step, then the timed ones, then one past the window
    for d in durations:
        window.step_begin()
        now[0] += d
        window.step_end()
        now[0] += 0.25  # between steps (the next batch's loading, logging): inside the window when timed
    assert window.seconds == pytest.approx(0.25 + 1.0 + 0.25 + 2.0 + 0.25 + 1.5)
    assert syncs == [6.25, 11.5]  # at the end of the last warm-up step and of the last timed step, nowhere else


def test_step_window_without_warm_up_starts_at_the_first_step_and_says_when_steps_were_missing() -> None:
    now = [10.0]
    window = StepWindow(warmup=0, timed=2, clock=lambda: now[0])
    for _ in range(2):
        window.step_begin()
        now[0] += 1.0
        window.step_end()
    assert window.seconds == pytest.approx(2.0)
    short = StepWindow(warmup=1, timed=3, clock=lambda: now[0])
    short.step_begin()
    short.step_end()
    assert short.seconds is None and short.steps == 1
