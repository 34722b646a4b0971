"""The fast step's switches and guarantees: what the schema accepts, liger where it cannot run, no
host sync from our code inside a cohort step, flex_attention on packed rows."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.cohort import Cohort
from trainable.data import prepare
from trainable.fast import liger_unavailable
from trainable.model import load_tokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=128)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


def test_the_switches_default_to_auto_and_are_checked() -> None:
    with pytest.raises(ValidationError, match=r"lora_dtype: bfloat16 needs train.dtype auto or bfloat16 \(got dtype float32\)"):
        TrainSection(lora_dtype="bfloat16", dtype="float32")
    with pytest.raises(ValidationError, match="loss"):
        TrainSection(loss="fused")
    assert TrainSection(loss="liger", lora_dtype="bfloat16", compile=True, attn_implementation="flex_attention").compile is True
    defaults = TrainSection()  # the fastest correct setting for the hardware, decided where it runs (core.rules)
    assert (defaults.loss, defaults.lora_dtype, defaults.compile, defaults.attn_implementation) == ("auto", "auto", "auto", "sdpa")
    assert TrainSection(compile="on").compile is True and TrainSection(compile="off").compile is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_liger_loss_on_cpu_fails_with_a_clear_reason(data_dir: str) -> None:
    assert "needs a CUDA GPU" in liger_unavailable()
    with pytest.raises(RuntimeError, match=r"train.loss: liger: .*needs a CUDA GPU.*use loss: chunked"):
        Cohort("tiny-gemma3", data_dir, TrainSection(loss="liger"), max_seq_len=128)


SYNCS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def test_no_host_sync_from_our_code_inside_a_cohort_step(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every .item()/float()/bool()/tolist() of a tensor during micro-steps between logging windows,
    by calling file: none may come from trainable/ (transformers' own mask building may still ask the
    host). The losses reach the host once per logging window (log_every), not per step."""
    import sys

    for base in (TrainSection(), TrainSection(dtype="bfloat16", lora_dtype="bfloat16")):
        torch.set_num_threads(1)
        c = Cohort("tiny-gemma3", data_dir, base, max_seq_len=128, embeddings="new_tokens", template_ids=(5, 6))
        for r in (4, 8):
            c.add(TrainSection(lora_r=r, target_modules="all-linear", optimizer="adamw", lora_dropout=0.0, batch=(2, 2), log_every=50, max_steps=50, dtype=base.dtype))
        c.step()  # the first step builds what is cached (the dropout generators' state)
        callers: list[str] = []
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def spy(self, *a, _original=original, **k):
                callers.append(sys._getframe(1).f_code.co_filename)
                return _original(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)
        for _ in range(4):  # four more optimizer steps of each member (its two micro-batches fold into one forward)
            c.step()
        monkeypatch.undo()
        ours = [c for c in callers if "/trainable/" in c]
        assert ours == [], f"host syncs from our code inside the step: {ours}"
        assert all(m.step == 5 and m.history == [] for m in c.members.values())  # the losses wait on the device


def test_flex_attention_matches_sdpa_on_packed_rows(data_dir: str) -> None:
    """flex_attention (the block-sparse document mask) gives the loss sdpa gives on the same packed rows."""
    out = {}
    for attn in ("sdpa", "flex_attention"):
        c = Cohort("tiny-gemma3", data_dir, TrainSection(attn_implementation=attn), max_seq_len=128)
        slot = c.add(TrainSection(lora_r=4, target_modules="attention", attn_implementation=attn))
        out[attn] = c.evaluate([slot], batch_size=2)[slot]
    assert out["flex_attention"] == pytest.approx(out["sdpa"], rel=1e-4)


@pytest.mark.parametrize("vocab,width", [(262144, 1152), (262208, 3840), (32000, 4096)])
@pytest.mark.parametrize("tokens", [16, 1000, 2048, 5000, 40000])
def test_liger_chunks_hold_about_liger_chunk_tokens(vocab: int, width: int, tokens: int) -> None:
    """liger's own sizing gives ~230 chunks of 16-32 tokens for a cohort member's few thousand reply
    tokens at Gemma 3's vocabulary, each reading the whole lm_head weight; ours gives chunks of
    LIGER_CHUNK_TOKENS/2 to LIGER_CHUNK_TOKENS (all tokens when fewer; liger's own where those are
    larger, at a small vocabulary)."""
    from trainable.fast import LIGER_CHUNK_TOKENS, liger_chunk, liger_chunk_const

    chunk = liger_chunk(vocab, width, tokens, liger_chunk_const(vocab, width, tokens))
    assert chunk == tokens or LIGER_CHUNK_TOKENS // 2 <= chunk <= LIGER_CHUNK_TOKENS or chunk == liger_chunk(vocab, width, tokens, 1) > LIGER_CHUNK_TOKENS
    if vocab == 262144 and tokens == 5000:
        assert liger_chunk(vocab, width, tokens, 1) == 32  # what liger's default made of it


def test_packed_training_rows_are_padded_to_max_seq_len_on_cuda_only() -> None:
    """One width for packed rows on a GPU (static shapes for the compiled layers, contiguous dropout
    masks); short rows keep their own width; the CPU pads to the longest row, as a trial alone does."""
    from types import SimpleNamespace

    gpu = SimpleNamespace(device=torch.device("cuda"), max_seq_len=1024)
    assert Cohort.train_width(gpu, 1020) == 1024
    assert Cohort.train_width(gpu, 896) == 1024
    assert Cohort.train_width(gpu, 895) == 895
    assert Cohort.train_width(SimpleNamespace(device=torch.device("cpu"), max_seq_len=1024), 1020) == 1020
