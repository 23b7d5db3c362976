"""The ClientApp as Flower calls it: what leaves the site, the ledger, restarts and budget refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import round as site_round
from client.app import train
from common.finetune import FinetuneMode, configure, trainable_tensors
from common.model import load_ldm
from common.protocol import METRIC_KEYS, PROTOCOL_VERSION
from common.run_config import RunConfig
from common.signed_entries import tensor_digest


@pytest.fixture(autouse=True)
def flower_task_identity() -> None:
    """Flower's runtime sets the task identity before a ClientApp runs; so does this test."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1


def site_yaml(tiny_sites: Path, tmp_path: Path, **privacy: object) -> Path:
    """tiny-b's YAML with its own ledger folder under tmp_path."""
    raw = yaml.safe_load((tiny_sites / "tiny-b.yaml").read_text())
    raw["data"]["bids_root"] = str(tiny_sites / "tiny-b")
    raw["data"]["cache_dir"] = str(tiny_sites / ".fedmri-cache" / "tiny-b")
    raw["home"] = str(tmp_path / "home")  # its own ledger, key and marker
    raw["privacy"] = {**raw.get("privacy", {}), "ledger_dir": str(tmp_path / "ledger"), "accountant": "rdp", **privacy}
    path = tmp_path / "tiny-b.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_message(base: Path, server_round: int = 1, **overrides: object) -> Message:
    ldm = load_ldm(base)
    configure(ldm.denoiser, FinetuneMode.attention, 2)
    config = {
        "server-round": server_round, "num-rounds": 2, "local-steps": 2, "batch-size": 2, "learning-rate": 1e-3,
        "base-model": str(base), "finetune-mode": "attention", "lora-rank": 2, "slices-per-subject": 2,
        "noise-draws": 2, "ledger-heads": "{}", "protocol-version": PROTOCOL_VERSION, **overrides,
    }  # fmt: skip
    content = RecordDict({"arrays": ArrayRecord(trainable_tensors(ldm.denoiser)), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def context(path: Path) -> Context:
    return Context(
        run_id=7,
        node_id=1,
        node_config={"site-config": str(path)},
        state=RecordDict(),
        run_config=RunConfig().to_flower(),
    )


def test_reply_carries_only_trainable_tensors_and_whitelisted_scalars(
    tiny_sites: Path, tiny_base: Path, tmp_path: Path
) -> None:
    msg = train_message(tiny_base)
    reply = train(msg, context(site_yaml(tiny_sites, tmp_path)))
    content = reply.content
    # Exactly three records: the tensors, the scalar metrics, and the status.
    assert set(content.array_records) == {"arrays"} and set(content.metric_records) == {"metrics"}
    assert set(content.config_records) == {"reply"}
    sent = content["arrays"].to_torch_state_dict()
    assert set(sent) == set(msg.content["arrays"].to_torch_state_dict())  # only the trainable tensors
    assert not any(t.shape[-2:] == (64, 64) for t in sent.values())  # nothing image-shaped
    assert set(content["metrics"]) <= set(METRIC_KEYS) and "loss" not in content["metrics"]
    assert all(isinstance(v, float) for v in content["metrics"].values())  # scalars, no per-subject lists
    assert set(content["reply"]) == {"protocol-version", "site-id", "status", "notes", "accountant", "entries"}
    assert content["reply"]["status"] == "trained" and content["reply"]["accountant"] == "rdp"
    # The signed ledger entry for this round: the digests of what the site received and what it sent.
    (entry,) = json.loads(content["reply"]["entries"])
    assert entry["status"] == "trained" and entry["server_round"] == 1 and entry["signature"]
    assert entry["global_digest"] == tensor_digest(msg.content["arrays"].to_torch_state_dict())
    assert entry["update_digest"] == tensor_digest(sent)
    assert entry == json.loads((tmp_path / "ledger" / "tiny-b.json").read_text())["entries"][-1]


def test_ledger_is_written_and_continues_after_a_restart(tiny_sites: Path, tiny_base: Path, tmp_path: Path) -> None:
    path = site_yaml(tiny_sites, tmp_path)
    first = train(train_message(tiny_base, 1), context(path)).content["metrics"]["epsilon"]
    site_round.site_data.cache_clear()  # a restarted client process
    second = train(train_message(tiny_base, 2), context(path)).content["metrics"]["epsilon"]
    ledger = json.loads((tmp_path / "ledger" / "tiny-b.json").read_text())
    assert [e["server_round"] for e in ledger["entries"]] == [1, 2]
    assert 0 < first < second == pytest.approx(ledger["entries"][-1]["epsilon"])


def test_spent_budget_declines_and_sends_no_tensors(tiny_sites: Path, tiny_base: Path, tmp_path: Path) -> None:
    path = site_yaml(tiny_sites, tmp_path, max_epsilon=0.05, min_noise_multiplier=0.5)
    reply = train(train_message(tiny_base), context(path))
    assert reply.content["reply"]["status"] == "declined"
    assert "privacy budget spent" in reply.content["reply"]["notes"][-1]
    assert not reply.content.array_records
    assert reply.content["metrics"]["trained"] == 0.0


def test_a_hostile_server_config_is_clamped_and_the_ledger_shows_it(
    tiny_sites: Path, tiny_base: Path, tmp_path: Path
) -> None:
    path = site_yaml(tiny_sites, tmp_path, max_local_steps=3, min_noise_multiplier=0.7, max_grad_norm=1.0)
    hostile = train_message(tiny_base, 1, **{"local-steps": 10_000, "max-grad-norm": 50.0, "noise-multiplier": 0.01})
    reply = train(hostile, context(path))
    metrics, notes = reply.content["metrics"], " ".join(reply.content["reply"]["notes"])
    assert metrics["steps"] == 3 and metrics["max-grad-norm"] == 1.0 and metrics["noise-multiplier"] >= 0.7
    assert "local-steps clamped" in notes and "max-grad-norm 50.0 ignored" in notes
    assert "noise-multiplier 0.01 ignored" in notes
    entry = json.loads((tmp_path / "ledger" / "tiny-b.json").read_text())["entries"][-1]
    assert entry["segment"]["steps"] == 3 and entry["segment"]["noise_multiplier"] >= 0.7
    assert " ".join(entry["notes"]) == notes  # the site's own record says what it refused


def test_unknown_node_gets_a_clear_error(tiny_base: Path) -> None:
    ctx = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config=RunConfig().to_flower())
    with pytest.raises(ValueError, match="site-config"):
        train(train_message(tiny_base), ctx)


def test_the_seed_ranking_attack_finds_nothing(
    tiny_sites: Path, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server knows the tensors it sent and gets the update back. It guesses that the site seeded
    torch's generator from os.urandom and regenerates Opacus's noise for each candidate seed. Every
    os.urandom draw the site made, read as a 32- or 64-bit seed either way round, is among the
    candidates, with 400 random ones. No candidate may correlate with the update above chance."""
    drawn: list[bytes] = []
    real_urandom = os.urandom

    def recording(n: int) -> bytes:
        drawn.append(real_urandom(n))
        return drawn[-1]

    path = site_yaml(tiny_sites, tmp_path, min_noise_multiplier=50.0, max_epsilon=100.0)  # noise dominates
    msg = train_message(tiny_base, 1, **{"local-steps": 1})
    initial = msg.content["arrays"].to_torch_state_dict()
    monkeypatch.setattr(os, "urandom", recording)
    reply = train(msg, context(path))
    monkeypatch.setattr(os, "urandom", real_urandom)
    assert reply.content["reply"]["status"] == "trained" and drawn, "the site drew nothing from os.urandom"
    after = reply.content["arrays"].to_torch_state_dict()
    observed = torch.cat([(after[k] - initial[k]).flatten() for k in initial])

    candidates = {int.from_bytes(b[:width], order) for b in drawn for width in (4, 8) for order in ("little", "big")}
    candidates |= set(np.random.default_rng(0).integers(0, 2**32, 400).tolist())
    scores = []
    for seed in sorted(candidates):
        generator = torch.Generator().manual_seed(seed & (2**63 - 1))
        guess = torch.cat([torch.normal(0.0, 1.0, t.shape, generator=generator).flatten() for t in initial.values()])
        scores.append(abs(torch.corrcoef(torch.stack([observed, guess]))[0, 1].item()))
    chance = 5.0 / observed.numel() ** 0.5  # 5 standard errors of a correlation between independent vectors
    assert max(scores) < chance, f"a candidate seed explains the update (|r| = {max(scores):.3f})"


def test_a_guarded_node_never_takes_its_yaml_from_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.app import site_yaml as yaml_of
    from client.trusted_code import GUARDED_NODE

    run = RunConfig(sites="/server/chosen/lenient-policy.yaml")
    ctx = Context(run_id=7, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    assert yaml_of(ctx, run) == "/server/chosen/lenient-policy.yaml"  # simulation: the partition's YAML
    monkeypatch.setenv(GUARDED_NODE, "1")  # what `fedmri node start`'s ClientApp process sets
    with pytest.raises(ValueError, match="no site-config in its node config"):
        yaml_of(ctx, run)


def test_a_deployed_node_refuses_a_device_chosen_by_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.app import device_override
    from client.trusted_code import GUARDED_NODE

    run = RunConfig(device="cpu")
    assert device_override(run) == "cpu"  # simulation: the run config may choose
    monkeypatch.setenv(GUARDED_NODE, "1")
    with pytest.raises(ValueError, match="site YAML's `device:`"):
        device_override(run)
    assert device_override(RunConfig()) == ""  # unset: the YAML decides
