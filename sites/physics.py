"""MR contrast physics: tissue relaxation by field strength and the signal equations.

Relaxation times are in seconds. Sources, per quantity:

* T1/T2 of white matter, grey matter and CSF at 1.5 T and 3 T: in-vivo values inside the
  ranges reported by Stanisz et al. 2005 (MRM 54:507, Table 1), Wansapura et al. 1999
  (JMRI 9:531) and the review of Bojorquez et al. 2017 (MRI 35:69).
* Field dependence of T1 below 1.5 T: the power law T1 = A * B0^beta of Bottomley et al.
  1984 (Med Phys 11:425), whose brain exponents are beta ~ 0.3-0.4. We draw the log-log line
  through the 1.5 T and 3 T anchors of each tissue, which gives beta ~ 0.35-0.4 for WM and GM.
* Proton density (water content): WM 0.70, GM 0.80, CSF 1.0 (Neeb et al. 2006, NeuroImage
  31:1156).
* Lesions: approximate values, chosen inside the ranges reported for peritumoural oedema,
  necrosis and enhancing tumour (e.g. Blystad et al. 2017, Acta Radiol 58:1139, synthetic
  MRI of gliomas) and MS plaques (longer T1/T2 than normal WM; e.g. Vrenken et al. 2006,
  Radiology 240:811). They are qualitative anchors, not fitted data.
* Gadolinium relaxivity r1 of gadobutrol in plasma at 37 C: 5.2 (1.5 T) and 5.0 (3 T)
  L/(mmol s) (Rohrer et al. 2005, Invest Radiol 40:715).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np


class Tissue(str, Enum):
    CSF = "csf"
    GM = "gm"
    WM = "wm"
    FAT = "fat"  # scalp and diploe
    BONE = "bone"  # cortical bone of the skull
    EDEMA = "edema"
    NECROSIS = "necrosis"
    ENHANCING = "enhancing"
    MS_LESION = "ms_lesion"


@dataclass(frozen=True)
class TissueProperties:
    """Proton density and relaxation anchors (s) at 1.5 T and 3 T."""

    proton_density: float
    t1_1p5: float
    t1_3: float
    t2_1p5: float
    t2_3: float


TISSUES: dict[Tissue, TissueProperties] = {
    Tissue.CSF: TissueProperties(1.00, 4.00, 4.20, 2.00, 1.80),
    Tissue.GM: TissueProperties(0.80, 1.10, 1.45, 0.095, 0.090),
    Tissue.WM: TissueProperties(0.70, 0.70, 0.90, 0.080, 0.072),
    Tissue.FAT: TissueProperties(0.90, 0.30, 0.38, 0.080, 0.070),
    Tissue.BONE: TissueProperties(0.05, 0.30, 0.30, 0.001, 0.001),
    Tissue.EDEMA: TissueProperties(0.88, 1.10, 1.40, 0.180, 0.170),
    Tissue.NECROSIS: TissueProperties(0.95, 2.60, 2.90, 0.400, 0.380),
    Tissue.ENHANCING: TissueProperties(0.86, 1.20, 1.55, 0.110, 0.105),
    Tissue.MS_LESION: TissueProperties(0.82, 1.00, 1.25, 0.150, 0.140),
}

# Gadolinium concentration (mmol/L) in enhancing tumour after a standard 0.1 mmol/kg dose.
ENHANCING_GD_MMOL = 0.35


def _power_law(value_1p5: float, value_3: float, field_strength: float) -> float:
    """Value on the log-log line through (1.5 T, value_1p5) and (3 T, value_3): A * B0^beta."""
    beta = math.log(value_3 / value_1p5) / math.log(2.0)
    return value_1p5 * (field_strength / 1.5) ** beta


def relaxation(tissue: Tissue, field_strength: float) -> tuple[float, float, float]:
    """(proton density, T1 [s], T2 [s]) of `tissue` at `field_strength` tesla."""
    p = TISSUES[tissue]
    t1 = _power_law(p.t1_1p5, p.t1_3, field_strength)
    t2 = _power_law(p.t2_1p5, p.t2_3, field_strength)
    return p.proton_density, t1, t2


def gadolinium_r1(field_strength: float) -> float:
    """Longitudinal relaxivity of gadobutrol, L/(mmol s); held at the 1.5 T value below 1.5 T."""
    return float(np.interp(field_strength, [1.5, 3.0], [5.2, 5.0]))


def gadolinium_t1(t1: float, concentration_mmol: float, field_strength: float) -> float:
    """T1 shortened by gadolinium: 1/T1' = 1/T1 + r1 * C (fast-exchange relaxivity model)."""
    return 1.0 / (1.0 / t1 + gadolinium_r1(field_strength) * concentration_mmol)


def spin_echo(pd: float, t1: float, t2: float, tr: float, te: float) -> float:
    """Spin-echo magnitude S = PD (1 - e^{-TR/T1}) e^{-TE/T2}, valid for TR >> TE.

    Standard SE signal equation (Haacke et al. 1999, Magnetic Resonance Imaging, ch. 8).
    """
    return pd * (1.0 - math.exp(-tr / t1)) * math.exp(-te / t2)


def inversion_recovery(pd: float, t1: float, t2: float, tr: float, te: float, ti: float) -> float:
    """Magnitude inversion-recovery spin echo S = PD |1 - 2 e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2}.

    (Haacke et al. 1999, ch. 8; Bernstein et al. 2004, Handbook of MRI Pulse Sequences, 14.2.)
    """
    return pd * abs(1.0 - 2.0 * math.exp(-ti / t1) + math.exp(-tr / t1)) * math.exp(-te / t2)


def null_inversion_time(t1: float, tr: float) -> float:
    """TI that nulls a tissue of longitudinal relaxation `t1`: TI = T1 ln(2 / (1 + e^{-TR/T1})).

    Used for FLAIR, with the CSF T1 of the site's field strength.
    """
    return t1 * math.log(2.0 / (1.0 + math.exp(-tr / t1)))


def flair_inversion_time(field_strength: float, tr: float) -> float:
    """The TI that nulls CSF at this field strength and TR."""
    _, t1_csf, _ = relaxation(Tissue.CSF, field_strength)
    return null_inversion_time(t1_csf, tr)


def snr(field_strength: float, voxel_volume_mm3: float, snr_at_1p5t_1mm3: float) -> float:
    """Image SNR relative to full magnetisation of white matter.

    SNR grows roughly linearly with B0 at clinical field strengths (Hoult & Richards 1976,
    J Magn Reson 24:71) and linearly with voxel volume.
    """
    return snr_at_1p5t_1mm3 * (field_strength / 1.5) * voxel_volume_mm3
