"""Free-text prompts -> Conditions, through a documented vocabulary of synonyms."""

from __future__ import annotations

import re

import torch

from common.conditions import CONDITION_VECTOR, Conditions, Modality, Pathology

# Phrase -> value. Matching is case-insensitive, longest phrase first, on whole words.
MODALITY_SYNONYMS: dict[str, Modality] = {
    "t1w": Modality.T1w, "t1-weighted": Modality.T1w, "t1 weighted": Modality.T1w, "t1": Modality.T1w,
    "t1ce": Modality.T1ce, "t1c": Modality.T1ce, "t1gd": Modality.T1ce, "contrast-enhanced t1": Modality.T1ce,
    "contrast enhanced t1": Modality.T1ce, "post-contrast t1": Modality.T1ce, "gadolinium-enhanced t1": Modality.T1ce,
    "t1 post-contrast": Modality.T1ce, "t1 with gadolinium": Modality.T1ce, "t1 with contrast": Modality.T1ce,
    "t2w": Modality.T2w, "t2-weighted": Modality.T2w, "t2 weighted": Modality.T2w, "t2": Modality.T2w,
    "flair": Modality.FLAIR, "t2 flair": Modality.FLAIR, "t2-flair": Modality.FLAIR,
    "fluid-attenuated inversion recovery": Modality.FLAIR, "fluid attenuated inversion recovery": Modality.FLAIR,
    "pdw": Modality.PDw, "pd-weighted": Modality.PDw, "pd weighted": Modality.PDw, "proton density": Modality.PDw,
    "proton-density": Modality.PDw, "pd": Modality.PDw,
}  # fmt: skip
PATHOLOGY_SYNONYMS: dict[str, Pathology] = {
    "healthy": Pathology.healthy, "normal": Pathology.healthy, "control": Pathology.healthy,
    "healthy control": Pathology.healthy, "no pathology": Pathology.healthy,
    "glioma": Pathology.glioma, "glioblastoma": Pathology.glioma, "gbm": Pathology.glioma,
    "brain tumor": Pathology.glioma, "brain tumour": Pathology.glioma, "tumor": Pathology.glioma,
    "tumour": Pathology.glioma, "astrocytoma": Pathology.glioma, "high-grade glioma": Pathology.glioma,
    "ms": Pathology.ms, "multiple sclerosis": Pathology.ms, "ms lesions": Pathology.ms,
    "demyelinating lesions": Pathology.ms,
    "dementia": Pathology.dementia, "alzheimer's": Pathology.dementia, "alzheimers": Pathology.dementia,
    "alzheimer": Pathology.dementia, "alzheimer's disease": Pathology.dementia, "ad": Pathology.dementia,
    "neurodegeneration": Pathology.dementia,
}  # fmt: skip
FIELD_SYNONYMS = {"low-field": 0.3, "low field": 0.3, "ultra-low-field": 0.064, "high-field": 3.0, "high field": 3.0}
# Words that carry no condition and are ignored.
FILLER = {
    "a", "an", "the", "of", "with", "at", "and", "in", "on", "from", "showing", "shows", "axial", "slice",
    "image", "scan", "mri", "mr", "brain", "head", "patient", "subject", "weighted", "sequence", "acquired",
    "magnetic", "resonance", "imaging", "field", "strength", "scanner", "by", "for", "having", "has",
}  # fmt: skip
_FIELD = re.compile(r"\b(\d+(?:\.\d+)?)\s*(t|tesla)\b")
_TIMING = re.compile(r"\b(tr|te|ti)\s*(?:=|:)?\s*(\d+(?:\.\d+)?)\s*(ms|s)?\b")
_SLICE = re.compile(r"\bslice\s+position\s*(?:=|:)?\s*(0(?:\.\d+)?|1(?:\.0+)?)\b")


