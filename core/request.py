"""What the driver asks a Ray Tune trial to do, as a typed value instead of a loose dict.

Tune hands a trainable one plain `config` dict. The driver puts three kinds of data in it: the
hyperparameters Optuna sampled, placement data (the GPU share the trial asked Ray for, the memory
estimate behind it), and resume data (the checkpoint a resumed or retried trial continues from).
Only the first kind is a hyperparameter: it names the trial, is logged as its params and goes to
the training loop. `TrialRequest` keeps the three apart; `to_config` / `from_config` are the one
place that knows how they are laid out in Tune's dict.

A `CohortRequest` is several Optuna trials in one Ray trial: they share one placement (one worker,
one GPU share, one loaded base model) and each keeps its own hyperparameters, label and resume
checkpoint. Its Tune config holds the members under `cohort`; `request_from_config` reads either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from core.contract import ESTIMATED_VRAM_GB, GPU_IDS, GPU_SHARE, RESUME_CHECKPOINT

LABEL = "trial"  # a cohort member's Optuna label (t007); a lone trial's label lives in the driver's Ledger
COHORT = "cohort"  # a cohort's members, each a member's own config
RESERVED = (GPU_SHARE, ESTIMATED_VRAM_GB, GPU_IDS, RESUME_CHECKPOINT, LABEL, COHORT)  # never hyperparameter names


@dataclass(frozen=True)
class Allocation:
    """Where a Ray trial runs and how much of a GPU it holds (placement data, not hyperparameters)."""

    gpu_share: float | None = None  # the fraction of one GPU asked of Ray (auto placement or a fractional gpus_per_trial)
    estimated_vram_gb: float | None = None  # the estimate the share was computed from
    gpu_ids: tuple[str, ...] = ()  # the GPU(s) Ray gave the trial, once known (the worker reads them)

    def __post_init__(self) -> None:
        if self.gpu_share is not None and not self.gpu_share >= 0:
            raise ValueError(f"gpu_share: got {self.gpu_share!r}; expected a fraction of a GPU >= 0, or None")
        if self.estimated_vram_gb is not None and not self.estimated_vram_gb >= 0:
            raise ValueError(f"estimated_vram_gb: got {self.estimated_vram_gb!r}; expected GB >= 0, or None")
        object.__setattr__(self, "gpu_ids", tuple(str(i) for i in self.gpu_ids))

    def to_config(self) -> dict[str, Any]:
        """The keys that are set, as Tune's config has them."""
        out: dict[str, Any] = {}
        if self.gpu_share is not None:
            out[GPU_SHARE] = self.gpu_share
        if self.estimated_vram_gb is not None:
            out[ESTIMATED_VRAM_GB] = self.estimated_vram_gb
        if self.gpu_ids:
            out[GPU_IDS] = list(self.gpu_ids)
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Allocation":
        return cls(config.get(GPU_SHARE), config.get(ESTIMATED_VRAM_GB), tuple(config.get(GPU_IDS) or ()))


def _check_hyper(hyper: Mapping[str, Any]) -> dict[str, Any]:
    clash = [k for k in hyper if k in RESERVED]
    if clash:
        raise ValueError(f"hyperparameters {clash} use reserved names; placement and resume data go in their own fields")
    return dict(hyper)


@dataclass(frozen=True)
class TrialRequest:
    """One Optuna trial to train: its hyperparameters, apart from placement and resume data.

    `hyper` holds the sampled values only (what Optuna chose; the fixed ones come from the train
    section); treat it as read-only.
    """

    hyper: Mapping[str, Any] = field(default_factory=dict)
    allocation: Allocation = field(default_factory=Allocation)
    resume_checkpoint: str | None = None
    label: str | None = None  # the Optuna trial's label; required for a cohort's members

    def __post_init__(self) -> None:
        object.__setattr__(self, "hyper", _check_hyper(self.hyper))

    def to_config(self) -> dict[str, Any]:
        """Tune's config: the hyperparameters, then resume and placement data where set."""
        out = dict(self.hyper)
        if self.label is not None:
            out[LABEL] = self.label
        if self.resume_checkpoint is not None:
            out[RESUME_CHECKPOINT] = self.resume_checkpoint
        out.update(self.allocation.to_config())
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TrialRequest":
        if COHORT in config:
            raise ValueError("this config is a cohort's; read it with request_from_config or CohortRequest.from_config")
        return cls(
            hyper={k: v for k, v in config.items() if k not in RESERVED},
            allocation=Allocation.from_config(config),
            resume_checkpoint=config.get(RESUME_CHECKPOINT),
            label=config.get(LABEL),
        )

    def params(self) -> dict[str, Any]:
        """What the trial's MLflow run logs as params: the hyperparameters and the placement data
        (never the resume checkpoint, a path that changes from attempt to attempt)."""
        placement = {k: v for k, v in self.allocation.to_config().items() if k != GPU_IDS}  # the trial logs gpu_ids itself
        return {**self.hyper, **placement}


@dataclass(frozen=True)
class CohortRequest:
    """Several Optuna trials trained in one Ray trial on one loaded base model.

    The members share `allocation` (one worker and its GPU share); each member carries its own
    hyperparameters, label and resume checkpoint, and none has an allocation of its own.
    """

    members: tuple[TrialRequest, ...]
    allocation: Allocation = field(default_factory=Allocation)

    def __post_init__(self) -> None:
        members = tuple(self.members)
        object.__setattr__(self, "members", members)
        if not members:
            raise ValueError("a cohort needs at least one member")
        labels = [m.label for m in members]
        if any(label is None for label in labels):
            raise ValueError("every cohort member needs its label (the Optuna trial it is, e.g. t007)")
        if len(set(labels)) != len(labels):
            raise ValueError(f"cohort member labels repeat: {labels}")
        if any(m.allocation != Allocation() for m in members):
            raise ValueError("cohort members share the cohort's allocation; give it to the CohortRequest, not to a member")

    def __len__(self) -> int:
        return len(self.members)

    def to_config(self) -> dict[str, Any]:
        return {COHORT: [m.to_config() for m in self.members], **self.allocation.to_config()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "CohortRequest":
        return cls(tuple(TrialRequest.from_config(m) for m in config[COHORT]), Allocation.from_config(config))


def request_from_config(config: Mapping[str, Any]) -> TrialRequest | CohortRequest:
    """Tune's config -> the request it carries: one trial, or a cohort of them."""
    return CohortRequest.from_config(config) if COHORT in config else TrialRequest.from_config(config)
