"""Where the files shipped with MedDiffFM are found: one search for a checkout, a wheel and Slicer.

The shipped models (``models/``) and the bundled sample scan
(``Testing/Data/totalsegmentator_example/``) are looked up, in this order, under:

1. the folder named by the environment variable ``MEDDIFFFM_DATA``, if set;
2. ``MedDiffFMLib/data/``: a wheel (``pip install``) carries them there (``setup.py`` copies them in);
3. the folder that contains ``MedDiffFMLib``: the repository root of a checkout, and the Slicer
   extension's scripted-modules folder (``CMakeLists.txt`` installs ``models/`` beside the library).

Only the standard library is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError

DATA_ENV = "MEDDIFFFM_DATA"
MODELS = "models"
SAMPLE = "Testing/Data/totalsegmentator_example"
PACKAGE_DIR = Path(__file__).resolve().parent


def roots() -> list[Path]:
    """The folders searched, first match wins."""
    given = os.environ.get(DATA_ENV)
    return [*([Path(given)] if given else []), PACKAGE_DIR / "data", PACKAGE_DIR.parent]


def find(relative: str) -> Path | None:
    """The first ``root / relative`` that exists, or None."""
    return next((root / relative for root in roots() if (root / relative).exists()), None)


def shipped_models_dir() -> Path:
    """The folder of the shipped model weights (it may not exist: then no model is shipped)."""
    return find(MODELS) or PACKAGE_DIR.parent / MODELS


def sample_dir() -> Path:
    """The bundled sample scans' folder, or an :class:`InputError` saying where it was looked for."""
    found = find(SAMPLE)
    if found is None:
        searched = ", ".join(str(root / SAMPLE) for root in roots())
        raise InputError(
            f"The bundled sample scans are not installed (looked in {searched}). Run from a MedDiffFM checkout or "
            f"wheel, or set {DATA_ENV} to a folder that holds {SAMPLE}."
        )
    return found
