"""Which trials that errored run again: the sweep's one retry policy.

A trial whose worker died (its process or node went away: preemption, a lost node, the OOM
killer) runs again from its last checkpoint while it has retries left (search.max_retries); a
trial that failed for its own reasons (an exception, OOM, NaN) does not. The decision goes to the
searcher (`requeue` or `fail`) and into the Ledger (`retrying`), where the MLflow and terminal
callbacks read it: this callback is listed before them.
"""

from __future__ import annotations

import re
from typing import Any

from ray.tune import Callback

from sweep.trials import NO_ERROR_TEXT, Ledger, error_text

# How Ray says a trial's process or node went away (as opposed to the trial raising an error).
WORKER_DIED = re.compile(
    r"ActorDiedError|RayActorError|NodeDiedError|WorkerCrashedError|OwnerDiedError|ActorUnavailableError"
    r"|actor died|actor [0-9a-f]+ is unavailable|temporarily unavailable|node .{0,80} died|worker died|worker process has died",
    re.I,
)


def should_retry(error: str, attempt: int, max_retries: int) -> bool:
    """A dead worker with retries left: attempt 1 is the first run, so max_retries=1 allows a second."""
    return bool(WORKER_DIED.search(error)) and attempt <= max_retries


class Retries(Callback):
    """Tune callback: on a trial's error, retry it (`search.requeue`) or fail it (`search.fail`)."""

    def __init__(self, search: Any, ledger: Ledger, max_retries: int):
        self.search, self.ledger, self.max_retries = search, ledger, max_retries

    def __getstate__(self) -> dict:
        """Pickled by Tune into tuner.pkl, which lora-sweep never restores: not the searcher."""
        return {"max_retries": self.max_retries}

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = error_text(trial) or NO_ERROR_TEXT
        if should_retry(error, self.search.attempts.get(trial.trial_id, 1), self.max_retries):
            checkpoint = getattr(trial.checkpoint, "path", None) if trial.checkpoint else None
            self.ledger.retrying[trial.trial_id] = self.search.requeue(trial.trial_id, checkpoint)
        else:
            self.search.fail(trial.trial_id, error)
