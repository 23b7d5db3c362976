"""Free-text prompts: synonyms, partial prompts, and errors that list the vocabulary."""

from __future__ import annotations

import pytest

from common.conditions import Conditions, Modality, Pathology
from common.prompts import describe, parse_prompt

CASES = {
    "axial FLAIR at 0.3T with a glioblastoma": Conditions(Modality.FLAIR, Pathology.glioma, 0.3),
    "T2-weighted, 3 tesla": Conditions(Modality.T2w, None, 3.0),
    "fluid-attenuated inversion recovery": Conditions(Modality.FLAIR),
    "contrast-enhanced T1 with GBM": Conditions(Modality.T1ce, Pathology.glioma),
    "multiple sclerosis, T2w": Conditions(Modality.T2w, Pathology.ms),
    "Alzheimer's PD-weighted 1.5T": Conditions(Modality.PDw, Pathology.dementia, 1.5),
    "T1w TR 2000 ms TE 15 ms": Conditions(Modality.T1w, repetition_time=2.0, echo_time=0.015),
    "FLAIR TI 2.5 s": Conditions(Modality.FLAIR, inversion_time=2.5),
    "glioma at 0.3T": Conditions(None, Pathology.glioma, 0.3),
    "FLAIR": Conditions(Modality.FLAIR),
    "low-field healthy T1": Conditions(Modality.T1w, Pathology.healthy, 0.3),
}


@pytest.mark.parametrize("text", list(CASES))
def test_synonyms(text: str) -> None:
    assert parse_prompt(text) == CASES[text]


@pytest.mark.parametrize("text", list(CASES))
def test_describe_round_trips(text: str) -> None:
    conditions = parse_prompt(text)
    assert parse_prompt(describe(conditions)) == conditions


def test_unknown_words_list_the_vocabulary() -> None:
    with pytest.raises(
        ValueError, match=r"unknown words \['banana'\]. Vocabulary: modalities: .*flair.*pathologies: .*glioblastoma"
    ):
        parse_prompt("FLAIR with a banana")


def test_contradictions_and_missing_units_are_errors() -> None:
    with pytest.raises(ValueError, match="two values for modality"):
        parse_prompt("T1w and T2w")
    with pytest.raises(ValueError, match="give a unit for TR 2000"):
        parse_prompt("T1w TR 2000")
