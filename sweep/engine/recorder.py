"""MLflow: one parent run per sweep (`SweepRun`, the driver's), one child run per trial (`Recorder`).

    recorder = MlflowRecorder(mlflow_uri, experiment_id, parent_run_id, fixed)   # picklable
    recorder.begin("t007", params, worker="..."); recorder.report("t007", metrics)
    recorder.end("t007", status, step, error, resumable)

The `Recorder` is the one writer of a trial's run, wherever the trial's news is: a worker begins,
reports and ends its members; the driver ends or retries the members of a worker that died, and
records infeasible proposals of the driver's own asking. A trial is found by its label (the Optuna
trial number), so a trial resumed after a crash, shed by an OOM or retried after its worker died
continues its one child run: a sweep ends with exactly one child run per trial.

Names (the contract, core/contract.py): params = every sampled value plus derived ones; metrics by
step = train_loss, eval_loss, lr (the scheduled learning rate), tokens_per_sec, peak_vram_gb (or
peak_rss_gb on CPU); final = train_seconds, load_seconds; tag trial_status (+ error).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from core.contract import (
    ERROR,
    ESTIMATED_VRAM_GB,
    FINAL_METRICS,
    HISTORY,
    LEARNING_RATE,
    STATUS,
    STEP,
    STEP_METRICS,
    TAG_PARENT,
    TAG_TRIAL,
    TRAIN_LOSS,
    TrialStatus,
    finite,
    param_value,
    summary,
)
from sweep.folder import RUN_COLORS

MAX_TAG = 5000  # characters of an error kept in a tag
# A trial's run ends FINISHED only when it completed (MLflow's green tick); pruned or stopped early,
# KILLED (ended before its end, no error); otherwise FAILED. trial_status says which exactly.
RUN_STATUS = {TrialStatus.COMPLETED: "FINISHED", TrialStatus.PRUNED: "KILLED", TrialStatus.STOPPED: "KILLED"}
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3 opens the experiment on model training, not GenAI
TAG_COLOR = "mlflow.runColor"  # a run's colour in MLflow's table and charts


def run_status(status: str) -> str:
    """The MLflow run status a trial ends with (RUN_STATUS)."""
    return RUN_STATUS.get(status, "FAILED")


class Recorder(Protocol):
    """Where a trial's run is written (MLflow in a sweep; a list in tests)."""

    def begin(self, label: str, params: dict[str, Any], worker: str, attempt: int = 1) -> None:
        """The trial starts or continues on `worker`: its run is (re)opened, `params` logged once."""

    def report(self, label: str, metrics: dict[str, Any]) -> None:
        """An evaluation (core.contract names), with the train-loss history since the last one."""

    def end(self, label: str, status: TrialStatus, step: int, error: str | None = None, resumable: bool = False) -> None:
        """The trial's end: trial_status, its last step, the error; `resumable` (a stop): KILLED, not FINISHED."""

    def retrying(self, label: str, attempt: int, error: str) -> None:
        """Its worker died; it runs again from its last checkpoint as attempt `attempt`."""

    def waiting(self, label: str, why: str) -> None:
        """It left its worker (an OOM shed it) and waits for another, from its last checkpoint."""

    def infeasible(self, label: str, hyper: dict[str, Any], estimate_gb: float, reason: str) -> None:
        """A proposal the memory estimate refused: a run that says so; it never trains."""


def git_commit() -> str:
    """The commit of the lora-sweep checkout running this sweep ('+dirty' with local changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:  # an installed copy, e.g. in the docker images (built with GIT_COMMIT)
            return os.environ.get("LORA_SWEEP_GIT_COMMIT", "unknown")
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("LORA_SWEEP_GIT_COMMIT", "unknown")


def color_of(label: str) -> str:
    """A trial's colour while the sweep runs, by its number (at the end the best get distinct ones)."""
    digits = label.lstrip("t")
    return RUN_COLORS[int(digits) % len(RUN_COLORS) if digits.isdigit() else 0]


def child_runs(client: Any, experiment_id: str, parent_run_id: str, label: str | None = None) -> list[Any]:
    """The MLflow child runs of a sweep's parent run; with `label` (t007), that trial's only."""
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'" + (f" and tags.trial = '{label}'" if label else "")
    return client.search_runs([experiment_id], filter_string=where, max_results=1 if label else 50000)


def log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


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


