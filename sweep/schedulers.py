"""Multi-fidelity schedulers, with budgets in training steps, that write down whom they stop.

Ray's schedulers decide from each report whether a trial continues; the study and MLflow need to
know which trials a scheduler stopped (pruned) as opposed to trials that finished or ran out of
time. Each class here is Ray's own, recording its STOP decisions in the sweep's Ledger.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule, TrialScheduler

from core.contract import STATUS, STEP, TrialStatus
from sweep.config import SweepConfig
from sweep.trials import Ledger

TIME_ATTR = STEP  # rungs, brackets and grace periods count training steps, not reports


class _Records:
    ledger: Ledger

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)  # type: ignore[misc]
        # A finished trial that reaches max_t is stopped too; only a running one was pruned.
        if decision == TrialScheduler.STOP and result.get(STATUS) == TrialStatus.RUNNING:
            self.ledger.stopped[trial.trial_id] = int(result.get(TIME_ATTR, 0))
        return decision


class RecordingASHA(_Records, ASHAScheduler):
    def __init__(self, ledger: Ledger, **kwargs: Any):
        self.ledger = ledger
        super().__init__(**kwargs)


class RecordingHyperBand(_Records, HyperBandScheduler):
    """Hyperband halves a bracket by stopping its paused losers through the controller, not by
    answering STOP: those stops are recorded here. A paused trial that had already finished
    (reached max_t) and is merely cleaned up is not a pruned one."""

    def __init__(self, ledger: Ledger, **kwargs: Any):
        self.ledger = ledger
        super().__init__(**kwargs)

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        trial = super().choose_trial_to_run(tune_controller)
        if trial is not None:
            return trial
        # Deadlock breaker. A trial that Hyperband pauses on its final report (it reached max_t)
        # races with the end of its function; seen (rarely) on 2 cores: every live trial PAUSED,
        # none due to resume, no new trial to come, and the sweep waiting forever. Then: stop the
        # paused trials that had finished (nothing is left to run) and resume one that had not.
        trials = tune_controller.get_trials()
        if any(t.status in (Trial.RUNNING, Trial.PENDING) for t in trials):
            return None
        paused = [t for t in trials if t.status == Trial.PAUSED and t in self._trial_info]
        for t in paused:
            if (t.last_result or {}).get(STATUS, TrialStatus.RUNNING) != TrialStatus.RUNNING:
                tune_controller.stop_trial(t)
        for t in paused:
            if t.status == Trial.PAUSED:
                bracket, _ = self._trial_info[t]
                bracket.trials_to_unpause.add(t)
                return t
        return None

    def _process_bracket(self, tune_controller: Any, bracket: Any) -> str:
        stop = tune_controller.stop_trial

        def recording_stop(trial: Any) -> Any:
            last = trial.last_result or {}
            if last.get(STATUS) == TrialStatus.RUNNING:
                self.ledger.stopped[trial.trial_id] = int(last.get(TIME_ATTR, 0))
            return stop(trial)

        tune_controller.stop_trial = recording_stop
        try:
            return super()._process_bracket(tune_controller, bracket)
        finally:
            del tune_controller.stop_trial  # back to the class's method


class RecordingMedian(_Records, MedianStoppingRule):
    def __init__(self, ledger: Ledger, **kwargs: Any):
        self.ledger = ledger
        super().__init__(**kwargs)


def make_scheduler(cfg: SweepConfig, ledger: Ledger) -> TrialScheduler:
    sched = cfg.search.scheduler
    common = {"time_attr": TIME_ATTR, "metric": cfg.search.metric, "mode": cfg.search.mode}
    if sched.type == "asha":
        return RecordingASHA(ledger, **common, max_t=cfg.max_t, grace_period=cfg.grace_period, reduction_factor=sched.reduction_factor)
    if sched.type == "hyperband":
        # Hyperband pauses trials between rounds; they resume from their last checkpoint.
        return RecordingHyperBand(ledger, **common, max_t=cfg.max_t, reduction_factor=sched.reduction_factor)
    if sched.type == "median":
        return RecordingMedian(ledger, **common, grace_period=cfg.grace_period, min_samples_required=sched.min_samples)
    return FIFOScheduler()
