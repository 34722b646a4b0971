"""Fault injection, for testing how a sweep survives failing trials; unused in normal work.

    LORA_SWEEP_FAULTS="oom@3:lora_r=8;nan@2:lora_r=16"

makes trials whose lora_r is 8 run out of memory in their step 3, and those with lora_r 16 produce
a non-finite loss from step 2 on. `oom_cohort@N`: out of memory from step N while other members
train beside it (it fits alone). A condition compares a member's setting as text (lora_r=8,
method=qlora, learning_rate=0.001); several are joined by commas and must all hold.

The worker reads the variable once, when it starts (Ray workers inherit it from the process that
starts Ray), and wraps its cohort in a `FaultyCohort` only when it is set: the training step itself
knows nothing of faults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

FAULTS_ENV = "LORA_SWEEP_FAULTS"
KINDS = ("oom", "nan", "oom_cohort")


@dataclass(frozen=True)
class Fault:
    kind: str  # oom | nan | oom_cohort
    step: int  # the optimizer step it strikes at (from then on, for nan)
    when: tuple[tuple[str, str], ...]  # (setting, value as text) that must all hold

    def matches(self, train: Any) -> bool:
        return all(str(getattr(train, key, None)) == value for key, value in self.when)


def parse(text: str) -> list[Fault]:
    """The faults of LORA_SWEEP_FAULTS's value; entries that do not parse are ignored."""
    out = []
    for entry in filter(None, text.split(";")):
        head, _, condition = entry.partition(":")
        kind, _, step = head.partition("@")
        when = tuple(tuple(item.split("=", 1)) for item in condition.split(",") if "=" in item)
        if kind in KINDS and step.isdigit():
            out.append(Fault(kind, int(step), when))  # type: ignore[arg-type]
    return out


def from_environment() -> list[Fault]:
    return parse(os.environ.get(FAULTS_ENV, ""))


class FaultyCohort:
    """A cohort (trainable.cohort.Cohort, or anything with its interface) whose members matching a
    fault fail as the fault says: its step raises the OOM a real one would, or leaves the member
    with a non-finite loss. Everything else is the cohort's own."""

    def __init__(self, cohort: Any, faults: list[Fault]):
        object.__setattr__(self, "_cohort", cohort)
        object.__setattr__(self, "_faults", list(faults))
        object.__setattr__(self, "_of_slot", {})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cohort, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cohort, name, value)

    def _track(self, slot: int) -> int:
        train = self._cohort.members[slot].train
        self._of_slot[slot] = next((f for f in self._faults if f.matches(train)), None)
        return slot

    def add(self, train: Any, *args: Any, **kwargs: Any) -> int:
        return self._track(self._cohort.add(train, *args, **kwargs))

    def restore(self, folder: Any, *args: Any, **kwargs: Any) -> int:
        return self._track(self._cohort.restore(folder, *args, **kwargs))

    def remove(self, slot: int) -> Any:
        self._of_slot.pop(slot, None)
        return self._cohort.remove(slot)

    def step(self) -> dict[int, int]:
        running = self._cohort.running()
        for slot in running:
            fault, member = self._of_slot.get(slot), self._cohort.members[slot]
            if fault and member.step + 1 >= fault.step and (fault.kind == "oom" or (fault.kind == "oom_cohort" and len(running) > 1)):
                import torch

                raise torch.OutOfMemoryError(f"CUDA out of memory in a cohort step (injected by {FAULTS_ENV} for {member.name})")
        stepped = self._cohort.step()
        for slot, step in stepped.items():
            fault = self._of_slot.get(slot)
            if fault and fault.kind == "nan" and step >= fault.step:
                self._cohort.members[slot].status = "nan"
        return stepped
