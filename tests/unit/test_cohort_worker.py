"""Cohort sweeps (issue 15): the worker loop with a fake cohort and a fake source, the source on a
real Optuna study, the cohort memory estimate, and resources.cohort's validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.schema import TrainSection
from trainable.cohort_worker import MemberTask, WorkerSpec, latest_checkpoint, run_worker
from trainable.train import FAULTS_ENV, TrialSpec

TRAIN = TrainSection(max_steps=6, eval_every=2, log_every=1, lora_dropout=0.0, batch=(1, 1))


class FakeMember:
    def __init__(self, slot: int, name: str, train: TrainSection):
        self.slot, self.name, self.train = slot, name, train
        self.step = self.tokens = self.loss_tokens = 0
        self.status = "running"
        self.history: list[list[float]] = []
        self.params: list = []
        self.layers: dict = {}
        self.optimizer = object()


class FakeCohort:
    """Cohort's interface: each micro-step is an optimizer step; loss falls faster with a larger rank."""

    def __init__(self) -> None:
        self.members: dict[int, FakeMember] = {}
        self.sizes: list[int] = []  # members per step
        self.checkpointing = False
        self.checkpointing_by_size: list[tuple[int, bool]] = []  # (live members, on) at each decision
        self.passes_by_size: list[tuple[int, int | None]] = []  # (live members, pass_tokens) at each decision

    @property
    def pass_tokens(self) -> int | None:
        return self.passes_by_size[-1][1] if self.passes_by_size else None

    @pass_tokens.setter
    def pass_tokens(self, value: int | None) -> None:
        self.passes_by_size.append((len(self.members), value))

    def set_checkpointing(self, on: bool) -> None:
        self.checkpointing = on
        self.checkpointing_by_size.append((len(self.members), on))

    def plan_checkpointing(self, rows: int) -> bool:
        self.checkpointing_by_size.append((len(self.members), self.checkpointing))
        return self.checkpointing

    def loss(self, m: FakeMember) -> float:
        return 3.0 - m.step * m.train.lora_r / 100

    def add(self, train: TrainSection, name: str | None = None, slot: int | None = None) -> int:
        slot = next(i for i in range(len(self.members) + 1) if i not in self.members) if slot is None else slot
        self.members[slot] = FakeMember(slot, name or f"m{slot}", train)
        return slot

    def restore(self, folder: str, slot: int | None = None) -> int:
        state = json.loads(Path(folder, "member.json").read_text())
        slot = self.add(TrainSection(**state["train"]), state["name"], slot)
        m = self.members[slot]
        m.step, m.history, m.status = state["step"], state["history"], state["status"]
        return slot

    def save(self, slot: int, folder: Path) -> None:
        m = self.members[slot]
        Path(folder, "member.json").write_text(json.dumps({"name": m.name, "train": m.train.model_dump(mode="json"), "step": m.step, "history": m.history, "status": m.status}))

    def remove(self, slot: int) -> FakeMember:
        return self.members.pop(slot)

    def running(self) -> list[int]:
        return [s for s, m in self.members.items() if m.status == "running"]

    def step(self) -> dict[int, int]:
        active = self.running()
        self.sizes.append(len(active))
        out = {}
        for s in active:
            m = self.members[s]
            m.step += 1
            m.tokens += 10
            m.history.append([m.step, self.loss(m), m.train.learning_rate])
            if m.step >= m.train.max_steps:
                m.status = "completed"
            out[s] = m.step
        return out

    def evaluate(self, slots: list[int]) -> dict[int, float]:
        return {s: self.loss(self.members[s]) for s in slots}

    def sync(self, slot: int) -> None:
        pass

    def rewind(self, slot: int) -> None:
        pass


