"""Domain randomization: every look changes, the order of tissue intensities does not."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.randomize import Randomization, monotone_curve, randomize, strip_skull


def _head(b: int = 4, size: int = 32) -> torch.Tensor:
    """A disk of 'brain' (0.5) inside a ring of 'skull' (1.0) on a 0 background. -> [B, 1, H, W]"""
    y, x = torch.meshgrid(torch.arange(size) - size / 2 + 0.5, torch.arange(size) - size / 2 + 0.5, indexing="ij")
    r = (x**2 + y**2).sqrt()
    image = torch.where(r < 10, 0.5, 0.0) + torch.where((r >= 10) & (r < 13), 1.0, 0.0)
    return image.expand(b, 1, size, size).clone()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), knots=st.integers(2, 8))
def test_the_intensity_curve_is_increasing_and_keeps_0_and_1(seed: int, knots: int) -> None:
    ramp = torch.linspace(0, 1, 256).view(1, 1, 16, 16).repeat(3, 1, 1, 1)
    mapped = monotone_curve(ramp, knots, torch.Generator().manual_seed(seed)).flatten(1)
    assert (mapped[:, 1:] >= mapped[:, :-1]).all()
    assert torch.allclose(mapped[:, 0], torch.zeros(3)) and torch.allclose(mapped[:, -1], torch.ones(3))
    assert not torch.allclose(mapped, ramp.flatten(1), atol=1e-3)  # it did move the grey levels


def test_stripping_removes_the_skull_ring_and_keeps_the_brain() -> None:
    head = _head(2)
    stripped = strip_skull(head, torch.tensor([3, 4]))
    assert stripped[:, :, 16, 16].eq(0.5).all()  # brain centre kept
    assert stripped.eq(1.0).sum() == 0  # the 3 px skull ring is gone
    assert stripped.eq(0.5).sum() > 0.5 * head.eq(0.5).sum()


def test_randomize_keeps_shape_and_range_and_is_seeded() -> None:
    head = _head(8)
    one = randomize(head, torch.Generator().manual_seed(1))
    assert one.shape == head.shape and one.min() >= 0 and one.max() <= 1
    assert torch.equal(one, randomize(head, torch.Generator().manual_seed(1)))
    assert not torch.equal(one, randomize(head, torch.Generator().manual_seed(2)))
    assert not torch.allclose(one[0], one[1])  # each image its own look


def test_each_tissue_keeps_one_grey_level_without_noise_or_resampling() -> None:
    """The contrast a modality classifier reads survives every draw but noise and resampling."""
    cfg = Randomization(p=1.0, noise=0.0, blur=0.0, low_res=1.0, strip_px=(1, 2), scale=0.0, shift_px=0.0,
                        rotate_deg=0.0, bias=0.0)  # fmt: skip
    head = _head(16)
    brain = (head == 0.5) & (strip_skull(head, torch.ones(16, dtype=torch.long)) > 0)
    out = randomize(torch.where(head == 1.0, 1.0, head), torch.Generator().manual_seed(0), cfg)
    # strip_skull (p = 1) removed the ring; the brain keeps one grey level per image, above background.
    levels = [out[i][brain[i]].unique() for i in range(16)]
    assert all(len(v) == 1 and v.item() > 0 for v in levels)
