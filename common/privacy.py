"""Privacy accounting as pure functions of (sample rate, noise multiplier, steps) segments.

Each segment is `steps` applications of the Poisson-subsampled Gaussian mechanism (DP-SGD;
Abadi et al. 2016) with subject sampling rate q and noise multiplier σ. A site's guarantee is
the composition of all its segments, under add/remove-one-subject adjacency.

Accountants:
- "prv": Opacus's PRV accountant (Gopi et al. 2021), the default; it returns an upper bound.
- "rdp": Opacus's RDP accountant (Mironov 2017; Mironov et al. 2019), looser, reported as a
  conservative cross-check.
- "pld": Google's dp-accounting privacy-loss-distribution accountant (Meiser & Mohammadi 2018;
  Doroshenko et al. 2022), independent of Opacus, used by `fedmri verify`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from common.protocol import Accountant

PRV_RDP_CUTOFF = 64.0  # above this RDP ε, "prv" reports the (larger) RDP value


@dataclass(frozen=True)
class Segment:
    """`steps` DP-SGD steps at subject sampling rate q and noise multiplier σ."""

    sample_rate: float
    noise_multiplier: float
    steps: int

    def __post_init__(self) -> None:
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must lie in (0, 1], got {self.sample_rate}")
        if not self.noise_multiplier >= 0.0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")


def _active(segments: Sequence[Segment]) -> list[Segment]:
    return [s for s in segments if s.steps > 0]


def epsilon(segments: Sequence[Segment], delta: float, accountant: str = "prv") -> float:
    """ε of the composition of `segments` at δ; 0 for no steps, ∞ if any step had σ = 0."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    active = _active(segments)
    if not active:
        return 0.0
    if any(s.noise_multiplier == 0.0 for s in active):
        return math.inf
    if accountant == "prv":
        # PRV's discretisation grows with ε and runs out of memory far outside any useful budget
        # (ε in the hundreds). There the RDP bound, which is never below PRV's, is returned instead.
        rdp = _epsilon_opacus(active, delta, "rdp")
        return rdp if rdp > PRV_RDP_CUTOFF else _epsilon_opacus(active, delta, "prv")
    if accountant == "rdp":
        return _epsilon_opacus(active, delta, "rdp")
    if accountant == "pld":
        return _epsilon_pld(active, delta)
    raise ValueError(f"unknown accountant {accountant!r}; choose one of: {', '.join(Accountant)}")


def _epsilon_opacus(segments: list[Segment], delta: float, kind: str) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if kind == "prv" else RDPAccountant()
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in segments]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP warns when the optimal order is at the grid's edge
        return float(accountant.get_epsilon(delta=delta))


def _epsilon_pld(segments: list[Segment], delta: float) -> float:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant()
    for s in segments:
        step = dp_event.PoissonSampledDpEvent(s.sample_rate, dp_event.GaussianDpEvent(s.noise_multiplier))
        accountant.compose(dp_event.SelfComposedDpEvent(step, s.steps))
    return float(accountant.get_epsilon(delta))


def calibrate_noise(
    history: Sequence[Segment],
    sample_rate: float,
    steps: int,
    delta: float,
    target_epsilon: float,
    min_noise_multiplier: float = 0.0,
    max_noise_multiplier: float = 100.0,
    accountant: str = "prv",
    tolerance: float = 0.01,
    hint: float | None = None,
) -> float | None:
    """Smallest σ ≥ min_noise_multiplier such that history + (q, σ, steps) stays within ε.

    Returns None when even max_noise_multiplier would exceed the target. With `hint` (the σ
    calibrated for the same plan last round), one check replaces the search when it still fits.
    """

    def fits(sigma: float) -> bool:
        return epsilon([*history, Segment(sample_rate, sigma, steps)], delta, accountant) <= target_epsilon

    low = max(min_noise_multiplier, 1e-3)
    if hint is not None and hint >= low and fits(hint):
        return hint
    if fits(low):
        return low
    if not fits(max_noise_multiplier):
        return None
    high = max_noise_multiplier
    while high - low > tolerance * low:
        mid = math.sqrt(low * high)  # bisect in log space: ε falls steeply in σ
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


def default_delta(num_subjects: int) -> float:
    """δ = min(1e-5, 1/(10 N)): well below 1/N, so no single subject's record can simply leak."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    return min(1e-5, 1.0 / (10.0 * num_subjects))
