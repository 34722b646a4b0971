"""One trial on the CPU with the tiny model, through the real worker and cohort (no Ray): what it
reports, how it continues from a checkpoint, OOM and NaN as results, QLoRA with 8-bit Adam and
gradient checkpointing, packing, the target check and the tiny model itself."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from core.request import TrialRequest
from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.cohort_worker import BaseSpec, WorkerSpec, run_worker
from trainable.data import IGNORE, prepare
from trainable.faults import FAULTS_ENV
from trainable.model import check_targets, load_tokenizer

BASE = TrainSection(max_steps=6, eval_every=2, log_every=1, batch=(2, 2), learning_rate=5e-3, lora_r=4, target_modules="attention", lora_dropout=0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    tokenizer = load_tokenizer("tiny-gemma3")
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    return str(prepare(section, tokenizer, tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


class Source:
    """A worker's MemberSource for the trials given (trainable.cohort_worker.MemberSource), kept in lists."""

    def __init__(self, root: Path, tasks: list[TrialRequest], halt_at: int | None = None):
        self.root, self.todo, self.halt_at = root, list(tasks), halt_at
        self.params: dict[str, dict] = {}
        self.reports: list[dict] = []
        self.ended: dict[str, dict] = {}
        self.steps_seen = 0

    def take(self, worker: str, method: str, members: int) -> TrialRequest | None:
        return self.todo.pop(0) if self.todo else None

    def give_back(self, task: TrialRequest) -> None:
        self.todo.append(task)

    def waiting_alone(self, method: str) -> bool:
        return False

    def exhausted(self, method: str) -> bool:
        return not self.todo

    def checkpoint_dir(self, task: TrialRequest) -> str:
        return str(self.root / task.label)

    def begin(self, task: TrialRequest, params: dict) -> None:
        self.params[task.label] = params

    def report(self, task: TrialRequest, metrics: dict) -> bool:
        self.reports.append(metrics)
        return False

    def end(self, task: TrialRequest, metrics: dict) -> None:
        self.ended[task.label] = metrics

    def halt(self) -> str | None:
        # "stop" once a report at halt_at has been made (the STOP file, between evaluations)
        return "stop" if self.halt_at is not None and any(r["step"] >= self.halt_at for r in self.reports) else None


def train_one(data_dir: str, root: Path, train: TrainSection = BASE, task: TrialRequest | None = None, halt_at: int | None = None,
              embeddings: str = "frozen", method: str = "lora") -> Source:  # fmt: skip
    torch.set_num_threads(1)
    source = Source(root, [task or TrialRequest(label="t000", number=0)], halt_at)
    base = BaseSpec(model_id="tiny-gemma3", revision=None, data_dir=data_dir, train=train, max_seq_len=128, embeddings=embeddings, template_ids=(5, 6))
    run_worker(WorkerSpec(base=base, method=method, capacity=1, poll_seconds=0.01), source)
    return source


