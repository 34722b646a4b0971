"""A sweep, top to bottom: preflight -> results folder -> MLflow parent run -> Ray Tune -> summary.

    preflight   load the tokenizer, check LoRA targets against the model, tokenize the data once
    folder      <results_dir>/<name>-<timestamp>/: space.yaml, resolved.yaml, optuna.db, tune/
    tune        a `Sweep` (setup / run / finish): Tuner(trial) + SweepSearch (Optuna, durable study)
                + scheduler + callbacks (retries, MLflow, terminal, heartbeat)
    summary     every trial's outcome, the best trial, and how to open the MLflow UI

Config and data problems are found before anything starts (no Ray, no MLflow run, no folder).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import yaml

from core.contract import GPU_SHARE
from sweep.config import ConfigError, SweepConfig
from sweep.results import SweepResult, collect
from sweep.signals import Interrupt, Interrupted, Terminated, signals_raise, wrap_up

Log = Callable[[str], None]


# ----------------------------------------------------------------------------------------------
# preflight: everything that can fail before a single resource is taken


def preflight(cfg: SweepConfig, log: Log) -> Any:
    """Tokenizer, LoRA target check and the tokenized data (cached). Raises ConfigError / DataError."""
    from sweep.space import Choice
    from trainable.data import notes, prepare
    from trainable.model import check_targets, load_tokenizer

    download_model(cfg, log)
    log(f"model {cfg.model.id}: loading tokenizer ...")
    try:
        tokenizer = load_tokenizer(cfg.model.id, cfg.model.chat_template_from, cfg.model.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(cfg.source), [f"model: cannot load the tokenizer of {cfg.model.id}: {str(exc).splitlines()[0]}"]) from None
    dim = next((d for d in cfg.space.dims if d.name == "target_modules"), None)
    choices = list(dim.options) if isinstance(dim, Choice) else [cfg.train.target_modules]
    try:
        problems = check_targets(cfg.model.id, choices, cfg.model.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(cfg.source), [f"model.id: cannot read the config of {cfg.model.id}: {str(exc).splitlines()[0]}"]) from None
    if problems:
        where = "space.target_modules" if dim is not None else "train.target_modules"
        raise ConfigError(str(cfg.source), [f"{where}: {p}" for p in problems])
    prepared = prepare(cfg.data, tokenizer, cfg.results_dir / ".cache" / "data", cfg.train.seed, log=log)
    for note in notes(prepared.stats):  # replies cut short by max_seq_len, and where
        log(note)
    return prepared


def download_model(cfg: SweepConfig, log: Log) -> None:
    """A hub model is fetched here, once, with a progress bar, rather than silently by the first
    trial (trials on this machine then read the local cache). Local folders and the tiny models
    need nothing; without network, loading the tokenizer reports the problem."""
    from pathlib import Path as _Path

    from sweep.config import TINY_MODELS

    if cfg.model.id in TINY_MODELS or _Path(cfg.model.id).exists():
        return
    try:
        from huggingface_hub import snapshot_download

        log(f"model {cfg.model.id}: downloading (or checking the local cache) ...")
        snapshot_download(cfg.model.id, revision=cfg.model.revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
    except Exception as exc:  # offline, gated, no such repo: the tokenizer load says so clearly
        log(f"model {cfg.model.id}: not downloaded ({str(exc).splitlines()[0][:200]})")


def new_sweep_dir(cfg: SweepConfig, wanted: Path | None = None) -> Path:
    """A fresh folder per sweep; an existing one is never reused (resume is a separate command)."""
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
    if wanted is not None:  # chosen by `submit`, which tells the user where it will be
        try:
            wanted.mkdir(parents=True)
        except FileExistsError:
            raise ConfigError(str(wanted), [f"--sweep-dir {wanted}: exists already; a new sweep needs a new folder (resume is `python -m sweep resume {shlex.quote(str(wanted))}`)"]) from None
        return wanted
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = cfg.results_dir / (f"{cfg.name}-{stamp}" + (f"-{n}" if n > 1 else ""))
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise RuntimeError(f"cannot create a new sweep folder in {cfg.results_dir}")


# ----------------------------------------------------------------------------------------------
# Ray


def connect_ray(address: str | None, log: Log) -> bool:
    """Attach to `address` / RAY_ADDRESS, or start a local Ray. True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    log(f"ray: {'attaching to ' + address if address else 'starting a local instance'} ...")
    if address:
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
        except ConnectionError as exc:  # something listens there, but not a Ray head (checks.reachable ruled out silence)
            raise ConfigError(address, [f"--address {address}: no Ray cluster answers there ({str(exc).splitlines()[0][:200]}); give the head's "
                                        "GCS address (`ray start --head` prints it, port 6379 by default), or leave --address out for a local Ray"]) from None  # fmt: skip
    else:
        # A local Ray serves this machine only, so every server it starts (GCS, raylet, object
        # store) listens on loopback. Ray picks the node's address from its own "no cluster" switch
        # (what it uses on macOS and Windows); --address is how to use a cluster.
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        except SystemExit as exc:
            # SIGTERM while Ray starts: ray.init's own handler exits with status 15. Stop what
            # it started, and end as SIGTERM does elsewhere outside the trials (exit 143).
            if exc.code != signal.SIGTERM:
                raise
            ray.shutdown()
            raise Terminated() from None
        # If this driver is killed (kill -9, a second Ctrl-C), its Ray's agents and idle workers
        # would outlive it by a minute or more: a small watcher ends them at once.
        from sweep import reaper

        global _reaper
        _reaper = reaper.start()
    signals_raise()  # over Ray's SIGTERM handler, which would exit with status 15
    return True


