"""Memory-aware placement: how much of a GPU each trial asks Ray for (`gpus_per_trial: auto`).

A trial's share is its estimated peak (sweep/estimate.py) plus a safety margin, plus what the
process holds outside PyTorch's allocator (the CUDA context, allocator slack), over the GPU's
memory, rounded up to a twentieth so that trials of similar size can share a warm worker. Configs
whose share exceeds one GPU are infeasible: never launched, recorded as such, and reported to
Optuna as failed so it learns the boundary. Pure arithmetic; the profile comes from the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sweep.estimate import GB, ModelProfile, estimate, trial_shape

CONTEXT_BYTES = 0.75 * GB  # CUDA context + allocator slack per trial process
STEP = 0.05  # shares are multiples of this


@dataclass(frozen=True)
class Verdict:
    estimate_gb: float
    share: float  # fraction of one GPU to request; > 1 means infeasible
    feasible: bool
    reason: str = ""


@dataclass(frozen=True)
class Placement:
    profile: ModelProfile
    gpu_bytes: float
    margin: float
    max_seq_len: int
    embeddings: str
    attn: str
    loss: str
    fixed: dict[str, Any]

    def judge(self, sampled: dict[str, Any]) -> Verdict:
        hyper = {**self.fixed, **sampled}
        shape = trial_shape(hyper, self.max_seq_len, self.profile.text, self.embeddings, self.gpu_bytes, self.attn, self.loss)
        need = estimate(self.profile, shape).total
        share = (need * (1 + self.margin) + CONTEXT_BYTES) / self.gpu_bytes
        gb = need / GB
        if share > 1:
            reason = (
                f"infeasible: estimated peak {gb:.1f} GB (+{self.margin:.0%} margin, +{CONTEXT_BYTES / GB:.2f} GB context) "
                f"exceeds one {self.gpu_bytes / GB:.0f} GB GPU"
            )
            return Verdict(gb, share, False, reason)
        return Verdict(gb, min(1.0, round(math.ceil(share / STEP - 1e-9) * STEP, 2)), True)
