"""What passes between the server and a site, typed once: the round proposal, the site's reply,
the evaluation request and reply, and the per-round record of metrics.jsonl.

Flower carries these as flat ConfigRecords and MetricRecords; `to_record` gives the flat values
the app glue wraps, and `from_record` reads them back strictly: a missing key, an unknown key, a
value of the wrong type or another protocol version is an error naming the key, never a default.
No flwr import here (the glue in client/app.py and server/ does the wrapping).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TypeAlias, TypeVar

PROTOCOL_VERSION = 1

# A JSON value, as json.loads returns it.
JSON: TypeAlias = "str | int | float | bool | list[JSON] | dict[str, JSON] | None"
# What a Flower ConfigRecord holds (the subset fedmri sends).
ConfigValue: TypeAlias = int | float | str | bool | list[str]


class Status(StrEnum):
    """A site's round, in the ledger, the reply and the round record (one vocabulary)."""

    RESERVED = "reserved"  # the site decided to train: its spend is on disk before training (ledger only)
    TRAINED = "trained"  # trained; the reply carries the update
    DECLINED = "declined"  # the site's budget is spent, or another round holds its ledger
    REFUSED = "refused"  # the proposal breaks the site's policy
    REJECTED = "rejected"  # the server screened the update out (norm, non-finite, broken ledger chain)
    ERROR = "error"  # no usable reply (the ClientApp raised, or the reply was malformed)
    EVALUATED = "evaluated"  # the site evaluated a release on its held-out subjects (ledger only; no spend)


# The statuses whose DP-SGD segment composes into a site's ε.
SPENDING = frozenset({Status.RESERVED, Status.TRAINED})


class FinetuneMode(StrEnum):
    """Which tensors a site trains (common/finetune.py)."""

    full = "full"  # every UNet and condition-encoder parameter
    attention = "attention"  # attention layers + condition encoder, as in DP-LDM (Lyu et al. 2023)
    lora = "lora"  # rank-r adapters on the attention projections + condition encoder (Hu et al. 2022)
    # The condition encoder alone (~16k parameters for the shipped base): what each attribute
    # (modality, pathology, field, timing, position) means to a frozen UNet. DP noise grows with
    # the square root of the trainable dimension while the signal does not (docs/generator.md).
    conditioning = "conditioning"


class Strategy(StrEnum):
    fedavg = "fedavg"
    fedprox = "fedprox"
    fedadam = "fedadam"


class Accountant(StrEnum):
    """How a site composes its DP-SGD segments into ε (common/privacy.py)."""

    prv = "prv"
    rdp = "rdp"
    pld = "pld"


class ClientDP(StrEnum):
    off = "off"
    fixed = "fixed"  # Flower's server-side fixed-clipping wrapper (server/client_dp.py)


class Task(StrEnum):
    train = "train"
    evaluate = "evaluate"


E = TypeVar("E", bound=StrEnum)


def parse(kind: type[E], value: object, where: str) -> E:
    """`value` as a member of `kind`, or a ValueError naming `where` and the choices."""
    try:
        return kind(value)  # type: ignore[arg-type]  # a non-string raises ValueError too
    except ValueError:
        choices = ", ".join(m.value for m in kind)
        raise ValueError(f"{where} = {value!r}; choose one of: {choices}") from None


# The only metric keys a site ever sends after a round: scalars about the round, nothing per
# subject. The privacy parameters (q, σ, C, δ) and N are public terms of the site's account (the
# release lists them). The training loss is not among them: it is a raw statistic of the sampled
# subjects.
METRIC_KEYS = (
    "steps", "num-subjects", "epsilon", "epsilon-rdp", "noise-multiplier", "sample-rate", "max-grad-norm",
    "delta", "trained",
)  # fmt: skip


def _record_name(name: str) -> str:
    return name.replace("_", "-")


def _read(record: Mapping[str, object], key: str, kind: type, where: str) -> object:
    if key not in record:
        raise ValueError(f"{where}: missing key '{key}'")
    value = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"{where}: '{key}' = {value!r} is not {kind.__name__}")
    return value


def _int(record: Mapping[str, object], key: str, where: str) -> int:
    value = _read(record, key, int, where)
    assert isinstance(value, int)
    return value