class FakeSource:
    """Hands out `hypers` in order; prunes what `prune(label, step)` says; records everything."""

    def __init__(self, hypers: list[dict], root: Path, prune: Any = None):
        self.todo = [MemberTask(label=f"t{i:03d}", number=i, hyper=h) for i, h in enumerate(hypers)]
        self.queue: list[MemberTask] = []
        self.root, self.prune = root, prune or (lambda label, step: False)
        self.begun: list[str] = []
        self.reports: list[tuple[str, int]] = []
        self.ended: dict[str, dict] = {}
        self.given_back: list[str] = []

    def take(self, worker: str, method: str, members: int) -> MemberTask | None:
        for task in self.queue:
            if not task.alone or members == 0:
                self.queue.remove(task)
                return task
        return self.todo.pop(0) if self.todo else None

    def give_back(self, task: MemberTask) -> None:
        self.given_back.append(task.label)
        self.queue.append(task)

    def waiting_alone(self, method: str) -> bool:
        return any(t.alone for t in self.queue)

    def exhausted(self, method: str) -> bool:
        return not self.todo and not self.queue

    def checkpoint_dir(self, task: MemberTask) -> str:
        return str(self.root / task.label)

    def begin(self, task: MemberTask, params: dict) -> None:
        self.begun.append(task.label)
        assert params["cohort"] == "w0" and params["cohort_size"] >= 1

    def report(self, task: MemberTask, metrics: dict) -> bool:
        self.reports.append((task.label, metrics["step"]))
        return self.prune(task.label, metrics["step"])

    def end(self, task: MemberTask, metrics: dict) -> None:
        assert task.label not in self.ended, f"{task.label} ended twice"
        self.ended[task.label] = metrics

    def halt(self) -> str | None:
        return self.halt_when(self) if self.halt_when else None

    halt_when: Any = None  # FakeSource -> 'stop' | 'time' | None; set by a test


def work(tmp_path: Path, hypers: list[dict], capacity: int, halt: Any = None, budget: Any = None, **source_args: Any) -> tuple[FakeSource, FakeCohort, list[str]]:
    source = FakeSource(hypers, tmp_path, **source_args)
    cohort = FakeCohort()
    if halt is not None:  # (cohort) -> 'stop' | 'time' | None, asked before every micro-step
        source.halt_when = lambda s: halt(cohort)
    made = []
    lines: list[str] = []

    def make(spec: WorkerSpec) -> FakeCohort:
        made.append(spec)
        return cohort

    spec = WorkerSpec(base=TrialSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=capacity, poll_seconds=0.01, budget=budget)
    run_worker(spec, source, lines.extend, make_cohort=make)
    assert len(made) == 1  # the base is loaded once, whoever comes and goes
    return source, cohort, lines


def status(source: FakeSource) -> dict[str, str]:
    return {label: str(m["trial_status"]) for label, m in sorted(source.ended.items())}


def test_slots_are_refilled_without_reloading_the_base(tmp_path: Path) -> None:
    source, cohort, lines = work(tmp_path, [{"lora_r": r} for r in (4, 8, 16, 32, 2)], capacity=2)
    assert status(source) == dict.fromkeys(["t000", "t001", "t002", "t003", "t004"], "completed")
    assert max(cohort.sizes) == 2 and cohort.sizes[:6] == [2] * 6  # always full while trials remain
    assert [step for label, step in source.reports if label == "t000"] == [2, 4, 6]
    final = source.ended["t000"]
    assert final["train_seconds"] > 0 and final["tokens_per_sec"] > 0 and "peak_rss_gb" in final
    assert latest_checkpoint(tmp_path / "t000").endswith("step-000006")
    assert any(line.startswith("t004 start") for line in lines) and any(line.startswith("t004 completed") for line in lines)


def test_a_pruned_member_is_replaced_by_the_next_trial(tmp_path: Path) -> None:
    source, cohort, lines = work(tmp_path, [{"lora_r": 16}, {"lora_r": 1}, {"lora_r": 8}], capacity=2, prune=lambda label, step: label == "t001" and step == 2)
    assert status(source) == {"t000": "completed", "t001": "pruned", "t002": "completed"}
    assert source.ended["t001"]["step"] == 2
    # t002 took t001's slot right after the prune: the cohort stayed full
    assert source.begun == ["t000", "t001", "t002"] and cohort.sizes[:4] == [2, 2, 2, 2]
    assert lines.index(next(x for x in lines if x.startswith("t001 pruned"))) < lines.index(next(x for x in lines if x.startswith("t002 start")))


def test_an_oom_in_a_cohort_step_sheds_the_largest_member_which_runs_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "oom_cohort@3:lora_r=32")  # fits alone, not beside others
    source, cohort, lines = work(tmp_path, [{"lora_r": 4}, {"lora_r": 32}, {"lora_r": 8}], capacity=3)
    assert status(source) == dict.fromkeys(["t000", "t001", "t002"], "completed")  # nobody ends oom
    assert source.given_back == ["t001"] and source.begun.count("t001") == 2  # shed once, continued from its checkpoint
    assert [step for label, step in source.reports if label == "t001"] == [2, 4, 6]
    assert max(cohort.sizes[3:]) <= 2  # the cohort shrank
    assert any("t001 shed" in line for line in lines)


