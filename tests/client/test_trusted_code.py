"""The site's code check (client/trusted_code.py) on bundles built here; no Flower process."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from client.trusted_code import UntrustedBundleError, check_bundle, guard, installed_root

PYPROJECT = """[project]
name = "fedmri"
version = "0.1.0"

[tool.flwr.app]
publisher = "fedmri"

[tool.flwr.app.components]
clientapp = "client.app:app"

[tool.flwr.federations]
default = "local"
"""
# What Flower puts in the bundle: the same TOML, rewritten, without [tool.flwr.federations].
BUNDLED_PYPROJECT = PYPROJECT.split("\n\n[tool.flwr.federations]")[0] + "\n"
FILES = {
    "client/__init__.py": "",
    "client/policy.py": "MIN_NOISE_MULTIPLIER = 0.5\n",
    "client/trainer.py": "def noise(sigma):\n    return sigma\n",
    "common/weights/fedmri-base-v1/unet/config.json": '{"layers": 2}\n',
    "sites/hospitals/demo/hospital-a.yaml": "site_id: hospital-a\n",
    "tests/conftest.py": "",
    "README.md": "# fedmri\n",
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An installed fedmri: the files above, a test and a bytecode cache Flower never bundles."""
    root = tmp_path / "installed"
    for name, text in {**FILES, "pyproject.toml": PYPROJECT, "client/test_local.py": "",
                       "client/__pycache__/policy.py": ""}.items():  # fmt: skip
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def bundle(changes: dict[str, str | None] | None = None, extra: list[tuple[str, str]] | None = None) -> bytes:
    """A FAB as `flwr run` builds it from FILES, with some files changed (None: left out)."""
    files: dict[str, str | None] = {"pyproject.toml": BUNDLED_PYPROJECT, **FILES, **(changes or {})}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in [*files.items(), *(extra or [])]:
            if text is not None:
                archive.writestr(name, text)
        archive.writestr(".info/CONTENT", "pyproject.toml,0,0")  # Flower's manifest: not compared
    return buffer.getvalue()


def test_the_same_code_passes(root: Path) -> None:
    assert check_bundle(bundle(), root) == []
    assert check_bundle(bundle({"README.md": "# edited by the server\n"}), root) == []  # never read


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"client/trainer.py": "def noise(sigma):\n    return 0.0\n"},
            "client/trainer.py: differs from the installed file",
        ),
        ({"client/policy.py": "MIN_NOISE_MULTIPLIER = 0.0\n"}, "client/policy.py: differs from the installed file"),
        ({"client/policy.py": None}, "client/policy.py: installed here, missing from the bundle"),
        ({"client/leak.py": "SEND = 'images'\n"}, "client/leak.py: not in the fedmri installed here"),
        ({"opacus.py": "x = 1\n"}, "opacus.py: not in the fedmri installed here"),  # would shadow a library
        ({"client/native.so": "ELF"}, "client/native.so: not in the fedmri installed here"),
        ({"sites/hospitals/demo/hospital-a.yaml": "site_id: other\n"}, "sites/hospitals/demo/hospital-a.yaml: differs"),
        ({"common/weights/fedmri-base-v1/unet/config.json": "{}"}, "common/weights/fedmri-base-v1/unet/config.json"),
        ({"pyproject.toml": BUNDLED_PYPROJECT.replace("client.app:app", "client.leak:app")}, "pyproject.toml: differs"),
        ({"pyproject.toml": None}, "pyproject.toml: missing from the bundle"),
        ({"../outside.py": ""}, "../outside.py: a path outside the app"),
    ],
)
def test_any_code_difference_is_named(root: Path, changes: dict[str, str | None], expected: str) -> None:
    differences = check_bundle(bundle(changes), root)
    assert len(differences) == 1 and differences[0].startswith(expected), differences


def test_a_file_twice_and_a_non_zip_are_refused(root: Path) -> None:
    with pytest.warns(UserWarning, match="Duplicate name"):  # zipfile warns, and writes both
        twice = bundle(extra=[("client/trainer.py", "def noise(sigma):\n    return 0.0\n")])
    assert "client/trainer.py: more than once in the bundle" in check_bundle(twice, root)
    assert check_bundle(b"not a zip", root) == ["the bundle is not a zip archive"]


def test_the_guard_refuses_before_install_and_loads_the_installed_app(root: Path) -> None:
    installed: list[bytes] = []
    loaded: list[dict[str, Any]] = []
    runtime: Any = SimpleNamespace(
        install_from_fab=lambda fab, skip_prompt: installed.append(fab),
        get_load_client_app_fn=lambda **kwargs: loaded.append(kwargs),
    )
    guard(runtime, root)
    with pytest.raises(UntrustedBundleError, match=r"refused this run.*client/trainer\.py: differs"):
        runtime.install_from_fab(bundle({"client/trainer.py": "def noise(sigma):\n    return 0.0\n"}), skip_prompt=True)
    assert installed == []  # nothing of the server's bundle was unpacked
    runtime.install_from_fab(bundle(), skip_prompt=True)
    assert len(installed) == 1
    runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    assert loaded == [{"default_app_ref": "", "app_path": str(root), "multi_app": True}]


def test_this_checkout_is_the_installed_root() -> None:
    assert (installed_root() / "client" / "trusted_code.py").is_file()
    assert (installed_root() / "pyproject.toml").is_file()
