"""One round at a site: decide under the policy, train with DP, record the ledger, then release."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from client.ledger import Ledger, LedgerBusy, LedgerEntry, now
from client.policy import Proposal, decide
from client.trainer import RoundRandomness, TrainSettings, train_round
from common.device import resolve_device
from common.finetune import FinetuneMode, configure, load_trainable, trainable_tensors
from common.model import LDM, load_ldm
from common.privacy import Segment, default_delta, epsilon
from common.signed_entries import tensor_digest
from common.weights import base_model_dir
from sites.bids import SiteSlices, read_site_data, split_subjects
from sites.config import SiteConfig, load_site

# The only metric keys a site ever sends: scalars about the round, nothing per subject.
# The privacy parameters (q, σ, C, δ) and N are public terms of the site's account: the release
# lists them. The training loss is not among them: it is a raw statistic of the sampled subjects.
METRIC_KEYS = (
    "steps", "num-subjects", "epsilon", "epsilon-rdp", "noise-multiplier", "sample-rate", "max-grad-norm",
    "delta", "trained",
)  # fmt: skip


@dataclass(frozen=True)
class SiteReply:
    """What leaves the site: trainable tensors (only when trained), whitelisted scalars, a status."""

    site_id: str
    status: str
    tensors: dict[str, torch.Tensor] | None
    metrics: dict[str, float]
    notes: list[str] = field(default_factory=list)
    accountant: str = "prv"  # the site's accountant for `epsilon`
    # The site's signed ledger entries after the server's last known one (`ledger_head`): the
    # release carries them, and `fedmri verify --keys` checks them. Public terms only.
    entries: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        unexpected = set(self.metrics) - set(METRIC_KEYS)
        if unexpected:
            raise ValueError(f"metrics {sorted(unexpected)} are not on the whitelist {METRIC_KEYS}")


@functools.lru_cache(maxsize=4)
def site_data(yaml_path: str) -> tuple[SiteConfig, SiteSlices, SiteSlices]:
    """The site's config, training slices and held-out slices (split by subject; never trained on).

    Read once per process (and cached on disk by the reader).
    """
    site = load_site(yaml_path)
    training, heldout = split_subjects(read_site_data(site), site.site_id, site.data.holdout_fraction)
    return site, training, heldout


def site_device(site: SiteConfig, yaml_path: str, override: str = "") -> torch.device:
    """The device the site trains and evaluates on: `override` (simulation) or the YAML's `device:`."""
    if override:
        return resolve_device(override, "run config 'device'")
    return resolve_device(site.device, f"{yaml_path}: device")


def ledger_terms(site: SiteConfig, num_subjects: int) -> tuple[Path, float]:
    """Where the site's ledger is and the δ it composes at."""
    policy = site.privacy
    delta = policy.delta if policy.delta is not None else default_delta(num_subjects)
    if delta >= 1.0 / num_subjects:
        raise ValueError(
            f"site {site.site_id}: privacy.delta {delta} >= 1/N = {1 / num_subjects:.2g} gives no meaningful guarantee"
        )
    return site.ledger_path, delta


def open_ledger(site: SiteConfig, num_subjects: int) -> Ledger:
    """The site's ledger; hold `Ledger.locked` around anything that decides on it or writes it."""
    path, delta = ledger_terms(site, num_subjects)
    policy = site.privacy
    return Ledger.open(path, site.site_id, num_subjects, delta, policy.max_grad_norm, policy.accountant, site.home_dir)


def load_model(
    base_model: str,
    mode: FinetuneMode,
    lora_rank: int,
    global_tensors: dict[str, torch.Tensor],
    device: torch.device = torch.device("cpu"),
) -> LDM:
    """The base model on `device` in fine-tuning mode `mode`, carrying the global trainable tensors."""
    ldm = load_ldm(base_model_dir() if base_model == "shipped" else Path(base_model)).to(device)
    configure(ldm.denoiser, mode, lora_rank)
    load_trainable(ldm.denoiser, global_tensors)
    return ldm


