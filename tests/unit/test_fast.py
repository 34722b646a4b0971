"""The fast-step switches (trainable/fast.py) on CPU with the tiny model: bf16 LoRA with fp32 masters,
option validation, no host syncs inside an optimizer step, regional compilation, resume."""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from pydantic import ValidationError

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.data import load_split, prepare, train_batches
from trainable.fast import MasterWeights, compile_layers, liger_unavailable, prepare as prepare_fast
from trainable.model import load_model, load_tokenizer
from trainable.train import TrialSpec, build_optimizer, build_schedule, optimizer_step, run


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
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


def spec(data_dir: str, **train: Any) -> TrialSpec:
    values = {"max_steps": 8, "eval_every": 4, "log_every": 1, "batch": (2, 2), "learning_rate": 5e-3, "lora_r": 4, "lora_alpha": 8,
              "target_modules": "all-linear", "lora_dropout": 0.0, "optimizer": "adamw", **train}  # fmt: skip
    return TrialSpec(model_id="tiny-gemma3", revision=None, data_dir=data_dir, train=TrainSection(**values))


def losses(reporter: ListReporter) -> list[float]:
    return [h[1] for r in reporter.reports for h in r["history"]]


# ----------------------------------------------------------------------------------------------
# bf16 LoRA, fp32 masters


