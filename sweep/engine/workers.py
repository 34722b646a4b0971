"""The workers, as Ray Tune sees them: how many, what each asks of Ray, and what the driver does
when one ends or dies.

Every Ray Tune trial is a worker (trainable/cohort_worker.py) on a GPU, a GPU share or CPUs: it loads
the base model once and trains a cohort of K >= 1 Optuna trials on it, taking the next trial from
the study whenever one of its members ends. Ray Tune places the workers (resources, the cluster)
and restarts nothing itself; Optuna chooses every trial and prunes it (sweep.engine.study).

    plan = WorkerPlan.build(cfg, resources_of_the_cluster)   # workers, members per worker, memory
    WorkerList(plan.configs, halted)                          # Tune's searcher: one config per worker
    Orphans(source, workers, max_retries, say)                # a dead worker's members: retried or ended
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from core import rules
from core.schema import COHORT_AUTO_CPU
from sweep.engine.source import StudySource, methods_of

COHORT_AUTO_GPU_LIMIT = 64  # resources.cohort: auto on a GPU: memory decides, up to this many members

# How Ray says a worker's process or node went away (as opposed to the worker raising an error).
WORKER_DIED = re.compile(
    r"ActorDiedError|RayActorError|NodeDiedError|WorkerCrashedError|OwnerDiedError|ActorUnavailableError"
    r"|actor died|actor [0-9a-f]+ is unavailable|temporarily unavailable|node .{0,80} died|worker died|worker process has died",
    re.I,
)
NO_ERROR_TEXT = "the worker died without an error message"


def should_retry(error: str, attempt: int, max_retries: int) -> bool:
    """A trial whose worker died (its process or node went away: preemption, a lost node, the OOM
    killer) runs again from its last checkpoint while it has retries left (search.max_retries:
    attempt 1 is the first run, so max_retries=1 allows a second); one that failed for its own
    reasons (an exception, OOM, NaN) does not."""
    return bool(WORKER_DIED.search(error)) and attempt <= max_retries


def error_text(trial: Any) -> str | None:
    """The error a failed Tune trial left: the full text (traceback included), or None. Tune writes
    it under the trial's local folder first and syncs it to storage later, so the local file first."""
    for read in (lambda: open(trial.error_file).read(), lambda: trial.get_error()):
        try:
            text = read()
        except Exception:  # no such file (the worker died before Tune wrote one)
            continue
        if text:
            return str(text).strip()
    return None


# Lines libraries add after the exception itself (SQLAlchemy's link to its docs, Ray's hints)
TRAILERS = re.compile(r"^\(Background on this error at:|^During handling of the above exception|^The above exception was the direct cause")