def test_only_a_member_that_does_not_fit_alone_ends_oom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "oom@3:lora_r=32")
    source, cohort, lines = work(tmp_path, [{"lora_r": 4}, {"lora_r": 32}], capacity=2)
    assert status(source) == {"t000": "completed", "t001": "oom"}
    assert source.given_back == ["t001"] and source.ended["t001"]["step"] == 2 and "out of memory" in source.ended["t001"]["error"]


def test_a_nan_ends_that_member_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "nan@3:lora_r=8")
    source, cohort, lines = work(tmp_path, [{"lora_r": 4}, {"lora_r": 8}, {"lora_r": 16}], capacity=3)
    assert status(source) == {"t000": "completed", "t001": "nan", "t002": "completed"}
    assert source.ended["t001"]["step"] == 3


def test_a_member_continues_from_its_checkpoint(tmp_path: Path) -> None:
    source = FakeSource([], tmp_path)
    first, _, _ = work(tmp_path, [{"lora_r": 4}], capacity=1, prune=lambda label, step: step == 4)  # leaves a checkpoint at step 4
    checkpoint = latest_checkpoint(tmp_path / "t000")
    assert checkpoint and checkpoint.endswith("step-000004")
    source = FakeSource([], tmp_path)
    source.queue = [MemberTask(label="t000", number=0, hyper={"lora_r": 4}, checkpoint=checkpoint)]
    cohort = FakeCohort()
    spec = WorkerSpec(base=TrialSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=1, poll_seconds=0.01)
    run_worker(spec, source, make_cohort=lambda s: cohort)
    assert source.reports == [("t000", 6)] and status(source) == {"t000": "completed"}
    assert [h[0] for h in source.ended["t000"]["history"]] == [1, 2, 3, 4, 5, 6]  # replayed once, then new steps
    assert [e["step"] for e in source.ended["t000"]["evals_replay"]] == [2, 4]


def test_a_stop_saves_every_member_at_its_current_step_and_ends_it_stopped(tmp_path: Path) -> None:
    """`python -m sweep stop` / Ctrl-C / SIGTERM (the STOP file): between evals (step 3, evals at
    2, 4, 6), each member is checkpointed where it is and ends stopped; no new trial starts."""
    at_step_3 = lambda cohort: "stop" if any(m.step >= 3 for m in cohort.members.values()) else None  # noqa: E731
    source, cohort, lines = work(tmp_path, [{"lora_r": 4}, {"lora_r": 8}, {"lora_r": 16}], capacity=2, halt=at_step_3)
    assert status(source) == {"t000": "stopped", "t001": "stopped"} and source.begun == ["t000", "t001"]  # t002 never asked for
    for label in ("t000", "t001"):
        assert source.ended[label]["step"] == 3 and [h[0] for h in source.ended[label]["history"]] == [3]  # steps since the last report
        assert latest_checkpoint(tmp_path / label).endswith("step-000003")
    assert cohort.sizes == [2, 2, 2] and any(line.startswith("t000 stopped") for line in lines)

    # resume: each continues from that checkpoint, none of its steps run twice
    source = FakeSource([], tmp_path)
    source.queue = [MemberTask(label=x, number=i, hyper={"lora_r": r}, checkpoint=latest_checkpoint(tmp_path / x)) for i, (x, r) in enumerate((("t000", 4), ("t001", 8)))]
    cohort = FakeCohort()
    spec = WorkerSpec(base=TrialSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=2, poll_seconds=0.01)
    run_worker(spec, source, make_cohort=lambda s: cohort)
    assert status(source) == {"t000": "completed", "t001": "completed"} and cohort.sizes == [2, 2, 2]
    assert sorted(source.reports) == [("t000", 4), ("t000", 6), ("t001", 4), ("t001", 6)]


