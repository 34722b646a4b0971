"""LoRA dropout for a cohort member's rows, with no mask in memory (trainable/multi_lora.py uses it).

    dropped(rows2, rows, width, p, seed, max_len)        # rows2 * keep, keep in {0, 1}

Whether element (row r, position t, feature f) of a member's rows is kept is a function of
(seed, r * max(max_len, width) + t, f) alone: a counter-based hash (three rounds of the
"lowbias32" integer mixer over 32-bit words), kept when the hash is >= p * 2**32. So a member's
mask does not depend on who else trains beside it or on the padded width, and backward (or
recomputation under gradient checkpointing) gets the same mask by computing it again. The 1/(1-p)
scale is not applied here: the caller folds it into its matrix product.

On CUDA one Triton kernel draws and applies the mask in registers: one read and one write of the
rows. Drawing a mask with torch's bernoulli and multiplying by it took a kernel for the draw, a
mask's worth of memory traffic and torch's casting multiply (bool x bf16): the largest eager
kernels of an 8-member 1B step (bench/BENCH.md, issue 30). Elsewhere (and as the reference the GPU
test holds the kernel to, bit for bit) the same hash runs as torch integer ops.
"""

from __future__ import annotations

from typing import Any

import torch

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_GOLDEN, _FEATURE = 0x9E3779B9, 0x85EBCA6B  # spread positions and features over the 32-bit words


def _mix(h: int) -> int:
    """lowbias32 on a Python int (the seed's mixing, on the host)."""
    h ^= h >> 16
    h = (h * _C1) & _M32
    h ^= h >> 15
    h = (h * _C2) & _M32
    return h ^ (h >> 16)


def seed32(seed: int) -> int:
    """A 64-bit seed folded into the 32-bit word the kernel starts from."""
    return _mix((seed & _M32) ^ _mix((seed >> 32) & _M32))


def threshold(p: float) -> int:
    """Hashes below this are dropped: p of the 2**32 words (p in [0, 1))."""
    return min(_M32, int(round(p * 2**32)))


def _mulmod(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32 in int64, without overflowing int64."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix_t(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mulmod(h, _C1)
    h = h ^ (h >> 15)
    h = _mulmod(h, _C2)
    return h ^ (h >> 16)


def keep_mask(rows: int, width: int, features: int, p: float, seed: int, max_len: int, device: Any = None) -> torch.Tensor:
    """The keep mask ([rows * width, features], bool) as torch integer ops: the reference."""
    full = max(width, max_len)
    pos = (torch.arange(rows, device=device)[:, None] * full + torch.arange(width, device=device)[None, :]).reshape(-1, 1)
    key = _mix_t(seed32(seed) ^ _mulmod(pos, _GOLDEN))
    h = _mix_t(key ^ _mulmod(torch.arange(features, device=device)[None, :], _FEATURE))
    return h >= threshold(p)


def dropped(rows2: torch.Tensor, rows: int, width: int, p: float, seed: int, max_len: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """rows2 ([rows * width, features], contiguous) with the dropped elements zeroed (not rescaled),
    into `out` (contiguous, rows2's shape and dtype; may be rows2 itself) or a new tensor."""
    if out is not None and (out.shape != rows2.shape or out.dtype != rows2.dtype or not out.is_contiguous()):
        # the CUDA kernel writes `out` as one dense block: a strided view would be written wrong
        raise ValueError(f"dropped(out=...): {tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()}) for rows {tuple(rows2.shape)} {rows2.dtype}")
    if rows2.is_cuda:
        return _dropped_cuda(rows2, rows, width, p, seed, max_len, out)
    keep = keep_mask(rows, width, rows2.shape[1], p, seed, max_len, rows2.device)
    if out is None:
        return rows2 * keep
    return torch.mul(rows2, keep, out=out)


# ----------------------------------------------------------------------------------------------
# the CUDA kernel (trainable/dropout_kernel.py: Triton is imported only where CUDA runs)


def _dropped_cuda(rows2: torch.Tensor, rows: int, width: int, p: float, seed: int, max_len: int, out: torch.Tensor | None) -> torch.Tensor:
    from trainable.dropout_kernel import launch

    if not rows2.is_contiguous():
        rows2 = rows2.contiguous()
    dst = torch.empty_like(rows2) if out is None else out
    if rows2.numel():
        launch(rows2, dst, width, max(width, max_len), seed32(seed), threshold(p))
    return dst
