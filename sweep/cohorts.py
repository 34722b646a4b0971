"""Cohort sweeps (issue 15, `resources.cohort`): each Ray Tune trial is a cohort worker that keeps
many Optuna trials training on one loaded base model (trainable/cohort_worker.py).

    plan = CohortPlan.build(cfg, sweep_dir, sweep_run, base, resources, resume, budget, time_left, log)
    trainable, tune_config, callbacks = plan.apply(trainable, tune_config, callbacks)

Ray Tune still schedules the workers (resources, placement, the cluster): one Tune trial per
worker, found by a small searcher that lists them. Optuna still chooses every trial: a worker asks
the durable study (`study.ask()`, the sweep's sampler) whenever a slot is free, and tells it each
member's end (COMPLETE / PRUNED / FAIL, with the user attributes a lone trial gets). Members are
pruned by Optuna's pruners, the equivalents of search.scheduler (asha -> SuccessiveHalvingPruner with
the same grace period and reduction factor, hyperband -> HyperbandPruner, median -> MedianPruner,
none -> NopPruner), through trial.report(value, step) and trial.should_prune().

`StudySource` is the worker's `MemberSource`: picklable (URLs, names, folders), it opens the study
and MLflow lazily in the worker. Workers share, through files in <sweep_dir>/cohorts/ (the results
folder is shared by every node already, for checkpoints):
  queue/     trials waiting for a worker: continued ones (resume), shed ones (OOM), and ones the
             sampler chose for the other method (lora and qlora workers are separate)
  tickets-*/ one file per new trial this driver may start (the budget), taken with O_EXCL
  members/   each trial's member checkpoints (members/t007/step-000040/)
Each member is a full trial in MLflow too: its own child run under the sweep's parent (one per
trial, continued after a resume), with the contract metrics, the worker's peak memory
(peak_vram_gb / peak_rss_gb, as a lone trial) and the member's estimated share of it
(member_vram_share_gb), and params `cohort` (the worker) and `cohort_size`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import uuid
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from core.contract import ERROR, ESTIMATED_VRAM_GB, LEARNING_RATE, STATUS, STEP, STEP_METRICS, TRAIN_LOSS, TrialStatus, finite, missing_objectives
from core.request import Allocation, TrialRequest
from core.schema import COHORT_AUTO_CPU

MEMBER_SHARE = "member_vram_share_gb"  # the member's estimated share of its worker's memory (not a measurement)
COHORT_AUTO_GPU_LIMIT = 64  # resources.cohort: auto on a GPU: memory decides, up to this many members
MAX_ASKS = 200  # samples in a row that do not fit (infeasible, or the other method's) before a worker waits


# ----------------------------------------------------------------------------------------------
# validation (sweep/config.py calls this with the validated sections)


def config_problems(model: Any, train: Any, resources: Any, searched: tuple[str, ...]) -> list[str]:
    """Why these settings cannot run as cohorts (empty when they can, or cohorts are off)."""
    if resources is None or resources.cohort == "off":
        return []
    out = []
    embeddings = getattr(model, "embeddings", "auto")
    if embeddings == "full":
        out.append(f"model.embeddings: full with resources.cohort: {resources.cohort}: a trial that trains the whole embedding matrix cannot "
                   "share a base model; set model.embeddings: frozen, or resources.cohort: off")  # fmt: skip
    if getattr(train, "cuda_graphs", False):
        out.append(f"train.cuda_graphs: true with resources.cohort: {resources.cohort}: a cohort's rows change shape as members come and go, "
                   "and each new shape would record new CUDA graphs; set train.cuda_graphs: false (compile: true still works), or resources.cohort: off")  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# pruners: search.scheduler for members


def make_pruner(cfg: Any) -> Any:
    """Optuna's pruner for search.scheduler, budgets in training steps as the Tune schedulers."""
    import optuna

    sched = cfg.search.scheduler
    if sched.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.grace_period, reduction_factor=max(2, round(sched.reduction_factor)))
    if sched.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.train.eval_every, max_resource=cfg.max_t, reduction_factor=max(2, round(sched.reduction_factor)))
    if sched.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sched.min_samples, n_warmup_steps=cfg.grace_period - 1)
    return optuna.pruners.NopPruner()