def vocabulary() -> str:
    """The whole vocabulary, for error messages and --help."""
    return (
        f"modalities: {', '.join(sorted(MODALITY_SYNONYMS))}; "
        f"pathologies: {', '.join(sorted(PATHOLOGY_SYNONYMS))}; "
        f"field: '<number> T', '<number> tesla', {', '.join(FIELD_SYNONYMS)}; "
        "timing: 'TR <n> ms|s', 'TE <n> ms|s', 'TI <n> ms|s'; 'slice position <0-1>'"
    )


def parse_prompt(text: str) -> Conditions:
    """Parse a prompt such as "axial FLAIR at 0.3T with a glioblastoma" into Conditions.

    Attributes the prompt does not mention stay None (unknown). Raises ValueError for words
    outside the vocabulary, for contradictory attributes and for times without a unit.
    """
    rest = " " + text.lower().replace(",", " ").replace(";", " ") + " "
    found: dict[str, object] = {}

    def take(name: str, value: object, phrase: str) -> None:
        if name in found and found[name] != value:
            raise ValueError(
                f"prompt {text!r} gives two values for {name} ({found[name]} and {value}, from {phrase!r})"
            )
        found[name] = value

    for match in list(_TIMING.finditer(rest)):
        key, number, unit = match.groups()
        if unit is None:
            raise ValueError(f"prompt {text!r}: give a unit for {key.upper()} {number} (ms or s)")
        seconds = float(number) / (1000.0 if unit == "ms" else 1.0)
        take({"tr": "repetition_time", "te": "echo_time", "ti": "inversion_time"}[key], seconds, match.group(0))
    rest = _TIMING.sub(" ", rest)
    for match in _FIELD.finditer(rest):
        take("field_strength", float(match.group(1)), match.group(0))
    rest = _FIELD.sub(" ", rest)
    for match in _SLICE.finditer(rest):
        take("slice_position", float(match.group(1)), match.group(0))
    rest = _SLICE.sub(" ", rest)

    tables: list[tuple[str, dict]] = [
        ("modality", MODALITY_SYNONYMS),
        ("pathology", PATHOLOGY_SYNONYMS),
        ("field_strength", FIELD_SYNONYMS),
    ]
    phrases = sorted(((p, name, table[p]) for name, table in tables for p in table), key=lambda x: -len(x[0]))
    for phrase, name, value in phrases:
        pattern = re.compile(r"(?<![\w'-])" + re.escape(phrase) + r"(?![\w'-])")
        if pattern.search(rest):
            take(name, value, phrase)
            rest = pattern.sub(" ", rest)

    leftover = [w for w in re.findall(r"[\w'.-]+", rest) if w not in FILLER]
    if leftover:
        raise ValueError(f"prompt {text!r}: unknown words {leftover}. Vocabulary: {vocabulary()}")
    return Conditions(**found)  # type: ignore[arg-type]


def conditions_to_vector(conditions: Conditions) -> torch.Tensor:
    """Conditions -> [7] float tensor laid out as CONDITION_VECTOR (NaN = unknown)."""
    values = []
    for name in CONDITION_VECTOR:
        value = getattr(conditions, name)
        if isinstance(value, Modality | Pathology):
            value = value.ordinal
        values.append(float("nan") if value is None else float(value))
    return torch.tensor(values, dtype=torch.float32)


def describe(conditions: Conditions) -> str:
    """A canonical prompt for Conditions (used by the text-model condition mode and in logs)."""
    parts = []
    if conditions.modality is not None:
        parts.append(f"axial {conditions.modality.value}")
    if conditions.field_strength is not None:
        parts.append(f"at {conditions.field_strength:g}T")
    if conditions.pathology is not None:
        parts.append(
            f"with {conditions.pathology.value}" if conditions.pathology is not Pathology.healthy else "healthy"
        )
    for key, name in (("TR", "repetition_time"), ("TE", "echo_time"), ("TI", "inversion_time")):
        value = getattr(conditions, name)
        if value is not None:
            parts.append(f"{key} {value * 1000:g} ms")
    if conditions.slice_position is not None:
        parts.append(f"slice position {conditions.slice_position:.2f}")
    return " ".join(parts) if parts else "brain MRI"
