"""The server's round loop: propose, collect, screen, aggregate with a Flower strategy, checkpoint."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common import protocol
from common.atomic import atomic_write
from common.finetune import configure, parse_mode, trainable_tensors
from common.mask_branch import add_mask_branch, has_mask_branch
from common.model import LDM, load_ldm
from common.protocol import RoundProposal, RunRecord, SiteReply, Status
from common.release import UNRELEASED, merge_chain, parent_chains
from common.run_config import RunConfig
from common.weights import base_model_dir
from server import client_dp
from server.checkpoint import Checkpoint, CheckpointError, load_latest, save_checkpoint
from server.validation import update_problem

log = logging.getLogger("fedmri.server")


def make_strategy(run: RunConfig) -> Strategy:
    """Flower's own strategy, weighted by each site's number of subjects.

    With client-level DP on, updates are weighted equally (the noise is calibrated to an unweighted
    mean) and the strategy is wrapped in Flower's DP wrapper (server/client_dp.py).
    """
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": run.min_train_nodes,
        "min_available_nodes": run.min_train_nodes,
        "weighted_by_key": "num-subjects" if run.client_dp == "off" else client_dp.WEIGHT_KEY,
    }
    strategy: Strategy
    if run.strategy == "fedavg":
        strategy = FedAvg(**common)
    elif run.strategy == "fedprox":
        strategy = FedProx(proximal_mu=run.proximal_mu, **common)
    elif run.strategy == "fedadam":
        strategy = FedAdam(eta=run.server_learning_rate, **common)
    else:
        raise ValueError(f"unknown strategy {run.strategy!r}")
    return client_dp.wrap(strategy, run)


def base_dir(run: RunConfig) -> Path:
    return base_model_dir() if run.base_model == "shipped" else Path(run.base_model)


def base_ldm(run: RunConfig) -> LDM:
    """The base model in the run's fine-tuning mode (its trainable tensors start the federation)."""
    ldm = load_ldm(base_dir(run))
    if run.mask_branch and not has_mask_branch(ldm.denoiser.unet):
        add_mask_branch(ldm.denoiser.unet)
    configure(ldm.denoiser, parse_mode(run.finetune_mode), run.lora_rank)
    return ldm


def write_records(run_dir: Path, records: list[RunRecord]) -> None:
    """metrics.jsonl: the round records, one JSON line each (a readable copy of the checkpoint's)."""
    atomic_write(run_dir / "metrics.jsonl", protocol.write_records(records))


def _rejected(reply: SiteReply, reason: str) -> SiteReply:
    return replace(reply, status=Status.REJECTED, notes=(*reply.notes, reason))


def keep_chains(
    chains: dict[str, list[dict[str, Any]]], accepted: list[Message], outcomes: list[SiteReply]
) -> tuple[list[Message], list[SiteReply]]:
    """Extend each site's chain with the entries it sent; an update whose entries do not continue the
    chain the server holds is rejected (the release could not account for it)."""
    rejected, kept = set(), []
    for outcome in outcomes:
        if outcome.entries:
            try:
                entries = [dict(e) for e in outcome.entries]
                chains[outcome.site_id] = merge_chain(chains.get(outcome.site_id, []), entries)
            except ValueError as err:
                if outcome.status == Status.TRAINED:
                    rejected.add(outcome.site_id)
                    outcome = _rejected(outcome, str(err))
                else:
                    outcome = replace(outcome, notes=(*outcome.notes, str(err)))
        kept.append(outcome)
    return [m for m in accepted if str(m.content["reply"]["site-id"]) not in rejected], kept


def screen(
    replies: Iterable[Message], reference: dict[str, torch.Tensor], max_update_norm: float
) -> tuple[list[Message], list[SiteReply]]:
    """Split replies into aggregatable ones and a reply per site (with the reason when left out)."""
    accepted, outcomes = [], []
    for msg in replies:
        node = f"node-{msg.metadata.src_node_id}"
        if msg.has_error():
            outcomes.append(SiteReply(node, Status.ERROR, {}, (msg.error.reason,)))
            continue
        try:
            outcome = SiteReply.from_record(msg.content["reply"], msg.content["metrics"])
        except (KeyError, ValueError) as err:
            outcomes.append(SiteReply(node, Status.ERROR, {}, (f"malformed reply: {err}",)))
            continue
        if outcome.status == Status.TRAINED:
            if "arrays" not in msg.content:
                outcome = _rejected(outcome, "reported trained but sent no tensors")
            else:
                problem = update_problem(msg.content["arrays"].to_torch_state_dict(), reference, max_update_norm)
                if problem is None:
                    accepted.append(msg)
                else:
                    outcome = _rejected(outcome, problem)
        outcomes.append(outcome)
    return accepted, outcomes


def _strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    strategy = getattr(strategy, "strategy", strategy)  # the strategy inside a DP wrapper
    state = {}
    for name in ("m_t", "v_t"):
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}/{key}"] = torch.from_numpy(np.asarray(value))
    return state


def _restore_strategy(strategy: Strategy, state: dict[str, torch.Tensor]) -> None:
    strategy = getattr(strategy, "strategy", strategy)
    for name in ("m_t", "v_t"):
        values = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(f"{name}/")}
        if values:
            setattr(strategy, name, values)