def last_line(text: str | None) -> str:
    """The line of an error text that says what went wrong: its last, past the trailers libraries add."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip() and not TRAILERS.match(line.strip())]
    return lines[-1] if lines else ""


def plan_workers(setting: str | int, gpu_share: bool, fit: int, trials: int, max_concurrent: str | int, methods: int) -> tuple[int, int]:
    """(workers, members each holds at once) for `trials` trials when `fit` workers fit the cluster.

    auto with a GPU to fill: one worker per GPU (up to one per trial), each holding at once its fair
    share of the trials, up to what memory admits: one worker taking every trial would leave the
    other GPUs idle. A worker still takes more as its members end, so no GPU waits on another. auto
    on CPUs: up to COHORT_AUTO_CPU members per worker. A number: that many members per worker, as
    few workers as hold every trial, within the cluster as it is.

    search.max_concurrent N: never more than N trials at once (members per worker at most N, and as
    many workers as N allows), and not limited to the cluster as it is: workers beyond its present
    resources wait for them, and a Ray autoscaler adds nodes for them. Every method (lora, qlora)
    gets at least one worker (WorkerPlan.at_once then keeps the trials at once within N)."""
    trials = max(1, trials)
    capacity = int(setting) if setting != "auto" else (COHORT_AUTO_GPU_LIMIT if gpu_share else COHORT_AUTO_CPU)
    if setting == "auto" and gpu_share:
        wanted = min(max(1, fit), trials)
        capacity = min(capacity, math.ceil(trials / wanted))
    else:
        wanted = math.ceil(trials / capacity)
    if max_concurrent != "auto":
        capacity = min(capacity, int(max_concurrent))
        return max(methods, min(int(max_concurrent) // capacity, math.ceil(trials / capacity))), capacity
    return max(methods, min(max(1, fit), wanted)), capacity


@dataclass
class WorkerPlan:
    """How many workers, what each asks of Ray, how many members each holds, and its memory budget."""

    configs: list[dict[str, Any]]  # one Tune config per worker: {"worker": i, "method": m}
    capacity: int  # members a worker holds at once
    cpus: float
    gpus: float  # per worker: 1 (auto placement: a whole GPU filled by the estimates), a share, or 0
    gpu_bytes: float | None  # the memory a worker fills (None: no GPU, no limit)
    device_bytes: float | None  # one GPU's memory as planned (resources.gpu_memory_gb, or read); None: the device's own
    judge: Any = None  # core.estimate Placement.judge of one worker's GPU, or None
    budget: Any = None  # core.estimate.CohortBudget: which members fit beside each other
    compile: bool = False  # train.compile, decided for the sweep (core.rules.compile_layers)
    notes: list[str] = field(default_factory=list)  # what the plan decided and why, for the sweep's log

    trials: int = 0  # the trials this driver run is to finish
    max_concurrent: int | None = None  # search.max_concurrent, when given

    @property
    def at_once(self) -> int:
        """Workers Ray Tune runs at once: all of them, or as many as search.max_concurrent allows
        (a second method's worker then waits for the first's to end)."""
        if self.max_concurrent is None:
            return len(self.configs)
        return max(1, min(len(self.configs), self.max_concurrent // self.capacity))

    @property
    def concurrent(self) -> int:
        """Trials training at once, at most."""
        return min(self.at_once * self.capacity, max(1, self.trials))

    def describe(self) -> str:
        limit = f"up to {self.capacity}" + (" (as many as its GPU's memory fits)" if self.gpu_bytes is not None else "")
        gpu = f"{self.gpus:g} GPU + " if self.gpus else ""
        text = f"workers: {len(self.configs)} of {gpu}{self.cpus:g} CPU, each training {limit} trials on one loaded base model"
        methods = sorted({w["method"] for w in self.configs})
        if len(methods) > 1:
            text += f" ({', '.join(methods)}: separate workers)"
        return text


def plan(cfg: Any, cluster: dict[str, float], trials: int, gpu_bytes: Callable[[], float], log: Callable[[str], None]) -> WorkerPlan:
    """The workers for `trials` trials on a Ray cluster with these resources (ray.cluster_resources());
    ConfigError when a worker could never be placed or no configuration of the space fits a GPU.
    `gpu_bytes()` reads one GPU's memory when resources.gpu_memory_gb is auto."""
    from dataclasses import replace

    from core.estimate import CohortBudget, Placement
    from sweep.config import HYPERPARAMS, ConfigError
    from sweep.readback.estimate import GB, corners
    from sweep.readback.memory import load_profile

    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    res, problems = cfg.resources, []
    cpt = float(res.cpus_per_trial)
    if cpt > cpus:
        problems.append(f"resources.cpus_per_trial: {cpt:g} but the Ray cluster has {cpus:g} CPU(s)")
    if res.gpus_per_trial != "auto":
        gpt = float(res.gpus_per_trial)
        if gpt > gpus:
            problems.append(f"resources.gpus_per_trial: {gpt:g} but the Ray cluster has {gpus:g} GPU(s); lower it or use auto")
        if gpt > 1 and not gpt.is_integer():
            problems.append(f"resources.gpus_per_trial: {gpt:g}; above 1 it must be a whole number of GPUs")
    if problems:
        raise ConfigError(str(cfg.source), problems)
    fixed = {k: getattr(cfg.train, k) for k in HYPERPARAMS}
    profile = load_profile(cfg)
    embeddings = cfg.model.embeddings
    judge, memory = None, None
    if res.gpus_per_trial == "auto" and gpus > 0:  # a whole GPU per worker, filled by the memory estimates
        per_worker = 1.0
        memory = res.gpu_memory_gb * GB if res.gpu_memory_gb != "auto" else gpu_bytes()
        log(f"placement: each worker fills one of {gpus:g} GPU(s) of {memory / GB:.0f} GB by its trials' memory estimates (+{res.memory_margin:.0%} margin)")
        placement = Placement(profile=profile, gpu_bytes=memory, margin=res.memory_margin, max_seq_len=cfg.data.max_seq_len,
                              embeddings=embeddings, attn=cfg.train.attn_implementation, loss=cfg.train.loss, fixed=fixed)  # fmt: skip
        # Memory grows with every memory dimension, so if no corner of the space fits, nothing does:
        # say so now rather than sample infeasible configs until the sampler gives up.
        verdicts = [placement.judge(c) for c in corners(cfg.space, {})]
        if not any(v.feasible for v in verdicts):
            smallest = min(verdicts, key=lambda v: v.share)
            raise ConfigError(str(cfg.source), [
                f"resources: no configuration of this space fits one {memory / GB:.1f} GB GPU (resources.gpu_memory_gb): the smallest "
                f"needs an estimated {smallest.estimate_gb:.1f} GB (+{res.memory_margin:.0%} margin, + CUDA context); use QLoRA, smaller "
                "micro-batches, gradient checkpointing or fewer target modules, or bigger GPUs (python -m sweep estimate shows the corners)"
            ])  # fmt: skip
        judge = replace(placement, embeddings="frozen" if embeddings == "new_tokens" else embeddings).judge
    else:
        per_worker = 0.0 if res.gpus_per_trial == "auto" else float(res.gpus_per_trial)
        if per_worker > 0:  # a fixed GPU share per worker: its trials fill that share by their estimates
            memory = per_worker * (res.gpu_memory_gb * GB if res.gpu_memory_gb != "auto" else gpu_bytes())
    device = (memory / per_worker) if memory is not None and per_worker > 0 else None
    budget = CohortBudget(profile=profile, max_seq_len=cfg.data.max_seq_len, fixed=fixed, gpu_bytes=memory, margin=res.memory_margin,
                          attn=cfg.train.attn_implementation, embeddings=embeddings)  # fmt: skip
    fit = math.floor(cpus / cpt)
    if per_worker > 0:
        fit = min(fit, math.floor(gpus / per_worker))
    methods = methods_of(cfg)
    # a member that trains the whole embedding matrix cannot share the base: one member per worker
    setting = 1 if embeddings == "full" else res.cohort
    n, capacity = plan_workers(setting, memory is not None, fit, trials, cfg.search.max_concurrent, len(methods))
    configs = [{"worker": i, "method": methods[i % len(methods)]} for i in range(n)]
    notes = ["model.embeddings: full trains the whole embedding matrix per trial: one trial per worker"] if embeddings == "full" and res.cohort != 1 else []
    compiled, why = rules.compile_layers(cfg.train.compile, gpus > 0 and (per_worker > 0 or res.gpus_per_trial == "auto"), train_flops(cfg, profile, trials, n))
    notes.append(f"train.compile: {'on' if compiled else 'off'} ({why})")
    limit = None if cfg.search.max_concurrent == "auto" else int(cfg.search.max_concurrent)
    return WorkerPlan(configs, capacity, cpt, per_worker, memory, device, judge, budget, compiled, notes, trials, limit)