def methods_of(cfg: Any) -> list[str]:
    """The quantizations the space can sample: each gets its own workers."""
    dim = next((d for d in cfg.space.dims if d.name == "method"), None)
    return list(dict.fromkeys(dim.options)) if dim is not None else [cfg.train.method]


# ----------------------------------------------------------------------------------------------
# the source a worker's trials come from


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


class StudySource:
    """Optuna ask/tell + MLflow child runs for cohort members, opened lazily where it runs."""

    def __init__(self, cfg: Any, sweep_dir: Path, study_name: str, experiment_id: str, parent_run_id: str, budget: int,
                 deadline: float | None = None, stop_file: str | None = None, judge: Any = None, run_tag: str | None = None):  # fmt: skip
        self.cfg = cfg
        self.sweep_dir = Path(sweep_dir)
        self.root = self.sweep_dir / "cohorts"
        self.study_name = study_name
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.budget = budget
        self.deadline = deadline  # time.time() at which running members end (search.time_budget)
        self.stop_file = stop_file
        self.judge = judge  # core.estimate Placement.judge of one whole GPU, or None
        self.tickets = self.root / f"tickets-{run_tag or uuid.uuid4().hex[:12]}"
        self.objectives = tuple(m for m, _ in cfg.objectives)
        self._study: Any = None
        self._client: Any = None
        self._trials: dict[str, Any] = {}  # label -> optuna Trial
        self._runs: dict[str, str] = {}  # label -> MLflow run id
        self._logged: dict[str, dict[str, set[int]]] = {}  # run id -> metric -> steps in MLflow
        self._worker = ""

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_study=None, _client=None, _trials={}, _runs={}, _logged={})
        return state

    # -- stores, opened where the source runs ---------------------------------------------------

    def study(self, worker: str = "") -> Any:
        if self._study is None:
            import optuna

            from sweep.study import make_sampler, trials_in

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            url = self.cfg.optuna_storage(self.sweep_dir)
            kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
            # each worker draws its own stream (a seeded sampler would otherwise repeat across workers)
            before = trials_in(storage, self.study_name) + zlib.crc32(worker.encode()) % 100_003
            self._study = optuna.load_study(study_name=self.study_name, storage=storage, sampler=make_sampler(self.cfg, before), pruner=make_pruner(self.cfg))
        return self._study

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.cfg.mlflow_uri)
        return self._client

    def _trial(self, task: Any) -> Any:
        import optuna

        if task.label not in self._trials:
            study = self.study()
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, task.number)
            self._trials[task.label] = optuna.trial.Trial(study, trial_id)
        return self._trials[task.label]

    # -- the queue and the budget (files: shared by every worker) ------------------------------

    def enqueue(self, task: Any, method: str) -> None:
        queue = self.root / "queue"
        queue.mkdir(parents=True, exist_ok=True)
        entry = {k: getattr(task, k) for k in ("label", "number", "hyper", "checkpoint", "attempt", "sheds", "alone")}
        _write(queue / f"{time.time_ns():020d}-{task.label}.json", {**entry, "method": method})

    def _entries(self) -> list[tuple[Path, dict]]:
        out = []
        for path in sorted((self.root / "queue").glob("*.json")):
            try:
                out.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):  # claimed meanwhile
                continue
        return out

    def _claim(self, method: str, allow_alone: bool) -> Any:
        from trainable.cohort_worker import MemberTask

        claimed = self.root / "claimed"
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
            return MemberTask(**entry)
        return None

    def _ticket(self) -> Path | None:
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

    @contextlib.contextmanager
    def _asking(self) -> Iterator[None]:
        """One worker asks the study at a time. Two workers' `study.ask()` at once could both pop
        the same enqueued trial (a points_to_evaluate or Sobol start-up point): on sqlite, Optuna's
        WAITING -> RUNNING check and update are not atomic across processes, and CI saw t000 start
        in two cohorts. The lock sits beside the queue (the folder every worker shares)."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "ask.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _tickets_done(self) -> bool:
        if self.budget <= 0:
            return True
        done = [p for p in self.tickets.glob("*") if p.read_text() == "done"] if self.tickets.is_dir() else []
        return len(done) >= self.budget

    # -- MemberSource ------------------------------------------------------------------------------

    def take(self, worker: str, method: str, members: int) -> Any:
        self._worker = worker
        if self.halt():
            return None  # stopped or out of time: no trial starts or continues here any more
        task = self._claim(method, allow_alone=members == 0)
        for _ in range(len(methods_of(self.cfg)) if task is None else 0):
            ticket = self._ticket()  # one ticket, one new trial (infeasible samples are redrawn on it)
            if ticket is None:
                return None
            try:
                with self._asking():
                    task, task_method = self._ask(worker)
                if task is not None and task_method != method:
                    self.enqueue(task, task_method)  # a worker of that method takes it
                    task = None
            finally:
                ticket.write_text("done")
            if task is not None:
                break
        if task is None:
            return None
        trial = self._trial(task)
        trial.set_user_attr("ray_trial_id", worker)
        trial.set_user_attr("attempt", task.attempt)
        trial.set_user_attr("cohort", worker)
        return task

    def _ask(self, worker: str) -> tuple[Any, str]:
        import optuna

        from sweep.study import RANDOM_AFTER_DUPLICATES, SPENT_AFTER_DUPLICATES, RandomProposal, close_duplicate, tell, twin_of
        from trainable.cohort_worker import MemberTask

        study = self.study(worker)
        fixed = self.cfg.fixed_hyperparams
        duplicates = 0
        for _ in range(MAX_ASKS):
            with RandomProposal(study, duplicates >= RANDOM_AFTER_DUPLICATES, self.cfg.search.seed):
                trial = study.ask()
                config = self.cfg.space.sample(trial, fixed)
            label = f"t{trial.number:03d}"
            twin = twin_of(study, trial)
            if twin is not None:  # what trial `twin` trains or trained: not again (sweep.study.SweepSearch says why)
                close_duplicate(study, trial, twin)
                duplicates += 1
                if duplicates >= SPENT_AFTER_DUPLICATES:
                    break
                continue
            verdict = self.judge(config) if self.judge else None
            if verdict is not None and not verdict.feasible:  # does not fit one GPU even alone: never launched
                trial.set_user_attr("trial_status", TrialStatus.INFEASIBLE)
                trial.set_user_attr("error", verdict.reason)
                tell(study, trial, None, optuna.trial.TrialState.FAIL)
                self._record_infeasible(label, config, verdict)
                continue
            if verdict is not None:
                trial.set_user_attr(ESTIMATED_VRAM_GB, round(verdict.estimate_gb, 2))
            self._trials[label] = trial
            return MemberTask(label=label, number=trial.number, hyper=config), config.get("method", self.cfg.train.method)
        return None, ""

    def give_back(self, task: Any) -> None:
        self.enqueue(task, task.hyper.get("method", self.cfg.train.method))
        run_id = self._runs.get(task.label)
        if run_id and task.checkpoint:
            self.client.set_tag(run_id, STATUS, TrialStatus.RUNNING)
            self.client.set_tag(run_id, "shed", f"{task.sheds} (an OOM in a cohort step; continues from step {Path(task.checkpoint).name})")

    def waiting_alone(self, method: str) -> bool:
        return any(e["alone"] and e["method"] == method for _, e in self._entries())

    def exhausted(self, method: str) -> bool:
        return not any(e["method"] == method for _, e in self._entries()) and self._tickets_done()

    def checkpoint_dir(self, task: Any) -> str:
        return str(self.root / "members" / task.label)

    def halt(self) -> str | None:
        if self.stop_file and os.path.exists(self.stop_file):
            return "stop"
        if self.deadline is not None and time.time() >= self.deadline:
            return "time"
        return None

    def begin(self, task: Any, params: dict[str, Any]) -> None:
        from sweep.trials import param_value, summary

        client = self.client
        # the estimate _ask judged this member by, logged as a lone trial's is (bench/provenance reads it back)
        estimate = self._trial(task).user_attrs.get(ESTIMATED_VRAM_GB)
        config = TrialRequest(hyper=task.hyper, allocation=Allocation(estimated_vram_gb=estimate)).params()
        runs = client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.trial = '{task.label}'", max_results=1)
        if runs:  # continued (resumed, or shed and taken again): the same child run
            run_id, have = runs[0].info.run_id, set(runs[0].data.params)
            client.update_run(run_id, status="RUNNING")
            self._logged[run_id] = {
                name: {m.step for m in client.get_metric_history(run_id, name)} for name in (TRAIN_LOSS, LEARNING_RATE, MEMBER_SHARE, *STEP_METRICS)
            }
        else:
            name = f"{task.label} {summary({**self.cfg.fixed_hyperparams, **task.hyper})}"
            run_id = client.create_run(self.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.parent_run_id, "trial": task.label}).info.run_id
            have = set()
        self._runs[task.label] = run_id
        client.set_tag(run_id, STATUS, TrialStatus.RUNNING)
        client.set_tag(run_id, "trial_id", self._worker)
        client.set_tag(run_id, "cohort", str(params.get("cohort", self._worker)))
        if task.attempt > 1:
            client.set_tag(run_id, "retries", str(task.attempt - 1))
        from mlflow.entities import Param

        items = [Param(k, str(param_value(v))[:6000]) for k, v in {**config, **params}.items() if k not in have]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])

    def report(self, task: Any, metrics: dict[str, Any]) -> bool:
        self._log_metrics(task, metrics)
        if len(self.objectives) > 1:
            return False  # Optuna keeps no intermediate values (and prunes nothing) for multi-objective studies
        trial = self._trial(task)
        study = self.study()
        have = set(study._storage.get_trial(trial._trial_id).intermediate_values)
        primary = self.cfg.search.metric
        for record in [*(metrics.get("evals_replay") or []), metrics]:
            if finite(record.get(primary)) and int(record[STEP]) not in have:
                trial.report(float(record[primary]), step=int(record[STEP]))
                have.add(int(record[STEP]))
        if metrics.get(STATUS) != TrialStatus.RUNNING:
            return False
        return bool(trial.should_prune())

    def _log_metrics(self, task: Any, result: dict[str, Any]) -> None:
        from sweep.tracking import log_report

        run_id = self._runs.get(task.label)
        if run_id is None:
            return
        log_report(self.client, run_id, self._logged.setdefault(run_id, {}), result, extra=(MEMBER_SHARE,))

    def end(self, task: Any, metrics: dict[str, Any]) -> None:
        import optuna

        from sweep.study import tell

        self._log_metrics(task, metrics)
        status = TrialStatus(metrics.get(STATUS, TrialStatus.FAILED))
        error = metrics.get(ERROR)
        values = [metrics.get(m) for m in self.objectives]
        if status == TrialStatus.COMPLETED and not all(finite(v) for v in values):
            status, error = TrialStatus.FAILED, missing_objectives(metrics, self.objectives)
        resumable = status == TrialStatus.STOPPED and self.halt() == "stop"
        run_id = self._runs.pop(task.label, None) or self._run_of(task.label)
        if run_id is not None:
            client = self.client
            client.set_tag(run_id, STATUS, status)
            client.set_tag(run_id, "last_step", str(int(metrics.get(STEP, 0))))
            if status == TrialStatus.PRUNED:
                client.set_tag(run_id, "stopped_at_step", str(int(metrics.get(STEP, 0))))
            if error:
                client.set_tag(run_id, ERROR, str(error)[-5000:])
            finished = (TrialStatus.COMPLETED, TrialStatus.PRUNED, TrialStatus.STOPPED)
            client.set_terminated(run_id, "KILLED" if resumable else ("FINISHED" if status in finished else "FAILED"))
        if resumable:
            return  # stopped by the user: stays RUNNING in the study, for `resume`
        trial = self._trial(task)
        trial.set_user_attr("trial_status", str(status))
        if error:
            trial.set_user_attr("error", str(error)[:1000])
        study = self.study()
        if status == TrialStatus.COMPLETED:
            tell(study, trial, [float(v) for v in values] if len(values) > 1 else float(values[0]), optuna.trial.TrialState.COMPLETE)
        elif status in (TrialStatus.PRUNED, TrialStatus.STOPPED):
            tell(study, trial, None, optuna.trial.TrialState.PRUNED)
        else:
            tell(study, trial, None, optuna.trial.TrialState.FAIL)
        self._trials.pop(task.label, None)

    def _run_of(self, label: str) -> str | None:
        """The child run of a member this source did not begin (its worker died, or it waited in
        the queue): None where it never began."""
        if label in self._trials:  # asked or taken here: had it begun, _runs would hold it
            return None
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and tags.trial = '{label}'", max_results=1)
        return runs[0].info.run_id if runs else None

    # -- the driver's side: members whose worker is gone ---------------------------------------

    def orphans(self, worker: str) -> list[Any]:
        """The members `worker` held when it died: open trials that name it, not waiting in the queue."""
        import optuna

        from trainable.cohort_worker import MemberTask, latest_checkpoint

        queued = {e["label"] for _, e in self._entries()}
        out = []
        for t in self.study().get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            label = f"t{t.number:03d}"
            if t.user_attrs.get("cohort") != worker or not t.params or label in queued:
                continue
            hyper = self.cfg.space.decode(t.params, self.cfg.fixed_hyperparams)
            checkpoint = latest_checkpoint(self.root / "members" / label)
            out.append(MemberTask(label=label, number=t.number, hyper=hyper, checkpoint=checkpoint, attempt=int(t.user_attrs.get("attempt", 1))))
        return out

    def queued(self) -> list[Any]:
        """Members still waiting in the queue (taken out of it)."""
        from trainable.cohort_worker import MemberTask

        out = []
        for path, entry in self._entries():
            path.unlink(missing_ok=True)
            entry.pop("method")
            out.append(MemberTask(**entry))
        return out

    def retry(self, task: Any, error: str) -> None:
        """Queue a dead worker's member again, from its last checkpoint, as its next attempt."""
        task.attempt += 1
        self.enqueue(task, task.hyper.get("method", self.cfg.train.method))
        run_id = self._run_of(task.label)
        if run_id:
            self.client.set_tag(run_id, STATUS, TrialStatus.RETRYING)
            self.client.set_tag(run_id, "retries", str(task.attempt - 1))
            self.client.set_tag(run_id, ERROR, f"attempt {task.attempt - 1}: {error}; retrying from {Path(task.checkpoint).name if task.checkpoint else 'the start'}")

    def _record_infeasible(self, label: str, config: dict, verdict: Any) -> None:
        from mlflow.entities import Metric, Param

        from sweep.trials import param_value, summary

        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{label} {summary({**self.cfg.fixed_hyperparams, **config})}",
            tags={"mlflow.parentRunId": self.parent_run_id, "trial": label, STATUS: TrialStatus.INFEASIBLE, ERROR: verdict.reason},
        )
        self.client.log_batch(run.info.run_id, params=[Param(k, param_value(v)) for k, v in config.items()],
                              metrics=[Metric(ESTIMATED_VRAM_GB, verdict.estimate_gb, int(time.time() * 1000), 0)])  # fmt: skip
        self.client.set_terminated(run.info.run_id, "FAILED")


