"""Volumes with geometry, and reading/writing them.

Conventions (those of SimpleITK/ITK):

* ``Volume.array`` is indexed ``[k, j, i]`` = ``[z, y, x]`` (slice, row, column).
* ``spacing`` is ``(sx, sy, sz)`` in mm, ``origin`` the physical position of voxel ``(0, 0, 0)``
  in LPS mm, ``direction`` the 3x3 direction cosine matrix in row-major order whose columns are
  the directions of the i, j, k axes.

Writing is atomic (temporary file, then rename) and refuses to overwrite unless asked.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import InputError, OutputExistsError, ReadError
from .file_check import check_complete, check_dicom_file, is_dicom_file


class _NotInstalled:
    """Stands in for a package that is missing: any use raises an ImportError that names it."""

    def __init__(self, name: str, error: ImportError) -> None:
        self._name, self._error = name, error

    def __getattr__(self, attribute: str):
        raise ImportError(f"{self._name} is needed to read, write or resample images ({self._error}).")


# SimpleITK is needed to read, write or resample images, not to import this module: training from
# arrays (Training.pack_data) runs where it is not installed, and fails on use where it is missing.
try:
    import SimpleITK as sitk
except ImportError as missing:
    sitk = _NotInstalled("SimpleITK", missing)

WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")


def itk_direction(direction: tuple[float, ...]) -> tuple[float, ...]:
    """The direction cosines as ITK gets them: entries below 1e-12 in size become 0.

    ITK inverts direction matrices with an SVD that fails on subnormal numbers (around 1e-308),
    which a rotation computed in floating point can contain; its resampling then maps voxels to the
    wrong places without an error. Zeroing such entries moves no voxel by more than 1e-9 mm.
    """
    return tuple(0.0 if abs(value) < 1e-12 else float(value) for value in direction)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid: ``shape`` as ``(z, y, x)``; spacing/origin/direction as in the module docstring."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def index_to_physical(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous ``(i, j, k, 1)`` voxel indices to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def same_grid(self, other: Geometry, tolerance: float = 1e-4) -> bool:
        """True when both grids have the same shape and voxel-to-physical mapping."""
        return self.shape == other.shape and np.allclose(
            self.index_to_physical(), other.index_to_physical(), atol=tolerance
        )

    def subgrid(self, box: tuple[slice, slice, slice]) -> Geometry:
        """The grid of the voxels ``[box]`` (``[z, y, x]`` slices with steps of 1), same positions."""
        ranges = [range(*s.indices(n)) for s, n in zip(box, self.shape)]
        start = np.array([ranges[2].start, ranges[1].start, ranges[0].start, 1.0])
        origin = (self.index_to_physical() @ start)[:3]
        shape = tuple(len(r) for r in ranges)
        return Geometry(shape, self.spacing, tuple(float(o) for o in origin), self.direction)

    def to_sitk_reference(self) -> sitk.Image:
        """An empty SimpleITK image with this geometry (for resampling)."""
        image = sitk.Image([int(n) for n in self.shape[::-1]], sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(itk_direction(self.direction))
        return image


@dataclass
class Volume:
    """A voxel array with its geometry and free-text metadata (written to NRRD/MHA headers)."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = tuple(float(d) for d in np.asarray(self.direction).ravel())
        if len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise InputError("A Volume needs 3 spacings, 3 origin coordinates and a 3x3 direction.")

    @property
    def geometry(self) -> Geometry:
        if self.array.ndim != 3:
            raise InputError(
                f"Expected a 3D volume, got an array of shape {self.array.shape}. "
                "Use a 3D CT (a stack of 2D slices can be read as a DICOM series or a 3D file)."
            )
        return Geometry(tuple(int(n) for n in self.array.shape), self.spacing, self.origin, self.direction)

    def with_array(self, array: np.ndarray, **metadata: str) -> Volume:
        """A new volume with ``array`` on this volume's grid (metadata merged with ``metadata``)."""
        if array.shape != self.array.shape:
            raise InputError(f"Array shape {array.shape} does not match the volume's {self.array.shape}.")
        return replace(self, array=array, metadata={**self.metadata, **metadata})

    @classmethod
    def on_geometry(cls, array: np.ndarray, geometry: Geometry, **metadata: str) -> Volume:
        """A volume holding ``array`` (shape ``geometry.shape``) on ``geometry``."""
        if tuple(array.shape) != tuple(geometry.shape):
            raise InputError(f"Array shape {array.shape} does not match the grid's {geometry.shape}.")
        return cls(array, geometry.spacing, geometry.origin, geometry.direction, dict(metadata))

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(self.array, isVector=False)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(itk_direction(self.direction))
        for key, value in self.metadata.items():
            image.SetMetaData(key, str(value))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"The image has {image.GetNumberOfComponentsPerPixel()} components per voxel (a vector "
                "or colour image). MedDiffFM needs a single-channel CT in HU."
            )
        if image.GetDimension() != 3:
            raise InputError(
                f"The image is {image.GetDimension()}D; MedDiffFM needs a 3D CT volume. For 2D slices, "
                "stack them into one 3D file (the anomaly task treats such a stack as a pseudo-3D volume)."
            )
        return cls(
            sitk.GetArrayFromImage(image),
            image.GetSpacing(),
            image.GetOrigin(),
            image.GetDirection(),
        )