_reaper: Any = None  # the watcher of the local Ray this driver started (sweep.reaper)


def shutdown_ray() -> None:
    """Stop the local Ray this driver started, and its watcher."""
    import ray

    global _reaper
    ray.shutdown()
    if _reaper is not None:
        _reaper.done()
        _reaper = None


@dataclass
class Resources:
    """What each trial asks Ray for."""

    cpus: float
    gpus: float | None  # None: each trial's own share, from its memory estimate (auto placement)
    concurrent: int
    placement: Any = None  # sweep.placement.Placement when gpus is None

    def describe(self) -> str:
        gpu = "a GPU share sized by its memory estimate" if self.gpus is None else f"{self.gpus:g} GPU"
        return f"{gpu} + {self.cpus:g} CPU each"


def probe_gpu_bytes() -> int:
    """Memory of one of the cluster's GPUs, read by a tiny task on a GPU node."""
    import ray

    @ray.remote(num_gpus=0.01)
    def total_memory() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(total_memory.remote(), timeout=300)


def plan_resources(cfg: SweepConfig, log: Log) -> Resources:
    """Per-trial resources for this cluster; ConfigError if a trial could never be placed."""
    import ray

    from sweep.config import SEARCHABLE
    from sweep.estimate import GB
    from sweep.placement import STEP, Placement

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    res = cfg.resources
    cpt = float(res.cpus_per_trial)
    problems = []
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
    by_cpu = math.floor(cpus / cpt)
    limit = (lambda fit: fit if cfg.search.max_concurrent == "auto" else int(cfg.search.max_concurrent))
    if res.gpus_per_trial == "auto" and gpus > 0:
        from sweep.memory import load_profile

        gpu_bytes = res.gpu_memory_gb * GB if res.gpu_memory_gb != "auto" else probe_gpu_bytes()
        log(f"placement: trials share {gpus:g} GPU(s) of {gpu_bytes / GB:.0f} GB by their memory estimates (+{res.memory_margin:.0%} margin)")
        placement = Placement(
            profile=load_profile(cfg),
            gpu_bytes=gpu_bytes,
            margin=res.memory_margin,
            max_seq_len=cfg.data.max_seq_len,
            embeddings=cfg.model.embeddings,
            attn=cfg.train.attn_implementation,
            loss=cfg.train.loss,
            fixed={k: getattr(cfg.train, k) for k in SEARCHABLE},
        )
        # Memory grows with every memory dimension, so if no corner of the space fits, nothing does:
        # say so now rather than sample infeasible configs until the searcher gives up.
        from sweep.estimate import corners

        verdicts = [placement.judge(c) for c in corners(cfg.space, {})]
        if not any(v.feasible for v in verdicts):
            smallest = min(verdicts, key=lambda v: v.share)
            raise ConfigError(str(cfg.source), [
                f"resources: no configuration of this space fits one {gpu_bytes / GB:.1f} GB GPU (resources.gpu_memory_gb): the smallest "
                f"needs an estimated {smallest.estimate_gb:.1f} GB (+{res.memory_margin:.0%} margin, + CUDA context); use QLoRA, smaller "
                "micro-batches, gradient checkpointing or fewer target modules, or bigger GPUs (python -m sweep estimate shows the corners)"
            ])  # fmt: skip
        fit = min(by_cpu, math.floor(gpus / STEP))
        return Resources(cpt, None, max(1, min(limit(fit), cfg.num_trials)), placement)
    gpt = 0.0 if res.gpus_per_trial == "auto" else float(res.gpus_per_trial)
    fit = math.floor(gpus / gpt) if gpt > 0 else by_cpu
    return Resources(cpt, gpt, max(1, min(limit(fit), by_cpu, cfg.num_trials)))


