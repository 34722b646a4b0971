"""The grouped path of the multi-adapter layer (trainable/multi_lora.py) computes what the per-member
loop computes: same outputs, same gradients per member, same dropout masks, no leakage between
members (not even of inf / nan), whatever the members' ranks, alphas, dropouts, targets and rows.

On the CPU `_grouped_mm` is torch's loop of mm inside one op, so these tests check the arithmetic
and the bookkeeping (groups, gaps, padding, stacked copies, their refresh); speed is a GPU matter.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from trainable import multi_lora
from trainable.multi_lora import MemberLora, MultiLoraLinear, RowSplit, add_member_updates, refresh_all

pytestmark = pytest.mark.skipif(
    multi_lora._GMM is None or not multi_lora._grouped_available(torch.zeros(1, 8), 8, 8), reason="no grouped GEMM in this torch"
)

IN, OUT = 24, 40
# slot -> (rank, alpha, dropout, rows): ranks 4..12 (padded to 16), p = 0 and p > 0, one row to three
MEMBERS = {0: (4, 8, 0.1, 2), 2: (8, 8, 0.0, 1), 3: (12, 3, 0.3, 3), 4: (8, 16, 0.1, 0), 5: (16, 64, 0.05, 2)}
# slot 1 has no adapter on the layer (a gap between members), slot 4 has no rows this forward,
# and the last row belongs to nobody (a trailing gap)
ROWS = {0: 2, 1: 2, 2: 1, 3: 3, 4: 0, 5: 2}


def segments(rows: dict[int, int]) -> tuple[tuple[int, int, int], ...]:
    out, start = [], 0
    for slot, n in rows.items():
        out.append((slot, start, start + n))
        start += n
    return tuple(out)


def layer(dtype: torch.dtype = torch.float32, members: dict = MEMBERS, rows: dict = ROWS, seed: int = 0) -> MultiLoraLinear:
    """A frozen IN->OUT linear with `members`' adapters (random A and B: every update is live)."""
    gen = torch.Generator().manual_seed(seed)
    split = RowSplit(segments=segments(rows), dropout_seeds={s: 100 + s for s in rows}, max_len=11)
    base = torch.nn.Linear(IN, OUT, bias=False).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(OUT, IN, generator=gen))
    wrapped = MultiLoraLinear(base, split, layer_id=5)
    for slot, (r, alpha, p, _) in members.items():
        lora = MemberLora(IN, OUT, r, alpha, p, compute_dtype=dtype)
        with torch.no_grad():
            lora.lora_A.copy_(torch.randn(r, IN, generator=gen))
            lora.lora_B.copy_(torch.randn(OUT, r, generator=gen))
        lora.refresh()
        wrapped.adapters[str(slot)] = lora
    wrapped.base.to(dtype)
    return wrapped


