"""The site's privacy ledger: what was spent, round by round, persisted atomically at the site."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.atomic import atomic_write
from common.privacy import Segment


@dataclass(frozen=True)
class LedgerEntry:
    """One round's decision at the site. `segment` is None when the site did not train."""

    run_id: int
    server_round: int
    status: str  # "trained", "declined" or "refused"
    segment: Segment | None
    epsilon: float  # cumulative, by the site's accountant, after this entry
    epsilon_rdp: float  # cumulative, by RDP
    notes: list[str] = field(default_factory=list)
    time: float = 0.0


@dataclass
class Ledger:
    """All privacy spending of one site, across runs. Persist with `save` before releasing an update."""

    path: Path
    site_id: str
    num_subjects: int
    delta: float
    max_grad_norm: float
    accountant: str
    entries: list[LedgerEntry] = field(default_factory=list)

    @classmethod
    def open(
        cls, path: Path, site_id: str, num_subjects: int, delta: float, max_grad_norm: float, accountant: str
    ) -> Ledger:
        """Load the ledger at `path`, or start an empty one. A ledger whose fixed terms
        (site, subjects, δ, C) differ from the site's current ones is an error, not a reset."""
        if not path.exists():
            return cls(path, site_id, num_subjects, delta, max_grad_norm, accountant)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}: privacy ledger is corrupt ({err}); restore it from backup, never delete it"
            ) from None
        ledger = cls(
            path, raw["site_id"], raw["num_subjects"], raw["delta"], raw["max_grad_norm"], raw["accountant"],
            [LedgerEntry(**{**e, "segment": Segment(**e["segment"]) if e["segment"] else None}) for e in raw["entries"]],
        )  # fmt: skip
        expected = {"site_id": site_id, "num_subjects": num_subjects, "delta": delta, "max_grad_norm": max_grad_norm}
        found = {k: getattr(ledger, k) for k in expected}
        if found != expected:
            raise ValueError(
                f"{path}: ledger was written for {found}, but the site now has {expected}; start a new ledger_dir deliberately"
            )
        return ledger

    def segments(self) -> list[Segment]:
        return [e.segment for e in self.entries if e.segment is not None and e.segment.steps > 0]

    @property
    def epsilon(self) -> float:
        return self.entries[-1].epsilon if self.entries else 0.0

    @property
    def epsilon_rdp(self) -> float:
        return self.entries[-1].epsilon_rdp if self.entries else 0.0

    def rounds_trained(self, run_id: int) -> int:
        return sum(1 for e in self.entries if e.run_id == run_id and e.status == "trained")

    def append(self, entry: LedgerEntry) -> None:
        """Record `entry` and write the ledger to disk atomically (before anything is released)."""
        self.entries.append(entry)
        self.save()

    def save(self) -> None:
        raw = {
            "site_id": self.site_id,
            "num_subjects": self.num_subjects,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "accountant": self.accountant,
            "entries": [{**asdict(e), "segment": asdict(e.segment) if e.segment else None} for e in self.entries],
        }
        atomic_write(self.path, json.dumps(raw, indent=1))


def now() -> float:
    return round(time.time(), 3)
