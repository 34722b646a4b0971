"""The Triton LoRA products (trainable.lora_kernels) against torch's, on CUDA."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainable import multi_lora
from trainable.multi_lora import MemberLora, RowSplit, add_member_updates

lora_kernels = pytest.importorskip("trainable.lora_kernels")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("tokens,k,r", [(8192, 1152, 16), (2048, 6912, 64), (3000, 1024, 8)])
def test_products_match_torch(tokens: int, k: int, r: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16, generator=g)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16, generator=g) / k**0.5
    gh = torch.randn(tokens, r, device="cuda", dtype=torch.bfloat16, generator=g)
    assert rel(lora_kernels.down(x, a, 0.0, 0), torch.mm(x.float(), a.float().t())) < 1e-2
    assert rel(lora_kernels.weight_grad(gh, x, 0.0, 0), torch.mm(gh.float().t(), x.float())) < 1e-2


def test_dropout_mask_is_the_same_everywhere_and_independent_of_width() -> None:
    g = torch.Generator(device="cuda").manual_seed(1)
    rows, width, max_len, k, r, p = 4, 300, 512, 1152, 16, 0.1
    x = torch.randn(rows * width, k, device="cuda", dtype=torch.bfloat16, generator=g)
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16, generator=g)
    gh = torch.randn(rows * width, r, device="cuda", dtype=torch.bfloat16, generator=g)
    keep = lora_kernels.mask_(torch.ones_like(x), p, 7, width, max_len)
    assert abs(float(keep.float().mean()) - (1 - p)) < 0.01
    assert rel(lora_kernels.down(x, a, p, 7, width, max_len), torch.mm((x * keep).float(), a.float().t())) < 1e-2
    assert rel(lora_kernels.weight_grad(gh, x, p, 7, width, max_len), torch.mm(gh.float().t(), (x * keep).float())) < 1e-2
    wider = lora_kernels.mask_(torch.ones(rows * (width + 50), k, device="cuda", dtype=torch.bfloat16), p, 7, width + 50, max_len)
    assert torch.equal(wider.view(rows, width + 50, k)[:, :width], keep.view(rows, width, k))
    assert not torch.equal(lora_kernels.mask_(torch.ones_like(x), p, 8, width, max_len), keep)


def _layer_grads(use_kernels: bool, dropout: float) -> tuple[torch.Tensor, ...]:
    """Two members' updates on one bf16 layer; the output and every gradient."""
    torch.manual_seed(0)
    saved = list(multi_lora._KERNELS)
    multi_lora._KERNELS[:] = [lora_kernels if use_kernels else None]
    try:
        split = RowSplit(segments=((0, 0, 2), (1, 2, 5)), dropout_seeds={0: 11, 1: 12}, max_len=256)
        adapters = nn.ModuleDict({str(s): MemberLora(1152, 1024, r, 2 * r, dropout, device="cuda", compute_dtype=torch.bfloat16) for s, r in ((0, 16), (1, 64))})
        for lora in adapters.values():
            nn.init.normal_(lora.lora_A, std=0.02)
            nn.init.normal_(lora.lora_B, std=0.02)
            lora.refresh()
        x = torch.randn(5, 200, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        out = add_member_updates(torch.zeros(5, 200, 1024, device="cuda", dtype=torch.bfloat16), x, split, adapters, training=True)
        out.float().square().sum().backward()
        return (out.detach(), x.grad, *(p.grad for lora in adapters.values() for p in (lora.lora_A, lora.lora_B)))
    finally:
        multi_lora._KERNELS[:] = saved


def test_cohort_layer_matches_torch_without_dropout() -> None:
    for ours, theirs in zip(_layer_grads(True, 0.0), _layer_grads(False, 0.0)):
        assert rel(ours, theirs) < 2e-2


def test_cohort_layer_with_dropout_trains_on_the_kept_features() -> None:
    """The masks differ from torch's generator, so compare statistics: the same scale of output and
    gradients, and no gradient where nothing flows."""
    ours, theirs = _layer_grads(True, 0.1), _layer_grads(False, 0.1)
    for a, b in zip(ours, theirs):
        assert torch.isfinite(a).all()
        assert 0.8 < float(a.float().norm() / b.float().norm()) < 1.25