def test_master_weights_keep_fp32_and_accumulate_in_fp32() -> None:
    layer = torch.nn.Linear(8, 4, bias=False)
    init = layer.weight.detach().clone()
    masters = MasterWeights([layer.weight], torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and masters.masters[0].dtype == torch.float32
    assert torch.equal(masters.masters[0], init)  # the master starts at the fp32 init, not its bf16 rounding
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    for _ in range(2):  # two micro-batches: the gradient accumulates in the fp32 master
        layer(x).float().sum().backward()
    assert layer.weight.grad is None
    grad = masters.masters[0].grad
    assert grad.dtype == torch.float32
    assert torch.allclose(grad, 2 * x.float().sum(0).expand(4, 8), rtol=1e-2)
    opt = torch.optim.SGD(masters.optimizer_params([layer.weight]), lr=0.1)
    opt.step()
    masters.copy_to_model()
    assert torch.equal(layer.weight.detach(), masters.masters[0].detach().to(torch.bfloat16))


def test_bf16_lora_matches_fp32_lora(data_dir: str) -> None:
    """bf16 base + bf16 LoRA (fp32 masters) against bf16 base + fp32 LoRA and an all-fp32 run."""
    runs = {}
    for name, train in {"fp32": {}, "bf16 base": {"dtype": "bfloat16"}, "bf16 lora": {"dtype": "bfloat16", "lora_dtype": "bfloat16"}}.items():
        reporter = ListReporter()
        run(spec(data_dir, **train), reporter)
        runs[name] = losses(reporter)
        if name == "bf16 lora":
            assert reporter.reports[0]["derived"]["lora_dtype"].startswith("bfloat16")
    assert len(runs["bf16 lora"]) == 8
    assert runs["bf16 lora"][-1] < 0.9 * runs["bf16 lora"][0]  # it learns
    for step, (a, b, c) in enumerate(zip(runs["bf16 lora"], runs["bf16 base"], runs["fp32"]), start=1):
        assert a == pytest.approx(b, rel=2e-2), f"step {step}: bf16 LoRA {a:.4f}, fp32 LoRA on bf16 base {b:.4f}"
        assert a == pytest.approx(c, rel=3e-2), f"step {step}: bf16 LoRA {a:.4f}, all fp32 {c:.4f}"


def test_bf16_lora_resumes_from_its_fp32_masters(data_dir: str, tmp_path: Path) -> None:
    full = ListReporter(keep_dir=tmp_path)
    run(spec(data_dir, dtype="bfloat16", lora_dtype="bfloat16"), full)
    resumed = ListReporter(restore_from=tmp_path / "step4")
    run(spec(data_dir, dtype="bfloat16", lora_dtype="bfloat16"), resumed)
    assert [r["step"] for r in resumed.reports] == [8]
    assert resumed.reports[0]["eval_loss"] == pytest.approx(full.reports[1]["eval_loss"], rel=1e-4)


def test_bf16_lora_on_an_fp32_model_keeps_fp32_and_says_so() -> None:
    train = TrainSection(lora_r=4, target_modules="attention", lora_dtype="bfloat16")  # dtype auto: fp32 on a CPU
    loaded = load_model("tiny-gemma3", train)
    step = prepare_fast(loaded.model, train, loaded.dtype)
    assert step.masters is None and "float32 (compute dtype is float32" in step.info["lora_dtype"]


# ----------------------------------------------------------------------------------------------
# options


def test_lora_dtype_bf16_needs_a_bf16_compute_dtype() -> None:
    with pytest.raises(ValidationError, match=r"lora_dtype: bfloat16 needs train.dtype auto or bfloat16 \(got dtype float32\)"):
        TrainSection(lora_dtype="bfloat16", dtype="float32")
    with pytest.raises(ValidationError, match="loss"):
        TrainSection(loss="fused")
    assert TrainSection(loss="liger", lora_dtype="bfloat16", compile=True, attn_implementation="flex_attention").compile is True
    defaults = TrainSection()  # every switch off by default: a sweep's behaviour does not change
    assert (defaults.loss, defaults.lora_dtype, defaults.compile, defaults.attn_implementation) == ("chunked", "float32", False, "sdpa")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_liger_loss_on_cpu_fails_with_a_clear_reason(data_dir: str) -> None:
    assert "needs a CUDA GPU" in liger_unavailable()
    with pytest.raises(RuntimeError, match=r"train.loss: liger: .*needs a CUDA GPU.*use loss: chunked"):
        run(spec(data_dir, loss="liger"), ListReporter())


# ----------------------------------------------------------------------------------------------
# the step


SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def test_no_host_sync_from_our_code_inside_an_optimizer_step(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every .item()/float()/bool()/tolist() of a tensor during one optimizer step, by calling file:
    none may come from trainable/ (transformers' own mask building may still ask the host once)."""
    import sys

    for train in (TrainSection(lora_r=4, target_modules="all-linear", optimizer="adamw"),
                  TrainSection(lora_r=4, target_modules="all-linear", optimizer="adamw", dtype="bfloat16", lora_dtype="bfloat16")):  # fmt: skip
        loaded = load_model("tiny-gemma3", train, embeddings="new_tokens", template_ids=[5, 6])
        fast = prepare_fast(loaded.model, train, loaded.dtype)
        optimizer = build_optimizer(fast.optimizer_params([p for p in loaded.model.parameters() if p.requires_grad]), train, loaded.device)
        schedule = build_schedule(optimizer, train)
        batches = train_batches(load_split(data_dir, "train"), 2, 0, 0, 0)
        batch_list = [next(batches) for _ in range(2)]
        callers: list[str] = []
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def spy(self, *a, _original=original, **k):
                callers.append(sys._getframe(1).f_code.co_filename)
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
        loss = optimizer_step(loaded.model, batch_list, loaded.device, train, optimizer, schedule, fast)
        monkeypatch.undo()
        ours = [c for c in callers if "/trainable/" in c]
        assert ours == [], f"host syncs from our code inside the step: {ours}"
        assert torch.isfinite(loss)


def test_compiled_layers_give_the_same_loss(data_dir: str) -> None:
    from trainable.train import summed_batch_loss, to_device

    train = TrainSection(lora_r=4, target_modules="all-linear")
    loaded = load_model("tiny-gemma3", train)
    batch = to_device(next(train_batches(load_split(data_dir, "train"), 2, 0, 0, 0)), loaded.device)
    eager = summed_batch_loss(loaded.model, batch, "chunked")
    assert compile_layers(loaded.model, backend="aot_eager") == loaded.model.config.get_text_config().num_hidden_layers
    compiled = summed_batch_loss(loaded.model, batch, "chunked")
    compiled.backward()  # the backward graph runs too
    assert float(compiled) == pytest.approx(float(eager), rel=1e-5)
    assert any(p.grad is not None for p in loaded.model.parameters() if p.requires_grad)


def test_flex_attention_matches_sdpa_on_packed_rows(data_dir: str) -> None:
    """flex_attention (the block-sparse document mask) gives the loss sdpa gives on the same packed rows."""
    from trainable.train import summed_batch_loss, to_device

    batch = next(train_batches(load_split(data_dir, "train"), 2, 0, 0, 0))
    out = {}
    for attn in ("sdpa", "flex_attention"):
        train = TrainSection(lora_r=4, target_modules="attention", attn_implementation=attn, reuse_base_model=False)
        loaded = load_model("tiny-gemma3", train)
        with torch.no_grad():
            out[attn] = float(summed_batch_loss(loaded.model, to_device(batch, loaded.device), "chunked"))
    assert out["flex_attention"] == pytest.approx(out["sdpa"], rel=1e-4)


def test_spec_carries_the_switches(data_dir: str) -> None:
    s = replace(spec(data_dir), sampled={}).with_sampled({"lora_r": 8})
    assert s.train.lora_dtype == "float32" and s.train.compile is False


def test_cuda_graphs_need_compile_and_say_why_they_are_off_without_cuda(data_dir: str) -> None:
    with pytest.raises(ValidationError, match="cuda_graphs: true replays the compiled layers, so it needs train.compile: true"):
        TrainSection(cuda_graphs=True, lora_dtype="bfloat16")
    with pytest.raises(ValidationError, match="cuda_graphs: true needs train.lora_dtype: bfloat16"):
        TrainSection(cuda_graphs=True, compile=True)
    train = TrainSection(lora_r=4, target_modules="all-linear", compile=True, cuda_graphs=True, lora_dtype="bfloat16", dtype="bfloat16")
    loaded = load_model("tiny-gemma3", train)
    fast = prepare_fast(loaded.model, train, loaded.dtype)  # compiles lazily: nothing is built without a forward
    assert fast.cuda_graphs is False and fast.info["cuda_graphs"] == "off (no CUDA device (the model is on cpu))"
    assert fast.info["compiled_layers"] == loaded.model.config.get_text_config().num_hidden_layers
    fast.begin_forward()  # a no-op without graphs


def test_cuda_graphs_are_off_with_gradient_checkpointing() -> None:
    """Checkpointing re-runs each layer inside the backward, which a replayed graph cannot."""
    from trainable.fast import cuda_graphs_off_reason

    model = torch.nn.Linear(2, 2)
    assert cuda_graphs_off_reason(model) == "no CUDA device (the model is on cpu)"
    assert cuda_graphs_off_reason(model, masters=False).startswith("LoRA is not in bf16 with fp32 masters")
    model.is_gradient_checkpointing = True  # as transformers' PreTrainedModel reports it
    assert cuda_graphs_off_reason(model).startswith("gradient checkpointing is on")


def test_a_trial_that_recorded_cuda_graphs_drops_them_at_its_end(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm worker keeps the base for the next trial: graphs recorded for this trial's adapter
    tensors (and their memory pool) go with the trial; a trial without graphs keeps the compile caches."""
    import torch._dynamo

    from trainable import fast

    resets: list[int] = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    run(spec(data_dir, max_steps=2, eval_every=2), ListReporter())
    assert resets == []  # no graphs: nothing dropped
    monkeypatch.setattr(fast, "_GRAPHS_RECORDED", True)  # as prepare() sets it on a GPU (CPU trials never record)
    run(spec(data_dir, max_steps=2, eval_every=2), ListReporter())
    assert resets == [1] and fast._GRAPHS_RECORDED is False