def test_at_the_time_budget_members_end_stopped_where_they_are(tmp_path: Path) -> None:
    """search.time_budget: members end stopped (as a lone trial at the budget), nothing is saved
    for a resume (the newest checkpoint is the last eval's), no new trial starts."""
    at_step_3 = lambda cohort: "time" if any(m.step >= 3 for m in cohort.members.values()) else None  # noqa: E731
    source, cohort, lines = work(tmp_path, [{"lora_r": 4}, {"lora_r": 8}, {"lora_r": 16}], capacity=2, halt=at_step_3)
    assert status(source) == {"t000": "stopped", "t001": "stopped"} and source.begun == ["t000", "t001"]
    assert {source.ended[x]["step"] for x in ("t000", "t001")} == {3}
    assert latest_checkpoint(tmp_path / "t000").endswith("step-000002") and cohort.sizes == [2, 2, 2]
    # a member cut by the budget still reports its times (the timeline's load bar comes from them)
    assert all(source.ended[x]["train_seconds"] > 0 and "load_seconds" in source.ended[x] for x in ("t000", "t001"))


def test_a_worker_halted_before_it_starts_loads_nothing(tmp_path: Path) -> None:
    source = FakeSource([{"lora_r": 4}], tmp_path)
    source.halt_when = lambda s: "stop"
    spec = WorkerSpec(base=TrialSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=2, poll_seconds=0.01)
    assert run_worker(spec, source, make_cohort=lambda s: pytest.fail("loaded a base model after the stop")) == {}
    assert source.begun == [] and source.ended == {}


# ----------------------------------------------------------------------------------------------
# the cohort memory estimate


def test_cohort_estimate_counts_the_base_once() -> None:
    from core.estimate import CohortBudget, ModelProfile, TextShape, TrialShape, cohort_estimate, estimate, member_share

    text = TextShape(hidden=1152, intermediate=6912, layers=26, heads=4, kv_heads=1, head_dim=256, vocab=262144)
    linears = {"q_proj": (1152, 1024, 26), "k_proj": (1152, 256, 26), "v_proj": (1152, 256, 26), "o_proj": (1024, 1152, 26),
               "gate_proj": (1152, 6912, 26), "up_proj": (1152, 6912, 26), "down_proj": (6912, 1152, 26)}  # fmt: skip
    profile = ModelProfile(text=text, linears=linears, embedding_params=262144 * 1152, tied=True, other_params=100_000)
    a, b = TrialShape(lora_r=16, micro_batch=2, seq_len=512), TrialShape(lora_r=64, micro_batch=1, seq_len=512, targets=("q_proj", "v_proj"))
    one, four = cohort_estimate(profile, [a]), cohort_estimate(profile, [a, b, a, b])
    assert one.parts["weights"] == four.parts["weights"] == estimate(profile, a).parts["weights"]
    assert four.parts["adapter"] == pytest.approx(2 * (estimate(profile, a).parts["adapter"] + estimate(profile, b).parts["adapter"]))
    assert one.parts["activations"] < four.parts["activations"]
    assert four.total < 2 * estimate(profile, a).total + 2 * estimate(profile, b).total  # sharing the base is the point
    shares = [member_share(profile, m, [a, b, a, b]) for m in (a, b, a, b)]
    assert sum(shares) == pytest.approx(four.total)
    fixed = {"method": "lora", "lora_r": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "batch": (2, 4), "optimizer": "auto", "gradient_checkpointing": "auto"}
    budget = CohortBudget(profile=profile, max_seq_len=512, fixed=fixed, gpu_bytes=2 * 2**30 + one.total * 1.2 + 0.75 * 2**30, fold_tokens=0)
    assert budget.fits([{}]) and not budget.fits([{}] * 64)
    assert CohortBudget(profile=profile, max_seq_len=512, fixed=fixed).fits([{}] * 64)  # a CPU worker: no limit
    assert budget.size({"lora_r": 64}) > budget.size({"lora_r": 4})


def _budget_fitting_two_without_checkpointing(fixed_extra: dict | None = None) -> Any:
    from core.estimate import CohortBudget, ModelProfile, TextShape

    text = TextShape(hidden=1152, intermediate=6912, layers=26, heads=4, kv_heads=1, head_dim=256, vocab=262144)
    linears = {"q_proj": (1152, 1024, 26), "v_proj": (1152, 256, 26), "down_proj": (6912, 1152, 26)}
    profile = ModelProfile(text=text, linears=linears, embedding_params=262144 * 1152, tied=True, other_params=100_000)
    fixed = {"method": "lora", "lora_r": 16, "lora_dropout": 0.0, "target_modules": "all-linear", "batch": (2, 4), "optimizer": "auto",
             "gradient_checkpointing": "auto", **(fixed_extra or {})}  # fmt: skip
    probe = CohortBudget(profile=profile, max_seq_len=512, fixed=fixed, fold_tokens=0)
    return CohortBudget(profile=profile, max_seq_len=512, fixed=fixed, gpu_bytes=probe._need([{}] * 2, False) * 1.01, fold_tokens=0)


