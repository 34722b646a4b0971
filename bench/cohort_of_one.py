"""One trial as a sweep's worker trains it, for the benchmarks: a cohort of one.

    run = train_one(BaseSpec(model_id, None, data_dir, train, max_seq_len=1024), workdir)
    run.end["trial_status"], run.reports[-1]["eval_loss"], run.params["trainable_params"]

A worker of capacity 1 (trainable/cohort_worker.run_worker) trains the trial in this process: the
same cohort step, evaluations, checkpoints and metrics as in a sweep, without Ray, Optuna or MLflow
(the source below keeps what the worker reports in lists). `stop_after` evaluations ends the trial
early, as a pruner would (its schedule stays that of the full run): a search that reads only the
first evaluations pays only for them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.request import TrialRequest


@dataclass
class TrialRun:
    """What one trial reported: its derived params (at its start), every evaluation, its end."""

    params: dict[str, Any] = field(default_factory=dict)
    reports: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=dict)
    model_class: str = ""  # the base model's class (Gemma3ForCausalLM, Gemma3ForConditionalGeneration)
    total_params: int = 0  # every parameter of the base model, as loaded (4-bit ones counted as stored)


class _Source:
    """The worker's MemberSource (trainable.cohort_worker) for one trial, kept in memory."""

    def __init__(self, root: Path, task: TrialRequest, stop_after: int | None, run: TrialRun):
        self.root, self.todo, self.stop_after, self.run = root, [task], stop_after, run

    def take(self, worker: str, method: str, members: int) -> TrialRequest | None:
        return self.todo.pop(0) if self.todo else None

    def give_back(self, task: TrialRequest) -> None:
        self.todo.append(task)  # an OOM shed it: alone, the worker ends it `oom` instead

    def waiting_alone(self, method: str) -> bool:
        return False

    def exhausted(self, method: str) -> bool:
        return not self.todo

    def checkpoint_dir(self, task: TrialRequest) -> str:
        return str(self.root / task.label)

    def begin(self, task: TrialRequest, params: dict[str, Any]) -> None:
        self.run.params = params

    def report(self, task: TrialRequest, metrics: dict[str, Any]) -> bool:
        self.run.reports.append(metrics)
        return self.stop_after is not None and len(self.run.reports) >= self.stop_after  # True: the worker ends it (pruned)

    def end(self, task: TrialRequest, metrics: dict[str, Any]) -> None:
        self.run.end = metrics

    def halt(self) -> str | None:
        return None


def train_one(base: Any, workdir: str | Path | None = None, hyper: dict[str, Any] | None = None, stop_after: int | None = None) -> TrialRun:
    """Train one trial of `base` (a trainable.cohort_worker.BaseSpec; `hyper` overrides its train
    section as a sampled trial's would) in a cohort of one, its checkpoints under `workdir` (a
    temporary folder when None, removed after). Returns what it reported."""
    from trainable.cohort_worker import WorkerSpec, _load_cohort, run_worker

    run = TrialRun()

    def load(spec: WorkerSpec) -> Any:  # the worker's own loader; the base model's facts noted on the way
        cohort = _load_cohort(spec)
        run.model_class = type(cohort.model).__name__
        run.total_params = sum(p.numel() for p in cohort.model.parameters())
        return cohort

    with tempfile.TemporaryDirectory(dir=workdir) as root:
        source = _Source(Path(root), TrialRequest(label="t000", number=0, hyper=dict(hyper or {})), stop_after, run)
        run_worker(WorkerSpec(base=base, method=base.train.method, capacity=1, poll_seconds=0.01), source, make_cohort=load)
    return run
