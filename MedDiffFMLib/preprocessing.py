"""Pre-processing shared by training and inference (Docs/METHOD.md 1.3).

* Resampling to the model's isotropic spacing and back to the input grid (SimpleITK; linear for
  intensities, nearest neighbour for label maps).
* Per-region HU windows mapped to the model's ``[-1, 1]`` scale and back.
* Lossless restoration: voxels whose input HU lies outside the region window cannot be represented
  by the model, so they are carried over from the input unchanged. For a noisy input, only
  structures outside the window (air, lung, bone) are, not single noise spikes
  (:func:`outside_window_structures`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError, MaskError
from .volume import Geometry, Volume, sitk


@dataclass(frozen=True)
class Window:
    """A CT display window: ``level`` and ``width`` in HU."""

    level: float
    width: float

    @property
    def low(self) -> float:
        return self.level - self.width / 2

    @property
    def high(self) -> float:
        return self.level + self.width / 2


REGIONS: dict[str, Window] = {
    "head_neck": Window(50.0, 400.0),
    "chest": Window(-500.0, 1800.0),
    "abdomen": Window(60.0, 360.0),
}
"""The three anatomical regions of MedDiff-FM and their HU windows."""

REGION_CLASS: dict[str | None, int] = {None: 0, "head_neck": 1, "chest": 2, "abdomen": 3}
"""Region class indices given to the network; 0 is the null class (no region)."""


def check_region(region: str) -> Window:
    """The window of ``region``, or an :class:`InputError` listing the valid names."""
    if region not in REGIONS:
        raise InputError(f"Unknown region '{region}'. Choose one of: {', '.join(REGIONS)}.")
    return REGIONS[region]


def hu_to_model(hu: np.ndarray, region: str) -> np.ndarray:
    """Clip HU to the region window and scale it linearly to ``[-1, 1]`` (float32)."""
    window = check_region(region)
    clipped = np.clip(np.asarray(hu, dtype=np.float64), window.low, window.high)
    return ((clipped - window.low) / window.width * 2.0 - 1.0).astype(np.float32)


def model_to_hu(values: np.ndarray, region: str) -> np.ndarray:
    """Inverse of :func:`hu_to_model` (values outside ``[-1, 1]`` are clipped first). float32 HU."""
    window = check_region(region)
    clipped = np.clip(np.asarray(values, dtype=np.float64), -1.0, 1.0)
    return ((clipped + 1.0) / 2.0 * window.width + window.low).astype(np.float32)


def outside_window(hu: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of voxels whose HU lies outside the region window (not representable)."""
    window = check_region(region)
    return (hu < window.low) | (hu > window.high)


def outside_window_structures(hu: np.ndarray, region: str, margin_hu: float) -> np.ndarray:
    """Voxels of ``hu`` ``[z, y, x]`` outside the window that belong to a structure outside it.

    A voxel counts when it is outside the region window and the mean of its in-plane 3 x 3
    neighbourhood lies beyond the window by more than ``margin_hu`` (on the same side), as it does
    in air, lung and bone (a one-pixel line in soft tissue from about 750 HU). A noise spike or a fat
    voxel that noise pushed past the window edge does not: averaging over its neighbours brings it
    back. ``margin_hu`` is the input's noise standard deviation in HU.
    """
    window = check_region(region)
    mean = ndimage.uniform_filter(np.asarray(hu, dtype=np.float32), size=(1, 3, 3), mode="nearest")
    below = (hu < window.low) & (mean < window.low - margin_hu)
    above = (hu > window.high) & (mean > window.high + margin_hu)
    return below | above


def restore_outside_window(
    result_hu: np.ndarray, input_hu: np.ndarray, region: str, keep: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Carry input voxels over into ``result_hu``: those in ``keep``, by default every voxel
    outside the window (:func:`outside_window`).

    Returns the merged float32 array and the number of voxels carried over.
    """
    if keep is None:
        keep = outside_window(input_hu, region)
    merged = np.where(keep, input_hu, result_hu).astype(np.float32)
    return merged, int(keep.sum())


def isotropic_geometry(geometry: Geometry, spacing_mm: float) -> Geometry:
    """The grid covering the extent of ``geometry`` with isotropic ``spacing_mm`` voxels.

    Origin and direction are kept, so voxel (0, 0, 0) stays where it was; the last voxel along each
    axis lies at or up to one voxel beyond the input's last voxel, so every input voxel is covered.
    """
    shape_xyz = [
        max(1, int(math.ceil((n - 1) * s / spacing_mm - 1e-6)) + 1)
        for n, s in zip(geometry.shape[::-1], geometry.spacing)
    ]
    return Geometry(tuple(shape_xyz[::-1]), (spacing_mm,) * 3, geometry.origin, geometry.direction)


def resample(
    volume: Volume, target: Geometry, labels: bool = False, fill: float | None = None, extrapolate: bool | None = None
) -> Volume:
    """Resample ``volume`` onto ``target`` (linear for intensities, nearest neighbour for labels).

    Points outside the input take the nearest input voxel's value when ``extrapolate`` (default for
    intensities without an explicit ``fill``), else ``fill`` (default: the input's minimum for
    intensities, 0 for labels).
    """
    if volume.geometry.same_grid(target):
        return Volume.on_geometry(volume.array.copy(), target, **volume.metadata)
    image = volume.to_sitk()
    if extrapolate is None:
        extrapolate = not labels and fill is None
    if fill is None:
        fill = 0.0 if labels else float(np.min(volume.array))
    if labels:
        interpolator = sitk.sitkNearestNeighbor
    else:
        interpolator = sitk.sitkLinear
        image = sitk.Cast(image, sitk.sitkFloat32)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(target.to_sitk_reference())
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(fill)
    resampler.SetOutputPixelType(image.GetPixelID())
    resampler.SetUseNearestNeighborExtrapolator(extrapolate)
    resampled = resampler.Execute(image)
    return Volume.on_geometry(sitk.GetArrayFromImage(resampled), target, **volume.metadata)


def grids_overlap(a: Geometry, b: Geometry) -> bool:
    """True when the physical bounding boxes of two grids intersect."""

    def bounds(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(
            [
                [i, j, k, 1.0]
                for i in (-0.5, geometry.shape[2] - 0.5)
                for j in (-0.5, geometry.shape[1] - 0.5)
                for k in (-0.5, geometry.shape[0] - 0.5)
            ]
        )
        points = (geometry.index_to_physical() @ corners.T)[:3]
        return points.min(axis=1), points.max(axis=1)

    low_a, high_a = bounds(a)
    low_b, high_b = bounds(b)
    return bool(np.all(low_a < high_b) and np.all(low_b < high_a))


def labels_on_grid(labels: Volume, target: Geometry, what: str = "label map") -> Volume:
    """Bring a label map onto ``target`` with nearest neighbour; refuse grids that do not overlap."""
    if labels.geometry.same_grid(target):
        return labels
    if not grids_overlap(labels.geometry, target):
        raise MaskError(
            f"The {what} does not overlap the image in physical space. Make sure it was created on "
            "this image (same patient position and orientation)."
        )
    return resample(labels, target, labels=True)