def run_federation(grid: Grid, run: RunConfig) -> dict[str, torch.Tensor]:
    """Run (or resume) the federation; returns the final global trainable tensors."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not run.resume and (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run (metrics.jsonl); continue it with --resume or choose a new run directory"
        )
    strategy = make_strategy(run)
    ldm = base_ldm(run)
    global_tensors = trainable_tensors(ldm.denoiser)
    site_epsilon: dict[str, float] = {}
    releases = 0  # noisy aggregates released under client-level DP
    first_round = 1
    # Each site's signed ledger chain, from the parent release's (if the base model is one) on.
    chains = parent_chains(base_dir(run))
    records: list[RunRecord] = []
    if run.resume:
        checkpoint = load_latest(run_dir)
        if checkpoint is None:
            log.warning("--resume: no valid checkpoint in %s; starting at round 1", run_dir)
        else:
            if set(checkpoint.tensors) != set(global_tensors):
                raise CheckpointError(
                    f"--resume: the checkpoint of round {checkpoint.server_round} in {run_dir} holds other tensors "
                    f"than finetune-mode {run.finetune_mode!r} trains; resume with the run's original settings"
                )
            # Keep the model's own key order (a checkpoint file stores keys sorted).
            global_tensors = {key: checkpoint.tensors[key] for key in global_tensors}
            site_epsilon = dict(checkpoint.info.get("site_epsilon", {}))
            if "chains" not in checkpoint.info or "records" not in checkpoint.info:
                raise CheckpointError(f"--resume: {run_dir} was checkpointed by an older fedmri; start a new run")
            chains = checkpoint.info["chains"]
            records = [RunRecord.from_json(r) for r in checkpoint.info["records"]]
            # The round records are part of the checkpoint; metrics.jsonl is rewritten from them, so
            # a crash between the two files never loses (or duplicates) a round.
            write_records(run_dir, records)
            _restore_strategy(strategy, checkpoint.strategy_state)
            releases = int((checkpoint.info.get("client_level") or {}).get("releases", 0))
            first_round = checkpoint.server_round + 1
            log.info("resuming after round %d from %s", checkpoint.server_round, run_dir)

    for server_round in range(first_round, run.num_server_rounds + 1):
        start = time.time()
        proposal = RoundProposal(
            server_round=server_round,
            num_rounds=run.num_server_rounds,
            local_steps=run.local_steps,
            batch_size=run.batch_size,
            learning_rate=run.learning_rate,
            slices_per_subject=run.slices_per_subject,
            noise_draws=run.noise_draws,
            base_model=run.base_model,
            finetune_mode=run.finetune_mode,
            lora_rank=run.lora_rank,
            mask_branch=run.mask_branch,
            ledger_heads={site: chain[-1]["hash"] for site, chain in chains.items() if chain},
            # FedProx's configure_train adds proximal-mu itself; FedAvg and FedAdam add server-round.
        )
        config = ConfigRecord(proposal.to_record())
        messages = strategy.configure_train(server_round, ArrayRecord(global_tensors), config, grid)
        replies = grid.send_and_receive(messages, timeout=run.round_timeout)
        accepted, outcomes = screen(replies, global_tensors, run.max_update_norm)
        accepted, outcomes = keep_chains(chains, accepted, outcomes)
        if len(accepted) >= run.min_train_nodes:
            if run.client_dp != "off":
                client_dp.prepare(accepted, list(global_tensors))
            arrays, _ = strategy.aggregate_train(server_round, accepted)
            if arrays is not None:
                global_tensors = {k: v.to(global_tensors[k].dtype) for k, v in arrays.to_torch_state_dict().items()}
                releases += 1
        else:
            log.warning(
                "round %d: %d valid updates < min-train-nodes %d; global model unchanged",
                server_round,
                len(accepted),
                run.min_train_nodes,
            )
        for outcome in outcomes:
            if "epsilon" in outcome.metrics:
                site_epsilon[outcome.site_id] = outcome.metrics["epsilon"]
            if outcome.status != Status.TRAINED:
                log.warning(
                    "round %d: %s %s: %s", server_round, outcome.site_id, outcome.status, "; ".join(outcome.notes)
                )
        account = client_dp.start_account(run, releases)
        client_level = account.to_json() if account else None
        record = RunRecord(
            round=server_round,
            wall_s=round(time.time() - start, 2),
            accepted=len(accepted),
            sites={o.site_id: o for o in outcomes},
            client_level=client_level,
        )
        records.append(record)
        info = {
            "strategy": run.strategy,
            "site_epsilon": site_epsilon,
            "client_level": client_level,
            "run_config": run.to_flower(),
            "records": [r.to_json() for r in records],
            "chains": chains,
        }
        # One atomic write holds the round's tensors, its record and every signed entry.
        save_checkpoint(run_dir, Checkpoint(server_round, global_tensors, _strategy_state(strategy), info))
        write_records(run_dir, records)
        summary = ", ".join(
            f"{o.site_id} {o.status.value} σ {o.metrics.get('noise-multiplier', float('nan')):.2f} ε {o.metrics.get('epsilon', float('nan')):.2f}"
            for o in outcomes
        )
        if client_level:
            summary += f"; client-level ε {client_level['epsilon']:.2f} after {releases} releases"
        print(f"[fedmri] round {server_round}/{run.num_server_rounds} ({record.wall_s:.0f} s): {summary}", flush=True)
    return global_tensors


def save_final_model(run: RunConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """The base model carrying the federated tensors (LoRA merged), as a diffusers directory."""
    from common.finetune import load_trainable, merge_lora
    from common.model import save_ldm

    ldm = base_ldm(run)
    load_trainable(ldm.denoiser, tensors)
    merge_lora(ldm.denoiser)
    out = Path(run.run_dir) / "model"
    save_ldm(ldm, out)
    # Not a release: a run that starts from this folder is refused (its account would be lost).
    (out / UNRELEASED).write_text(f"fedmri run {Path(run.run_dir).resolve()}: release it with `fedmri release`\n")
    return out
