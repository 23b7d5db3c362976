"""`fedmri sites audit`: a site finds a release that leaves out a spend it made for that run."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from client.audit import audit_release
from client.ledger import Ledger, LedgerEntry
from common.privacy import Segment


def _ledger(tmp_path: Path) -> Ledger:
    ledger = Ledger.open(tmp_path / "ledger" / "a.json", "a", 100, 1e-5, 1.0, "prv", tmp_path / "home")
    for run_id, rounds in ((5, 3), (6, 1)):  # run 5: three rounds; then another run
        for server_round in range(1, rounds + 1):
            ledger.append(LedgerEntry(run_id, server_round, "reserved", Segment(0.1, 1.0, 10), 1.0, 1.0))
            ledger.settle("00" * 32)
    return ledger


def _release(tmp_path: Path, entries: list[dict]) -> Path:
    release = tmp_path / "release"
    release.mkdir(exist_ok=True)
    (release / "privacy.json").write_text(json.dumps({"sites": [{"site_id": "a", "entries": entries}]}))
    return release


def test_a_complete_release_passes_and_a_dropped_last_round_is_found(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    run5 = [e.to_json() for e in ledger.entries[:3]]
    complete = audit_release("a", ledger.path, _release(tmp_path, run5))
    assert complete.problems == [] and complete.runs == [5] and complete.spends_in_release == 3
    assert complete.other_runs == [6]  # listed for the site to judge
    empty = audit_release("a", ledger.path, _release(tmp_path, [])).problems
    assert empty == [
        "the release lists this site with no signed entries: if this site trained for it, its spend is missing"
    ]
    truncated = audit_release("a", ledger.path, _release(tmp_path, run5[:2]))  # a valid, shorter chain
    assert truncated.problems == ["run 5 round 3: this site spent (q 0.1, σ 1, 10 steps) and the release leaves it out"]


def test_entries_the_site_never_wrote_are_found(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    forged = [e.to_json() for e in ledger.entries[:3]]
    forged[1]["segment"]["noise_multiplier"] = 6.0
    assert "not in this site's ledger" in audit_release("a", ledger.path, _release(tmp_path, forged)).problems[0]
    gap = [ledger.entries[0].to_json(), ledger.entries[2].to_json()]
    problems = audit_release("a", ledger.path, _release(tmp_path, gap)).problems
    assert "not one contiguous stretch" in problems[0] and "round 2" in problems[1]


def test_the_cli_exit_code(tmp_path: Path) -> None:
    from sites.cli import app

    ledger = _ledger(tmp_path)
    site_yaml = tmp_path / "a.yaml"
    site_yaml.write_text(
        f"site_id: a\nhome: {tmp_path / 'home'}\ndata: {{bids_root: ./a}}\nprivacy: {{ledger_dir: {ledger.path.parent}}}\n"
    )
    ok = CliRunner().invoke(
        app, ["audit", str(site_yaml), str(_release(tmp_path, [e.to_json() for e in ledger.entries[:3]]))]
    )
    assert ok.exit_code == 0 and "accounts for every spend" in ok.output, ok.output
    bad = CliRunner().invoke(app, ["audit", str(site_yaml), str(_release(tmp_path, [ledger.entries[0].to_json()]))])
    assert bad.exit_code == 1 and "leaves it out" in " ".join(bad.output.split())
