"""Client-level DP at the server: Flower's wrapper really clips and adds noise; fedmri's account."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy import epsilon
from common.run_config import RunConfig
from server import client_dp
from server.federation import make_strategy


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1


def reply(tensors: dict[str, torch.Tensor], num_subjects: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord(tensors), "metrics": MetricRecord({"num-subjects": num_subjects})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def aggregate(run: RunConfig, current: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]], sizes):
    strategy = make_strategy(run)
    strategy.current_arrays = ArrayRecord(current)  # what configure_train records before the round
    replies = [reply(u, n) for u, n in zip(updates, sizes, strict=True)]
    client_dp.prepare(replies, list(current))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()["w"]


def test_updates_are_clipped_and_averaged_with_equal_weights() -> None:
    run = RunConfig(client_dp="fixed", client_dp_noise=1e-9, client_dp_clip=1.0, min_train_nodes=2)
    current = {"w": torch.zeros(4)}
    big = {"w": torch.tensor([30.0, 40.0, 0.0, 0.0])}  # norm 50 -> clipped to norm 1
    small = {"w": torch.tensor([0.0, 0.0, 0.5, 0.0])}  # norm 0.5 -> unchanged
    result = aggregate(run, current, [big, small], sizes=[1000.0, 1.0])
    # Equal weights despite 1000 vs 1 subjects: the mean of [0.6, 0.8, 0, 0] and [0, 0, 0.5, 0].
    assert torch.allclose(result, torch.tensor([0.3, 0.4, 0.25, 0.0]), atol=1e-6)


def test_noise_has_std_sigma_c_over_n() -> None:
    sigma, clip, n, dim = 2.0, 0.5, 2, 20_000
    run = RunConfig(client_dp="fixed", client_dp_noise=sigma, client_dp_clip=clip, min_train_nodes=n)
    current = {"w": torch.zeros(dim)}
    tiny = torch.zeros(dim)
    tiny[0] = 1e-6  # Flower's clipping divides by the update norm, so the update must be non-zero
    result = aggregate(run, current, [{"w": tiny.clone()} for _ in range(n)], sizes=[1.0] * n)
    assert result.std().item() == pytest.approx(sigma * clip / n, rel=0.05)
    assert result.mean().abs().item() < 0.05 * sigma * clip / n


def test_off_leaves_the_weighted_strategy_unwrapped() -> None:
    strategy = make_strategy(RunConfig())
    assert type(strategy).__name__ == "FedAvg" and strategy.weighted_by_key == "num-subjects"
    assert client_dp.start_account(RunConfig()) is None


def test_fedadam_with_client_dp_is_refused() -> None:
    with pytest.raises(ValueError, match=r"client-dp.*fedavg or fedprox"):
        RunConfig(client_dp="fixed", strategy="fedadam")
    with pytest.raises(ValueError, match="client-dp-noise"):
        RunConfig(client_dp="fixed", client_dp_noise=0.0)


@settings(max_examples=8, deadline=None)
@given(
    sigma=st.floats(min_value=0.8, max_value=5.0),
    releases=st.integers(min_value=1, max_value=50),
)
def test_client_level_account_matches_an_independent_pld(sigma: float, releases: int) -> None:
    account = client_dp.ClientLevelAccount(sigma, 1.0, 3, releases, 1e-5)
    claimed = account.epsilon("prv")
    independent = epsilon(account.segments(), 1e-5, "pld")
    assert independent <= claimed * 1.0001 and claimed <= 1.05 * independent
    assert account.epsilon("rdp") >= claimed * 0.999
    assert account.to_json()["releases"] == releases


def test_no_release_costs_nothing() -> None:
    assert client_dp.ClientLevelAccount(1.0, 1.0, 2, 0, 1e-5).epsilon() == 0.0
    assert math.isfinite(client_dp.ClientLevelAccount(1.0, 1.0, 2, 3, 1e-5).epsilon())
