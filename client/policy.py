"""The site decides: turn the server's proposal into a round plan that fits the site's policy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from client.ledger import Ledger
from common.privacy import Segment, calibrate_noise, epsilon
from common.protocol import RoundProposal, Status
from sites.config import PrivacyPolicy


@dataclass(frozen=True)
class RoundPlan:
    """What the site will actually run: every number here is within the site's policy."""

    local_steps: int
    sample_rate: float  # q = expected batch / N_subjects
    expected_batch_size: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float


@dataclass(frozen=True)
class Decision:
    status: Status  # RESERVED (train: the spend is reserved first), DECLINED (budget spent) or REFUSED
    plan: RoundPlan | None
    notes: list[str] = field(default_factory=list)
    projected_epsilon: float = 0.0  # cumulative ε after this round, if trained


def decide(policy: PrivacyPolicy, ledger: Ledger, proposal: RoundProposal, run_id: int) -> Decision:
    """Clamp the proposal to the policy and calibrate σ so the run's remaining rounds fit the budget.

    σ is the smallest value ≥ policy.min_noise_multiplier with which this and every remaining
    planned round, at the same q and steps, keep the cumulative ε within policy.max_epsilon.
    """
    notes: list[str] = []
    n = ledger.num_subjects
    steps = proposal.local_steps
    if steps < 1:
        return Decision(Status.REFUSED, None, [f"local-steps {steps} < 1"])
    if steps > policy.max_local_steps:
        notes.append(f"local-steps clamped from {steps} to the policy's {policy.max_local_steps}")
        steps = policy.max_local_steps
    batch = proposal.batch_size
    if batch < 1:
        return Decision(Status.REFUSED, None, [f"batch-size {batch} < 1"])
    if batch < policy.min_expected_batch_size:
        notes.append(f"batch-size raised from {batch} to the policy's minimum {policy.min_expected_batch_size}")
        batch = policy.min_expected_batch_size
    if batch > n:
        notes.append(f"batch-size clamped from {batch} to the site's {n} subjects")
        batch = n
    q = batch / n

    clip = policy.max_grad_norm
    for name, value in (("max-grad-norm", proposal.max_grad_norm), ("noise-multiplier", proposal.noise_multiplier)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            return Decision(Status.REFUSED, None, [f"{name} {value} is not a finite number >= 0"])
    if proposal.max_grad_norm == 0.0:
        return Decision(Status.REFUSED, None, ["max-grad-norm 0 would clip every subject to nothing: refused"])
    if proposal.max_grad_norm is not None and proposal.max_grad_norm != clip:
        if policy.accept_server_overrides and proposal.max_grad_norm < clip:
            clip = proposal.max_grad_norm
            notes.append(f"server override: clipping norm lowered to {clip}")
        else:
            notes.append(f"server's max-grad-norm {proposal.max_grad_norm} ignored: the site's policy sets {clip}")
    floor = policy.min_noise_multiplier
    if proposal.noise_multiplier is not None:
        if proposal.noise_multiplier == 0.0 and policy.allow_non_private:
            notes.append("non-private training (σ = 0) allowed by the site's policy: ε = ∞")
            return Decision(
                Status.RESERVED, RoundPlan(steps, q, batch, proposal.learning_rate, 0.0, clip), notes, math.inf
            )
        if policy.accept_server_overrides and proposal.noise_multiplier > floor:
            floor = proposal.noise_multiplier
            notes.append(f"server override: σ raised to at least {floor}")
        elif proposal.noise_multiplier < policy.min_noise_multiplier:
            notes.append(
                f"server's noise-multiplier {proposal.noise_multiplier} ignored: below the site's minimum {policy.min_noise_multiplier}"
            )

    budget = policy.max_epsilon
    history = ledger.segments()
    remaining_rounds = max(1, proposal.num_rounds - ledger.rounds_trained(run_id))
    previous = [
        e.segment for e in ledger.entries if e.run_id == run_id and e.segment is not None and e.segment.sample_rate == q
    ]
    hint = previous[-1].noise_multiplier if previous else None
    sigma = calibrate_noise(
        history, q, steps * remaining_rounds, ledger.delta, budget, floor, accountant=policy.accountant, hint=hint
    )
    if sigma is None:
        spent = ledger.epsilon
        return Decision(Status.DECLINED, None, [*notes, f"privacy budget spent: ε = {spent:.3f} of {budget:g}"])
    projected = epsilon([*history, Segment(q, sigma, steps)], ledger.delta, policy.accountant)
    if projected > budget:  # pragma: no cover - calibrate_noise guarantees this; kept as a hard stop
        return Decision(Status.DECLINED, None, [*notes, f"round would reach ε = {projected:.3f} > {budget:g}"])
    return Decision(Status.RESERVED, RoundPlan(steps, q, batch, proposal.learning_rate, sigma, clip), notes, projected)
