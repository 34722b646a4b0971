"""The VRAM estimator: calibrated against H200 measurements, and behaving as memory does."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sweep.config import HYPERPARAMS, load_config
from sweep.readback.estimate import GB, TrialShape, corners, estimate, trial_shape
from tests.conftest import MINIMAL, ROOT, write_space
from trainable.model import meta_model, profile_model

sys.path.insert(0, str(ROOT / "bench"))


def real_size_profile(size: str):
    from realsize import ARCH
    from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    arch = {k: v for k, v in ARCH[size].items() if k not in ("multimodal", "method")}
    text = Gemma3TextConfig(**arch, query_pre_attn_scalar=256, max_position_embeddings=32768, tie_word_embeddings=True)
    with torch.device("meta"):
        if ARCH[size]["multimodal"]:
            vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                        image_size=896, patch_size=14, vision_use_head=False)  # fmt: skip
            model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=256))
        else:
            model = Gemma3ForCausalLM(text)
    return profile_model(model)


@pytest.fixture(scope="module")
def profiles() -> dict:
    return {size: real_size_profile(size) for size in ("1b", "4b", "12b")}


def test_profiles_count_what_they_should(profiles: dict) -> None:
    p1, p12 = profiles["1b"], profiles["12b"]
    assert p1.embedding_params == 262144 * 1152 and p1.tied and p1.vision_linear_params == 0
    assert p1.linears["q_proj"] == (1152, 1024, 26) and p1.linears["down_proj"] == (6912, 1152, 26)
    assert 0.69e9 < p1.decoder_linear_params < 0.71e9
    assert 10.7e9 < p12.decoder_linear_params < 10.8e9 and 0.40e9 < p12.vision_linear_params < 0.42e9


def test_within_6_percent_of_every_h200_measurement(profiles: dict) -> None:
    """bench/results-gemma3-policies-h200.json: 1B/4B LoRA, 12B QLoRA x three embedding policies.
    6% is the accuracy core/estimate.py claims (worst case measured: +5.1%, 1B full)."""
    rows = json.loads((ROOT / "bench" / "results-gemma3-policies-h200.json").read_text())["rows"]
    rows = rows["results"] if isinstance(rows, dict) else rows  # newer files carry {"provenance", "results"}
    assert len(rows) == 9
    for r in rows:
        shape = TrialShape(method=r["method"], embeddings=r["policy"], optimizer="paged_adamw_8bit", micro_batch=1, checkpointing=True, loss="model")
        predicted = estimate(profiles[r["size"]], shape).gb
        assert predicted == pytest.approx(r["peak_vram_gb"], rel=0.06), (r["size"], r["policy"], predicted, r["peak_vram_gb"])


def test_memory_moves_the_right_way(profiles: dict) -> None:
    p = profiles["12b"]
    base = TrialShape(method="lora", micro_batch=4, checkpointing=False, loss="model")
    gb = lambda **kw: estimate(p, replace(base, **kw)).gb  # noqa: E731
    assert gb() - gb(method="qlora") > 15  # 10.8B decoder weights: 2 bytes vs ~0.52
    assert gb(micro_batch=8) > gb() > gb(micro_batch=1)
    assert gb(checkpointing=True) < 0.5 * gb()
    assert gb(loss="chunked") < gb()
    assert gb(embeddings="full") > gb(embeddings="new_tokens") >= gb(embeddings="frozen")
    assert gb(lora_r=64) > gb(lora_r=8)
    assert gb(optimizer="paged_adamw_8bit") < gb(optimizer="adamw")
    assert gb(attn="eager") > gb()


def test_trial_shape_resolves_auto(profiles: dict) -> None:
    text = profiles["1b"].text
    hyper = {"method": "qlora", "lora_r": 8, "target_modules": "attention", "lora_dropout": 0.0, "optimizer": "auto",
             "batch": (16, 2), "gradient_checkpointing": "auto"}  # fmt: skip
    shape = trial_shape(hyper, 1024, text, device_bytes=40 * GB)
    assert shape.optimizer == "paged_adamw_8bit" and shape.checkpointing and shape.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert not trial_shape({**hyper, "batch": (1, 32)}, 1024, text, device_bytes=40 * GB).checkpointing
    assert not trial_shape(hyper, 1024, text, device_bytes=None).checkpointing  # CPU: never


def test_corners_take_the_extremes(tmp_path: Path) -> None:
    body = MINIMAL.replace(
        "  lora_r: [4, 8]\n",
        "  method: [lora, qlora]\n  lora_r: {uniform: [4, 64], step: 4}\n  learning_rate: {loguniform: [1e-5, 1e-3]}\n"
        "  batch: {pairs: [[1, 32], [4, 8], [8, 4]]}\n  target_modules: [attention, all-linear, [q_proj]]\n",
    )
    cfg = load_config(write_space(tmp_path, body))
    rows = corners(cfg.space, {k: getattr(cfg.train, k) for k in HYPERPARAMS})
    assert len(rows) == 2 * 2 * 2 * 2  # learning rate never changes memory
    assert {r["lora_r"] for r in rows} == {4, 64} and {r["batch"] for r in rows} == {(1, 32), (8, 4)}
    assert {r["target_modules"] for r in rows} == {("q_proj",), "all-linear"}


def test_estimate_command(capsys: pytest.CaptureFixture) -> None:
    from sweep.cli import main

    assert main(["estimate", str(ROOT / "search_spaces" / "demo.yaml"), "--gpu-memory", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny-gemma3: 32 corners of the space, seq 256, 1 GB GPU"
    assert len(lines) == 3 + 32 and all(line.endswith("yes") for line in lines[3:])


def test_tiny_profile_matches_the_model() -> None:
    profile = profile_model(meta_model("tiny-gemma3-vision"))
    assert profile.text.hidden == 128 and profile.linears["q_proj"][2] == 2
    assert profile.vision_linear_params > 0 and profile.tied


def test_a_trial_caps_its_memory_to_its_share_of_the_planned_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is share x the GPU size placement planned with (resources.gpu_memory_gb), less the
    CUDA context, as a fraction of the device: 4 logical 35 GB GPUs on one 140 GB device give each
    trial a quarter of it at most."""
    from types import SimpleNamespace

    from core.estimate import CONTEXT_BYTES
    from trainable.device import cap_memory

    device = 140 * GB
    caps: list[float] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=device))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, i: caps.append(f))
    assert cap_memory(0.5) == pytest.approx(0.5 - CONTEXT_BYTES / device)
    assert cap_memory(1.0, 35 * GB) == pytest.approx((35 * GB - CONTEXT_BYTES) / device)
    assert cap_memory(0.5, 35 * GB) == pytest.approx((17.5 * GB - CONTEXT_BYTES) / device)
    assert cap_memory(1.0) is None and cap_memory(1.0, 200 * GB) is None and cap_memory(None) is None  # a whole device: no cap
    assert len(caps) == 3


