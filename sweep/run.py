"""A sweep, top to bottom: preflight -> results folder -> MLflow parent run -> Ray Tune -> summary.

    preflight   load the tokenizer, check LoRA targets against the model, tokenize the data once
    folder      <results_dir>/<name>-<timestamp>/: space.yaml, resolved.yaml, optuna.db, tune/
    tune        Tuner(trial) + SweepSearch (Optuna, durable sqlite study) + ASHA + MLflow callback
    summary     every trial's outcome, the best trial, and how to open the MLflow UI

Config and data problems are found before anything starts (no Ray, no MLflow run, no folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import yaml

from sweep.config import ConfigError, SweepConfig

Log = Callable[[str], None]


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str
    trials: list[dict[str, Any]] = field(default_factory=list)  # one row per trial, best first
    best: dict[str, Any] | None = None
    counts: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# preflight: everything that can fail before a single resource is taken


def preflight(cfg: SweepConfig, log: Log) -> Any:
    """Tokenizer, LoRA target check and the tokenized data (cached). Raises ConfigError / DataError."""
    from sweep.space import Choice
    from trainable.data import prepare
    from trainable.model import check_targets, load_tokenizer

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
    return prepare(cfg.data, tokenizer, cfg.results_dir / ".cache" / "data", cfg.train.seed, log=log)


def new_sweep_dir(cfg: SweepConfig) -> Path:
    """A fresh folder per sweep; an existing one is never reused (resume is a separate command)."""
    cfg.results_dir.mkdir(parents=True, exist_ok=True)
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
    ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    return True


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


# ----------------------------------------------------------------------------------------------
# the sweep


def run_sweep(cfg: SweepConfig, address: str | None = None, log: Log = print) -> SweepResult:
    from ray import tune

    from sweep.progress import Progress, table
    from sweep.schedulers import make_scheduler
    from sweep.study import SweepSearch, storage_url
    from sweep.tracking import SweepRun, TrialRuns
    from sweep.trials import Ledger
    from trainable.train import TrialSpec, tune_trial

    prepared = preflight(cfg, log)
    stats = prepared.stats
    log(
        f"data: {stats['train']['examples']} train examples -> {stats['train']['rows']} sequences "
        f"({stats['train']['loss_tokens']} reply tokens), {stats['eval']['examples']} eval examples; "
        f"template tokens: {', '.join(stats['template_tokens']) or 'none'}"
    )
    started_ray = connect_ray(address, log)
    try:
        resources = plan_resources(cfg, log)
        sweep_dir = new_sweep_dir(cfg)
        (sweep_dir / "space.yaml").write_text(cfg.source_text)
        (sweep_dir / "resolved.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        sweep_run = SweepRun(cfg, sweep_dir)
        meta = {
            "name": cfg.name,
            "space_file": str(cfg.source),
            "overrides": list(cfg.overrides),
            "mlflow_uri": cfg.mlflow_uri,
            "experiment": cfg.experiment,
            "parent_run_id": sweep_run.run_id,
            "optuna_storage": storage_url(sweep_dir),
            "study_name": cfg.name,
            "data_dir": str(prepared.folder),
            "started": datetime.now().isoformat(timespec="seconds"),
        }
        (sweep_dir / "sweep.json").write_text(json.dumps(meta, indent=2))
        log(f"sweep folder: {sweep_dir}")
        log(
            f"{cfg.num_trials} trials, up to {resources.concurrent} at a time, {resources.describe()}; "
            f"search {cfg.search.algorithm}, scheduler {cfg.search.scheduler.type}; space {cfg.space.describe_size()}"
        )

        ledger = Ledger()
        fixed = cfg.fixed_hyperparams
        base = TrialSpec(
            model_id=cfg.model.id,
            revision=cfg.model.revision,
            data_dir=str(prepared.folder),
            train=cfg.train,
            threads=max(1, int(resources.cpus)),
            embeddings=cfg.model.embeddings,
            template_ids=tuple(stats["template_tokens"].values()),
            max_seq_len=cfg.data.max_seq_len,
            # a fixed fraction below one GPU caps each trial to it, as auto placement caps to each share
            gpu_share=resources.gpus if resources.gpus is not None and 0 < resources.gpus < 1 else None,
        )
        trainable = tune.with_parameters(tune_trial, base=base)
        if resources.gpus is None:
            from ray.tune import PlacementGroupFactory

            cpus = resources.cpus
            trainable = tune.with_resources(trainable, lambda config: PlacementGroupFactory([{"CPU": cpus, "GPU": config["gpu_share"]}]))
        else:
            trainable = tune.with_resources(trainable, {"cpu": resources.cpus, "gpu": resources.gpus})
        trial_runs = TrialRuns(sweep_run, ledger, fixed)
        on_infeasible = InfeasibleLog(trial_runs, fixed, log)
        # oom / nan reports carry no eval_loss; the scheduler and the searcher handle that.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # Tune's own console reporter would print a banner and tables; our Progress callback says it.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        # Keeping one checkpoint per trial forces an experiment snapshot per report; that is cheap
        # here (small state) and Tune's warning about it would drown the progress lines.
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        judge = resources.placement.judge if resources.placement else None
        search = SweepSearch(cfg, storage_url(sweep_dir), ledger, judge=judge, on_infeasible=on_infeasible)
        if cfg.search.warm_start:
            from sweep import warmstart

            log(warmstart.apply(search._ot_study, cfg, Path(cfg.search.warm_start)).describe())
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=search,
                scheduler=make_scheduler(cfg, ledger),
                num_samples=cfg.num_trials,
                # Tune's concurrency limiter counts paused trials as running: with Hyperband, which
                # pauses trials until their bracket fills, it would deadlock. Resources limit it.
                max_concurrent_trials=None if cfg.search.scheduler.type == "hyperband" else resources.concurrent,
                time_budget_s=cfg.search.time_budget,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(sweep_dir),
                callbacks=[trial_runs, Progress(cfg.search.metric, cfg.search.mode, cfg.train.max_steps, ledger, fixed, log)],
                verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        t0 = time.monotonic()
        status = "FINISHED"
        try:
            tuner.fit()
        except BaseException:
            sweep_run.finish({}, None, cfg.search.metric, status="KILLED")
            raise
        search.close_open_trials({tid: t.last_result for tid, t in trial_runs.trials.items()})
        result = summarize(cfg, trial_runs, fixed)
        result.sweep_dir, result.parent_run_id = sweep_dir, sweep_run.run_id
        sweep_run.finish(result.counts, result.best, cfg.search.metric, status=status)
        log("")
        table(result.trials, cfg.search.metric, log)
        log("")
        counts = ", ".join(f"{n} {k}" for k, n in result.counts.items())
        log(f"{len(result.trials)} trials in {time.monotonic() - t0:.0f}s: {counts}")
        if result.best:
            b = result.best
            log(f"best trial: {b['label']}  {cfg.search.metric} {b[cfg.search.metric]:.4f}  ({b['summary']})")
        else:
            log("best trial: none completed")
        log(f"open the MLflow UI:  mlflow ui --backend-store-uri {cfg.mlflow_uri}")
        return result
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def summarize(cfg: SweepConfig, trial_runs: Any, fixed: dict[str, Any]) -> SweepResult:
    """One row per trial (outcome, last metrics, config), best first; the best completed trial."""
    from sweep.trials import finite, summary

    metric, sign = cfg.search.metric, (1 if cfg.search.mode == "min" else -1)
    rows = []
    for trial_id, trial in trial_runs.trials.items():
        last = trial.last_result or {}
        status, error = trial_runs.outcomes[trial_id]
        row = {
            "trial_id": trial_id,
            "label": trial_runs.ledger.label(trial_id),
            "status": status,
            "step": last.get("step"),
            "run_id": trial_runs.run_ids.get(trial_id, ""),
            "config": dict(trial.config),
            "summary": summary({**fixed, **trial.config}),
            "error": error,
        }
        for key in ("eval_loss", "train_loss", "tokens_per_sec", "peak_vram_gb", "peak_rss_gb"):
            row[key] = last.get(key)
        rows.append(row)

    def order(r: dict) -> tuple:
        v = r.get(metric)
        return (r["status"] != "completed", not finite(v), sign * v if finite(v) else 0.0, r["label"])

    for item in trial_runs.infeasible:
        rows.append({"trial_id": "", "label": item["label"], "status": "infeasible", "step": None, "run_id": item["run_id"],
                     "config": item["config"], "summary": summary({**fixed, **item["config"]}), "error": item["reason"]})  # fmt: skip
    rows.sort(key=order)
    completed = [r for r in rows if r["status"] == "completed" and finite(r.get(metric))]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return SweepResult(sweep_dir=Path(), parent_run_id="", trials=rows, best=completed[0] if completed else None, counts=counts)
