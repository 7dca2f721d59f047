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
from collections import defaultdict
from pathlib import Path

import numpy as np

from MedDiffFMLib.anatomy import NUM_ANATOMY_VALUES
from MedDiffFMLib.errors import MedDiffFMError
from MedDiffFMLib.model.weights import ModelCard, write_card
from MedDiffFMLib.volume import read_volume

from .dataset import manifest_entries

MINIMUM_VOXELS = 100


def typical_hu(entries: list[dict], minimum_voxels: int = MINIMUM_VOXELS) -> dict[str, dict[str, float]]:
    """``{region: {label value: median HU}}`` over the region crops ``entries`` (from
    :func:`~Training.dataset.manifest_entries`; a crop listed several times counts once). Label 0
    (outside the body) is left out: synthesis makes it air."""
    voxels: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    seen = set()
    for entry in entries:
        if entry["image"] in seen:
            continue
        seen.add(entry["image"])
        hu = read_volume(entry["image"]).array.astype(np.float32).ravel()
        labels = read_volume(entry["anatomy"]).array.astype(np.int64).ravel()
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(NUM_ANATOMY_VALUES + 1))
        for value in range(1, NUM_ANATOMY_VALUES):
            if bounds[value + 1] > bounds[value]:
                voxels[entry["region"]][value].append(hu[order[bounds[value] : bounds[value + 1]]])
    table = {}
    for region, by_label in sorted(voxels.items()):
        pooled = {value: np.concatenate(parts) for value, parts in sorted(by_label.items())}
        table[region] = {
            str(value): round(float(np.median(values)), 1)
            for value, values in pooled.items()
            if values.size >= minimum_voxels
        }
    return table


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
