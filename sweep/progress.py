"""Terminal progress: one line per trial event while the sweep runs, the sweep's progress with an
ETA (a rich bar on a terminal, plain `progress:` lines otherwise), a table at the end."""

from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

from core.contract import ERROR, PEAK_RSS_GB, PEAK_VRAM_GB, STEP, TOKENS_PER_SEC, TRAIN_LOSS, TrialStatus
from sweep.trials import Ledger, error_text, finite, last_line, outcome, summary


def _memory(result: dict[str, Any]) -> str:
    if finite(result.get(PEAK_VRAM_GB)):
        return f"{result[PEAK_VRAM_GB]:.1f} GB VRAM"
    if finite(result.get(PEAK_RSS_GB)):
        return f"{result[PEAK_RSS_GB]:.2f} GB RSS"
    return "-"


def gpu_memory_in_use() -> str:
    """Used / total memory of this machine's GPUs (nvidia-smi), or '-' where there are none."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return "-"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
        pairs = [tuple(float(x) for x in line.split(",")) for line in out.splitlines() if line.strip()]
    except (OSError, ValueError, subprocess.SubprocessError):
        return "-"
    used, total = sum(p[0] for p in pairs) / 1024, sum(p[1] for p in pairs) / 1024
    return f"{used:.1f}/{total:.0f} GB" if pairs else "-"


def duration(seconds: float) -> str:
    """754 -> '12m34s', 5400 -> '1h30m', 42 -> '42s'."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _console() -> Any:
    from rich.console import Console

    return Console()


def eta(done: int, elapsed: float, total: int | None, time_budget: float | None) -> tuple[float, str] | None:
    """(seconds left, why): the sooner of the time budget's end and the trials left at the pace
    so far (finished trials per second of this run); None while neither is known."""
    found = []
    if time_budget:
        found.append((max(0.0, time_budget - elapsed), "time budget"))
    if total and done:
        found.append((max(0, total - done) * elapsed / done, "trials left at the pace so far"))
    return min(found) if found else None


def progress_line(done: int, running: int, elapsed: float, total: int | None, time_budget: float | None) -> str:
    """`progress: 3/8 trials finished, 2 running | elapsed 4m | ETA ...` (lone trials and cohorts alike)."""
    left = eta(done, elapsed, total, time_budget)
    text = f"ETA {duration(left[0])} ({left[1]})" if left else "ETA after the first trial ends"
    of = f"/{total}" if total else ""
    return f"progress: {done}{of} trials finished, {running} running | elapsed {duration(elapsed)} | {text}"


