"""bench/timeline.py and bench/sweepbench.py: the arithmetic behind the per-GPU timelines and the
benchmarks' run-to-run comparisons (pure; no MLflow, Ray or matplotlib)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from sweepbench import compare_losses, config_key, makespan, point_key, seeded_configs  # noqa: E402
from timeline import busy_fraction, gaps, lanes_of, match_samples, merge, segments, summarise  # noqa: E402


def test_merge_joins_overlapping_and_touching_intervals() -> None:
    assert merge([(5, 7), (0, 2), (1, 3), (3, 4), (9, 9)]) == [(0, 4), (5, 7)]


def test_gaps_are_the_uncovered_stretches_at_least_min_gap_long() -> None:
    bars = [(10, 20), (15, 30), (31, 40), (50, 60)]
    assert gaps(bars, 0, 70) == [(0, 10), (30, 31), (40, 50), (60, 70)]
    assert gaps(bars, 0, 70, min_gap=5) == [(0, 10), (40, 50), (60, 70)]
    assert gaps([], 0, 10) == [(0, 10)]
    assert gaps([(-5, 100)], 0, 10) == []


def test_busy_fraction_counts_overlap_once_and_clips_to_the_window() -> None:
    assert busy_fraction([(0, 5), (2, 6), (8, 12)], 0, 10) == pytest.approx(0.8)
    assert busy_fraction([], 0, 10) == 0.0
    assert busy_fraction([(0, 1)], 5, 5) == 0.0


def test_segments_lone_trial_loads_after_its_start_member_before() -> None:
    lone = {"start": 100.0, "end": 130.0, "load_seconds": 12.0}
    assert segments(lone) == ((100.0, 112.0), (112.0, 130.0))
    member = {**lone, "cohort": "abc_00000"}
    assert segments(member) == ((88.0, 100.0), (100.0, 130.0))
    # a trial that ended while loading, and one with no metrics (failed early)
    assert segments({"start": 0, "end": 5, "load_seconds": 9}) == ((0, 5), (5, 5))
    assert segments({"start": 3, "end": 4}) == ((3, 3), (3, 4))


def test_lanes_are_gpus_of_the_trial_and_named_by_node_across_nodes() -> None:
    assert lanes_of({"gpu_ids": "1"}) == ["gpu1"]
    assert lanes_of({"gpu_ids": "0,1"}) == ["gpu0", "gpu1"]
    assert lanes_of({"gpu_ids": "none"}) == ["cpu"]
    assert lanes_of({}) == ["cpu"]
    assert lanes_of({"gpu_ids": "0", "ray_node": "abcdef0123456789"}, several_nodes=True) == ["abcdef01/gpu0"]


def test_samples_match_by_index_else_one_device_for_all_lanes() -> None:
    s0, s1 = {"t": 0, "gpu": 0, "util": 50.0}, {"t": 0, "gpu": 1, "util": 10.0}
    by, how = match_samples(["gpu0", "gpu1"], [s0, s1])
    assert how == "gpu index" and by["gpu1"] == [s1]
    by, how = match_samples(["gpu0", "gpu1"], [s0])  # logical GPUs on one device
    assert how == "one physical GPU for every lane" and by["gpu1"] == [s0]
    assert match_samples(["gpu0"], [])[1] == "no samples"


def test_summarise_per_gpu_busy_and_idle() -> None:
    rows = [
        {"trial": "t0", "gpu_ids": "0", "start": 0.0, "end": 40.0, "load_seconds": 10.0},
        {"trial": "t1", "gpu_ids": "0", "start": 60.0, "end": 100.0, "load_seconds": 10.0},
        {"trial": "t2", "gpu_ids": "1", "start": 0.0, "end": 100.0, "load_seconds": 20.0},
    ]
    samples = {"gpu0": [{"t": t, "util": u} for t, u in ((10, 0.0), (20, 100.0), (70, 50.0), (200, 100.0))]}
    out = summarise(rows, samples, 0.0, 100.0, lanes=["gpu0", "gpu1", "gpu2"])
    g0 = out["gpu0"]
    assert g0["trials"] == 2 and g0["busy_fraction"] == 0.8 and g0["load_seconds"] == 20.0 and g0["train_seconds"] == 60.0
    assert g0["idle_seconds"] == 20.0 and g0["gaps"] == [[40.0, 60.0]] and g0["longest_gap"] == 20.0
    assert g0["samples"] == 3 and g0["util_busy_fraction"] == pytest.approx(2 / 3, abs=1e-4) and g0["mean_util"] == 0.5
    assert out["gpu1"]["busy_fraction"] == 1.0 and out["gpu1"]["idle_gaps"] == 0 and out["gpu1"]["samples"] == 0
    assert out["gpu2"]["trials"] == 0 and out["gpu2"]["busy_fraction"] == 0.0 and out["gpu2"]["idle_seconds"] == 100.0


def test_seeded_configs_repeat_and_are_distinct() -> None:
    args = ([8, 16, 32, 64], [1, 2], ["attention", "all-linear"], (5e-5, 1e-3), [[1, 8], [2, 4]])
    a, b = seeded_configs(16, 0, *args), seeded_configs(16, 0, *args)
    assert a == b and len({point_key(p) for p in a}) == 16
    assert seeded_configs(16, 1, *args) != a
    with pytest.raises(ValueError, match="distinct"):
        seeded_configs(5, 0, [8], [1], ["attention"], (1e-4, 1e-4), [[1, 1]])


def test_point_key_equals_the_key_of_the_logged_params() -> None:
    point = {"lora_r": 16, "lora_alpha_ratio": 2, "target_modules": "attention", "learning_rate": 0.000146, "batch": [2, 4]}
    logged = {"lora_r": "16", "lora_alpha": "32", "target_modules": "attention", "learning_rate": "0.000146", "batch": "[2, 4]"}
    assert point_key(point) == config_key(logged)
    assert config_key({**logged, "lora_alpha": "32.0"}) == config_key(logged)


def test_compare_losses_matches_by_configuration() -> None:
    def row(r: str, loss: float, status: str = "completed") -> dict:
        return {"lora_r": r, "lora_alpha": r, "target_modules": "attention", "learning_rate": "1e-4", "batch": "[1, 8]", "eval_loss": loss, "status": status}

    ref = [row("8", 2.0), row("16", 4.0), row("32", 1.0)]
    other = [row("16", 4.1), row("8", 2.01), row("64", 1.0), row("32", 1.0, "oom")]
    out = compare_losses(ref, other, 0.01)
    assert out["pairs"] == 2 and out["within"] == 1 and out["max_abs_rel_diff"] == pytest.approx(0.025)
    assert out["only_in_reference"] == 1 and out["only_in_other"] == 1


def test_makespan_is_measured_never_projected() -> None:
    """A sweep the time budget cut has no makespan (issue 30: the projections carried the first
    trial's cold base load into every missing trial)."""
    rows = [{"status": "completed", "start": 0, "end": 30}, {"status": "completed", "start": 30, "end": 50}, {"status": "stopped", "start": 50, "end": 60}]
    assert makespan(rows, 2, 61.0) == {"seconds": 61.0, "completed": 2}
    assert makespan(rows, 4, 61.0) == {"seconds": None, "completed": 2, "cut_at": 61.0}


def test_counted_tokens_are_read_from_the_trials_newest_checkpoint(tmp_path) -> None:
    """Issue 30: a trial's tokens are the ones its member counted, never tokens_per_sec x
    train_seconds (which counted a compiled trial's compile time as training, 1.2-1.9x too many)."""
    import json

    from timeline import counted_tokens

    trial = tmp_path / "trials" / "t003"
    for step, tokens in ((5, 4_000), (10, 8_100)):
        (trial / f"step-{step:06d}").mkdir(parents=True)
        (trial / f"step-{step:06d}" / "member.json").write_text(json.dumps({"step": step, "tokens": tokens, "loss_tokens": tokens // 4}))
    (trial / "step-000015").mkdir()  # incomplete: no member.json yet
    assert counted_tokens(str(tmp_path), "t003") == {"tokens": 8_100, "loss_tokens": 2_025, "tokens_at_step": 10}
    empty = {"tokens": None, "loss_tokens": None, "tokens_at_step": None}
    assert counted_tokens(str(tmp_path), "t004") == empty  # no checkpoint
    assert counted_tokens(None, "t003") == empty  # no sweep folder known


def test_cohort_tokens_per_sec_is_counted_tokens_over_the_workers_wall_time() -> None:
    from argparse import Namespace

    from packing import cohort_figures

    member = lambda trial, start, end, tokens, status="completed": {  # noqa: E731
        "trial": trial, "status": status, "cohort": "w0", "cohort_size": "2", "start": start, "end": end, "tokens": tokens, "loss_tokens": tokens // 2,
        "tokens_per_sec": 1e9, "train_seconds": 1e9}  # fmt: skip
    args = Namespace(dry_run=True, size="tiny")
    out = cohort_figures([member("t0", 100.0, 150.0, 30_000), member("t1", 102.0, 160.0, 30_000)], args)
    assert out["tokens"] == 60_000 and out["train_wall_seconds"] == 60.0 and out["tokens_per_sec"] == 1_000.0 and out["tokens_exact"]
    cut = cohort_figures([member("t0", 100.0, 150.0, 30_000), member("t1", 102.0, 160.0, 10_000, status="stopped")], args)
    assert cut["tokens_per_sec"] == round(40_000 / 60, 1) and not cut["tokens_exact"] and cut["trials_not_fully_counted"] == ["t1"]


def test_tokens_per_hour_is_none_when_a_completed_trials_count_is_missing() -> None:
    from multi_gpu import tokens_per_hour

    assert tokens_per_hour([{"tokens": 1_000}, {"tokens": 2_000}], 3.6) == 3_000_000
    assert tokens_per_hour([{"tokens": 1_000}, {"tokens": None}], 3.6) is None
