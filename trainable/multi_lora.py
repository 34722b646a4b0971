"""Many members' LoRA adapters on one frozen linear layer (issue 15: a cohort of trials, one base).

The frozen projection runs once on the concatenated micro-batches of every member; each member's
low-rank update is then added to its own rows only. Which rows are whose is a `RowSplit`, shared by
every wrapped layer of a model and set by the cohort before each forward (and left in place until
backward has run: recomputation under gradient checkpointing reads it again).

Row i of the batch depends only on row i's own tokens (attention, norms and MLP work per sequence),
so a member's loss, and hence its gradients, depend only on its rows and its own adapter.

`add_member_updates` holds the per-member arithmetic in one place (`_MemberUpdates`: forward and
backward, one autograd node per layer for all members, a loop over the members):
- compute dtype = each adapter's `compute_dtype` (the cohort's train.lora_dtype):
  - the activations' dtype (bf16 on a bf16 or NF4-with-bf16-compute base with lora_dtype bfloat16;
    fp32 on an fp32 base, exact): x is never cast, the update is added in place;
  - fp32 on a bf16 (or fp16) base (lora_dtype float32): what PEFT does for an fp32 adapter on a
    bf16 model, in the same order: each member's rows of x cast up, (x A^T) B^T * scaling in fp32,
    added to the frozen output in fp32 and rounded back to its dtype once; backward likewise (the
    output's gradient cast up, x's gradient rounded back).
  Either way gradients come back to the fp32 parameters (what the optimizer steps).
- saved for backward: x once per layer (shared by all members) and x A^T ([tokens, r], small).
  No fp32 copy of x (the fp32-compute path casts a member's rows again in backward), no dropout mask.
- dropout (trainable/dropout.py): whether an element of a member's rows is kept is a hash of (its
  seed for this micro-step and layer, its row and position, the feature), computed again in
  backward instead of kept; on CUDA one Triton kernel draws and applies it. So a member's masks
  depend neither on who else is in the cohort nor on the padded width, and recomputation
  (gradient checkpointing) and backward see the same mask. Dropout 0: no mask.
- per member, forward [dropout,] mm, addmm (scale and add fused); backward 2-3 mm/addmm,
  [dropout twice,] and a cast of the two small gradients on a bf16 base. The adapters'
  compute copies (`MemberLora.compute`, refreshed after each optimizer step) are what it multiplies
  by.

(A grouped path, torch's grouped GEMM for all members at once, measured slower in a real sweep than
this loop (bench/BENCH.md, "Cohort passes and grouped LoRA in a sweep"): its forward passes carry
thousands of tokens per member, where the loop is no longer launch-bound. It was removed. So were
Triton kernels for the members' down products and weight gradients with dropout drawn inside:
cuBLAS was faster at every shape measured (bench/BENCH.md, issue 30).)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from trainable.dropout import dropped


@dataclass
class RowSplit:
    """The current forward's rows: (slot, start, stop) spans along the batch dimension; each slot's
    dropout seed for this forward; and the width over which dropout masks are drawn."""

    segments: tuple[tuple[int, int, int], ...] = ()
    dropout_seeds: dict[int, int] = field(default_factory=dict)
    max_len: int = 0


class MemberLora(nn.Module):
    """One member's adapter on one linear: out += B(A(dropout(x))) * alpha / r (PEFT's LoRA).

    lora_A / lora_B are fp32 (the optimizer's); `compute` holds the tensors the layer multiplies by:
    the parameters themselves when the compute dtype is theirs, else copies in the compute dtype that
    `refresh()` updates (the cohort calls it after every optimizer step and load)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, device: Any = None, compute_dtype: Any = None):
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.scaling = alpha / r
        self.dropout = dropout
        self.compute_dtype = compute_dtype or self.lora_A.dtype
        self.compute: tuple[torch.Tensor, torch.Tensor] = (self.lora_A, self.lora_B)
        if self.compute_dtype != self.lora_A.dtype:
            self.compute = (torch.empty_like(self.lora_A, dtype=self.compute_dtype), torch.empty_like(self.lora_B, dtype=self.compute_dtype))
        self.refresh()

    def refresh(self) -> None:
        if self.compute[0] is not self.lora_A:
            with torch.no_grad():
                self.compute[0].copy_(self.lora_A)
                self.compute[1].copy_(self.lora_B)


def refresh_all(loras: list[MemberLora]) -> None:
    """`MemberLora.refresh` for many adapters in two foreach copies."""
    pairs = [(c, p) for lora in loras if lora.compute[0] is not lora.lora_A for c, p in zip(lora.compute, (lora.lora_A, lora.lora_B))]
    if pairs:
        with torch.no_grad():
            torch._foreach_copy_([c for c, _ in pairs], [p for _, p in pairs])


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
                xi = dropped(xi, stop - start, tokens, p, seed, max_len)
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
            keep = (stop - start, tokens, p, seed, ctx.max_len) if p > 0 else None  # dropped()'s arguments
            c = scaling / (1 - p)
            if a.dtype != x.dtype:  # fp32 adapter on bf16 activations, as autograd differentiates PEFT's forward
                xi, gs = xi.to(a.dtype), gi.to(a.dtype) * c  # d loss / d (h B^T), fp32
                gh = torch.mm(gs, b)
                grad_b = torch.mm(gs.t(), h)
            else:
                gh = _mm(gi, b, c)  # d loss / d h, [tokens, r]
                grad_b = _mm(gi.t(), h, c)
            grad_a = torch.mm(gh.t(), xi if keep is None else dropped(xi, *keep))
            if need_x:
                if a.dtype != x.dtype:
                    gxi = torch.mm(gh, a)
                    gx[lo:hi].copy_(gxi if keep is None else dropped(gxi, *keep, out=gxi))  # rounded back to x's dtype once
                else:
                    torch.mm(gh, a, out=gx[lo:hi])
                    if keep is not None:
                        dropped(gx[lo:hi], *keep, out=gx[lo:hi])
            grads += [grad_a.to(ctx.dtypes[i]), grad_b.to(ctx.dtypes[i + 1])]
        if need_x and covered < x2.shape[0]:
            gx[covered:].zero_()
        return (grad, gx.view_as(x) if need_x else None, None, None, *grads)


def add_member_updates(out: torch.Tensor, x: torch.Tensor, split: RowSplit, adapters: nn.ModuleDict, training: bool, layer_id: int = 0) -> torch.Tensor:
    """out[rows of member m] += B_m(A_m(dropout_m(x[rows of m]))) * scaling_m, for every member that
    has an adapter on this layer, in x's dtype, or in fp32 for an fp32 adapter on lower-precision x
    (module docstring). In place on `out` (the frozen layer's fresh output)."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not any(str(slot) in self.adapters for slot, _, _ in self.split.segments):
            return out
        if not self.plain:
            out = out.clone()  # as PEFT does for 4-bit layers: never update bitsandbytes' output in place
        return add_member_updates(out, x, self.split, self.adapters, self.training, self.layer_id)


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
