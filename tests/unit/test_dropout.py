"""LoRA dropout's keep mask (trainable/dropout.py): a hash of (seed, row and position, feature)."""

from __future__ import annotations

import pytest
import torch

from trainable.dropout import dropped, keep_mask


def test_the_mask_drops_p_of_the_elements_and_differs_by_seed() -> None:
    for p in (0.05, 0.1, 0.5):
        kept = keep_mask(16, 256, 128, p, seed=7, max_len=256).float().mean().item()
        assert abs((1 - kept) - p) < 0.01
    a, b = keep_mask(4, 64, 64, 0.5, 1, 64), keep_mask(4, 64, 64, 0.5, 2, 64)
    assert 0.45 < (a == b).float().mean().item() < 0.55  # two seeds: independent masks
    assert torch.equal(a, keep_mask(4, 64, 64, 0.5, 1, 64))  # one seed: one mask
    assert keep_mask(2, 8, 8, 0.0, 3, 8).all()


def test_rows_positions_and_features_are_not_correlated() -> None:
    kept = keep_mask(8, 128, 256, 0.5, 11, 128).float()  # [positions, features]
    # each position's and each feature's share of kept elements is as spread as independent draws
    assert kept.mean(1).std().item() < 2 * 0.5 / 256**0.5
    assert kept.mean(0).std().item() < 2 * 0.5 / 1024**0.5
    assert abs(torch.corrcoef(torch.stack([kept[:-1].flatten(), kept[1:].flatten()]))[0, 1].item()) < 0.02


def test_the_mask_does_not_depend_on_the_padded_width() -> None:
    """A row's mask is drawn over max_len positions: padding the batch wider changes nothing."""
    narrow, wide = keep_mask(3, 5, 16, 0.3, 9, max_len=12), keep_mask(3, 12, 16, 0.3, 9, max_len=12)
    assert torch.equal(narrow.view(3, 5, 16), wide.view(3, 12, 16)[:, :5])


def test_dropped_zeroes_the_dropped_elements_in_place_or_not() -> None:
    x = torch.randn(2 * 6, 10, dtype=torch.float64)
    keep = keep_mask(2, 6, 10, 0.4, 5, 6)
    assert torch.equal(dropped(x, 2, 6, 0.4, 5, 6), torch.where(keep, x, 0))
    y = x.clone()
    assert dropped(y, 2, 6, 0.4, 5, 6, out=y) is y and torch.equal(y, torch.where(keep, x, 0))


def test_dropped_refuses_an_out_it_would_write_wrong() -> None:
    """The CUDA kernel writes `out` as one dense block: a strided view or another shape is refused
    on every device, by the same words."""
    x = torch.randn(2 * 6, 10, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dropped\(out=...\): \(12, 10\) torch.float64 \(contiguous: False\)"):
        dropped(x, 2, 6, 0.4, 5, 6, out=torch.zeros(10, 12, dtype=torch.float64).t())
    with pytest.raises(ValueError, match=r"\(12, 9\)"):
        dropped(x, 2, 6, 0.4, 5, 6, out=torch.zeros(12, 9, dtype=torch.float64))
