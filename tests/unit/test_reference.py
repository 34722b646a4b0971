"""Fast must stay right: against a plain Hugging Face Trainer + PEFT run of the same model, adapter
init, data order, optimizer and schedule, (1) a cohort of one member (how every trial trains) gives
the same first 30 training losses within 1e-4, and (2) the plain PEFT loop the cohort's own tests
compare every member with (tests/peft_reference.py) the same 50."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.data import load_split, prepare, train_batches
from trainable.model import lora_target_pattern, load_tokenizer, resolve_model_path

STEPS = 50
MICRO, ACCUM = 2, 2
TRAIN = dict(max_steps=STEPS, eval_every=STEPS, log_every=1, batch=(MICRO, ACCUM), learning_rate=5e-3, warmup_ratio=0.1,
             lr_scheduler="cosine", optimizer="adamw", weight_decay=0.0, max_grad_norm=1.0, lora_r=4, lora_alpha=8,
             lora_dropout=0.0, target_modules="attention", gradient_checkpointing=False, seed=0)  # fmt: skip


def reference_losses(data_dir: str, tmp_path: Path) -> list[float]:
    """HF Trainer + PEFT, fed our micro-batches in our order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3"), dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=lora_target_pattern(model, "attention"), task_type="CAUSAL_LM"))
    stream = train_batches(load_split(data_dir, "train"), MICRO, seed=0, start_micro_batch=0, pad_id=0)
    micro_batches = [next(stream) for _ in range(STEPS * ACCUM)]

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            for b in micro_batches:
                for i in range(MICRO):
                    yield {k: b[k][i] for k in ("input_ids", "labels", "position_ids")}

    def collator(rows: list[dict]) -> dict[str, torch.Tensor]:
        return {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "labels", "position_ids")}

    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        learning_rate=5e-3, lr_scheduler_type="cosine", warmup_steps=5, max_steps=STEPS, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, dataloader_num_workers=0, dataloader_pin_memory=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collator)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


@pytest.fixture(scope="module")
def theirs(data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    return reference_losses(data_dir, tmp_path_factory.mktemp("hf"))


def test_a_cohort_of_one_trains_as_hf_trainer_and_peft(data_dir: str, theirs: list[float]) -> None:
    from trainable.cohort import Cohort

    torch.set_num_threads(1)
    train = TrainSection(**TRAIN)
    c = Cohort("tiny-gemma3", data_dir, train, max_seq_len=128)
    slot = c.add(train)
    while c.members[slot].step < 30:
        c.step()
    c.sync(slot)
    ours = c.members[slot].losses()
    assert len(ours) == 30 and ours[-1] < 0.8 * ours[0]  # it learned, so the comparison means something
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: cohort of one {a:.7f}, HF Trainer {b:.7f}"


def test_the_plain_peft_reference_loop_is_hf_trainer(data_dir: str, theirs: list[float]) -> None:
    from tests.peft_reference import train_alone

    torch.set_num_threads(1)
    ours, _ = train_alone("tiny-gemma3", data_dir, TrainSection(**TRAIN))
    assert len(ours) == len(theirs) == STEPS
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a == pytest.approx(b, rel=1e-4), f"step {step}: PEFT loop {a:.7f}, HF Trainer {b:.7f}"
