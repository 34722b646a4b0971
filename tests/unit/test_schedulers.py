"""Hyperband's deadlock breaker: when every live trial is paused and none is due to resume, the
finished ones are stopped and an unfinished one resumes; otherwise Ray's own choice stands."""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial

from sweep.schedulers import RecordingHyperBand
from sweep.trials import Ledger


class FakeTrial:
    def __init__(self, name: str, status: str, trial_status: str, step: int):
        self.trial_id, self.status, self.last_result = name, status, {"trial_status": trial_status, "step": step}


class FakeBracket:
    def __init__(self) -> None:
        self.trials_to_unpause: set = set()


class FakeController:
    def __init__(self, trials: list[FakeTrial]):
        self.trials, self.stopped = trials, []

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, trial: FakeTrial) -> None:
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)


def scheduler(trials: list[FakeTrial]) -> tuple[RecordingHyperBand, FakeBracket]:
    sched = RecordingHyperBand(Ledger(), time_attr="step", metric="eval_loss", mode="min", max_t=4, reduction_factor=2)
    bracket = FakeBracket()
    for t in trials:
        sched._trial_info[t] = (bracket, 0)  # type: ignore[index]
    return sched, bracket


def test_all_paused_none_due_to_resume_is_broken() -> None:
    done = FakeTrial("a", Trial.PAUSED, "completed", 4)
    waiting = FakeTrial("b", Trial.PAUSED, "running", 2)
    sched, bracket = scheduler([done, waiting])
    controller = FakeController([done, waiting])
    chosen: Any = sched.choose_trial_to_run(controller)
    assert controller.stopped == ["a"] and chosen is waiting and waiting in bracket.trials_to_unpause


def test_nothing_is_touched_while_a_trial_runs_or_waits_to_start() -> None:
    for other in (Trial.RUNNING, Trial.PENDING):
        paused = FakeTrial("a", Trial.PAUSED, "completed", 4)
        busy = FakeTrial("b", other, "running", 1)
        sched, bracket = scheduler([paused, busy])
        controller = FakeController([paused, busy])
        assert sched.choose_trial_to_run(controller) is None
        assert controller.stopped == [] and not bracket.trials_to_unpause and paused.status == Trial.PAUSED
