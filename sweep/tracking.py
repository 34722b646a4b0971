"""MLflow: one parent run per sweep, one child run per trial, written from the driver only.

Trials report to Ray Tune; a Tune callback in the driver turns those reports into MLflow calls.
One writer means an embedded sqlite store never sees concurrent writers, and the driver is the
one place that knows whether the scheduler stopped a trial (pruned) or it finished.

Names (the contract, core/contract.py): params = every sampled value plus derived ones; metrics by
step = train_loss, eval_loss, lr (the scheduled learning rate), tokens_per_sec, peak_vram_gb (or peak_rss_gb on CPU);
final = train_seconds, load_seconds; tag trial_status (+ error).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from core.contract import (
    ERROR,
    ESTIMATED_VRAM_GB,
    FINAL_METRICS,
    HISTORY,
    LEARNING_RATE,
    STATUS,
    STEP,
    STEP_METRICS,
    TRAIN_LOSS,
    TrialStatus,
)
from core.request import TrialRequest
from sweep.config import SweepConfig
from sweep.secrets import redact
from sweep.sweepdir import child_runs
from sweep.trials import NO_ERROR_TEXT, Ledger, error_text, finite, missing_objectives, outcome, param_value, summary

MAX_TAG = 5000


def git_commit() -> str:
    """The commit of the lora-sweep checkout running this sweep ('+dirty' with local changes)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:  # an installed copy, e.g. in the docker images (built with GIT_COMMIT)
            return os.environ.get("LORA_SWEEP_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORA_SWEEP_GIT_COMMIT", "unknown")


class SweepRun:
    """The sweep's parent run."""

    @classmethod
    def attach(cls, cfg: SweepConfig, run_id: str) -> "SweepRun":
        """The parent run of an existing sweep (resume): reopened, nothing logged twice."""
        from mlflow import MlflowClient

        self = cls.__new__(cls)
        self.client = MlflowClient(tracking_uri=cfg.mlflow_uri)
        run = self.client.get_run(run_id)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        return self

    def __getstate__(self) -> dict:
        """Tune pickles its callbacks into tuner.pkl: never the client (its URI may hold a password)."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id}

    def children(self) -> list[Any]:
        return child_runs(self.client, self.experiment_id, self.run_id)

    def close_ended(self, study: Any) -> list[str]:
        """Child runs still RUNNING whose trial the study has ended: a driver killed between telling
        the study a trial's end and recording it here (the searcher hears of it first). Each is
        closed as the study says, with its last step; their metrics were logged at each report.
        Returns their labels. For `resume`, before anything runs."""
        ended = {f"t{t.number:03d}": t for t in study.trials if "ray_trial_id" in t.user_attrs and t.state.name in ("COMPLETE", "PRUNED", "FAIL")}
        closed = []
        for run in self.children():
            trial = ended.get(run.data.tags.get("trial", ""))
            if run.info.status != "RUNNING" or trial is None:
                continue
            status = trial.user_attrs.get(STATUS) or {"COMPLETE": TrialStatus.COMPLETED, "PRUNED": TrialStatus.PRUNED}.get(trial.state.name, TrialStatus.FAILED)
            self.client.set_tag(run.info.run_id, STATUS, str(status))
            if trial.intermediate_values:
                self.client.set_tag(run.info.run_id, "last_step", str(max(trial.intermediate_values)))
            finished = (TrialStatus.COMPLETED, TrialStatus.PRUNED, TrialStatus.STOPPED)
            self.client.set_terminated(run.info.run_id, "FINISHED" if status in finished else "FAILED")
            closed.append(run.data.tags["trial"])
        return sorted(closed)

    def __init__(self, cfg: SweepConfig, sweep_dir: Path):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=cfg.mlflow_uri)
        experiment = self.client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            artifacts = None
            if cfg.mlflow_uri.startswith("sqlite:"):
                # Without a server, keep artifacts beside the database instead of ./mlruns.
                artifacts = (cfg.results_dir / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=artifacts)
        else:
            self.experiment_id = experiment.experiment_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=sweep_dir.name,
            tags={"sweep_dir": str(sweep_dir), "kind": "sweep", "mlflow.note.content": f"lora-sweep {cfg.name}: {cfg.source}"},
        )
        self.run_id = run.info.run_id
        params = {
            "sweep_name": cfg.name,
            "space_file": str(cfg.source),
            "space_sha256": cfg.sha256,
            "git_commit": git_commit(),
            "overrides": redact(" ".join(cfg.overrides)) or "-",
            "model": cfg.model.id,
            "chat_template_from": cfg.model.chat_template_from or "-",
            "data_train": cfg.data.train,
            "data_eval": cfg.data.eval or f"{cfg.data.eval_fraction} of train",
            "max_seq_len": cfg.data.max_seq_len,
            "packing": cfg.data.packing,
            "algorithm": cfg.search.algorithm,
            "algorithm_reason": cfg.algorithm_reason[:490],  # MLflow params hold 500 characters at most here
            "metric": cfg.search.metric,
            "mode": cfg.search.mode,
            "num_trials": cfg.num_trials,
            "scheduler": cfg.search.scheduler.type,
            "max_steps": cfg.train.max_steps,
            "searched": ",".join(cfg.space.names),
            **{f"fixed.{k}": param_value(v) for k, v in cfg.fixed_hyperparams.items()},
        }
        self.log_params(self.run_id, params)
        self.client.log_text(self.run_id, redact(cfg.source_text), "space.yaml")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def finish(self, counts: dict[str, int], best: dict[str, Any] | None, metric: str, status: str = "FINISHED", pareto: list[dict] | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"trials_{k}", v, now, 0) for k, v in counts.items()]
        if best is not None:
            metrics.append(Metric(f"best_{metric}", best[metric], now, 0))
            self.client.set_tag(self.run_id, "best_trial", best["label"])
            self.client.set_tag(self.run_id, "best_run_id", best.get("run_id", ""))
        if pareto:
            self.client.set_tag(self.run_id, "pareto_trials", ",".join(r["label"] for r in pareto))
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.client.set_terminated(self.run_id, status)


def log_report(client: Any, run_id: str, logged: dict[str, set[int]], result: dict[str, Any], extra: tuple[str, ...] = ()) -> None:
    """One trial report into its MLflow run: the train-loss history, replayed evals, and this
    report's metrics (plus `extra` names) at its step. Each (metric, step) once (`logged` remembers
    them), also when a resumed trial re-sends what it logged before."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = []

    def add(name: str, value: Any, at: int) -> None:
        if finite(value) and at not in logged.setdefault(name, set()):
            logged[name].add(at)
            metrics.append(Metric(name, float(value), now, at))

    for h_step, loss, lr in result.get(HISTORY) or []:
        add(TRAIN_LOSS, loss, int(h_step))
        add(LEARNING_RATE, lr, int(h_step))
    for record in result.get("evals_replay") or []:
        for key in STEP_METRICS:
            add(key, record.get(key), int(record[STEP]))
    step = int(result.get(STEP, 0))
    for key in (*STEP_METRICS, *FINAL_METRICS, *extra):
        add(key, result.get(key), step)
    for i in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[i : i + 500])


