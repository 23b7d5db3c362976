"""The site ledger: persisted atomically, continued after a restart, never silently reset."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.ledger import Ledger, LedgerEntry
from common.privacy import Segment


def _open(path: Path, **changes) -> Ledger:
    terms = {"site_id": "a", "num_subjects": 100, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv", **changes}
    return Ledger.open(path, **terms)


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(LedgerEntry(1, 1, "trained", Segment(0.1, 1.0, 20), 2.5, 3.0, ["note"]))
    ledger.append(LedgerEntry(1, 2, "declined", None, 2.5, 3.0))
    reopened = _open(path)  # a new process
    assert reopened.entries == ledger.entries
    assert reopened.epsilon == 2.5 and reopened.segments() == [Segment(0.1, 1.0, 20)]
    assert reopened.rounds_trained(1) == 1 and reopened.rounds_trained(2) == 0
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary files left


def test_changed_terms_and_corruption_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    _open(path).append(LedgerEntry(1, 1, "trained", Segment(0.1, 1.0, 20), 2.5, 3.0))
    with pytest.raises(ValueError, match="ledger was written for"):
        _open(path, num_subjects=50)
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=r"privacy ledger is corrupt.*never delete it"):
        _open(path)
