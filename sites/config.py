"""A hospital's YAML file, read once into a frozen, typed SiteConfig."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.conditions import Modality, Pathology


class SiteConfigError(ValueError):
    """A site YAML file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class SequenceParams:
    """Timing of one pulse sequence, in seconds (BIDS units)."""

    repetition_time: float
    echo_time: float
    # FLAIR only: None means "choose TI so that CSF is nulled at this field strength".
    inversion_time: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.echo_time < self.repetition_time:
            raise ValueError(
                f"need 0 < echo_time < repetition_time, got TE={self.echo_time} s, TR={self.repetition_time} s"
            )
        if self.inversion_time is not None and not 0 < self.inversion_time < self.repetition_time:
            raise ValueError(f"inversion_time must lie in (0, TR), got {self.inversion_time} s")


@dataclass(frozen=True)
class ScannerSpec:
    """How the site's scanner degrades the ideal image."""

    in_plane_mm: float = 1.5
    slice_thickness_mm: float = 5.0
    # SNR of white matter on a 1 mm^3 voxel at 1.5 T; the site's SNR scales with field and voxel size.
    snr_at_1p5t_1mm3: float = 7.0
    # Peak-to-peak amplitude of the smooth multiplicative bias field, in log units.
    bias_field: float = 0.2
    # Scanner units per unit of proton density; real scanners store arbitrary integers.
    intensity_scale: float = 1000.0
    # Axis codes of the stored volumes (nibabel's aff2axcodes style), e.g. "RAS" or "LPS".
    orientation: str = "RAS"

    def __post_init__(self) -> None:
        for name in ("in_plane_mm", "slice_thickness_mm", "snr_at_1p5t_1mm3", "intensity_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.bias_field < 0:
            raise ValueError(f"bias_field must be >= 0, got {self.bias_field}")
        if not _is_axis_codes(self.orientation):
            raise ValueError(f"orientation must be three axis codes such as 'RAS' or 'LPS', got {self.orientation!r}")


def _is_axis_codes(codes: str) -> bool:
    """True if `codes` names each of the L/R, A/P and S/I axes exactly once."""
    axes = ["LR", "AP", "SI"]
    found = sorted(next((i for i, pair in enumerate(axes) if c in pair), -1) for c in codes)
    return found == [0, 1, 2]


@dataclass(frozen=True)
class SyntheticSpec:
    """How `fedmri sites make` builds a synthetic hospital. Real hospitals leave this out."""

    num_subjects: int
    seed: int
    field_strength: float  # tesla
    modalities: list[Modality]
    pathology_mix: dict[Pathology, float]
    sequences: dict[Modality, SequenceParams]
    scanner: ScannerSpec = field(default_factory=ScannerSpec)
    age_range: list[float] = field(default_factory=lambda: [20.0, 85.0])

    def __post_init__(self) -> None:
        if self.num_subjects < 1:
            raise ValueError(f"num_subjects must be >= 1, got {self.num_subjects}")
        if not 0.05 <= self.field_strength <= 11.7:
            raise ValueError(f"field_strength must be in tesla, 0.05-11.7, got {self.field_strength}")
        if not self.modalities:
            raise ValueError("modalities must list at least one modality")
        missing = [m.value for m in self.modalities if m not in self.sequences]
        if missing:
            raise ValueError(f"sequences has no timing for modalities {missing}")
        if not self.pathology_mix or any(w < 0 for w in self.pathology_mix.values()):
            raise ValueError("pathology_mix needs at least one non-negative weight")
        if sum(self.pathology_mix.values()) <= 0:
            raise ValueError("pathology_mix weights sum to zero")
        if len(self.age_range) != 2 or not 0 <= self.age_range[0] <= self.age_range[1] <= 110:
            raise ValueError(f"age_range must be [min, max] years, got {self.age_range}")


@dataclass(frozen=True)
class DataSpec:
    """Where the site's BIDS data lives and how the client reads it."""

    # Relative paths are taken from the directory holding the YAML file.
    bids_root: str
    # strict: any bad file stops the site. Not strict: bad files are skipped and listed.
    strict: bool = True
    # Preprocessed slices are cached here (never inside bids_root). None: no cache.
    cache_dir: str | None = None
    image_size: int = 64  # pixels of the square axial slice given to the model
    fov_mm: float = 220.0  # physical field of view of that slice
    # Subjects kept out of training for evaluation (split by subject id, the same in every run).
    holdout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}")
        if self.image_size < 8 or self.image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8 and >= 8, got {self.image_size}")
        if not self.fov_mm > 0:
            raise ValueError(f"fov_mm must be > 0, got {self.fov_mm}")


