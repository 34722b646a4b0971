"""The engine's pieces without Ray: the source the workers share (sweep.engine.source) on a real
Optuna study with a recording stand-in for MLflow, the worker plan (sweep.engine.workers), and the
`auto` fast-step rules (core.rules)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import optuna
import pytest

from core import rules
from core.contract import TrialStatus
from sweep.config import ConfigError, load_config
from sweep.engine.source import StudySource, methods_of
from sweep.engine.study import Study, create_study, make_pruner
from sweep.engine.workers import COHORT_AUTO_GPU_LIMIT, plan, plan_workers
from tests.conftest import write_space

BODY = """\
name: c
model: {id: tiny-gemma3, embeddings: EMB}
data: {train: DEMO/train.jsonl, eval: DEMO/eval.jsonl, max_seq_len: 128}
train: {max_steps: 4, eval_every: 2, log_every: 1}
search: {num_trials: 3, seed: 0, scheduler: {type: asha, grace_period: 2, reduction_factor: 2}}
resources: {cohort: COHORT}
space:
  lora_r: [4, 8]
  method: [lora, qlora]
"""


def config(tmp_path: Path, embeddings: str = "frozen", cohort: str = "2", body: str = BODY) -> Any:
    return load_config(write_space(tmp_path, body.replace("EMB", embeddings).replace("COHORT", cohort)))


class Recorder:
    """What the source tells MLflow, kept in lists (sweep.engine.recorder.Recorder)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def begin(self, label: str, params: dict, worker: str, attempt: int = 1) -> None:
        self.calls.append(("begin", label, worker, attempt))

    def report(self, label: str, metrics: dict) -> None:
        self.calls.append(("report", label, metrics.get("step")))

    def end(self, label: str, status: TrialStatus, step: int, error: str | None = None, resumable: bool = False) -> None:
        self.calls.append(("end", label, str(status), step, resumable))

    def retrying(self, label: str, attempt: int, error: str) -> None:
        self.calls.append(("retrying", label, attempt))

    def waiting(self, label: str, why: str) -> None:
        self.calls.append(("waiting", label))

    def infeasible(self, label: str, hyper: dict, estimate_gb: float, reason: str) -> None:
        self.calls.append(("infeasible", label))


def source_of(cfg: Any, folder: Path, budget: int, **kwargs: Any) -> StudySource:
    storage = f"sqlite:///{folder}/optuna.db"
    try:
        optuna.load_study(study_name=cfg.name, storage=storage)
    except KeyError:
        create_study(cfg, storage, cfg.name)
    return StudySource(cfg, Study(cfg, storage, cfg.name), Recorder(), folder, budget, **kwargs)


def trials(folder: Path, cfg: Any) -> dict[int, Any]:
    return {t.number: t for t in optuna.load_study(study_name=cfg.name, storage=f"sqlite:///{folder}/optuna.db").trials}


