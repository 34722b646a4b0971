"""bench/seed_vs_ours.py --profile: where a row's timed steps spend their (here CPU) time."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from seed_vs_ours import KernelProfile  # noqa: E402


def test_profile_covers_only_the_timed_steps_and_sorts_time_by_kind() -> None:
    import torch

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    calls: list[str] = []

    def step(kind: str) -> float:  # stands in for a timed optimizer step (bench/seed_vs_ours.py)
        calls.append(kind)
        return float((a @ b).sum()) if kind == "timed" else float(torch.relu(a).sum())

    profile = KernelProfile(warmup=2, timed=3)
    wrapped = profile.around(step)
    for kind in ("warm", "warm", "timed", "timed", "timed", "after"):
        wrapped(kind)
    out = profile.summary()
    assert calls == ["warm", "warm", "timed", "timed", "timed", "after"]  # the wrapper changes no call
    assert out["window_seconds"] > 0 and 0 < out["kernel_seconds"]
    assert "3 timed optimizer steps (after 2 warm-up steps)" in out["window"]
    assert out["by_kind_seconds"]["gemm"] > 0  # aten::mm ran only in the timed steps
    names = [t["name"] for t in out["top"]]
    assert "aten::mm" in names and "aten::relu" not in names  # warm-up and later steps are outside the window
    assert [t["seconds"] for t in out["top"]] == sorted((t["seconds"] for t in out["top"]), reverse=True)
    assert abs(sum(out["by_kind_seconds"].values()) - out["kernel_seconds"]) < 1e-3


def test_profile_of_a_trial_that_stopped_early_says_so() -> None:
    profile = KernelProfile(warmup=2, timed=3)
    wrapped = profile.around(lambda: 0.0)
    for _ in range(3):
        wrapped()
    assert "fewer than 2 + 3" in profile.summary()["error"]
