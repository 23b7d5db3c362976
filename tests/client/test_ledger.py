"""The site ledger: signed, hash-chained, persisted atomically, continued after a restart, never silently reset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.identity import LedgerReset
from client.ledger import Ledger, LedgerBusy, LedgerEntry
from common.privacy import Segment
from common.signed_entries import chain_problems, load_public_key, sign


def _open(path: Path, **changes) -> Ledger:
    terms = {"site_id": "a", "num_subjects": 100, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv", **changes}
    return Ledger.open(path, home=path.parent.parent / "home", **terms)


def _trained(server_round: int = 1, sigma: float = 1.0) -> LedgerEntry:
    return LedgerEntry(1, server_round, "trained", Segment(0.1, sigma, 20), 2.5, 3.0, ["note"], num_subjects=100)


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(_trained())
    ledger.append(LedgerEntry(1, 2, "declined", None, 2.5, 3.0))
    reopened = _open(path)  # a new process
    assert reopened.entries == ledger.entries
    assert reopened.epsilon == 2.5 and reopened.segments() == [Segment(0.1, 1.0, 20)]
    assert reopened.rounds_trained(1) == 1 and reopened.rounds_trained(2) == 0
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary files left


def test_every_entry_is_signed_by_the_site_key_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(_trained(1))
    ledger.append(_trained(2))
    entries = json.loads(path.read_text())["entries"]
    key = load_public_key((tmp_path / "home" / "node.pub").read_bytes())
    assert chain_problems(entries, "a", key) == []
    assert entries[1]["prev"] == entries[0]["hash"] and entries[0]["prev"] == ""
    assert entries[0]["site_id"] == "a" and entries[0]["delta"] == 1e-5 and entries[0]["max_grad_norm"] == 1.0
    assert _open(path).key.public_key().public_numbers() == key.public_numbers()  # reloaded, not replaced


def test_an_edited_entry_fails_on_open_even_with_its_hash_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(_trained(1, sigma=1.2))
    raw = json.loads(path.read_text())
    entry = raw["entries"][0]
    entry["segment"]["noise_multiplier"] = 6.0  # a larger σ: a smaller ε on paper
    from cryptography.hazmat.primitives.asymmetric import ec

    forged = sign(
        {k: v for k, v in entry.items() if k not in ("hash", "signature")}, ec.generate_private_key(ec.SECP384R1())
    )
    raw["entries"][0] = forged  # consistent hash, signature by another key
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="signature does not verify"):
        _open(path)


def test_changed_terms_and_corruption_are_errors(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    _open(path).append(_trained())
    with pytest.raises(ValueError, match="ledger's δ is 1e-05"):
        _open(path, delta=2e-5)
    path.write_text(path.read_text()[:40])
    with pytest.raises(ValueError, match=r"privacy ledger is corrupt.*never delete it"):
        _open(path)


def test_a_reservation_counts_as_spent_and_settles_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(LedgerEntry(1, 1, "reserved", Segment(0.1, 1.0, 20), 2.5, 3.0, num_subjects=100))
    reopened = _open(path)  # e.g. after a crash during training
    assert reopened.segments() == [Segment(0.1, 1.0, 20)] and reopened.rounds_trained(1) == 1
    settled = reopened.settle("ab" * 32)
    again = _open(path)
    assert settled.status == "trained" and again.entries[-1].update_digest == "ab" * 32
    assert again.segments() == [Segment(0.1, 1.0, 20)]  # the same spend, once
    with pytest.raises(ValueError, match="no reservation to settle"):
        reopened.settle("cd" * 32)


def test_a_change_of_n_keeps_composing_but_a_change_of_delta_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    _open(path).append(_trained())
    grown = _open(path, num_subjects=150)
    assert grown.segments() == [Segment(0.1, 1.0, 20)] and grown.entries[0].num_subjects == 100
    with pytest.raises(ValueError, match=r"set privacy.delta: 1e-05"):
        _open(path, delta=1e-6)
    with pytest.raises(ValueError, match="belongs to site 'a'"):
        _open(path, site_id="b")


def test_a_site_that_trained_refuses_a_missing_or_rolled_back_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(_trained(1))
    backup = path.read_text()
    ledger.append(_trained(2))
    path.write_text(backup)  # an older copy: one spend fewer
    with pytest.raises(LedgerReset, match="do not continue the 2 recorded"):
        _open(path)
    path.unlink()  # deleted, or the YAML pointed elsewhere
    with pytest.raises(LedgerReset, match=r"missing or empty.*has trained.*reset-ledger"):
        _open(path)
    with pytest.raises(LedgerReset, match=r"missing or empty"):
        _open(tmp_path / "moved" / "a.json")
    (tmp_path / "home" / "node.key").unlink()
    with pytest.raises(LedgerReset, match="restore the node key"):
        _open(path)


def test_reset_ledger_is_explicit_and_keeps_the_old_files(tmp_path: Path) -> None:
    from sites.cli import app
    from sites.config import load_site

    site_yaml = tmp_path / "a.yaml"
    site_yaml.write_text(
        f"site_id: a\nhome: {tmp_path / 'home'}\ndata: {{bids_root: ./a}}\nprivacy: {{ledger_dir: {tmp_path / 'ledger'}}}\n"
    )
    assert load_site(site_yaml).ledger_path == tmp_path / "ledger" / "a.json"
    _open(tmp_path / "ledger" / "a.json").append(_trained())
    wrong = CliRunner().invoke(app, ["reset-ledger", str(site_yaml), "--confirm", "b"])
    assert wrong.exit_code == 2 and "must be the site id 'a'" in wrong.output
    done = CliRunner().invoke(app, ["reset-ledger", str(site_yaml), "--confirm", "a"])
    assert done.exit_code == 0, done.output
    kept = sorted(p.name for p in (tmp_path / "home").iterdir())
    assert any(n.startswith("trained.json.reset-") for n in kept) and "trained.json" not in kept
    assert any(p.name.startswith("a.json.") for p in (tmp_path / "ledger").iterdir())
    assert _open(tmp_path / "ledger" / "a.json").entries == []  # now a fresh start is allowed


def test_the_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    with Ledger.locked(path, wait_s=1.0), pytest.raises(LedgerBusy, match="another round"), Ledger.locked(path, 0.2):
        pass
    with Ledger.locked(path, wait_s=0.0):  # released on exit
        pass


def test_moving_the_yaml_does_not_move_the_ledger(tmp_path: Path, tiny_sites: Path) -> None:
    from sites.config import load_site

    original = load_site(tiny_sites / "tiny-a.yaml")
    moved = tmp_path / "moved.yaml"
    shutil.copyfile(tiny_sites / "tiny-a.yaml", moved)
    assert load_site(moved).ledger_path == original.ledger_path and original.ledger_path.is_absolute()


def test_a_crash_between_settling_and_the_marker_is_not_taken_for_a_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import client.ledger as ledger_module

    path = tmp_path / "ledger" / "a.json"
    ledger = _open(path)
    ledger.append(LedgerEntry(1, 1, "reserved", Segment(0.1, 1.0, 20), 2.5, 3.0, num_subjects=100))
    real_write = ledger_module.write_marker
    calls = []

    def power_cut_after_the_ledger(home: Path, marker) -> None:
        calls.append(marker)
        if len(calls) == 2:  # the marker write that follows the settled ledger: never happens
            raise KeyboardInterrupt
        real_write(home, marker)

    monkeypatch.setattr(ledger_module, "write_marker", power_cut_after_the_ledger)
    with pytest.raises(KeyboardInterrupt):
        ledger.settle("ab" * 32)
    monkeypatch.setattr(ledger_module, "write_marker", real_write)
    reopened = _open(path)  # the ledger holds the settled entry, the marker still the reservation too
    assert reopened.entries[-1].status == "trained" and calls[0].settling == reopened.entries[-1].hash