def train_flops(cfg: Any, profile: Any, trials: int, workers: int) -> float:
    """A worker's share of the sweep's training, in FLOPs: 6 x the decoder's linear parameters x the
    tokens its trials train (every trial run to max_steps, at the space's mean effective batch)."""
    from sweep.config.space import Choice

    dim = next((d for d in cfg.space.dims if d.name == "batch"), None)
    pairs = list(dim.options) if isinstance(dim, Choice) else [cfg.train.batch]
    batch = sum(m * a for m, a in pairs) / len(pairs)
    tokens = trials * cfg.train.max_steps * batch * cfg.data.max_seq_len / max(1, workers)
    return 6.0 * profile.decoder_linear_params * tokens


# ----------------------------------------------------------------------------------------------
# Tune's side


# Tune pickles its searcher and callbacks into the sweep folder (tune*/tuner.pkl). Their classes
# are defined inside functions (Ray is imported late), so cloudpickle writes them by value, closures
# included: what they use (the study source, whose store URLs may hold a password) is kept on the
# instance instead, and left out of the pickle (__getstate__). lora-sweep never restores Tune's state.


def worker_list(configs: list[dict[str, Any]], halted: Callable[[], str | None]) -> Any:
    from ray.tune.search import Searcher

    class WorkerList(Searcher):
        """Hands Tune one config per worker, and one more for each worker that died with members to
        retry (`replace`); finished once none is left to start and none runs. Nothing starts once
        the sweep is stopped or out of time."""

        def __init__(self, configs: list[dict[str, Any]], halted: Callable[[], str | None]) -> None:
            super().__init__()
            self.configs, self.halted = list(configs), halted
            self.made, self.live = len(self.configs), 0

        def __getstate__(self) -> dict:
            return {k: v for k, v in self.__dict__.items() if k != "halted"}

        def suggest(self, trial_id: str) -> dict | None:
            if self.configs and not self.halted():
                self.live += 1
                return self.configs.pop(0)
            return None if self.live else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            self.live -= 1

        def replace(self, method: str) -> None:
            self.configs.append({"worker": self.made, "method": method})
            self.made += 1

        def save(self, checkpoint_path: str) -> None:
            pass  # `resume` rebuilds the workers from the study, never from Tune's searcher state

        def restore(self, checkpoint_path: str) -> None:
            pass

    return WorkerList(configs, halted)


