"""The grouped multi-LoRA layer on a GPU (issue 15): correctness against the per-member loop, and
forward + backward time of both, on Gemma-sized layers.

    python3 bench/grouped_lora.py --device cuda --dtype bfloat16 --out /tmp/runs/grouped-lora.json

Checks (bf16): grouped vs loop outputs and every gradient, before and after a parameter update
(the cached stacks must follow), with mixed ranks, dropouts, a member without an adapter on the
layer; inf / nan in one member's weights and rows stays in that member's rows. Timing: the same
layer, loop vs grouped, wall and host time per forward + backward, and whether `auto` groups it.
multi_lora.GROUPED is "off" by default until this has run on an H200.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import with_provenance  # noqa: E402
from trainable import multi_lora as ml  # noqa: E402
from trainable.multi_lora import MemberLora, MultiLoraLinear, RowSplit, refresh_all  # noqa: E402

ap = argparse.ArgumentParser(description="grouped vs looped multi-LoRA layer")
ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
ap.add_argument("--dtype", default="bfloat16")
ap.add_argument("--cases", type=int, default=None, help="time only the first N layer shapes")
ap.add_argument("--out", default=None)
args = ap.parse_args()
dev = torch.device(args.device)
dtype = getattr(torch, args.dtype)
RESULTS: dict = {"checks": {}, "timing": {}}

print("torch", torch.__version__, dev, dtype, torch.cuda.get_device_capability(dev) if dev.type == "cuda" else "")
RESULTS["available"] = bool(ml._grouped_available(torch.zeros(1, 8, device=dev, dtype=dtype), 8, 8))
print("available", RESULTS["available"])

def build(in_f, out_f, ranks, drops, rows, tokens, seed=0, gap_after=None):
    g = torch.Generator().manual_seed(seed)
    segs, start, slot = [], 0, 0
    for i, n in enumerate(rows):
        segs.append((i, start, start + n)); start += n
    split = RowSplit(segments=tuple(segs), dropout_seeds={i: 1000 + i for i in range(len(rows))}, max_len=tokens + 3)
    base = torch.nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    with torch.no_grad(): base.weight.copy_(torch.randn(out_f, in_f, generator=g) / in_f ** 0.5)
    layer = MultiLoraLinear(base, split, layer_id=2)
    for i, (r, p) in enumerate(zip(ranks, drops)):
        if i == gap_after: continue
        lora = MemberLora(in_f, out_f, r, 2 * r, p, compute_dtype=dtype)
        with torch.no_grad():
            lora.lora_A.copy_(torch.randn(r, in_f, generator=g) / in_f ** 0.5); lora.lora_B.copy_(torch.randn(out_f, r, generator=g) / r ** 0.5)
        layer.adapters[str(i)] = lora
    layer.to(dev); layer.base.to(dtype)
    for lora in layer.adapters.values():
        lora.compute_dtype = dtype
        lora.compute = (lora.lora_A, lora.lora_B) if dtype == torch.float32 else (torch.empty_like(lora.lora_A, dtype=dtype), torch.empty_like(lora.lora_B, dtype=dtype))
        lora.refresh()
    x = torch.randn(sum(rows), tokens, in_f, generator=g).to(dev, dtype)
    return layer, x

def fb(layer, x, mode):
    ml.GROUPED = mode
    for p in layer.adapters.parameters(): p.grad = None
    xi = x.clone().requires_grad_(True)
    out = layer(xi)
    (out.float() * 0.01).square().sum().backward()
    return [out.detach().float(), xi.grad.float()] + [p.grad.clone() for p in layer.adapters.parameters()]

def compare(name, **kw):
    layer, x = build(**kw)
    a = fb(layer, x, "off"); b = fb(layer, x, "on")
    assert layer._stacks is not None, "grouped did not run"
    worst = max(float((u - v).abs().max() / (u.abs().max() + 1e-12)) for u, v in zip(a, b))
    # a step: change params, refresh, compare again
    with torch.no_grad():
        for p in layer.adapters.parameters(): p.mul_(0.5).add_(0.01)
    refresh_all(list(layer.adapters.values()))
    a = fb(layer, x, "off"); b = fb(layer, x, "on")
    worst2 = max(float((u - v).abs().max() / (u.abs().max() + 1e-12)) for u, v in zip(a, b))
    print(f"check {name}: worst relative diff {worst:.2e}, after a step {worst2:.2e}")
    return max(worst, worst2)

res = RESULTS["checks"]
res["mixed"] = compare("mixed ranks/dropouts/gap", in_f=1152, out_f=1024, ranks=[4, 8, 16, 64, 8, 32], drops=[0.1, 0.0, 0.05, 0.0, 0.2, 0.1], rows=[2, 1, 3, 1, 2, 2], tokens=100, gap_after=3)
res["uniform"] = compare("16 x r16", in_f=1152, out_f=6912, ranks=[16] * 16, drops=[0.05] * 16, rows=[1] * 16, tokens=128)

# leakage of non-finite values on the device
layer, x = build(in_f=1152, out_f=1152, ranks=[8, 16, 8], drops=[0.1, 0.0, 0.1], rows=[2, 2, 2], tokens=64)
clean = fb(layer, x, "on")
with torch.no_grad():
    layer.adapters["1"].lora_B[0, 0] = float("nan"); layer.adapters["1"].lora_A[0, 0] = float("inf")
refresh_all(list(layer.adapters.values()))
x2 = x.clone(); x2[2, 3, 5] = float("inf")
sick = fb(layer, x2, "on")
ok = torch.equal(sick[0][:2], clean[0][:2]) and torch.equal(sick[0][4:], clean[0][4:]) and all(torch.equal(sick[k], clean[k]) for k in (2, 3, 6, 7))
RESULTS["nan_inf_isolated"] = bool(ok)
print("nan/inf isolation:", ok, "sick rows finite:", bool(torch.isfinite(sick[0][2:4]).all()))

def timeit(layer, x, mode, iters=30):
    ml.GROUPED = mode
    xi = x.clone().requires_grad_(True)
    for _ in range(3):
        layer(xi).float().sum().backward()
    if dev.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        layer(xi).float().sum().backward()
    host = (time.perf_counter() - t0) / iters
    if dev.type == "cuda": torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters
    return wall * 1e3, host * 1e3

for name, kw in [
    ("K16 1152->1152 16x128 r16 p.05", dict(in_f=1152, out_f=1152, ranks=[16] * 16, drops=[0.05] * 16, rows=[1] * 16, tokens=128)),
    ("K16 1152->1152 16x128 r16 p0", dict(in_f=1152, out_f=1152, ranks=[16] * 16, drops=[0.0] * 16, rows=[1] * 16, tokens=128)),
    ("K16 1152->6912 32x512 r8..64 p.05", dict(in_f=1152, out_f=6912, ranks=[8, 16, 32, 64] * 4, drops=[0.05] * 16, rows=[2] * 16, tokens=512)),
    ("K16 6912->1152 32x512 r16 p.05", dict(in_f=6912, out_f=1152, ranks=[16] * 16, drops=[0.05] * 16, rows=[2] * 16, tokens=512)),
    ("K4 1152->1152 8x512 r16 p.05", dict(in_f=1152, out_f=1152, ranks=[16] * 4, drops=[0.05] * 4, rows=[2] * 4, tokens=512)),
][: args.cases]:
    layer, x = build(**kw)
    lw, lh = timeit(layer, x, "off"); gw, gh = timeit(layer, x, "on")
    auto = ml._use_grouped  # noqa
    ml.GROUPED = "auto"; layer._stacks = None
    with torch.no_grad(): layer(x)
    RESULTS["timing"][name] = {"loop_ms": lw, "loop_host_ms": lh, "grouped_ms": gw, "grouped_host_ms": gh, "speedup": lw / gw, "auto_groups": layer._stacks is not None}
    print(f"time {name}: loop {lw:.3f} ms (host {lh:.3f}), grouped {gw:.3f} ms (host {gh:.3f}), speedup x{lw / gw:.2f}, auto groups: {layer._stacks is not None}")

if args.out:
    Path(args.out).write_text(json.dumps(with_provenance(RESULTS), indent=2))
