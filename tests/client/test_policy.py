"""The site decides: clamps, refusals and budget calibration against a hostile server."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from client.ledger import Ledger, LedgerEntry
from client.policy import decide
from common.privacy import Segment, epsilon
from common.protocol import FinetuneMode, RoundProposal, Status
from sites.config import PrivacyPolicy

POLICY = PrivacyPolicy(
    max_epsilon=4.0, max_grad_norm=1.0, min_noise_multiplier=0.8, accountant="rdp", max_local_steps=50
)
PROPOSAL = RoundProposal(
    server_round=1, num_rounds=3, local_steps=20, batch_size=10, learning_rate=1e-4, slices_per_subject=1,
    noise_draws=1, base_model="shipped", finetune_mode=FinetuneMode.attention, lora_rank=4,
)  # fmt: skip


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger.open(tmp_path / "a.json", "a", 100, 1e-5, 1.0, "rdp", tmp_path / "home")


def test_calibrated_round_fits_the_budget_for_all_planned_rounds(ledger: Ledger) -> None:
    decision = decide(POLICY, ledger, PROPOSAL, run_id=1)
    assert decision.status == Status.RESERVED and decision.plan is not None
    plan = decision.plan
    assert plan.sample_rate == 0.1 and plan.noise_multiplier >= POLICY.min_noise_multiplier
    three_rounds = [Segment(plan.sample_rate, plan.noise_multiplier, plan.local_steps * 3)]
    assert epsilon(three_rounds, ledger.delta, "rdp") <= POLICY.max_epsilon
    assert decision.projected_epsilon <= POLICY.max_epsilon


def test_server_cannot_raise_steps_batch_or_clipping_or_lower_noise(ledger: Ledger) -> None:
    hostile = dataclasses.replace(
        PROPOSAL, local_steps=10_000, batch_size=1_000, max_grad_norm=50.0, noise_multiplier=0.01
    )
    decision = decide(POLICY, ledger, hostile, run_id=1)
    assert decision.plan is not None
    assert decision.plan.local_steps == 50 and decision.plan.expected_batch_size == 100
    assert decision.plan.max_grad_norm == 1.0 and decision.plan.noise_multiplier >= 0.8
    joined = " ".join(decision.notes)
    assert "local-steps clamped" in joined and "batch-size clamped" in joined
    assert "max-grad-norm 50.0 ignored" in joined and "noise-multiplier 0.01 ignored" in joined


def test_non_private_training_needs_the_policy(ledger: Ledger) -> None:
    asks_for_zero = dataclasses.replace(PROPOSAL, noise_multiplier=0.0)
    decision = decide(POLICY, ledger, asks_for_zero, run_id=1)
    assert decision.plan is not None and decision.plan.noise_multiplier >= 0.8
    allowed = dataclasses.replace(POLICY, allow_non_private=True)
    decision = decide(allowed, ledger, asks_for_zero, run_id=1)
    assert decision.plan is not None and decision.plan.noise_multiplier == 0.0
    assert decision.projected_epsilon == math.inf


def test_spent_budget_declines(ledger: Ledger) -> None:
    ledger.append(
        LedgerEntry(1, 1, "trained", Segment(0.1, 0.8, 400), epsilon([Segment(0.1, 0.8, 400)], 1e-5, "rdp"), 0.0)
    )
    assert ledger.epsilon > POLICY.max_epsilon * 0.9
    decision = decide(POLICY, ledger, dataclasses.replace(PROPOSAL, server_round=2), run_id=1)
    assert decision.status == "declined" and decision.plan is None
    assert "privacy budget spent" in decision.notes[-1]


def test_a_server_that_understates_rounds_only_gets_the_budget_once(ledger: Ledger) -> None:
    liar = dataclasses.replace(PROPOSAL, num_rounds=1)  # "this is the last round", every round
    sigmas, statuses = [], []
    for server_round in range(1, 6):
        decision = decide(POLICY, ledger, dataclasses.replace(liar, server_round=server_round), run_id=1)
        statuses.append(decision.status)
        if decision.plan is not None:
            plan = decision.plan
            sigmas.append(plan.noise_multiplier)
            segment = Segment(plan.sample_rate, plan.noise_multiplier, plan.local_steps)
            ledger.append(LedgerEntry(1, server_round, "trained", segment, decision.projected_epsilon, 0.0))
    spent = epsilon(ledger.segments(), ledger.delta, "rdp")  # recomputed from what was recorded
    assert spent <= POLICY.max_epsilon
    assert epsilon(ledger.segments()[:1], ledger.delta, "rdp") > 0.95 * POLICY.max_epsilon  # the budget, once
    assert all(s > 3 * sigmas[0] for s in sigmas[1:])  # later rounds only get the crumbs: much more noise
    assert statuses[-1] == "declined"


def test_small_batches_are_raised_and_a_zero_or_negative_clip_is_refused(ledger: Ledger) -> None:
    decision = decide(POLICY, ledger, dataclasses.replace(PROPOSAL, batch_size=1), run_id=1)
    assert decision.plan is not None and decision.plan.expected_batch_size == POLICY.min_expected_batch_size == 8
    assert "raised from 1 to the policy's minimum 8" in " ".join(decision.notes)
    trusting = dataclasses.replace(POLICY, accept_server_overrides=True)
    for clip in (0.0, -1.0, float("nan")):
        refused = decide(trusting, ledger, dataclasses.replace(PROPOSAL, max_grad_norm=clip), run_id=1)
        assert refused.status == "refused" and refused.plan is None, clip
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        PrivacyPolicy(max_grad_norm=0.0)
