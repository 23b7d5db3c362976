"""End to end: the real Flower Simulation Engine, 2 synthetic sites x 2 rounds, with DP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.branches import Branches, branches
from common.model import load_ldm
from common.privacy import Segment, epsilon
from common.release import directory_digest
from simulation.cli import app


@pytest.mark.slow  # real processes (Ray, fresh Python workers)
def test_two_sites_two_rounds(private_sites: Path, source_base: Path, tmp_path: Path, ledger_of) -> None:
    """The base has the source branch (missing-sequence synthesis), so the sites also train it on
    their subjects' paired contrasts, and the release, its card and its evaluation cover it."""
    tiny_sites = private_sites
    out = tmp_path / "run"
    args = ["simulate", "--scenario", "tiny", "--sites", str(tiny_sites), "--rounds", "2", "--local-steps", "2",
            "--batch-size", "2", "--base-model", str(source_base), "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # Quiet: no ClientApp output and no Flower log lines in the terminal; both are in the run directory.
    assert "(ClientAppActor" not in result.output and "configure_train" not in result.output, result.output
    assert (out / "flower.log").read_text().count("configure_train: Sampled 2 nodes") == 2
    workers = " ".join(p.read_text() for p in (out / "ray-workers").iterdir())
    assert workers.count("created a signing key for this site") == 2, workers[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["accepted"] == 2 for r in records)
    for name in ("sigma.png", "epsilon.png", "model/fedmri.json", "checkpoints/round-0002/state.json"):
        assert (out / name).exists(), name
    # Every site's cumulative ε agrees with dp-accounting's PLD recomputed from its ledger.
    for site in ("tiny-a", "tiny-b"):
        ledger = ledger_of(tiny_sites / f"{site}.yaml")
        segments = [Segment(**e["segment"]) for e in ledger["entries"] if e["segment"]]
        claimed = ledger["entries"][-1]["epsilon"]
        independent = epsilon(segments, ledger["delta"], "pld")
        assert independent <= claimed <= 1.05 * independent
        assert claimed <= 8.0  # the demo sites' max_epsilon
        assert records[-1]["sites"][site]["epsilon"] == claimed

    # The run becomes a signed release that verifies, whose account is the ledgers' account.
    release = tmp_path / "release"
    packaged = CliRunner().invoke(app, ["release", str(out), "--out", str(release)])
    assert packaged.exit_code == 0, packaged.output
    checked = CliRunner().invoke(app, ["verify", str(release), "--keys", str(out / "keys")])
    assert checked.exit_code == 0, checked.output
    assert "every ledger entry and privacy.json verify" in checked.output
    manifest = json.loads((release / "privacy.json").read_text())
    for site in manifest["sites"]:
        ledger = ledger_of(tiny_sites / f"{site['site_id']}.yaml")
        assert site["entries"] == ledger["entries"]  # every signed entry, exactly as the site wrote it
        assert site["segments"] == [e["segment"] for e in ledger["entries"] if e["segment"]]
        # The release's ε and an independent dp-accounting recomputation from the ledger agree to 0.1 %.
        independent = epsilon(
            [Segment(**e["segment"]) for e in ledger["entries"] if e["segment"]], site["delta"], "pld"
        )
        assert independent * (1 - 1e-3) <= site["epsilon"] <= independent * (1 + 1e-3)
        assert site["delta"] == ledger["delta"] and site["num_subjects"] == ledger["num_subjects"]

    for site in ("tiny-a", "tiny-b"):  # and each site, from its own ledger, finds nothing left out
        audited = CliRunner().invoke(app, ["sites", "audit", str(tiny_sites / f"{site}.yaml"), str(release)])
        assert audited.exit_code == 0 and "accounts for every spend" in audited.output, audited.output

    # Crash window: the disk as a crash between round 2's checkpoint and its metrics line leaves it.
    # The release reads the checkpoint, which holds the round's record and entries with its tensors.
    crashed = tmp_path / "crashed-run"
    shutil.copytree(out, crashed)
    lines = (crashed / "metrics.jsonl").read_text().splitlines(keepends=True)
    (crashed / "metrics.jsonl").write_text("".join(lines[:1]))
    CliRunner().invoke(app, ["release", str(crashed), "--out", str(tmp_path / "crashed-release")])
    crashed_manifest = json.loads((tmp_path / "crashed-release" / "privacy.json").read_text())
    assert [s["segments"] for s in crashed_manifest["sites"]] == [s["segments"] for s in manifest["sites"]]

    # A run that starts from the release carries its account forward: both compose, per site.
    unreleased = CliRunner().invoke(app, [*args[:-4], "--base-model", str(out / "model"), "--out", str(tmp_path / "x")])
    assert unreleased.exit_code == 2 and "release it with `fedmri release`" in " ".join(unreleased.output.split())
    child_run, child = tmp_path / "child-run", tmp_path / "child-release"
    # The child run also adds the lesion-mask branch to that base and trains it with tiny-a's masks.
    chained = [*args[:-4], "--base-model", str(release), "--out", str(child_run), "--mask-branch"]
    chained[chained.index("--rounds") + 1] = "1"
    assert CliRunner().invoke(app, chained).exit_code == 0
    assert CliRunner().invoke(app, ["release", str(child_run), "--out", str(child)]).exit_code == 0
    child_checked = CliRunner().invoke(app, ["verify", str(child), "--keys", str(child_run / "keys")])
    assert child_checked.exit_code == 0 and "parent release: release" in child_checked.output, child_checked.output
    child_manifest = json.loads((child / "privacy.json").read_text())
    assert child_manifest["parent"]["sha256"] == directory_digest(release)
    for parent_site, child_site in zip(manifest["sites"], child_manifest["sites"], strict=True):
        assert child_site["entries"][: len(parent_site["entries"])] == parent_site["entries"]
        assert len(child_site["segments"]) == len(parent_site["segments"]) + 1  # 2 rounds, then 1
        composed = epsilon([Segment(**x) for x in child_site["segments"]], child_site["delta"], "pld")
        assert composed * (1 - 1e-3) <= child_site["epsilon"] <= composed * (1 + 1e-3)
        assert parent_site["epsilon"] < child_site["epsilon"] <= 8.0  # composed, and still within the budget
    assert branches(load_ldm(release).denoiser.unet) == Branches(mask=False, sources=True)
    assert branches(load_ldm(child).denoiser.unet) == Branches(mask=True, sources=True)
    assert "**Mask branch.**" in (child / "README.md").read_text()
    card = (release / "README.md").read_text()
    assert "**Mask branch.**" not in card and "**Source branch (missing-sequence synthesis).**" in card
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
    translation = (evaluation / "evaluation_translation.csv").read_text()  # the sites' held-out pairs
    assert "tiny-a,T1w+T2w,FLAIR," in translation and "tiny-b,T1w+T2w,FLAIR," in translation
    assert "tiny-a: T1w+T2w -> FLAIR" in summary["translation"]
    assert list((tiny_sites / ".fedmri-eval" / "tiny-a").glob("closest_*.png"))  # stays at the site
    again = CliRunner().invoke(app, ["release", str(out), "--out", str(release)])
    assert again.exit_code == 2 and "not empty" in " ".join(again.output.split())
    rerun = CliRunner().invoke(app, args)
    assert rerun.exit_code == 2 and "already holds a run" in " ".join(rerun.output.split())


@pytest.mark.slow  # real processes (Ray, fresh Python workers)
def test_a_killed_server_resumes_after_its_last_completed_round(
    private_sites: Path, tiny_base: Path, tmp_path: Path, ledger_of
) -> None:
    """SIGKILL the whole federation after round 1, then --resume: no round lost or repeated.

    Also runs with client-level DP at the server, whose account must continue across the resume.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    from common.privacy import Segment, epsilon
    from server.client_dp import ClientLevelAccount

    sites = private_sites  # this test's ledgers start empty
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
        ledger = ledger_of(sites / f"{site}.yaml")
        trained = [e for e in ledger["entries"] if e["status"] == "trained"]
        keys = [(e["run_id"], e["server_round"]) for e in trained]
        assert len(keys) == len(set(keys))  # each round of each run counted once
        assert {e["server_round"] for e in trained} == {1, 2, 3}  # every trained round is in the ledger
        # A round 2 cut off by the kill still counts (its update had left the site): never under-count.
        spent = epsilon([Segment(**e["segment"]) for e in trained], ledger["delta"], ledger["accountant"])
        assert trained[-1]["epsilon"] == pytest.approx(spent)
        assert [e["epsilon"] for e in trained] == sorted(e["epsilon"] for e in trained)
        assert trained[-1]["epsilon"] <= 8.0  # the policy's max_epsilon held across the kill
    # The release after the resume covers every spend the sites signed, the cut-off round's too.
    release = tmp_path / "release"
    assert CliRunner().invoke(app, ["release", str(out), "--out", str(release)]).exit_code == 0
    checked = CliRunner().invoke(app, ["verify", str(release), "--keys", str(out / "keys")])
    assert checked.exit_code == 0, checked.output
    for site in json.loads((release / "privacy.json").read_text())["sites"]:
        ledger = ledger_of(sites / f"{site['site_id']}.yaml")
        spent = [e["segment"] for e in ledger["entries"] if e["status"] in ("reserved", "trained")]
        assert site["segments"] == spent and site["entries"] == ledger["entries"]


def test_actors_finish_a_round_soonest_without_growing_with_the_sites() -> None:
    from simulation.engine import concurrent_actors

    # 3 sites on 2 cores: three at once (1.5 job-times per round) beats two then one (2).
    assert [concurrent_actors(n, 2) for n in (1, 2, 3, 4, 5, 20, 50)] == [1, 2, 3, 2, 2, 2, 2]
    assert concurrent_actors(3, 16) == 3 and concurrent_actors(100, 16) == 20  # 5 rounds of 20 at 1.25x, not 7 of 16


def test_ray_gives_each_concurrent_client_an_equal_gpu_share() -> None:
    from simulation.engine import backend_config

    cpu_only = backend_config(num_sites=2, cpus_per_client=1.0, gpus=0, cores=2)
    assert cpu_only == {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
    gpu = backend_config(num_sites=3, cpus_per_client=1.0, gpus=1, cores=16)
    assert gpu["client_resources"]["num_gpus"] == pytest.approx(1 / 3)  # 3 sites at once on one GPU
    assert gpu["init_args"] == {"num_cpus": 3, "num_gpus": 1}
