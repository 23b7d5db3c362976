"""fedmri's five top-level packages must come from one installation: a stranger of the same name
(another distribution's `client` or `common`) is named at import, not run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize(("stranger", "imported"), [("client", "common"), ("simulation", "sites"), ("common", "sites")])
def test_a_package_of_another_distribution_is_named_at_import(tmp_path: Path, stranger: str, imported: str) -> None:
    (tmp_path / "other" / stranger).mkdir(parents=True)
    (tmp_path / "other" / stranger / "__init__.py").write_text("")
    shadowed = subprocess.run(
        [sys.executable, "-c", f"import {imported}"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "other"), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert shadowed.returncode != 0
    assert "ImportError" in shadowed.stderr and str(tmp_path / "other" / stranger) in shadowed.stderr
    assert "is not fedmri's" in shadowed.stderr or "must come from one installation" in shadowed.stderr
    alone = subprocess.run([sys.executable, "-c", f"import {imported}"], cwd=tmp_path, capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr  # the same import, without the stranger
