"""Triton kernels for a cohort member's LoRA products on CUDA (issue 30; bench/lora_gemm.py).

A member's down product x A^T ([tokens, in] x [in, r]) and its weight gradient gh^T x ([r, tokens] x
[tokens, in]) have r = 8-64 columns: cuBLAS tiles them 16 wide and leaves most SMs idle (an 8-member
1B cohort step spent ~20% of its GPU time there, more than in the frozen base's GEMMs). These
kernels give every program a tile of rows (the gradient: a tile of `in` and a share of the rows,
summed with fp32 atomics), so the products run at the speed of reading x.

Dropout happens inside them: a member's keep mask at a layer is a function of (seed, row, position,
feature) from Triton's counter-based Philox generator, recomputed wherever it is needed (forward,
weight gradient, input gradient) and never stored. Position counts over `max_len` per row, so a mask
depends neither on the padded width nor on the rows around it (other members').

Imported only where CUDA runs (trainable.multi_lora); the CPU path is torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keep(seed, m, k, width, max_len, K, p):
    """The keep mask for rows m (token index in the member's rows) and features k."""
    pos = (m // width).to(tl.int64) * max_len + (m % width)
    return tl.rand(seed, pos * K + k) >= p


@triton.jit
def _down_kernel(x_ptr, a_ptr, h_ptr, M, K, R, stride_x, stride_a, stride_h, seed, p, width, max_len,
                 DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, rm[:, None], rk[None, :], width, max_len, K, p), x, 0.0)
        at = tl.load(a_ptr + rr[None, :] * stride_a + rk[:, None], mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc += tl.dot(x, at)
    tl.store(h_ptr + rm[:, None].to(tl.int64) * stride_h + rr[None, :], acc.to(h_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _grad_kernel(g_ptr, x_ptr, out_ptr, M, K, R, stride_g, stride_x, rows_per_split, seed, p, width, max_len,
                 DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_k, pid_m = tl.program_id(0), tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    start = pid_m * rows_per_split
    for m0 in range(start, tl.minimum(start + rows_per_split, M), BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        inside = rm < tl.minimum(start + rows_per_split, M)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :], mask=inside[:, None] & (rk[None, :] < K), other=0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, rm[:, None], rk[None, :], width, max_len, K, p), x, 0.0)
        g = tl.load(g_ptr + rm[:, None].to(tl.int64) * stride_g + rr[None, :], mask=inside[:, None] & (rr[None, :] < R), other=0.0)
        acc += tl.dot(tl.trans(g), x)
    tl.atomic_add(out_ptr + rr[:, None] * K + rk[None, :], acc, mask=(rr[:, None] < R) & (rk[None, :] < K))


@triton.jit
def _mask_kernel(t_ptr, M, K, stride_t, seed, p, width, max_len, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rm[:, None] < M) & (rk[None, :] < K)
    ptrs = t_ptr + rm[:, None].to(tl.int64) * stride_t + rk[None, :]
    t = tl.load(ptrs, mask=inside, other=0.0)
    t = tl.where(_keep(seed, rm[:, None], rk[None, :], width, max_len, K, p), t, 0.0)
    tl.store(ptrs, t, mask=inside)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(r))  # tl.dot's smallest tile side


def down(x: torch.Tensor, a: torch.Tensor, p: float, seed: int, width: int = 0, max_len: int = 0) -> torch.Tensor:
    """(x * keep) A^T in x's dtype (fp32 accumulation): x [M, K] rows of `width` positions, a [r, K]."""
    M, K = x.shape
    R = a.shape[0]
    h = torch.empty((M, R), device=x.device, dtype=x.dtype)
    width = width or M
    block_m = 64
    _down_kernel[(triton.cdiv(M, block_m),)](x, a, h, M, K, R, x.stride(0), a.stride(0), h.stride(0), seed, p, width, max(max_len, width),
                                             DROPOUT=p > 0, BLOCK_M=block_m, BLOCK_K=64, BLOCK_R=_block_r(R))  # fmt: skip
    return h


def weight_grad(g: torch.Tensor, x: torch.Tensor, p: float, seed: int, width: int = 0, max_len: int = 0) -> torch.Tensor:
    """g^T (x * keep) in fp32: g [M, r], x [M, K] -> [r, K]."""
    M, K = x.shape
    R = g.shape[1]
    out = torch.zeros((R, K), device=x.device, dtype=torch.float32)
    width = width or M
    block_m, block_k = 64, 128
    k_blocks = triton.cdiv(K, block_k)
    splits = max(1, min(triton.cdiv(M, block_m), triton.cdiv(4 * _sm_count(x.device), k_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), block_m) * block_m
    splits = triton.cdiv(M, rows_per_split)
    _grad_kernel[(k_blocks, splits)](g, x, out, M, K, R, g.stride(0), x.stride(0), rows_per_split, seed, p, width, max(max_len, width),
                                     DROPOUT=p > 0, BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=_block_r(R))  # fmt: skip
    return out


def mask_(t: torch.Tensor, p: float, seed: int, width: int = 0, max_len: int = 0) -> torch.Tensor:
    """t *= keep, in place (t [M, K], contiguous rows): the input gradient's dropout."""
    M, K = t.shape
    width = width or M
    _mask_kernel[(triton.cdiv(M, 32), triton.cdiv(K, 128))](t, M, K, t.stride(0), seed, p, width, max(max_len, width), BLOCK_M=32, BLOCK_K=128)
    return t


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]
