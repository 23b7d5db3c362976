"""End to end: the real Flower Simulation Engine, 2 synthetic sites x 2 rounds, with DP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.privacy import Segment, epsilon
from simulation.cli import app


def test_two_sites_two_rounds(tiny_sites: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["simulate", "--scenario", "tiny", "--sites", str(tiny_sites), "--rounds", "2", "--local-steps", "2",
            "--batch-size", "2", "--base-model", str(tiny_base), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["accepted"] == 2 for r in records)
    for name in ("sigma.png", "epsilon.png", "model/fedmri.json", "checkpoints/round-0002/state.json"):
        assert (out / name).exists(), name
    # Every site's cumulative ε agrees with dp-accounting's PLD recomputed from its ledger.
    for site in ("tiny-a", "tiny-b"):
        ledger = json.loads((tiny_sites / ".fedmri-ledger" / f"{site}.json").read_text())
        segments = [Segment(**e["segment"]) for e in ledger["entries"] if e["segment"]]
        claimed = ledger["entries"][-1]["epsilon"]
        independent = epsilon(segments, ledger["delta"], "pld")
        assert independent <= claimed <= 1.05 * independent
        assert claimed <= 8.0  # the demo sites' max_epsilon
        assert records[-1]["sites"][site]["epsilon"] == claimed

    # The run becomes a release that verifies, whose account is the ledgers' account.
    release = tmp_path / "release"
    packaged = CliRunner().invoke(app, ["release", str(out), "--out", str(release)])
    assert packaged.exit_code == 0, packaged.output
    checked = CliRunner().invoke(app, ["verify", str(release)])
    assert checked.exit_code == 0, checked.output
    manifest = json.loads((release / "privacy.json").read_text())
    for site in manifest["sites"]:
        ledger = json.loads((tiny_sites / ".fedmri-ledger" / f"{site['site_id']}.json").read_text())
        assert site["segments"] == [e["segment"] for e in ledger["entries"] if e["segment"]]
        assert site["epsilon"] == pytest.approx(ledger["entries"][-1]["epsilon"])
        assert site["delta"] == ledger["delta"] and site["num_subjects"] == ledger["num_subjects"]
    card = (release / "README.md").read_text()
    assert "any one patient of tiny-a changes the probability of any outcome" in card
    assert "synthetic hospital, 3 T" in card  # the declared coverage, read from the site YAML
    # Federated evaluation of that release: each site on its held-out subject, aggregates only.
    evaluation = tmp_path / "evaluation"
    evaluated = CliRunner().invoke(app, ["evaluate", "--model", str(release), "--scenario", "tiny", "--sites",
                                         str(tiny_sites), "--out", str(evaluation), "--samples", "2",
                                         "--grid-samples", "1", "--steps", "2", "--min-subjects", "1"])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    summary = json.loads((evaluation / "evaluation.json").read_text())
    assert summary["sites"] == ["tiny-a", "tiny-b"] and not summary["errors"]
    for name in ("sites", "adherence", "utility"):
        for suffix in (".csv", ".md"):
            assert (evaluation / f"evaluation_{name}{suffix}").stat().st_size > 0
    assert (evaluation / "evaluation.png").stat().st_size > 10_000
    adherence_rows = (evaluation / "evaluation_adherence.csv").read_text().splitlines()
    assert len(adherence_rows) == 1 + 5 * 4 * 3  # every modality x pathology x field combination
    assert any("none (unseen)" in row for row in adherence_rows) and any("tiny-a" in row for row in adherence_rows)
    site_rows = (evaluation / "evaluation_sites.csv").read_text()
    assert "tiny-a" in site_rows and "tiny-b" in site_rows
    assert list((tiny_sites / ".fedmri-eval" / "tiny-a").glob("closest_*.png"))  # stays at the site
    again = CliRunner().invoke(app, ["release", str(out), "--out", str(release)])
    assert again.exit_code == 2 and "not empty" in " ".join(again.output.split())
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 2 and "already holds a run" in " ".join(rerun.output.split())


def test_a_killed_server_resumes_after_its_last_completed_round(
    tiny_sites: Path, tiny_base: Path, tmp_path: Path
) -> None:
    """SIGKILL the whole federation after round 1, then --resume: no round lost or repeated.

    Also runs with client-level DP at the server, whose account must continue across the resume.
    """
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from common.privacy import Segment, epsilon
    from server.client_dp import ClientLevelAccount

    sites = tmp_path / "sites"
    for name in ("tiny-a", "tiny-b"):  # private copies: this test's ledgers start empty
        shutil.copytree(tiny_sites / name, sites / name)
        shutil.copy(tiny_sites / f"{name}.yaml", sites / f"{name}.yaml")
    out = tmp_path / "run"
    common = ["simulate", "--scenario", "tiny", "--sites", str(sites), "--local-steps", "2", "--batch-size", "2",
              "--base-model", str(tiny_base), "--out", str(out), "--min-train-nodes", "2", "--rounds", "3",
              "--client-dp", "fixed", "--client-dp-noise", "1.5", "--client-dp-clip", "5.0"]  # fmt: skip
    fedmri = Path(sys.executable).parent / "fedmri"
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.Popen([fedmri, *common], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "round 1 never completed"
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)  # the ServerApp, the clients and Ray, without warning
    killed.wait()
    completed = metrics.read_text().count("\n")

    resumed = CliRunner().invoke(app, [*common, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]  # no completed round repeated, none skipped
    assert completed in (1, 2)
    assert [r["client_level"]["releases"] for r in records] == [1, 2, 3]
    expected = ClientLevelAccount(1.5, 5.0, 2, 3, 1e-5)
    assert records[-1]["client_level"]["epsilon"] == pytest.approx(expected.epsilon("prv"))
    assert records[-1]["client_level"]["epsilon_rdp"] == pytest.approx(expected.epsilon("rdp"))
    for site in ("tiny-a", "tiny-b"):
        ledger = json.loads((sites / ".fedmri-ledger" / f"{site}.json").read_text())
        trained = [e for e in ledger["entries"] if e["status"] == "trained"]
        keys = [(e["run_id"], e["server_round"]) for e in trained]
        assert len(keys) == len(set(keys))  # each round of each run counted once
        assert {e["server_round"] for e in trained} == {1, 2, 3}  # every trained round is in the ledger
        # A round 2 cut off by the kill still counts (its update had left the site): never under-count.
        spent = epsilon([Segment(**e["segment"]) for e in trained], ledger["delta"], ledger["accountant"])
        assert trained[-1]["epsilon"] == pytest.approx(spent)
        assert [e["epsilon"] for e in trained] == sorted(e["epsilon"] for e in trained)
        assert trained[-1]["epsilon"] <= 8.0  # the policy's max_epsilon held across the kill