def test_pruners_follow_search_scheduler(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    pruner = make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and pruner._min_resource == 2 and pruner._reduction_factor == 2
    for kind, cls in (("hyperband", optuna.pruners.HyperbandPruner), ("median", optuna.pruners.MedianPruner), ("none", optuna.pruners.NopPruner)):
        other = type(cfg)(**{**cfg.__dict__, "search": cfg.search.model_copy(update={"scheduler": cfg.search.scheduler.model_copy(update={"type": kind})})})
        assert isinstance(make_pruner(other), cls)
    assert methods_of(cfg) == ["lora", "qlora"]


def test_the_source_asks_prunes_and_tells(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    source = pickle.loads(pickle.dumps(source_of(cfg, tmp_path, budget=3)))  # as every worker receives it
    tasks = []
    for _ in range(6):
        task = source.take("w0", "lora", len(tasks))
        if task is not None:
            tasks.append(task)
    assert all(t.hyper["method"] == "lora" for t in tasks)  # a qlora sample waits in the queue for a qlora worker
    while (task := source.take("w1", "qlora", 0)) is not None:
        assert task.hyper["method"] == "qlora"
        tasks.append(task)
    assert len(tasks) == 3 and source.exhausted("lora") and source.exhausted("qlora")
    assert len({tuple(sorted(t.hyper.items())) for t in tasks}) == 3  # 3 of the space's 4 points, none twice
    study = trials(tmp_path, cfg)
    launched = [study[task.number] for task in tasks]
    assert {t.user_attrs["ray_trial_id"] for t in launched} <= {"w0", "w1"} and all(t.user_attrs["attempt"] == 1 for t in launched)
    # proposals the sampler repeated in between: closed, never handed out (sweep.engine.study.twin_of)
    assert all((t.state.name, t.user_attrs["trial_status"]) == ("FAIL", "duplicate") for t in study.values() if t not in launched)
    first, second, third = sorted(tasks, key=lambda t: t.number)
    source.begin(first, {"cohort": "w0"})
    assert source.report(first, {"step": 2, "eval_loss": 1.0, "trial_status": "running"}) is False  # the first at a rung is promoted
    assert source.report(second, {"step": 2, "eval_loss": 2.0, "trial_status": "running"}) is True  # worse than it: pruned (asha)
    source.end(second, {"step": 2, "eval_loss": 2.0, "trial_status": "pruned"})
    source.end(first, {"step": 4, "eval_loss": 0.5, "trial_status": "completed"})
    source.end(third, {"step": 1, "trial_status": "nan", "error": "train loss is nan"})
    study = trials(tmp_path, cfg)
    assert {n: (study[n].state.name, study[n].user_attrs["trial_status"]) for n in (first.number, second.number, third.number)} == {
        first.number: ("COMPLETE", "completed"), second.number: ("PRUNED", "pruned"), third.number: ("FAIL", "nan")}  # fmt: skip
    assert study[second.number].intermediate_values == {2: 2.0}
    assert ("begin", first.label, "w0", 1) in source.recorder.calls and ("end", second.label, "pruned", 2, False) in source.recorder.calls
    # what `status` reads while it runs: the trial's own reports, beside its checkpoints
    lines = (tmp_path / "trials" / first.label / "reports.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"eval_loss": 1.0' in lines[0] and '"trial_status": "completed"' in lines[1]


def test_a_completed_trial_without_its_objective_failed(tmp_path: Path) -> None:
    """peak_vram_gb as an objective on a CPU: the trial finished, but cannot be ranked."""
    body = BODY.replace("reduction_factor: 2}}", "reduction_factor: 2}, objectives: [{eval_loss: min}, {peak_vram_gb: min}]}")
    cfg = config(tmp_path, body=body)
    source = source_of(cfg, tmp_path, budget=1)
    task = source.take("w0", "lora", 0) or source.take("w0", "qlora", 0)
    source.end(task, {"step": 4, "eval_loss": 1.0, "peak_rss_gb": 0.5, "trial_status": "completed"})
    t = trials(tmp_path, cfg)[task.number]
    assert (t.state.name, t.user_attrs["trial_status"]) == ("FAIL", "failed") and "peak_vram_gb" in t.user_attrs["error"]


def test_the_source_never_hands_out_a_configuration_twice_and_says_when_the_space_is_spent(tmp_path: Path) -> None:
    """6 trials asked of a 4-point space: the 4 points, each once; then nothing more, for every worker."""
    cfg = config(tmp_path)
    cfg = type(cfg)(**{**cfg.__dict__, "search": cfg.search.model_copy(update={"num_trials": 6})})
    source = source_of(cfg, tmp_path, budget=6)
    tasks = []
    for _ in range(12):
        for worker, method in (("w0", "lora"), ("w1", "qlora")):
            if (task := source.take(worker, method, 0)) is not None:
                tasks.append(task)
                source.end(task, {"step": 4, "eval_loss": 1.0, "trial_status": "completed"})
    assert sorted((t.hyper["lora_r"], t.hyper["method"]) for t in tasks) == [(4, "lora"), (4, "qlora"), (8, "lora"), (8, "qlora")]
    assert source.spent() and source.exhausted("lora") and source.exhausted("qlora")
    assert any("the space looks spent" in note for note in source.notes)


def test_stop_and_time_budget_end_members_as_they_should(tmp_path: Path) -> None:
    """Stopped (STOP file): the trial stays RUNNING for `resume`; at the time budget: PRUNED with
    trial_status stopped; once halted nothing is handed out."""
    cfg = config(tmp_path)
    stop_file = tmp_path / "STOP"
    source = source_of(cfg, tmp_path, budget=3, stop_file=str(stop_file))
    first, second = source.take("w0", "lora", 0) or source.take("w1", "qlora", 0), None
    while second is None:
        second = source.take("w0", "lora", 1) or source.take("w1", "qlora", 0)
    stop_file.write_text("SIGINT")
    assert source.halt() == "stop" and source.take("w0", "lora", 0) is None and source.take("w0", "qlora", 0) is None
    source.end(first, {"step": 3, "trial_status": "stopped"})
    stop_file.unlink()
    source.deadline = 0.0  # long past
    assert source.halt() == "time" and source.take("w0", "lora", 0) is None
    source.end(second, {"step": 3, "trial_status": "stopped"})
    study = trials(tmp_path, cfg)
    assert study[first.number].state.name == "RUNNING" and "trial_status" not in study[first.number].user_attrs
    assert (study[second.number].state.name, study[second.number].user_attrs["trial_status"]) == ("PRUNED", "stopped")
    assert ("end", first.label, "stopped", 3, True) in source.recorder.calls and ("end", second.label, "stopped", 3, False) in source.recorder.calls


def test_a_dead_workers_members_are_found_and_queued_again(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    worker = source_of(cfg, tmp_path, budget=2)
    held = [worker.take("w0", "lora", n) or worker.take("w0", "qlora", 0) for n in range(2)]
    saved = tmp_path / "trials" / held[0].label / "step-000004"
    saved.mkdir(parents=True)
    (saved / "member.json").write_text("{}")
    driver = source_of(cfg, tmp_path, budget=0)  # the driver's own, after the worker died
    orphans = sorted(driver.orphans("w0"), key=lambda t: t.number)
    assert [(t.label, t.hyper, t.attempt) for t in orphans] == [(h.label, h.hyper, 1) for h in held]
    assert orphans[0].checkpoint == str(saved) and orphans[1].checkpoint is None and driver.orphans("w9") == []
    driver.retry(orphans[0], "its worker w0 died")
    assert [t.label for t in driver.orphans("w0")] == [held[1].label]  # queued: not an orphan any more
    assert ("retrying", held[0].label, 2) in driver.recorder.calls
    assert driver.close(orphans[1], "its worker w0 died: killed") == "failed: its worker w0 died: killed"
    assert (trials(tmp_path, cfg)[orphans[1].number].state.name) == "FAIL"
    queued = driver.queued()
    assert [(t.label, t.checkpoint, t.attempt) for t in queued] == [(held[0].label, str(saved), 2)] and driver.queued() == []


def test_workers_ask_the_study_one_at_a_time(tmp_path: Path) -> None:
    """Two workers' study.ask() at once could both pop the same enqueued trial (sqlite; CI saw t000
    start in two workers): StudySource._asking holds a lock shared through the sweep folder."""
    import fcntl
    import threading

    source = StudySource.__new__(StudySource)  # only the folder matters here
    source.work = tmp_path / "work"
    source.work.mkdir()
    entered = threading.Event()
    with open(source.work / "ask.lock", "a") as other:  # another worker is asking
        fcntl.flock(other, fcntl.LOCK_EX)

        def ask() -> None:
            with source._asking():
                entered.set()

        thread = threading.Thread(target=ask)
        thread.start()
        assert not entered.wait(0.5)  # waits while the other asks
        fcntl.flock(other, fcntl.LOCK_UN)
    assert entered.wait(5)  # then asks
    thread.join(5)


# ------------------------------------------------------------------------------------------------
# the worker plan


def test_workers_spread_over_every_gpu_and_max_concurrent_bounds_the_trials_at_once() -> None:
    """auto on GPUs: a worker per GPU, each holding its share of the trials at once (one worker
    holding all 16 left the second GPU idle); a number keeps its meaning; each method one worker."""
    assert plan_workers("auto", True, fit=2, trials=16, max_concurrent="auto", methods=1) == (2, 8)
    assert plan_workers("auto", True, fit=1, trials=16, max_concurrent="auto", methods=1) == (1, 16)
    assert plan_workers("auto", True, fit=8, trials=3, max_concurrent="auto", methods=1) == (3, 1)
    assert plan_workers("auto", True, fit=1, trials=500, max_concurrent="auto", methods=1) == (1, COHORT_AUTO_GPU_LIMIT)
    assert plan_workers(4, True, fit=4, trials=16, max_concurrent="auto", methods=1) == (4, 4)
    assert plan_workers(4, False, fit=8, trials=16, max_concurrent=8, methods=1) == (2, 4)
    assert plan_workers("auto", False, fit=1, trials=16, max_concurrent="auto", methods=2) == (2, 4)
    assert plan_workers("auto", False, fit=2, trials=8, max_concurrent=1, methods=1) == (1, 1)  # one trial at a time
    assert plan_workers("auto", False, fit=2, trials=8, max_concurrent=3, methods=1) == (1, 3)
    # an autoscaled cluster with one GPU now: cohort 2 and max_concurrent 8 plan four workers of two
    # (three wait for GPUs the autoscaler adds), never more trials at once than 8
    assert plan_workers(2, True, fit=1, trials=32, max_concurrent=8, methods=1) == (4, 2)
    assert plan_workers(2, True, fit=1, trials=4, max_concurrent=8, methods=1) == (2, 2)


def test_the_plan_on_a_cpu_cluster(tmp_path: Path) -> None:
    cfg = config(tmp_path, cohort="auto")
    workers = plan(cfg, {"CPU": 2.0}, 3, lambda: pytest.fail("no GPU to read"), lambda line: None)
    assert (len(workers.configs), workers.capacity, workers.gpus, workers.judge, workers.compile) == (2, 4, 0.0, None, False)
    assert {w["method"] for w in workers.configs} == {"lora", "qlora"} and workers.concurrent == 3
    assert "train.compile: off (auto: no GPU)" in workers.notes
    full = plan(config(tmp_path, "full", cohort="auto"), {"CPU": 2.0}, 3, lambda: 0, lambda line: None)
    assert full.capacity == 1 and any("one trial per worker" in n for n in full.notes)  # the whole embedding matrix: alone
    with pytest.raises(ConfigError, match="resources.cpus_per_trial: 4 but the Ray cluster has 2 CPU"):
        plan(load_config(write_space(tmp_path, BODY.replace("EMB", "frozen").replace("{cohort: COHORT}", "{cpus_per_trial: 4}"))), {"CPU": 2.0}, 3, lambda: 0, print)


def test_the_plan_fills_a_gpu_by_the_estimates_and_compiles_long_sweeps(tmp_path: Path) -> None:
    cfg = config(tmp_path, cohort="auto")
    lines: list[str] = []
    workers = plan(cfg, {"CPU": 8.0, "GPU": 2.0}, 3, lambda: 80 * 2**30, lines.append)
    assert workers.gpus == 1.0 and workers.judge is not None and workers.device_bytes == 80 * 2**30 and len(workers.configs) == 2
    assert "each worker fills one of 2 GPU(s) of 80 GB" in lines[0]
    assert workers.compile is False and any("too short to repay" in n for n in workers.notes)  # 3 tiny trials of 4 steps
    long = type(cfg)(**{**cfg.__dict__, "train": cfg.train.model_copy(update={"max_steps": 10**9})})
    assert plan(long, {"CPU": 8.0, "GPU": 2.0}, 3, lambda: 80 * 2**30, lines.append).compile is True
    off = type(cfg)(**{**cfg.__dict__, "train": long.train.model_copy(update={"compile": False})})
    assert plan(off, {"CPU": 8.0, "GPU": 2.0}, 3, lambda: 80 * 2**30, lines.append).compile is False


# ------------------------------------------------------------------------------------------------
# settings


def test_cohort_setting_values(tmp_path: Path) -> None:
    assert config(tmp_path, cohort="auto").resources.cohort == "auto"
    assert load_config(write_space(tmp_path, BODY.replace("EMB", "frozen").replace("resources: {cohort: COHORT}\n", ""))).resources.cohort == "auto"  # the default
    with pytest.raises(ConfigError, match="resources.cohort: off is no longer a setting: every worker trains a cohort .* 1 trains one trial per worker"):
        config(tmp_path, cohort="off")
    with pytest.raises(ConfigError, match="resources.cohort.*expected auto or a positive number"):
        config(tmp_path, cohort="0")
    assert config(tmp_path, "full", cohort="auto").model.embeddings == "full"  # runs, one trial per worker


def test_removed_switches_say_what_to_do(tmp_path: Path) -> None:
    body = BODY.replace("log_every: 1}", "log_every: 1, cuda_graphs: true, reuse_base_model: false}")
    with pytest.raises(ConfigError) as info:
        config(tmp_path, body=body)
    problems = info.value.problems
    assert any(p.startswith("train.cuda_graphs: was removed: replaying the compiled layers as CUDA graphs measured slower") for p in problems), problems
    assert any(p.startswith("train.reuse_base_model: was removed: every worker keeps its base model loaded") for p in problems), problems


def test_the_fast_step_auto_rules() -> None:
    assert rules.loss("auto", cuda=True, liger_installed=True) == ("liger", "auto: CUDA and liger-kernel: its fused linear + cross-entropy")
    assert rules.loss("auto", cuda=True, liger_installed=False)[0] == "chunked" and "pip install 'lora-sweep[gpu]'" in rules.loss("auto", True, False)[1]
    assert rules.loss("auto", cuda=False, liger_installed=True) == ("chunked", "auto: no CUDA: the chunked loss")
    assert rules.loss("model", cuda=True, liger_installed=True) == ("model", "as configured")
    assert rules.lora_dtype("auto", "bfloat16")[0] == "bfloat16" and rules.lora_dtype("auto", "float32")[0] == "float32"
    assert rules.lora_dtype("float32", "bfloat16") == ("float32", "as configured")
    assert rules.compile_layers("auto", cuda=False, train_flops=1e30) == (False, "auto: no GPU")
    assert rules.compile_layers("auto", cuda=True, train_flops=rules.EAGER_TRAIN_FLOPS * rules.COMPILE_PAYS_AFTER_S)[0] is True
    assert rules.compile_layers("auto", cuda=True, train_flops=rules.EAGER_TRAIN_FLOPS * 10)[0] is False
    assert rules.compile_layers(True, cuda=False, train_flops=0) == (True, "as configured")


# ------------------------------------------------------------------------------------------------
# why nothing completed


def test_a_worker_that_failed_before_any_trial_says_why(tmp_path: Path) -> None:
    """The compose story's worker could not reach PostgreSQL: no trial ran, and the summary named the
    worker's error, not SQLAlchemy's trailing link to its docs."""
    from sweep.engine.sweep import nothing_completed
    from sweep.engine.workers import last_line
    from sweep.readback.results import SweepResult

    error = (
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection failed: fe_sendauth: no password supplied\n"
        "(Background on this error at: https://sqlalche.me/e/21/e3q8)\n"
    )
    assert last_line(error) == "sqlalchemy.exc.OperationalError: (psycopg.OperationalError) connection failed: fe_sendauth: no password supplied"
    cfg = config(tmp_path, cohort="auto")
    empty = SweepResult(sweep_dir=tmp_path, parent_run_id="r")
    why = nothing_completed(empty, cfg, time_up=False, worker_failures=[f"worker 9163a32f: {last_line(error)}"])
    assert why is not None and why.startswith("no trial ran; 1 worker(s) failed, first: worker 9163a32f: sqlalchemy.exc.OperationalError")
    assert nothing_completed(empty, cfg, time_up=False) == "no trial ran"
    done = SweepResult(sweep_dir=tmp_path, parent_run_id="r", trials=[{"status": TrialStatus.COMPLETED}])
    assert nothing_completed(done, cfg, time_up=False, worker_failures=["worker w: boom"]) is None


def test_what_tune_pickles_into_the_sweep_folder_holds_no_store_url() -> None:
    """Tune writes its searcher and callbacks to tune*/tuner.pkl in the sweep folder; the study
    source they use holds the store URLs, password included, and must not go with them."""
    from ray import cloudpickle

    from sweep.engine.workers import orphans_callback, worker_list

    class Holder:
        url = "postgresql://sweep:hunter2-secret@db/optuna"

        def halt(self) -> None:
            return None

    holder = Holder()
    workers = worker_list([{"worker": 0, "method": "lora"}], holder.halt)
    orphans = orphans_callback(holder, workers, 2, holder)  # type: ignore[arg-type]
    for thing in (workers, orphans):
        assert b"hunter2-secret" not in cloudpickle.dumps(thing), type(thing).__name__
    assert workers.suggest("t") == {"worker": 0, "method": "lora"} and workers.suggest("u") is None
    from sweep.engine.sweep import Heartbeat

    beat = cloudpickle.loads(cloudpickle.dumps(Heartbeat(Path("/nonexistent"), 0.0).callback()))  # its lock stays behind, a new one comes
    assert beat is not None
