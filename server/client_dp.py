"""Optional client-level DP at the server: Flower's fixed-clipping wrapper, fedmri's own account.

Mechanism (DP-FedAvg, McMahan et al. 2018, §3, with Flower's
`DifferentialPrivacyServerSideFixedClipping`): each accepted site update Δ_i = θ_i − θ is clipped
to L2 norm C, the clipped updates are averaged with equal weights, and N(0, (σ·C/n)²) noise is
added to the average, where n = `min-train-nodes`.

Accounting (done here, not by Flower): every available site takes part in every round (no
client sampling, q = 1), so each released aggregate is one Gaussian mechanism with noise
multiplier σ on the clipped sum, under zero-out adjacency of one site's update. A round whose
aggregate is released with m ≥ n updates adds noise σ·C/n ≥ σ·(C/m) on an average of sensitivity
C/m, so counting it at σ is conservative. Rounds with fewer than n valid updates release nothing
(the global model stays unchanged) and cost nothing. The account is the composition of the
released rounds, by the same pure functions (`common.privacy`) that account the sites' DP-SGD.

This guarantee protects a whole site's participation. It is reported separately from each site's
patient-level account and does not replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

from common.privacy import Segment, epsilon
from common.protocol import JSON
from common.run_config import RunConfig

WEIGHT_KEY = "client-dp-weight"  # equal aggregation weights: the average's sensitivity is C/n


@dataclass(frozen=True)
class ClientLevelAccount:
    """The server's client-level (ε, δ) after `releases` noisy aggregates."""

    noise_multiplier: float
    clipping_norm: float
    num_clients: int
    releases: int
    delta: float

    def segments(self) -> list[Segment]:
        return [Segment(1.0, self.noise_multiplier, self.releases)]

    def epsilon(self, accountant: str = "prv") -> float:
        return epsilon(self.segments(), self.delta, accountant)

    def to_json(self) -> dict[str, JSON]:
        return {
            "mechanism": "gaussian, server-side fixed clipping (flwr DifferentialPrivacyServerSideFixedClipping)",
            "adjacency": "zero-out one site's update",
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "num_clients": self.num_clients,
            "releases": self.releases,
            "segments": [{"sample_rate": 1.0, "noise_multiplier": self.noise_multiplier, "steps": self.releases}],
            "delta": self.delta,
            "accountant": "prv",
            "epsilon": self.epsilon("prv"),
            "epsilon_rdp": self.epsilon("rdp"),
        }


def start_account(run: RunConfig, releases: int = 0) -> ClientLevelAccount | None:
    if run.client_dp == "off":
        return None
    return ClientLevelAccount(
        run.client_dp_noise, run.client_dp_clip, run.min_train_nodes, releases, run.client_dp_delta
    )


def wrap(strategy: Strategy, run: RunConfig) -> Strategy:
    """Flower's server-side fixed-clipping DP wrapper around `strategy`, or `strategy` itself."""
    if run.client_dp == "off":
        return strategy
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, run.client_dp_noise, run.client_dp_clip, run.min_train_nodes
    )


def prepare(replies: list[Message], key_order: list[str]) -> None:
    """Ready accepted replies (in place) for Flower's wrapper.

    Each gets weight 1, so the aggregate is an unweighted mean. Its arrays are put in the global
    model's key order, since the wrapper pairs reply and global arrays by position.
    """
    for reply in replies:
        reply.content["metrics"][WEIGHT_KEY] = 1.0
        arrays = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord({key: arrays[key] for key in key_order})