class Progress(Callback):
    """One line per trial event, and every `every` seconds (and after each trial ends) a status
    line: how many trials run, finished, were pruned or failed; the best so far; GPU memory.

    With `total` (the trials this driver run is to finish) or `time_budget` (its seconds), the
    sweep's progress and an ETA too: the sooner of the time budget's end and the trials left at
    the pace so far. `live` (stdout is a terminal): a rich progress bar below the lines, redrawn
    in place; otherwise a plain `progress:` line after each status line."""

    def __init__(
        self, metric: str, mode: str, max_steps: int, ledger: Ledger, fixed: dict[str, Any], log: Callable[[str], None] = print, every: float = 60,
        objectives: tuple[str, ...] = (), total: int | None = None, time_budget: float | None = None, live: bool = False,
    ):  # fmt: skip
        self.metric, self.mode, self.max_steps = metric, mode, max_steps
        self.objectives = objectives  # a multi-objective sweep's metrics: outcome() needs them to agree with MLflow and the study
        self.ledger = ledger
        self.fixed = fixed
        self.log = log  # a function, not a stream: Tune pickles its callbacks
        self.start = time.monotonic()
        self.best: float | None = None
        self.best_label = ""
        self.every = every
        self.last_status = time.monotonic()
        self.running: set[str] = set()
        self.ended: dict[str, int] = {}
        self.total, self.time_budget, self.live = total, time_budget, live
        self._bar: Any = None  # the rich progress bar while it is drawn (never pickled)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None}  # Tune pickles its callbacks; a live bar holds a thread

    def eta(self) -> tuple[float, str] | None:
        return eta(sum(self.ended.values()), time.monotonic() - self.start, self.total, self.time_budget)

    def progress_line(self) -> str:
        return progress_line(sum(self.ended.values()), len(self.running), time.monotonic() - self.start, self.total, self.time_budget)

    def _draw(self) -> None:
        """The sweep's progress: the live bar on a terminal, else a plain line."""
        if not self.live:
            self.say(self.progress_line())
            return
        from rich.progress import BarColumn, Progress as Bar, TextColumn

        if self._bar is None:
            self._bar = Bar(TextColumn("sweep"), BarColumn(), TextColumn("{task.fields[text]}"), console=_console(), transient=False)
            self._task = self._bar.add_task("sweep", total=self.total or None, text="")
            self._bar.start()
        text = self.progress_line().removeprefix("progress: ")
        self._bar.update(self._task, completed=sum(self.ended.values()), text=text)

    def close(self) -> None:
        """Stop drawing the bar (the sweep ended, or failed); its last state stays on the screen."""
        if self._bar is not None:
            self._draw()
            self._bar.stop()
            self._bar = None

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()

    def status_line(self) -> str:
        parts = [f"running {len(self.running)}"] + [f"{s} {n}" for s, n in sorted(self.ended.items())]
        best = f"best {self.best_label} {self.metric} {self.best:.4f}" if self.best is not None else "best -"
        return "status: " + ", ".join(parts) + f" | {best} | GPU memory {gpu_memory_in_use()}"

    def _ended(self, trial_id: str, status: str) -> None:
        self.running.discard(trial_id)
        self.ended[status] = self.ended.get(status, 0) + 1
        self.say(self.status_line())
        self._draw()
        self.last_status = time.monotonic()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.running and time.monotonic() - self.last_status > self.every:
            self.last_status = time.monotonic()
            self.say(self.status_line())
            self._draw()
        elif self._bar is not None:  # the bar's clock and ETA move between the lines
            self._draw()

    def say(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        self.log(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}")

    def _better(self, value: float) -> bool:
        return self.best is None or (value < self.best if self.mode == "min" else value > self.best)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self.say(f"{self.ledger.label(trial.trial_id)} start      {summary({**self.fixed, **trial.config})}")
        if self.live:
            self._draw()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if not finite(result.get(self.metric)):
            return
        tps = result.get(TOKENS_PER_SEC)
        speed = f"{tps / 1000:.1f}k tok/s" if finite(tps) else ""
        self.say(
            f"{self.ledger.label(trial.trial_id)} step {result[STEP]:>4}/{self.max_steps}  {self.metric} {result[self.metric]:.4f}"
            f"  train_loss {result.get(TRAIN_LOSS, float('nan')):.4f}  {speed}  {_memory(result)}"
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        status = outcome(result, False, self.ledger.pruned(trial.trial_id), self.objectives)
        value = result.get(self.metric)
        text = f"{self.ledger.label(trial.trial_id)} {status:<10}"
        if finite(value):
            text += f" {self.metric} {value:.4f} at step {result.get(STEP)}"
            if status == TrialStatus.COMPLETED and self._better(value):
                self.best, self.best_label = value, self.ledger.label(trial.trial_id)
                text += "  (best so far)"
        if result.get(ERROR):
            text += f"  {result[ERROR]}"
        self.say(text)
        self._ended(trial.trial_id, status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        label = self.ledger.label(trial.trial_id)
        if trial.trial_id in self.ledger.retrying:
            step = (trial.last_result or {}).get("step")
            where = f"from its checkpoint at step {step}" if step else "from the start"
            self.say(f"{label} worker died; attempt {self.ledger.retrying[trial.trial_id]} {where}")
            self.running.discard(trial.trial_id)
            return
        self.say(f"{label} failed     {last_line(error_text(trial))[:300] or 'worker died'}")
        self._ended(trial.trial_id, TrialStatus.FAILED)


def table(rows: list[dict[str, Any]], metric: str, write: Callable[[str], None]) -> None:
    """All trials, best first: label, status, step, metric, speed, memory, summary."""
    header = f"{'trial':<6} {'status':<10} {'step':>5} {metric:>11} {'tok/s':>8} {'memory':>14}  config"
    write(header)
    write("-" * len(header))
    for r in rows:
        value = r.get(metric)
        shown = f"{value:.4f}" if finite(value) else "-"
        tps = f"{r[TOKENS_PER_SEC]:.0f}" if finite(r.get(TOKENS_PER_SEC)) else "-"
        write(f"{r['label']:<6} {r['status']:<10} {r.get('step') or '-':>5} {shown:>11} {tps:>8} {_memory(r):>14}  {r['summary']}")
