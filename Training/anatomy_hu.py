"""Typical HU of every label value in a prepared training set, for the model card (``anatomy_hu``).

Synthesis can start from the anatomy painted with these values instead of from pure noise
(``meddiff-fm synthesize --start-from anatomy``; Docs/METHOD.md 1.1). The table is the median HU of
each label value, pooled over the region crops of a prepared cache (:mod:`Training.prepare_data`),
per region; label values with fewer than ``--minimum-voxels`` voxels are left out. ``Training.pretrain``
writes it into every card it exports; this command writes it into an existing card::

    python -m Training.anatomy_hu --data PREPARED --card models/NAME-VERSION.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from MedDiffFMLib.anatomy import NUM_ANATOMY_VALUES
from MedDiffFMLib.errors import MedDiffFMError
from MedDiffFMLib.model.weights import ModelCard, write_card

from .dataset import manifest_entries, read_array

MINIMUM_VOXELS = 100


HU_RANGE = (-1024, 3072)
"""HU values are counted in 1 HU bins over this range (values outside it fall in the end bins)."""


def typical_hu(entries: list[dict], minimum_voxels: int = MINIMUM_VOXELS) -> dict[str, dict[str, float]]:
    """``{region: {label value: median HU}}`` over the region crops ``entries`` (from
    :func:`~Training.dataset.manifest_entries`; a crop listed several times counts once), to the
    nearest HU. Label 0 (outside the body) is left out: synthesis makes it air. Memory does not grow
    with the data: each region keeps one histogram per label value."""
    low, high = HU_RANGE
    bins = high - low
    histograms: dict[str, np.ndarray] = {}
    for entry in {entry["image"]: entry for entry in entries}.values():
        hu = np.clip(np.rint(read_array(entry["image"])), low, high - 1).astype(np.int64) - low
        labels = read_array(entry["anatomy"]).astype(np.int64)
        counts = np.bincount((labels * bins + hu).ravel(), minlength=NUM_ANATOMY_VALUES * bins)
        region = histograms.setdefault(entry["region"], np.zeros((NUM_ANATOMY_VALUES, bins), np.int64))
        region += counts.reshape(NUM_ANATOMY_VALUES, bins)
    table = {}
    for region, histogram in sorted(histograms.items()):
        cumulative = np.cumsum(histogram, axis=1)
        table[region] = {
            str(value): float(low + _median_bin(cumulative[value]))
            for value in range(1, NUM_ANATOMY_VALUES)
            if cumulative[value, -1] >= minimum_voxels
        }
    return table


def _median_bin(cumulative: np.ndarray) -> float:
    """The median's bin of a histogram given as its cumulative counts (the mean of the two middle
    values' bins for an even count, as :func:`numpy.median`)."""
    total = int(cumulative[-1])
    lower = int(np.searchsorted(cumulative, (total + 1) // 2))
    upper = int(np.searchsorted(cumulative, total // 2 + 1))
    return (lower + upper) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared cache (folder with manifest.json)")
    parser.add_argument("--card", type=Path, required=True, help="model card (.json) to write the table into")
    parser.add_argument("--minimum-voxels", type=int, default=MINIMUM_VOXELS, help="leave out rarer label values")
    args = parser.parse_args(argv)
    try:
        card = ModelCard.from_dict(json.loads(args.card.read_text()))
        card.anatomy_hu = typical_hu(manifest_entries(args.data), args.minimum_voxels)
        write_card(card, args.card)
    except (MedDiffFMError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for region, values in card.anatomy_hu.items():
        print(f"{region}: {len(values)} label values")
    return 0


if __name__ == "__main__":
    sys.exit(main())