def _float(record: Mapping[str, object], key: str, where: str) -> float:
    value = _read(record, key, float, where)
    assert isinstance(value, float)
    return value


def _bool(record: Mapping[str, object], key: str, where: str) -> bool:
    value = _read(record, key, bool, where)
    assert isinstance(value, bool)
    return value


def _str(record: Mapping[str, object], key: str, where: str) -> str:
    value = _read(record, key, str, where)
    assert isinstance(value, str)
    return value


def _check_version(record: Mapping[str, object], where: str) -> None:
    version = _int(record, "protocol-version", where)
    if version != PROTOCOL_VERSION:
        raise ValueError(
            f"{where}: protocol-version {version}, this fedmri speaks {PROTOCOL_VERSION}; "
            "the server and every site must run the same fedmri release"
        )


def _check_keys(record: Mapping[str, object], known: set[str], where: str) -> None:
    unknown = set(record) - known
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected only {sorted(known)}")


def _check_flat(record: Mapping[str, object], kind: type, where: str) -> None:
    """A record that holds one key per field of the dataclass `kind`, plus the protocol version."""
    _check_version(record, where)
    _check_keys(record, {"protocol-version", *(_record_name(f.name) for f in fields(kind))}, where)


def _json_object(text: object, where: str) -> dict[str, JSON]:
    if not isinstance(text, str):
        raise ValueError(f"{where} must be a JSON string, got {type(text).__name__}")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object")
    return value


