"""client/round.py: what a site reads before it trains."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import yaml

from client.round import site_data


def test_a_lenient_site_logs_every_file_it_trains_without(
    tiny_sites: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = Path(shutil.copytree(tiny_sites / "tiny-b", tmp_path / "tiny-b"))
    bad = root / "sub-002" / "anat" / "sub-002_T2w.nii.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    raw = yaml.safe_load((tiny_sites / "tiny-b.yaml").read_text())
    raw["data"] |= {"bids_root": str(root), "strict": False, "cache_dir": str(tmp_path / "cache")}
    raw["home"] = str(tmp_path / "home")
    path = tmp_path / "tiny-b.yaml"
    path.write_text(yaml.safe_dump(raw))
    with caplog.at_level(logging.WARNING, logger="fedmri.client"):
        site, training, heldout = site_data(str(path))
    assert len(training.subjects) + len(heldout.subjects) == 4  # the rest of sub-002 is still read
    lines = [r.getMessage() for r in caplog.records if r.name == "fedmri.client"]
    assert len(lines) == 1 and lines[0].startswith(f"{site.site_id}: skipped {bad}: corrupt or truncated NIfTI file")
