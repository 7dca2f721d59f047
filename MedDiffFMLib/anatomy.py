"""The 118-class anatomy scheme of MedDiff-FM.

Label values of an *anatomy label map* (integer array on the image grid):

* ``0``: outside the body (air, table),
* ``1..117``: the 117 classes of TotalSegmentator v2's ``total`` task, in its order,
* ``118``: ``body``, every other voxel inside the body (found by thresholding),
* ``119`` (:data:`UNKNOWN_LABEL`): "no anatomy given", used when the user supplies no label map and
  for classifier-free condition dropout in training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from scipy import ndimage
from skimage.morphology import convex_hull_image

# The names of the label values, re-exported: they are part of this scheme.
from .class_names import CLASS_NAMES as CLASS_NAMES
from .class_names import TOTALSEGMENTATOR_CLASSES as TOTALSEGMENTATOR_CLASSES
from .class_names import label_of as label_of
from .errors import InputError, MaskError

BODY_LABEL = 118
UNKNOWN_LABEL = 119
NUM_ANATOMY_VALUES = 120
"""Number of distinct label values the network embeds (0..119)."""

BODY_THRESHOLD_HU = -500.0


DERIVED_BODY_MARGIN_MM = 15.0
"""How far the body outline is taken to extend beyond the labelled structures (subcutaneous fat
and skin), when it has to be derived from a label map alone."""


def body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Boolean body mask of a CT in HU (array ``[z, y, x]``).

    Voxels above ``threshold`` HU, restricted to the largest connected component (drops the table
    and noise), with holes filled slice by slice (keeps the lungs and bowel gas inside the body).
    """
    mask = np.asarray(hu) > threshold
    components, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    mask = components == int(np.argmax(sizes))
    for index in range(mask.shape[0]):
        mask[index] = ndimage.binary_fill_holes(mask[index])
    return mask


def derived_body(
    labels: np.ndarray, spacing: tuple[float, float, float], margin_mm: float = DERIVED_BODY_MARGIN_MM
) -> np.ndarray:
    """A body mask ``[z, y, x]`` derived from a label map that has no body class.

    TotalSegmentator labels organs, bones and muscles but not the subcutaneous fat and skin around
    them, and its label 0 means both air and unlabelled tissue. Slice by slice, the body is taken
    as the convex hull of the labelled voxels grown by ``margin_mm`` in-plane (``spacing`` is the
    grid's ``(x, y, z)`` spacing in mm); slices without labels get the nearest labelled slice's.
    """
    labelled = np.asarray(labels) > 0
    body = np.zeros(labelled.shape, dtype=bool)
    filled = [z for z in range(labelled.shape[0]) if labelled[z].any()]
    if not filled:
        return body
    sampling = (spacing[1], spacing[0])
    for z in filled:
        hull = convex_hull_image(labelled[z])
        body[z] = ndimage.distance_transform_edt(~hull, sampling=sampling) <= margin_mm
    nearest = np.asarray(filled)
    for z in range(labelled.shape[0]):
        if not labelled[z].any():
            body[z] = body[int(nearest[np.argmin(np.abs(nearest - z))])]
    return body


def from_totalsegmentator(labels: np.ndarray, hu: np.ndarray | None = None) -> np.ndarray:
    """Anatomy label map (uint8) from a TotalSegmentator v2 ``total`` output.

    Voxels with label 0 that lie inside the body (thresholded from ``hu`` when given) become
    :data:`BODY_LABEL`.
    """
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() > len(TOTALSEGMENTATOR_CLASSES)):
        raise InputError(
            f"Label values must lie in 0..{len(TOTALSEGMENTATOR_CLASSES)} (TotalSegmentator v2 'total'); "
            f"found {labels.min()}..{labels.max()}. For another label scheme pass its name table."
        )
    return _with_body(labels.astype(np.uint8), hu)


def from_named_labels(labels: np.ndarray, names: Mapping[int, str], hu: np.ndarray | None = None) -> np.ndarray:
    """Anatomy label map from any label map whose values are named by ``names``.

    Names are TotalSegmentator v2 class names (or ``body``); an unknown name is an error that
    lists the valid ones. Values absent from ``names`` become 0, then body is filled in from ``hu``.
    """
    lookup = np.zeros(int(max(names, default=0)) + 1, dtype=np.uint8)
    for value, name in names.items():
        lookup[int(value)] = label_of(name)
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < lookup.size)
    return _with_body(np.where(valid, lookup[np.clip(labels, 0, lookup.size - 1)], 0).astype(np.uint8), hu)


def _with_body(anatomy: np.ndarray, hu: np.ndarray | None) -> np.ndarray:
    """Set unlabelled voxels inside the body (thresholded from ``hu``) to :data:`BODY_LABEL`, in place."""
    if hu is not None:
        anatomy[(anatomy == 0) & body_mask(hu)] = BODY_LABEL
    return anatomy


def organ_mask(anatomy: np.ndarray, organs: Iterable[str]) -> np.ndarray:
    """Boolean mask of the voxels labelled with any of ``organs`` (names).

    Raises :class:`MaskError` when none of them is present in the label map.
    """
    organs = list(organs)
    if not organs:
        raise InputError("Name at least one organ, for example 'liver'.")
    mask = np.isin(anatomy, [label_of(name) for name in organs])
    if not mask.any():
        raise MaskError(
            f"The anatomy label map contains no voxel of {', '.join(organs)}. Check the organ name and "
            "that the label map belongs to this CT."
        )
    return mask
