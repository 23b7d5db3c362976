"""Read a fastMRI-style HDF5 file: the stored magnitude image and what its ISMRMRD header states.

File layout (fastMRI multi-coil brain, and M4Raw which follows it): datasets `kspace` [slices,
coils, height, width], `reconstruction_rss` [slices, height, width] (root-sum-of-squares
magnitude, cropped to the reconstruction matrix) and `ismrmrd_header` (an XML string); attributes
such as `acquisition` and `patient_id`. Sources: facebookresearch/fastMRI fastmri/data/README.md
and fastmri/data/mri_data.py (which reads `encoding/encodedSpace/matrixSize`,
`encoding/reconSpace/matrixSize` and pads the *width* by the `y` encoding limits, so height <-> x
and width <-> y); mylyu/M4Raw M4Raw_tutorial.ipynb ("Keys: ['ismrmrd_header', 'kspace',
'reconstruction_rss']"). Header fields and units: ismrmrd/ismrmrd schema/ismrmrd.xsd and
schema/ismrmrd_example.xml (`acquisitionSystemInformation/systemFieldStrength_T` in tesla;
`sequenceParameters/TR, TE, TI` in ms; `encoding/reconSpace` is required by the schema).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sites.importers.site_writer import DatasetImportError

IMAGE_KEY = "reconstruction_rss"
IMAGE_NOTE = (
    "reconstruction_rss: the root-sum-of-squares magnitude image stored in the HDF5 file; the k-space is not used"
)
GEOMETRY_NOTE = (
    "voxel size from the ISMRMRD header (encoding/reconSpace fieldOfView_mm / matrixSize); the file states no "
    "patient orientation or slice gap: rows are written anterior to posterior, slices in stored order, "
    "slice spacing = slice thickness"
)


@dataclass(frozen=True)
class Header:
    """What an ISMRMRD header states; None where it is silent. Times in seconds."""

    field_strength: float | None
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    voxel_mm: tuple[float, float, float]  # (height/x, width/y, slice/z) spacing in mm
    manufacturer: str | None
    model: str | None


@dataclass(frozen=True)
class H5Volume:
    image: np.ndarray  # [slices, height, width] magnitude
    header: Header
    attrs: dict


def _find(root: ElementTree.Element, path: str) -> str | None:
    node = root.find("./{*}" + "/{*}".join(path.split("/")))
    return node.text.strip() if node is not None and node.text else None


def _number(root: ElementTree.Element, path: str, where: Path) -> float | None:
    text = _find(root, path)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise DatasetImportError(f"{where}: ismrmrd_header field {path} is {text!r}, not a number") from None


def parse_header(xml: str | bytes, where: Path) -> Header:
    """The ISMRMRD header's field strength, TR/TE/TI (ms -> s), voxel size and scanner."""
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError as err:
        raise DatasetImportError(f"{where}: ismrmrd_header is not valid XML: {err}") from None
    spacing = []
    for axis in ("x", "y", "z"):
        fov = _number(root, f"encoding/reconSpace/fieldOfView_mm/{axis}", where)
        size = _number(root, f"encoding/reconSpace/matrixSize/{axis}", where)
        if not fov or not size:
            raise DatasetImportError(
                f"{where}: ismrmrd_header lacks encoding/reconSpace fieldOfView_mm/{axis} or matrixSize/{axis}; "
                "the voxel size is unknown"
            )
        spacing.append(fov / size)
    times = {}
    for key in ("TR", "TE", "TI"):
        value = _number(root, f"sequenceParameters/{key}", where)
        times[key] = value / 1000.0 if value else None  # ms -> s
    return Header(
        _number(root, "acquisitionSystemInformation/systemFieldStrength_T", where),
        times["TR"],
        times["TE"],
        times["TI"],
        (spacing[0], spacing[1], spacing[2]),
        _find(root, "acquisitionSystemInformation/systemVendor"),
        _find(root, "acquisitionSystemInformation/systemModel"),
    )


def read_h5(path: Path) -> H5Volume:
    """The file's magnitude image, header and attributes; a corrupt file or a missing key is an error."""
    import h5py  # lazily: only the HDF5 importers need it

    try:
        with h5py.File(path, "r") as handle:
            if IMAGE_KEY not in handle:
                raise DatasetImportError(
                    f"{path}: no '{IMAGE_KEY}' dataset (keys: {', '.join(handle.keys())}); fedmri imports the "
                    "stored magnitude image, which test-set files leave out"
                )
            if "ismrmrd_header" not in handle:
                raise DatasetImportError(f"{path}: no 'ismrmrd_header' dataset; voxel size and field are unknown")
            image = np.asarray(handle[IMAGE_KEY], dtype=np.float32)
            xml = handle["ismrmrd_header"][()]
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in handle.attrs.items()}
    except OSError as err:
        raise DatasetImportError(f"{path}: corrupt or truncated HDF5 file ({err})") from None
    if image.ndim != 3 or not np.isfinite(image).all():
        raise DatasetImportError(
            f"{path}: {IMAGE_KEY} must be a finite [slices, height, width] array, got {image.shape}"
        )
    return H5Volume(image, parse_header(xml, path), attrs)


def as_nifti(volume: H5Volume) -> tuple[np.ndarray, np.ndarray]:
    """(data [width, height, slices], affine [4, 4]) in mm, centred on the volume (see GEOMETRY_NOTE)."""
    dx, dy, dz = volume.header.voxel_mm  # height <-> x, width <-> y
    data = np.transpose(volume.image, (2, 1, 0))  # [S, H, W] -> [W, H, S]
    # i: width (spacing dy), j: height, anterior first (so world y falls as j grows), k: slice.
    affine = np.diag([dy, -dx, dz, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(data.shape, dtype=float) - 1) / 2)
    return data, affine


def sidecar_of(header: Header, tesla: float | None) -> dict:
    """The BIDS sidecar fields the header states (times in seconds), plus how the image was made."""
    sidecar: dict = {}
    if tesla is not None:
        sidecar["MagneticFieldStrength"] = tesla
    for key, value in (
        ("RepetitionTime", header.repetition_time),
        ("EchoTime", header.echo_time),
        ("InversionTime", header.inversion_time),
        ("Manufacturer", header.manufacturer),
        ("ManufacturersModelName", header.model),
    ):
        if value is not None:
            sidecar[key] = value
    sidecar["SliceThickness"] = header.voxel_mm[2]
    sidecar["fedmriImage"] = IMAGE_NOTE
    sidecar["fedmriGeometry"] = GEOMETRY_NOTE
    return sidecar
