"""Update screening: every kind of bad update is named; good ones pass."""

from __future__ import annotations

import pytest
import torch

from server.validation import update_problem

GLOBAL = {"a.weight": torch.zeros(4, 3), "b.bias": torch.zeros(3)}


def test_good_update_passes() -> None:
    assert update_problem({k: v + 0.1 for k, v in GLOBAL.items()}, GLOBAL, max_update_norm=10.0) is None


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        ({"a.weight": torch.full((4, 3), float("nan")), "b.bias": torch.zeros(3)}, "a.weight: NaN or Inf"),
        ({"a.weight": torch.zeros(3, 4), "b.bias": torch.zeros(3)}, r"a.weight: shape \(3, 4\), expected \(4, 3\)"),
        (
            {"a.weight": torch.zeros(4, 3, dtype=torch.float64), "b.bias": torch.zeros(3)},
            "a.weight: dtype torch.float64",
        ),
        ({"a.weight": torch.full((4, 3), 1e4), "b.bias": torch.zeros(3)}, "update norm .* exceeds the bound 10"),
        ({"a.weight": torch.zeros(4, 3)}, r"keys differ .*missing \['b.bias'\]"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(update: dict, reason: str) -> None:
    problem = update_problem(update, GLOBAL, max_update_norm=10.0)
    assert problem is not None
    assert __import__("re").search(reason, problem), problem


def _reply_message(config: dict, metrics: dict, tensors: dict[str, torch.Tensor] | None) -> object:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1  # as Flower's runtime sets it
    content = RecordDict({"reply": ConfigRecord(config), "metrics": MetricRecord(metrics)})
    if tensors is not None:
        content["arrays"] = ArrayRecord(tensors)
    asked = Message(content=RecordDict(), dst_node_id=5, message_type=MessageType.TRAIN)
    return Message(content=content, reply_to=asked)


def test_screening_reads_each_reply_through_the_protocol() -> None:
    """A well-formed update is accepted; a reply off the protocol becomes an error, a trained reply
    without tensors or over the norm bound is rejected, and none of them is aggregated."""
    from common.protocol import Accountant, SiteReply, Status
    from server.federation import screen

    reference = {"w": torch.zeros(3)}
    good = SiteReply("a", Status.TRAINED, {"num-subjects": 10.0, "trained": 1.0}, (), Accountant.prv)
    config, metrics = good.to_record()
    messages = [
        _reply_message(config, metrics, {"w": torch.ones(3)}),
        _reply_message({**config, "site-id": "b", "status": "super-trained"}, metrics, {"w": torch.ones(3)}),
        _reply_message({**config, "site-id": "c"}, {**metrics, "loss": 0.2}, {"w": torch.ones(3)}),
        _reply_message({**config, "site-id": "d"}, metrics, None),
        _reply_message({**config, "site-id": "e"}, metrics, {"w": torch.full((3,), 1e6)}),
    ]
    accepted, outcomes = screen(messages, reference, max_update_norm=10.0)
    assert [str(m.content["reply"]["site-id"]) for m in accepted] == ["a"]
    statuses = [(o.site_id, o.status) for o in outcomes]
    assert statuses[0] == ("a", Status.TRAINED)
    assert [s for _, s in statuses[1:]] == [Status.ERROR, Status.ERROR, Status.REJECTED, Status.REJECTED]
    assert "malformed reply" in outcomes[1].notes[0] and "whitelist" in outcomes[2].notes[0]
    assert "sent no tensors" in outcomes[3].notes[-1]
