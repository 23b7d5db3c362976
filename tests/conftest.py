"""Shared fixtures: the `tiny` scenario's synthetic sites, made once per test session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Site homes that a YAML does not name go under $FEDMRI_HOME: never the developer's ~/.fedmri.
# Set at import, so that every subprocess a test starts (Flower, Ray, the CLI) inherits it.
os.environ["FEDMRI_HOME"] = tempfile.mkdtemp(prefix="fedmri-home-")
if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh: two workers on two cores, one torch thread each
    import torch

    torch.set_num_threads(1)

from sites import scenarios
from sites.cli import make_scenario_sites


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `--dist loadgroup` (scripts/test.sh) the `slow` tests, which start real processes
    (Flower, Ray, fresh Pythons), all run on one worker, one after another, while the other worker
    takes the in-process tests. Two real-process tests side by side would each run at half speed."""
    for item in items:
        if item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.xdist_group("real-processes"))


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding tiny-a (3 T, glioma), tiny-b (0.3 T) and tiny-public, as BIDS + YAML."""
    out = tmp_path_factory.mktemp("tiny-sites")
    make_scenario_sites(scenarios.create("tiny").all_sites, out, workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, tiny_sites: Path) -> Path:
    """A tiny base LDM (64x64 input, ~0.1M-parameter UNet) pretrained for a few steps on tiny-public."""
    import numpy as np

    from common.conditions import CONDITION_VECTOR
    from common.model import ModelSpec
    from common.pretrain import PretrainConfig, pretrain, slice_table
    from sites.bids import read_site

    data = read_site(tiny_sites / "tiny-public", image_size=64)
    conditions = np.stack([getattr(data, name) for name in CONDITION_VECTOR], 1)
    out = tmp_path_factory.mktemp("tiny-base")
    spec = ModelSpec(
        vae_channels=(8, 8, 8), unet_channels=(16, 32), condition_dim=16, attention_head_dim=8, norm_groups=8
    )
    cfg = PretrainConfig(vae_steps=5, unet_steps=5, batch_size=4)
    pretrain(slice_table(data.images, conditions), out, cfg, spec=spec, command="tests/conftest.py tiny_base")
    return out


def _widened_base(tiny_base: Path, out: Path, add_branch) -> Path:
    """The tiny base with a branch (common/branches.py) whose input weights are not zero, so its
    inputs change the images."""
    import torch

    from common.model import load_ldm, save_ldm

    ldm = load_ldm(tiny_base)
    add_branch(ldm.denoiser.unet)
    with torch.no_grad():
        ldm.denoiser.unet.conv_in.weight[:, 4:].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    save_ldm(ldm, out)
    return out


@pytest.fixture(scope="session")
def masked_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with a mask branch whose weights are not zero, so masks change the images."""
    from common.mask_branch import add_mask_branch

    return _widened_base(tiny_base, tmp_path_factory.mktemp("masked-base"), add_mask_branch)


@pytest.fixture(scope="session")
def source_base(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny base with a source branch whose weights are not zero, so sources change the images."""
    from common.source_branch import add_source_branch

    return _widened_base(tiny_base, tmp_path_factory.mktemp("source-base"), add_source_branch)


@pytest.fixture
def private_sites(tiny_sites: Path, tmp_path: Path) -> Path:
    """Copies of tiny-a and tiny-b with their own site homes: fresh ledgers, keys and markers."""
    import shutil

    import yaml

    sites = tmp_path / "sites"
    for name in ("tiny-a", "tiny-b"):
        shutil.copytree(tiny_sites / name, sites / name)
        raw = yaml.safe_load((tiny_sites / f"{name}.yaml").read_text())
        raw["home"] = str(sites / ".fedmri-home" / name)
        (sites / f"{name}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return sites


def _ledger_of(yaml_path: Path) -> dict:
    import json

    from sites.config import load_site

    return json.loads(load_site(yaml_path).ledger_path.read_text())


@pytest.fixture(scope="session")
def ledger_of():
    """ledger_of(site_yaml): the site's ledger file, parsed, from where its YAML says it is."""
    return _ledger_of
