"""A release verifies when untouched, and fails, naming the cause, on every kind of tampering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.model import load_ldm, save_ldm
from common.privacy import Segment, epsilon
from common.release import MANIFEST, ReleaseError, SiteAccount, directory_digest, verify_release, write_manifest
from simulation.cli import app

SEGMENTS = [{"sample_rate": 0.1, "noise_multiplier": 1.1, "steps": 40}, {"sample_rate": 0.1, "noise_multiplier": 1.3, "steps": 20}]  # fmt: skip


def signed_chain(site_id: str, home: Path, segments: list[dict]) -> list[dict]:
    """A real site ledger (client/ledger.py) with one reserved-then-trained round per segment."""
    from client.ledger import Ledger, LedgerEntry

    ledger = Ledger.open(home / "ledger.json", site_id, 160, 1e-5, 1.0, "prv", home)
    for server_round, s in enumerate(segments, 1):
        ledger.append(LedgerEntry(7, server_round, "reserved", Segment(**s), 0.0, 0.0, num_subjects=160))
        ledger.settle(f"{server_round:064x}")
        ledger.append(LedgerEntry(7, server_round, "evaluated", None, 0.0, 0.0, num_subjects=40))  # between spends
    return ledger.since("", otherwise=0)


def account(site_id: str, home: Path, accountant: str = "pld") -> SiteAccount:
    segments = [Segment(**s) for s in SEGMENTS]
    eps = epsilon(segments, 1e-5, accountant)
    entries = signed_chain(site_id, home, SEGMENTS)
    return SiteAccount(site_id, 160, 1e-5, 1.0, SEGMENTS, accountant, eps, epsilon(segments, 1e-5, "rdp"), entries)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The public keys a consortium holds: one per site, and its own (release-signing) one."""
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="module")
def pristine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory, keys: Path) -> Path:
    from server.release import consortium_key

    root = tmp_path_factory.mktemp("release")
    out = root / "release"
    save_ldm(load_ldm(tiny_base), out)
    (out / "README.md").write_text("# model card\n")
    base = {"name": "tiny-base", "sha256": directory_digest(tiny_base)}
    accounts = [account("hospital-a", root / "home-a"), account("hospital-b", root / "home-b", "rdp")]
    for site in ("a", "b"):
        shutil.copyfile(root / f"home-{site}" / "node.pub", keys / f"hospital-{site}.pub")
    write_manifest(out, accounts, None, base, None, consortium_key(keys / "consortium.key"))
    (keys / "consortium.key").unlink()  # the verifier holds public keys only
    return out


