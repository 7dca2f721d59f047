"""Names of the anatomy label values: TotalSegmentator v2's ``total`` classes, ``outside_body`` and
``body`` (the label scheme is described in :mod:`MedDiffFMLib.anatomy`).

Standard library only, so that task settings naming structures (``--organ``, ``--typical-hu``) are
checked before a model is loaded, and by the Slicer module before PyTorch is installed.
"""

from __future__ import annotations

import difflib

from .errors import InputError

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

CLASS_NAMES: tuple[str, ...] = ("outside_body", *TOTALSEGMENTATOR_CLASSES, "body")
"""Name of every label value 0..118."""

_BY_LOWER_CASE = {name.lower(): name for name in CLASS_NAMES[1:]}
"""Class names (``body`` included, ``outside_body`` not: it is no structure) by their lower-case
spelling (TotalSegmentator writes ``vertebrae_L1``, ``vertebrae_C1``)."""


def _words(text: str) -> list[str]:
    return str(text).strip().lower().replace("-", " ").replace("_", " ").split()


def class_name_for(text: str) -> str | None:
    """The class name ``text`` stands for, or None: the names themselves in any case, with spaces or
    hyphens for underscores (``"Portal vein and splenic vein"``), and "Right kidney" style names with
    the side first (Slicer's segment names)."""
    words = _words(text)
    if not words:
        return None
    candidates = ["_".join(words)]
    if words[0] in ("left", "right"):
        candidates.append("_".join([*words[1:], words[0]]))
    return next((_BY_LOWER_CASE[c] for c in candidates if c in _BY_LOWER_CASE), None)


def canonical_name(name: str) -> str:
    """The class name ``name`` stands for (:func:`class_name_for`); an :class:`InputError` suggests
    the nearest names when there is none."""
    found = class_name_for(name)
    if found is not None:
        return found
    key = "_".join(_words(name))
    close = [_BY_LOWER_CASE[match] for match in difflib.get_close_matches(key, _BY_LOWER_CASE, n=3, cutoff=0.6)]
    if close:
        raise InputError(f"Unknown structure '{name}'. Did you mean {' or '.join(repr(c) for c in close)}?")
    raise InputError(
        f"Unknown structure '{name}'. Names are the TotalSegmentator v2 classes: " + ", ".join(TOTALSEGMENTATOR_CLASSES)
    )


def label_of(name: str) -> int:
    """Label value of a class name (see :func:`canonical_name`), or an :class:`InputError`."""
    return CLASS_NAMES.index(canonical_name(name))
