"""train.loss in a cohort (trainable/cohort.py): `chunked`, `model` and `liger` compute the same sum of
reply-token cross-entropy for each member (each divided by its own reply tokens); `liger` needs CUDA
and liger-kernel and, without them, a cohort refuses to start in the words a trial alone uses.
Tiny Gemma 3 in fp32 (on the CPU, or on a GPU alike); liger's own kernel runs only in the CUDA test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.cohort import Cohort
from trainable.data import prepare
from trainable.fast import liger_unavailable
from trainable.model import load_tokenizer

SEQ = 128
STEPS = 6
COMMON = dict(max_steps=STEPS, eval_every=STEPS, log_every=1, optimizer="adamw", dtype="float32")
# three members that differ in rank, targets, batch shape, schedule, dropout and seed
MEMBERS = [
    TrainSection(**COMMON, lora_r=4, lora_alpha=8, target_modules="attention", learning_rate=5e-3, batch=(2, 2), lora_dropout=0.0),
    TrainSection(**COMMON, lora_r=8, lora_alpha=32, target_modules="mlp", learning_rate=2e-3, batch=(1, 4), lr_scheduler="linear", lora_dropout=0.1, seed=1),
    TrainSection(**COMMON, lora_r=2, lora_alpha=2, target_modules="all-linear", learning_rate=1e-2, batch=(4, 1), lr_scheduler="constant", lora_dropout=0.0, seed=2),
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=SEQ)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


def template_ids(data_dir: str) -> tuple[int, ...]:
    return tuple(json.loads((Path(data_dir) / "stats.json").read_text())["template_tokens"].values())


def train(data_dir: str, loss: str, members: list[TrainSection] = MEMBERS, **cohort: Any) -> tuple[list[list[float]], dict[int, float]]:
    """Each member's training losses and eval loss, in a cohort computing train.loss `loss`. Chunks
    of 64 tokens: the chunked loss really cuts every forward's reply tokens into several chunks."""
    torch.set_num_threads(1)
    c = Cohort("tiny-gemma3", data_dir, TrainSection(loss=loss, dtype="float32"), max_seq_len=SEQ, chunk_tokens=64, **cohort)
    assert c.loss == loss
    slots = [c.add(t) for t in members]
    while c.running():
        c.step()
    return [c.members[s].losses() for s in slots], c.evaluate()


def assert_same(ours: tuple[list[list[float]], dict[int, float]], theirs: tuple[list[list[float]], dict[int, float]], rel: float) -> None:
    for a, b in zip(ours[0], theirs[0]):
        assert len(a) == len(b) == STEPS and a == pytest.approx(b, rel=rel)
    assert ours[1] == pytest.approx(theirs[1], rel=rel)


def test_model_loss_gives_the_chunked_losses(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """loss: model (every reply position's logits at once, nothing checkpointed) trains three
    different members exactly as the chunked loss (chunks of logits, each checkpointed) does."""
    import torch.utils.checkpoint

    calls = {"chunks": 0}
    inner = torch.utils.checkpoint.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls["chunks"] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    chunked = train(data_dir, "chunked")
    checkpointed = calls["chunks"]
    model = train(data_dir, "model")
    assert checkpointed > STEPS * 4 and calls["chunks"] == checkpointed  # chunked: several checkpointed chunks a step; model: none
    assert chunked[0][0][-1] < chunked[0][0][0]  # it learned
    assert_same(model, chunked, 1e-5)


def test_model_loss_with_new_tokens_members(data_dir: str) -> None:
    """Members training their own rows of the template tokens (their own lm_head columns) get the
    same losses from loss: model as from the chunked loss."""
    ids = template_ids(data_dir)
    members = MEMBERS[:2]
    chunked = train(data_dir, "chunked", members, embeddings="new_tokens", template_ids=ids)
    model = train(data_dir, "model", members, embeddings="new_tokens", template_ids=ids)
    assert_same(model, chunked, 1e-5)


def stand_in_liger(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Any]]:
    """liger-kernel's fused op replaced by the same arithmetic in plain torch (the kernel itself
    needs CUDA): what reaches it, per call, is recorded as (rows, weight)."""
    from trainable import fast

    calls: list[tuple[int, Any]] = []

    def liger_sum(weight: Any, hidden: Any, targets: Any, softcap: float | None) -> Any:
        calls.append((hidden.shape[0], weight))
        logits = F.linear(hidden, weight).float()
        if softcap:
            logits = (logits / softcap).tanh() * softcap
        return F.cross_entropy(logits, targets, reduction="sum")

    monkeypatch.setattr(fast, "require_liger", lambda: None)
    monkeypatch.setattr(fast, "liger_sum", liger_sum)
    return calls