class InfeasibleLog:
    """Records a config the placement check refused (MLflow + terminal). A class, not a closure:
    Tune pickles the searcher that holds it."""

    def __init__(self, trial_runs: Any, fixed: dict[str, Any], log: Log):
        self.trial_runs, self.fixed, self.log = trial_runs, fixed, log

    def __call__(self, label: str, config: dict, verdict: Any) -> None:
        from sweep.trials import summary

        self.trial_runs.record_infeasible(label, config, verdict)
        self.log(f"{label} infeasible  {summary({**self.fixed, **config})}: {verdict.reason}")


class DuplicateLog:
    """Says in the terminal that a proposal was a configuration already run (sweep.study.twin_of).
    A class, not a closure: Tune pickles the searcher that holds it."""

    def __init__(self, fixed: dict[str, Any], log: Log):
        self.fixed, self.log = fixed, log

    def __call__(self, label: str, config: dict, twin: int, spent: bool) -> None:
        from sweep.study import SPENT_AFTER_DUPLICATES
        from sweep.trials import summary

        self.log(f"{label} duplicate  {summary({**self.fixed, **config})}: t{twin:03d} ran it; not run again" + ("" if spent else ", another is sampled"))
        if spent:
            self.log(f"the last {SPENT_AFTER_DUPLICATES} proposals (random ones too) were all configurations already run: the space looks spent; no new trials start")


# ----------------------------------------------------------------------------------------------
# the sweep


def _tune_stopper(stop: Any) -> Any:
    """Tune stopper: once the sweep's StopFile is requested, every trial stops (each one that sees
    the file first saves a checkpoint at its current step)."""
    from ray.tune import Stopper

    class _Stopper(Stopper):
        def __init__(self, stop: Any):
            self.stop = stop

        def __call__(self, trial_id: str, result: dict) -> bool:
            return self.stop.requested()

        def stop_all(self) -> bool:
            return self.stop.requested()

    return _Stopper(stop)


class Heartbeat:
    """Tune callback: the sweep's elapsed time in sweep.json every few seconds, for `status` and for
    the time budget left after a resume. Often, because a killed driver's last beat is what its
    resume counts: a crash under-counts the time budget by at most INTERVAL."""

    INTERVAL = 2.0  # s; a beat is one small atomic file write

    def __init__(self, sweep_dir: Path, elapsed_before: float):
        self.sweep_dir, self.elapsed_before = sweep_dir, elapsed_before
        self.started = time.monotonic()
        self.last = 0.0

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def beat(self, force: bool = False, **changes: Any) -> None:
        from sweep.sweepdir import update_meta

        if force or time.monotonic() - self.last >= self.INTERVAL:
            self.last = time.monotonic()
            update_meta(self.sweep_dir, elapsed_seconds=round(self.elapsed(), 1), **changes)


def _heartbeat_callback(heartbeat: Heartbeat) -> Any:
    from ray.tune import Callback

    class _Beat(Callback):
        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            heartbeat.beat()

    return _Beat()


