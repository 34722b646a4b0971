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
    acc = torch.randn_like(x)
    want = (acc.float() + torch.where(keep, x, 0).float()).to(dtype)  # summed in fp32, rounded once: torch's add
    assert dropped(x, rows, width, p, seed, max_len, add_to=acc) is acc
    assert torch.equal(acc, want)


def test_parameter_gradients_come_out_fp32_from_bf16_factors() -> None:
    """multi_lora's weight gradients: bf16 factors, an fp32 product (cuBLAS's out_dtype form where
    this torch has it), equal within fp32 rounding to the product of the factors taken in fp32."""
    from trainable import multi_lora

    a = torch.randn(512, 16, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 1152, device="cuda", dtype=torch.bfloat16)
    got = multi_lora._mm_to(a.t(), b, 0.25, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (16, 1152)
    assert isinstance(multi_lora._MM_TO["cuda"], bool)
    want = (a.float().t() @ b.float()) * 0.25
    tol = 1e-5 if multi_lora._MM_TO["cuda"] else 1e-2  # the fallback rounds the product to bf16 first
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))
