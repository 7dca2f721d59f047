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

from .errors import InputError, MaskError

TOTALSEGMENTATOR_CLASSES: tuple[str, ...] = (
    "spleen",
    "kidney_right",
    "kidney_left",
    "gallbladder",
    "liver",
    "stomach",
    "pancreas",
    "adrenal_gland_right",
    "adrenal_gland_left",
    "lung_upper_lobe_left",
    "lung_lower_lobe_left",
    "lung_upper_lobe_right",
    "lung_middle_lobe_right",
    "lung_lower_lobe_right",
    "esophagus",
    "trachea",
    "thyroid_gland",
    "small_bowel",
    "duodenum",
    "colon",
    "urinary_bladder",
    "prostate",
    "kidney_cyst_left",
    "kidney_cyst_right",
    "sacrum",
    "vertebrae_S1",
    "vertebrae_L5",
    "vertebrae_L4",
    "vertebrae_L3",
    "vertebrae_L2",
    "vertebrae_L1",
    "vertebrae_T12",
    "vertebrae_T11",
    "vertebrae_T10",
    "vertebrae_T9",
    "vertebrae_T8",
    "vertebrae_T7",
    "vertebrae_T6",
    "vertebrae_T5",
    "vertebrae_T4",
    "vertebrae_T3",
    "vertebrae_T2",
    "vertebrae_T1",
    "vertebrae_C7",
    "vertebrae_C6",
    "vertebrae_C5",
    "vertebrae_C4",
    "vertebrae_C3",
    "vertebrae_C2",
    "vertebrae_C1",
    "heart",
    "aorta",
    "pulmonary_vein",
    "brachiocephalic_trunk",
    "subclavian_artery_right",
    "subclavian_artery_left",
    "common_carotid_artery_right",
    "common_carotid_artery_left",
    "brachiocephalic_vein_left",
    "brachiocephalic_vein_right",
    "atrial_appendage_left",
    "superior_vena_cava",
    "inferior_vena_cava",
    "portal_vein_and_splenic_vein",
    "iliac_artery_left",
    "iliac_artery_right",
    "iliac_vena_left",
    "iliac_vena_right",
    "humerus_left",
    "humerus_right",
    "scapula_left",
    "scapula_right",
    "clavicula_left",
    "clavicula_right",
    "femur_left",
    "femur_right",
    "hip_left",
    "hip_right",
    "spinal_cord",
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
    "autochthon_left",
    "autochthon_right",
    "iliopsoas_left",
    "iliopsoas_right",
    "brain",
    "skull",
    "rib_left_1",
    "rib_left_2",
    "rib_left_3",
    "rib_left_4",
    "rib_left_5",
    "rib_left_6",
    "rib_left_7",
    "rib_left_8",
    "rib_left_9",
    "rib_left_10",
    "rib_left_11",
    "rib_left_12",
    "rib_right_1",
    "rib_right_2",
    "rib_right_3",
    "rib_right_4",
    "rib_right_5",
    "rib_right_6",
    "rib_right_7",
    "rib_right_8",
    "rib_right_9",
    "rib_right_10",
    "rib_right_11",
    "rib_right_12",
    "sternum",
    "costal_cartilages",
)
"""TotalSegmentator v2 ``total`` class names; class ``i`` has label value ``i + 1``."""

BODY_LABEL = 118
UNKNOWN_LABEL = 119
NUM_ANATOMY_VALUES = 120
"""Number of distinct label values the network embeds (0..119)."""

CLASS_NAMES: tuple[str, ...] = ("outside_body", *TOTALSEGMENTATOR_CLASSES, "body")
"""Name of every label value 0..118."""

BODY_THRESHOLD_HU = -500.0


def label_of(name: str) -> int:
    """Label value of a class name, or an :class:`InputError` that lists the valid names."""
    try:
        return CLASS_NAMES.index(name)
    except ValueError:
        raise InputError(
            f"Unknown organ '{name}'. Valid names are the TotalSegmentator v2 classes: "
            + ", ".join(TOTALSEGMENTATOR_CLASSES)
        ) from None


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