def test_a_cohort_checkpoints_only_when_its_members_do_not_fit_without() -> None:
    """gradient_checkpointing auto in a cohort: off while the members fit the GPU without it (the
    faster step), on once they do not; a member is admitted if it fits either way. (The budget
    once judged each member alone, without checkpointing, and admitted a quarter of what fits.)"""
    from core.estimate import CohortBudget

    budget = _budget_fitting_two_without_checkpointing()
    assert not budget.checkpointing([{}] * 2) and budget.fits([{}] * 2)
    assert budget.checkpointing([{}] * 3) and budget.fits([{}] * 4) and not budget.fits([{}] * 5)
    assert budget.need([{}] * 3) < budget._need([{}] * 3, False)
    share = budget.share_gb({}, [{}] * 4)
    assert share * 4 * 2**30 * (1 + budget.margin) < budget.gpu_bytes  # shares follow the cohort's decision
    # a member's rows in one forward are its micro-batches folded together (core.rules.cohort_fold)
    folded = CohortBudget(profile=budget.profile, max_seq_len=512, fixed=budget.fixed)
    assert folded.shape({}).micro_batch == 8 and budget.shape({}).micro_batch == 2  # batch 2 x 4 at 512 tokens
    on = _budget_fitting_two_without_checkpointing({"gradient_checkpointing": True})
    assert on.checkpointing([{}]) and not _budget_fitting_two_without_checkpointing({"gradient_checkpointing": False}).checkpointing([{}] * 8)


def test_the_worker_turns_checkpointing_on_and_off_as_members_come_and_go(tmp_path: Path) -> None:
    budget = _budget_fitting_two_without_checkpointing()
    hypers = [{"lora_r": 16, "max_steps": steps} for steps in (2, 2, 6, 6)]
    source, cohort, _ = work(tmp_path, hypers, capacity=4, budget=budget)
    assert all(s == "completed" for s in status(source).values()) and len(source.ended) == 4
    decisions = dict(cohort.checkpointing_by_size)
    assert decisions[1] is False and decisions[2] is False and decisions[3] is True and decisions[4] is True
    assert cohort.checkpointing_by_size[-1] == (2, False)  # once two have ended, the other two fit without


# ----------------------------------------------------------------------------------------------
# resources.cohort: validation, pruners, and the source on a real study


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


def config(tmp_path: Path, embeddings: str = "frozen", cohort: str = "2") -> Any:
    from sweep.config import load_config
    from tests.conftest import write_space

    return load_config(write_space(tmp_path, BODY.replace("EMB", embeddings).replace("COHORT", cohort)))


def test_embeddings_that_cannot_share_are_refused(tmp_path: Path) -> None:
    from sweep.config import ConfigError

    with pytest.raises(ConfigError, match="model.embeddings: full with resources.cohort: 2"):
        config(tmp_path, "full")
    assert config(tmp_path, "full", cohort="off").resources.cohort == "off"
    assert config(tmp_path, "new_tokens").resources.cohort == 2  # each member trains its own token rows


def test_cuda_graphs_are_refused_with_cohorts_and_compile_alone_is_not(tmp_path: Path) -> None:
    """A cohort's rows change shape as members come and go: each shape would record new graphs."""
    from sweep.config import ConfigError, load_config
    from tests.conftest import write_space

    def with_train(train: str, cohort: str = "2") -> Any:
        body = BODY.replace("EMB", "frozen").replace("COHORT", cohort).replace("log_every: 1}", f"log_every: 1, {train}}}")
        return load_config(write_space(tmp_path, body))

    with pytest.raises(ConfigError, match="train.cuda_graphs: true with resources.cohort: 2"):
        with_train("compile: true, cuda_graphs: true, lora_dtype: bfloat16")
    assert with_train("compile: true").train.compile is True
    assert with_train("compile: true, cuda_graphs: true, lora_dtype: bfloat16", cohort="off").train.cuda_graphs is True


def test_cohort_setting_values(tmp_path: Path) -> None:
    from sweep.config import ConfigError

    assert config(tmp_path, cohort="auto").resources.cohort == "auto"
    assert config(tmp_path, cohort="off").resources.cohort == "off"
    with pytest.raises(ConfigError, match="resources.cohort.*expected off, auto or a positive number"):
        config(tmp_path, cohort="0")


