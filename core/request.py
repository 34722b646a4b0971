"""What a worker is asked to train: one Optuna trial, as a typed value that travels between the
driver and the workers (through the source's queue files, and Ray's pickles).

A `TrialRequest` carries the trial's label and number, its sampled hyperparameters (decoded, as the
space file writes them; the fixed ones come from the sweep's train section), and where it continues
from: its last member checkpoint (a resumed sweep, a retry after its worker died, or an OOM that
shed it from a cohort), with how often that happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from core.contract import trial_label


@dataclass
class TrialRequest:
    """One Optuna trial for a worker's cohort."""

    label: str  # t007
    number: int  # the Optuna trial number
    hyper: dict[str, Any] = field(default_factory=dict)  # the sampled values, decoded
    checkpoint: str | None = None  # its last member checkpoint (resumed, retried, or shed by an OOM)
    attempt: int = 1  # 1 for the first run; more after its worker died
    sheds: int = 0  # times an OOM shed it from a cohort
    alone: bool = False  # shed twice: it runs without other members

    def __post_init__(self) -> None:
        if self.label != trial_label(self.number):
            raise ValueError(f"trial label {self.label!r} does not name trial number {self.number} (expected {trial_label(self.number)!r})")
        if self.attempt < 1 or self.sheds < 0:
            raise ValueError(f"{self.label}: attempt {self.attempt} and sheds {self.sheds}; expected attempt >= 1 and sheds >= 0")