def test_a_trial_reports_at_every_eval(data_dir: str, tmp_path: Path) -> None:
    source = train_one(data_dir, tmp_path)
    assert [r["step"] for r in source.reports] == [2, 4, 6]
    assert [r["trial_status"] for r in source.reports] == ["running", "running", "completed"]
    for r in source.reports:
        for key in ("eval_loss", "train_loss", "lr", "tokens_per_sec", "loss_tokens_per_sec", "peak_rss_gb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
            assert r[key] > 0 or (key == "lr" and r[key] == 0), key  # cosine ends at 0
        assert "learning_rate" not in r  # the hyperparameter's name; the scheduled rate is lr
    assert [h[0] for r in source.reports for h in r["history"]] == [1, 2, 3, 4, 5, 6]
    params = source.params["t000"]
    assert params["effective_batch"] == 4 and params["trainable_params"] > 0 and params["quantization"] == "none"
    assert params["loss"] == "chunked" and params["loss_reason"] == "auto: no CUDA: the chunked loss" and params["lora_dtype"] == "float32"
    end = source.ended["t000"]
    assert end["trial_status"] == "completed" and end["train_seconds"] > 0 and end["load_seconds"] > 0
    assert source.reports[-1]["eval_loss"] < source.reports[0]["eval_loss"]


@pytest.mark.parametrize("embeddings", ["frozen", "full", "new_tokens"])
def test_a_trial_continues_exactly_from_its_checkpoint(data_dir: str, tmp_path: Path, embeddings: str) -> None:
    """Stopped after its step-2 evaluation (`python -m sweep stop`), then continued by another worker
    from its checkpoint: the same evaluations and losses as a run that was never stopped (dropout too)."""
    from trainable.cohort_worker import latest_checkpoint

    straight = train_one(data_dir, tmp_path / "a", embeddings=embeddings)
    stopped = train_one(data_dir, tmp_path / "b", halt_at=2, embeddings=embeddings)
    assert stopped.ended["t000"]["trial_status"] == "stopped"
    checkpoint = latest_checkpoint(tmp_path / "b" / "t000")
    assert checkpoint is not None and (Path(checkpoint) / "adapter_config.json").is_file()
    resumed = train_one(data_dir, tmp_path / "b", task=TrialRequest(label="t000", number=0, checkpoint=checkpoint), embeddings=embeddings)
    assert [r["step"] for r in resumed.reports] == [4, 6]
    for a, b in zip(straight.reports[1:], resumed.reports):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    assert [e["step"] for e in resumed.reports[0]["evals_replay"]] == [2]  # what it reported before, once more


def test_out_of_memory_and_a_non_finite_loss_are_results(data_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, "oom@3:lora_r=4")
    oom = train_one(data_dir, tmp_path / "oom").ended["t000"]
    assert (oom["trial_status"], oom["step"]) == ("oom", 2) and "out of memory" in oom["error"]
    monkeypatch.setenv(FAULTS_ENV, "nan@3:lora_r=4")
    nan = train_one(data_dir, tmp_path / "nan").ended["t000"]
    assert (nan["trial_status"], nan["step"]) == ("nan", 3) and nan["error"] == "train loss is not finite at step 3"


def test_qlora_with_8bit_adam_and_gradient_checkpointing_on_cpu(data_dir: str, tmp_path: Path) -> None:
    train = BASE.model_copy(update={"method": "qlora", "optimizer": "paged_adamw_8bit", "max_steps": 2, "gradient_checkpointing": True})
    source = train_one(data_dir, tmp_path, train, method="qlora")
    end, params = source.ended["t000"], source.params["t000"]
    assert end["trial_status"] == "completed" and math.isfinite(end["eval_loss"]) and end["eval_loss"] > 0
    assert params["quantization"] == "nf4-double-quant" and params["gradient_checkpointing"] is True and params["optimizer"] == "PagedAdamW8bit"


def test_packing_does_not_leak_across_examples() -> None:
    from transformers import AutoModelForCausalLM

    from trainable.model import resolve_model_path

    tokenizer = load_tokenizer("tiny-gemma3")
    net = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3"), dtype=torch.float32).eval()
    a = torch.tensor([[2, 40, 41, 42, 43, 44]])
    b = torch.tensor([[2, 50, 51, 52]])

    def loss_sum(ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor) -> float:
        with torch.no_grad():
            return float(net(input_ids=ids, position_ids=pos, labels=labels, num_items_in_batch=1, use_cache=False).loss)

    def lab(ids: torch.Tensor) -> torch.Tensor:
        out = ids.clone()
        out[:, 0] = IGNORE
        return out

    separate = loss_sum(a, torch.arange(6)[None], lab(a)) + loss_sum(b, torch.arange(4)[None], lab(b))
    packed_ids = torch.cat([a, b], dim=1)
    packed = loss_sum(packed_ids, torch.cat([torch.arange(6), torch.arange(4)])[None], torch.cat([lab(a), lab(b)], dim=1))
    assert packed == pytest.approx(separate, rel=1e-5)
    # without restarting positions the second example would see the first: the loss changes
    leaky = loss_sum(packed_ids, torch.arange(10)[None], torch.cat([lab(a), lab(b)], dim=1))
    assert leaky != pytest.approx(separate, rel=1e-5)
    assert tokenizer.bos_token_id == 2


def test_target_check_names_the_missing_layers() -> None:
    assert check_targets("tiny-gemma3", ["all-linear", ("q_proj", "v_proj")]) == []
    (problem,) = check_targets("tiny-gemma3", [("q_proj", "qkv")])
    assert problem.startswith("target_modules [q_proj, qkv]: no linear layer named qkv in tiny-gemma3's language model; its linear layers are: down_proj, gate_proj")


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    from trainable.tiny import build

    build(tmp_path / "a")
    build(tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_a_worker_keeps_its_base_and_a_trial_does_not_depend_on_who_came_before(data_dir: str, tmp_path: Path) -> None:
    """Three trials one after another on one worker (one base model load): the third is the first
    again, and trains exactly as it did, whatever the second (another rank, a high rate) did."""
    first = TrialRequest(label="t000", number=0, hyper={"lora_r": 4})
    other = TrialRequest(label="t001", number=1, hyper={"lora_r": 8, "learning_rate": 5e-2})
    again = TrialRequest(label="t002", number=2, hyper={"lora_r": 4})
    torch.set_num_threads(1)
    source = Source(tmp_path, [first, other, again])
    loads: list[Any] = []

    def counted(spec: WorkerSpec) -> Any:
        from trainable.cohort_worker import _load_cohort

        loads.append(spec)
        return _load_cohort(spec)

    base = BaseSpec(model_id="tiny-gemma3", revision=None, data_dir=data_dir, train=BASE, max_seq_len=128)
    run_worker(WorkerSpec(base=base, method="lora", capacity=1, poll_seconds=0.01), source, make_cohort=counted)
    assert len(loads) == 1 and {m["trial_status"] for m in source.ended.values()} == {"completed"}
    assert source.ended["t002"]["eval_loss"] == source.ended["t000"]["eval_loss"] != source.ended["t001"]["eval_loss"]
    assert source.ended["t002"]["load_seconds"] < source.ended["t000"]["load_seconds"]  # only the first paid for the base