class MlflowRecorder:
    """The trials' child runs under the sweep's parent run; opens its client where it is used."""

    def __init__(self, mlflow_uri: str, experiment_id: str, parent_run_id: str, fixed: dict[str, Any], extra_metrics: tuple[str, ...] = ()):
        self.uri, self.experiment_id, self.parent_run_id = mlflow_uri, experiment_id, parent_run_id
        self.fixed = fixed  # the hyperparameters not searched: a run's name shows them too
        self.extra_metrics = extra_metrics  # logged by step beside core.contract's
        self._client: Any = None
        self._runs: dict[str, str] = {}  # label -> run id, for the trials this process began
        self._logged: dict[str, dict[str, set[int]]] = {}  # run id -> metric -> steps already in MLflow

    def __getstate__(self) -> dict:
        """Pickled to the workers: never the client (its URI may hold a password in memory only)."""
        return {**self.__dict__, "_client": None, "_runs": {}, "_logged": {}}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def run_of(self, label: str) -> str | None:
        """The trial's run: begun here, or found by its label (begun by another worker, or before a
        crash); None when it never began."""
        if label in self._runs:
            return self._runs[label]
        runs = child_runs(self.client, self.experiment_id, self.parent_run_id, label)
        return runs[0].info.run_id if runs else None

    def begin(self, label: str, params: dict[str, Any], worker: str, attempt: int = 1) -> None:
        client = self.client
        run_id = self.run_of(label)
        if run_id is not None:  # continued (resumed, retried, or shed and taken again): the same child run
            run = client.get_run(run_id)
            have = set(run.data.params)
            client.update_run(run_id, status="RUNNING")
            self._logged[run_id] = {
                name: {m.step for m in client.get_metric_history(run_id, name)} for name in (TRAIN_LOSS, LEARNING_RATE, *STEP_METRICS, *self.extra_metrics)
            }
        else:
            name = f"{label} {summary({**self.fixed, **params})}"  # summary reads the hyperparameters among the params
            tags = {TAG_PARENT: self.parent_run_id, TAG_TRIAL: label, TAG_COLOR: color_of(label)}
            run_id = client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
            have = set()
        self._runs[label] = run_id
        client.set_tag(run_id, STATUS, TrialStatus.RUNNING)
        client.set_tag(run_id, "trial_id", worker)
        if attempt > 1:
            client.set_tag(run_id, "retries", str(attempt - 1))
        log_params(client, run_id, {k: param_value(v) for k, v in params.items() if k not in have})

    def report(self, label: str, metrics: dict[str, Any]) -> None:
        run_id = self.run_of(label)
        if run_id is not None:
            log_report(self.client, run_id, self._logged.setdefault(run_id, {}), metrics, extra=self.extra_metrics)

    def end(self, label: str, status: TrialStatus, step: int, error: str | None = None, resumable: bool = False) -> None:
        run_id = self._runs.pop(label, None) or self.run_of(label)
        if run_id is None:
            return  # it never began (it waited in the queue): nothing to close
        client = self.client
        client.set_tag(run_id, STATUS, str(status))
        client.set_tag(run_id, "last_step", str(int(step)))
        if status == TrialStatus.PRUNED:
            client.set_tag(run_id, "stopped_at_step", str(int(step)))
        if error:
            client.set_tag(run_id, ERROR, str(error)[-MAX_TAG:])
        client.set_terminated(run_id, "KILLED" if resumable else run_status(status))

    def retrying(self, label: str, attempt: int, error: str) -> None:
        run_id = self.run_of(label)
        if run_id:
            self.client.set_tag(run_id, STATUS, TrialStatus.RETRYING)
            self.client.set_tag(run_id, "retries", str(attempt - 1))
            self.client.set_tag(run_id, ERROR, f"attempt {attempt - 1}: {error}"[-MAX_TAG:])

    def waiting(self, label: str, why: str) -> None:
        run_id = self._runs.pop(label, None) or self.run_of(label)
        if run_id:
            self.client.set_tag(run_id, STATUS, TrialStatus.RUNNING)
            self.client.set_tag(run_id, "shed", why)

    def infeasible(self, label: str, hyper: dict[str, Any], estimate_gb: float, reason: str) -> None:
        from mlflow.entities import Metric

        client = self.client
        run = client.create_run(
            self.experiment_id,
            run_name=f"{label} {summary({**self.fixed, **hyper})}",
            tags={TAG_PARENT: self.parent_run_id, TAG_TRIAL: label, STATUS: TrialStatus.INFEASIBLE, ERROR: reason, TAG_COLOR: color_of(label)},
        )
        log_params(client, run.info.run_id, {k: param_value(v) for k, v in hyper.items()})
        client.log_batch(run.info.run_id, metrics=[Metric(ESTIMATED_VRAM_GB, estimate_gb, int(time.time() * 1000), 0)])
        client.set_terminated(run.info.run_id, "FAILED")


def experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    """The id of the MLflow experiment `name`, made if new (`artifacts`: where its artifacts go; a
    sqlite store keeps them beside the database instead of ./mlruns). Two sweeps of one name that
    start at once on one tracking server both find no experiment: the second one's create is
    refused (RESOURCE_ALREADY_EXISTS), and it takes the one the first made."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifacts, tags=dict([EXPERIMENT_KIND]))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:  # refused for another reason: that one is the error to show
                raise
    if EXPERIMENT_KIND[0] not in experiment.tags:  # one made by hand or an earlier version; a kind set on purpose stays
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


class SweepRun:
    """The sweep's parent run (the driver's)."""

    def __init__(self, cfg: Any, sweep_dir: Path, mlflow_uri: str):
        from mlflow import MlflowClient

        from sweep.config.secrets import redact

        self.uri = mlflow_uri
        self.client = MlflowClient(tracking_uri=mlflow_uri)
        self.experiment_id = experiment_id(self.client, cfg.experiment, (cfg.results_dir / "mlartifacts").as_uri() if mlflow_uri.startswith("sqlite:") else None)
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
        log_params(self.client, self.run_id, params)
        self.client.log_text(self.run_id, redact(cfg.source_text), "space.yaml")
        self.show(cfg)

    def show(self, cfg: Any) -> None:
        """How MLflow's UI shows this sweep: the runs table of its trials, best first, with the
        objectives, trial_status and the searched hyperparameters as columns, kept as an experiment
        tag that sweep.folder.RunsView's link opens (sweep.folder.runs_view_state says what and why)."""
        import json

        from sweep.folder import VIEW_TAG, RunsView, runs_view_state

        view = RunsView(self.run_id, cfg.search.metric, cfg.search.mode == "min", shared=True)
        metrics = [m for m, _ in cfg.objectives] if cfg.multi_objective else [cfg.search.metric]
        self.client.set_experiment_tag(self.experiment_id, VIEW_TAG + self.run_id, json.dumps(runs_view_state(view, metrics, list(cfg.space.names))))

    @classmethod
    def attach(cls, mlflow_uri: str, run_id: str) -> "SweepRun":
        """The parent run of an existing sweep (resume): reopened, nothing logged twice."""
        from mlflow import MlflowClient

        self = cls.__new__(cls)
        self.uri = mlflow_uri
        self.client = MlflowClient(tracking_uri=mlflow_uri)
        run = self.client.get_run(run_id)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        return self

    def recorder(self, fixed: dict[str, Any], extra_metrics: tuple[str, ...] = ()) -> MlflowRecorder:
        """The trials' recorder under this parent run."""
        return MlflowRecorder(self.uri, self.experiment_id, self.run_id, fixed, extra_metrics)

    def children(self) -> list[Any]:
        return child_runs(self.client, self.experiment_id, self.run_id)

    def close_ended(self, study: Any) -> list[str]:
        """Child runs still RUNNING whose trial the study has ended: a driver or worker killed between
        telling the study a trial's end and recording it here. Each is closed as the study says, with
        its last step; their metrics were logged at each report. Returns their labels. For `resume`,
        before anything runs."""
        from core.contract import ATTR_WORKER, trial_label

        ended = {trial_label(t.number): t for t in study.trials if ATTR_WORKER in t.user_attrs and t.state.name in ("COMPLETE", "PRUNED", "FAIL")}
        closed = []
        for run in self.children():
            trial = ended.get(run.data.tags.get(TAG_TRIAL, ""))
            if run.info.status != "RUNNING" or trial is None:
                continue
            status = trial.user_attrs.get(STATUS) or {"COMPLETE": TrialStatus.COMPLETED, "PRUNED": TrialStatus.PRUNED}.get(trial.state.name, TrialStatus.FAILED)
            self.client.set_tag(run.info.run_id, STATUS, str(status))
            if trial.intermediate_values:
                self.client.set_tag(run.info.run_id, "last_step", str(max(trial.intermediate_values)))
            self.client.set_terminated(run.info.run_id, run_status(status))
            closed.append(run.data.tags[TAG_TRIAL])
        return sorted(closed)

    def close_running(self) -> list[str]:
        """Child runs still RUNNING after the trials' workers ended with their Ray (they could not
        record their stop): stopped and resumable (KILLED), as a stop leaves them. Their labels."""
        closed = []
        for run in self.children():
            if run.info.status == "RUNNING":
                self.client.set_tag(run.info.run_id, STATUS, str(TrialStatus.STOPPED))
                self.client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.data.tags.get(TAG_TRIAL, run.info.run_id))
        return sorted(closed)

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

    def color_by_rank(self, ranked: list[dict[str, Any]]) -> None:
        """The trials' colours by rank (`ranked`: rows best first, with run_id): the best ones
        distinct from each other, whatever their numbers."""
        for row, color in zip(ranked, RUN_COLORS):
            if row.get("run_id"):
                self.client.set_tag(row["run_id"], TAG_COLOR, color)
