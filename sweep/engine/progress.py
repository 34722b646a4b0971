"""Terminal progress: one line per trial event while the sweep runs, the sweep's progress with an
ETA (a rich bar on a terminal, plain `progress:` lines otherwise), a table at the end.

The workers send their trials' events with each Tune report (trainable/cohort_worker.py): dicts
with `event` (start, eval, end, shed, note, worker), `trial` (t007), `text`, and for an end its
`status` and metrics. The driver prints them in arrival order, prefixed by the sweep's clock.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ray.tune import Callback

from core.contract import ERROR, PEAK_RSS_GB, PEAK_VRAM_GB, STEP, TOKENS_PER_SEC, TrialStatus, finite


def memory_text(result: dict[str, Any]) -> str:
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
    """`progress: 3/8 trials finished, 2 running | elapsed 4m | ETA ...`."""
    left = eta(done, elapsed, total, time_budget)
    text = f"ETA {duration(left[0])} ({left[1]})" if left else "ETA after the first trial ends"
    of = f"/{total}" if total else ""
    return f"progress: {done}{of} trials finished, {running} running | elapsed {duration(elapsed)} | {text}"


class Progress(Callback):
    """The trials' lines as the workers report them, a worker's own failure, and after each trial
    ends (and every `every` seconds) a status line (running, ended by status, the best so far, GPU
    memory) and the sweep's progress with an ETA: the sooner of the time budget's end and the trials
    left at the pace so far. `live` (stdout is a terminal): a rich progress bar below the lines,
    redrawn in place; otherwise a plain `progress:` line."""

    def __init__(self, metric: str, mode: str, log: Callable[[str], None], total: int | None = None, time_budget: float | None = None,
                 live: bool = False, every: float = 60):  # fmt: skip
        self.metric, self.mode, self.log = metric, mode, log  # log: a function, not a stream (Tune pickles its callbacks)
        self.total, self.time_budget, self.live, self.every = total, time_budget, live, every
        self.start = time.monotonic()
        self.last_status = self.start
        self.running: set[str] = set()
        self.ended: dict[str, int] = {}
        self.best: float | None = None
        self.best_label = ""
        self.worker_failures: list[str] = []  # "worker <id>: <its error>", for the summary when no trial ran
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_bar": None}  # a live bar holds a thread

    @property
    def done(self) -> int:
        return sum(self.ended.values())

    def say(self, text: str) -> None:
        elapsed = int(time.monotonic() - self.start)
        self.log(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}")

    def progress_line(self) -> str:
        return progress_line(self.done, len(self.running), time.monotonic() - self.start, self.total, self.time_budget)

    def status_line(self) -> str:
        parts = [f"running {len(self.running)}"] + [f"{s} {n}" for s, n in sorted(self.ended.items())]
        best = f"best {self.best_label} {self.metric} {self.best:.4f}" if self.best is not None else "best -"
        return "status: " + ", ".join(parts) + f" | {best} | GPU memory {gpu_memory_in_use()}"

    def _draw(self) -> None:
        if not self.live:
            self.say(self.progress_line())
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress as Bar, TextColumn

        if self._bar is None:
            self._bar = Bar(TextColumn("sweep"), BarColumn(), TextColumn("{task.fields[text]}"), console=Console(), transient=False)
            self._task = self._bar.add_task("sweep", total=self.total or None, text="")
            self._bar.start()
        self._bar.update(self._task, completed=self.done, text=self.progress_line().removeprefix("progress: "))

    def close(self) -> None:
        """Stop drawing the bar (the sweep ended, or failed); its last state stays on the screen."""
        if self._bar is not None:
            self._draw()
            self._bar.stop()
            self._bar = None

    def _better(self, value: float) -> bool:
        return self.best is None or (value < self.best if self.mode == "min" else value > self.best)

    def trial_ended(self, label: str, status: str, text: str | None = None) -> None:
        """A trial's end: its line, then the status line and the sweep's progress."""
        self.running.discard(label)
        if text:
            self.say(text)
        self.ended[status] = self.ended.get(status, 0) + 1
        self.say(self.status_line())
        self._draw()
        self.last_status = time.monotonic()

    def _event(self, event: dict[str, Any]) -> None:
        kind, label = event.get("event"), event.get("trial", "")
        if kind == "start":
            self.running.add(label)
            self.say(event["text"])
            if self.live:
                self._draw()
        elif kind == "end":
            status, metrics = str(event.get("status")), event.get("metrics") or {}
            text = f"{label} {status:<10}"
            value = metrics.get(self.metric)
            if finite(value):
                text += f" {self.metric} {value:.4f} at step {metrics.get(STEP)}"
                if status == TrialStatus.COMPLETED and self._better(value):
                    self.best, self.best_label = value, label
                    text += "  (best so far)"
            if metrics.get(ERROR):
                text += f"  {metrics[ERROR]}"
            self.trial_ended(label, status, text)
        else:  # eval, shed, note, worker: as the worker wrote it
            if kind == "shed":
                self.running.discard(label)
            self.say(event["text"])

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(f"worker {trial.trial_id} start ({trial.config.get('method')})")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        for event in result.get("events") or []:
            self._event(event)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if self.running and time.monotonic() - self.last_status > self.every:
            self.last_status = time.monotonic()
            self.say(self.status_line())
            self._draw()
        elif self._bar is not None:  # the bar's clock and ETA move between the lines
            self._draw()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        counts = (trial.last_result or {}).get("members") or {}
        self.say(f"worker {trial.trial_id} done: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no trials"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        from sweep.engine.workers import error_text, last_line

        why = last_line(error_text(trial))[:300] or "worker died"
        self.worker_failures.append(f"worker {trial.trial_id}: {why}")
        self.say(f"worker {trial.trial_id} failed: {why}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.close()


def table(rows: list[dict[str, Any]], metric: str, write: Callable[[str], None]) -> None:
    """All trials, best first: label, status, step, metric, speed, memory, summary."""
    header = f"{'trial':<6} {'status':<10} {'step':>5} {metric:>11} {'tok/s':>8} {'memory':>14}  config"
    write(header)
    write("-" * len(header))
    for r in rows:
        value = r.get(metric)
        shown = f"{value:.4f}" if finite(value) else "-"
        tps = f"{r[TOKENS_PER_SEC]:.0f}" if finite(r.get(TOKENS_PER_SEC)) else "-"
        write(f"{r['label']:<6} {r['status']:<10} {r.get('step') or '-':>5} {shown:>11} {tps:>8} {memory_text(r):>14}  {r['summary']}")