def test_pruners_follow_search_scheduler(tmp_path: Path) -> None:
    import optuna

    from sweep.cohorts import make_pruner, methods_of

    cfg = config(tmp_path)
    pruner = make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and pruner._min_resource == 2 and pruner._reduction_factor == 2
    for kind, cls in (("hyperband", optuna.pruners.HyperbandPruner), ("median", optuna.pruners.MedianPruner), ("none", optuna.pruners.NopPruner)):
        other = type(cfg)(**{**cfg.__dict__, "search": cfg.search.model_copy(update={"scheduler": cfg.search.scheduler.model_copy(update={"type": kind})})})
        assert isinstance(make_pruner(other), cls)
    assert methods_of(cfg) == ["lora", "qlora"]


def test_study_source_asks_prunes_and_tells(tmp_path: Path) -> None:
    import pickle

    import optuna

    from sweep.cohorts import StudySource

    cfg = config(tmp_path)
    storage = cfg.optuna_storage(tmp_path)
    optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize")
    source = pickle.loads(pickle.dumps(StudySource(cfg, tmp_path, cfg.name, "0", "parent", budget=3)))
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
    study = optuna.load_study(study_name=cfg.name, storage=storage)
    launched = [t for t in study.trials if t.number in {task.number for task in tasks}]
    assert {t.user_attrs["ray_trial_id"] for t in launched} <= {"w0", "w1"} and all(t.user_attrs["cohort"] for t in launched)
    # proposals the sampler repeated in between: closed, never handed out (sweep.study.twin_of)
    assert all((t.state.name, t.user_attrs["trial_status"]) == ("FAIL", "duplicate") for t in study.trials if t not in launched)
    first, second, third = sorted(tasks, key=lambda t: t.number)
    assert source.report(first, {"step": 2, "eval_loss": 1.0, "trial_status": "running"}) is False  # the first at a rung is promoted
    assert source.report(second, {"step": 2, "eval_loss": 2.0, "trial_status": "running"}) is True  # worse than it: pruned (asha)
    source.end(second, {"step": 2, "eval_loss": 2.0, "trial_status": "pruned"})
    source.end(first, {"step": 4, "eval_loss": 0.5, "trial_status": "completed"})
    source.end(third, {"step": 1, "trial_status": "nan", "error": "train loss is nan"})
    states = {t.number: (t.state.name, t.user_attrs["trial_status"]) for t in optuna.load_study(study_name=cfg.name, storage=storage).trials if t.number in (first.number, second.number, third.number)}
    assert states == {first.number: ("COMPLETE", "completed"), second.number: ("PRUNED", "pruned"), third.number: ("FAIL", "nan")}
    assert optuna.load_study(study_name=cfg.name, storage=storage).trials[second.number].intermediate_values == {2: 2.0}


def test_study_source_never_hands_out_a_configuration_twice(tmp_path: Path) -> None:
    """6 trials asked of a 4-point space: the 4 points, each once; then nothing more."""
    import optuna

    from sweep.cohorts import StudySource

    cfg = config(tmp_path)
    cfg = type(cfg)(**{**cfg.__dict__, "search": cfg.search.model_copy(update={"num_trials": 6})})
    optuna.create_study(study_name=cfg.name, storage=cfg.optuna_storage(tmp_path), direction="minimize")
    source = StudySource(cfg, tmp_path, cfg.name, "0", "parent", budget=6)
    tasks = []
    for _ in range(12):
        for worker, method in (("w0", "lora"), ("w1", "qlora")):
            if (task := source.take(worker, method, 0)) is not None:
                tasks.append(task)
    assert sorted((t.hyper["lora_r"], t.hyper["method"]) for t in tasks) == [(4, "lora"), (4, "qlora"), (8, "lora"), (8, "qlora")]


class FakeClient:
    """MlflowClient's calls a StudySource makes for members with no run yet."""

    def search_runs(self, *args: Any, **kwargs: Any) -> list:
        return []


