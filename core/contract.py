"""What a trial reports, and how a finished trial's status is decided.

The workers write these names, the driver and the read-back commands read them, MLflow, the Optuna
study and the terminal show them: they are the contract between `trainable/` and `sweep/` and the
names a user sees in MLflow and in a sweep's folder, so they are spelled once, here.
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
# placement data a trial's run logs beside its hyperparameters (never hyperparameters themselves)

GPU_SHARE = "gpu_share"  # the fraction of a GPU a trial asked Ray for (sweeps of earlier versions, one trial per Ray trial)
GPU_IDS = "gpu_ids"  # the GPU(s) Ray gave its worker (a param the worker logs)
PLACEMENT_KEYS = (GPU_SHARE, ESTIMATED_VRAM_GB)  # read back beside the hyperparameters (sweep.readback.results)


def metric_name(name: str) -> str:
    """Today's name of a metric read back from MLflow (a sweep written before a rename too)."""
    return LEGACY_METRICS.get(name, name)


def finite(value: Any) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def missing_objectives(last_result: dict[str, Any] | None, objectives: tuple[str, ...]) -> str | None:
    """Why a finished trial cannot be ranked (an objective it never reported), or None."""
    missing = [m for m in objectives if not finite((last_result or {}).get(m))]
    if not missing:
        return None
    return f"objective {', '.join(missing)} was not reported (peak_vram_gb exists on GPUs only; on a CPU use peak_rss_gb)"


# ----------------------------------------------------------------------------------------------
# names shared by the driver, the workers and the read-back commands


def trial_label(number: int) -> str:
    """The Optuna trial number as the label a user sees everywhere: 7 -> 't007'."""
    return f"t{number:03d}"


# A sweep folder's trial files (written by the workers, read by resume, status, best and export):
#   <sweep_dir>/trials/t007/step-000040/   a member checkpoint (PEFT adapter + optimizer + state)
#   <sweep_dir>/trials/t007/reports.jsonl  one line per evaluation (status --watch reads it)
#   <sweep_dir>/work/                      the workers' shared queue, tickets and locks
TRIALS_DIR = "trials"
WORK_DIR = "work"
REPORTS_FILE = "reports.jsonl"
CHECKPOINT_PREFIX = "step-"
MEMBER_STATE = "member.json"  # written last into a member checkpoint: a folder without it is incomplete
WORKER_STATE = "worker.json"  # beside it: what the worker keeps of the member (timing, evaluations)

# Optuna user attributes of a sweep's trials (the study is read by status and list without Optuna)
ATTR_WORKER = "ray_trial_id"  # the worker (its Ray Tune trial id) that trains or trained it: set once it ran
ATTR_ATTEMPT = "attempt"  # 1 for the first run; more after its worker died and it was retried
ATTR_DUPLICATE_OF = "duplicate_of"  # a duplicate proposal: the label of the trial it repeats
ATTR_WARM_START = "warm_start_from"  # a previous sweep's trial carried into this study
ATTR_USER_POINT = "point_to_evaluate"  # enqueued from search.points_to_evaluate: its index there


def is_sweep_trial(trial: Any) -> bool:
    """Whether an entry of a sweep's study is one of its trials: what run, status, list, best,
    report and estimate count, and nothing else. A trial is one once a worker took it (ATTR_WORKER),
    or once placement refused it (infeasible: never trained, but recorded in MLflow); not a start-up
    point still queued (Optuna's WAITING), one asked and never sampled, a duplicate proposal, one
    waiting in the queue for a worker of its method (or closed there when the sweep ended), nor a
    warm start's (a previous sweep's trial, told to the sampler). `trial`: Optuna's FrozenTrial or
    sweep.folder.studyfile.StudyTrial (anything with `user_attrs`)."""
    attrs = trial.user_attrs
    return ATTR_WARM_START not in attrs and (ATTR_WORKER in attrs or attrs.get(STATUS) == TrialStatus.INFEASIBLE)


# MLflow tags of a trial's child run (beside STATUS and ERROR)
TAG_TRIAL = "trial"  # its label
TAG_PARENT = "mlflow.parentRunId"


def rate_text(value: float) -> str:
    """0.0002 -> '2e-4', 0.0151 -> '2e-2': one significant digit is how people name rates."""
    return f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")


def summary(hyper: dict[str, Any]) -> str:
    """'qlora r16 a32 lr2e-4 b4x8 attention': the values people compare trials by."""
    parts = []
    if "method" in hyper:
        parts.append(str(hyper["method"]))
    if "lora_r" in hyper:
        parts.append(f"r{hyper['lora_r']}")
    if "lora_alpha" in hyper:
        alpha = hyper["lora_alpha"]
        parts.append(f"a{alpha:g}" if isinstance(alpha, float) else f"a{alpha}")
    if "learning_rate" in hyper:
        parts.append("lr" + rate_text(float(hyper["learning_rate"])))
    if "batch" in hyper:
        micro, accum = hyper["batch"]
        parts.append(f"b{micro}x{accum}")
    if "target_modules" in hyper:
        t = hyper["target_modules"]
        parts.append(t if isinstance(t, str) else "+".join(t))
    return " ".join(parts)


def param_value(value: Any) -> str:
    """MLflow params are strings: lists/tuples read as they were written in the space file; a float
    to 4 significant digits (a learning rate of 2.0593557e-05 reads 2.059e-05, whole in a table
    cell; the study keeps the exact value, and readback takes it from there)."""
    if isinstance(value, tuple | list):
        return "[" + ", ".join(param_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
