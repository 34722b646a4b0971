"""Many members' LoRA adapters on one frozen linear layer (issue 15: a cohort of trials, one base).

The frozen projection runs once on the concatenated micro-batches of every member; each member's
low-rank update is then added to its own rows only. Which rows are whose is a `RowSplit`, shared by
every wrapped layer of a model and set by the cohort before each forward (and left in place until
backward has run: recomputation under gradient checkpointing reads it again).

Row i of the batch depends only on row i's own tokens (attention, norms and MLP work per sequence),
so a member's loss, and hence its gradients, depend only on its rows and its own adapter.

`add_member_updates` holds the per-member arithmetic in one place (forward and backward, one
autograd node per layer for all members), in two interchangeable forms: the grouped path (one set
of grouped GEMMs for all members) and the per-member loop. Common to both:
- compute dtype = each adapter's `compute_dtype` (the cohort's train.lora_dtype):
  - the activations' dtype (bf16 on a bf16 or NF4-with-bf16-compute base with lora_dtype bfloat16;
    fp32 on an fp32 base, exact): x is never cast, the update is added in place;
  - fp32 on a bf16 (or fp16) base (lora_dtype float32): what PEFT does for an fp32 adapter on a
    bf16 model, in the same order: each member's rows of x cast up, (x A^T) B^T * scaling in fp32,
    added to the frozen output in fp32 and rounded back to its dtype once; backward likewise (the
    output's gradient cast up, x's gradient rounded back). Only the per-member loop does this.
  Either way gradients come back to the fp32 parameters (what the optimizer steps).
- saved for backward: x once per layer (shared by all members) and x A^T ([tokens, r], small).
  No fp32 copy of x (the fp32-compute path casts a member's rows again in backward), no dropout mask.
- dropout: a member's mask at a layer is drawn from (its seed for this micro-step, the layer) over
  `max_len` positions by one cached generator, and drawn again in backward instead of being kept.
  So a member's masks depend neither on who else is in the cohort nor on the padded width, and
  recomputation (gradient checkpointing) and backward see the same mask. Dropout 0: no mask, no copy.
  Both paths draw the same masks from the same seeds: they compute the same function.

The loop (`_MemberUpdates`): per member, forward [bernoulli, mul,] mm, addmm (scale and add fused);
backward 2-3 mm/addmm, [bernoulli, mul, mul,] and a cast of the two small gradients on a bf16 base.
The adapters' compute copies (`MemberLora.compute`, refreshed after each optimizer step) are what
it multiplies by. About a dozen small kernels per member and layer: a cohort of 16 Gemma-3-1B
members launches ~35k per step (26 layers x 7 projections), and an H200 sits mostly idle (launch-bound).

The grouped path (`_GroupedUpdates`): a constant number of kernels per layer, whatever the number
of members K: the rows of the batch are cut into groups at the members' spans (a member's rows are
one contiguous span; rows whose member has no adapter here, or that no member owns, form zero
"gap" groups), and torch's grouped GEMM (`torch._grouped_mm`: jagged rows x one weight per group,
and jagged contraction for weight gradients) multiplies each group by its own adapter:
- the layer caches its members' adapters stacked, in the compute dtype: A [G, r_pad, in] and
  B * scaling / (1 - p) [G, out, r_pad] (ranks zero-padded to the largest, rounded up to 8), built
  from the fp32 parameters (one rounding, as the compute copies). A member's slot is rewritten only
  when it changed (`MemberLora.version`, bumped by refresh / refresh_all, which the cohort calls
  after every optimizer step and load, and the parameters' own version counters): ~2 small copies
  per member that stepped, none otherwise.
- forward: Xd = x * keep (one mask assembled from the members' masks, ones for p = 0; skipped when
  no member of the layer uses dropout), H = gmm(Xd, A^T), out += gmm(H, B^T): mask, mul, 2 GEMMs, add.
- backward: gH = gmm(g, B); grad A = gmm2d(gH^T, Xd); grad B = gmm2d(g^T, H) * its scale (cast to
  fp32 in the same kernel); gX = gmm(gH, A) * keep. Each member's gradients are views of the
  stacked ones (its slot, its rank), which autograd accumulates into its fp32 lora_A / lora_B.
- exact: each row meets only its own member's adapter (no masked dense product that would multiply
  other members' weights or rows by zero), so the result is the loop's to float rounding, and a
  diverging member (inf / nan in its weights or rows) cannot leak into another member's rows or
  gradients. The only extra arithmetic is the rank padding (r_pad - r for a smaller-rank member,
  and r_pad per token of gap rows).
- extra memory: the stacked copies (G x r_pad x (in + out) per layer, compute dtype), and H saved at
  r_pad columns rather than each member's r; a layer's stacked gradients exist once in fp32 (all its
  members' adapters' size: never x's).
- dropout draws one mask per member with dropout (same seeds), so those members still cost one
  bernoulli each, forward and backward.

Where it runs (`_grouped_available`): torch with `_grouped_mm`, in and out features multiples of 8,
and a device/dtype where it is one kernel without a host sync: CUDA bf16 on sm90 / sm100 (H100,
H200, B200: CUTLASS), or the CPU (fp32 / bf16 / fp16: a loop of mm inside one op). Elsewhere (CUDA
fp32, older GPUs: torch's fallback there copies the offsets to the host, a sync per GEMM) the loop
runs. With fewer than 2 members on the layer the loop runs too (nothing to group), and so it does
when the adapters compute in fp32 on lower-precision activations (lora_dtype float32 on a bf16 base).

`GROUPED` ("auto" | "on" | "off"; default from the environment variable LORA_SWEEP_GROUPED, else
"off") picks between them: "off" always loops; "on" groups wherever it runs; "auto" groups when the
launches it saves are worth more than the padded arithmetic it adds:
    waste = 6 (in + out) (sum over groups of tokens x r_pad - sum over members of tokens x r)
    (the padded FLOPs of the 6 GEMMs: 2 forward, 4 backward) and "auto" groups iff
    waste <= GROUPED_LAUNCH_FLOPS[device] x LAUNCHES_PER_MEMBER x (K - 1),
i.e. each member beyond the first saves ~LAUNCHES_PER_MEMBER kernel launches of ~5 us on the host,
during which a GPU doing ~200 TFLOP/s of small grouped GEMMs could have done ~1 GFLOP. On an H200
that makes grouping the rule unless ranks differ wildly at very long batches (e.g. 16 members,
16k tokens, ranks 8..64 on a 1152 -> 6912 projection: waste ~2.5e10 vs ~1.5e11 budget). On the
CPU "auto" always loops: ops there are compute-bound (a launch's host overhead is small next to
its arithmetic: 16 members, 1152 -> 1152, 16 rows x 128 tokens, r 16, forward + backward measured
the loop and the grouped path within ~15% of each other, either ahead, fp32 and bf16 alike), and the
loop does no padded work.
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# off by default again since the first cohort sweep with it on (H200, 2026-11-30 fifth session,
# bench/BENCH.md): 16 x 1B members trained in 47.3 s grouped against 45.1 s looped. Per layer it is
# 1.4-2.5x faster (bench/grouped_lora.py), but a cohort's forward passes now carry thousands of
# tokens per member, where the loop is no longer host-bound and the padded ranks and restacking cost
# more than the launches they save. LORA_SWEEP_GROUPED=auto (or on) brings it back.
GROUPED = os.environ.get("LORA_SWEEP_GROUPED", "off")  # "auto" | "on" | "off": see the module docstring
GROUPED_LAUNCH_FLOPS = {"cuda": 1e9}  # padded FLOPs one saved kernel launch pays for, per device type (none: auto loops)
LAUNCHES_PER_MEMBER = 10  # kernels a member costs in the loop beyond the grouped path's (forward + backward)


@dataclass
class RowSplit:
    """The current forward's rows: (slot, start, stop) spans along the batch dimension; each slot's
    dropout seed for this forward; and the width over which dropout masks are drawn. `cache` holds
    what the grouped path derives from the spans (group offsets), for the current `segments` only."""

    segments: tuple[tuple[int, int, int], ...] = ()
    dropout_seeds: dict[int, int] = field(default_factory=dict)
    max_len: int = 0
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


_SERIALS = itertools.count()


class MemberLora(nn.Module):
    """One member's adapter on one linear: out += B(A(dropout(x))) * alpha / r (PEFT's LoRA).

    lora_A / lora_B are fp32 (the optimizer's); `compute` holds the tensors the layer multiplies by:
    the parameters themselves when the compute dtype is theirs, else copies in the compute dtype that
    `refresh()` updates (the cohort calls it after every optimizer step and load). `version` counts
    those refreshes (the grouped path's stacked copies follow it); `serial` names the adapter for good."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, device: Any = None, compute_dtype: Any = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.scaling = alpha / r
        self.dropout = dropout
        self.serial = next(_SERIALS)
        self.version = 0
        self.compute_dtype = compute_dtype or self.lora_A.dtype
        self.compute: tuple[torch.Tensor, torch.Tensor] = (self.lora_A, self.lora_B)
        if self.compute_dtype != self.lora_A.dtype:
            self.compute = (torch.empty_like(self.lora_A, dtype=self.compute_dtype), torch.empty_like(self.lora_B, dtype=self.compute_dtype))
        self.refresh()

    def refresh(self) -> None:
        self.version += 1
        if self.compute[0] is not self.lora_A:
            with torch.no_grad():
                self.compute[0].copy_(self.lora_A)
                self.compute[1].copy_(self.lora_B)


def refresh_all(loras: list[MemberLora]) -> None:
    """`MemberLora.refresh` for many adapters in two foreach copies."""
    for lora in loras:
        lora.version += 1
    pairs = [(c, p) for lora in loras if lora.compute[0] is not lora.lora_A for c, p in zip(lora.compute, (lora.lora_A, lora.lora_B))]
    if pairs:
        with torch.no_grad():
            torch._foreach_copy_([c for c, _ in pairs], [p for _, p in pairs])


_GENERATORS: dict[Any, torch.Generator] = {}
_MASK_DTYPE: dict[str, Any] = {}


def _keep_mask3(x2: torch.Tensor, rows: int, width: int, p: float, seed: int, max_len: int) -> torch.Tensor:
    """The keep mask ([rows, width, features]: a view, not contiguous when max_len > width) for `rows`
    rows of `width` positions of x2, from `seed` alone: drawn over max(max_len, width) positions per
    row, so it does not depend on the padded width."""
    gen = _GENERATORS.get(x2.device)
    if gen is None:
        gen = _GENERATORS[x2.device] = torch.Generator(device=x2.device)
    gen.manual_seed(seed)
    full = max(width, max_len)
    dtype = _MASK_DTYPE.get(x2.device.type, torch.bool)
    try:
        keep = torch.empty((rows, full, x2.shape[1]), device=x2.device, dtype=dtype).bernoulli_(1 - p, generator=gen)
    except RuntimeError:  # a backend without bool bernoulli: draw in x's dtype
        _MASK_DTYPE[x2.device.type] = dtype = x2.dtype
        gen.manual_seed(seed)
        keep = torch.empty((rows, full, x2.shape[1]), device=x2.device, dtype=dtype).bernoulli_(1 - p, generator=gen)
    return keep if full == width else keep[:, :width]


def _keep_mask(x2: torch.Tensor, rows: int, width: int, p: float, seed: int, max_len: int) -> torch.Tensor:
    """`_keep_mask3` as [rows * width, features], the layout of x2's rows."""
    return _keep_mask3(x2, rows, width, p, seed, max_len).reshape(-1, x2.shape[1])


def _mm(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * a @ b in one kernel (beta=0: the empty input is never read)."""
    return torch.mm(a, b) if alpha == 1 else torch.addmm(a.new_empty(()), a, b, beta=0, alpha=alpha)


class _MemberUpdates(torch.autograd.Function):
    """out[rows of m] += c_m * (x[rows of m] * keep_m) A_m^T B_m^T for each member m (c = scaling / (1-p)),
    in place on `out`; one autograd node for all members of the layer."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor, plan: tuple, max_len: int, *weights: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0] and x[0].numel() // x.shape[-1]  # positions per row
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        hs = []
        for (start, stop, scaling, p, seed, compute), i in zip(plan, range(0, len(weights), 2)):
            a, b = compute
            xi = x2[start * tokens : stop * tokens]
            rows = out2[start * tokens : stop * tokens]
            if a.dtype != x.dtype:  # fp32 adapter on bf16 activations: PEFT's order (module docstring)
                xi = xi.to(a.dtype)
            if p > 0:
                xi = xi * _keep_mask(x2, stop - start, tokens, p, seed, max_len)
            h = torch.mm(xi, a.t())
            if a.dtype != x.dtype:
                update = torch.mm(h, b.t()).mul_(scaling / (1 - p))
                rows.copy_(update.add_(rows))  # the sum in fp32, rounded to out's dtype once
            else:
                rows.addmm_(h, b.t(), alpha=scaling / (1 - p))
            hs.append(h)
        ctx.mark_dirty(out)
        ctx.save_for_backward(x, *hs)
        ctx.plan, ctx.max_len, ctx.tokens = plan, max_len, tokens
        ctx.dtypes = [w.dtype for w in weights]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        x, *hs = ctx.saved_tensors
        tokens, plan = ctx.tokens, ctx.plan
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        need_x = ctx.needs_input_grad[1]
        gx = torch.empty_like(x2) if need_x else None
        covered = 0
        grads: list[torch.Tensor | None] = []
        for (start, stop, scaling, p, seed, (a, b)), h, i in zip(plan, hs, range(0, 2 * len(plan), 2)):
            lo, hi = start * tokens, stop * tokens
            if need_x and covered < lo:
                gx[covered:lo].zero_()
            covered = max(covered, hi)
            gi, xi = g2[lo:hi], x2[lo:hi]
            keep = _keep_mask(x2, stop - start, tokens, p, seed, ctx.max_len) if p > 0 else None
            c = scaling / (1 - p)
            if a.dtype != x.dtype:  # fp32 adapter on bf16 activations, as autograd differentiates PEFT's forward
                xi, gs = xi.to(a.dtype), gi.to(a.dtype) * c  # d loss / d (h B^T), fp32
                gh = torch.mm(gs, b)
                grad_b = torch.mm(gs.t(), h)
            else:
                gh = _mm(gi, b, c)  # d loss / d h, [tokens, r]
                grad_b = _mm(gi.t(), h, c)
            grad_a = torch.mm(gh.t(), xi if keep is None else xi * keep)
            if need_x:
                if a.dtype != x.dtype:
                    gxi = torch.mm(gh, a)
                    gx[lo:hi].copy_(gxi if keep is None else gxi.mul_(keep))  # rounded back to x's dtype once
                else:
                    torch.mm(gh, a, out=gx[lo:hi])
                    if keep is not None:
                        gx[lo:hi].mul_(keep)
            grads += [grad_a.to(ctx.dtypes[i]), grad_b.to(ctx.dtypes[i + 1])]
        if need_x and covered < x2.shape[0]:
            gx[covered:].zero_()
        return (grad, gx.view_as(x) if need_x else None, None, None, *grads)


# ------------------------------------------------------------------------------------------------
# the grouped path (module docstring)

_GMM = getattr(torch, "_grouped_mm", None)
_GROUPED_RUNS: dict[tuple[Any, Any], bool] = {}  # (device, dtype) -> whether the grouped GEMM runs there as it should


def _grouped_available(x: torch.Tensor, in_features: int, out_features: int) -> bool:
    """Whether the grouped path runs for x (device, dtype) on a layer of these features."""
    if _GMM is None or in_features % 8 or out_features % 8:
        return False
    key = (x.device, x.dtype)
    ok = _GROUPED_RUNS.get(key)
    if ok is None:
        if x.device.type == "cpu":
            ok = x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        elif x.device.type == "cuda":  # torch's one-kernel path; elsewhere its fallback syncs on the offsets
            ok = x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) in ((9, 0), (10, 0))
        else:
            ok = False
        ok = _GROUPED_RUNS[key] = ok and _probe(x.device, x.dtype)
    return ok


def _probe(device: Any, dtype: Any) -> bool:
    """The three grouped GEMM shapes the path uses, once, on small operands (an older or newer torch
    that lacks or changed them sends the layer to the loop)."""
    try:
        a = (torch.arange(128, device=device) % 3).reshape(16, 8).to(dtype)  # small integers: exact in any dtype
        w = torch.ones(2, 8, 8, device=device, dtype=dtype)
        w[1] *= 2
        offs = torch.tensor([8, 16], device=device, dtype=torch.int32)
        w[:, 0] = 0  # not symmetric: w^T differs from w
        rows = _GMM(a, w.transpose(1, 2), offs=offs)  # [16, 8]: rows of group g times w[g]^T (column-major weights)
        rows_b = _GMM(a, w, offs=offs)  # rows of group g times w[g] (row-major weights, as in backward)
        wgrad = _GMM(a.t(), a, offs=offs)  # [2, 8, 8]: a[group]^T a[group] (jagged contraction)
        af, wf = a.float(), w.float()
        expect = (
            torch.cat([af[:8] @ wf[0].t(), af[8:] @ wf[1].t()]),
            torch.cat([af[:8] @ wf[0], af[8:] @ wf[1]]),
            torch.stack([af[:8].t() @ af[:8], af[8:].t() @ af[8:]]),
        )
        return all(torch.equal(got.float(), want) for got, want in zip((rows, rows_b, wgrad), expect))
    except Exception:  # noqa: BLE001 - any failure: not available here
        return False


def _to_device(t: torch.Tensor, device: Any) -> torch.Tensor:
    """A small host tensor on `device`, without a host sync on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _use_grouped(groups: list, tokens: int, r_pad: int, in_features: int, out_features: int, device: Any) -> bool:
    """GROUPED's choice for this layer and forward (module docstring: the rule for "auto")."""
    if GROUPED == "on":
        return True
    if GROUPED != "auto":
        raise ValueError(f"multi_lora.GROUPED: {GROUPED!r}; expected 'auto', 'on' or 'off'")
    per_launch = GROUPED_LAUNCH_FLOPS.get(device.type)
    if per_launch is None:
        return False
    padded = sum(stop - start for start, stop, _, _, _ in groups) * tokens * r_pad
    exact = sum((stop - start) * tokens * lora.lora_A.shape[0] for start, stop, lora, _, _ in groups if lora is not None)
    members = sum(lora is not None for _, _, lora, _, _ in groups)
    return 6 * (in_features + out_features) * (padded - exact) <= per_launch * LAUNCHES_PER_MEMBER * (members - 1)


class _Stacks:
    """One layer's adapters stacked for the grouped GEMMs, in the compute dtype, for one layout (its
    groups' members and ranks): a [G, r_pad, in], b [G, out, r_pad] (B x the member's scale c =
    scaling / (1 - p)), zero in gap groups and beyond a member's rank; c32 [G, 1, 1] fp32 the scales.
    A member's slot is rewritten only when its parameters or its scale changed."""

    def __init__(self, key: tuple, like: torch.Tensor, groups: int, r_pad: int, in_features: int, out_features: int):
        self.key = key
        self.a = like.new_zeros(groups, r_pad, in_features)
        self.b = like.new_zeros(groups, out_features, r_pad)
        self.stamps: list[Any] = [None] * groups
        self.scales: list[float] | None = None
        self.c32: torch.Tensor | None = None

    def update(self, loras: list[MemberLora | None], scales: list[float]) -> None:
        dst, src = [], []
        with torch.no_grad():
            for i, (lora, c) in enumerate(zip(loras, scales)):
                if lora is None:
                    continue
                stamp = (lora.version, lora.lora_A._version, lora.lora_B._version, c)
                if stamp == self.stamps[i]:
                    continue
                r = lora.lora_A.shape[0]
                dst.append(self.a[i, :r])
                src.append(lora.lora_A.detach())
                torch.mul(lora.lora_B.detach(), c, out=self.b[i, :, :r])  # from the fp32 parameter: one rounding
                self.stamps[i] = stamp
            if dst:
                torch._foreach_copy_(dst, src)
        if scales != self.scales:
            self.scales = list(scales)
            self.c32 = _to_device(torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1), self.a.device)


@dataclass
class _GroupPlan:
    """One layer's grouped forward: rows [lo, hi) of x2 (token rows) cut into groups at `offs`."""

    lo: int
    hi: int
    tokens: int
    max_len: int
    offs: torch.Tensor  # int32, each group's end (token rows from lo)
    a: torch.Tensor
    b: torch.Tensor
    c32: torch.Tensor
    drops: list[tuple[int, float, int]]  # per group: (rows, p, seed); p = 0 for gaps and members without dropout
    members: list[tuple[int, int]]  # per member in weight order: (its group, its rank)

    def keep(self, xs: torch.Tensor) -> torch.Tensor | None:
        """The keep mask over xs's rows ([hi - lo, in]): each member's own, ones elsewhere; None without dropout."""
        if not any(p > 0 for _, p, _ in self.drops):
            return None
        masks: list[torch.Tensor | None] = [_keep_mask3(xs, rows, self.tokens, p, seed, self.max_len) if p > 0 else None for rows, p, seed in self.drops]
        one = torch.ones((), device=xs.device, dtype=next(m for m in masks if m is not None).dtype)
        pieces = [m if m is not None else one.expand(rows, self.tokens, xs.shape[1]) for m, (rows, _, _) in zip(masks, self.drops)]
        return torch.cat(pieces).view(-1, xs.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (2-D) as the grouped GEMM takes a row-major operand: unit inner stride, rows 16-byte aligned."""
    if t.stride(1) != 1 or t.stride(0) != t.shape[1] or t.data_ptr() % 16:
        return t.clone(memory_format=torch.contiguous_format)
    return t


class _GroupedUpdates(torch.autograd.Function):
    """What `_MemberUpdates` computes, for all members at once with grouped GEMMs (module docstring)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, x: torch.Tensor, g: _GroupPlan, *weights: torch.Tensor) -> torch.Tensor:
        x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        xs = _rows(x2[g.lo : g.hi])
        keep = g.keep(xs)
        xd = xs if keep is None else xs * keep
        h = _GMM(xd, g.a.transpose(1, 2), offs=g.offs)  # [rows, r_pad]: each row times its member's A^T
        out2[g.lo : g.hi].add_(_GMM(h, g.b.transpose(1, 2), offs=g.offs))
        ctx.mark_dirty(out)
        ctx.save_for_backward(xs, h)
        ctx.g, ctx.rows = g, x2.shape[0]
        ctx.dtypes = [w.dtype for w in weights]
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        xs, h = ctx.saved_tensors
        g: _GroupPlan = ctx.g
        gs = _rows(grad.reshape(-1, grad.shape[-1])[g.lo : g.hi])
        keep = g.keep(xs)
        xd = xs if keep is None else xs * keep
        gh = _GMM(gs, g.b, offs=g.offs)  # d loss / d h, [rows, r_pad] (the scale is in b)
        grad_a = _GMM(gh.t(), xd, offs=g.offs)  # [G, r_pad, in]
        grad_b = _GMM(gs.t(), h, offs=g.offs)  # [G, out, r_pad], d loss / d (c B)
        gx = None
        if ctx.needs_input_grad[1]:
            gxs = _GMM(gh, g.a, offs=g.offs)  # [rows, in]
            if keep is not None:
                gxs.mul_(keep)
            if g.lo == 0 and g.hi == ctx.rows:
                gx = gxs
            else:
                gx = gxs.new_zeros((ctx.rows, gxs.shape[1]))
                gx[g.lo : g.hi] = gxs
            gx = gx.view(*grad.shape[:-1], gxs.shape[1])
        dtype_a, dtype_b = ctx.dtypes[0], ctx.dtypes[1]
        grad_a = grad_a.to(dtype_a)  # one cast for all members
        grad_b = torch.mul(grad_b, g.c32).to(dtype_b)  # d loss / d B = c d loss / d (c B), fp32 in the same kernel
        grads: list[torch.Tensor] = []
        for (i, r), j in zip(g.members, range(0, len(ctx.dtypes), 2)):
            ga, gb = grad_a[i, :r], grad_b[i, :, :r]
            grads += [ga if ga.dtype == ctx.dtypes[j] else ga.to(ctx.dtypes[j]), gb if gb.dtype == ctx.dtypes[j + 1] else gb.to(ctx.dtypes[j + 1])]
        return (grad, gx, None, *grads)


def _grouped_plan(x: torch.Tensor, split: RowSplit, adapters: nn.ModuleDict, training: bool, layer_id: int, owner: Any) -> tuple[_GroupPlan, list] | None:
    """The grouped path's plan for this forward, or None where the loop runs (module docstring)."""
    if owner is not None:
        in_features, out_features = owner.in_features, owner.out_features
    else:
        in_features, out_features = x.shape[-1], None
    groups: list[list[Any]] = []  # [start, stop, lora or None, p, seed], contiguous, in row order
    prev = None
    for slot, start, stop in split.segments:
        if start == stop:
            continue
        if prev is not None and start < prev:
            return None  # rows out of order: the loop handles anything
        if prev is not None and start > prev:
            groups.append([prev, start, None, 0.0, 0])  # rows nobody owns
        lora = adapters[str(slot)] if str(slot) in adapters else None
        if lora is None:
            groups.append([start, stop, None, 0.0, 0])
        else:
            p = lora.dropout if training else 0.0
            groups.append([start, stop, lora, p, (split.dropout_seeds.get(slot, 0) + 1_000_003 * layer_id) % 2**63])
        prev = stop
    merged: list[list[Any]] = []
    for grp in groups:  # neighbouring gaps are one group
        if merged and grp[2] is None and merged[-1][2] is None:
            merged[-1][1] = grp[1]
        else:
            merged.append(grp)
    while merged and merged[0][2] is None:
        merged.pop(0)
    while merged and merged[-1][2] is None:
        merged.pop()
    loras = [grp[2] for grp in merged]
    members = [lora for lora in loras if lora is not None]
    if len(members) < 2 or any(_upcasts(lora.compute_dtype, x.dtype) for lora in members):
        return None  # nothing to group, or fp32 adapters on bf16 activations (the loop's upcast path)
    if out_features is None:
        out_features = members[0].lora_B.shape[0]
    if not _grouped_available(x, in_features, out_features):
        return None
    tokens = x.shape[0] and x[0].numel() // x.shape[-1]
    r_pad = -(-max(lora.lora_A.shape[0] for lora in members) // 8) * 8
    if not _use_grouped(merged, tokens, r_pad, in_features, out_features, x.device):
        return None
    # the stacked adapters: cached on the layer, per layout
    key = (x.device, x.dtype, r_pad, tuple((lora.serial, lora.lora_A.shape[0]) if lora is not None else None for lora in loras))
    stacks = getattr(owner, "_stacks", None)
    if stacks is None or stacks.key != key:
        stacks = _Stacks(key, x, len(loras), r_pad, in_features, out_features)
        if owner is not None:
            owner._stacks = stacks
    stacks.update(loras, [lora.scaling / (1 - p) if lora is not None else 0.0 for _, _, lora, p, _ in merged])
    # the groups' offsets: once per forward for every layer with the same groups
    cache = split.cache
    if cache.get("segments") is not split.segments:
        cache.clear()
        cache["segments"] = split.segments
    lo = merged[0][0]
    bounds = (x.device, tokens, lo, tuple(grp[1] for grp in merged))
    offs = cache.get(bounds)
    if offs is None:
        offs = cache[bounds] = _to_device(torch.tensor([(grp[1] - lo) * tokens for grp in merged], dtype=torch.int32), x.device)
    plan = _GroupPlan(
        lo=lo * tokens, hi=merged[-1][1] * tokens, tokens=tokens, max_len=split.max_len, offs=offs, a=stacks.a, b=stacks.b, c32=stacks.c32,
        drops=[(stop - start, p, seed) for start, stop, _, p, seed in merged],
        members=[(i, lora.lora_A.shape[0]) for i, lora in enumerate(loras) if lora is not None],
    )  # fmt: skip
    return plan, [w for lora in members for w in (lora.lora_A, lora.lora_B)]


def add_member_updates(out: torch.Tensor, x: torch.Tensor, split: RowSplit, adapters: nn.ModuleDict, training: bool, layer_id: int = 0, owner: Any = None) -> torch.Tensor:
    """out[rows of member m] += B_m(A_m(dropout_m(x[rows of m]))) * scaling_m, for every member that
    has an adapter on this layer, in x's dtype, or in fp32 for an fp32 adapter on lower-precision x
    (module docstring). In place on `out` (the frozen layer's fresh output).
    Grouped or looped as GROUPED says (module docstring); `owner` (the MultiLoraLinear) keeps the
    grouped path's stacked adapters between forwards."""
    if GROUPED != "off":
        grouped = _grouped_plan(x, split, adapters, training, layer_id, owner)
        if grouped is not None:
            plan, weights = grouped
            try:
                return _GroupedUpdates.apply(out, x, plan, *weights)
            except RuntimeError as err:  # a torch whose grouped GEMM refuses these operands: loop from now on
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    raise
                _GROUPED_RUNS[(x.device, x.dtype)] = False
                warnings.warn(f"multi_lora: the grouped path failed on {x.device} {x.dtype} ({err}); the per-member loop runs instead", stacklevel=2)
    if getattr(owner, "_stacks", None) is not None:
        owner._stacks = None  # the layer loops now (members left, or GROUPED): free the stacked copies
    plan, weights = [], []
    for slot, start, stop in split.segments:
        adapter = adapters[str(slot)] if str(slot) in adapters else None
        if adapter is None or start == stop:
            continue
        p = adapter.dropout if training else 0.0
        seed = (split.dropout_seeds.get(slot, 0) + 1_000_003 * layer_id) % 2**63
        compute = adapter.compute
        if compute[0].dtype != x.dtype and not _upcasts(compute[0].dtype, x.dtype):
            compute = (adapter.lora_A.detach().to(x.dtype), adapter.lora_B.detach().to(x.dtype))
        plan.append((start, stop, adapter.scaling, p, seed, compute))
        weights += [adapter.lora_A, adapter.lora_B]
    if not plan:
        return out
    return _MemberUpdates.apply(out, x, tuple(plan), split.max_len, *weights)


def _upcasts(compute_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """Whether an adapter computing in `compute_dtype` takes the fp32 path on activations of `x_dtype`
    (lora_dtype float32 on a bf16 or fp16 base); otherwise it computes in x's dtype."""
    return compute_dtype == torch.float32 and x_dtype in (torch.bfloat16, torch.float16)


class MultiLoraLinear(nn.Module):
    """A frozen linear (nn.Linear or bitsandbytes Linear4bit) with any number of members' adapters."""

    def __init__(self, base: nn.Module, split: RowSplit, layer_id: int = 0):
        super().__init__()
        self.base = base
        self.split = split
        self.layer_id = layer_id  # tells this layer's dropout masks from other layers'
        self.adapters = nn.ModuleDict()
        self.in_features, self.out_features = _features(base)
        self.plain = type(base) is nn.Linear
        self._stacks: Any = None  # the grouped path's stacked adapters (add_member_updates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not any(str(slot) in self.adapters for slot, _, _ in self.split.segments):
            return out
        if not self.plain:
            out = out.clone()  # as PEFT does for 4-bit layers: never update bitsandbytes' output in place
        return add_member_updates(out, x, self.split, self.adapters, self.training, self.layer_id, owner=self)


def _features(base: nn.Module) -> tuple[int, int]:
    if hasattr(base, "in_features"):
        return base.in_features, base.out_features
    raise TypeError(f"{type(base).__name__}: not a linear layer")


def is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def peft_init(shapes: list[tuple[int, int]], r: int, seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) for each (in, out) target in PEFT's order, as get_peft_model draws them after
    torch.manual_seed(seed): per layer, nn.Linear(in, r) and nn.Linear(r, out) are built (each drawing
    its default kaiming-uniform init on the CPU), then A is drawn again and B zeroed. `dtype`: the
    base model's; PEFT moves each new adapter to its base layer's dtype and get_peft_model casts it
    back to fp32 (autocast_adapter_dtype), so on a bf16 base A starts at its bf16 rounding. The
    caller's RNG state is left untouched."""
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for in_f, out_f in shapes:
            a = torch.empty(r, in_f)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear(in, r).__init__
            nn.init.kaiming_uniform_(torch.empty(out_f, r), a=math.sqrt(5))  # nn.Linear(r, out).__init__
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # reset_lora_parameters
            out.append((a.to(dtype).float(), torch.zeros(out_f, r)))
    return out