def test_study_source_stop_and_time_budget_end_members_as_lone_trials_end(tmp_path: Path) -> None:
    """Stopped (STOP file): the trial stays RUNNING for `resume`; at the time budget: PRUNED with
    trial_status stopped (as a lone trial ended by the budget); once halted nothing is handed out."""
    import optuna

    from sweep.cohorts import StudySource

    cfg = config(tmp_path)
    storage = cfg.optuna_storage(tmp_path)
    optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize")
    stop_file = tmp_path / "STOP"
    source = StudySource(cfg, tmp_path, cfg.name, "0", "parent", budget=3, stop_file=str(stop_file))
    source._client = FakeClient()
    first, second = source.take("w0", "lora", 0), None
    while second is None:
        second = source.take("w0", "lora", 1) or source.take("w1", "qlora", 0)
    stop_file.write_text("SIGINT")
    assert source.halt() == "stop" and source.take("w0", "lora", 0) is None and source.take("w0", "qlora", 0) is None
    source.end(first, {"step": 3, "trial_status": "stopped"})
    stop_file.unlink()
    source.deadline = 0.0  # long past
    assert source.halt() == "time" and source.take("w0", "lora", 0) is None
    source.end(second, {"step": 3, "trial_status": "stopped"})
    trials = {t.number: t for t in optuna.load_study(study_name=cfg.name, storage=storage).trials}
    assert trials[first.number].state.name == "RUNNING" and "trial_status" not in trials[first.number].user_attrs
    assert (trials[second.number].state.name, trials[second.number].user_attrs["trial_status"]) == ("PRUNED", "stopped")


def test_study_source_finds_a_dead_workers_members_and_queues_them_again(tmp_path: Path) -> None:
    import optuna

    from sweep.cohorts import StudySource

    cfg = config(tmp_path)
    storage = cfg.optuna_storage(tmp_path)
    optuna.create_study(study_name=cfg.name, storage=storage, direction="minimize")
    worker = StudySource(cfg, tmp_path, cfg.name, "0", "parent", budget=2)
    held = [worker.take("w0", "lora", n) or worker.take("w0", "qlora", 0) for n in range(2)]
    saved = tmp_path / "cohorts" / "members" / held[0].label / "step-000004"
    saved.mkdir(parents=True)
    (saved / "member.json").write_text("{}")
    driver = StudySource(cfg, tmp_path, cfg.name, "0", "parent", budget=0)  # the driver's own, after the worker died
    driver._client = FakeClient()
    orphans = sorted(driver.orphans("w0"), key=lambda t: t.number)
    assert [(t.label, t.hyper, t.attempt) for t in orphans] == [(h.label, h.hyper, 1) for h in held]
    assert orphans[0].checkpoint == str(saved) and orphans[1].checkpoint is None and driver.orphans("w9") == []
    driver.retry(orphans[0], "cohort worker w0 died")
    assert [t.label for t in driver.orphans("w0")] == [held[1].label]  # queued: not an orphan any more
    queued = driver.queued()
    assert [(t.label, t.checkpoint, t.attempt) for t in queued] == [(held[0].label, str(saved), 2)] and driver.queued() == []


def test_cohort_workers_spread_over_every_gpu() -> None:
    """auto on GPUs: a worker per GPU, each holding its share of the trials at once (one worker
    holding all 16 left the second GPU idle); a number keeps its meaning; each method one worker."""
    from sweep.cohorts import COHORT_AUTO_GPU_LIMIT, plan_workers

    assert plan_workers("auto", True, fit=2, trials=16, max_concurrent="auto", methods=1) == (2, 8)
    assert plan_workers("auto", True, fit=1, trials=16, max_concurrent="auto", methods=1) == (1, 16)
    assert plan_workers("auto", True, fit=8, trials=3, max_concurrent="auto", methods=1) == (3, 1)
    assert plan_workers("auto", True, fit=1, trials=500, max_concurrent="auto", methods=1) == (1, COHORT_AUTO_GPU_LIMIT)
    assert plan_workers(4, True, fit=4, trials=16, max_concurrent="auto", methods=1) == (4, 4)
    assert plan_workers(4, False, fit=8, trials=16, max_concurrent=8, methods=1) == (2, 4)
    assert plan_workers("auto", False, fit=1, trials=16, max_concurrent="auto", methods=2) == (2, 4)


