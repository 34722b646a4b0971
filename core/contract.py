"""What a trial reports, and how a finished trial's status is decided.

The trainable writes these names, the driver's callbacks read them, MLflow, the Optuna study and
the terminal show them: they are the contract between `trainable/` and `sweep/` and the names a
user sees in MLflow, so they are spelled once, here.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any


class TrialStatus(StrEnum):
    """A trial's `trial_status` (the MLflow tag, the study's user attribute, the report key).

    A StrEnum: each member is its string, so `TrialStatus.COMPLETED == "completed"` and what was
    written before this type existed reads back unchanged.
    """

    RUNNING = "running"  # between reports; the trainable reports it at every eval but the last
    COMPLETED = "completed"  # ran max_steps
    PRUNED = "pruned"  # stopped early by the scheduler (ASHA, median, hyperband)
    STOPPED = "stopped"  # ended by the time budget or `python -m sweep stop`
    OOM = "oom"  # out of memory
    NAN = "nan"  # a non-finite loss
    FAILED = "failed"  # any other error, or an objective it never reported
    INFEASIBLE = "infeasible"  # refused by placement: its estimate exceeds one GPU; never launched
    RETRYING = "retrying"  # its worker died; it runs again from its last checkpoint
    LOST = "lost"  # asked by the sampler, never launched before the driver died (study only)
    DUPLICATE = "duplicate"  # the sampler proposed the configuration of a trial that ran or runs; never launched (study only)


# what a trial can end as (RUNNING and RETRYING are on the way; LOST and DUPLICATE never started)
FINAL_STATUSES = (
    TrialStatus.COMPLETED, TrialStatus.PRUNED, TrialStatus.STOPPED, TrialStatus.OOM,
    TrialStatus.NAN, TrialStatus.FAILED, TrialStatus.INFEASIBLE,
)  # fmt: skip

# ----------------------------------------------------------------------------------------------
# keys of a report (the dict a trial sends to Tune at each eval)

STEP = "step"  # optimizer steps done
STATUS = "trial_status"  # a TrialStatus
ERROR = "error"  # what went wrong (oom, nan), as text
HISTORY = "history"  # [[step, train_loss, lr], ...] since the previous report

# ----------------------------------------------------------------------------------------------
# metric names (MLflow metrics; any of OBJECTIVE_METRICS may be the search metric)

EVAL_LOSS = "eval_loss"
TRAIN_LOSS = "train_loss"
# The scheduled learning rate at a step. Not "learning_rate": that is the hyperparameter (the
# peak), an MLflow param, and a metric of the same name hid it in the runs table behind its last
# scheduled value (3.6e-6 for a peak of 5e-3).
LEARNING_RATE = "lr"
TOKENS_PER_SEC = "tokens_per_sec"  # all non-padding input tokens per second of training
LOSS_TOKENS_PER_SEC = "loss_tokens_per_sec"  # reply tokens (the ones that carry loss) only
PEAK_VRAM_GB = "peak_vram_gb"  # torch.cuda.max_memory_allocated
PEAK_VRAM_RESERVED_GB = "peak_vram_reserved_gb"  # torch.cuda.max_memory_reserved
PEAK_RSS_GB = "peak_rss_gb"  # on a CPU: the trial's peak resident memory
TRAIN_SECONDS = "train_seconds"
LOAD_SECONDS = "load_seconds"
ESTIMATED_VRAM_GB = "estimated_vram_gb"  # placement's estimate (a param of a launched trial, a metric of an infeasible one)

OBJECTIVE_METRICS = (EVAL_LOSS, TRAIN_LOSS, TOKENS_PER_SEC, PEAK_VRAM_GB, PEAK_RSS_GB)
# logged by step at every report (train_loss and lr come from HISTORY instead)
STEP_METRICS = (EVAL_LOSS, TOKENS_PER_SEC, LOSS_TOKENS_PER_SEC, PEAK_VRAM_GB, PEAK_VRAM_RESERVED_GB, PEAK_RSS_GB)
FINAL_METRICS = (TRAIN_SECONDS, LOAD_SECONDS)
# one row per trial in `status`, `report` and `best`
ROW_METRICS = (EVAL_LOSS, TRAIN_LOSS, TOKENS_PER_SEC, PEAK_VRAM_GB, PEAK_VRAM_RESERVED_GB, PEAK_RSS_GB, TRAIN_SECONDS, LOAD_SECONDS)
# metric names earlier versions wrote -> today's; whatever reads metrics back maps them (metric_name)
LEGACY_METRICS = {"learning_rate": LEARNING_RATE}

# ----------------------------------------------------------------------------------------------
# what the driver adds to a trial's Tune config beside the hyperparameters (see core.request)

GPU_SHARE = "gpu_share"  # the fraction of a GPU the trial asked Ray for
GPU_IDS = "gpu_ids"  # the GPU(s) Ray gave it (a param the trial logs)
PLACEMENT_KEYS = (GPU_SHARE, ESTIMATED_VRAM_GB)  # logged as params, never hyperparameters
RESUME_CHECKPOINT = "resume_checkpoint"  # a resumed or retried trial continues from this folder


def metric_name(name: str) -> str:
    """Today's name of a metric read back from MLflow (a sweep written before a rename too)."""
    return LEGACY_METRICS.get(name, name)


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def outcome(last_result: dict[str, Any] | None, errored: bool, stopped_by_scheduler: bool, objectives: tuple[str, ...] = ()) -> TrialStatus:
    """How a trial ended: completed, pruned, stopped, oom, nan or failed.

    The Optuna study, MLflow and the terminal all take a trial's status from here, so they agree
    on it. A trial that finished without reporting one of the sweep's objectives (peak_vram_gb on
    a CPU, say) cannot be ranked: failed.
    """
    if errored:
        return TrialStatus.FAILED
    result = last_result or {}
    status = result.get(STATUS)
    if status == TrialStatus.COMPLETED and any(not finite(result.get(m)) for m in objectives):
        return TrialStatus.FAILED
    if status in (TrialStatus.COMPLETED, TrialStatus.OOM, TrialStatus.NAN):
        return TrialStatus(status)
    return TrialStatus.PRUNED if stopped_by_scheduler else TrialStatus.STOPPED


def missing_objectives(last_result: dict[str, Any] | None, objectives: tuple[str, ...]) -> str | None:
    """Why a finished trial cannot be ranked (an objective it never reported), or None."""
    missing = [m for m in objectives if not finite((last_result or {}).get(m))]
    if not missing:
        return None
    return f"objective {', '.join(missing)} was not reported (peak_vram_gb exists on GPUs only; on a CPU use peak_rss_gb)"
