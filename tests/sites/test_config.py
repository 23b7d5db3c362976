"""Site YAML: typed once at the edge, and every mistake named with its file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from common.conditions import Modality, Pathology
from sites import scenarios
from sites.config import SiteConfigError, load_site

DEMO_A = scenarios.HOSPITALS_DIR / "demo" / "hospital-a.yaml"


def _write(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load(DEMO_A.read_text())
    change(raw)
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_demo_hospital_loads_typed_with_absolute_data_path() -> None:
    site = load_site(DEMO_A)
    assert site.site_id == "hospital-a"
    assert site.synthetic is not None
    assert site.synthetic.modalities == [Modality.T1w, Modality.T1ce, Modality.T2w, Modality.FLAIR]
    assert site.synthetic.pathology_mix == {Pathology.healthy: 0.5, Pathology.glioma: 0.5}
    assert Path(site.data.bids_root).is_absolute()
    assert Path(site.data.bids_root) == DEMO_A.parent / "hospital-a"


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda raw: raw["synthetic"]["scanner"].update(slice_thicknes_mm=3))
    with pytest.raises(SiteConfigError, match=r"site\.yaml.*synthetic\.scanner\.slice_thicknes_mm"):
        load_site(path)


def test_unknown_modality_lists_valid_ones(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda raw: raw["synthetic"].update(modalities=["T1w", "SWI"]))
    with pytest.raises(SiteConfigError, match=r"synthetic\.modalities\[1\].*SWI.*T1w, T1ce, T2w, FLAIR, PDw"):
        load_site(path)


def test_semantic_error_names_file(tmp_path: Path) -> None:
    path = _write(tmp_path, lambda raw: raw["synthetic"]["sequences"]["T2w"].update(echo_time=9.0))
    with pytest.raises(SiteConfigError, match=r"site\.yaml.*echo_time < repetition_time"):
        load_site(path)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match="not found"):
        load_site(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("site_id: [unclosed")
    with pytest.raises(SiteConfigError, match=r"bad\.yaml: not valid YAML"):
        load_site(bad)


def test_every_scenario_builds() -> None:
    for name in scenarios.SCENARIOS:
        scenario = scenarios.create(name)
        assert scenario.hospitals, name
        assert len({s.site_id for s in scenario.all_sites}) == len(scenario.all_sites)
    assert len(scenarios.create("many-small").hospitals) >= 50
    with pytest.raises(ValueError, match="choose one of: demo"):
        scenarios.create("nope")


def test_device_defaults_to_cpu_and_an_unknown_one_names_the_file(tmp_path: Path) -> None:
    assert load_site(DEMO_A).device == "cpu"
    assert load_site(_write(tmp_path, lambda raw: raw.update(device="auto"))).device == "auto"
    with pytest.raises(SiteConfigError, match=r"site\.yaml: device must be one of auto, cpu, cuda, got 'gpu'"):
        load_site(_write(tmp_path, lambda raw: raw.update(device="gpu")))
