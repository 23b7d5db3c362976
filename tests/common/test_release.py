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


def account(site_id: str, accountant: str = "prv") -> SiteAccount:
    segments = [Segment(**s) for s in SEGMENTS]
    eps = epsilon(segments, 1e-5, accountant)
    return SiteAccount(site_id, 160, 1e-5, 1.0, SEGMENTS, accountant, eps, epsilon(segments, 1e-5, "rdp"))


@pytest.fixture(scope="module")
def pristine(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("release") / "release"
    save_ldm(load_ldm(tiny_base), out)
    (out / "README.md").write_text("# model card\n")
    base = {"name": "tiny-base", "sha256": directory_digest(tiny_base)}
    write_manifest(out, [account("hospital-a"), account("hospital-b", "rdp")], None, base)
    return out


@pytest.fixture
def release(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "release"
    shutil.copytree(pristine, copy)
    return copy


def edit_manifest(release: Path, change) -> None:
    manifest = json.loads((release / MANIFEST).read_text())
    change(manifest)
    (release / MANIFEST).write_text(json.dumps(manifest))


def failure(release: Path) -> str:
    with pytest.raises(ReleaseError) as info:
        verify_release(release)
    return str(info.value)


def test_a_fresh_release_verifies_and_lists_every_file(release: Path) -> None:
    checked = verify_release(release)
    manifest = json.loads((release / MANIFEST).read_text())
    assert set(manifest) == {
        "format_version",
        "privacy_unit",
        "sites",
        "client_level",
        "epsilon_max",
        "base_model",
        "files",
    }
    assert manifest["privacy_unit"] == "subject" and manifest["format_version"] == 1
    assert "unet/diffusion_pytorch_model.safetensors" in manifest["files"] and MANIFEST not in manifest["files"]
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in manifest["files"])  # safetensors only
    assert [s.site_id for s in checked.sites] == ["hospital-a", "hospital-b"]
    for site in checked.sites:  # PLD for the PRV claim, dp-accounting RDP for the RDP claim
        # Opacus's and dp-accounting's RDP differ by their grids of orders (0.01 % here).
        assert site.recomputed * (1 - 1e-3) <= site.claimed <= 1.05 * site.recomputed


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


@pytest.mark.parametrize(("factor", "cause"), [(0.7, "is BELOW the recomputed"), (1.2, "more than 5% above")])
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
        ("noise_multiplier", 2.5, "more than 5% above"),  # more noise than really used: the claim is inflated
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
        (lambda m: m["sites"][0].__setitem__("epsilon", "7.4"), r"sites\[0\].epsilon: not a number"),
        (lambda m: m["sites"][0]["segments"][0].__setitem__("sample_rate", 1.5), "values out of range"),
        (lambda m: m.__setitem__("epsilon_max", 0.1), "epsilon_max 0.1 is not the largest site ε"),
    ],
)
def test_a_malformed_manifest_fails(release: Path, change, cause: str) -> None:
    edit_manifest(release, change)
    with pytest.raises(ReleaseError, match=cause):
        verify_release(release)


def test_a_manifest_that_is_not_json_fails(release: Path) -> None:
    (release / MANIFEST).write_text("{not json")
    assert "privacy.json is not valid JSON" in failure(release)


def test_the_cli_exit_codes_and_table(release: Path) -> None:
    ok = CliRunner().invoke(app, ["verify", str(release)])
    assert ok.exit_code == 0, ok.output
    assert "hospital-a" in ok.output and "verified" in ok.output
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
