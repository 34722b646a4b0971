"""The CUDA kernel of trainable/dropout.py draws the mask the torch reference draws, bit for bit."""

from __future__ import annotations

import pytest
import torch

from trainable.dropout import dropped, keep_mask

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "width", "features", "p", "seed", "max_len"), [(3, 7, 24, 0.3, 11, 9), (8, 1024, 1152, 0.05, 2**62 + 5, 1024), (2, 100, 6912, 0.1, 0, 128)])
def test_kernel_matches_the_reference(dtype: torch.dtype, rows: int, width: int, features: int, p: float, seed: int, max_len: int) -> None:
    x = torch.randn(rows * width, features, device="cuda", dtype=dtype)
    keep = keep_mask(rows, width, features, p, seed, max_len, device="cuda")
    assert torch.equal(dropped(x, rows, width, p, seed, max_len), torch.where(keep, x, 0))
    y = x.clone()
    dropped(y, rows, width, p, seed, max_len, out=y)
    assert torch.equal(y, torch.where(keep, x, 0))
