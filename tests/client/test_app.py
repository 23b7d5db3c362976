"""The ClientApp as Flower calls it: what leaves the site, the ledger, restarts and budget refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client import round as site_round
from client.app import train
from common.finetune import FinetuneMode, configure, trainable_tensors
from common.model import load_ldm
from common.run_config import RunConfig


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
    raw["privacy"] = {**raw.get("privacy", {}), "ledger_dir": str(tmp_path / "ledger"), "accountant": "rdp", **privacy}
    path = tmp_path / "tiny-b.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def train_message(base: Path, server_round: int = 1, **overrides: object) -> Message:
    ldm = load_ldm(base)
    configure(ldm.denoiser, FinetuneMode.attention, 2)
    config = {
        "server-round": server_round, "num-rounds": 2, "local-steps": 2, "batch-size": 2, "learning-rate": 1e-3,
        "base-model": str(base), "finetune-mode": "attention", "lora-rank": 2, **overrides,
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
    assert set(content["metrics"]) <= set(site_round.METRIC_KEYS)
    assert all(isinstance(v, float) for v in content["metrics"].values())  # scalars, no per-subject lists
    assert set(content["reply"]) == {"site-id", "status", "notes", "accountant"}
    assert content["reply"]["status"] == "trained" and content["reply"]["accountant"] == "rdp"


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