@dataclass(frozen=True)
class PrivacyPolicy:
    """The hospital's own privacy rules. The server proposes; the site decides."""

    max_epsilon: float = 8.0  # lifetime budget of the site, across all runs that share its ledger
    delta: float | None = None  # None: min(1e-5, 1/(10 N)) with N the site's subjects
    # Per-subject clipping norm C. 0.01 is near the median per-subject gradient norm of the shipped
    # base in attention mode (fedmri bench: multiplicity_signal, synthetic data); at C = 1 the noise
    # σC drowned a step's signal about 70-fold (docs/generator.md).
    max_grad_norm: float = 0.01
    min_noise_multiplier: float = 0.5  # σ is never set below this, whatever the server asks
    accountant: str = "prv"  # "prv" (default) or "rdp"; RDP is always reported alongside
    accept_server_overrides: bool = False  # may the server raise σ or lower C for a run?
    max_local_steps: int = 200  # per round
    allow_non_private: bool = False  # σ = 0 (ε = ∞) only if this is true
    # The ledger's folder: an absolute path, or None for <site home>/ledger. Never relative: a
    # ledger that moved with the YAML file would silently start again at ε = 0.
    ledger_dir: str | None = None
    # A smaller proposed batch is raised to this (or to N): empty Poisson draws stay rare (e^-B).
    min_expected_batch_size: int = 8
    # A second round at this site (another run, or an overlapping message) waits this long for
    # the ledger held by the first, then declines. It never trains on a stale ledger.
    round_wait_s: float = 900.0
    # Evaluation aggregates are NOT covered by DP: take part at all, and over how many held-out
    # subjects at least (per reported figure). The server can only ask for more, never fewer.
    evaluate: bool = True
    min_eval_subjects: int = 10
    # Translation scores (client/evaluate_translation.py) run the server's model on held-out
    # pixels and compare its output with held-out slices: a richer channel than the rest of the
    # evaluation, so a site opts in.
    evaluate_translation: bool = False

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise ValueError(f"privacy.max_epsilon must be > 0, got {self.max_epsilon}")
        if self.delta is not None and not 0 < self.delta < 1e-3:
            raise ValueError(f"privacy.delta must lie in (0, 1e-3), got {self.delta}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.min_noise_multiplier < 0:
            raise ValueError(f"privacy.min_noise_multiplier must be >= 0, got {self.min_noise_multiplier}")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"privacy.accountant must be 'prv' or 'rdp', got {self.accountant!r}")
        if self.max_local_steps < 1:
            raise ValueError(f"privacy.max_local_steps must be >= 1, got {self.max_local_steps}")
        if self.min_expected_batch_size < 1:
            raise ValueError(f"privacy.min_expected_batch_size must be >= 1, got {self.min_expected_batch_size}")
        if not self.round_wait_s >= 0:
            raise ValueError(f"privacy.round_wait_s must be >= 0 seconds, got {self.round_wait_s}")
        if self.min_eval_subjects < 1:
            raise ValueError(f"privacy.min_eval_subjects must be >= 1, got {self.min_eval_subjects}")
        if self.ledger_dir is not None and not Path(self.ledger_dir).expanduser().is_absolute():
            raise ValueError(
                f"privacy.ledger_dir must be an absolute path, got {self.ledger_dir!r}: a relative ledger would "
                "move with the YAML file and restart the budget at 0 (omit it to use <home>/ledger)"
            )


@dataclass(frozen=True)
class SiteConfig:
    """One hospital: its identity, its data, its privacy policy and (if synthetic) its recipe."""

    site_id: str
    data: DataSpec
    synthetic: SyntheticSpec | None = None
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    # The site's home: its ledger, its signing key (node.key, node.pub) and the marker that it has
    # trained. An absolute path, or None for $FEDMRI_HOME/sites/<site_id> (FEDMRI_HOME: ~/.fedmri).
    home: str | None = None
    # Where this site trains and evaluates: cpu, cuda (an error if torch sees no GPU) or auto.
    device: str = "cpu"

    def __post_init__(self) -> None:
        from common.device import DEVICES

        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.site_id or not all(c.isalnum() or c in "-_" for c in self.site_id):
            raise ValueError(f"site_id must be non-empty letters, digits, '-' or '_', got {self.site_id!r}")
        if self.home is not None and not Path(self.home).expanduser().is_absolute():
            raise ValueError(
                f"home must be an absolute path, got {self.home!r}: the site's ledger and key must not move "
                "with the YAML file"
            )

    @property
    def home_dir(self) -> Path:
        """The site home (see `home`)."""
        if self.home is not None:
            return Path(self.home).expanduser()
        return Path(os.environ.get("FEDMRI_HOME", "~/.fedmri")).expanduser() / "sites" / self.site_id

    @property
    def ledger_path(self) -> Path:
        folder = self.privacy.ledger_dir
        return (Path(folder).expanduser() if folder else self.home_dir / "ledger") / f"{self.site_id}.json"


def load_site(path: str | Path) -> SiteConfig:
    """Read a site YAML file into a SiteConfig; relative data paths become absolute.

    Raises SiteConfigError naming the file and the offending field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SiteConfigError(f"{path}: site config file not found") from None
    except yaml.YAMLError as err:
        raise SiteConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise SiteConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    site = site_from_dict(raw, source=str(path))
    root = Path(site.data.bids_root)
    cache = site.data.cache_dir
    data = DataSpec(
        bids_root=str(root if root.is_absolute() else (path.parent / root).resolve()),
        strict=site.data.strict,
        cache_dir=None if cache is None else str((path.parent / cache).resolve()),
        image_size=site.data.image_size,
        fov_mm=site.data.fov_mm,
        holdout_fraction=site.data.holdout_fraction,
    )
    return dataclasses.replace(site, data=data)


def site_from_dict(raw: dict, source: str = "<dict>") -> SiteConfig:
    """Validate a plain mapping against the SiteConfig schema; errors name `source` and the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SiteConfig), OmegaConf.create(raw))
        site = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0]
        where = f" field '{key}'" if key else ""
        raise SiteConfigError(f"{source}:{where}: {first_line}") from None
    except (ValueError, TypeError) as err:
        raise SiteConfigError(f"{source}: {err}") from None
    assert isinstance(site, SiteConfig)
    return site


def site_to_dict(site: SiteConfig) -> dict:
    """The YAML-ready mapping of a SiteConfig (enums written as their values)."""
    container = OmegaConf.to_container(OmegaConf.structured(site), enum_to_str=True)
    assert isinstance(container, dict)
    return container