def test_cohort_sweeps_print_progress_and_an_eta() -> None:
    """The driver's cohort progress: after each member's end, how many finished of how many and an ETA."""
    from types import SimpleNamespace

    from sweep.cohorts import _progress

    lines: list[str] = []
    progress = _progress(lines.append, total=4, time_budget=3600)
    worker = SimpleNamespace(trial_id="w0", config={"method": "lora"})
    events = ["t000 start      in cohort w0 (1 of 2) from the start", "t001 start      in cohort w0 (2 of 2) from the start"]
    progress.on_trial_result(0, [], worker, {"events": events})
    assert not any("progress:" in line for line in lines)
    progress.on_trial_result(1, [], worker, {"events": ["t000 step    2/2  eval_loss 1.0", "t000 completed   eval_loss 1.0000 at step 2"]})
    assert "progress: 1/4 trials finished, 1 running" in lines[-1] and "ETA" in lines[-1], lines
    progress.on_trial_result(2, [], worker, {"events": ["t001 pruned     eval_loss 2.0000 at step 1"]})
    assert "progress: 2/4 trials finished, 0 running" in lines[-1] and "trials left at the pace so far" in lines[-1], lines[-1]


def test_members_that_do_not_fit_one_forward_train_in_passes_not_checkpointed() -> None:
    """When the members' rows do not fit one forward without checkpointing but passes of at least
    rules.COHORT_PASS_MIN_TOKENS do, the cohort trains in passes without checkpointing (no
    recomputed forward); when even such a pass does not fit, in one checkpointed pass as before."""
    from core.estimate import CohortBudget
    from core.rules import COHORT_PASS_MIN_TOKENS, cohort_passes

    small = _budget_fitting_two_without_checkpointing()
    wide = CohortBudget(profile=small.profile, max_seq_len=1024, fixed={**small.fixed, "batch": (8, 1)}, fold_tokens=0)
    assert wide.shape({}).micro_batch * 1024 == COHORT_PASS_MIN_TOKENS  # each member: one pass's minimum
    budget = CohortBudget(profile=wide.profile, max_seq_len=1024, fixed=wide.fixed, gpu_bytes=wide._need([{}] * 2, False) * 1.01, fold_tokens=0)
    assert budget.step_plan([{}] * 2) == (False, None)  # two fit one forward
    checkpointing, cap = budget.step_plan([{}] * 4)
    assert checkpointing is False and cap is not None and 2 * 8192 <= cap < 3 * 8192, cap
    assert cohort_passes([8192] * 4, cap) == [[0, 1], [2, 3]]
    assert budget.fits([{}] * 4) and budget.need([{}] * 4) <= budget.gpu_bytes < budget._need([{}] * 4, False)
    assert budget.share_gb({}, [{}] * 4) * 4 * 2**30 * (1 + budget.margin) < budget.gpu_bytes  # shares follow the passes
    # a member too large for any pass beside the others: one checkpointed pass, as before
    assert small.step_plan([{}] * 3) == (True, None)


def test_the_worker_splits_micro_steps_into_passes_as_members_come_and_go(tmp_path: Path) -> None:
    """With a GPU share that holds two members' activations but not four, the worker trains four in
    passes without checkpointing, and in one pass again once two have ended."""
    from core.estimate import CohortBudget

    small = _budget_fitting_two_without_checkpointing()
    wide = CohortBudget(profile=small.profile, max_seq_len=1024, fixed={**small.fixed, "batch": (8, 1)}, fold_tokens=0)
    budget = CohortBudget(profile=wide.profile, max_seq_len=1024, fixed=wide.fixed, gpu_bytes=wide._need([{}] * 2, False) * 1.01, fold_tokens=0)
    hypers = [{"lora_r": 16, "max_steps": steps} for steps in (2, 2, 6, 6)]
    source, cohort, _ = work(tmp_path, hypers, capacity=4, budget=budget)
    assert all(s == "completed" for s in status(source).values()) and len(source.ended) == 4
    passes = dict(cohort.passes_by_size)
    assert passes[2] is None and passes[4] is not None and 2 * 8192 <= passes[4] < 3 * 8192, cohort.passes_by_size
    assert cohort.passes_by_size[-1] == (2, None) and not any(on for _, on in cohort.checkpointing_by_size)


def test_workers_ask_the_study_one_at_a_time(tmp_path: Path) -> None:
    """Two workers' study.ask() at once could both pop the same enqueued trial (sqlite; CI saw
    t000 start in two cohorts): StudySource._asking holds a lock shared through the sweep folder."""
    import fcntl
    import threading

    from sweep.cohorts import StudySource

    source = StudySource.__new__(StudySource)  # only the folder matters here
    source.root = tmp_path / "cohorts"
    source.root.mkdir()
    entered = threading.Event()
    with open(source.root / "ask.lock", "a") as other:  # another worker is asking
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