def test_the_liger_loss_counts_one_chunk_of_bf16_logits(profiles: dict) -> None:
    """liger-kernel's fused loss keeps one chunk of at most rules.LIGER_CHUNK_TOKENS reply tokens'
    logits in bf16 (their gradient written in place), not the chunked loss's 4096 tokens at ~12
    bytes a value: 1 GiB at Gemma 3's vocabulary instead of 12. Measured: the 1B fp32-LoRA liger
    row of results-seed-vs-ours-1b-h200-all.json, +23.6% over before, +0.9% now
    (bench/estimator_error.py)."""
    from core.estimate import cohort_estimate, loss_bytes
    from core.rules import LIGER_CHUNK_TOKENS

    p = profiles["1b"]
    shape = TrialShape(method="lora", micro_batch=8, checkpointing=False, loss="liger", reply_fraction=0.5)
    liger, chunked = estimate(p, shape), estimate(p, replace(shape, loss="chunked"))
    assert liger.parts["logits"] == LIGER_CHUNK_TOKENS * 262144 * 2 == 2**30
    assert chunked.parts["logits"] - liger.parts["logits"] > 10 * GB and liger.parts["activations"] == chunked.parts["activations"]
    assert loss_bytes("liger", 1024, 300, 262144, 2) == 300 * 262144 * 2  # fewer reply tokens than a chunk: all of them
    members = [shape, replace(shape, lora_r=64)]
    assert cohort_estimate(p, members).parts["logits"] == 2**30
    assert cohort_estimate(p, [replace(m, loss="chunked") for m in members]).parts["logits"] > 11 * GB
    # so a cohort running liger trains in larger passes on the same GPU
    from core.estimate import CohortBudget

    fixed = {"method": "lora", "lora_r": 16, "lora_dropout": 0.05, "target_modules": "all-linear", "batch": (2, 4), "optimizer": "auto", "gradient_checkpointing": "auto"}
    plans = {loss: CohortBudget(profile=p, max_seq_len=1024, fixed=fixed, gpu_bytes=79 * GB, loss=loss).step_plan([{}] * 8) for loss in ("chunked", "liger")}
    assert plans["chunked"][0] is plans["liger"][0] is False and plans["liger"][1] > plans["chunked"][1] + 4096, plans
