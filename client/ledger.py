"""The site's privacy ledger: what was spent, round by round, persisted atomically at the site.

One budget, one writer: every read-decide-train-record sequence holds the ledger's lock
(`Ledger.locked`), so two rounds at one site (two runs, or two messages that Flower runs in
separate ClientApp processes) never decide on the same stale ledger. The round's spend is
reserved on disk before training starts; a crash after that over-counts, never under-counts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from filelock import FileLock, Timeout

from client.identity import Marker, check_continues, load_or_create_key, write_marker
from common.atomic import atomic_write
from common.privacy import Segment
from common.protocol import SPENDING, Status, parse
from common.signed_entries import BODY_KEYS, chain_problems, sign

# What a ledger entry may record (rejected and error are the server's words, never a site's).
STATUSES = (Status.RESERVED, Status.TRAINED, Status.DECLINED, Status.REFUSED, Status.EVALUATED)
FORMAT_VERSION = 2  # 2: every entry signed and hash-chained


class LedgerBusy(RuntimeError):
    """Another round at this site holds the ledger for longer than the wait allowed."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round's decision at the site. `segment` is None when the site did not train.

    The site fills the first fields; `Ledger.append` fills the rest (site, δ, C, chain, signature).
    """

    run_id: int
    server_round: int
    status: Status  # one of STATUSES
    segment: Segment | None
    epsilon: float  # cumulative, by the site's accountant, after this entry
    epsilon_rdp: float  # cumulative, by RDP
    notes: list[str] = field(default_factory=list)
    time: float = 0.0
    num_subjects: int = 0  # N when the entry was made (training subjects, or the evaluation cohort)
    global_digest: str = ""  # sha256 of the global tensors the site received (common.signed_entries)
    update_digest: str = ""  # sha256 of the tensors it sent back ("" when it sent none)
    site_id: str = ""
    delta: float = 0.0
    max_grad_norm: float = 0.0
    prev: str = ""  # hash of the entry before ("" for the first)
    hash: str = ""
    signature: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", parse(Status, self.status, "ledger entry status"))
        if self.status not in STATUSES:
            raise ValueError(f"ledger entry status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "segment": asdict(self.segment) if self.segment else None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LedgerEntry:
        return cls(**{**raw, "segment": Segment(**raw["segment"]) if raw["segment"] else None})


@dataclass
class Ledger:
    """All privacy spending of one site, across runs. Every change is signed and saved at once.

    The fixed terms are the site, δ and the accountant. N may change between entries (subjects
    join or leave): each round is a subsampled Gaussian mechanism at its own q = B/N with respect
    to adding or removing one subject, and adaptive composition over rounds holds whatever N was
    (README, "Privacy"). So a change of N keeps composing on the same ledger.
    """

    path: Path
    site_id: str
    num_subjects: int  # the site's N now
    delta: float
    max_grad_norm: float
    accountant: str
    home: Path
    key: ec.EllipticCurvePrivateKey
    entries: list[LedgerEntry] = field(default_factory=list)

    @classmethod
    def open(
        cls,
        path: Path,
        site_id: str,
        num_subjects: int,
        delta: float,
        max_grad_norm: float,
        accountant: str,
        home: Path,
    ) -> Ledger:
        """Load the ledger at `path`, or start an empty one if the site has never recorded anything.

        Checked on every open: each entry's hash and signature (the site's own key), the chain,
        and that the ledger continues what the marker in `home` recorded (no reset, no rollback).
        Fixed terms (site, δ) that differ from the site's current ones are an error, not a reset.
        Call under `Ledger.locked`."""
        key = load_or_create_key(home)
        if not path.exists():
            check_continues(home, path, [])
            return cls(path, site_id, num_subjects, delta, max_grad_norm, accountant, home, key)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: privacy ledger is corrupt ({err}); restore it from backup, never delete it"
            ) from None
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: ledger format {raw.get('format_version')!r}, expected {FORMAT_VERSION}")
        problems = chain_problems(raw["entries"], raw["site_id"], key.public_key())
        if problems:
            raise ValueError(f"{path}: the signed ledger does not verify: {'; '.join(problems)}")
        check_continues(home, path, [e["hash"] for e in raw["entries"]])
        if raw["site_id"] != site_id:
            raise ValueError(f"{path}: ledger belongs to site {raw['site_id']!r}, not {site_id!r}")
        if raw["delta"] != delta:
            raise ValueError(
                f"{path}: ledger's δ is {raw['delta']:g} but the site's privacy.delta is now {delta:g}; "
                f"set privacy.delta: {raw['delta']:g} in the site YAML (the ledger composes at one δ)"
            )
        entries = [LedgerEntry.from_json(e) for e in raw["entries"]]
        return cls(path, site_id, num_subjects, delta, max_grad_norm, raw["accountant"], home, key, entries)

    @staticmethod
    @contextmanager
    def locked(path: Path, wait_s: float) -> Iterator[None]:
        """Hold the exclusive lock on the ledger at `path` (a `.lock` file beside it).

        filelock's UnixFileLock is an flock(2) on that file: the kernel releases it when the
        holder dies, so a crashed round never leaves the site locked out. Raises LedgerBusy
        after `wait_s` seconds."""
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path.with_name(path.name + ".lock"), timeout=wait_s)
        try:
            lock.acquire()
        except Timeout:
            raise LedgerBusy(f"{path}: another round at this site has held the ledger for over {wait_s:g} s") from None
        try:
            yield
        finally:
            lock.release()

    def segments(self) -> list[Segment]:
        """Every spend, reserved or trained: what composes into the site's ε."""
        return [
            e.segment for e in self.entries if e.status in SPENDING and e.segment is not None and e.segment.steps > 0
        ]

    @property
    def epsilon(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0

    @property
    def epsilon_rdp(self) -> float:
        return self.entries[-1].epsilon_rdp if self.entries else 0.0

    def rounds_trained(self, run_id: int) -> int:
        return sum(1 for e in self.entries if e.run_id == run_id and e.status in SPENDING)

    def since(self, head: str, otherwise: int) -> list[dict[str, Any]]:
        """The signed entries after the one whose hash is `head`; from index `otherwise` if `head` is
        not in this ledger (a server that holds nothing of this site gets only the new entries)."""
        hashes = [e.hash for e in self.entries]
        start = hashes.index(head) + 1 if head in hashes else otherwise
        return [e.to_json() for e in self.entries[start:]]

    def append(self, entry: LedgerEntry) -> LedgerEntry:
        """Sign `entry` onto the chain and write the ledger to disk atomically (before anything leaves)."""
        self.entries.append(self._signed(entry, self.entries[-1].hash if self.entries else ""))
        self.save()
        return self.entries[-1]

    def settle(self, update_digest: str, status: Status = Status.TRAINED) -> LedgerEntry:
        """Re-sign the last entry, a reservation, as `status` with the update's digest; same spend, same place."""
        last = self.entries[-1] if self.entries else None
        if last is None or last.status != Status.RESERVED:
            raise ValueError(f"{self.path}: no reservation to settle (last entry: {last})")
        settled = self._signed(replace(last, status=status, update_digest=update_digest, time=now()), last.prev)
        # The marker first names both versions of the entry, then (in save) only the new one.
        write_marker(self.home, Marker(self.site_id, str(self.path), len(self.entries), last.hash, settled.hash))
        self.entries[-1] = settled
        self.save()
        return settled

    def _signed(self, entry: LedgerEntry, prev: str) -> LedgerEntry:
        filled = replace(entry, site_id=self.site_id, delta=self.delta, max_grad_norm=self.max_grad_norm, prev=prev)
        signed = sign({k: filled.to_json()[k] for k in BODY_KEYS}, self.key)
        return replace(filled, hash=signed["hash"], signature=signed["signature"])

    def save(self) -> None:
        raw = {
            "format_version": FORMAT_VERSION,
            "site_id": self.site_id,
            "num_subjects": self.num_subjects,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "accountant": self.accountant,
            "entries": [e.to_json() for e in self.entries],
        }
        atomic_write(self.path, json.dumps(raw, indent=1))
        # The marker follows the ledger: a crash between the two leaves a ledger one entry ahead
        # (append), or the settled version of the entry the marker names as settling (settle);
        # either still continues the marker.
        write_marker(self.home, Marker(self.site_id, str(self.path), len(self.entries), self.entries[-1].hash))


def now() -> float:
    return round(time.time(), 3)