def orphans_callback(source: StudySource, workers: Any, max_retries: int, progress: Any) -> Any:
    from ray.tune import Callback

    class Orphans(Callback):
        """Members whose worker is gone. A worker that died (its process or node went away) leaves
        its members open: each runs again from its last member checkpoint, on a new worker, while
        search.max_retries allows, and ends failed after that; a worker that raised has ended its
        members itself. After a stop they stay open for `resume` (their runs KILLED / stopped); at
        the time budget they end stopped. Members still queued when the sweep ends are closed the
        same way."""

        def __init__(self, source: StudySource, workers: Any, max_retries: int, progress: Any) -> None:
            self.source, self.workers, self.max_retries, self.progress = source, workers, max_retries, progress

        def __getstate__(self) -> dict:
            return {}

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            error = error_text(trial) or NO_ERROR_TEXT
            retried = []
            for task in self.source.orphans(trial.trial_id):
                if self.source.halt() is None and should_retry(error, task.attempt, self.max_retries):
                    self.source.retry(task, f"its worker {trial.trial_id} died")
                    retried.append(task)
                    where = f"its checkpoint at {task.checkpoint.rsplit('/', 1)[-1]}" if task.checkpoint else "the start"
                    self.progress.say(f"{task.label} retrying  its worker died; attempt {task.attempt} continues from {where}")
                else:
                    self._close(task, f"its worker {trial.trial_id} died: {last_line(error)[:300]}")
            if retried:
                self.workers.replace(trial.config.get("method", retried[0].hyper.get("method")))

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            for task in self.source.queued():
                self._close(task, "never continued: the sweep ended first")

        def _close(self, task: Any, error: str) -> None:
            how = self.source.close(task, error)
            self.progress.trial_ended(task.label, how.split(" ", 1)[0].rstrip(":"), f"{task.label} {how}")

    return Orphans(source, workers, max_retries, progress)
