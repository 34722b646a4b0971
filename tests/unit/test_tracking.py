"""The MLflow record of a sweep (sweep.tracking) and the retry policy (sweep.retries), driven by
stand-in Tune trials against a sqlite MLflow store in tmp_path: no Ray."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from sweep.config import load_config
from sweep.retries import Retries, should_retry
from sweep.folder import StopFile
from sweep.tracking import SweepRun, TrialRuns
from sweep.trials import Ledger
from tests.conftest import MINIMAL, write_space


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    folder = tmp_path_factory.mktemp("tracking")
    cfg = load_config(write_space(folder, MINIMAL + f"tracking: {{mlflow_uri: 'sqlite:///{folder}/mlflow.db', results_dir: {folder}}}\n"))
    (folder / "t-1").mkdir()
    return SweepRun(cfg, folder / "t-1")


def trial(trial_id: str, config: dict, last_result: dict | None = None, checkpoint: str | None = None) -> SimpleNamespace:
    ckpt = SimpleNamespace(path=checkpoint) if checkpoint else None
    return SimpleNamespace(trial_id=trial_id, config=config, last_result=last_result, checkpoint=ckpt, error_file="/nonexistent", get_error=lambda: None)


def test_a_trial_is_one_child_run_with_its_metrics_by_step(sweep: SweepRun) -> None:
    ledger = Ledger()
    ledger.labels["a"] = "t000"
    runs = TrialRuns(sweep, ledger, {"lora_r": 16})
    t = trial("a", {"lora_r": 4, "gpu_share": 0.5, "estimated_vram_gb": 12.0, "resume_checkpoint": "/x"})
    runs.on_trial_start(0, [], t)
    report = {"step": 2, "eval_loss": 2.5, "tokens_per_sec": 100.0, "history": [[1, 3.0, 1e-4], [2, 2.8, 1e-4]], "derived": {"trainable_params": 123}}
    runs.on_trial_result(0, [], t, report)
    runs.on_trial_result(0, [], t, {**report, "step": 2})  # sent again: logged once
    t.last_result = {"step": 4, "trial_status": "completed", "eval_loss": 2.0, "train_seconds": 3.0}
    runs.on_trial_result(0, [], t, t.last_result)
    runs.on_trial_complete(0, [], t)

    (run,) = [r for r in sweep.children() if r.data.tags["trial"] == "t000"]
    assert run.data.tags["trial_status"] == "completed" and run.data.tags["last_step"] == "4" and run.info.status == "FINISHED"
    assert run.data.params == {"lora_r": "4", "gpu_share": "0.5", "estimated_vram_gb": "12.0", "trainable_params": "123"}  # no resume path
    history = sweep.client.get_metric_history(run.info.run_id, "eval_loss")
    assert [(m.step, m.value) for m in history] == [(2, 2.5), (4, 2.0)]
    assert [m.step for m in sweep.client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    # the scheduled learning rate is the metric `lr`: `learning_rate` is the param (the peak), and a
    # metric of that name would show its last scheduled value in the runs table instead
    assert [(m.step, m.value) for m in sweep.client.get_metric_history(run.info.run_id, "lr")] == [(1, 1e-4), (2, 1e-4)]
    assert "learning_rate" not in run.data.metrics

    # the same trial resumed by a new driver continues its child run
    again = TrialRuns(sweep, ledger, {"lora_r": 16})
    ledger.labels["a-resumed"] = "t000"
    again.on_trial_start(0, [], trial("a-resumed", {"lora_r": 4}))
    again.on_trial_result(0, [], trial("a-resumed", {}), {**report, "step": 2})
    assert len([r for r in sweep.children() if r.data.tags["trial"] == "t000"]) == 1
    assert len(sweep.client.get_metric_history(run.info.run_id, "eval_loss")) == 2


def test_a_trial_stopped_on_request_is_killed_not_finished(sweep: SweepRun, tmp_path: Path) -> None:
    ledger = Ledger()
    ledger.labels.update(b="t001", c="t002")
    stop = StopFile(tmp_path / "STOP")
    runs = TrialRuns(sweep, ledger, {}, stop=stop)
    for trial_id in "bc":
        runs.on_trial_start(0, [], trial(trial_id, {"lora_r": 8}))
    runs.on_trial_complete(0, [], trial("b", {}, {"step": 2, "trial_status": "stopped"}))  # the time budget
    (tmp_path / "STOP").write_text("now")
    runs.on_trial_complete(0, [], trial("c", {}, {"step": 2, "trial_status": "stopped"}))
    by_label = {r.data.tags["trial"]: r for r in sweep.children()}
    assert (by_label["t001"].data.tags["trial_status"], by_label["t001"].info.status) == ("stopped", "FINISHED")
    assert (by_label["t002"].data.tags["trial_status"], by_label["t002"].info.status) == ("stopped", "KILLED")


class Search:
    """What Retries asks of the searcher."""

    def __init__(self) -> None:
        self.attempts = {"d": 1, "e": 2, "f": 1}
        self.requeued: list[tuple[str, str | None]] = []
        self.failed: list[str] = []

    def requeue(self, trial_id: str, checkpoint: str | None) -> int:
        self.requeued.append((trial_id, checkpoint))
        return self.attempts[trial_id] + 1

    def fail(self, trial_id: str, error: str) -> None:
        self.failed.append(trial_id)


def test_retries_are_decided_once_and_recorded(sweep: SweepRun, tmp_path: Path) -> None:
    assert should_retry("ray.exceptions.ActorDiedError: The actor died unexpectedly", 1, 1)
    assert not should_retry("ray.exceptions.ActorDiedError", 2, 1)  # no retries left
    assert not should_retry("ValueError: bad config", 1, 3)  # the trial's own error
    ledger, search = Ledger(), Search()
    ledger.labels.update(d="t003", e="t004", f="t005")
    retries, runs = Retries(search, ledger, max_retries=1), TrialRuns(sweep, ledger, {})
    errors = {"d": "RayActorError: worker died", "e": "RayActorError: worker died", "f": "ValueError: boom"}
    for trial_id, error in errors.items():
        (tmp_path / trial_id).write_text(error)
        t = trial(trial_id, {"lora_r": 4}, {"step": 2}, checkpoint="/ckpt" if trial_id == "d" else None)
        t.error_file = str(tmp_path / trial_id)
        runs.on_trial_start(0, [], t)
        for callback in (retries, runs):  # the order the Sweep lists them in
            callback.on_trial_error(0, [], t)
    assert search.requeued == [("d", "/ckpt")] and search.failed == ["e", "f"] and ledger.retrying == {"d": 2}
    by_label = {r.data.tags["trial"]: r.data.tags for r in sweep.children()}
    assert by_label["t003"]["trial_status"] == "retrying" and by_label["t003"]["retries"] == "1"
    assert by_label["t003"]["error"] == "attempt 1: worker died; retrying from its last checkpoint"
    assert by_label["t004"]["trial_status"] == by_label["t005"]["trial_status"] == "failed"
    assert by_label["t005"]["error"] == "ValueError: boom"


def test_a_retry_that_never_started_leaves_a_resumable_run(sweep: SweepRun, tmp_path: Path) -> None:
    """Ctrl-C (or the time budget) between a worker's death and its retry: no child run stays RUNNING."""
    ledger, search = Ledger(), Search()
    search.attempts["g"] = 1
    ledger.labels.update(g="t006", h="t007")
    retries, runs = Retries(search, ledger, max_retries=1), TrialRuns(sweep, ledger, {}, stop=StopFile(tmp_path / "STOP"))
    (tmp_path / "g").write_text("RayActorError: worker died")
    t = trial("g", {"lora_r": 4}, {"step": 2}, checkpoint="/ckpt")
    t.error_file = str(tmp_path / "g")
    runs.on_trial_start(0, [], t)
    for callback in (retries, runs):
        callback.on_trial_error(0, [], t)
    (tmp_path / "STOP").write_text("SIGINT")
    runs.on_experiment_end([])
    (run,) = [r for r in sweep.children() if r.data.tags["trial"] == "t006"]
    assert (run.data.tags["trial_status"], run.info.status) == ("stopped", "KILLED")

    # a retry that did start carries on in the same run, and is not closed at the end
    search.attempts["h"] = 1
    (tmp_path / "h").write_text("RayActorError: worker died")
    u = trial("h", {"lora_r": 4}, {"step": 2}, checkpoint="/ckpt")
    u.error_file = str(tmp_path / "h")
    runs.on_trial_start(0, [], u)
    for callback in (retries, runs):
        callback.on_trial_error(0, [], u)
    ledger.labels["h2"] = "t007"
    runs.on_trial_start(0, [], trial("h2", {"lora_r": 4}))
    assert runs.awaiting_retry == {}


def test_resume_closes_runs_the_study_ended_before_the_driver_was_killed(sweep: SweepRun) -> None:
    """kill -9 after the searcher told the study a trial's end, before TrialRuns recorded it: the
    study says COMPLETE / PRUNED, the child run still RUNNING. close_ended brings the run in line;
    runs of trials still open in the study (a resumable stop) are left alone."""
    import optuna

    ledger = Ledger()
    runs = TrialRuns(sweep, ledger, {"lora_r": 16})
    for tid, label in (("k1", "t010"), ("k2", "t011"), ("k3", "t012")):
        ledger.labels[tid] = label
        t = trial(tid, {"lora_r": 4})
        runs.on_trial_start(0, [], t)
        runs.on_trial_result(0, [], t, {"step": 2, "eval_loss": 2.5})
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
    assert state == {"t010": ("FINISHED", "completed", "4"), "t011": ("FINISHED", "pruned", "2"), "t012": ("RUNNING", "running", None)}
    assert sweep.close_ended(study) == []  # once
