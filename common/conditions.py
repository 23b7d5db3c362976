"""The generation conditions: modality, pathology and the acquisition parameters of one slice."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Modality(str, Enum):
    """MR contrasts fedmri knows. The value is the BIDS suffix (T1ce is `ce-gadolinium_T1w`)."""

    T1w = "T1w"
    T1ce = "T1ce"
    T2w = "T2w"
    FLAIR = "FLAIR"
    PDw = "PDw"

    @property
    def ordinal(self) -> int:
        return list(Modality).index(self)


class Pathology(str, Enum):
    """Diagnoses fedmri knows. The value is the label written in participants.tsv."""

    healthy = "healthy"
    glioma = "glioma"
    ms = "ms"
    dementia = "dementia"

    @property
    def ordinal(self) -> int:
        return list(Pathology).index(self)


def parse_modality(text: str) -> Modality:
    """Return the Modality whose name is `text`; raise ValueError listing the valid names."""
    try:
        return Modality(text)
    except ValueError:
        valid = ", ".join(m.value for m in Modality)
        raise ValueError(f"unknown modality {text!r}; valid modalities: {valid}") from None


def parse_pathology(text: str) -> Pathology:
    """Return the Pathology labelled `text`; raise ValueError listing the valid labels."""
    try:
        return Pathology(text)
    except ValueError:
        valid = ", ".join(p.value for p in Pathology)
        raise ValueError(f"unknown pathology {text!r}; valid labels: {valid}") from None


# Layout of the per-slice condition vector that datasets yield (NaN = unknown).
CONDITION_VECTOR = (
    "modality",  # Modality.ordinal
    "pathology",  # Pathology.ordinal
    "field_strength",  # tesla
    "repetition_time",  # s
    "echo_time",  # s
    "inversion_time",  # s
    "slice_position",  # 0-1
)


@dataclass(frozen=True)
class Conditions:
    """What one slice shows and how it was acquired. Times are in seconds (BIDS units).

    A field left as None is unknown (or dropped for classifier-free guidance).
    """

    modality: Modality | None = None
    pathology: Pathology | None = None
    field_strength: float | None = None  # tesla
    repetition_time: float | None = None  # s
    echo_time: float | None = None  # s
    inversion_time: float | None = None  # s
    slice_position: float | None = None  # 0 = lowest brain slice, 1 = top

    def __post_init__(self) -> None:
        for name in ("field_strength", "repetition_time", "echo_time", "inversion_time"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.slice_position is not None and not 0.0 <= self.slice_position <= 1.0:
            raise ValueError(f"slice_position must lie in [0, 1], got {self.slice_position!r}")
