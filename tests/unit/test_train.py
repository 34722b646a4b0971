"""One trial on CPU with the tiny model: metrics, resume, packing, OOM and NaN as results."""

from __future__ import annotations

import math
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.data import IGNORE, prepare
from trainable.model import check_targets, load_model, load_tokenizer
from trainable.train import TrialSpec, run


class ListReporter:
    def __init__(self, keep_dir: Path | None = None, restore_from: Path | None = None):
        self.reports: list[dict[str, Any]] = []
        self.keep_dir, self.restore_from = keep_dir, restore_from

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)
        if checkpoint_dir and self.keep_dir:
            shutil.copytree(checkpoint_dir, self.keep_dir / f"step{metrics['step']}")

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        yield str(self.restore_from) if self.restore_from else None


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    tokenizer = load_tokenizer("tiny-gemma3")
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    return str(prepare(section, tokenizer, tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


def spec(data_dir: str, **train: Any) -> TrialSpec:
    values = {"max_steps": 6, "eval_every": 2, "log_every": 1, "batch": (2, 2), "learning_rate": 5e-3, "lora_r": 4, "target_modules": "attention", **train}
    return TrialSpec(model_id="tiny-gemma3", revision=None, data_dir=data_dir, train=TrainSection(**values))


def test_a_trial_reports_at_every_eval(data_dir: str) -> None:
    reporter = ListReporter()
    last = run(spec(data_dir), reporter)
    steps = [r["step"] for r in reporter.reports]
    assert steps == [2, 4, 6]
    assert [r["trial_status"] for r in reporter.reports] == ["running", "running", "completed"]
    for r in reporter.reports:
        for key in ("eval_loss", "train_loss", "lr", "tokens_per_sec", "loss_tokens_per_sec", "peak_rss_gb"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
            assert r[key] > 0 or (key == "lr" and r[key] == 0), key  # cosine ends at 0
        assert "learning_rate" not in r  # the hyperparameter's name; the scheduled rate is lr
    assert [h[0] for r in reporter.reports for h in r["history"]] == [1, 2, 3, 4, 5, 6]
    derived = reporter.reports[0]["derived"]
    assert derived["effective_batch"] == 4 and derived["trainable_params"] > 0 and derived["quantization"] == "none"
    assert "derived" not in reporter.reports[1]
    assert last["train_seconds"] > 0 and last["load_seconds"] > 0
    assert reporter.reports[-1]["eval_loss"] < reporter.reports[0]["eval_loss"]


@pytest.mark.parametrize("embeddings", ["frozen", "full", "new_tokens"])
def test_resume_continues_exactly(data_dir: str, tmp_path: Path, embeddings: str) -> None:
    full = ListReporter(keep_dir=tmp_path)
    run(replace(spec(data_dir, lora_dropout=0.1), embeddings=embeddings, template_ids=(5, 6)), full)
    assert (tmp_path / "step2" / "adapter_config.json").exists()
    resumed = ListReporter(restore_from=tmp_path / "step2")
    run(replace(spec(data_dir, lora_dropout=0.1), embeddings=embeddings, template_ids=(5, 6)), resumed)
    assert [r["step"] for r in resumed.reports] == [4, 6]
    for a, b in zip(full.reports[1:], resumed.reports):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


def test_a_trial_restored_from_its_final_checkpoint_reports_it_completed(data_dir: str, tmp_path: Path) -> None:
    """The driver died between the trial's last checkpoint and recording its completion: the
    resumed trial says again how it ended, instead of ending without a result (read as stopped)."""
    full = ListReporter(keep_dir=tmp_path)
    run(spec(data_dir), full)
    resumed = ListReporter(restore_from=tmp_path / "step6")
    last = run(spec(data_dir), resumed)
    assert len(resumed.reports) == 1 and last["trial_status"] == "completed" and last["step"] == 6
    assert last["eval_loss"] == full.reports[-1]["eval_loss"]
    assert [e["step"] for e in last["evals_replay"]] == [2, 4, 6] and [h[0] for h in last["history"]] == [1, 2, 3, 4, 5, 6]
    assert "derived" in last and last["train_seconds"] > 0


def test_packing_does_not_leak_across_examples() -> None:
    tokenizer = load_tokenizer("tiny-gemma3")
    loaded = load_model("tiny-gemma3", TrainSection(lora_r=4, target_modules="attention"))
    net = loaded.model.eval()
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


def _poison(monkeypatch: pytest.MonkeyPatch, at_call: int, make: Any) -> None:
    """Make the training loss misbehave from the n-th training micro-batch on."""
    import trainable.train as train_module

    real, calls = train_module.summed_batch_loss, {"n": 0}

    def patched(model: Any, batch: Any, impl: str) -> Any:
        calls["n"] += model.training  # count training micro-batches only
        loss = real(model, batch, impl)
        return make(loss) if calls["n"] >= at_call and model.training else loss

    monkeypatch.setattr(train_module, "summed_batch_loss", patched)


def test_out_of_memory_is_a_result(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(loss: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    _poison(monkeypatch, at_call=7, make=oom)  # 2 micro-batches per step: fails in step 4
    reporter = ListReporter()
    last = run(spec(data_dir), reporter)
    assert last == {"step": 3, "trial_status": "oom", "error": "CUDA out of memory. Tried to allocate 20.00 GiB"}
    assert [r["trial_status"] for r in reporter.reports] == ["running", "oom"]


def test_non_finite_loss_stops_the_trial(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, at_call=5, make=lambda loss: loss * float("nan"))
    reporter = ListReporter()
    last = run(spec(data_dir), reporter)
    assert last["trial_status"] == "nan" and last["step"] == 3 and "train loss is nan at step 3" in last["error"]


@pytest.mark.parametrize("embeddings", ["frozen", "new_tokens", "full"])
@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_chunked_loss_matches_the_models_own(model_id: str, embeddings: str) -> None:
    from trainable.data import collate
    from trainable.loss import summed_loss

    loaded = load_model(model_id, TrainSection(lora_r=4, lora_dropout=0.0), embeddings=embeddings, template_ids=[5, 6])
    model = loaded.model
    rows = {
        "input_ids": [[2, 5, 40, 41, 6, 5, 50, 51, 52, 6, 2, 60, 61], [2, 70, 71, 72]],
        "labels": [[IGNORE, IGNORE, IGNORE, 41, 6, IGNORE, IGNORE, 51, 52, 6, IGNORE, IGNORE, 61], [IGNORE, 70, IGNORE, 72]],
        "position_ids": [list(range(10)) + [0, 1, 2], [0, 1, 2, 3]],
    }
    batch = collate(rows, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    ours = loss_and_grads(lambda: summed_loss(model, batch["input_ids"], batch["position_ids"], batch["loss_index"], batch["targets"], chunk_tokens=3))
    theirs = loss_and_grads(lambda: model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"], num_items_in_batch=1, use_cache=False).loss)
    assert batch["loss_tokens"] == 8
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_qlora_on_cpu(data_dir: str) -> None:
    import bitsandbytes as bnb

    loaded = load_model("tiny-gemma3", TrainSection(method="qlora", lora_r=4, target_modules="all-linear"))
    base = loaded.model.get_base_model()
    assert isinstance(base.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert loaded.info["quantization"] == "nf4-double-quant"
    reporter = ListReporter()
    last = run(spec(data_dir, method="qlora", optimizer="paged_adamw_8bit", max_steps=2), reporter)
    assert last["trial_status"] == "completed" and math.isfinite(last["eval_loss"]) and last["eval_loss"] > 0


def test_gradient_checkpointing_and_8bit_adam(data_dir: str) -> None:
    base = load_model("tiny-gemma3", TrainSection(gradient_checkpointing=True, lora_r=4)).model.get_base_model()
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    last = run(spec(data_dir, gradient_checkpointing=True, optimizer="adamw_8bit", max_steps=2), ListReporter())
    assert last["trial_status"] == "completed"


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


def test_base_model_reuse_leaks_nothing(data_dir: str) -> None:
    """A trial's result does not depend on what ran before it in the same worker."""
    from trainable.model import clear_base_cache

    clear_base_cache()
    a = replace(spec(data_dir, lora_dropout=0.1), embeddings="new_tokens", template_ids=(5, 6))
    first = ListReporter()
    run(a, first)
    for other in (
        replace(spec(data_dir, lora_r=8, learning_rate=5e-2, gradient_checkpointing=True, max_steps=2), embeddings="full"),
        replace(spec(data_dir, lora_r=4, target_modules="all-linear", max_steps=2), embeddings="new_tokens", template_ids=(5, 6)),
    ):
        run(other, ListReporter())
    again = ListReporter()
    run(a, again)
    assert first.reports[0]["derived"]["base_model_reused"] is False
    assert again.reports[0]["derived"]["base_model_reused"] is True
    assert again.reports[-1]["load_seconds"] < first.reports[-1]["load_seconds"]
    for x, y in zip(first.reports, again.reports):
        assert x["eval_loss"] == y["eval_loss"] and x["train_loss"] == y["train_loss"]
        assert [h[1] for h in x["history"]] == [h[1] for h in y["history"]]


def test_a_trial_that_died_mid_way_leaves_no_adapter_behind(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainable import model as model_module
    from trainable.model import clear_base_cache

    clear_base_cache()
    reference = ListReporter()
    run(spec(data_dir, max_steps=2), reference)

    # a trial killed between reports (as Tune stops one): no release() runs
    def stop(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    broken = ListReporter()
    monkeypatch.setattr(broken, "report", stop)
    with pytest.raises(KeyboardInterrupt):
        run(replace(spec(data_dir, max_steps=2, lora_r=8), embeddings="full"), broken)
    (entry,) = model_module._BASE_CACHE.values()
    assert entry["wrapped"] is not None  # its adapter is still on the cached base
    again = ListReporter()
    run(spec(data_dir, max_steps=2), again)
    assert again.reports[0]["derived"]["base_model_reused"] is True
    assert again.reports[-1]["eval_loss"] == reference.reports[-1]["eval_loss"]
