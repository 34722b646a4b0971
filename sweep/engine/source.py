"""Where a worker's trials come from and where their news goes (trainable.cohort_worker.MemberSource).

    source = StudySource(cfg, study, recorder, sweep_dir, budget, ...)   # picklable: travels to every worker
    task = source.take(worker, method, members)   # a continued trial first, else a new one from the study
    source.begin(task, params); source.report(task, metrics) -> prune?; source.end(task, metrics)

Every worker holds a copy; they coordinate through files in the sweep folder (shared by every node
already, for checkpoints), under <sweep_dir>/work/:
  queue/      trials waiting for a worker: continued ones (resume, retries), shed ones (an OOM), and
              ones the sampler chose for the other method (lora and qlora workers are separate)
  tickets-*/  one file per new trial this driver run may start (search.num_trials), taken with O_EXCL
  ask.lock    one worker asks the study at a time
  spent       the sampler proposes only what ran: no new trial starts
and <sweep_dir>/trials/t007/: the trial's member checkpoints (step-000040/) and reports.jsonl (one line
per evaluation: what `status` shows while it runs).

The study (sweep.engine.study) proposes and ends trials; the recorder (sweep.engine.recorder) writes
their MLflow runs. The driver uses the same source for the members of a worker that died (`orphans`,
`retry`, `close`) and for what is still queued when the sweep ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from core.contract import (
    ATTR_ATTEMPT,
    CHECKPOINT_PREFIX,
    ATTR_WORKER,
    ERROR,
    ESTIMATED_VRAM_GB,
    REPORTS_FILE,
    STATUS,
    STEP,
    TRIALS_DIR,
    WORK_DIR,
    TrialStatus,
    finite,
    missing_objectives,
    trial_label,
)
from sweep.engine.study import Spent

TASK_KEYS = ("label", "number", "hyper", "checkpoint", "attempt", "sheds", "alone")


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def methods_of(cfg: Any) -> list[str]:
    """The quantizations the space can sample: each gets its own workers (one base model each)."""
    dim = next((d for d in cfg.space.dims if d.name == "method"), None)
    return list(dict.fromkeys(dim.options)) if dim is not None else [cfg.train.method]


class StudySource:
    """Trials from the sweep's study for its workers; their runs through the recorder."""

    def __init__(self, cfg: Any, study: Any, recorder: Any, sweep_dir: Path, budget: int, deadline: float | None = None,
                 stop_file: str | None = None, judge: Any = None, run_tag: str | None = None):  # fmt: skip
        self.cfg, self.study, self.recorder = cfg, study, recorder
        self.sweep_dir = Path(sweep_dir)
        self.work = self.sweep_dir / WORK_DIR
        self.budget = budget  # new trials this driver run may start
        self.deadline = deadline  # time.time() at which running members end (search.time_budget)
        self.stop_file = stop_file  # `python -m sweep stop`, Ctrl-C, SIGTERM write it
        self.judge = judge  # a placement judge of one GPU (core.estimate), or None
        self.tickets = self.work / f"tickets-{run_tag or uuid.uuid4().hex[:12]}"
        self.objectives = tuple(m for m, _ in cfg.objectives)
        self.notes: list[str] = []  # what proposing said (duplicates, infeasible, spent): the worker prints them

    # -- the queue and the budget (files: shared by every worker) ------------------------------

    def enqueue(self, task: Any, method: str) -> None:
        queue = self.work / "queue"
        queue.mkdir(parents=True, exist_ok=True)
        _write(queue / f"{time.time_ns():020d}-{task.label}.json", {**{k: getattr(task, k) for k in TASK_KEYS}, "method": method})

    def _entries(self) -> list[tuple[Path, dict]]:
        out = []
        for path in sorted((self.work / "queue").glob("*.json")):
            try:
                out.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):  # claimed meanwhile
                continue
        return out

    def _claim(self, method: str, allow_alone: bool) -> Any:
        from core.request import TrialRequest

        claimed = self.work / "claimed"
        claimed.mkdir(parents=True, exist_ok=True)
        for path, entry in self._entries():
            if entry["method"] != method or (entry["alone"] and not allow_alone):
                continue
            target = claimed / f"{path.stem}-{uuid.uuid4().hex[:8]}.json"
            try:
                os.rename(path, target)  # atomic: one worker gets it
            except FileNotFoundError:
                continue
            target.unlink(missing_ok=True)
            entry.pop("method")
            return TrialRequest(**entry)
        return None

    def _ticket(self) -> Path | None:
        if self.spent():
            return None
        self.tickets.mkdir(parents=True, exist_ok=True)
        for i in range(self.budget):
            path = self.tickets / f"{i:06d}"
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            return path
        return None

    def spent(self) -> bool:
        return (self.work / "spent").exists()

    @contextlib.contextmanager
    def _asking(self) -> Iterator[None]:
        """One worker asks the study at a time. Two workers' `study.ask()` at once could both pop
        the same enqueued trial (a points_to_evaluate or Sobol start-up point): on sqlite, Optuna's
        WAITING -> RUNNING check and update are not atomic across processes (CI saw t000 start in
        two workers). The lock sits beside the queue (the folder every worker shares)."""
        import fcntl

        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / "ask.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tickets_done(self) -> bool:
        if self.budget <= 0 or self.spent():
            return True
        done = [p for p in self.tickets.glob("*") if p.read_text() == "done"] if self.tickets.is_dir() else []
        return len(done) >= self.budget

    # -- MemberSource ----------------------------------------------------------------------------

    def take(self, worker: str, method: str, members: int) -> Any:
        if self.halt():
            return None  # stopped or out of time: no trial starts or continues here any more
        task = self._claim(method, allow_alone=members == 0)
        for _ in range(len(methods_of(self.cfg)) if task is None else 0):
            ticket = self._ticket()  # one ticket, one new trial (infeasible proposals are redrawn on it)
            if ticket is None:
                return None
            try:
                with self._asking():
                    task, task_method = self._propose(worker)
                if task is not None and task_method != method:
                    self.enqueue(task, task_method)  # a worker of that method takes it
                    task = None
            finally:
                ticket.write_text("done")
            if task is not None:
                break
        if task is None:
            return None
        self.study.set_attrs(task.number, **{ATTR_WORKER: worker, ATTR_ATTEMPT: task.attempt})
        return task

    def _propose(self, worker: str) -> tuple[Any, str]:
        from core.request import TrialRequest

        self.study.stream = self.study.stream or worker  # each worker draws its own sampler stream

        def infeasible(label: str, hyper: dict, verdict: Any) -> None:
            self.recorder.infeasible(label, hyper, verdict.estimate_gb, verdict.reason)

        try:
            proposal = self.study.propose(self.judge, infeasible, lambda label, text: self.notes.append(f"{label} {text}"))
        except Spent as exc:
            (self.work / "spent").write_text(str(exc))
            self.notes.append(str(exc))
            return None, ""
        if proposal is None:
            return None, ""
        return TrialRequest(label=proposal.label, number=proposal.number, hyper=proposal.hyper), proposal.hyper.get("method", self.cfg.train.method)

    def give_back(self, task: Any) -> None:
        self.enqueue(task, task.hyper.get("method", self.cfg.train.method))
        if task.checkpoint:
            self.recorder.waiting(task.label, f"{task.sheds} (an OOM in a cohort step; continues from step {Path(task.checkpoint).name})")

    def waiting_alone(self, method: str) -> bool:
        return any(e["alone"] and e["method"] == method for _, e in self._entries())

    def exhausted(self, method: str) -> bool:
        return not any(e["method"] == method for _, e in self._entries()) and self._tickets_done()

    def checkpoint_dir(self, task: Any) -> str:
        return str(self.sweep_dir / TRIALS_DIR / task.label)

    def halt(self) -> str | None:
        if self.stop_file and os.path.exists(self.stop_file):
            return "stop"
        if self.deadline is not None and time.time() >= self.deadline:
            return "time"
        return None

    def begin(self, task: Any, params: dict[str, Any]) -> None:
        # the estimate placement judged it by, logged as a param (bench/provenance reads it back)
        estimate = self.study.frozen(task.number).user_attrs.get(ESTIMATED_VRAM_GB)
        placement = {ESTIMATED_VRAM_GB: estimate} if estimate is not None else {}
        self.recorder.begin(task.label, {**task.hyper, **placement, **params}, worker=str(params.get("cohort", "")), attempt=task.attempt)

    def report(self, task: Any, metrics: dict[str, Any]) -> bool:
        self.recorder.report(task.label, metrics)
        self._append_report(task.label, metrics)
        primary = self.cfg.search.metric
        evaluations = [(int(r[STEP]), float(r[primary])) for r in [*(metrics.get("evals_replay") or []), metrics] if finite(r.get(primary))]
        return self.study.report(task.number, evaluations, running=metrics.get(STATUS) == TrialStatus.RUNNING)

    def _append_report(self, label: str, metrics: dict[str, Any]) -> None:
        """One line per evaluation beside the trial's checkpoints (`status` reads it, without MLflow)."""
        from core.contract import LOSS_TOKENS_PER_SEC, ROW_METRICS

        folder = self.sweep_dir / TRIALS_DIR / label
        folder.mkdir(parents=True, exist_ok=True)
        line = {k: metrics[k] for k in (STEP, STATUS, *ROW_METRICS, LOSS_TOKENS_PER_SEC) if finite(metrics.get(k)) or k == STATUS and k in metrics}
        with open(folder / REPORTS_FILE, "a") as f:
            f.write(json.dumps({**line, "time": time.time()}) + "\n")

    def end(self, task: Any, metrics: dict[str, Any]) -> None:
        self.recorder.report(task.label, metrics)
        status = TrialStatus(metrics.get(STATUS, TrialStatus.FAILED))
        error = metrics.get(ERROR)
        values = [metrics.get(m) for m in self.objectives]
        if status == TrialStatus.COMPLETED and not all(finite(v) for v in values):
            status, error = TrialStatus.FAILED, missing_objectives(metrics, self.objectives)
        resumable = status == TrialStatus.STOPPED and self.halt() == "stop"
        step = int(metrics.get(STEP, 0))
        self.recorder.end(task.label, status, step, None if resumable else error, resumable=resumable)
        if status != TrialStatus.RUNNING:
            self._append_report(task.label, {STEP: step, STATUS: str(status)})
        if resumable:
            return  # stopped by the user: stays RUNNING in the study, for `resume`
        self.study.end(task.number, status, [float(v) for v in values] if status == TrialStatus.COMPLETED else None, error)

    # -- the driver's side: members whose worker is gone ---------------------------------------

    def orphans(self, worker: str) -> list[Any]:
        """The members `worker` held when it died: open trials that name it, not waiting in the queue."""
        from core.request import TrialRequest
        from trainable.cohort_worker import latest_checkpoint

        queued = {e["label"] for _, e in self._entries()}
        out = []
        for t in self.study.trials(("RUNNING",)):
            label = trial_label(t.number)
            if t.user_attrs.get(ATTR_WORKER) != worker or not t.params or label in queued:
                continue
            checkpoint = latest_checkpoint(self.sweep_dir / TRIALS_DIR / label)
            out.append(TrialRequest(label=label, number=t.number, hyper=self.study.hyper(t), checkpoint=checkpoint, attempt=int(t.user_attrs.get(ATTR_ATTEMPT, 1))))
        return out

    def queued(self) -> list[Any]:
        """Members still waiting in the queue (taken out of it)."""
        from core.request import TrialRequest

        out = []
        for path, entry in self._entries():
            path.unlink(missing_ok=True)
            entry.pop("method")
            out.append(TrialRequest(**entry))
        return out

    def retry(self, task: Any, error: str) -> None:
        """Queue a dead worker's member again, from its last checkpoint, as its next attempt."""
        task.attempt += 1
        self.enqueue(task, task.hyper.get("method", self.cfg.train.method))
        where = Path(task.checkpoint).name if task.checkpoint else "the start"
        self.recorder.retrying(task.label, task.attempt, f"{error}; retrying from {where}")

    def close(self, task: Any, error: str) -> str:
        """End a member that will not run again (its worker died past its retries, or it was still
        queued when the sweep ended): stopped when the sweep was halted, else failed. Returns how."""
        halt = self.halt()
        status = TrialStatus.STOPPED if halt else TrialStatus.FAILED
        step = int(Path(task.checkpoint).name.removeprefix(CHECKPOINT_PREFIX)) if task.checkpoint else 0
        self.end(task, {STEP: step, STATUS: status, ERROR: None if halt == "stop" else error})
        return {"stop": "stopped (resume continues it)", "time": "stopped (time budget)"}.get(halt or "", f"failed: {error}")

