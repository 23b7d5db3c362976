"""Named sets of hospitals: the demo federation and the simulation scenarios."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import yaml

from sites.config import SiteConfig, site_from_dict

HOSPITALS_DIR = Path(__file__).parent / "hospitals"


@dataclass(frozen=True)
class Scenario:
    """Hospitals that federate, and the public sites used only to pretrain the base model."""

    name: str
    description: str
    hospitals: list[SiteConfig]
    public: list[SiteConfig]

    @property
    def all_sites(self) -> list[SiteConfig]:
        return [*self.hospitals, *self.public]


def _yaml(path: Path) -> dict:
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict), path
    return raw


def _public() -> list[SiteConfig]:
    paths = sorted((HOSPITALS_DIR / "public").glob("*.yaml"))
    return [site_from_dict(_yaml(p), source=str(p)) for p in paths]


def reference_sites() -> list[SiteConfig]:
    """Public labelled sets (every contrast and pathology at 0.3, 1.5 and 3 T) that train the evaluator only."""
    paths = sorted((HOSPITALS_DIR / "reference").glob("*.yaml"))
    return [site_from_dict(_yaml(p), source=str(p)) for p in paths]


def _variant(template: str, site_id: str, seed: int, privacy: dict | None = None, **synthetic: object) -> SiteConfig:
    """A demo hospital YAML with a new id, seed, overridden `synthetic` fields and privacy policy fields."""
    raw = copy.deepcopy(_yaml(HOSPITALS_DIR / "demo" / f"{template}.yaml"))
    raw["site_id"] = site_id
    raw["privacy"] = {**raw.get("privacy", {}), **(privacy or {})}
    raw["data"] = {**raw["data"], "bids_root": f"./{site_id}", "cache_dir": f"./.fedmri-cache/{site_id}"}
    raw["synthetic"] = {**raw["synthetic"], "seed": seed, **synthetic}
    return site_from_dict(raw, source=f"scenario variant of {template}.yaml")


def _demo() -> Scenario:
    paths = sorted((HOSPITALS_DIR / "demo").glob("*.yaml"))
    hospitals = [site_from_dict(_yaml(p), source=str(p)) for p in paths]
    return Scenario("demo", "A: 3 T glioma, B: 1.5 T MS and dementia, C: 0.3 T healthy", hospitals, _public())


def _tiny() -> Scenario:
    """Two 4-subject sites at coarse resolution: for tests and quick trials."""
    coarse = {
        "in_plane_mm": 3.0,
        "slice_thickness_mm": 8.0,
        "snr_at_1p5t_1mm3": 3.0,
        "bias_field": 0.2,
        "intensity_scale": 1000,
        "orientation": "LPS",
    }
    # 4 subjects leave at most one held out: these test sites' own policies accept a cohort of one.
    tiny = {"min_eval_subjects": 1}
    a = _variant(
        "hospital-a", "tiny-a", 11, tiny, num_subjects=4, pathology_mix={"healthy": 0.5, "glioma": 0.5}, scanner=coarse
    )
    b = _variant("hospital-c", "tiny-b", 12, tiny, num_subjects=4, scanner={**coarse, "orientation": "RAS"})
    public = _variant("hospital-b", "tiny-public", 13, num_subjects=4, pathology_mix={"healthy": 1.0}, scanner=coarse)
    return Scenario("tiny", "two 4-subject sites at 3 mm, for tests", [a, b], [public])


def _iid() -> Scenario:
    mix = {"healthy": 0.4, "ms": 0.3, "dementia": 0.3}
    sites = [_variant("hospital-b", f"iid-{i}", 400 + i, pathology_mix=mix, num_subjects=100) for i in range(3)]
    return Scenario("iid", "three 1.5 T sites drawn from one distribution", sites, _public())


def _modality_skew() -> Scenario:
    sets = [["T1w", "PDw"], ["T2w", "FLAIR"], ["T1w", "FLAIR"]]
    sites = [
        _variant("hospital-b", f"modskew-{i}", 500 + i, modalities=m, num_subjects=100) for i, m in enumerate(sets)
    ]
    return Scenario("modality-skew", "1.5 T sites that each acquire different contrasts", sites, _public())


def _field_skew() -> Scenario:
    sites = [
        _variant("hospital-c", "fieldskew-0p3t", 600, num_subjects=100),
        _variant(
            "hospital-b",
            "fieldskew-1p5t",
            601,
            modalities=["T1w", "T2w", "FLAIR"],
            pathology_mix={"healthy": 1.0},
            num_subjects=100,
        ),
        _variant(
            "hospital-a",
            "fieldskew-3t",
            602,
            modalities=["T1w", "T2w", "FLAIR"],
            pathology_mix={"healthy": 1.0},
            num_subjects=100,
        ),
    ]
    return Scenario("field-skew", "healthy T1w/T2w/FLAIR at 0.3 T, 1.5 T and 3 T", sites, _public())


def _many_small() -> Scenario:
    coarse = {
        "in_plane_mm": 2.5,
        "slice_thickness_mm": 6.0,
        "snr_at_1p5t_1mm3": 3.0,
        "bias_field": 0.25,
        "intensity_scale": 800,
        "orientation": "RAS",
    }
    sites = [_variant("hospital-b", f"small-{i:02d}", 700 + i, num_subjects=12, scanner=coarse) for i in range(50)]
    return Scenario("many-small", "50 sites of 12 subjects each (scale tests)", sites, _public())


SCENARIOS = {
    "demo": _demo,
    "tiny": _tiny,
    "iid": _iid,
    "modality-skew": _modality_skew,
    "field-skew": _field_skew,
    "many-small": _many_small,
}


def create(name: str) -> Scenario:
    """The scenario called `name`; raises ValueError naming the valid choices."""
    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of: {', '.join(SCENARIOS)}")
    return SCENARIOS[name]()
