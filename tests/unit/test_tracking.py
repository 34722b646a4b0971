"""The MLflow record of a sweep (sweep.engine.recorder: the parent run, one child run per trial) and
the retry policy (sweep.engine.workers.should_retry), against a sqlite MLflow store in tmp_path: no Ray."""

from __future__ import annotations

import pickle

import pytest

from core.contract import TrialStatus
from sweep.config import load_config
from sweep.engine.recorder import MlflowRecorder, SweepRun
from sweep.engine.workers import should_retry
from tests.conftest import MINIMAL, write_space


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    folder = tmp_path_factory.mktemp("tracking")
    cfg = load_config(write_space(folder, MINIMAL + f"tracking: {{mlflow_uri: 'sqlite:///{folder}/mlflow.db', results_dir: {folder}}}\n"))
    (folder / "t-1").mkdir()
    return SweepRun(cfg, folder / "t-1", cfg.mlflow_uri)


def runs_of(sweep: SweepRun) -> dict:
    return {r.data.tags["trial"]: r for r in sweep.children()}


def test_a_trial_is_one_child_run_with_its_metrics_by_step(sweep: SweepRun) -> None:
    recorder = pickle.loads(pickle.dumps(sweep.recorder({"lora_r": 16})))  # as a worker receives it
    recorder.begin("t000", {"lora_r": 4, "estimated_vram_gb": 12.0, "trainable_params": 123}, worker="w0")
    report = {"step": 2, "eval_loss": 2.5, "tokens_per_sec": 100.0, "history": [[1, 3.0, 1e-4], [2, 2.8, 1e-4]]}
    recorder.report("t000", report)
    recorder.report("t000", report)  # sent again: logged once
    recorder.report("t000", {"step": 4, "trial_status": "completed", "eval_loss": 2.0, "train_seconds": 3.0})
    recorder.end("t000", TrialStatus.COMPLETED, 4)

    run = runs_of(sweep)["t000"]
    assert run.info.run_name == "t000 r4"  # the trial's values, not the fixed lora_r 16
    assert run.data.tags["trial_status"] == "completed" and run.data.tags["last_step"] == "4" and run.info.status == "FINISHED"
    assert run.data.tags["trial_id"] == "w0"
    assert run.data.params == {"lora_r": "4", "estimated_vram_gb": "12", "trainable_params": "123"}
    history = sweep.client.get_metric_history(run.info.run_id, "eval_loss")
    assert [(m.step, m.value) for m in history] == [(2, 2.5), (4, 2.0)]
    assert [m.step for m in sweep.client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    # the scheduled learning rate is the metric `lr`: `learning_rate` is the param (the peak), and a
    # metric of that name would show its last scheduled value in the runs table instead
    assert [(m.step, m.value) for m in sweep.client.get_metric_history(run.info.run_id, "lr")] == [(1, 1e-4), (2, 1e-4)]
    assert "learning_rate" not in run.data.metrics

    # the same trial continued by another worker (a resume, a retry): its one child run goes on
    again = sweep.recorder({"lora_r": 16})
    again.begin("t000", {"lora_r": 4, "trainable_params": 123}, worker="w1", attempt=2)
    again.report("t000", report)
    assert len([r for r in sweep.children() if r.data.tags["trial"] == "t000"]) == 1
    assert len(sweep.client.get_metric_history(run.info.run_id, "eval_loss")) == 2
    run = runs_of(sweep)["t000"]
    assert run.data.tags["trial_id"] == "w1" and run.data.tags["retries"] == "1" and run.info.status == "RUNNING"


def test_ends_stops_retries_and_infeasible_proposals(sweep: SweepRun) -> None:
    recorder = sweep.recorder({})
    for label in ("t001", "t002", "t003", "t004"):
        recorder.begin(label, {"lora_r": 8}, worker="w0")
    recorder.end("t001", TrialStatus.STOPPED, 2)  # the time budget
    recorder.end("t002", TrialStatus.STOPPED, 2, resumable=True)  # `stop`, Ctrl-C: resume continues it
    recorder.end("t003", TrialStatus.PRUNED, 2)
    recorder.retrying("t004", 2, "its worker w0 died; retrying from step-000002")
    recorder.end("t005", TrialStatus.FAILED, 0, "never began")  # queued, never began: no run to close
    recorder.infeasible("t006", {"lora_r": 64}, 99.5, "needs 99.5 GB; one GPU has 80")
    by_label = runs_of(sweep)
    # MLflow's green tick (FINISHED) for completed trials only: stopped or pruned early, KILLED
    assert (by_label["t001"].data.tags["trial_status"], by_label["t001"].info.status) == ("stopped", "KILLED")
    assert (by_label["t002"].data.tags["trial_status"], by_label["t002"].info.status) == ("stopped", "KILLED")
    assert (by_label["t003"].data.tags["stopped_at_step"], by_label["t003"].info.status) == ("2", "KILLED")
    assert by_label["t004"].data.tags["trial_status"] == "retrying" and by_label["t004"].data.tags["retries"] == "1"
    assert by_label["t004"].data.tags["error"] == "attempt 1: its worker w0 died; retrying from step-000002"
    assert "t005" not in by_label
    infeasible = by_label["t006"]
    assert (infeasible.data.tags["trial_status"], infeasible.info.status, infeasible.data.metrics["estimated_vram_gb"]) == ("infeasible", "FAILED", 99.5)


def test_retry_policy() -> None:
    assert should_retry("ray.exceptions.ActorDiedError: The actor died unexpectedly", 1, 1)
    assert should_retry("The node with node id: abc and address: 10.0.0.2 and node name: w2 has been marked dead because the detector has missed too many heartbeats from it. node 10.0.0.2 died", 2, 2)
    assert not should_retry("ray.exceptions.ActorDiedError", 2, 1)  # no retries left
    assert not should_retry("ValueError: bad config", 1, 3)  # the trial's own error


def test_resume_closes_runs_the_study_ended_before_the_driver_was_killed(sweep: SweepRun) -> None:
    """kill -9 after the study heard of a trial's end, before its run did: the study says COMPLETE /
    PRUNED, the child run still RUNNING. close_ended brings the run in line; runs of trials still
    open in the study (a resumable stop) are left alone."""
    import optuna

    recorder = sweep.recorder({"lora_r": 16})
    for label in ("t010", "t011", "t012"):
        recorder.begin(label, {"lora_r": 4}, worker="k")
        recorder.report(label, {"step": 2, "eval_loss": 2.5})
    study = optuna.create_study()
    dist = {"lora_r": optuna.distributions.CategoricalDistribution([4, 8])}
    for number in range(10):
        study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, value=9.0))
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, value=2.0, intermediate_values={2: 2.5, 4: 2.0},
                                              user_attrs={"ray_trial_id": "k1", "trial_status": "completed"}))  # fmt: skip
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, state=optuna.trial.TrialState.PRUNED, intermediate_values={2: 2.5},
                                              user_attrs={"ray_trial_id": "k2"}))  # fmt: skip
    study.add_trial(optuna.trial.create_trial(params={"lora_r": 4}, distributions=dist, state=optuna.trial.TrialState.RUNNING, user_attrs={"ray_trial_id": "k3"}))
    assert sweep.close_ended(study) == ["t010", "t011"]
    state = {r.data.tags["trial"]: (r.info.status, r.data.tags["trial_status"], r.data.tags.get("last_step")) for r in sweep.children() if r.data.tags["trial"] in ("t010", "t011", "t012")}
    assert state == {"t010": ("FINISHED", "completed", "4"), "t011": ("KILLED", "pruned", "2"), "t012": ("RUNNING", "running", None)}
    assert sweep.close_ended(study) == []  # once


