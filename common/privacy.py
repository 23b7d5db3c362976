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

import functools
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
        # The integer orders' RDP bound is never below the full grid's and costs 1/20 of it: only
        # when it passes the cutoff is the full grid's needed to decide.
        if _epsilon_opacus(tuple(active), delta, "rdp-integer") > PRV_RDP_CUTOFF:
            rdp = _epsilon_opacus(tuple(active), delta, "rdp")
            if rdp > PRV_RDP_CUTOFF:
                return rdp
        return _epsilon_opacus(tuple(active), delta, "prv")
    if accountant == "rdp":
        return _epsilon_opacus(tuple(active), delta, "rdp")
    if accountant == "pld":
        return _epsilon_pld(active, delta)
    raise ValueError(f"unknown accountant {accountant!r}; choose one of: {', '.join(Accountant)}")


@functools.lru_cache(maxsize=256)
def _epsilon_opacus(segments: tuple[Segment, ...], delta: float, kind: str) -> float:
    """Opacus's ε for `segments` at δ. A pure function, so it is memoized: a round asks for the
    same composition when it checks its plan and again when it records it (about a second each)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if kind == "prv" else RDPAccountant()
    accountant.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in segments]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP warns when the optimal order is at the grid's edge
        if kind == "rdp-integer":
            orders = [a for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer()]
            return float(accountant.get_privacy_spent(delta=delta, alphas=orders)[0])
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
    search: str = "secant",
) -> float | None:
    """Smallest σ ≥ min_noise_multiplier such that history + (q, σ, steps) stays within ε.

    The answer σ fits, and either it is the floor or σ / (1 + tolerance) does not fit. Returns
    None when even max_noise_multiplier would exceed the target. With `hint` (the σ calibrated for
    the same plan last round), one check replaces the search when it still fits.

    Each check is a full accountant run (about a second for PRV), so the search matters:
    - "bisect": bisection of [floor, max] in log σ, about 12 checks;
    - "secant" (the default): a secant step on log ε against log σ, then a check on either side of
      the estimate that closes the bracket; bisection whenever a step does not halve the bracket.
      The same guarantee in about half the checks (`fedmri bench`: calibration).
    """

    def log_excess(log_sigma: float) -> float:  # <= 0: fits
        eps = epsilon([*history, Segment(sample_rate, math.exp(log_sigma), steps)], delta, accountant)
        return math.log(eps) - math.log(target_epsilon) if eps > 0 else -math.inf

    if search not in ("secant", "bisect"):
        raise ValueError(f"unknown search {search!r}; choose secant or bisect")
    low = max(min_noise_multiplier, 1e-3)
    if hint is not None and hint >= low and log_excess(math.log(hint)) <= 0:
        return hint
    lo, top, width = math.log(low), math.log(max_noise_multiplier), math.log1p(tolerance)
    f_lo = log_excess(lo)
    if f_lo <= 0:
        return low
    hi: float | None = None  # the smallest log σ known to fit
    points = [(lo, f_lo)]  # every check, in order: (log σ, log ε - log target)

    def check(x: float) -> None:
        nonlocal lo, hi
        f = log_excess(x)
        points.append((x, f))
        if f <= 0:
            hi = x if hi is None else min(hi, x)
        else:
            lo = max(lo, x)

    if search == "bisect":
        check(top)
        if hi is None:
            return None
    while hi is None or hi - lo > width:
        upper = top if hi is None else hi
        before = upper - lo
        if search == "bisect":
            check((lo + upper) / 2)
            continue
        # Secant on the last two checks (log ε is smooth and near linear in log σ, slope -1 to -2);
        # a single check assumes slope -1.5. Then a check just either side of the estimate: when
        # the estimate is within half the tolerance, the two close the bracket.
        (x1, f1), (x2, f2) = points[-2] if len(points) > 1 else (lo - 1.0, f_lo + 1.5), points[-1]
        slope = (f2 - f1) / (x2 - x1) if x2 != x1 and math.isfinite(f1 - f2) else -1.5
        root = x2 - f2 / slope if slope < 0 else (lo + upper) / 2
        root = min(max(root, lo + width / 2), upper - width / 2)
        for x in (root + 0.45 * width, root - 0.45 * width):
            if lo < x < (top if hi is None else hi):
                check(x)
        if hi is None and lo >= top - width:  # even the largest allowed σ might not fit
            check(top)
            if hi is None:
                return None
        upper = top if hi is None else hi
        if upper - lo > max(before / 2, width) and hi is not None:  # a poor step: bisect once
            check((lo + upper) / 2)
    if hi is None:  # pragma: no cover - the loop only ends with a fitting σ
        return None
    return math.exp(hi)


def default_delta(num_subjects: int) -> float:
    """δ = min(1e-5, 1/(10 N)): well below 1/N, so no single subject's record can simply leak."""
    if num_subjects < 1:
        raise ValueError(f"num_subjects must be >= 1, got {num_subjects}")
    return min(1e-5, 1.0 / (10.0 * num_subjects))
