"""A cohort of ONE member is a trial alone: every trial runs as a cohort member, so a cohort of one
must train as its plain PEFT model does (tests/peft_reference.py; tests/unit/test_reference.py ties
that to Hugging Face Trainer and a plain cohort of one to both), including what only a trial alone did:
- model.embeddings: full (a trainable copy of the whole embedding, tied to lm_head);
- train.lora_dtype: float32 on a bf16 base (PEFT's fp32 adapter: x cast up, the update cast back).
CPU, tiny Gemma 3, fp32 unless said otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from tests.peft_reference import summed_loss, train_alone
from trainable.cohort import Cohort
from trainable.data import collate, prepare
from trainable.loss import loss_positions
from trainable.model import load_tokenizer, resolve_model_path

SEQ = 128
STEPS = 30
FULL = dict(max_steps=STEPS, eval_every=STEPS, log_every=1, lora_dropout=0.0, lora_r=4, lora_alpha=8, target_modules="attention",
            learning_rate=5e-3, batch=(2, 2), warmup_ratio=0.1, weight_decay=0.01, optimizer="adamw", seed=1)  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=SEQ)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


def alone(model_id: str, data_dir: str, train: TrainSection, embeddings: str = "frozen") -> tuple[list[float], float]:
    """(train losses, final eval loss) of the trial alone: its plain PEFT model."""
    return train_alone(model_id, data_dir, train, max_seq_len=SEQ, embeddings=embeddings)


def train_all(c: Cohort) -> None:
    while c.running():
        c.step()


def assert_same_losses(ours: list[float], theirs: list[float], rel: float, what: str) -> None:
    assert len(ours) == len(theirs) > 0
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a == pytest.approx(b, rel=rel), f"step {step}: cohort {a:.7f}, {what} {b:.7f}"


def eval_rows_loss(c: Cohort, slot: int, model: Any, rows: list[int]) -> tuple[float, float]:
    """(the cohort member's mean eval loss on `rows`, `model`'s on the same rows)."""
    batch = collate(c.eval_ds[rows], c.pad_id)
    index, targets = loss_positions(batch["labels"])
    with torch.no_grad():
        theirs = float(summed_loss(model, batch["input_ids"], batch["position_ids"], index, targets)) / index.numel()
    full_eval = c.eval_ds
    c.eval_ds = c.eval_ds.select(rows)
    try:
        ours = c.evaluate([slot], batch_size=len(rows))[slot]
    finally:
        c.eval_ds = full_eval
    return ours, theirs


# ------------------------------------------------------------------------------------------------
# model.embeddings: full


@pytest.mark.parametrize("model_id", ["tiny-gemma3", "tiny-gemma3-vision"])
def test_a_full_embeddings_member_trains_as_the_trial_alone(data_dir: str, model_id: str) -> None:
    """embeddings: full in a cohort of one: the member trains a copy of the whole input embedding
    (and lm_head through the tie), as PEFT's modules_to_save does for the trial alone: the same 30
    losses and eval loss within 1e-4; the base's embedding is never written, and is back in the
    model once the member leaves (a later member starts from it)."""
    torch.set_num_threads(1)
    train = TrainSection(**FULL)
    c = Cohort(model_id, data_dir, TrainSection(), max_seq_len=SEQ, embeddings="full")
    base_embed, base_head = c.model.get_input_embeddings(), c.model.get_output_embeddings()
    assert base_head.weight is base_embed.weight  # Gemma 3 ties them
    before = base_embed.weight.detach().clone()
    slot = c.add(train)
    member = c.members[slot]
    copy = member.embedding["embed"]
    assert list(member.embedding) == ["embed"] and copy.requires_grad and copy.dtype == before.dtype  # one tied copy, PEFT's dtype
    assert member.params[0] is copy  # the optimizer's order is PEFT's: the embedding copy first
    assert c.model.get_input_embeddings() is not base_embed and c.model.get_input_embeddings().weight is copy
    train_all(c)
    ours, evals = member.losses(), c.evaluate()
    theirs, their_eval = alone(model_id, data_dir, train, embeddings="full")
    assert ours[-1] < 0.9 * ours[0]
    assert_same_losses(ours, theirs, 1e-4, "alone")
    assert evals[slot] == pytest.approx(their_eval, rel=1e-4)
    assert not torch.equal(copy.detach(), before)  # the copy trained ...
    assert torch.equal(base_embed.weight, before) and not base_embed.weight.requires_grad  # ... the base did not
    c.remove(slot)
    assert c.model.get_input_embeddings() is base_embed and c.model.get_output_embeddings() is base_head
    again = c.add(train)  # the same trial again: it starts from the untouched base
    while c.members[again].step < 2:
        c.step()
    c.sync(again)
    assert c.members[again].losses() == pytest.approx(ours[:2], rel=1e-6)


def test_a_full_embeddings_member_runs_alone(data_dir: str) -> None:
    c = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="full")
    c.add(TrainSection(**FULL), name="first")
    with pytest.raises(ValueError, match="member 'first' trains the whole embedding matrix, and a full member runs alone"):
        c.add(TrainSection(**FULL), name="second")
    assert len(c.members) == 1
    frozen = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ)
    with pytest.raises(ValueError, match=r"full trains the whole embedding matrix; such a trial runs alone, not in a cohort .*embeddings='full'"):
        frozen.add(TrainSection(**FULL), embeddings="full")
    with pytest.raises(ValueError, match="model.embeddings: 'everything'; expected frozen, new_tokens, full or auto"):
        Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="everything")


def test_a_full_embeddings_member_saves_as_peft_and_restores_exactly(data_dir: str, tmp_path: Path) -> None:
    """save() writes the member as PEFT writes a modules_to_save trial: PeftModel.from_pretrained on
    the base gives the cohort's logits; restore() continues it exactly (losses after restore equal an
    uninterrupted run's), and the embedding copy is stored once (in the PEFT file)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    train = TrainSection(**{**FULL, "max_steps": 10})
    uninterrupted = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="full", fold_tokens=0)
    ref_slot = uninterrupted.add(train)
    train_all(uninterrupted)

    c = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="full", fold_tokens=0)
    slot = c.add(train)
    while not (c.members[slot].step >= 4 and c.members[slot].pending):  # saved mid-accumulation: as of its last optimizer step
        c.step()
    c.save(slot, tmp_path / "m")
    config = (tmp_path / "m" / "adapter_config.json").read_text()
    assert '"modules_to_save"' in config and '"embed_tokens"' in config and '"ensure_weight_tying": true' in config
    assert not any(k.startswith("full") or "embed" in k for k in torch.load(tmp_path / "m" / "adapter.pt", weights_only=True))

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "m")).eval()
    rows = list(range(4))
    batch = collate(c.eval_ds[rows], c.pad_id)
    with torch.no_grad():
        theirs = peft(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        c.model.eval()
        c.split.segments = ((slot, 0, len(rows)),)  # every row is the member's
        hidden = c.model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).last_hidden_state
        ours = c.whole.head(hidden)
        c.split.segments = ()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    ours_loss, peft_loss = eval_rows_loss(c, slot, peft, rows)
    assert ours_loss == pytest.approx(peft_loss, rel=1e-5)

    c.remove(slot)
    again = c.restore(tmp_path / "m")
    assert c.members[again].step == 4
    train_all(c)
    assert c.members[again].losses() == pytest.approx(uninterrupted.members[ref_slot].losses(), rel=1e-6)
    torch.testing.assert_close(c.members[again].embedding["embed"], uninterrupted.members[ref_slot].embedding["embed"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# train.lora_dtype on a bf16 base


BF16 = dict(max_steps=STEPS, eval_every=STEPS, log_every=1, lora_dropout=0.0, lora_r=8, lora_alpha=16, target_modules="all-linear",
            learning_rate=5e-3, batch=(2, 2), warmup_ratio=0.1, optimizer="adamw", dtype="bfloat16")  # fmt: skip


def test_lora_dtype_float32_on_a_bf16_base_trains_as_the_trial_alone(data_dir: str) -> None:
    """lora_dtype float32 on a bf16 base: a cohort of one computes its LoRA updates as PEFT does for
    the trial alone (fp32 adapters: x cast up, the update cast back), so their 30 losses agree within
    1e-5 (seen: ~2e-7); computed in bf16 (lora_dtype bfloat16) they drift measurably (seen: ~4e-4).
    One micro-batch per forward (fold_tokens 0), as the trial alone: bf16 results depend on the
    batch shape, not only on each row."""
    torch.set_num_threads(1)
    train = TrainSection(**BF16)
    theirs, _ = alone("tiny-gemma3", data_dir, train.model_copy(update={"lora_dtype": "float32"}))
    curves = {}
    for lora_dtype in ("float32", "bfloat16"):
        c = Cohort("tiny-gemma3", data_dir, TrainSection(dtype="bfloat16", lora_dtype=lora_dtype), max_seq_len=SEQ, fold_tokens=0)
        slot = c.add(train)
        lora = next(iter(c.members[slot].layers.values()))
        assert lora.compute[0].dtype == (torch.float32 if lora_dtype == "float32" else torch.bfloat16) and c.lora_dtype == lora_dtype
        train_all(c)
        curves[lora_dtype] = c.members[slot].losses()
    assert theirs[-1] < 0.8 * theirs[0]
    assert_same_losses(curves["float32"], theirs, 1e-5, "alone (fp32 LoRA)")
    drift = max(abs(a - b) / b for a, b in zip(curves["bfloat16"], theirs))
    assert drift > 1e-5, "bf16 LoRA products should differ from PEFT's fp32 ones: this test could not tell them apart"


def test_lora_dtype_float32_member_exports_to_pefts_forward_on_a_bf16_base(data_dir: str, tmp_path: Path) -> None:
    """The exported member, loaded by PEFT on the bf16 base (fp32 adapters), gives the cohort's eval
    loss: the fp32 LoRA forward is PEFT's, operation for operation."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    c = Cohort("tiny-gemma3", data_dir, TrainSection(dtype="bfloat16", lora_dtype="float32"), max_seq_len=SEQ)
    slot = c.add(TrainSection(**{**BF16, "max_steps": 4}))
    train_all(c)
    c.save(slot, tmp_path / "m")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3"), dtype=torch.bfloat16)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "m")).eval()
    assert {p.dtype for n, p in peft.named_parameters() if "lora_" in n} == {torch.float32}
    ours, theirs = eval_rows_loss(c, slot, peft, list(range(4)))
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_auto_lora_dtype_follows_the_base() -> None:
    from trainable.fast import resolve_lora_dtype

    assert resolve_lora_dtype("auto", torch.bfloat16) == "bfloat16" and resolve_lora_dtype("auto", torch.float32) == "float32"
    assert resolve_lora_dtype("auto", "float16") == "float32" and resolve_lora_dtype("bfloat16", "bfloat16") == "bfloat16"
    assert resolve_lora_dtype("float32", torch.bfloat16) == "float32"
    assert resolve_lora_dtype("bfloat16", torch.float32) == "float32"  # nothing to gain on an fp32 base, as a trial alone
    with pytest.raises(ValueError, match="train.lora_dtype: 'float8'; expected auto, bfloat16 or float32"):
        resolve_lora_dtype("float8", torch.bfloat16)


def test_fp32_lora_on_bf16_activations_is_pefts_arithmetic() -> None:
    """The multi-adapter layer with fp32 adapters on bf16 x computes what PEFT's LoRA Linear computes
    for an fp32 adapter on a bf16 layer (differentiated by autograd): result = base(x) (bf16);
    result = result + B(A(x.float())) * scaling (fp32); result.to(bf16). Same outputs and
    gradients for x, A and B, per member, with a gap and a member without an adapter in the batch."""
    from trainable.multi_lora import MemberLora, MultiLoraLinear, RowSplit

    torch.manual_seed(0)
    split = RowSplit(segments=((0, 0, 2), (1, 2, 3), (2, 3, 6)), max_len=9)
    base = torch.nn.Linear(24, 40, bias=False).requires_grad_(False).to(torch.bfloat16)
    layer = MultiLoraLinear(base, split)
    for slot, r in ((0, 4), (2, 8)):
        lora = MemberLora(24, 40, r, 2 * r, 0.0, compute_dtype=torch.float32)
        with torch.no_grad():
            lora.lora_A.normal_()
            lora.lora_B.normal_()
        layer.adapters[str(slot)] = lora
    x = torch.randn(7, 5, 24).to(torch.bfloat16)  # one row beyond the members': nobody's
    weight = torch.linspace(-1, 1, 40)

    def backward(out: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        (out.float() * weight).sum().backward()
        return [x.grad] + [p.grad for slot in ("0", "2") for p in (layer.adapters[slot].lora_A, layer.adapters[slot].lora_B)]

    ours_x = x.clone().requires_grad_(True)
    ours = layer(ours_x)
    ours_grads = [g.clone() for g in backward(ours, ours_x)]
    layer.zero_grad(set_to_none=True)

    theirs_x = x.clone().requires_grad_(True)
    pieces = []
    for start, stop, slot in ((0, 2, "0"), (2, 3, None), (3, 6, "2"), (6, 7, None)):
        result = base(theirs_x[start:stop])
        if slot is not None:
            lora = layer.adapters[slot]
            result = (result + (theirs_x[start:stop].float() @ lora.lora_A.t() @ lora.lora_B.t()) * lora.scaling).to(torch.bfloat16)
        pieces.append(result)
    theirs = torch.cat(pieces)
    theirs_grads = backward(theirs, theirs_x)
    assert ours.dtype == torch.bfloat16 and ours_grads[0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in ours_grads[1:])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for mine, peft in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(mine, peft, rtol=1e-5, atol=1e-5 * float(peft.abs().max()))