def run_sweep(
    cfg: SweepConfig, address: str | None = None, log: Log = print, sweep_dir: Path | None = None, command: str = "run", live: bool = False,
) -> SweepResult:  # fmt: skip
    """A new sweep: preflight, a new results folder and parent run, then the trials. `command`
    (run, or train for one configuration: sweep.single) is recorded in sweep.json. `live`: stdout
    is a terminal, the sweep's progress is a bar drawn in place (plain lines otherwise)."""
    from sweep.checks import before_start, quote
    from sweep.secrets import redact
    from sweep.study import create_study
    from sweep.sweepdir import release, update_meta, write_meta
    from sweep.tracking import SweepRun

    clock = time.perf_counter()
    before_start(cfg, address, Path(sweep_dir).resolve() if sweep_dir else None)  # folders writable, cluster reachable: before anything starts
    prepared = preflight(cfg, log)  # before Ray: bad input stops here, with nothing started
    phases = {"checks, tokenizer, model check, data": time.perf_counter() - clock}
    mark = time.perf_counter()
    started_ray = connect_ray(address, log)
    phases["Ray attached" if address or os.environ.get("RAY_ADDRESS") else "Ray started"] = time.perf_counter() - mark
    try:
        mark = time.perf_counter()
        resources = plan_resources(cfg, log)
        sweep_dir = new_sweep_dir(cfg, Path(sweep_dir).resolve() if sweep_dir else None)
        (sweep_dir / "space.yaml").write_text(redact(cfg.source_text))
        (sweep_dir / "resolved.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        sweep_run = SweepRun(cfg, sweep_dir)
        meta = {
            "name": cfg.name,
            "space_file": str(cfg.source),
            "overrides": [redact(o) for o in cfg.overrides],
            "mlflow_uri": redact(cfg.tracking.mlflow_uri or cfg.mlflow_uri),
            "experiment": cfg.experiment,
            "parent_run_id": sweep_run.run_id,
            "experiment_id": sweep_run.experiment_id,  # for the runs-table link of status / best / list
            "optuna_storage": redact(cfg.tracking.optuna_storage or cfg.optuna_storage(sweep_dir)),
            "study_name": cfg.name,
            "metric": cfg.search.metric,
            "data_dir": str(prepared.folder),
            "num_trials": cfg.num_trials,
            "concurrency": resources.concurrent,
            "started": datetime.now().isoformat(timespec="seconds"),
            "elapsed_seconds": 0.0,
            "state": "running",
            "command": command,
        }
        create_study(cfg, cfg.optuna_storage(sweep_dir))  # before sweep.json names it
        write_meta(sweep_dir, meta)
        log(f"sweep folder: {sweep_dir}   (if the driver dies: python -m sweep resume {quote(sweep_dir)})")
        sweep = Sweep(cfg, sweep_dir, sweep_run, prepared, resources, [], cfg.num_trials, 0.0, log, live=live)
        try:
            sweep.setup()
        except KeyboardInterrupt:  # Ctrl-C / SIGTERM before any trial ran: a stop that `resume` continues
            sweep_run.finish({}, None, cfg.search.metric, status="KILLED")
            update_meta(sweep_dir, state="stopped")
            release(sweep_dir)  # setup claimed it
            raise
        phases["results folder, MLflow, study"] = time.perf_counter() - mark
        log(f"start-up: {time.perf_counter() - clock:.1f}s before Ray Tune starts the trials ({describe_phases(phases)})")
        sweep.run()
        return sweep.finish()
    finally:
        if started_ray:
            shutdown_ray()


def describe_phases(phases: dict[str, float]) -> str:
    """'a 1.2s, b 0.3s', in the order given: where a sweep's start-up went, for its log."""
    return ", ".join(f"{name} {seconds:.1f}s" for name, seconds in phases.items())


def resume_sweep(sweep_dir: Path, address: str | None = None, log: Log = print, live: bool = False) -> SweepResult:
    """Finish a sweep whose driver died or was stopped: the same study (its whole history), the
    same parent run; unfinished trials continue from their last checkpoint; finished ones never
    run again; new trials fill the rest of the budget."""
    import optuna

    from core.contract import STATUS, TrialStatus
    from sweep.checks import before_resume
    from sweep.study import Resumed, tell
    from sweep.sweepdir import STOP, SweepFolder, claim, latest_checkpoint, release
    from sweep.tracking import SweepRun

    folder = SweepFolder(sweep_dir)
    sweep_dir, meta = folder.path, folder.meta
    if meta.get("state") == "finished":
        raise ConfigError(str(sweep_dir), [f"{sweep_dir.name}: finished already; nothing to resume"])
    cfg = folder.config
    before_resume(cfg, sweep_dir, folder.study_name, address)  # stores present, folders writable, cluster reachable
    claim(sweep_dir)
    try:
        prepared = preflight(cfg, log)
        study = optuna.load_study(study_name=folder.study_name, storage=folder.optuna_storage)
        resume, finished = [], 0
        for t in study.trials:
            if "warm_start_from" in t.user_attrs:
                continue
            if t.state == optuna.trial.TrialState.RUNNING:
                if not t.params:  # asked, never sampled: nothing ran, nothing to continue
                    t_obj = optuna.trial.Trial(study, t._trial_id)
                    t_obj.set_user_attr(STATUS, str(TrialStatus.LOST))
                    tell(study, t_obj, None, optuna.trial.TrialState.FAIL)
                    continue
                checkpoint = latest_checkpoint(sweep_dir, t.user_attrs.get("ray_trial_id"))
                resume.append(Resumed(t.number, checkpoint, int(t.user_attrs.get("attempt", 1))))
            elif "ray_trial_id" in t.user_attrs:
                finished += 1
        budget = max(0, cfg.num_trials - finished - len(resume))
        (sweep_dir / STOP).unlink(missing_ok=True)
        continuing = ", ".join(f"t{r.number:03d} from {Path(r.checkpoint).name if r.checkpoint else 'the start'}" for r in resume)
        log(f"resuming {sweep_dir.name}: {finished} trials finished; continuing {len(resume)} ({continuing or 'none'}); {budget} new to run")
        started_ray = connect_ray(address, log)
        try:
            resources = plan_resources(cfg, log)
            sweep_run = SweepRun.attach(cfg, folder.parent_run_id)
            repaired = sweep_run.close_ended(study)
            if repaired:
                log(f"MLflow: closed {', '.join(repaired)} as the study ended them (the driver was killed before it recorded their end)")
            sweep = Sweep(cfg, sweep_dir, sweep_run, prepared, resources, resume, budget, float(meta.get("elapsed_seconds", 0.0)), log, live=live)
            sweep.setup()
            sweep.run()
            return sweep.finish()
        finally:
            if started_ray:
                shutdown_ray()
    finally:
        release(sweep_dir)


class Sweep:
    """One driver run of a sweep (a new sweep, or a resume), read top to bottom:

        setup()    the stop file, the heartbeat, the trainable and its resources, the MLflow
                   recorder, the Optuna searcher, warm start, the scheduler and the Tuner
        run()      Tuner.fit until the budget is spent, the time is up or a stop is requested;
                   Ctrl-C / SIGTERM become a resumable stop (Interrupt)
        finish()   close what Tune left open, read every trial back, close the parent run, print
                   the summary; raises Interrupted after a signal

    Tune's callbacks each own one job, in this order: Retries decides whether a trial that errored
    runs again (it tells the searcher and the Ledger), TrialRuns records to MLflow, Progress prints,
    the heartbeat writes sweep.json. Whether a stop was requested is asked of one StopFile.
    """

    def __init__(
        self, cfg: SweepConfig, sweep_dir: Path, sweep_run: Any, prepared: Any, resources: Resources,
        resume: list | None = None, budget: int | None = None, elapsed_before: float = 0.0, log: Log = print, live: bool = False,
    ):  # fmt: skip
        self.cfg, self.sweep_dir, self.sweep_run, self.prepared, self.resources = cfg, sweep_dir, sweep_run, prepared, resources
        self.resume = list(resume or [])
        self.budget = cfg.num_trials if budget is None else budget
        self.elapsed_before, self.log, self.live = elapsed_before, log, live
        self.progress: Any = None  # the Progress callback, once made

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        from sweep.study import SweepSearch
        from sweep.sweepdir import STOP, StopFile, claim
        from sweep.tracking import TrialRuns
        from sweep.trials import Ledger

        cfg, log = self.cfg, self.log
        self._describe()
        claim(self.sweep_dir)  # resume holds it already (claim is idempotent); a new run takes it here
        self.stop = StopFile(self.sweep_dir / STOP)
        self.heartbeat = Heartbeat(self.sweep_dir, self.elapsed_before)
        self.heartbeat.beat(force=True, state="running")
        self.ledger = Ledger()  # what the searcher, scheduler and callbacks share about each trial
        self.trainable = self.make_trainable()
        self.trial_runs = TrialRuns(self.sweep_run, self.ledger, cfg.fixed_hyperparams, stop=self.stop, objectives=self.objectives)
        _tune_environment()
        judge = self.resources.placement.judge if self.resources.placement else None
        self.search = SweepSearch(
            cfg, cfg.optuna_storage(self.sweep_dir), self.ledger, judge=judge, on_infeasible=InfeasibleLog(self.trial_runs, cfg.fixed_hyperparams, log),
            on_duplicate=DuplicateLog(cfg.fixed_hyperparams, log),
            budget=self.budget, resume=self.resume, stop=self.stop,
        )  # fmt: skip
        self._warm_start()
        self.tuner = self.make_tuner()

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.cfg.objectives)

    def _describe(self) -> None:
        cfg, stats, resources = self.cfg, self.prepared.stats, self.resources
        self.log(
            f"data: {stats['train']['examples']} train examples -> {stats['train']['rows']} sequences "
            f"({stats['train']['loss_tokens']} reply tokens), {stats['eval']['examples']} eval examples; "
            f"template tokens: {', '.join(stats['template_tokens']) or 'none'}"
        )
        self.log(
            f"{cfg.num_trials} trials, up to {resources.concurrent} at a time, {resources.describe()}; "
            f"search {cfg.search.algorithm}, scheduler {cfg.search.scheduler.type}; space {cfg.space.describe_size()}"
        )
        if cfg.algorithm_reason != "as configured":
            self.log(f"search: {cfg.search.algorithm}: {cfg.algorithm_reason}")

    def make_trainable(self) -> Any:
        """What each Ray trial runs, and the resources it asks Ray for: the one place both are chosen."""
        from ray import tune

        from trainable.train import TrialSpec, tune_trial

        cfg, resources = self.cfg, self.resources
        base = TrialSpec(
            model_id=cfg.model.id,
            revision=cfg.model.revision,
            data_dir=str(self.prepared.folder),
            train=cfg.train,
            threads=max(1, int(resources.cpus)),
            embeddings=cfg.model.embeddings,
            template_ids=tuple(self.prepared.stats["template_tokens"].values()),
            max_seq_len=cfg.data.max_seq_len,
            # a fixed fraction below one GPU caps each trial to it, as auto placement caps to each share
            gpu_share=resources.gpus if resources.gpus is not None and 0 < resources.gpus < 1 else None,
            gpu_bytes=int(resources.placement.gpu_bytes) if resources.placement is not None else None,
            stop_file=self.stop.path,  # the worker reads the file itself: it checkpoints before stopping
        )
        self.base = base  # resources.cohort: the cohort workers start from it too (make_tuner)
        trainable = tune.with_parameters(tune_trial, base=base)
        if resources.gpus is None:  # auto placement: each trial asks for the share its estimate needs
            from ray.tune import PlacementGroupFactory

            cpus = resources.cpus
            return tune.with_resources(trainable, lambda config: PlacementGroupFactory([{"CPU": cpus, "GPU": config[GPU_SHARE]}]))
        return tune.with_resources(trainable, {"cpu": resources.cpus, "gpu": resources.gpus})

    def _warm_start(self) -> None:
        """search.warm_start: the previous sweep's trials enter the study once (not again on resume)."""
        cfg, study = self.cfg, self.search._ot_study
        if cfg.search.warm_start and not any("warm_start_from" in t.user_attrs for t in study.get_trials(deepcopy=False)):
            from sweep import warmstart

            self.log(warmstart.apply(study, cfg, Path(cfg.search.warm_start)).describe())

    def make_callbacks(self) -> list:
        """Retries first: the others read its decision from the Ledger."""
        from sweep.progress import Progress
        from sweep.retries import Retries

        cfg = self.cfg
        progress = Progress(
            cfg.search.metric, cfg.search.mode, cfg.train.max_steps, self.ledger, cfg.fixed_hyperparams, self.log, objectives=self.objectives,
            total=self.budget + len(self.resume), time_budget=self.time_left, live=self.live,
        )  # fmt: skip
        self.progress = progress
        return [Retries(self.search, self.ledger, cfg.search.max_retries), self.trial_runs, progress, _heartbeat_callback(self.heartbeat)]

    @property
    def time_left(self) -> float | None:
        """Seconds of the time budget left to this driver run (None without a budget)."""
        cfg = self.cfg
        return max(1.0, cfg.search.time_budget - self.elapsed_before) if cfg.search.time_budget else None

    def make_tuner(self) -> Any:
        from ray import tune

        from sweep.schedulers import make_scheduler
        from sweep.sweepdir import next_tune_name

        cfg, resources = self.cfg, self.resources
        time_left = self.time_left
        tune_config = tune.TuneConfig(
            search_alg=self.search,
            scheduler=make_scheduler(cfg, self.ledger),
            num_samples=-1,  # the searcher owns the budget (retries and resumes included)
            # Tune's concurrency limiter counts paused trials as running: with Hyperband, which
            # pauses trials until their bracket fills, it would deadlock. Resources limit it.
            max_concurrent_trials=None if cfg.search.scheduler.type == "hyperband" else resources.concurrent,
            time_budget_s=time_left,
            reuse_actors=True,
            trial_dirname_creator=TrialDirname(self.ledger),
        )
        trainable, callbacks = self.trainable, self.make_callbacks()
        if cfg.resources.cohort != "off":  # issue 15: each Ray trial is a cohort worker; Optuna asks, tells and prunes its members
            from sweep.cohorts import CohortPlan

            plan = CohortPlan.build(cfg, self.sweep_dir, self.sweep_run, self.base, resources, self.resume, self.budget, time_left, self.log)
            trainable, tune_config, callbacks = plan.apply(trainable, tune_config, callbacks)
        return tune.Tuner(
            trainable,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=next_tune_name(self.sweep_dir),
                storage_path=str(self.sweep_dir),
                callbacks=callbacks,
                # cohort workers read the STOP file themselves and checkpoint every member before they
                # end; Tune's stopper would end (kill) a worker while it does (sweep/cohorts.py)
                stop=_tune_stopper(self.stop) if cfg.resources.cohort == "off" else None,
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )

    # -- run ----------------------------------------------------------------------------------

    def run(self) -> None:
        from sweep.sweepdir import release

        self.started = time.monotonic()
        self.interrupt = Interrupt(Path(self.stop.path), f"python -m sweep resume {shlex.quote(str(self.sweep_dir))}").install()
        try:
            self.tuner.fit()
        except BaseException:
            self.interrupt.restore()
            if self.progress is not None:
                self.progress.close()
            self.sweep_run.finish({}, None, self.cfg.search.metric, status="KILLED")
            self.heartbeat.beat(force=True, state="failed")
            release(self.sweep_dir)
            raise

    # -- finish -------------------------------------------------------------------------------

    def finish(self) -> SweepResult:
        import optuna

        from sweep.checks import quote
        from sweep.progress import table
        from sweep.sweepdir import mlflow_links, release, say_mlflow

        cfg, sweep_dir, log = self.cfg, self.sweep_dir, self.log
        wrap_up()  # the trials have ended: a signal from here on waits for the sweep's end to be recorded
        if self.progress is not None:
            self.progress.close()  # the bar ends above the table (Tune's experiment end closed it already)
        stopped = self.stop.requested()
        self.search.close_open_trials({tid: t.last_result for tid, t in self.trial_runs.trials.items()})
        study = optuna.load_study(study_name=cfg.name, storage=cfg.optuna_storage(sweep_dir))
        result = collect(cfg, study, self.sweep_run.children())
        result.sweep_dir, result.parent_run_id = sweep_dir, self.sweep_run.run_id
        self.sweep_run.finish(result.counts, result.best, cfg.search.metric, status="KILLED" if stopped else "FINISHED", pareto=result.pareto)
        self.heartbeat.beat(force=True, state="stopped" if stopped else "finished", experiment_id=self.sweep_run.experiment_id)
        release(sweep_dir)
        log("")
        table(result.trials, cfg.search.metric, log)
        log("")
        counts = ", ".join(f"{n} {k}" for k, n in result.counts.items())
        log(f"{len(result.trials)} trials ({time.monotonic() - self.started:.0f}s in this run): {counts}")
        if cfg.multi_objective:
            names = [m for m, _ in cfg.objectives]
            log(f"Pareto set ({' / '.join(f'{m} {d}' for m, d in cfg.objectives)}): " + (", ".join(
                f"{r['label']} (" + ", ".join(f"{r[m]:.4g}" for m in names) + ")" for r in result.pareto) or "none"))  # fmt: skip
        if result.best:
            b = result.best
            log(f"best trial: {b['label']}  {cfg.search.metric} {b[cfg.search.metric]:.4f}  ({b['summary']})")
        else:
            log("best trial: none completed")
        log(f"report: python -m sweep report {quote(sweep_dir)}    best adapter: python -m sweep best {quote(sweep_dir)} --export DIR")
        interrupt = self.interrupt
        interrupt.restore()
        if interrupt.signum is not None:
            log(f"interrupted ({Interrupted(interrupt.signum)}): running trials checkpointed and stopped; continue with:  {interrupt.resume}")
            raise Interrupted(interrupt.signum, result)
        if stopped:
            log(f"stopped on request; continue with:  python -m sweep resume {quote(sweep_dir)}")
        say_mlflow(mlflow_links(cfg.tracking.mlflow_uri or cfg.mlflow_uri, self.sweep_run.experiment_id), log)
        return result