def test_liger_loss_calls_the_fused_op_once_per_member(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """loss: liger in a cohort: one fused call per member and forward, over exactly that member's
    reply tokens (each member its own sum, divided by its own reply tokens): the losses are the
    chunked loss's."""
    chunked = train(data_dir, "chunked")
    calls = stand_in_liger(monkeypatch)
    c = Cohort("tiny-gemma3", data_dir, TrainSection(loss="liger", dtype="float32"), max_seq_len=SEQ, chunk_tokens=64)
    slots = [c.add(t) for t in MEMBERS]
    expected = 0
    while c.running():
        expected += len(c.running())  # one forward of every running member per micro-step
        c.step()
    assert len(calls) == expected
    assert sum(rows for rows, _ in calls) == sum(c.members[s].loss_tokens for s in slots)
    assert_same(([c.members[s].losses() for s in slots], c.evaluate()), chunked, 1e-5)


def test_liger_loss_leaves_new_tokens_members_to_the_chunked_loss(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new_tokens member's lm_head columns are its own, which the fused kernel cannot take: its span
    is computed chunked, and its losses are the chunked loss's."""
    ids = template_ids(data_dir)
    members = MEMBERS[:2]
    chunked = train(data_dir, "chunked", members, embeddings="new_tokens", template_ids=ids)
    calls = stand_in_liger(monkeypatch)
    liger = train(data_dir, "liger", members, embeddings="new_tokens", template_ids=ids)
    assert calls == []
    assert_same(liger, chunked, 1e-5)


def test_liger_loss_multiplies_by_a_full_members_own_copy(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """embeddings: full: the fused op gets the member's trained embedding copy (lm_head through the
    tie), not the frozen base's weight."""
    calls = stand_in_liger(monkeypatch)
    c = Cohort("tiny-gemma3", data_dir, TrainSection(loss="liger", dtype="float32"), max_seq_len=SEQ, embeddings="full")
    slot = c.add(MEMBERS[0])
    c.step()
    assert calls and all(weight is c.members[slot].embedding["embed"] for _, weight in calls)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_liger_loss_on_cpu_fails_at_construction_with_a_trials_words(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cohort refuses loss: liger before it loads any weights, in the words trainable/fast.py
    gives a trial alone (tests/unit/test_fast.py: test_liger_loss_on_cpu_fails_with_a_clear_reason)."""
    import trainable.model

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the base model was loaded before loss: liger was refused")

    monkeypatch.setattr(trainable.model, "_load_base", never)
    with pytest.raises(RuntimeError, match=r"train.loss: liger: .*needs a CUDA GPU.*use loss: chunked") as err:
        Cohort("tiny-gemma3", data_dir, TrainSection(loss="liger"), max_seq_len=SEQ)
    assert str(err.value) == f"train.loss: liger: {liger_unavailable()}"


@pytest.mark.skipif(liger_unavailable() is not None, reason="liger-kernel needs CUDA and the package")
def test_liger_kernel_gives_the_chunked_losses_on_cuda(data_dir: str) -> None:
    """The real fused kernel, three members on a bf16 base: the chunked loss's losses within bf16
    rounding (the two compute the logits in different orders; seen on an H100: 3e-4, eval 5e-5)."""
    members = [t.model_copy(update={"lora_dropout": 0.0, "dtype": "bfloat16"}) for t in MEMBERS]
    runs = {}
    for loss in ("chunked", "liger"):
        c = Cohort("tiny-gemma3", data_dir, TrainSection(loss=loss, dtype="bfloat16", gradient_checkpointing=False), max_seq_len=SEQ)
        slots = [c.add(t) for t in members]
        while c.running():
            c.step()
        runs[loss] = [c.members[s].losses() for s in slots], c.evaluate()
    for a, b in zip(runs["liger"][0], runs["chunked"][0]):
        assert a == pytest.approx(b, rel=3e-3)
    assert runs["liger"][1] == pytest.approx(runs["chunked"][1], rel=1e-3)


def test_auto_loss_is_chunked_without_cuda_or_liger(data_dir: str) -> None:
    """loss: auto, decided as core.rules.loss decides it for a worker."""
    c = Cohort("tiny-gemma3", data_dir, TrainSection(loss="auto"), max_seq_len=SEQ)
    assert c.loss == ("liger" if liger_unavailable() is None else "chunked")
