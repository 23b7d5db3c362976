"""Privacy math: properties of composition, calibration, and agreement with dp-accounting's PLD."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy import PRV_RDP_CUTOFF, Segment, calibrate_noise, default_delta, epsilon

RATES = st.floats(min_value=0.01, max_value=0.5)
SIGMAS = st.floats(min_value=0.6, max_value=3.0)


@settings(max_examples=10, deadline=None)  # PLD takes about 1.5 s per composition
@given(q=RATES, sigma=SIGMAS, steps=st.integers(1, 200), more=st.integers(1, 200))
def test_epsilon_never_drops_when_steps_are_added(q: float, sigma: float, steps: int, more: int) -> None:
    base = [Segment(q, sigma, steps)]
    assert epsilon(base, 1e-5, "rdp") <= epsilon([*base, Segment(q, sigma, more)], 1e-5, "rdp")
    assert epsilon(base, 1e-5, "pld") <= epsilon([*base, Segment(q, sigma, more)], 1e-5, "pld") + 1e-9


@settings(max_examples=25, deadline=None)
@given(q=RATES, low=SIGMAS, high=SIGMAS, steps=st.integers(1, 200))
def test_more_noise_never_costs_more(q: float, low: float, high: float, steps: int) -> None:
    low, high = sorted((low, high))
    # Up to float rounding: σ one ulp apart can give ε in the wrong order in the 13th digit.
    assert epsilon([Segment(q, high, steps)], 1e-5, "rdp") <= epsilon([Segment(q, low, steps)], 1e-5, "rdp") * (
        1 + 1e-12
    )


@settings(max_examples=4, deadline=None)
@given(q=st.floats(0.05, 0.3), steps=st.integers(10, 100), target=st.floats(2.0, 10.0))
def test_calibrated_sigma_meets_its_target(q: float, steps: int, target: float) -> None:
    sigma = calibrate_noise([], q, steps, 1e-5, target, min_noise_multiplier=0.3)
    assert sigma is not None
    assert epsilon([Segment(q, sigma, steps)], 1e-5, "prv") <= target
    if sigma > 0.3 * 1.05:  # not at the floor: a little less noise would overshoot
        assert epsilon([Segment(q, sigma / 1.05, steps)], 1e-5, "prv") > target


@settings(max_examples=8, deadline=None)  # about 4 s each: both searches, RDP
@given(
    q=st.floats(0.01, 0.6),
    steps=st.integers(1, 400),
    target=st.floats(0.3, 20.0),
    floor=st.floats(0.0, 2.0),
    spent=st.lists(st.tuples(st.floats(0.01, 0.6), SIGMAS, st.integers(1, 200)), max_size=2),
)
def test_the_secant_search_keeps_the_bisection_guarantee(
    q: float, steps: int, target: float, floor: float, spent: list[tuple[float, float, int]]
) -> None:
    """Both searches answer the same question: the smallest σ >= floor that fits, to 1 %, or None."""
    history = [Segment(*s) for s in spent]
    found = {
        search: calibrate_noise(history, q, steps, 1e-5, target, floor, accountant="rdp", search=search)
        for search in ("secant", "bisect")
    }
    sigma = found["secant"]
    assert (sigma is None) == (found["bisect"] is None)
    if sigma is None:
        assert epsilon([*history, Segment(q, 100.0, steps)], 1e-5, "rdp") > target
        return
    assert epsilon([*history, Segment(q, sigma, steps)], 1e-5, "rdp") <= target
    if sigma > max(floor, 1e-3):  # not the floor: 1 % less noise would not fit
        assert epsilon([*history, Segment(q, sigma / 1.01, steps)], 1e-5, "rdp") > target
    assert found["bisect"] / 1.01 <= sigma <= found["bisect"] * 1.01


@pytest.mark.parametrize(
    "segments",
    [
        [Segment(0.133, 1.0, 60)],
        [Segment(0.2, 1.2, 20)] * 3,
        [Segment(0.1, 0.9, 40), Segment(0.1, 1.4, 40)],
        [Segment(0.05, 0.8, 500)],
    ],
)
def test_prv_is_never_below_pld_and_within_five_percent(segments: list[Segment]) -> None:
    prv, pld = epsilon(segments, 1e-5, "prv"), epsilon(segments, 1e-5, "pld")
    assert pld <= prv <= 1.05 * pld
    assert epsilon(segments, 1e-5, "rdp") >= prv  # RDP is the conservative cross-check


def test_edge_cases() -> None:
    assert epsilon([], 1e-5) == 0.0
    assert epsilon([Segment(0.1, 0.0, 5)], 1e-5) == math.inf
    assert calibrate_noise([Segment(0.5, 0.5, 1000)], 0.5, 10, 1e-5, 1.0) is None
    assert default_delta(100) == 1e-5 and default_delta(100_000) == 1e-6
    with pytest.raises(ValueError, match="sample_rate"):
        Segment(1.5, 1.0, 1)


def _prv_by_definition(segments: list[Segment], delta: float) -> float:
    """What `epsilon(..., "prv")` promises, spelled out with Opacus and no shortcut or memo."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in segments]
    rdp = RDPAccountant()
    rdp.history = list(history)
    bound = rdp.get_epsilon(delta=delta)
    if bound > PRV_RDP_CUTOFF:
        return float(bound)
    prv = PRVAccountant()
    prv.history = list(history)
    return float(prv.get_epsilon(delta=delta))


@settings(max_examples=12, deadline=None)  # PRV takes about a second per composition
@given(q=st.floats(0.02, 0.6), sigma=st.floats(0.3, 2.0), steps=st.integers(1, 400))
def test_prv_with_its_shortcuts_equals_its_definition(q: float, sigma: float, steps: int) -> None:
    """The integer-order pre-check and the memo never change the answer, on either side of the cutoff."""
    segments = [Segment(q, sigma, steps), Segment(q / 2, sigma * 1.5, steps)]
    expected = _prv_by_definition(segments, 1e-5)
    assert epsilon(segments, 1e-5, "prv") == expected
    assert epsilon(segments, 1e-5, "prv") == expected  # memoized: the same value again


def test_prv_cutoff_cases_are_exercised() -> None:
    """The property above covers both sides: one case far below the cutoff, one far above."""
    low, high = [Segment(0.1, 1.5, 50)], [Segment(0.6, 0.3, 400)]
    assert epsilon(low, 1e-5, "prv") == _prv_by_definition(low, 1e-5) < PRV_RDP_CUTOFF
    assert epsilon(high, 1e-5, "prv") == _prv_by_definition(high, 1e-5) > PRV_RDP_CUTOFF