def resign_entry(entry: dict, **changes) -> dict:
    """The entry changed, its hash rewritten consistently (and signed by a key that is not the site's)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.signed_entries import BODY_KEYS, sign

    body = {k: entry[k] for k in BODY_KEYS} | changes
    return sign(body, ec.generate_private_key(ec.SECP384R1()))


def recompute_claims(m: dict) -> None:
    """Make the claimed ε and segments agree with (tampered) entries, as a careful forger would."""
    from common.signed_entries import spent_segments

    for site in m["sites"]:
        site["segments"] = spent_segments(site["entries"])
        segments = [Segment(**s) for s in site["segments"]]
        site["epsilon"] = epsilon(segments, site["delta"], site["accountant"])
        site["epsilon_rdp"] = epsilon(segments, site["delta"], "rdp")
    m["epsilon_max"] = max(s["epsilon"] for s in m["sites"])


@pytest.fixture
def release(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "release"
    shutil.copytree(pristine, copy)
    return copy


def edit_manifest(release: Path, change) -> None:
    manifest = json.loads((release / MANIFEST).read_text())
    change(manifest)
    (release / MANIFEST).write_text(json.dumps(manifest))


def failure(release: Path, keys: Path | None = None) -> str:
    with pytest.raises(ReleaseError) as info:
        verify_release(release, keys)
    return str(info.value)


def test_a_fresh_release_verifies_and_lists_every_file(release: Path, keys: Path) -> None:
    checked = verify_release(release, keys)
    assert checked.signatures_checked and [s.entries for s in checked.sites] == [4, 4]
    manifest = json.loads((release / MANIFEST).read_text())
    assert set(manifest) == {
        "format_version",
        "privacy_unit",
        "sites",
        "client_level",
        "epsilon_max",
        "base_model",
        "parent",
        "files",
    }
    assert manifest["privacy_unit"] == "subject" and manifest["format_version"] == 2
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"] and MANIFEST not in manifest["files"]
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in manifest["files"])  # safetensors only
    assert [s.site_id for s in checked.sites] == ["hospital-a", "hospital-b"]
    for site in checked.sites:  # PLD for the PRV claim, dp-accounting RDP for the RDP claim
        # Opacus's and dp-accounting's RDP differ by their grids of orders (0.01 % here).
        assert site.recomputed * (1 - 1e-3) <= site.claimed <= site.recomputed * (1 + 1e-3)


def test_diffusers_loads_every_component(release: Path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from common.conditioning import ConditionEncoder

    AutoencoderKL.from_pretrained(release, subfolder="vae")
    UNet2DConditionModel.from_pretrained(release, subfolder="unet")
    ConditionEncoder.from_pretrained(release, subfolder="condition_encoder")


@pytest.mark.parametrize(
    "name",
    ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
     "condition_encoder/diffusion_pytorch_model.safetensors"],
)  # fmt: skip
def test_a_flipped_byte_in_a_weight_file_fails(release: Path, name: str) -> None:
    path = release / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert f"changed file (sha256 mismatch): {name}" in failure(release)


def test_a_removed_file_fails(release: Path) -> None:
    (release / "vae" / "config.json").unlink()
    assert "missing file: vae/config.json" in failure(release)


def test_an_added_file_fails(release: Path) -> None:
    (release / "unet" / "extra.safetensors").write_bytes(b"0")
    assert "extra file not in the manifest: unet/extra.safetensors" in failure(release)


@pytest.mark.parametrize(
    ("factor", "cause"),
    [(0.7, "is BELOW the recomputed"), (1.2, "more than 0.1% above"), (1.002, "more than 0.1% above")],
)
def test_an_edited_epsilon_fails(release: Path, factor: float, cause: str) -> None:
    def change(m: dict) -> None:
        m["sites"][0]["epsilon"] *= factor
        m["epsilon_max"] = max(s["epsilon"] for s in m["sites"])

    edit_manifest(release, change)
    message = failure(release)
    assert "site hospital-a: claimed ε" in message and cause in message


@pytest.mark.parametrize(
    ("key", "value", "cause"),
    [
        ("noise_multiplier", 0.7, "is BELOW the recomputed"),  # less noise: more ε than claimed
        ("noise_multiplier", 2.5, "more than 0.1% above"),  # more noise than really used: the claim is inflated
        ("steps", 400, "is BELOW the recomputed"),
        ("sample_rate", 0.3, "is BELOW the recomputed"),
    ],
)
def test_an_edited_segment_fails(release: Path, key: str, value: float, cause: str) -> None:
    edit_manifest(release, lambda m: m["sites"][1]["segments"][0].__setitem__(key, value))
    message = failure(release)
    assert "site hospital-b: claimed ε" in message and cause in message


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        (lambda m: m.pop("files"), "missing key 'files'"),
        (lambda m: m.__setitem__("privacy_unit", "slice"), "privacy_unit 'slice'"),
        (lambda m: m["sites"][0].pop("delta"), r"sites\[0\]: keys must be exactly"),
        (lambda m: m["sites"][0].__setitem__("epsilon", "7.4"), r"site hospital-a: epsilon is not a number"),
        (lambda m: m["sites"][0]["segments"][0].__setitem__("sample_rate", 1.5), "values out of range"),
        (lambda m: m.__setitem__("epsilon_max", 0.1), "epsilon_max 0.1 is not the largest site ε"),
    ],
)
def test_a_malformed_manifest_fails(release: Path, change, cause: str) -> None:
    edit_manifest(release, change)
    with pytest.raises(ReleaseError, match=cause):
        verify_release(release)


def test_swapped_weights_with_rewritten_hashes_fail_on_the_consortium_signature(release: Path, keys: Path) -> None:
    from common.atomic import sha256_file

    unet = release / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[len(data) // 2] ^= 0x01  # other weights
    unet.write_bytes(bytes(data))
    edit_manifest(release, lambda m: m["files"].__setitem__(unet.relative_to(release).as_posix(), sha256_file(unet)))
    verify_release(release)  # without keys, a consistent rewrite is undetectable: hence --keys
    assert "privacy.sig: the consortium's signature over privacy.json does not verify" in failure(release, keys)


def test_a_raised_sigma_with_a_matching_epsilon_fails_on_the_site_signature(release: Path, keys: Path) -> None:
    def change(m: dict) -> None:
        entries = m["sites"][0]["entries"]
        spend = next(i for i, e in enumerate(entries) if e["status"] == "trained")
        entries[spend] = resign_entry(entries[spend], segment={**entries[spend]["segment"], "noise_multiplier": 6.0})
        for i in range(spend + 1, len(entries)):  # re-chain everything after it, consistently
            entries[i] = resign_entry(entries[i], prev=entries[i - 1]["hash"])
        recompute_claims(m)

    edit_manifest(release, change)
    assert "site hospital-a: signed ledger entry 0: signature does not verify" in failure(release, keys)


def test_a_removed_segment_breaks_the_chain(release: Path, keys: Path) -> None:
    def change(m: dict) -> None:
        entries = m["sites"][1]["entries"]
        assert entries[2]["status"] == "trained" and entries[2]["server_round"] == 2
        del entries[2]  # round 2's spend
        recompute_claims(m)

    edit_manifest(release, change)
    message = failure(release)  # a chain check: no key needed
    assert "site hospital-b: signed ledger entry 2: chain broken" in message


def test_claimed_segments_must_be_exactly_the_signed_ones(release: Path) -> None:
    def change(m: dict) -> None:
        m["sites"][0]["segments"] = m["sites"][0]["segments"][:1]  # one round fewer on paper
        segments = [Segment(**s) for s in m["sites"][0]["segments"]]
        m["sites"][0]["epsilon"] = epsilon(segments, 1e-5, "prv")
        m["sites"][0]["epsilon_rdp"] = epsilon(segments, 1e-5, "rdp")
        m["epsilon_max"] = max(s["epsilon"] for s in m["sites"])

    edit_manifest(release, change)
    assert "site hospital-a: the claimed segments (1) are not exactly the 2 the site signed" in failure(release)


def test_a_nan_epsilon_on_any_site_fails(release: Path) -> None:
    edit_manifest(release, lambda m: m["sites"][1].__setitem__("epsilon", float("nan")))
    assert "site hospital-b: epsilon is not a number (nan)" in failure(release)


def test_verify_needs_every_key_it_is_told_to_check(release: Path, keys: Path, tmp_path: Path) -> None:
    partial = tmp_path / "keys"
    shutil.copytree(keys, partial)
    (partial / "hospital-b.pub").unlink()
    message = failure(release, partial)
    assert f"site hospital-b: no public key {partial / 'hospital-b.pub'}" in message
    (partial / "hospital-b.pub").write_bytes((keys / "hospital-a.pub").read_bytes())  # the wrong site's key
    assert "site hospital-b: signed ledger entry 0: signature does not verify" in failure(release, partial)


def test_a_manifest_that_is_not_json_fails(release: Path) -> None:
    (release / MANIFEST).write_text("{not json")
    assert "privacy.json is not valid JSON" in failure(release)


def test_the_cli_exit_codes_and_table(release: Path, keys: Path) -> None:
    ok = CliRunner().invoke(app, ["verify", str(release)])
    assert ok.exit_code == 0, ok.output
    assert "hospital-a" in ok.output and "verified" in ok.output and "signatures NOT checked" in ok.output
    signed = CliRunner().invoke(app, ["verify", str(release), "--keys", str(keys)])
    assert signed.exit_code == 0 and "every ledger entry and privacy.json verify" in signed.output
    (release / "README.md").write_text("edited\n")
    bad = CliRunner().invoke(app, ["verify", str(release)])
    assert bad.exit_code == 1 and "changed file (sha256 mismatch): README.md" in bad.output


def test_generate_verifies_a_release_first(release: Path, tmp_path: Path) -> None:
    args = ["generate", "--model", str(release), "--prompt", "T2w 1.5T", "-n", "1", "--steps", "2", "--out"]
    ok = CliRunner().invoke(app, [*args, str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "verified" in ok.output and (tmp_path / "ok" / "samples.nii.gz").exists()
    edit_manifest(release, lambda m: m["sites"][0].__setitem__("epsilon", 0.5))
    refused = CliRunner().invoke(app, [*args, str(tmp_path / "refused")])
    assert refused.exit_code == 1 and "refusing to load an unverified release" in refused.output
    assert not (tmp_path / "refused").exists()
    skipped = CliRunner().invoke(app, [*args, str(tmp_path / "skipped"), "--skip-verify"])
    assert skipped.exit_code == 0 and "WITHOUT checking" in skipped.output