class TrialRuns(Callback):
    """Tune callback: a child run per trial, metrics by step, trial_status on the way out.

    A trial is identified by its label (the Optuna trial number): a trial resumed after a crash,
    or retried after its worker died, continues its child run instead of opening another, so a
    sweep ends with exactly one child run per trial. Whether a trial that errored runs again is
    decided before this callback hears of it (sweep.retries, in the Ledger): here it is recorded.
    """

    def __init__(self, sweep: SweepRun, ledger: Ledger, fixed: dict[str, Any], stop: Any = None, objectives: tuple[str, ...] = ()):
        self.objectives = objectives
        self.sweep = sweep
        self.client = sweep.client
        self.ledger = ledger
        self.fixed = fixed
        self.stop = stop  # the sweep's sweepdir.StopFile: a trial it stopped stays resumable
        self.run_ids: dict[str, str] = {}  # Ray trial id -> MLflow run id
        self.trials: dict[str, Any] = {}  # Ray trial id -> Tune Trial (config, last_result)
        self.outcomes: dict[str, tuple[str, str | None]] = {}  # Ray trial id -> (status, error)
        self.infeasible: list[dict[str, Any]] = []  # configs refused before launch
        self.awaiting_retry: dict[str, str] = {}  # trial label -> MLflow run id of a retry not yet started
        self._logged_derived: set[str] = set()
        self._logged: dict[str, dict[str, set[int]]] = {}  # run id -> metric -> steps already in MLflow

    def __getstate__(self) -> dict:
        """Pickled by Tune into tuner.pkl, which lora-sweep never restores: nothing that connects."""
        return {k: v for k, v in self.__dict__.items() if k not in ("sweep", "client", "trials")}

    def record_infeasible(self, label: str, config: dict, verdict: Any) -> None:
        """A config the placement check refused: a child run that says so, and no GPU time spent."""
        from mlflow.entities import Metric

        run = self.client.create_run(
            self.sweep.experiment_id,
            run_name=f"{label} {summary({**self.fixed, **config})}",
            tags={"mlflow.parentRunId": self.sweep.run_id, "trial": label, STATUS: TrialStatus.INFEASIBLE, ERROR: verdict.reason},
        )
        self.sweep.log_params(run.info.run_id, {k: param_value(v) for k, v in config.items()})
        self.client.log_batch(run.info.run_id, metrics=[Metric(ESTIMATED_VRAM_GB, verdict.estimate_gb, int(time.time() * 1000), 0)])
        self.client.set_terminated(run.info.run_id, "FAILED")
        self.infeasible.append({"label": label, "config": dict(config), "reason": verdict.reason, "run_id": run.info.run_id})

    def _existing_run(self, label: str) -> Any:
        runs = child_runs(self.client, self.sweep.experiment_id, self.sweep.run_id, label)
        return runs[0] if runs else None

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials[trial.trial_id] = trial
        if trial.trial_id in self.run_ids:
            return
        label = self.ledger.label(trial.trial_id)
        self.awaiting_retry.pop(label, None)
        config = TrialRequest.from_config(trial.config).params()
        existing = self._existing_run(label)
        if existing is not None:  # resumed or retried: carry on in the same child run
            run_id, have = existing.info.run_id, set(existing.data.params)
            self.client.update_run(run_id, status="RUNNING")
            self._logged[run_id] = {
                name: {m.step for m in self.client.get_metric_history(run_id, name)} for name in (TRAIN_LOSS, LEARNING_RATE, *STEP_METRICS)
            }
        else:
            name = f"{label} {summary({**self.fixed, **config})}"
            run_id, have = self.client.create_run(self.sweep.experiment_id, run_name=name, tags={"mlflow.parentRunId": self.sweep.run_id, "trial": label}).info.run_id, set()
        self.client.set_tag(run_id, STATUS, TrialStatus.RUNNING)
        self.client.set_tag(run_id, "trial_id", trial.trial_id)
        self.run_ids[trial.trial_id] = run_id
        self.sweep.log_params(run_id, {k: param_value(v) for k, v in config.items() if k not in have})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        log_report(self.client, run_id, self._logged.setdefault(run_id, {}), result)
        derived = result.get("derived")
        if derived and trial.trial_id not in self._logged_derived:
            self._logged_derived.add(trial.trial_id)
            have = set(self.client.get_run(run_id).data.params)
            self.sweep.log_params(run_id, {k: param_value(v) for k, v in derived.items() if k not in have})

    def _stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        status = outcome(trial.last_result, False, self.ledger.pruned(trial.trial_id), self.objectives)
        if status == TrialStatus.STOPPED and self._stop_requested():
            self._close(trial, TrialStatus.STOPPED, None, run_status="KILLED")  # resumable
            return
        error = (trial.last_result or {}).get(ERROR) or (missing_objectives(trial.last_result, self.objectives) if status == TrialStatus.FAILED else None)
        self._close(trial, status, error)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = error_text(trial) or NO_ERROR_TEXT
        next_attempt = self.ledger.retrying.get(trial.trial_id)
        if next_attempt is not None:  # its worker died and it runs again (sweep.retries decided)
            self.outcomes[trial.trial_id] = (TrialStatus.RETRYING, error)
            run_id = self.run_ids.pop(trial.trial_id, None)
            if run_id:
                checkpoint = getattr(trial.checkpoint, "path", None) if trial.checkpoint else None
                self.client.set_tag(run_id, STATUS, TrialStatus.RETRYING)
                self.client.set_tag(run_id, "retries", str(next_attempt - 1))
                self.client.set_tag(run_id, ERROR, f"attempt {next_attempt - 1}: worker died; retrying from {'its last checkpoint' if checkpoint else 'the start'}")
                self.awaiting_retry[self.ledger.label(trial.trial_id)] = run_id
            return
        self._close(trial, TrialStatus.FAILED, error)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Tune ends trials still running at the time budget without on_trial_complete: close them.
        A retry that never started (a stop or the time budget came first) leaves its run KILLED with
        status stopped, as a stopped trial: its study trial stays open and `resume` continues it."""
        for run_id in self.awaiting_retry.values():
            self.client.set_tag(run_id, STATUS, TrialStatus.STOPPED)
            self.client.set_terminated(run_id, "KILLED")
        self.awaiting_retry.clear()
        for trial in trials:
            if trial.trial_id in self.run_ids and trial.trial_id not in self.outcomes:
                status = outcome(trial.last_result, False, self.ledger.pruned(trial.trial_id), self.objectives)
                if status == TrialStatus.STOPPED and self._stop_requested():
                    self._close(trial, TrialStatus.STOPPED, None, run_status="KILLED")
                else:
                    self._close(trial, status, None)

    def _close(self, trial: Any, status: str, error: str | None, run_status: str | None = None) -> None:
        self.outcomes[trial.trial_id] = (status, error)
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        self.client.set_tag(run_id, STATUS, status)
        step = (trial.last_result or {}).get(STEP)
        if step is not None:
            self.client.set_tag(run_id, "last_step", str(int(step)))
        if status == TrialStatus.PRUNED:
            self.client.set_tag(run_id, "stopped_at_step", str((trial.last_result or {}).get(STEP, "")))
        if error:
            self.client.set_tag(run_id, ERROR, str(error)[-MAX_TAG:])
        finished = (TrialStatus.COMPLETED, TrialStatus.PRUNED, TrialStatus.STOPPED)
        self.client.set_terminated(run_id, run_status or ("FINISHED" if status in finished else "FAILED"))