# ----------------------------------------------------------------------------------------------
# the driver's side: workers for Ray Tune


def _worker_searcher(configs: list[dict[str, Any]], halted: Callable[[], str | None]) -> Any:
    from ray.tune.search import Searcher

    class WorkerList(Searcher):
        """Hands Tune one config per cohort worker, and one more for each worker that died with
        members to retry (`replace`); finished once none is left to start and none runs. Nothing
        starts once the sweep is stopped or out of time."""

        def __init__(self) -> None:
            super().__init__()
            self.configs = list(configs)
            self.made, self.live = len(self.configs), 0

        def suggest(self, trial_id: str) -> dict | None:
            if self.configs and not halted():
                self.live += 1
                return self.configs.pop(0)
            return None if self.live else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.live -= 1

        def replace(self, method: str) -> None:
            self.configs.append({"worker": self.made, "method": method})
            self.made += 1

    return WorkerList()


def _orphans(source: StudySource, workers: Any, max_retries: int, log: Callable[[str], None]) -> Any:
    from ray.tune import Callback

    from sweep.retries import should_retry
    from sweep.trials import NO_ERROR_TEXT, error_text, last_line

    class Orphans(Callback):
        """Members whose worker is gone, decided as a lone trial's would be (sweep/retries.py).
        A worker that died (its process or node went away) leaves its members open: each runs again
        from its last member checkpoint, on a new worker, while search.max_retries allows, and ends
        failed after that; a worker that raised has ended its members itself. After a stop they stay
        open for `resume` (their runs KILLED / stopped); at the time budget they end stopped.
        Members still queued when the sweep ends are closed the same way."""

        def __getstate__(self) -> dict:
            return {}  # pickled by Tune into tuner.pkl, which lora-sweep never restores

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            error = error_text(trial) or NO_ERROR_TEXT
            retried = []
            for task in source.orphans(trial.trial_id):
                if source.halt() is None and should_retry(error, task.attempt, max_retries):
                    source.retry(task, f"cohort worker {trial.trial_id} died")
                    retried.append(task)
                    log(f"{task.label} retrying  its cohort worker died; attempt {task.attempt} continues from {_where(task)}")
                else:
                    self._close(task, f"cohort worker {trial.trial_id} died: {last_line(error)[:300]}")
            if retried:
                workers.replace(trial.config.get("method", retried[0].hyper.get("method")))

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            for task in source.queued():
                self._close(task, "never continued: the sweep ended first")

        def _close(self, task: Any, error: str) -> None:
            halt = source.halt()
            status = TrialStatus.STOPPED if halt else TrialStatus.FAILED
            step = int(Path(task.checkpoint).name.removeprefix("step-")) if task.checkpoint else 0
            source.end(task, {STEP: step, STATUS: status, ERROR: None if halt == "stop" else error})
            how = {"stop": "stopped (resume continues it)", "time": "stopped (time budget)"}.get(halt or "", f"failed: {error}")
            log(f"{task.label} {how}")

    return Orphans()


