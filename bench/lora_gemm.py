"""The LoRA products of one cohort member on one layer, alone, on a GPU (issue 30): how long each way of
computing them takes at the shapes a 1B cohort step gives them.

    python bench/lora_gemm.py --out lora-gemm.json

The 2026-12-06 profile of an 8-member 1B cohort step (bench/cohort.py --profile, H100) put ~20% of
its GPU time in two cuBLAS kernels with 16-wide tiles: x A^T (the adapter's down product, [tokens,
in] x [in, r]) and its weight gradient gh^T x ([r, tokens] x [tokens, in]); r is 8-64, so cuBLAS
gives the product few output tiles and most SMs idle. Per (tokens, in, r): the down product and the
weight gradient as torch.mm does them, as a batched product over row chunks (more output tiles, the
chunks' weight gradients summed), and as Triton kernels with a row-tile per program (and, for the
gradient, a split over rows with fp32 atomics); each with dropout (mask from a counter-based RNG in
the kernel) and without. Median of --repeat timed calls after warm-up, CUDA events; each variant's
result is checked against torch's (relative error).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from provenance import with_provenance  # noqa: E402

# (tokens per member, in_features, r): a 1B member of 8 rows of 1024 and of 2 rows; q/k/v/gate/up
# read the hidden size (1152), o reads 1024, down reads the MLP width (6912)
SHAPES = [(t, k, r) for t in (8192, 2048) for k in (1152, 6912) for r in (8, 16, 64)]


def timed(fn, repeat: int) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def chunks_for(tokens: int) -> int:
    """Row chunks for the batched forms: enough output tiles for ~132 SMs."""
    return max(1, min(32, tokens // 256))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    from trainable import lora_kernels

    dev = torch.device("cuda")
    rows = []
    for tokens, k, r in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, generator=g)
        a = torch.randn(r, k, device=dev, dtype=torch.bfloat16, generator=g) / k**0.5
        gh = torch.randn(tokens, r, device=dev, dtype=torch.bfloat16, generator=g)
        b = chunks_for(tokens)
        ref_h = torch.mm(x, a.t()).float()
        ref_ga = torch.mm(gh.t(), x).float()
        down = {
            "torch.mm": lambda: torch.mm(x, a.t()),
            "mm transposed": lambda: torch.mm(a, x.t()).t(),
            f"bmm x{b}": lambda: torch.bmm(x.view(b, tokens // b, k), a.t().expand(b, k, r)).view(tokens, r),
            "triton": lambda: lora_kernels.down(x, a, 0.0, 0),
            "triton + dropout": lambda: lora_kernels.down(x, a, 0.05, 123),
        }
        grad = {
            "torch.mm": lambda: torch.mm(gh.t(), x),
            f"bmm x{b} + sum": lambda: torch.bmm(gh.view(b, tokens // b, r).transpose(1, 2), x.view(b, tokens // b, k)).sum(0),
            "triton": lambda: lora_kernels.weight_grad(gh, x, 0.0, 0),
            "triton + dropout": lambda: lora_kernels.weight_grad(gh, x, 0.05, 123),
        }
        for what, variants, ref in (("down x A^T", down, ref_h), ("grad gh^T x", grad, ref_ga)):
            for name, fn in variants.items():
                row = {"op": what, "variant": name, "tokens": tokens, "in": k, "r": r}
                try:
                    out = fn().float()
                    if "dropout" not in name:
                        row["rel_err"] = float((out - ref).norm() / ref.norm())
                    row["seconds"] = timed(fn, args.repeat)
                    row["gb_per_s"] = x.numel() * 2 / row["seconds"] / 1e9  # x's bytes: the product is bound by reading them
                except Exception as exc:  # a variant that does not run here says why; the others still run
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(with_provenance(rows), indent=2))
    print(f"\n{'op':<12} {'variant':<18} {'tokens':>6} {'in':>5} {'r':>3} {'us':>8} {'GB/s':>7} {'rel err':>8}")
    for row in rows:
        us = row.get("seconds", float("nan")) * 1e6
        print(f"{row['op']:<12} {row['variant']:<18} {row['tokens']:>6} {row['in']:>5} {row['r']:>3} {us:>8.1f} {row.get('gb_per_s', float('nan')):>7.0f} "
              f"{row.get('rel_err', float('nan')):>8.1e} {row.get('error', '')[:80]}")  # fmt: skip


if __name__ == "__main__":
    main()
