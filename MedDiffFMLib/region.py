"""Choosing the anatomical region (and so the HU window) of a CT.

From an anatomy label map: the region whose characteristic structures cover the most voxels
(head & neck: brain, skull, cervical vertebrae, thyroid, carotids; chest: lungs, heart, trachea,
pulmonary vessels; abdomen: liver, spleen, kidneys, pancreas, bowel, lumbar vertebrae, pelvis...).

From the image alone (documented heuristic): inside the thresholded body, if more than 15 % of the
voxels are aerated lung (-950..-500 HU) it is ``chest``; otherwise if the median axial body
cross-section is below 300 cm^2 (a head or neck; a trunk is 500-1000 cm^2) and the body does not
touch the in-plane border (a cropped field of view hides the true size) it is ``head_neck``;
otherwise ``abdomen``.
"""

from __future__ import annotations

import numpy as np

from .anatomy import TOTALSEGMENTATOR_CLASSES, body_mask, label_of
from .volume import Volume

_REGION_KEYS = {
    "head_neck": ("brain", "skull", "thyroid_gland", "common_carotid", "vertebrae_C"),
    "chest": ("lung_", "heart", "trachea", "pulmonary", "atrial"),
    "abdomen": (
        "liver",
        "spleen",
        "kidney",
        "pancreas",
        "stomach",
        "bowel",
        "colon",
        "duodenum",
        "gallbladder",
        "vertebrae_L",
        "urinary_bladder",
        "hip_",
        "sacrum",
    ),
}
LUNG_FRACTION = 0.15
HEAD_AREA_CM2 = 300.0


def region_structures(region: str) -> list[str]:
    """TotalSegmentator class names characteristic of ``region``."""
    return [name for name in TOTALSEGMENTATOR_CLASSES if any(key in name for key in _REGION_KEYS[region])]


def region_from_anatomy(anatomy: np.ndarray) -> str | None:
    """The region whose structures dominate the label map, or None if it holds none of them."""
    counts = np.bincount(np.asarray(anatomy, dtype=np.int64).ravel(), minlength=len(TOTALSEGMENTATOR_CLASSES) + 1)
    scores = {region: sum(int(counts[label_of(name)]) for name in region_structures(region)) for region in _REGION_KEYS}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else None


def region_from_image(ct: Volume, hu: np.ndarray, body: np.ndarray | None = None) -> str:
    """The region guessed from HU content and body size (see the module docstring); ``body`` is the
    thresholded body mask when the caller already has it."""
    body = body_mask(hu) if body is None else body
    if body.sum() == 0:
        return "abdomen"
    lung = ((hu > -950) & (hu < -500) & body).sum() / body.sum()
    if lung > LUNG_FRACTION:
        return "chest"
    pixel_cm2 = ct.spacing[0] * ct.spacing[1] / 100.0
    areas = body.reshape(body.shape[0], -1).sum(axis=1) * pixel_cm2
    border = body[:, [0, -1], :].any(axis=(1, 2)) | body[:, :, [0, -1]].any(axis=(1, 2))
    if np.median(areas[areas > 0]) < HEAD_AREA_CM2 and not border.mean() > 0.5:
        return "head_neck"
    return "abdomen"


def detect_region(
    ct: Volume, hu: np.ndarray, anatomy: np.ndarray | None = None, body: np.ndarray | None = None
) -> tuple[str, str]:
    """The region of a CT and how it was chosen (``"anatomy label map"`` or ``"image heuristic"``)."""
    if anatomy is not None:
        region = region_from_anatomy(anatomy)
        if region is not None:
            return region, "anatomy label map"
    return region_from_image(ct, hu, body), "image heuristic"
