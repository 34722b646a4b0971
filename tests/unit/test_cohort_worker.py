"""The worker loop (trainable/cohort_worker.py) with a fake cohort and a fake source, and the cohort
memory estimate it fills a GPU by. The source on a real study: tests/unit/test_engine.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.schema import TrainSection
from core.request import TrialRequest
from trainable.cohort_worker import BaseSpec, WorkerSpec, latest_checkpoint, run_worker
from trainable.faults import FAULTS_ENV

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
        self.todo = [TrialRequest(label=f"t{i:03d}", number=i, hyper=h) for i, h in enumerate(hypers)]
        self.queue: list[TrialRequest] = []
        self.root, self.prune = root, prune or (lambda label, step: False)
        self.begun: list[str] = []
        self.reports: list[tuple[str, int]] = []
        self.ended: dict[str, dict] = {}
        self.given_back: list[str] = []

    def take(self, worker: str, method: str, members: int) -> TrialRequest | None:
        for task in self.queue:
            if not task.alone or members == 0:
                self.queue.remove(task)
                return task
        return self.todo.pop(0) if self.todo else None

    def give_back(self, task: TrialRequest) -> None:
        self.given_back.append(task.label)
        self.queue.append(task)

    def waiting_alone(self, method: str) -> bool:
        return any(t.alone for t in self.queue)

    def exhausted(self, method: str) -> bool:
        return not self.todo and not self.queue

    def checkpoint_dir(self, task: TrialRequest) -> str:
        return str(self.root / task.label)

    def begin(self, task: TrialRequest, params: dict) -> None:
        self.begun.append(task.label)
        assert params["cohort"] == "w0" and params["cohort_size"] >= 1

    def report(self, task: TrialRequest, metrics: dict) -> bool:
        self.reports.append((task.label, metrics["step"]))
        return self.prune(task.label, metrics["step"])

    def end(self, task: TrialRequest, metrics: dict) -> None:
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

    spec = WorkerSpec(base=BaseSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=capacity, poll_seconds=0.01, budget=budget)
    run_worker(spec, source, lambda events: lines.extend(e["text"] for e in events), make_cohort=make)
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
    source.queue = [TrialRequest(label="t000", number=0, hyper={"lora_r": 4}, checkpoint=checkpoint)]
    cohort = FakeCohort()
    spec = WorkerSpec(base=BaseSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=1, poll_seconds=0.01)
    run_worker(spec, source, make_cohort=lambda s: cohort)
    assert source.reports == [("t000", 6)] and status(source) == {"t000": "completed"}
    assert [h[0] for h in source.ended["t000"]["history"]] == [1, 2, 3, 4, 5, 6]  # replayed once, then new steps
    assert [e["step"] for e in source.ended["t000"]["evals_replay"]] == [2, 4]


def test_a_continued_member_saved_again_at_the_same_step_keeps_its_checkpoint(tmp_path: Path) -> None:
    """A member continued from step N and saved again at N before its next optimizer step (here:
    saved at its last step, its end never recorded; also a stop mid-accumulation, or a shed)
    keeps the step-N checkpoint as it is. It was removed and written again, and a worker killed
    in between (here: the write fails) left the trial no checkpoint: `resume` started it over."""
    work(tmp_path, [{"lora_r": 4}], capacity=1)  # completes: its checkpoint at its last step, 6
    checkpoint = latest_checkpoint(tmp_path / "t000")
    assert checkpoint and checkpoint.endswith("step-000006")
    source = FakeSource([], tmp_path)
    source.queue = [TrialRequest(label="t000", number=0, hyper={"lora_r": 4}, checkpoint=checkpoint)]
    cohort = FakeCohort()

    def killed(slot: int, folder: Path) -> None:
        raise RuntimeError("the worker was killed while it wrote the checkpoint")

    cohort.save = killed  # type: ignore[method-assign]
    spec = WorkerSpec(base=BaseSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=1, poll_seconds=0.01)
    run_worker(spec, source, make_cohort=lambda s: cohort)
    assert status(source) == {"t000": "completed"} and latest_checkpoint(tmp_path / "t000") == checkpoint


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
    source.queue = [TrialRequest(label=x, number=i, hyper={"lora_r": r}, checkpoint=latest_checkpoint(tmp_path / x)) for i, (x, r) in enumerate((("t000", 4), ("t001", 8)))]
    cohort = FakeCohort()
    spec = WorkerSpec(base=BaseSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=2, poll_seconds=0.01)
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
    spec = WorkerSpec(base=BaseSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=2, poll_seconds=0.01)
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


def test_a_worker_that_loses_its_driver_leaves_its_members_open(tmp_path: Path) -> None:
    """tune.report failing (the driver or Ray went away): the worker stops, and its members stay open
    in the study for a retry or `resume`, not ended as failed; a training error does end them failed."""
    source = FakeSource([{"lora_r": 4}, {"lora_r": 8}], tmp_path)
    calls = [0]

    def emit(events: list) -> None:
        calls[0] += 1
        if calls[0] > 1:
            raise ConnectionError("GCS unreachable")

    spec = WorkerSpec(base=BaseSpec(model_id="fake", revision=None, data_dir="-", train=TRAIN), method="lora", capacity=2, poll_seconds=0.01)
    with pytest.raises(ConnectionError, match="GCS unreachable"):
        run_worker(spec, source, emit, make_cohort=lambda s: FakeCohort())
    assert source.begun == ["t000", "t001"] and source.ended == {}

    class Broken(FakeCohort):
        def step(self) -> dict[int, int]:
            raise ValueError("a bug in the step")

    source = FakeSource([{"lora_r": 4}], tmp_path)
    with pytest.raises(ValueError, match="a bug in the step"):
        run_worker(spec, source, lambda events: None, make_cohort=lambda s: Broken())
    assert status(source) == {"t000": "failed"} and "a bug in the step" in source.ended["t000"]["error"]


def test_the_worker_budgets_for_the_loss_it_runs(tmp_path: Path) -> None:
    """The driver plans with the configured loss (auto: it cannot know whether a worker has liger);
    the worker's budget counts the one its cohort resolved, and leaves a budget alone otherwise."""
    from trainable.cohort_worker import _Worker

    budget = _budget_fitting_two_without_checkpointing()
    assert budget.loss == "chunked"

    class Resolved:
        loss = "liger"

    spec = WorkerSpec(base=BaseSpec(model_id="m", revision=None, data_dir=str(tmp_path), train=TRAIN, max_seq_len=512), method="lora", capacity=2, budget=budget)
    worker = _Worker(spec, FakeSource([], tmp_path), Resolved(), 0.0, lambda *a: None)
    assert worker.spec.budget.loss == "liger" and worker.spec.budget.gpu_bytes == budget.gpu_bytes
    assert worker.spec.budget.need([{}] * 2) < budget.need([{}] * 2)
    assert _Worker(spec, FakeSource([], tmp_path), FakeCohort(), 0.0, lambda *a: None).spec.budget is budget  # a cohort without a resolved loss
