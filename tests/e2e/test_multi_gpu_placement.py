"""Memory-aware placement over several GPUs, on a Ray cluster that advertises four logical GPUs
(trials still train on the CPU): trials are spread over the GPUs by their memory shares, never more
on one GPU than fits, and each trial's MLflow run says which GPU it had (issue 10's placement
logic, exercised without a multi-GPU host)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest

from sweep.config import load_config
from sweep.engine.sweep import run_sweep
from tests.conftest import MINIMAL, write_space
from tests.e2e.conftest import logical_gpus, mlflow_runs

pytestmark = pytest.mark.e2e


@pytest.fixture()
def four_gpus() -> Iterator[None]:
    yield from logical_gpus(4)


def test_trials_spread_over_four_gpus_by_their_shares(tmp_path: Path, four_gpus: None) -> None:
    """auto placement on four GPUs: a worker per GPU (each a whole one), filling it with trials by
    their memory estimates; no GPU is left idle while trials wait, none is shared by two workers."""
    body = MINIMAL.replace("search: {num_trials: 2}", "search: {num_trials: 6, seed: 0, scheduler: {type: none}}").replace(
        "  lora_r: [4, 8]\n", "  lora_r: [4, 8, 16]\n  learning_rate: {loguniform: [1.0e-4, 1.0e-3]}\n"  # 6 distinct trials: a 3-point space is spent after 3
    ) + f"resources: {{gpus_per_trial: auto, gpu_memory_gb: 1.3, cpus_per_trial: 0.5}}\ntracking: {{results_dir: {tmp_path / 'out'}}}\n"
    cfg = load_config(write_space(tmp_path, body))
    lines: list[str] = []
    result = run_sweep(cfg, log=lines.append)
    out = "\n".join(lines)
    assert "placement: each worker fills one of 4 GPU(s) of 1 GB" in out and "workers: 4 of 1 GPU + 0.5 CPU" in out, out
    assert result.counts == {"completed": 6}, out
    _, children = mlflow_runs(cfg.mlflow_uri, cfg.experiment)
    gpus = [r.data.params["gpu_ids"] for r in children]
    assert all(g in {"0", "1", "2", "3"} for g in gpus), gpus  # one GPU each
    assert len(set(gpus)) >= 3, gpus  # spread, not stacked on GPU 0
    on = {}
    for r in children:  # each worker kept to its own GPU, and no GPU had two workers
        on.setdefault(r.data.params["cohort"], set()).add(r.data.params["gpu_ids"])
    assert all(len(g) == 1 for g in on.values()) and len({next(iter(g)) for g in on.values()}) == len(on), (on, Counter(gpus))
    assert all(float(r.data.params["estimated_vram_gb"]) > 0 for r in children)