def list_dicom_series(folder: str | os.PathLike) -> list[str]:
    """Series instance UIDs of the DICOM series in ``folder``."""
    return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder into a :class:`Volume`.

    A folder with several DICOM series needs ``series_uid``; the error lists the UIDs found. A file
    (or a series member) that holds less voxel data than its header describes, or whose compressed
    data is corrupt, raises :class:`ReadError` (:mod:`.file_check`) instead of being read as zeros.
    """
    path = Path(path)
    if not path.exists():
        raise ReadError(f"'{path}' does not exist. Check the path.")
    if path.is_file():
        check_complete(path)
    try:
        if path.is_dir():
            image = _read_dicom_series(path, series_uid)
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise ReadError(
            f"Could not read '{path}': {str(error).strip().splitlines()[-1]}. "
            "Supported inputs are NIfTI (.nii/.nii.gz), NRRD, MHA/MHD files and DICOM series folders."
        ) from error
    volume = Volume.from_sitk(image)
    volume.metadata["source"] = str(path)
    return volume


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    series = list_dicom_series(folder)
    if not series:
        raise ReadError(f"No DICOM series found in '{folder}'.")
    if series_uid is None:
        if len(series) > 1:
            raise ReadError(
                f"'{folder}' holds {len(series)} DICOM series; choose one with its series UID: " + ", ".join(series)
            )
        series_uid = series[0]
    elif series_uid not in series:
        raise ReadError(f"Series '{series_uid}' is not in '{folder}'. Series found: {', '.join(series)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    _check_series_files(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    _check_slice_gaps(folder, reader, len(files))
    return image


def _check_series_files(folder: Path, files: tuple[str, ...]) -> None:
    """Raise if a member of the series, or another DICOM file in the folder, is cut short.

    GDCM drops a DICOM file it cannot parse from the series without a word, so a truncated slice
    would silently disappear from the volume: every DICOM file of the folder outside the series is
    checked too (those of other, intact series pass).
    """
    members = {Path(name).resolve() for name in files}
    for member in members:
        check_dicom_file(member)
    for candidate in sorted(folder.iterdir()):
        if candidate.resolve() not in members and candidate.is_file() and is_dicom_file(candidate):
            check_dicom_file(candidate)


def _check_slice_gaps(folder: Path, reader: sitk.ImageSeriesReader, count: int) -> None:
    """Raise if the slice positions jump by more than 1.5 times their usual distance (missing slices)."""
    if count < 3:
        return
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(count)])
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
    except (RuntimeError, ValueError):
        return
    normal = np.cross(cosines[:3], cosines[3:])
    steps = np.abs(np.diff(np.sort(positions @ normal)))
    usual = float(np.median(steps))
    if usual > 0 and steps.max() > 1.5 * usual:
        where = int(np.argmax(steps))
        raise ReadError(
            f"The DICOM series in '{folder}' has a gap of {steps.max():.2f} mm after slice {where + 1} of {count} "
            f"(the others are {usual:.2f} mm apart): slices are missing. Copy or export the series again."
        )


def output_extension(path: str | os.PathLike) -> str:
    """The supported file extension of ``path`` or an :class:`InputError` naming the valid ones."""
    name = Path(path).name.lower()
    for extension in WRITE_EXTENSIONS:
        if name.endswith(extension):
            return extension
    raise InputError(f"Cannot write '{path}': use one of the extensions {', '.join(WRITE_EXTENSIONS)}.")


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate an output path before any work starts: supported extension, no unwanted overwrite."""
    path = Path(path)
    output_extension(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"'{path}' already exists. Choose another name or allow overwriting.")
    if not path.parent.exists():
        raise InputError(f"The folder '{path.parent}' does not exist. Create it first.")
    return path


def default_file_mode() -> int:
    """Permissions a newly created file gets under the process's umask (temporary files start at 0600).

    The umask is read from ``/proc/self/status`` where available, so it is never changed (changing it,
    even briefly, races with other threads); elsewhere 0o022 is assumed.
    """
    umask = 0o022
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except OSError:
        pass
    return 0o666 & ~umask


def write_volume(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``volume`` atomically to ``path`` (format chosen by extension).

    The data go to a temporary file in the same folder that is renamed over ``path`` only when
    complete, so a failed or interrupted write never leaves a partial file.
    """
    path = check_writable(path, overwrite)
    extension = output_extension(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{extension}", dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(volume.to_sitk(), temporary, useCompression=True)
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