@dataclass(frozen=True)
class RoundProposal:
    """What the server asks of every site in a round. The site's policy decides what it runs."""

    server_round: int
    num_rounds: int
    local_steps: int
    batch_size: int  # expected subjects per DP-SGD step
    learning_rate: float
    slices_per_subject: int  # K (client/trainer.py)
    noise_draws: int  # M
    base_model: str  # "shipped" or a model directory present at every site
    finetune_mode: FinetuneMode
    lora_rank: int
    mask_branch: bool = False  # add the lesion-mask branch to a base without one (common/mask_branch.py)
    # Hash of each site's last signed ledger entry the server holds: the reply carries the rest.
    ledger_heads: Mapping[str, str] = field(default_factory=dict)
    proximal_mu: float = 0.0  # FedProx's proximal term (Flower's FedProx adds it to the record)
    noise_multiplier: float | None = None  # honoured only if the site's policy accepts overrides
    max_grad_norm: float | None = None  # likewise

    def to_record(self) -> dict[str, ConfigValue]:
        record: dict[str, ConfigValue] = {"protocol-version": PROTOCOL_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "ledger_heads":
                record["ledger-heads"] = json.dumps(dict(value), sort_keys=True)
            elif value is not None:
                record[_record_name(f.name)] = value.value if isinstance(value, StrEnum) else value
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RoundProposal:
        where = "the server's round proposal"
        _check_flat(record, cls, where)
        heads = _json_object(_str(record, "ledger-heads", where), f"{where}: 'ledger-heads'")
        if not all(isinstance(v, str) for v in heads.values()):
            raise ValueError(f"{where}: 'ledger-heads' must map site ids to hashes")
        optional = {k: _float(record, k, where) for k in ("noise-multiplier", "max-grad-norm") if k in record}
        return cls(
            server_round=_int(record, "server-round", where),
            num_rounds=_int(record, "num-rounds", where),
            local_steps=_int(record, "local-steps", where),
            batch_size=_int(record, "batch-size", where),
            learning_rate=_float(record, "learning-rate", where),
            slices_per_subject=_int(record, "slices-per-subject", where),
            noise_draws=_int(record, "noise-draws", where),
            base_model=_str(record, "base-model", where),
            finetune_mode=parse(FinetuneMode, record.get("finetune-mode"), f"{where}: 'finetune-mode'"),
            lora_rank=_int(record, "lora-rank", where),
            mask_branch=_bool(record, "mask-branch", where) if "mask-branch" in record else False,
            ledger_heads={k: str(v) for k, v in heads.items()},
            proximal_mu=_float(record, "proximal-mu", where) if "proximal-mu" in record else 0.0,
            noise_multiplier=optional.get("noise-multiplier"),
            max_grad_norm=optional.get("max-grad-norm"),
        )


def _metrics(values: Mapping[str, object], allowed: Sequence[str], where: str) -> dict[str, float]:
    unexpected = set(values) - set(allowed)
    if unexpected:
        raise ValueError(f"{where}: metrics {sorted(unexpected)} are not on the whitelist {list(allowed)}")
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: metric '{key}' = {value!r} is not a number")
        out[key] = float(value)
    return out


@dataclass(frozen=True)
class SiteReply:
    """What a site says after a round (its update, if any, travels beside it as tensors)."""

    site_id: str
    status: Status
    metrics: Mapping[str, float]  # keys from METRIC_KEYS only
    notes: tuple[str, ...] = ()
    accountant: Accountant | None = None  # the site's accountant for metrics['epsilon'] (None: no reply)
    # The site's signed ledger entries after the server's last known one: the release carries
    # them, `fedmri verify --keys` checks their signatures (common/signed_entries.py).
    entries: tuple[Mapping[str, JSON], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", _metrics(self.metrics, METRIC_KEYS, f"site {self.site_id}'s reply"))
        if not isinstance(self.status, Status):
            raise ValueError(f"site {self.site_id}'s reply: status {self.status!r} is not a Status")

    @property
    def num_subjects(self) -> float:
        return self.metrics.get("num-subjects", 0.0)

    def to_record(self) -> tuple[dict[str, ConfigValue], dict[str, float]]:
        """(the 'reply' ConfigRecord, the 'metrics' MetricRecord that Flower's strategy weights by)."""
        config: dict[str, ConfigValue] = {
            "protocol-version": PROTOCOL_VERSION,
            "site-id": self.site_id,
            "status": self.status.value,
            "notes": list(self.notes) or [""],  # Flower refuses an empty list
            "accountant": self.accountant.value if self.accountant else "",
            "entries": json.dumps([dict(e) for e in self.entries]),
        }
        return config, dict(self.metrics)

    @classmethod
    def from_record(cls, config: Mapping[str, object], metrics: Mapping[str, object]) -> SiteReply:
        where = "a site's reply"
        _check_version(config, where)
        _check_keys(config, {"protocol-version", "site-id", "status", "notes", "accountant", "entries"}, where)
        site_id = _str(config, "site-id", where)
        where = f"site {site_id}'s reply"
        notes = _read(config, "notes", list, where)
        assert isinstance(notes, list)
        entries = json.loads(_str(config, "entries", where))
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"{where}: 'entries' must be a JSON list of ledger entries")
        accountant = _str(config, "accountant", where)
        return cls(
            site_id=site_id,
            status=parse(Status, config["status"], f"{where}: 'status'"),
            metrics=_metrics(metrics, METRIC_KEYS, where),
            notes=tuple(str(n) for n in notes if n),
            accountant=parse(Accountant, accountant, f"{where}: 'accountant'") if accountant else None,
            entries=tuple(entries),
        )

    def to_json(self) -> dict[str, JSON]:
        """This reply's line in a round record: status, metrics, accountant, notes (not the entries:
        the checkpoint keeps every site's chain whole)."""
        return {
            "status": self.status.value,
            **self.metrics,
            "accountant": self.accountant.value if self.accountant else "",
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, site_id: str, value: Mapping[str, JSON]) -> SiteReply:
        where = f"round record of site {site_id}"
        metrics = {k: v for k, v in value.items() if k not in ("status", "accountant", "notes")}
        notes = value.get("notes", [])
        accountant = value.get("accountant", "")
        return cls(
            site_id=site_id,
            status=parse(Status, value.get("status"), f"{where}: 'status'"),
            metrics=_metrics(metrics, METRIC_KEYS, where),
            notes=tuple(str(n) for n in notes) if isinstance(notes, list) else (),
            accountant=parse(Accountant, accountant, f"{where}: 'accountant'") if accountant else None,
        )


@dataclass(frozen=True)
class RunRecord:
    """One round of a run: one JSON line of metrics.jsonl, and the checkpoint's copy of it."""

    round: int
    wall_s: float
    accepted: int  # updates aggregated
    sites: Mapping[str, SiteReply]
    client_level: Mapping[str, JSON] | None = None  # client-level DP account (server/client_dp.py)

    def to_json(self) -> dict[str, JSON]:
        return {
            "round": self.round,
            "wall_s": self.wall_s,
            "accepted": self.accepted,
            "sites": {site: reply.to_json() for site, reply in self.sites.items()},
            "client_level": dict(self.client_level) if self.client_level is not None else None,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, JSON]) -> RunRecord:
        sites = value.get("sites")
        if not isinstance(sites, dict) or not all(isinstance(v, dict) for v in sites.values()):
            raise ValueError(f"round record {value.get('round')!r}: 'sites' must map site ids to objects")
        client_level = value.get("client_level")
        return cls(
            round=_int(value, "round", "round record"),
            wall_s=_float(value, "wall_s", "round record"),
            accepted=_int(value, "accepted", "round record"),
            sites={site: SiteReply.from_json(site, v) for site, v in sites.items() if isinstance(v, dict)},
            client_level=client_level if isinstance(client_level, dict) else None,
        )