class TrialDirname:
    """Tune's trial folder name: `t003_<ray trial id>`, the Optuna trial's label first, so the folder
    of a trial named in the terminal, MLflow and the study is found at a glance (Tune's default is
    `tune_trial_<id>_<Tune's own counter>_<config>_<date>`). The Ray trial id stays in the name:
    a trial's checkpoints are found by it (sweepdir.latest_checkpoint). A Ray trial without a
    label (a cohort worker, which trains several) is `<trainable name>_<id>`.

    Tune calls it when it creates a trial, right after the searcher labelled it in the Ledger."""

    def __init__(self, ledger: Any):
        self.ledger = ledger

    def __call__(self, trial: Any) -> str:
        label = self.ledger.labels.get(trial.trial_id)
        return f"{label}_{trial.trial_id}" if label else f"{trial.trainable_name}_{trial.trial_id}"


def _tune_environment() -> None:
    """Ray Tune settings of the driver process, set before the searcher and the Tuner are built."""
    # oom / nan reports carry no eval_loss; the scheduler and the searcher handle that.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's own console reporter would print a banner and tables; our Progress callback says it.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    # Keeping one checkpoint per trial forces an experiment snapshot per report; that is cheap
    # here (small state) and Tune's warning about it would drown the progress lines.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    state_log = logging.getLogger("ray.tune.execution.experiment_state")
    if not any(isinstance(f, _RenamedUnderSync) for f in state_log.filters):
        state_log.addFilter(_RenamedUnderSync())


class _RenamedUnderSync(logging.Filter):
    """Drops one Ray Tune log record: a stop right as the trials start makes Tune snapshot its
    experiment while it copies the previous snapshot, and a temporary file it renamed meanwhile is
    logged as a failed save, with a traceback. Tune saves again at the end; nothing is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (record.getMessage().startswith("Saving experiment state") and isinstance(exc, FileNotFoundError) and "-tmp-" in str(exc))
