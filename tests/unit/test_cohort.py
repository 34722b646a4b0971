"""A cohort of trials on one base model (issue 15) trains each member as it would train alone.

"Alone" is the member's trial as a plain PEFT model (tests/peft_reference.py: its own TrainSection,
PEFT's adapter, train_batches' data order, its optimizer and schedule), fp32 on the CPU, tiny Gemma 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sweep.config import DataSection, TrainSection
from tests.conftest import DEMO_DATA
from trainable.cohort import Cohort
from trainable.data import prepare
from tests.peft_reference import peft_model, summed_loss, train_alone
from trainable.model import load_tokenizer

SEQ = 128
STEPS = 30
COMMON = dict(max_steps=STEPS, eval_every=STEPS, log_every=1, lora_dropout=0.0)
# four members that differ in everything a member may differ in
MEMBERS = [
    TrainSection(**COMMON, lora_r=4, lora_alpha=8, target_modules="attention", learning_rate=5e-3, batch=(2, 2), lr_scheduler="cosine", warmup_ratio=0.1),
    TrainSection(**COMMON, lora_r=8, lora_alpha=32, target_modules="mlp", learning_rate=2e-3, batch=(1, 4), lr_scheduler="linear", seed=1),
    TrainSection(**COMMON, lora_r=2, lora_alpha=2, target_modules=("q_proj", "v_proj"), learning_rate=1e-2, batch=(4, 1), lr_scheduler="constant", weight_decay=0.1, max_grad_norm=0.5),
    TrainSection(**COMMON, lora_r=16, lora_alpha=8, target_modules="all-linear", learning_rate=3e-3, batch=(2, 3), warmup_ratio=0.2, seed=2),
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=SEQ)
    return str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)


def cohort(data_dir: str, fold_tokens: int | None = None, **base: Any) -> Cohort:
    torch.set_num_threads(1)
    fold = {} if fold_tokens is None else {"fold_tokens": fold_tokens}
    return Cohort("tiny-gemma3", data_dir, TrainSection(**base), max_seq_len=SEQ, **fold)


def train_until(c: Cohort, done: Any) -> None:
    while c.running() and not done():
        c.step()


def test_a_member_starts_from_pefts_init(data_dir: str) -> None:
    c = cohort(data_dir)
    train = TrainSection(lora_r=4, lora_alpha=8, target_modules=("q_proj", "down_proj"), seed=3)
    member = c.members[c.add(train)]
    peft = dict(peft_model("tiny-gemma3", train)[0].named_parameters())
    assert len(member.layers) == 4  # 2 layers x 2 targets
    for name, lora in member.layers.items():
        assert torch.equal(lora.lora_A, peft[f"base_model.model.{name}.lora_A.default.weight"]), name
        assert torch.equal(lora.lora_B, peft[f"base_model.model.{name}.lora_B.default.weight"]), name


def test_four_different_members_each_train_as_alone(data_dir: str) -> None:
    c = cohort(data_dir)
    slots = [c.add(t, name=f"m{i}") for i, t in enumerate(MEMBERS)]
    train_until(c, lambda: False)
    evals = c.evaluate()
    for slot, train in zip(slots, MEMBERS):
        theirs, their_eval = train_alone("tiny-gemma3", data_dir, train, max_seq_len=SEQ)
        ours = c.members[slot].losses()
        assert len(ours) == len(theirs) == STEPS
        assert theirs[-1] < 0.9 * theirs[0]  # it learned: the comparison means something
        for step, (a, b) in enumerate(zip(ours, theirs), start=1):
            assert a == pytest.approx(b, rel=1e-4), f"member {slot} step {step}: cohort {a:.6f}, alone {b:.6f}"
        assert evals[slot] == pytest.approx(their_eval, rel=1e-4)
        assert c.members[slot].status == "completed"


def test_folding_micro_batches_changes_forwards_not_results(data_dir: str) -> None:
    """A member's micro-batches folded into fewer forwards (core.rules.cohort_fold) give the losses
    of one micro-batch per forward: the loss is normalised over the whole optimizer step."""
    from core.rules import cohort_fold

    assert cohort_fold(1, 8, 1024) == 8 and cohort_fold(2, 8, 4096) == 2 and cohort_fold(1, 6, 1024, 4096) == 3
    assert cohort_fold(4, 3, 8192) == 1 and cohort_fold(8, 1, 1024) == 1 and cohort_fold(1, 8, 1024, 0) == 1
    members = [t.model_copy(update={"max_steps": 6}) for t in MEMBERS]
    runs = {}
    for fold_tokens in (0, 10**6):
        c = cohort(data_dir, fold_tokens=fold_tokens)
        slots = [c.add(t) for t in members]
        forwards = 0
        while c.running():
            c.step()
            forwards += 1
        runs[fold_tokens] = ([c.members[s].losses() for s in slots], forwards)
    (unfolded, n0), (folded, n1) = runs[0], runs[10**6]
    assert n1 == 6 < n0 == 6 * 4  # the slowest member (1 x 4) took 4 forwards a step; folded, one
    for a, b in zip(folded, unfolded):
        assert a == pytest.approx(b, rel=1e-5)


def grads(c: Cohort, rows: dict[int, list[int]]) -> dict[int, list[torch.Tensor]]:
    for m in c.members.values():
        m.optimizer.zero_grad(set_to_none=True)
    c.forward_backward(rows, {s: 100 for s in rows})
    return {s: [p.grad.clone() for p in c.members[s].params] for s in rows}


def test_no_leakage_between_members(data_dir: str) -> None:
    c = cohort(data_dir)
    for train in MEMBERS[:3]:
        c.add(train.model_copy(update={"lora_dropout": 0.1}))
    c.step()  # B is no longer zero: every member's update is live
    for m in c.members.values():
        m.optimizer.step()
    rows = {0: [0, 1], 1: [2], 2: [3, 4, 5]}
    before = grads(c, rows)  # both passes use the dropout seeds of the last micro-step: the same masks
    after = grads(c, {**rows, 0: [7, 8, 9]})  # member 0: other rows, another row count (another padding width)
    assert any(not torch.equal(a, b) for a, b in zip(before[0], after[0]))
    for slot in (1, 2):
        for a, b in zip(before[slot], after[slot]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_replace_a_member_mid_run(data_dir: str) -> None:
    short = [t.model_copy(update={"max_steps": 12}) for t in MEMBERS[:3]]
    reference = cohort(data_dir)
    for t in short:
        reference.add(t)
    train_until(reference, lambda: False)

    c = cohort(data_dir)
    for t in short:
        c.add(t)
    train_until(c, lambda: c.members[1].step >= 5)
    gone = c.remove(1)
    assert gone.step == 5 and all("1" not in layer.adapters for layer in c.layers.values())
    newcomer = MEMBERS[3].model_copy(update={"max_steps": 6})
    assert c.add(newcomer, name="new") == 1
    train_until(c, lambda: False)
    for slot in (0, 2):
        assert c.members[slot].losses() == pytest.approx(reference.members[slot].losses(), rel=1e-5)
    # the newcomer trains as it would have from the start of a cohort
    fresh = cohort(data_dir)
    fresh.add(newcomer)
    train_until(fresh, lambda: False)
    assert c.members[1].losses() == pytest.approx(fresh.members[0].losses(), rel=1e-5)


def test_dropout_masks_survive_gradient_checkpointing(data_dir: str) -> None:
    """Recomputation in backward draws the same dropout masks as the forward did."""
    runs = []
    for checkpointing in (False, True):
        c = cohort(data_dir, gradient_checkpointing=checkpointing)
        for t in MEMBERS[:2]:
            c.add(t.model_copy(update={"lora_dropout": 0.2, "max_steps": 3}))
        train_until(c, lambda: False)
        runs.append([[p.detach().clone() for p in m.params] for m in c.members.values()])
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_qlora_nf4_base_on_cpu(data_dir: str) -> None:
    import bitsandbytes as bnb

    c = cohort(data_dir, method="qlora")
    assert isinstance(c.layers["model.layers.0.self_attn.q_proj"].base, bnb.nn.Linear4bit)
    for t in MEMBERS[:2]:
        c.add(t.model_copy(update={"method": "qlora", "max_steps": 3, "optimizer": "adamw"}))
    c.add(MEMBERS[2].model_copy(update={"method": "qlora", "max_steps": 3, "optimizer": "paged_adamw_8bit", "lora_dropout": 0.1}))
    train_until(c, lambda: False)
    for m in c.members.values():
        assert m.status == "completed" and len(m.losses()) == 3 and all(x == x for x in m.losses())
    assert all(v == v for v in c.evaluate().values())
    with pytest.raises(ValueError, match="train.method: 'lora', but this cohort's base is 'qlora'"):
        c.add(MEMBERS[0])


def test_checkpoint_and_restore_one_member(data_dir: str, tmp_path: Path) -> None:
    members = [t.model_copy(update={"max_steps": 10, "lora_dropout": 0.1}) for t in MEMBERS[:3]]
    reference = cohort(data_dir, fold_tokens=0)  # dropout masks are drawn per forward: fold alike everywhere
    for t in members:
        reference.add(t)
    train_until(reference, lambda: False)

    c = cohort(data_dir, fold_tokens=0)  # one micro-batch per forward: a save can fall mid-accumulation
    for t in members:
        c.add(t)
    # saved mid-accumulation: the checkpoint is the member as of its last optimizer step
    train_until(c, lambda: c.members[1].step >= 4 and c.members[1].pending)
    c.save(1, tmp_path / "m1")
    c.remove(1)
    other = cohort(data_dir, fold_tokens=0)  # restored into a different cohort, beside a different member
    other.add(MEMBERS[3].model_copy(update={"max_steps": 4}))
    slot = other.restore(tmp_path / "m1")
    assert other.members[slot].step == 4
    train_until(other, lambda: False)
    assert other.members[slot].losses() == pytest.approx(reference.members[1].losses(), rel=1e-5)


def test_a_checkpoint_keeps_the_log_window_in_progress(data_dir: str, tmp_path: Path) -> None:
    """log_every 3: a member saved at step 5 (a stop between two logged steps) and continued logs
    steps 3, 6, 9 with the losses of an uninterrupted run: the window in progress (steps 4 and 5)
    travels in the checkpoint; no extra entry at the stop's step."""
    train = MEMBERS[0].model_copy(update={"max_steps": 9, "log_every": 3})
    straight = cohort(data_dir)
    slot = straight.add(train)
    train_until(straight, lambda: False)
    assert [h[0] for h in straight.members[slot].history] == [3, 6, 9]
    c = cohort(data_dir)
    first = c.add(train)
    train_until(c, lambda: c.members[first].step >= 5)
    c.save(first, tmp_path / "m")
    assert [h[0] for h in c.members[first].history] == [3] and [w[0] for w in c.members[first].window] == [4, 5]
    other = cohort(data_dir)
    again = other.restore(tmp_path / "m")
    train_until(other, lambda: False)
    assert [h[0] for h in other.members[again].history] == [3, 6, 9]
    assert other.members[again].losses() == pytest.approx(straight.members[slot].losses(), rel=1e-5)