def _where(task: Any) -> str:
    return f"its checkpoint at {Path(task.checkpoint).name}" if task.checkpoint else "the start"


# a member's end, as trainable/cohort_worker.py words it: "t003 completed  eval_loss ..."
MEMBER_END = re.compile(r"^(t\d+) +(completed|pruned|failed|nan|oom|stopped|infeasible)\b")
MEMBER_START = re.compile(r"^(t\d+) +start\b")


def _progress(log: Callable[[str], None], total: int | None = None, time_budget: float | None = None) -> Any:
    from ray.tune import Callback

    from sweep.progress import progress_line
    from sweep.trials import error_text, last_line

    class CohortProgress(Callback):
        """The members' lines, as the workers report them; a worker's own failure; after each
        member's end, the sweep's progress and ETA (sweep.progress.progress_line)."""

        def __init__(self) -> None:
            self.start = time.monotonic()
            self.running: set[str] = set()
            self.done = 0

        def say(self, text: str) -> None:
            elapsed = int(time.monotonic() - self.start)
            log(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {text}")

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.say(f"cohort worker {trial.trial_id} start ({trial.config.get('method')})")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            ended = False
            for line in result.get("events") or []:
                self.say(line)
                if start := MEMBER_START.match(line):
                    self.running.add(start.group(1))
                elif end := MEMBER_END.match(line):
                    self.running.discard(end.group(1))
                    self.done += 1
                    ended = True
            if ended:
                self.say(progress_line(self.done, len(self.running), time.monotonic() - self.start, total, time_budget))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            counts = (trial.last_result or {}).get("members") or {}
            self.say(f"cohort worker {trial.trial_id} done: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no members"))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.say(f"cohort worker {trial.trial_id} failed: {last_line(error_text(trial))[:300] or 'worker died'}")

    return CohortProgress()


