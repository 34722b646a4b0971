"""Trials of the tiny model on a CUDA GPU, through the real worker and cohort: LoRA and QLoRA in
bf16 with GPU memory metrics and the fast step's `auto` settings; compiled layers train as eager."""

from __future__ import annotations

import pytest
import torch

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from tests.unit.test_train import train_one
from trainable.data import prepare
from trainable.model import load_tokenizer

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


@pytest.mark.parametrize(("method", "optimizer"), [("lora", "adamw"), ("qlora", "paged_adamw_8bit")])
def test_trial_on_gpu(folder: str, tmp_path, method: str, optimizer: str) -> None:
    import importlib.util

    train = TrainSection(max_steps=20, eval_every=10, log_every=5, method=method, optimizer=optimizer, learning_rate=1e-2, batch=(8, 1), gradient_checkpointing=True)
    source = train_one(folder, tmp_path, train, method=method)
    end, params = source.ended["t000"], source.params["t000"]
    assert end["trial_status"] == "completed"
    assert 0 < end["peak_vram_gb"] <= end["peak_vram_reserved_gb"] and "peak_rss_gb" not in end
    assert params["compute_dtype"] == "bfloat16" and params["lora_dtype"] == "bfloat16"  # auto on a bf16 base
    assert params["loss"] == ("liger" if importlib.util.find_spec("liger_kernel") else "chunked"), params["loss_reason"]
    assert source.reports[-1]["eval_loss"] < source.reports[0]["eval_loss"]


def test_compiled_layers_train_as_eager(folder: str) -> None:
    """train.compile: the decoder layers compiled around the members' adapters give the eager losses
    (bf16, so within bf16 rounding), over optimizer steps with accumulation and members coming in."""
    from trainable.cohort import Cohort

    curves = {}
    for compiled in (False, True):
        c = Cohort("tiny-gemma3", folder, TrainSection(compile=compiled, loss="chunked"), max_seq_len=128)
        a = c.add(TrainSection(lora_r=8, lora_dropout=0.0, batch=(2, 2), max_steps=6, learning_rate=5e-3))
        for _ in range(2):
            c.step()
        b = c.add(TrainSection(lora_r=4, lora_dropout=0.0, batch=(4, 1), max_steps=4, learning_rate=5e-3, seed=1))
        while c.running():
            c.step()
        curves[compiled] = c.members[a].losses() + c.members[b].losses() + list(c.evaluate([a, b]).values())
        assert c.compiled_layers == (c.model.config.get_text_config().num_hidden_layers if compiled else 0)
    assert torch.tensor(curves[True]).isfinite().all()
    assert curves[True] == pytest.approx(curves[False], rel=2e-2)