def test_a_member_checkpoint_loads_with_plain_peft(data_dir: str, tmp_path: Path) -> None:
    """Cohort.save writes the adapter as PEFT does: PeftModel.from_pretrained on the base model
    computes what the member computes in the cohort (`best --export` of a cohort sweep uses it)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainable.model import resolve_model_path

    c = cohort(data_dir)
    slot = c.add(MEMBERS[3].model_copy(update={"max_steps": 3}))
    other = c.add(MEMBERS[0].model_copy(update={"max_steps": 3}))
    train_until(c, lambda: False)
    c.save(slot, tmp_path / "m")
    assert (tmp_path / "m" / "adapter_config.json").is_file() and (tmp_path / "m" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "m")).eval()
    assert any(p.abs().sum() > 0 for n, p in peft.named_parameters() if "lora_B" in n)  # trained weights, not PEFT's zeros
    from trainable.data import collate
    from trainable.loss import loss_positions

    rows = list(range(4))
    batch = collate(c.eval_ds[rows], c.pad_id)
    index, targets = loss_positions(batch["labels"])
    with torch.no_grad():
        total = summed_loss(peft, batch["input_ids"], batch["position_ids"], index, targets)
    alone = float(total) / index.numel()
    ours = c.evaluate([slot, other], batch_size=4)  # beside another member, as in the sweep
    c.eval_ds = c.eval_ds.select(rows)
    assert c.evaluate([slot, other], batch_size=4)[slot] == pytest.approx(alone, rel=1e-5)
    assert ours[slot] != pytest.approx(ours[other], rel=1e-3)  # the members differ: the comparison means something


def test_embedding_policies_a_cohort_refuses(data_dir: str) -> None:
    c = cohort(data_dir)
    with pytest.raises(ValueError) as err:
        c.add(TrainSection(target_modules=("q_proj", "qkv")), embeddings="full")
    assert "runs alone, not in a cohort" in str(err.value) and "no linear layer named qkv" in str(err.value)
    with pytest.raises(ValueError, match="this cohort's members train frozen embeddings"):
        c.add(TrainSection(), embeddings="new_tokens")


def template_ids(data_dir: str) -> tuple[int, ...]:
    import json

    return tuple(json.loads((Path(data_dir) / "stats.json").read_text())["template_tokens"].values())


def test_new_tokens_members_each_train_their_own_rows_as_alone(data_dir: str) -> None:
    """model.embeddings: new_tokens in a cohort: each member trains its own rows of the template
    tokens (input embedding and, through the tie, lm_head's columns), as PEFT's TrainableTokens does
    for the same trial alone: same losses within 1e-4; one member's rows never move another's."""
    ids = template_ids(data_dir)
    assert ids, "the demo data uses template tokens"
    torch.set_num_threads(1)
    c = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="new_tokens", template_ids=ids)
    members = [t.model_copy(update={"max_steps": 8}) for t in MEMBERS[:2]]
    slots = [c.add(t, name=f"m{i}") for i, t in enumerate(members)]
    start = {s: c.members[s].token_rows["embed"].detach().clone() for s in slots}
    assert torch.equal(start[slots[0]], c.model.get_input_embeddings().weight[list(ids)].float())  # PEFT's init: the base rows
    train_until(c, lambda: False)
    for slot, train in zip(slots, members):
        theirs, _ = train_alone("tiny-gemma3", data_dir, train, max_seq_len=SEQ, embeddings="new_tokens", template_ids=ids)
        ours = c.members[slot].losses()
        assert len(ours) == len(theirs) == 8
        for step, (a, b) in enumerate(zip(ours, theirs), start=1):
            assert a == pytest.approx(b, rel=1e-4), f"member {slot} step {step}: cohort {a:.6f}, alone {b:.6f}"
        assert not torch.equal(c.members[slot].token_rows["embed"], start[slot])  # its rows trained
    assert not torch.equal(c.members[slots[0]].token_rows["embed"], c.members[slots[1]].token_rows["embed"])


def test_new_tokens_member_exports_and_restores(data_dir: str, tmp_path: Path) -> None:
    """A new_tokens member's checkpoint restores its rows, and loads with plain PEFT
    (trainable_token_indices) to the eval loss it has in the cohort."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainable.data import collate
    from trainable.loss import loss_positions
    from trainable.model import resolve_model_path

    ids = template_ids(data_dir)
    c = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="new_tokens", template_ids=ids)
    slot = c.add(MEMBERS[1].model_copy(update={"max_steps": 3}))
    train_until(c, lambda: False)
    c.save(slot, tmp_path / "m")
    other = Cohort("tiny-gemma3", data_dir, TrainSection(), max_seq_len=SEQ, embeddings="new_tokens", template_ids=ids)
    again = other.restore(tmp_path / "m")
    assert torch.equal(other.members[again].token_rows["embed"], c.members[slot].token_rows["embed"])

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-gemma3"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "m")).eval()
    rows = list(range(4))
    batch = collate(c.eval_ds[rows], c.pad_id)
    index, targets = loss_positions(batch["labels"])
    with torch.no_grad():
        alone = float(summed_loss(peft, batch["input_ids"], batch["position_ids"], index, targets)) / index.numel()
    c.eval_ds = c.eval_ds.select(rows)
    assert c.evaluate([slot], batch_size=4)[slot] == pytest.approx(alone, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# the multi-adapter layer itself: gradients, the bf16 path, no fp32 copy of the activations


def multi_layer(dtype: torch.dtype, dropout: float = 0.1) -> tuple[Any, Any]:
    """A frozen 24->40 linear with three members (two on it, one without an adapter there) on 2+1+3 rows."""
    from trainable.multi_lora import MemberLora, MultiLoraLinear, RowSplit

    torch.manual_seed(0)
    split = RowSplit(segments=((0, 0, 2), (1, 2, 3), (2, 3, 6)), dropout_seeds={0: 11, 2: 22}, max_len=9)
    base = torch.nn.Linear(24, 40, bias=False).requires_grad_(False)
    layer = MultiLoraLinear(base, split, layer_id=3)
    for slot, r in ((0, 4), (2, 8)):
        lora = MemberLora(24, 40, r, 2 * r, dropout, compute_dtype=dtype)
        with torch.no_grad():
            lora.lora_A.normal_()
            lora.lora_B.normal_()
        lora.refresh()
        layer.adapters[str(slot)] = lora
    layer.to(dtype=dtype) if dtype == torch.float64 else layer.base.to(dtype)
    return layer, torch.randn(6, 7, 24, dtype=dtype)  # padded width 7 < max_len 9


def test_layer_gradients_match_autograd_with_dropout() -> None:
    """The hand-written backward (masks drawn again, not kept) against torch.autograd.gradcheck (fp64)."""
    layer, x = multi_layer(torch.float64, dropout=0.3)
    loras = [layer.adapters[k] for k in ("0", "2")]
    for lora in loras:
        lora.compute = (lora.lora_A, lora.lora_B)

    def f(x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        for lora, a, b in zip(loras, params[::2], params[1::2]):
            lora.lora_A, lora.lora_B = a, b  # plain tensors stand in for the parameters
            lora.compute = (a, b)
        return layer(x)

    params = [t.detach().clone().requires_grad_(True) for lora in loras for t in (lora.lora_A, lora.lora_B)]
    for module in loras:
        del module._parameters["lora_A"], module._parameters["lora_B"]
    assert torch.autograd.gradcheck(f, (x.clone().requires_grad_(True), *params), eps=1e-6, atol=1e-5)
    # and the dropout is live: the masks differ between members, layers and micro-steps
    out = f(x, *params)
    layer.split.dropout_seeds = {0: 12, 2: 22}
    again = f(x, *params)
    assert not torch.equal(out[:2], again[:2]) and torch.equal(out[2:], again[2:])


def test_bf16_path_matches_fp32_within_bf16_tolerance() -> None:
    ref, x = multi_layer(torch.float32)
    fast, _ = multi_layer(torch.bfloat16)
    assert fast.adapters["0"].compute[0].dtype == torch.bfloat16 and fast.adapters["0"].lora_A.dtype == torch.float32
    outs, grads = [], []
    for layer, xi in ((ref, x), (fast, x.bfloat16())):
        xi = xi.clone().requires_grad_(True)
        out = layer(xi)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        outs.append(out.detach().float())
        grads.append([xi.grad.float()] + [p.grad for p in layer.adapters.parameters()])
    assert all(g.dtype == torch.float32 for g in grads[1][1:])  # the parameters' gradients stay fp32
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=1e-2 * float(outs[0].abs().max()))
    for g32, g16 in zip(*grads):
        torch.testing.assert_close(g16, g32, rtol=2e-2, atol=2e-2 * float(g32.abs().max()))


def test_bf16_path_makes_no_fp32_copy_of_x() -> None:
    """Every tensor the layer's forward and backward create in fp32 is at most an adapter's size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer, x = multi_layer(torch.bfloat16)
    x = x.bfloat16().requires_grad_(True)
    largest_param = max(p.numel() for p in layer.adapters.parameters())

    class Fp32Outputs(TorchDispatchMode):
        sizes: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    self.sizes.append((str(func), t.numel()))
            return out

    mode = Fp32Outputs()
    with mode:
        layer(x).sum().backward()
    assert all(n <= largest_param for _, n in mode.sizes), mode.sizes
    assert len(mode.sizes) >= 4  # the fp32 gradients of two members' A and B


def test_bf16_cohort_trains_like_fp32_cohort(data_dir: str) -> None:
    curves = []
    for dtype in ("float32", "bfloat16"):
        c = cohort(data_dir, dtype=dtype)
        for t in MEMBERS[:2]:
            c.add(t.model_copy(update={"dtype": dtype, "max_steps": 6, "lora_dropout": 0.1}))
        train_until(c, lambda: False)
        curves.append([m.losses() for m in c.members.values()])
        if dtype == "bfloat16":
            lora = next(iter(c.members[0].layers.values()))
            assert lora.compute[0].dtype == torch.bfloat16
            torch.testing.assert_close(lora.compute[0].float(), lora.lora_A.detach(), rtol=1e-2, atol=1e-3)  # refreshed after steps
    for ours, ref in zip(*curves):
        assert ours == pytest.approx(ref, rel=3e-2)


def test_forward_passes_change_memory_not_results(data_dir: str) -> None:
    """A micro-step split into forward passes (core.rules.cohort_passes, when the members do not fit
    one forward without checkpointing) gives each member the losses of one pass of everyone."""
    from core.rules import cohort_passes

    assert cohort_passes([4, 4, 4], None) == [[0, 1, 2]] and cohort_passes([], 8) == []
    assert cohort_passes([4, 4, 4], 8) == [[0, 1], [2]] and cohort_passes([4, 12, 2, 2], 8) == [[0], [1], [2, 3]]
    members = [t.model_copy(update={"max_steps": 4}) for t in MEMBERS]
    runs = {}
    for pass_tokens in (None, 1):  # 1: every member in a pass of its own
        c = cohort(data_dir)
        c.pass_tokens = pass_tokens
        slots = [c.add(t) for t in members]
        calls = []
        inner = c.forward_backward
        c.forward_backward = lambda rows, n: calls.append(sorted(rows)) or inner(rows, n)  # type: ignore[method-assign]
        while c.running():
            c.step()
        runs[pass_tokens] = [c.members[s].losses() for s in slots], calls
    (one, calls_one), (apart, calls_apart) = runs[None], runs[1]
    assert all(len(rows) == len(members) for rows in calls_one) and all(len(rows) == 1 for rows in calls_apart)
    for a, b in zip(apart, one):
        assert a == pytest.approx(b, rel=1e-5)


def test_compiled_cohort_trains_as_eager_and_members_coming_and_going_do_not_recompile(data_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.compile in a cohort: each decoder layer compiled with the multi-adapter linears left
    out of the graphs (trainable.cohort.compile_around_adapters). Losses equal the eager cohort's;
    once the first shapes are seen, members joining and leaving compile nothing new (traced inside,
    every new layout of members would recompile every layer). aot_eager: dynamo's graphs without
    inductor's C++ build, as the CPU dry runs use."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr("trainable.fast.COMPILE_BACKEND", "aot_eager")
    members = [t.model_copy(update={"max_steps": 4 + 2 * i, "eval_every": 4 + 2 * i}) for i, t in enumerate(MEMBERS)]
    curves, graphs = {}, []
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        c = cohort(data_dir, compile=compiled)
        assert c.compiled_layers == (len(c.model.model.layers) if compiled else 0)
        slots = {0: c.add(members[0]), 1: c.add(members[1])}
        for step in range(12):
            if step == 2:
                slots[2] = c.add(members[2])
            if step == 5:
                slots[3] = c.add(members[3])
            c.step()
            graphs.append(counters["stats"]["unique_graphs"])
        curves[compiled] = [c.members[slots[i]].losses() for i in range(4)]
    for ours, ref in zip(curves[True], curves[False]):
        assert len(ours) == len(ref) > 0 and ours == pytest.approx(ref, rel=1e-5)
    compiled_graphs = graphs[12:]
    assert compiled_graphs[0] > 0  # it compiled
    assert compiled_graphs[5] == compiled_graphs[-1], compiled_graphs  # member 3 joined at step 5, members left at steps 4-10: no new graph
