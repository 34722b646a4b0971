"""The benchmark scripts run on the current engine (CPU, tiny model): each trains through a cohort
(a cohort of one for a single trial) and the search benchmarks drive the sweep's own study. On a GPU
the same scripts give the figures in bench/BENCH.md; here they must only run and be consistent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))


def run_script(name: str, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], check=True, timeout=600, capture_output=True, text=True)


def test_gemma3_policies_trains_each_policy_as_a_cohort_of_one(tmp_path: Path) -> None:
    """What tests/gpu/test_gemma3_policies.py asserts of 1B, short of memory, on the tiny model."""
    from trainable.tiny import ensure_tiny

    out = tmp_path / "policies.json"
    run_script("gemma3_policies.py", "--dry-run", "--steps", "2", "--accum", "1", "--workdir", str(tmp_path / "work"), "--out", str(out))
    written = json.loads(out.read_text())
    assert written["provenance"]["commit"]
    rows = {r["policy"]: r for r in written["results"]}
    assert {r["trial_status"] for r in rows.values()} == {"completed"}, rows
    assert rows["frozen"]["trainable_params"] < rows["new_tokens"]["trainable_params"] < rows["full"]["trainable_params"]
    config = json.loads((ensure_tiny() / "config.json").read_text())
    assert rows["full"]["trainable_params"] - rows["frozen"]["trainable_params"] == config["vocab_size"] * config["hidden_size"]  # the tied embedding copy
    assert rows["full"]["model_class"] == "Gemma3ForCausalLM" and rows["full"]["embeddings"] == "full"


def test_cohort_bench_compares_a_cohort_with_its_members_one_at_a_time_on_the_same_tokens(tmp_path: Path) -> None:
    out = tmp_path / "cohort.json"
    run_script("cohort.py", "--dry-run", "--workdir", str(tmp_path / "work"), "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [r["run"] for r in rows] == ["cohort", "serial", "compare"] * 2
    assert {r["trial_status"] for r in rows} == {"completed"}, rows
    for cohort, serial, compare in zip(rows[0::3], rows[1::3], rows[2::3]):
        assert len(cohort["members"]) == len(serial["members"]) == cohort["k"]
        assert compare["same_tokens"] and cohort["tokens"] == serial["tokens"]
        assert compare["step_ratio"] == pytest.approx(cohort["timed_seconds"] / serial["timed_seconds"])
        # each warm-up micro-step timed (a compiled run's against an eager one's: the compile's cost)
        assert len(cohort["warmup_seconds_all"]) == cohort["warmup_micro_steps"] and min(cohort["warmup_seconds_all"]) > 0


def test_step_profile_times_a_cohort_of_one(tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    run_script("step_profile.py", "--dry-run", "--workdir", str(tmp_path / "work"), "--out", str(out))
    rows = json.loads(out.read_text())["results"]
    assert [(r["attn"], r["checkpointing"]) for r in rows] == [("sdpa", True), ("sdpa", False), ("eager", True), ("eager", False)]
    for r in rows:
        assert min(r["forward_s"], r["forward_backward_s"], r["optimizer_step_s"], r["micro_step_s"]) > 0 and r["tokens"] > 0


def test_search_efficiency_replays_through_the_sweeps_study(tmp_path: Path) -> None:
    """A replay proposes through sweep/engine/study.py (no Ray, no training): the pruner stops
    trials early under asha, never without it, and the budget is the number of trials."""
    import itertools

    import search_efficiency as se

    space = tmp_path / "space.yaml"
    space.write_text(se.SPACE.format(name="grid", demo=ROOT / "search_spaces" / "data" / "demo", results=tmp_path / "sweeps", in_flight=se.IN_FLIGHT))
    curves = {}
    for lr, r, t, b in itertools.product([1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2], [8, 32], ["attention", "all-linear"], [(2, 4), (8, 1)]):
        final = 1.0 + abs(lr - 3e-3) * 100 + (0.1 if r == 8 else 0.0)  # a smooth landscape: the shape does not matter here
        curves[se.key({"learning_rate": lr, "lora_r": r, "target_modules": t, "batch": b})] = [[s, final + 2.0 / s] for s in range(10, 61, 10)]
    asha = se.run_replay(space, "tpe+asha", 12, 0, curves, tmp_path, detail=True)
    plain = se.run_replay(space, "random", 6, 0, curves, tmp_path, detail=True)
    assert len(asha["trials"]) == 12 and asha["completed"] < 12 and asha["steps"] < 12 * 60  # some were pruned at a rung
    assert plain["completed"] == 6 and plain["steps"] == 6 * 60 and plain["via"] == se.VIA
    assert asha["best"] == min(curves[k][-1][1] for k, steps in asha["trials"] if steps == 60)


def test_search_suite_trains_a_cohort_of_one_deterministically_and_refuses_another_trainers_memo(tmp_path: Path) -> None:
    import search_suite as ss

    memo = tmp_path / "old.json"
    memo.write_text(json.dumps({"demo": {}}))  # the lone-trial loop's memo: no trainer named
    with pytest.raises(SystemExit, match="give --curves a new file"):
        ss.Curves(memo, {}, tmp_path)
    curves = ss.Curves(tmp_path / "curves.json", {"demo": ROOT / "search_spaces" / "data" / "demo"}, tmp_path)
    config = {"learning_rate": 1e-3, "lora_r": 8, "target_modules": "attention", "batch": [8, 1], "lora_dropout": 0.1}
    first = curves.get("demo", config, points=1)  # stopped after its first evaluation
    full = curves.get("demo", config)  # then in full: its first point must be the one kept
    assert len(first) == 1 and len(full) == ss.POINTS and curves.prefix_mismatches == 0
    assert json.loads((tmp_path / "curves.json").read_text())["trainer"] == ss.TRAINER
