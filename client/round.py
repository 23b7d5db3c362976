"""One round at a site: decide under the policy, train with DP, record the ledger, then release."""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from client.ledger import Ledger, LedgerBusy, LedgerEntry, now
from client.policy import decide
from client.trainer import RoundRandomness, TrainSettings, train_round
from common.device import resolve_device
from common.finetune import FinetuneMode, configure, load_trainable, trainable_tensors
from common.mask_branch import add_mask_branch, has_mask_branch
from common.model import LDM, load_ldm
from common.privacy import Segment, default_delta, epsilon
from common.protocol import Accountant, RoundProposal, SiteReply, Status
from common.signed_entries import tensor_digest
from common.weights import base_model_dir
from sites.bids import SiteSlices, read_site_data, split_subjects
from sites.config import SiteConfig, load_site

log = logging.getLogger("fedmri.client")


@dataclass(frozen=True)
class RoundResult:
    """What leaves the site: the reply (whitelisted scalars, status, signed entries) and the
    trainable tensors, only when it trained."""

    reply: SiteReply
    tensors: dict[str, torch.Tensor] | None


@functools.lru_cache(maxsize=4)
def site_data(yaml_path: str) -> tuple[SiteConfig, SiteSlices, SiteSlices]:
    """The site's config, training slices and held-out slices (split by subject; never trained on).

    Read once per process (and cached on disk by the reader).
    """
    site = load_site(yaml_path)
    slices = read_site_data(site)
    for file, reason in slices.skipped:  # lenient mode: what this site trains without, by name
        log.warning("%s: skipped %s: %s", site.site_id, file, reason)
    training, heldout = split_subjects(slices, site.site_id, site.data.holdout_fraction)
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
    mask_branch: bool = False,
) -> LDM:
    """The base model on `device` in fine-tuning mode `mode`, with the lesion-mask branch if asked
    (common/mask_branch.py), carrying the global trainable tensors."""
    ldm = load_ldm(base_model_dir() if base_model == "shipped" else Path(base_model)).to(device)
    if mask_branch and not has_mask_branch(ldm.denoiser.unet):
        add_mask_branch(ldm.denoiser.unet)
    configure(ldm.denoiser, mode, lora_rank)
    load_trainable(ldm.denoiser, global_tensors)
    return ldm


def run_site_round(
    yaml_path: str,
    run_id: int,
    proposal: RoundProposal,
    global_tensors: dict[str, torch.Tensor],
    randomness: RoundRandomness | None = None,
    device: str = "",
) -> RoundResult:
    """Decide, reserve, train and record under the ledger's lock; only then return what may leave the site.

    A second round at this site waits up to privacy.round_wait_s for the lock, then declines.
    `proposal.ledger_heads` maps a site to the hash of its last ledger entry that the server holds:
    the reply carries every signed entry after it (only this round's if the server holds none, or
    names an entry this ledger does not have). `device` (simulation's run config) overrides the
    YAML's `device:` when not empty.
    """
    site, slices, _ = site_data(yaml_path)  # held-out subjects never reach the trainer
    n = len(slices.subjects)
    path, _ = ledger_terms(site, n)
    accountant = Accountant(site.privacy.accountant)
    try:
        with Ledger.locked(path, site.privacy.round_wait_s):
            result, ledger = _round_under_lock(site, slices, run_id, proposal, global_tensors,
                                               randomness or RoundRandomness(), site_device(site, yaml_path, device))  # fmt: skip
            head = proposal.ledger_heads.get(site.site_id, "")
            entries = tuple(ledger.since(head, otherwise=len(ledger.entries) - 1))
            return replace(result, reply=replace(result.reply, entries=entries))
    except LedgerBusy as busy:
        metrics = {"num-subjects": float(n), "trained": 0.0}
        return RoundResult(SiteReply(site.site_id, Status.DECLINED, metrics, (str(busy),), accountant), None)


def _round_under_lock(
    site: SiteConfig,
    slices: SiteSlices,
    run_id: int,
    proposal: RoundProposal,
    global_tensors: dict[str, torch.Tensor],
    randomness: RoundRandomness,
    device: torch.device,
) -> tuple[RoundResult, Ledger]:
    n = len(slices.subjects)
    ledger = open_ledger(site, n)
    accountant = Accountant(site.privacy.accountant)
    received = tensor_digest(global_tensors)
    decision = decide(site.privacy, ledger, proposal, run_id)
    notes = tuple(decision.notes)
    if decision.status != Status.RESERVED or decision.plan is None:
        ledger.append(LedgerEntry(run_id, proposal.server_round, decision.status, None, ledger.epsilon,
                                  ledger.epsilon_rdp, decision.notes, now(), n, received))  # fmt: skip
        metrics = {
            "num-subjects": float(n),
            "epsilon": ledger.epsilon,
            "epsilon-rdp": ledger.epsilon_rdp,
            "delta": ledger.delta,
            "trained": 0.0,
        }
        return RoundResult(SiteReply(site.site_id, decision.status, metrics, notes, accountant), None), ledger

    plan = decision.plan
    segment = Segment(plan.sample_rate, plan.noise_multiplier, plan.local_steps)
    history = [*ledger.segments(), segment]
    eps = decision.projected_epsilon  # decide() composed exactly this history with the site's accountant
    eps_rdp = eps if site.privacy.accountant == "rdp" else epsilon(history, ledger.delta, "rdp")
    # Reserved on disk before training starts: a crash from here on over-counts, never under-counts.
    ledger.append(LedgerEntry(run_id, proposal.server_round, Status.RESERVED, segment, eps, eps_rdp, decision.notes,
                              now(), n, received))  # fmt: skip
    ldm = load_model(proposal.base_model, proposal.finetune_mode, proposal.lora_rank, global_tensors, device,
                     proposal.mask_branch)  # fmt: skip
    settings = TrainSettings(
        proximal_mu=proposal.proximal_mu,
        slices_per_subject=proposal.slices_per_subject,
        noise_draws=proposal.noise_draws,
    )
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
    return RoundResult(SiteReply(site.site_id, Status.TRAINED, metrics, notes, accountant), tensors), ledger