def plan_workers(setting: str | int, gpu_share: bool, fit: int, trials: int, max_concurrent: str | int, methods: int) -> tuple[int, int]:
    """(workers, members each holds at once) for `trials` trials when `fit` workers fit the cluster.

    auto with a GPU share to fill: one worker per GPU (up to one per trial), each holding at once
    its fair share of the trials, up to what memory admits: one worker taking every trial would
    leave the other GPUs idle (issue 17). A worker still takes more as its members end (continuous
    cohorts), so no GPU waits on another. A number: that many members per worker, as few workers
    as hold every trial. Every method (lora, qlora) gets at least one worker."""
    trials = max(1, trials)
    capacity = int(setting) if setting != "auto" else (COHORT_AUTO_GPU_LIMIT if gpu_share else COHORT_AUTO_CPU)
    if setting == "auto" and gpu_share:
        wanted = min(max(1, fit), trials)
        capacity = min(capacity, math.ceil(trials / wanted))
    else:
        wanted = math.ceil(trials / capacity)
    if max_concurrent != "auto":
        wanted = min(wanted, math.ceil(int(max_concurrent) / capacity))
    return max(methods, min(max(1, fit), wanted)), capacity


@dataclass
class CohortPlan:
    """How many cohort workers, what each asks Ray for, and the source their trials come from."""

    workers: list[dict[str, Any]]  # one Tune config per worker: {"worker": i, "method": m}
    capacity: int
    cpus: float
    gpus: float
    source: StudySource
    budget: Any  # core.estimate.CohortBudget
    base: Any  # trainable.train.TrialSpec
    log: Callable[[str], None] = print
    resumed: list[str] = field(default_factory=list)
    max_retries: int = 0  # search.max_retries: a dead worker's members run again this many times

    @classmethod
    def build(cls, cfg: Any, sweep_dir: Path, sweep_run: Any, base: Any, resources: Any, resume: list, budget: int,
              time_left: float | None, log: Callable[[str], None] = print) -> "CohortPlan":  # fmt: skip
        """Plan the workers on this Ray cluster and queue the trials a resume continues."""
        import ray

        from core.estimate import CohortBudget
        from sweep.config import SEARCHABLE
        from sweep.memory import load_profile
        from trainable.cohort_worker import MemberTask, latest_checkpoint

        total = ray.cluster_resources()
        cluster_gpus = float(total.get("GPU", 0))
        setting = cfg.resources.cohort
        placement = resources.placement
        fixed = {k: getattr(cfg.train, k) for k in SEARCHABLE}
        if placement is not None:  # GPUs, auto: a whole GPU per worker, filled by the memory estimate
            gpus, gpu_bytes, profile = 1.0, placement.gpu_bytes, placement.profile
            judge = replace(placement, embeddings="frozen").judge
        else:
            gpus = float(resources.gpus or 0)
            gpu_bytes, profile, judge = None, load_profile(cfg), None
            if gpus > 0 and cfg.resources.gpu_memory_gb != "auto":
                gpu_bytes = gpus * cfg.resources.gpu_memory_gb * 2**30
        cohort_budget = CohortBudget(profile=profile, max_seq_len=cfg.data.max_seq_len, fixed=fixed, gpu_bytes=gpu_bytes,
                                     margin=cfg.resources.memory_margin, attn=cfg.train.attn_implementation)  # fmt: skip
        methods = methods_of(cfg)
        fit = math.floor(float(total.get("CPU", 0)) / resources.cpus) if resources.cpus else 1
        if gpus > 0:
            fit = min(fit, math.floor(cluster_gpus / gpus))
        n, capacity = plan_workers(setting, bool(gpu_bytes), fit, budget + len(resume), cfg.search.max_concurrent, len(methods))
        workers = [{"worker": i, "method": methods[i % len(methods)]} for i in range(n)]

        # the files workers share: a fresh queue, holding the trials this driver continues
        root = Path(sweep_dir) / "cohorts"
        for old in (root / "queue").glob("*.json") if (root / "queue").is_dir() else []:
            old.unlink(missing_ok=True)
        deadline = time.time() + time_left if time_left else None
        source = StudySource(cfg, sweep_dir, cfg.name, sweep_run.experiment_id, sweep_run.run_id, budget, deadline=deadline,
                             stop_file=base.stop_file, judge=judge)  # fmt: skip
        plan = cls(workers, capacity, resources.cpus, gpus, source, cohort_budget, base, log, max_retries=cfg.search.max_retries)
        if resume:
            import optuna

            study = optuna.load_study(study_name=cfg.name, storage=cfg.optuna_storage(sweep_dir))
            by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
            for item in resume:
                frozen = by_number[item.number]
                hyper = cfg.space.decode(frozen.params, cfg.fixed_hyperparams)
                label = f"t{item.number:03d}"
                checkpoint = latest_checkpoint(root / "members" / label)
                source.enqueue(MemberTask(label=label, number=item.number, hyper=hyper, checkpoint=checkpoint, attempt=item.attempt), hyper.get("method", cfg.train.method))
                plan.resumed.append(f"{label} from {Path(checkpoint).name if checkpoint else 'the start'}")
        return plan

    def describe(self) -> str:
        limit = f"up to {self.capacity}" if self.source.judge is None else f"up to {self.capacity} (as many as its GPU's memory fits)"
        gpu = f"{self.gpus:g} GPU + " if self.gpus else ""
        text = f"cohorts: {len(self.workers)} worker(s) of {gpu}{self.cpus:g} CPU, each training {limit} trials on one base model"
        methods = sorted({w["method"] for w in self.workers})
        if len(methods) > 1:
            text += f" ({', '.join(methods)}: separate workers)"
        if self.resumed:
            text += f"; continuing {', '.join(self.resumed)}"
        return text

    def apply(self, trainable: Any, tune_config: Any, callbacks: list) -> tuple[Any, Any, list]:
        """Tune's pieces for a cohort sweep, from the lone-trial ones: the workers' trainable and
        resources; a searcher that lists the workers (Optuna chooses the members, in the workers);
        no Tune scheduler (Optuna's pruner judges the members); the members' time budget is
        theirs (the source ends them at the deadline), as is a stop (the workers read the STOP
        file and end every member resumably: Sweep.make_tuner gives them no Tune stopper, which
        would kill a worker while it checkpoints); the lone-trial retry, MLflow and progress
        callbacks give way to the workers' own reports and to Orphans (a dead worker's members)."""
        from ray import tune
        from ray.tune.schedulers import FIFOScheduler

        from trainable.cohort_worker import tune_cohort_worker

        worker = tune.with_parameters(tune_cohort_worker, base=self.base, source=self.source, capacity=self.capacity, budget=self.budget)
        worker = tune.with_resources(worker, {"cpu": self.cpus, "gpu": self.gpus})
        self.log(self.describe())
        workers = _worker_searcher(self.workers, self.source.halt)
        tune_config = replace(tune_config, search_alg=workers, scheduler=FIFOScheduler(), num_samples=-1,
                              max_concurrent_trials=len(self.workers), time_budget_s=None, reuse_actors=False)  # fmt: skip
        # the lone-trial callbacks (retries, MLflow per Ray trial, progress per Ray trial) act on Ray trials, which are workers here
        kept = [c for c in callbacks if type(c).__name__ not in ("Retries", "TrialRuns", "Progress")]
        deadline = self.source.deadline
        time_left = deadline - time.time() if deadline else None
        return worker, tune_config, [_orphans(self.source, workers, self.max_retries, self.log), *kept, _progress(self.log, self.source.budget + len(self.resumed), time_left)]
