"""What the driver knows about one trial: its label, a one-line summary, and how it ended.

The Optuna study, MLflow and the terminal all read a trial's outcome from `outcome()` (in
core.contract, with the statuses and metric names; importable from here as before), so they always
agree on it.
"""

from __future__ import annotations

from typing import Any

from core.contract import TrialStatus, finite, missing_objectives, outcome  # noqa: F401 - re-exported


class Ledger:
    """Driver-side facts about the sweep's trials, shared by the searcher, scheduler and callbacks.

    labels: Ray trial id -> 't007', where 7 is the Optuna trial number (set when Optuna samples it),
    so a name in the terminal, in MLflow and in the study all point to the same trial.
    stopped: Ray trial id -> the step at which the scheduler stopped it.
    retrying: Ray trial id -> next attempt, for a trial whose worker died and that runs again.
    """

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}
        self.stopped: dict[str, int] = {}
        self.retrying: dict[str, int] = {}  # Ray trial id -> the attempt its Optuna trial goes on with

    def label(self, trial_id: str) -> str:
        return self.labels.get(trial_id, trial_id)

    def pruned(self, trial_id: str) -> bool:
        return trial_id in self.stopped


def _number(value: Any) -> str:
    """16 -> '16', 8.5 -> '8.5'."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _rate(value: float) -> str:
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
        parts.append(f"a{_number(hyper['lora_alpha'])}")
    if "learning_rate" in hyper:
        parts.append(f"lr{_rate(float(hyper['learning_rate']))}")
    if "batch" in hyper:
        micro, accum = hyper["batch"]
        parts.append(f"b{micro}x{accum}")
    if "target_modules" in hyper:
        t = hyper["target_modules"]
        parts.append(t if isinstance(t, str) else "+".join(t))
    return " ".join(parts)


def param_value(value: Any) -> str:
    """MLflow params are strings: lists/tuples read as they were written in the space file."""
    if isinstance(value, tuple | list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


NO_ERROR_TEXT = "the trial's worker died without an error message"


def error_text(trial: Any) -> str | None:
    """The error a failed Tune trial left: the full text (traceback included), or None.

    Tune writes it under the trial's local folder first and syncs it to storage later, so read
    the local file rather than trial.get_error(), which looks in storage.
    """
    for read in (lambda: open(trial.error_file).read(), lambda: trial.get_error()):
        try:
            text = read()
        except Exception:  # no such file (the worker died before Tune wrote one)
            continue
        if text:
            return str(text).strip()
    return None


def last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""