def read_records(text: str) -> list[RunRecord]:
    """metrics.jsonl's text as round records."""
    return [RunRecord.from_json(json.loads(line)) for line in text.splitlines() if line.strip()]


def write_records(records: Sequence[RunRecord]) -> str:
    return "".join(json.dumps(r.to_json()) + "\n" for r in records)


@dataclass(frozen=True)
class EvalRequest:
    """What the server asks each site to do with a release (client/evaluate.py)."""

    samples_per_condition: int = 16
    steps: int = 20  # DPM-Solver++ steps
    guidance_scale: float = 3.0
    seed: int = 0
    min_subjects: int = 2  # a condition with fewer held-out subjects is not reported
    few_shot_k: int = 3
    few_shot_repeats: int = 3
    model_configs: Mapping[str, str] = field(default_factory=dict)  # the release's JSON files, by name

    def to_record(self) -> dict[str, ConfigValue]:
        record: dict[str, ConfigValue] = {"protocol-version": PROTOCOL_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            record[_record_name(f.name)] = json.dumps(dict(value)) if f.name == "model_configs" else value
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> EvalRequest:
        where = "the server's evaluation request"
        _check_flat(record, cls, where)
        configs = _json_object(_str(record, "model-configs", where), f"{where}: 'model-configs'")
        values: dict[str, object] = {"model_configs": {k: str(v) for k, v in configs.items()}}
        for f in fields(cls):
            if f.name != "model_configs":
                kind = int if f.type == "int" else float
                values[f.name] = _read(record, _record_name(f.name), kind, where)
        return cls(**values)  # type: ignore[arg-type]


# A site's missing-sequence synthesis figures, per (sources, target): "translate/<sources>/<target>/<key>"
# (client/evaluate_translation.py).
TRANSLATE_KEYS = ("n_slices", "n_subjects", "psnr", "ssim", "psnr_copy", "ssim_copy")


# A site's downstream segmentation gain, per focal pathology: "segment/<pathology>/<key>"
# (client/evaluate_segmentation.py).
SEGMENT_KEYS = ("k", "repeats", "n_synthetic", "n_test_subjects", "dice_real_only", "dice_with_synthetic")


@dataclass(frozen=True)
class EvalReply:
    """A site's evaluation: aggregates over its held-out subjects only (client/evaluate.py)."""

    site_id: str
    metrics: Mapping[str, float]

    def __post_init__(self) -> None:
        bad = [k for k, v in self.metrics.items() if not isinstance(v, int | float) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"site {self.site_id}'s evaluation: metrics {bad} are not numbers")

    def to_record(self) -> tuple[dict[str, ConfigValue], dict[str, float]]:
        return {"protocol-version": PROTOCOL_VERSION, "site-id": self.site_id}, dict(self.metrics)

    @classmethod
    def from_record(cls, config: Mapping[str, object], metrics: Mapping[str, object]) -> EvalReply:
        where = "a site's evaluation reply"
        _check_version(config, where)
        _check_keys(config, {"protocol-version", "site-id"}, where)
        site_id = _str(config, "site-id", where)
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if len(numbers) != len(metrics):
            raise ValueError(f"site {site_id}'s evaluation: non-numeric metrics {sorted(set(metrics) - set(numbers))}")
        return cls(site_id, {k: float(v) for k, v in numbers.items()})