def inputs(dtype: torch.dtype = torch.float32, rows: int = sum(ROWS.values()) + 1, width: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, width, IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(mode: str, wrapped: MultiLoraLinear, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch, passes: int = 1) -> dict[str, Any]:
    """Forward and backward(s) with GROUPED = mode: the output, x's gradient and each parameter's."""
    monkeypatch.setattr(multi_lora, "GROUPED", mode)
    x = x.clone().requires_grad_(True)
    weights = torch.linspace(-1, 1, OUT)
    for _ in range(passes):
        out = wrapped(x)
        (out.float() * weights).sum().backward()
    return {
        "grouped": wrapped._stacks is not None,
        "out": out.detach().float(),
        "x": x.grad.float(),
        **{name: None if p.grad is None else p.grad.clone() for name, p in wrapped.adapters.named_parameters()},
    }


def assert_same(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "grouped":
            continue
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
            continue
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol * float(a[key].abs().max()), msg=key)


def test_grouped_matches_the_loop_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    x = inputs()
    loop = run("off", layer(), x, monkeypatch)
    grouped = run("on", layer(), x, monkeypatch)
    assert grouped["grouped"] and not loop["grouped"]
    assert loop["4.lora_A"] is None and grouped["4.lora_A"] is None  # no rows, no gradient (its optimizer skips it)
    assert all(loop[f"{s}.lora_{w}"].abs().sum() > 0 for s in (0, 2, 3, 5) for w in "AB")
    assert_same(grouped, loop, rtol=1e-5, atol=1e-6)


def test_grouped_matches_the_loop_bf16_within_bf16_tolerance(monkeypatch: pytest.MonkeyPatch) -> None:
    x = inputs(torch.bfloat16)
    loop = run("off", layer(torch.bfloat16), x, monkeypatch)
    grouped = run("on", layer(torch.bfloat16), x, monkeypatch)
    assert grouped["grouped"]
    assert all(v.dtype == torch.float32 for k, v in grouped.items() if ".lora_" in k and v is not None)  # fp32 gradients
    assert_same(grouped, loop, rtol=2e-2, atol=2e-2)


def test_many_members_of_one_rank_and_accumulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """16 members of one rank (no padding), gradients accumulated over two backward passes."""
    members = {s: (8, 16, 0.1 if s % 2 else 0.0, 1 + s % 3) for s in range(16)}
    rows = {s: m[3] for s, m in members.items()}
    x = inputs(rows=sum(rows.values()), width=5, seed=3)
    loop = run("off", layer(members=members, rows=rows), x, monkeypatch, passes=2)
    grouped = run("on", layer(members=members, rows=rows), x, monkeypatch, passes=2)
    assert grouped["grouped"]
    assert_same(grouped, loop, rtol=1e-5, atol=1e-6)


def test_eval_mode_and_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without training there is no dropout (and the stacked B loses its 1 / (1 - p)); then training again."""
    x = inputs()
    outs = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(multi_lora, "GROUPED", mode)
        wrapped = layer()
        wrapped.eval()
        with torch.no_grad():
            evaluated = wrapped(x)
        wrapped.train()
        outs[mode] = (evaluated, wrapped(x).detach())
    torch.testing.assert_close(outs["on"][0], outs["off"][0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(outs["on"][1], outs["off"][1], rtol=1e-5, atol=1e-4)
    assert not torch.allclose(outs["on"][0], outs["on"][1])  # dropout is live in training


def test_stacked_copies_follow_the_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """After an optimizer-like update (refresh_all, as the cohort calls), or an in-place change of a
    parameter, the grouped path multiplies by the new values; a new member changes the layout."""
    monkeypatch.setattr(multi_lora, "GROUPED", "on")
    for dtype in (torch.float32, torch.bfloat16):
        wrapped, x = layer(dtype), inputs(dtype)
        wrapped.eval()
        with torch.no_grad():
            wrapped(x)
            first = wrapped._stacks
            lora = wrapped.adapters["3"]
            lora.lora_B.mul_(-2)  # an optimizer step, then the cohort's refresh
            refresh_all([lora])
            after_step = wrapped(x)
            wrapped.adapters["2"].lora_A.add_(1)  # changed in place: fp32 multiplies by the parameter itself, no refresh
            if dtype != torch.float32:
                wrapped.adapters["2"].refresh()
            after_change = wrapped(x)
            assert wrapped._stacks is first  # same layout: slots rewritten, not rebuilt
            wrapped.adapters["1"] = MemberLora(IN, OUT, 4, 4, 0.0, compute_dtype=dtype)  # the gap becomes a member
            joined = wrapped(x)
            assert wrapped._stacks is not first
            monkeypatch.setattr(multi_lora, "GROUPED", "off")
            expected = [wrapped(x)]
            monkeypatch.setattr(multi_lora, "GROUPED", "on")
        tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=1.0)
        torch.testing.assert_close(joined.float(), expected[0].float(), **tol)
        reference = layer(dtype)
        reference.eval()
        with torch.no_grad():
            reference.adapters["3"].lora_B.mul_(-2)
            reference.adapters["3"].refresh()
            monkeypatch.setattr(multi_lora, "GROUPED", "off")
            torch.testing.assert_close(after_step.float(), reference(x).float(), **tol)
            reference.adapters["2"].lora_A.add_(1)
            reference.adapters["2"].refresh()
            torch.testing.assert_close(after_change.float(), reference(x).float(), **tol)
            monkeypatch.setattr(multi_lora, "GROUPED", "on")


def test_no_leakage_in_the_grouped_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other members' rows, row counts, and even a diverged member (inf / nan in its weights and rows)
    leave a member's output and gradients unchanged."""
    x = inputs()
    before = run("on", layer(), x, monkeypatch)
    rows = {**ROWS, 0: 3}  # member 0: another row count, other rows
    x2 = torch.cat([inputs(rows=3, seed=9), x[2:]])
    after = run("on", layer(rows=rows), x2, monkeypatch)
    assert not torch.equal(before["0.lora_A"], after["0.lora_A"])
    for slot in (2, 3, 5):
        for w in "AB":
            torch.testing.assert_close(after[f"{slot}.lora_{w}"], before[f"{slot}.lora_{w}"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(after["out"][3:], before["out"][2:], rtol=1e-6, atol=1e-5)

    diverged = layer()
    with torch.no_grad():
        diverged.adapters["3"].lora_B[0, 0] = float("nan")
        diverged.adapters["3"].lora_A[0, 0] = float("inf")
        diverged.adapters["3"].refresh()
    x3 = x.clone()
    x3[5, 2, 3] = float("inf")  # a row of member 3 (rows 5..7)
    sick = run("on", diverged, x3, monkeypatch)
    assert sick["grouped"] and not torch.isfinite(sick["out"][5:8]).all()
    healthy = [slice(0, 2), slice(2, 4), slice(4, 5), slice(8, 11)]  # members 0 and 2, the gap, member 5, the unowned row
    for rows_ in healthy:
        torch.testing.assert_close(sick["out"][rows_], before["out"][rows_], rtol=1e-6, atol=1e-5)
    for slot in (0, 2, 5):
        for w in "AB":
            assert torch.isfinite(sick[f"{slot}.lora_{w}"]).all()
            torch.testing.assert_close(sick[f"{slot}.lora_{w}"], before[f"{slot}.lora_{w}"], rtol=1e-6, atol=1e-6)


def test_dropout_masks_are_the_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouped and loop draw the same masks, and a member's masks depend on its seed only."""
    x = inputs()
    wrapped = layer()
    outs = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(multi_lora, "GROUPED", mode)
        with torch.no_grad():
            outs[mode] = wrapped(x)
    torch.testing.assert_close(outs["on"], outs["off"], rtol=1e-5, atol=1e-4)
    wrapped.split.dropout_seeds = {**wrapped.split.dropout_seeds, 3: 7}
    with torch.no_grad():
        again = wrapped(x)
    assert not torch.equal(again[5:8], outs["on"][5:8]) and torch.equal(again[:5], outs["on"][:5]) and torch.equal(again[8:], outs["on"][8:])


def test_auto_and_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    x = inputs()
    monkeypatch.setattr(multi_lora, "GROUPED", "auto")
    wrapped = layer()
    with torch.no_grad():
        wrapped(x)
    assert wrapped._stacks is None  # the CPU loops under auto
    monkeypatch.setattr(multi_lora, "GROUPED_LAUNCH_FLOPS", {"cpu": 1e9})
    with torch.no_grad():
        wrapped(x)
    assert wrapped._stacks is not None  # a device where launches are dear groups
    monkeypatch.setattr(multi_lora, "GROUPED_LAUNCH_FLOPS", {"cpu": 1.0})
    wrapped = layer()
    with torch.no_grad():
        wrapped(x)
    assert wrapped._stacks is None  # unless padding costs more than the launches saved
    with torch.no_grad():
        one = layer(members={0: MEMBERS[0]})
        monkeypatch.setattr(multi_lora, "GROUPED", "on")
        one(x)
    assert one._stacks is None  # one member: nothing to group
    monkeypatch.setattr(multi_lora, "GROUPED", "sometimes")
    with pytest.raises(ValueError, match="GROUPED"):
        layer()(x)


def test_without_a_layer_and_without_x_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """add_member_updates called directly (no layer to cache on), x not requiring a gradient."""
    wrapped, x = layer(), inputs()
    results = {}
    for mode in ("off", "on"):
        monkeypatch.setattr(multi_lora, "GROUPED", mode)
        for p in wrapped.adapters.parameters():
            p.grad = None
        out = add_member_updates(wrapped.base(x), x, wrapped.split, wrapped.adapters, True, wrapped.layer_id)
        out.sum().backward()
        results[mode] = [out.detach()] + [p.grad.clone() for p in wrapped.adapters.parameters() if p.grad is not None]
    for a, b in zip(*results.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# a cohort on the tiny model: grouped and loop train the same members the same way


def test_a_cohort_trains_the_same_grouped_or_looped(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    from sweep.config import DataSection, TrainSection
    from tests.conftest import DEMO_DATA
    from trainable.cohort import Cohort
    from trainable.data import prepare
    from trainable.model import load_tokenizer

    seq = 64
    section = DataSection(train=str(DEMO_DATA / "train.jsonl"), eval=str(DEMO_DATA / "eval.jsonl"), max_seq_len=seq)
    data = str(prepare(section, load_tokenizer("tiny-gemma3"), tmp_path_factory.mktemp("data"), seed=0, log=lambda s: None).folder)
    common = dict(max_steps=3, eval_every=3, log_every=1)
    members = [
        TrainSection(**common, lora_r=4, lora_alpha=8, target_modules="attention", learning_rate=5e-3, batch=(2, 2), lora_dropout=0.1),
        TrainSection(**common, lora_r=8, lora_alpha=32, target_modules="all-linear", learning_rate=2e-3, batch=(1, 1), seed=1, lora_dropout=0.0),
        TrainSection(**common, lora_r=16, lora_alpha=8, target_modules="mlp", learning_rate=3e-3, batch=(3, 1), seed=2, lora_dropout=0.2),
    ]  # fmt: skip
    torch.set_num_threads(1)
    runs = {}
    for mode, checkpointing in (("off", False), ("on", False), ("on", True)):
        monkeypatch.setattr(multi_lora, "GROUPED", mode)
        c = Cohort("tiny-gemma3", data, TrainSection(gradient_checkpointing=checkpointing), max_seq_len=seq)
        for t in members:
            c.add(t)
        while c.running():
            c.step()
        grouped = any(layer._stacks is not None for layer in c.layers.values())
        assert grouped == (mode == "on")
        runs[mode, checkpointing] = ([m.losses() for m in c.members.values()], c.evaluate(), [[p.detach().clone() for p in m.params] for m in c.members.values()])
    ref = runs["off", False]
    for key in (("on", False), ("on", True)):
        losses, evals, params = runs[key]
        for ours, theirs in zip(losses, ref[0]):
            assert ours == pytest.approx(theirs, rel=1e-5)
        assert evals == pytest.approx(ref[1], rel=1e-5)
        # Adam divides each gradient by its own running RMS, so an element whose gradient is near zero
        # turns the grouped GEMM's other summation order into an update difference of up to ~lr x
        # that element's relative error: 1.4e-5 on one element of 2048 was seen (transformers 5.24);
        # a wrong member's rows or a missing scale would be off by the size of the update, ~1e-3
        for ours, theirs in zip(params, ref[2]):
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5)


def test_a_grouped_gemm_that_refuses_sends_the_layer_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose grouped GEMM rejects the operands (it passed the small probe): a warning, the loop's result."""
    monkeypatch.setattr(multi_lora, "_GROUPED_RUNS", {})
    x = inputs()
    assert multi_lora._grouped_available(x, IN, OUT)

    def refuses(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("strides should be multiple of 16 bytes")

    monkeypatch.setattr(multi_lora, "_GMM", refuses)
    loop = run("off", layer(), x, monkeypatch)
    with pytest.warns(UserWarning, match="grouped path failed"):
        fallen = run("on", layer(), x, monkeypatch)
    assert_same(fallen, loop, rtol=0, atol=0)
    assert not multi_lora._grouped_available(x, IN, OUT)
