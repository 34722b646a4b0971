"""The Triton kernel of trainable/dropout.py: draw a member's keep mask in registers and apply it
(the hash, word for word, that dropout.keep_mask computes with torch integer ops)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix(h):  # lowbias32 on uint32 words (the multiplications wrap as the host's & 0xFFFFFFFF does)
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    return h ^ (h >> 16)


@triton.jit
def _dropped(src, dst, features, width, full, seed, thresh, BLOCK: tl.constexpr):
    # one program: one position of one row (a token), BLOCK of its features
    rowpos = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = f < features
    offs = rowpos.to(tl.int64) * features + f
    x = tl.load(src + offs, mask=inside)
    row = rowpos // width
    pos = (row * full + rowpos - row * width).to(tl.uint32)
    key = _mix(seed.to(tl.uint32) ^ (pos * 0x9E3779B9))
    h = _mix(key ^ (f.to(tl.uint32) * 0x85EBCA6B))
    tl.store(dst + offs, tl.where(h >= thresh.to(tl.uint32), x, tl.zeros_like(x)), mask=inside)


def launch(src: torch.Tensor, dst: torch.Tensor, width: int, full: int, seed: int, thresh: int) -> None:
    """dst = src with the dropped elements zeroed; src, dst: [rows * width, features], contiguous."""
    features = src.shape[1]
    block = min(1024, triton.next_power_of_2(features))
    _dropped[(src.shape[0], triton.cdiv(features, block))](src, dst, features, width, full, seed, thresh, BLOCK=block)