def test_the_recorder_travels_without_its_client(sweep: SweepRun) -> None:
    recorder = sweep.recorder({})
    recorder.begin("t020", {"lora_r": 4}, worker="w0")
    state = pickle.loads(pickle.dumps(recorder)).__dict__
    assert state["_client"] is None and state["_runs"] == {} and state["uri"] == sweep.uri
    assert isinstance(recorder, MlflowRecorder)


def test_the_experiment_opens_on_the_sweeps_runs_table(sweep: SweepRun) -> None:
    """MLflow's UI: the experiment is one of model training (not GenAI), and holds this sweep's view
    (sorted by the objective, its trials only, the objective, trial_status and the searched
    hyperparameters as columns) under the key the printed link names; each trial its own colour,
    the best ones distinct from each other at the end."""
    import json

    from sweep.folder import RUN_COLORS, RunsView, mlflow_links

    experiment = sweep.client.get_experiment(sweep.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{sweep.run_id}"])
    assert view["searchFilter"] == f"tags.mlflow.parentRunId = '{sweep.run_id}'"
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`eval_loss`", True)
    assert view["selectedColumns"] == ["metrics.`eval_loss`", "tags.`trial_status`", "params.`lora_r`"]  # MINIMAL searches lora_r
    assert set(view["columnWidths"]) <= set(view["columnOrder"])  # the UI sizes the ordered columns only
    links = mlflow_links(sweep.uri, sweep.experiment_id, RunsView(sweep.run_id, "eval_loss", True, shared=True))
    assert links["runs"].endswith(f"/#/experiments/{sweep.experiment_id}/runs?workflowType=machine_learning&viewStateShareKey={sweep.run_id}")

    recorder = sweep.recorder({})
    for label in ("t030", "t050"):  # 20 apart: the same colour by number while they run ...
        recorder.begin(label, {"lora_r": 4}, worker="w0")
    runs = runs_of(sweep)
    assert runs["t030"].data.tags["mlflow.runColor"] == runs["t050"].data.tags["mlflow.runColor"] == RUN_COLORS[10]
    sweep.color_by_rank([{"run_id": runs["t050"].info.run_id}, {"run_id": runs["t030"].info.run_id}])  # ... distinct by rank at the end
    runs = runs_of(sweep)
    assert (runs["t050"].data.tags["mlflow.runColor"], runs["t030"].data.tags["mlflow.runColor"]) == RUN_COLORS[:2]


def test_two_sweeps_of_one_name_starting_at_once_share_the_experiment_the_first_made(tmp_path) -> None:
    """Both find no experiment; the second one's create is refused as the first's exists by then."""
    from mlflow import MlflowClient

    from sweep.engine.recorder import experiment_id

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")

    class Late:
        """The client of the second sweep: its look-up came before the first sweep's create."""

        def __init__(self) -> None:
            self.looked = 0

        def get_experiment_by_name(self, name: str):
            self.looked += 1
            return None if self.looked == 1 else client.get_experiment_by_name(name)

        def create_experiment(self, name: str, artifact_location=None, tags=None) -> str:
            return client.create_experiment(name, artifact_location=artifact_location, tags=tags)

    first = experiment_id(client, "same", None)
    assert experiment_id(Late(), "same", None) == first
