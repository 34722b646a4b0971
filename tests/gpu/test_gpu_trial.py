"""One LoRA and one QLoRA trial of the tiny model on a CUDA GPU: bf16, GPU memory metrics."""

from __future__ import annotations

import pytest

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from tests.unit.test_train import ListReporter
from trainable.data import prepare
from trainable.model import load_tokenizer
from trainable.train import TrialSpec, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("method", "optimizer"), [("lora", "adamw"), ("qlora", "paged_adamw_8bit")])
def test_trial_on_gpu(tmp_path, method: str, optimizer: str) -> None:
    tokenizer = load_tokenizer("tiny-gemma3")
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=256)
    folder = str(prepare(section, tokenizer, tmp_path, seed=0, log=lambda s: None).folder)
    train = TrainSection(max_steps=20, eval_every=10, log_every=5, method=method, optimizer=optimizer, learning_rate=1e-2, batch=(8, 1), gradient_checkpointing=True)
    reporter = ListReporter()
    last = run(TrialSpec(model_id="tiny-gemma3", revision=None, data_dir=folder, train=train), reporter)
    assert last["trial_status"] == "completed"
    assert 0 < last["peak_vram_gb"] <= last["peak_vram_reserved_gb"]
    assert "peak_rss_gb" not in last
    assert reporter.reports[0]["derived"]["compute_dtype"] == "bfloat16"
    assert last["eval_loss"] < reporter.reports[0]["eval_loss"]


def test_cuda_graphs_train_as_the_compiled_eager_step(tmp_path) -> None:
    """train.cuda_graphs: the compiled layers replayed as CUDA graphs (reduce-overhead) give the
    losses of the same compiled step launched kernel by kernel, over several optimizer steps with
    gradient accumulation and an eval (a replay must never read a graph output that a later
    replay overwrote)."""
    tokenizer = load_tokenizer("tiny-gemma3")
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=256)
    folder = str(prepare(section, tokenizer, tmp_path, seed=0, log=lambda s: None).folder)
    curves, derived = {}, {}
    for graphs in (False, True):
        train = TrainSection(max_steps=8, eval_every=4, log_every=1, learning_rate=5e-3, batch=(2, 2), lora_dropout=0.0, gradient_checkpointing=False,
                             lora_dtype="bfloat16", compile=True, cuda_graphs=graphs)  # fmt: skip
        reporter = ListReporter()
        last = run(TrialSpec(model_id="tiny-gemma3", revision=None, data_dir=folder, train=train), reporter)
        assert last["trial_status"] == "completed"
        curves[graphs] = [h[1] for r in reporter.reports for h in r["history"]] + [r["eval_loss"] for r in reporter.reports]
        derived[graphs] = reporter.reports[0]["derived"]
    assert derived[True]["cuda_graphs"] == "on"
    assert curves[True] == pytest.approx(curves[False], rel=2e-2)