def run_site_round(
    yaml_path: str,
    run_id: int,
    proposal: Proposal,
    global_tensors: dict[str, torch.Tensor],
    base_model: str,
    mode: FinetuneMode,
    lora_rank: int,
    settings: TrainSettings,
    randomness: RoundRandomness | None = None,
    ledger_heads: dict[str, str] | None = None,
    device: str = "",
) -> SiteReply:
    """Decide, reserve, train and record under the ledger's lock; only then return what may leave the site.

    A second round at this site waits up to privacy.round_wait_s for the lock, then declines.
    `ledger_heads` maps a site to the hash of its last ledger entry that the server holds: the
    reply carries every signed entry after it (only this round's if the server holds none, or
    names an entry this ledger does not have). `device` (simulation's run config) overrides the
    YAML's `device:` when not empty.
    """
    site, slices, _ = site_data(yaml_path)  # held-out subjects never reach the trainer
    n = len(slices.subjects)
    path, _ = ledger_terms(site, n)
    try:
        with Ledger.locked(path, site.privacy.round_wait_s):
            reply, ledger = _round_under_lock(site, slices, run_id, proposal, global_tensors, base_model, mode,
                                              lora_rank, settings, randomness or RoundRandomness(),
                                              site_device(site, yaml_path, device))  # fmt: skip
            head = (ledger_heads or {}).get(site.site_id, "")
            return replace(reply, entries=ledger.since(head, otherwise=len(ledger.entries) - 1))
    except LedgerBusy as busy:
        metrics = {"num-subjects": float(n), "trained": 0.0}
        return SiteReply(site.site_id, "declined", None, metrics, [str(busy)], site.privacy.accountant)


def _round_under_lock(
    site: SiteConfig,
    slices: SiteSlices,
    run_id: int,
    proposal: Proposal,
    global_tensors: dict[str, torch.Tensor],
    base_model: str,
    mode: FinetuneMode,
    lora_rank: int,
    settings: TrainSettings,
    randomness: RoundRandomness,
    device: torch.device,
) -> tuple[SiteReply, Ledger]:
    n = len(slices.subjects)
    ledger = open_ledger(site, n)
    received = tensor_digest(global_tensors)
    decision = decide(site.privacy, ledger, proposal, run_id)
    if decision.status != "train" or decision.plan is None:
        ledger.append(LedgerEntry(run_id, proposal.server_round, decision.status, None, ledger.epsilon,
                                  ledger.epsilon_rdp, decision.notes, now(), n, received))  # fmt: skip
        metrics = {
            "num-subjects": float(n),
            "epsilon": ledger.epsilon,
            "epsilon-rdp": ledger.epsilon_rdp,
            "delta": ledger.delta,
            "trained": 0.0,
        }
        return SiteReply(site.site_id, decision.status, None, metrics, decision.notes, site.privacy.accountant), ledger

    plan = decision.plan
    segment = Segment(plan.sample_rate, plan.noise_multiplier, plan.local_steps)
    history = [*ledger.segments(), segment]
    eps = epsilon(history, ledger.delta, site.privacy.accountant)
    eps_rdp = eps if site.privacy.accountant == "rdp" else epsilon(history, ledger.delta, "rdp")
    # Reserved on disk before training starts: a crash from here on over-counts, never under-counts.
    ledger.append(LedgerEntry(run_id, proposal.server_round, "reserved", segment, eps, eps_rdp, decision.notes,
                              now(), n, received))  # fmt: skip
    ldm = load_model(base_model, mode, lora_rank, global_tensors, device)
    train_round(ldm, slices, plan, settings, randomness)
    tensors = trainable_tensors(ldm.denoiser)
    ledger.settle(tensor_digest(tensors))
    metrics = {
        "steps": float(plan.local_steps),
        "num-subjects": float(n),
        "epsilon": eps if math.isfinite(eps) else float("inf"),
        "epsilon-rdp": eps_rdp,
        "noise-multiplier": plan.noise_multiplier,
        "sample-rate": plan.sample_rate,
        "max-grad-norm": plan.max_grad_norm,
        "delta": ledger.delta,
        "trained": 1.0,
    }
    return SiteReply(site.site_id, "trained", tensors, metrics, decision.notes, site.privacy.accountant), ledger
