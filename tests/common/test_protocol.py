"""The typed records between server and site: they survive Flower's records unchanged, and a
reader refuses anything it was not built to read (missing, unknown, mistyped, another version)."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord, MetricRecord
from hypothesis import given
from hypothesis import strategies as st

from common.protocol import (
    METRIC_KEYS,
    PROTOCOL_VERSION,
    Accountant,
    EvalReply,
    EvalRequest,
    FinetuneMode,
    RoundProposal,
    RunRecord,
    SiteReply,
    Status,
    read_records,
    write_records,
)

names = st.text(st.characters(codec="ascii", categories=("L", "N")), min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
positive = st.integers(min_value=1, max_value=10_000)

proposals = st.builds(
    RoundProposal,
    server_round=positive,
    num_rounds=positive,
    local_steps=positive,
    batch_size=positive,
    learning_rate=finite,
    slices_per_subject=positive,
    noise_draws=positive,
    base_model=names,
    finetune_mode=st.sampled_from(FinetuneMode),
    lora_rank=positive,
    mask_branch=st.booleans(),
    ledger_heads=st.dictionaries(names, names, max_size=3),
    proximal_mu=finite,
    noise_multiplier=st.none() | finite,
    max_grad_norm=st.none() | finite,
)
replies = st.builds(
    SiteReply,
    site_id=names,
    status=st.sampled_from(Status),
    metrics=st.dictionaries(st.sampled_from(METRIC_KEYS), finite),
    notes=st.lists(names, max_size=3).map(tuple),
    accountant=st.none() | st.sampled_from(Accountant),
    entries=st.lists(st.dictionaries(names, names, max_size=2), max_size=2).map(tuple),
)


@given(proposals)
def test_a_proposal_survives_flowers_config_record(proposal: RoundProposal) -> None:
    assert RoundProposal.from_record(ConfigRecord(proposal.to_record())) == proposal


@given(replies)
def test_a_reply_survives_flowers_records(reply: SiteReply) -> None:
    config, metrics = reply.to_record()
    assert SiteReply.from_record(ConfigRecord(config), MetricRecord(metrics)) == reply


@given(st.lists(replies, max_size=3, unique_by=lambda r: r.site_id), finite.map(abs), st.integers(0, 5))
def test_round_records_survive_metrics_jsonl(sites: list[SiteReply], wall_s: float, accepted: int) -> None:
    from dataclasses import replace

    sites = [replace(s, entries=()) for s in sites]  # the checkpoint keeps the chains, not the record
    record = RunRecord(round=1, wall_s=wall_s, accepted=accepted, sites={s.site_id: s for s in sites})
    assert read_records(write_records([record, record])) == [record, record]


def test_an_evaluation_request_and_reply_survive_flowers_records() -> None:
    request = EvalRequest(samples_per_condition=3, steps=2, model_configs={"vae.json": "{}", "unet.json": "{}"})
    assert EvalRequest.from_record(ConfigRecord(request.to_record())) == request
    reply = EvalReply("site-a", {"T1w/healthy/fd": 3.5, "utility_gain": -0.25})
    config, metrics = reply.to_record()
    assert EvalReply.from_record(ConfigRecord(config), MetricRecord(metrics)) == reply


PROPOSAL = RoundProposal(1, 3, 20, 16, 1e-4, 4, 2, "shipped", FinetuneMode.attention, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"protocol-version": PROTOCOL_VERSION + 1}, "protocol-version"),
        ({"local-steps": "20"}, "'local-steps' = '20' is not int"),
        ({"local-steps": True}, "is not int"),
        ({"finetune-mode": "everything"}, "choose one of: full, attention, lora, conditioning"),
        ({"ledger-heads": "[1]"}, "JSON object"),
        ({"max-epsilon": 100.0}, "unknown keys ['max-epsilon']"),
        ({"batch-size": None}, "missing key 'batch-size'"),
        ({"mask-branch": 1}, "'mask-branch' = 1 is not bool"),
    ],
)
def test_a_proposal_is_read_strictly(change: dict[str, object], message: str) -> None:
    record = {**PROPOSAL.to_record(), **change}
    record = {k: v for k, v in record.items() if v is not None}
    with pytest.raises(ValueError, match="round proposal") as err:
        RoundProposal.from_record(record)
    assert message in str(err.value)


REPLY = SiteReply("site-a", Status.TRAINED, {"epsilon": 1.5, "num-subjects": 40.0}, ("note",), Accountant.prv)


@pytest.mark.parametrize(
    ("config", "metrics", "message"),
    [
        ({"status": "train"}, {}, "choose one of: reserved, trained"),
        ({}, {"loss": 0.1}, "not on the whitelist"),  # a raw statistic of the sampled subjects
        ({}, {"epsilon": "1.5"}, "is not a number"),
        ({"entries": json.dumps({"hash": "x"})}, {}, "JSON list of ledger entries"),
        ({"accountant": "trust-me"}, {}, "choose one of: prv, rdp, pld"),
        ({"extra": 1}, {}, "unknown keys ['extra']"),
    ],
)
def test_a_reply_is_read_strictly(config: dict[str, object], metrics: dict[str, object], message: str) -> None:
    good_config, good_metrics = REPLY.to_record()
    with pytest.raises(ValueError) as err:
        SiteReply.from_record({**good_config, **config}, {**good_metrics, **metrics})
    assert message in str(err.value)


def test_a_site_can_not_send_a_metric_off_the_whitelist() -> None:
    with pytest.raises(ValueError, match="whitelist"):
        SiteReply("site-a", Status.TRAINED, {"loss": 0.3})
