"""The shipped base model: small, reproducible provenance, and physically plausible contrast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.atomic import sha256_file
from common.conditions import Conditions, Modality
from common.model import load_ldm
from common.prompts import conditions_to_vector
from common.sampling import sample
from common.weights import base_model_dir

SAMPLES = 8


@pytest.fixture(scope="module")
def samples() -> dict[Modality, np.ndarray]:
    """Per modality, [8, 64, 64] samples in one batch: the same starting noise and slice position
    across modalities (seed 0 draws the batch's noise)."""
    ldm = load_ldm(base_model_dir())
    out = {}
    for modality in (Modality.T1w, Modality.T2w, Modality.FLAIR):
        c = conditions_to_vector(Conditions(modality=modality, field_strength=1.5, slice_position=0.55))
        out[modality] = sample(ldm, c[None].repeat(SAMPLES, 1), steps=25, guidance_scale=3.0, seed=0)[:, 0].numpy()
    return out


def test_base_is_small_and_matches_its_provenance() -> None:
    folder = base_model_dir()
    provenance = json.loads((folder / "provenance.json").read_text())
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != "provenance.json"]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert {str(p.relative_to(folder)) for p in files} == set(provenance["files"])
    for name, digest in provenance["files"].items():
        assert sha256_file(folder / name) == digest, name
    assert provenance["command"].startswith("fedmri pretrain")


def _brain(*images: np.ndarray) -> np.ndarray:
    """Pixels that are tissue in every image (excludes air and the dark skull)."""
    return np.logical_and.reduce([im > 0.12 for im in images])


def test_t1w_dark_tissue_is_bright_on_t2w(samples: dict[Modality, np.ndarray]) -> None:
    # CSF is the darkest brain tissue on T1w and the brightest on T2w.
    agree = 0
    for t1, t2 in zip(samples[Modality.T1w], samples[Modality.T2w], strict=True):
        brain = _brain(t1, t2)
        dark_on_t1 = brain & (t1 <= np.percentile(t1[brain], 15))
        agree += t2[dark_on_t1].mean() > np.median(t2[brain])
    assert agree >= 6, f"only {agree}/8 sample pairs show T1w-dark tissue bright on T2w"


def test_t2w_bright_fluid_is_dark_on_flair(samples: dict[Modality, np.ndarray]) -> None:
    # FLAIR nulls CSF: the brightest T2w tissue is dark on FLAIR.
    agree = 0
    for t2, flair in zip(samples[Modality.T2w], samples[Modality.FLAIR], strict=True):
        brain = _brain(t2)
        bright_on_t2 = brain & (t2 >= np.percentile(t2[brain], 90))
        agree += flair[bright_on_t2].mean() < np.median(flair[brain])
    assert agree >= 6, f"only {agree}/8 sample pairs show T2w-bright fluid dark on FLAIR"


def test_generation_is_deterministic() -> None:
    ldm = load_ldm(base_model_dir())
    c = conditions_to_vector(Conditions(modality=Modality.T2w, field_strength=3.0))[None]
    assert torch.equal(sample(ldm, c, steps=5, seed=3), sample(ldm, c, steps=5, seed=3))
