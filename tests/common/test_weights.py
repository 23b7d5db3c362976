"""The shipped base is found in a Flower App bundle (code + JSON only) only by its sha256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from common import weights


def fab_copy(tmp_path: Path) -> Path:
    """What `flwr run` unpacks: the base's JSON files, no weights."""
    fab = tmp_path / "fab" / "common" / "weights" / weights.NAME
    for path in weights.BASE_MODEL.rglob("*.json"):
        target = fab / path.relative_to(weights.BASE_MODEL)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return fab


def test_the_weights_beside_the_code_are_used(tmp_path: Path) -> None:
    assert weights.base_model_dir() == weights.BASE_MODEL


def test_a_bundle_uses_the_installed_weights_that_match_its_provenance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fab = fab_copy(tmp_path)
    monkeypatch.setattr(weights, "BASE_MODEL", fab)
    assert weights.base_model_dir() == weights._installed_copy()
    assert (weights.base_model_dir() / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_a_bundle_whose_provenance_does_not_match_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fab = fab_copy(tmp_path)
    provenance = json.loads((fab / "provenance.json").read_text())
    provenance["files"]["unet/diffusion_pytorch_model.safetensors"] = "0" * 64
    (fab / "provenance.json").write_text(json.dumps(provenance))
    monkeypatch.setattr(weights, "BASE_MODEL", fab)
    with pytest.raises(FileNotFoundError, match="no installed fedmri holds files matching its sha256"):
        weights.base_model_dir()
