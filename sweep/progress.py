"""Terminal progress: one line per trial event while the sweep runs, a table at the end."""

from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

from sweep.trials import Ledger, error_text, finite, last_line, outcome, summary


def _memory(result: dict[str, Any]) -> str:
    if finite(result.get("peak_vram_gb")):
        return f"{result['peak_vram_gb']:.1f} GB VRAM"
    if finite(result.get("peak_rss_gb")):
        return f"{result['peak_rss_gb']:.2f} GB RSS"
    return "-"


class Progress(Callback):
    def __init__(self, metric: str, mode: str, max_steps: int, ledger: Ledger, fixed: dict[str, Any], log: Callable[[str], None] = print):
        self.metric, self.mode, self.max_steps = metric, mode, max_steps
        self.ledger = ledger
        self.fixed = fixed
        self.log = log  # a function, not a stream: Tune pickles its callbacks
        self.start = time.monotonic()
        self.best: float | None = None

    def say(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        self.log(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}")

    def _better(self, value: float) -> bool:
        return self.best is None or (value < self.best if self.mode == "min" else value > self.best)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"{self.ledger.label(trial.trial_id)} start      {summary({**self.fixed, **trial.config})}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not finite(result.get(self.metric)):
            return
        tps = result.get("tokens_per_sec")
        speed = f"{tps / 1000:.1f}k tok/s" if finite(tps) else ""
        self.say(
            f"{self.ledger.label(trial.trial_id)} step {result['step']:>4}/{self.max_steps}  {self.metric} {result[self.metric]:.4f}"
            f"  train_loss {result.get('train_loss', float('nan')):.4f}  {speed}  {_memory(result)}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        status = outcome(result, False, self.ledger.pruned(trial.trial_id))
        value = result.get(self.metric)
        text = f"{self.ledger.label(trial.trial_id)} {status:<10}"
        if finite(value):
            text += f" {self.metric} {value:.4f} at step {result.get('step')}"
            if status == "completed" and self._better(value):
                self.best = value
                text += "  (best so far)"
        if result.get("error"):
            text += f"  {result['error']}"
        self.say(text)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label = self.ledger.label(trial.trial_id)
        if trial.trial_id in self.ledger.retrying:
            step = (trial.last_result or {}).get("step")
            where = f"from its checkpoint at step {step}" if step else "from the start"
            self.say(f"{label} worker died; attempt {self.ledger.retrying[trial.trial_id]} {where}")
            return
        self.say(f"{label} failed     {last_line(error_text(trial))[:300] or 'worker died'}")


def table(rows: list[dict[str, Any]], metric: str, write: Callable[[str], None]) -> None:
    """All trials, best first: label, status, step, metric, speed, memory, summary."""
    header = f"{'trial':<6} {'status':<10} {'step':>5} {metric:>11} {'tok/s':>8} {'memory':>14}  config"
    write(header)
    write("-" * len(header))
    for r in rows:
        value = r.get(metric)
        shown = f"{value:.4f}" if finite(value) else "-"
        tps = f"{r['tokens_per_sec']:.0f}" if finite(r.get("tokens_per_sec")) else "-"
        write(f"{r['label']:<6} {r['status']:<10} {r.get('step') or '-':>5} {shown:>11} {tps:>8} {_memory(r):>14}  {r['summary']}")
