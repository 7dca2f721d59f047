"""Paired data for ControlNet fine-tuning, written as a prepared cache with a condition per crop.

Three makers, each writing ``<output>/manifest.json`` whose entries add a ``condition`` file and a
``condition_kind`` (``image``: HU windowed like the CT; ``mask``: 0/1) to the usual image/anatomy:

* ``sr``: thick/thin pairs from thin CT. The condition is the thick-slice volume brought back to
  the thin grid: contiguous slices averaged into slabs of ``--thickness`` mm (5 mm default) and
  each slab value copied to its slices (``H^+ H x``).
* ``lesion``: CT + lesion mask files in MSD layout (``imagesTr/NAME.nii.gz``,
  ``labelsTr/NAME.nii.gz``; ``--lesion-label`` selects the lesion value, ``--organ-label`` maps an
  organ value to a TotalSegmentator name).
* ``synthetic-lesions``: ellipsoid lesions inserted into the liver of prepared CT that has liver
  labels, with a contrast drawn from a realistic range and the surrounding texture kept.

Usage::

    python -m Training.make_pairs sr --data data/prepared --output data/sr_pairs --thickness 5
    python -m Training.make_pairs lesion --msd Task03_Liver --output data/lesions --region abdomen --spacing 1
    python -m Training.make_pairs synthetic-lesions --data data/prepared --output data/lesions --count 8
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import BODY_LABEL, body_mask, label_of
from MedDiffFMLib.diffusion.operators import ZSlabAverage
from MedDiffFMLib.errors import InputError, MedDiffFMError
from MedDiffFMLib.tasks.super_resolution import slab_factor
from MedDiffFMLib.volume import Volume, read_volume, write_volume

from .dataset import manifest_entries
from .prepare_data import write_manifest

LESION_CONTRAST_HU = (-70.0, -25.0)
LESION_RADIUS_MM = (5.0, 14.0)


def thick_condition(thin: np.ndarray, factor: int) -> np.ndarray:
    """``H^+ H x`` along z of a ``[z, y, x]`` volume; trailing slices that fill no slab are dropped."""
    usable = thin.shape[0] - thin.shape[0] % factor
    operator = ZSlabAverage(factor)
    volume = torch.from_numpy(np.asarray(thin[:usable], dtype=np.float32))
    return operator.pseudo_inverse(operator(volume)).numpy()


def _write_entry(
    output: Path, stem: str, ct: Volume, anatomy: Volume, condition: Volume, kind: str, region: str
) -> dict:
    paths = {key: output / f"{stem}_{key}.nii.gz" for key in ("ct", "anatomy", "condition")}
    write_volume(ct, paths["ct"], overwrite=True)
    write_volume(anatomy, paths["anatomy"], overwrite=True)
    write_volume(condition, paths["condition"], overwrite=True)
    return dict(
        region=region,
        image=paths["ct"].name,
        anatomy=paths["anatomy"].name,
        condition=paths["condition"].name,
        condition_kind=kind,
        shape=list(ct.array.shape),
    )


def _save_manifest(output: Path, spacing: float, cases: dict) -> dict:
    manifest = {"spacing_mm": spacing, "cases": cases}
    write_manifest(output, manifest)
    return manifest


def make_sr_pairs(data: Path, output: Path, thicknesses_mm: Sequence[float]) -> dict:
    """Thick/thin pairs from every crop of a prepared cache, one pair per crop and slab thickness.

    Several thicknesses (e.g. 5 and 6 mm) train one ControlNet for all of them: the condition
    ``H^+ H x`` has the same form whatever the slab.
    """
    spacing = json.loads((data / "manifest.json").read_text())["spacing_mm"]
    factors = [slab_factor(thickness, spacing, "the cache's spacing") for thickness in thicknesses_mm]
    output.mkdir(parents=True, exist_ok=True)
    cases = {}
    for entry, factor in tqdm([(e, f) for e in manifest_entries(data) for f in factors], desc="sr pairs"):
        ct, anatomy = read_volume(entry["image"]), read_volume(entry["anatomy"])
        usable = ct.array.shape[0] - ct.array.shape[0] % factor
        if usable == 0:
            continue
        thin = Volume(ct.array[:usable], ct.spacing, ct.origin, ct.direction)
        labels = Volume(anatomy.array[:usable], ct.spacing, ct.origin, ct.direction)
        condition = thin.with_array(np.round(thick_condition(thin.array, factor)).astype(np.int16))
        stem = Path(entry["image"]).name.removesuffix("_ct.nii.gz") + f"_sr{factor}"
        cases[stem] = {
            "status": "done",
            "source": entry["image"],
            "regions": [_write_entry(output, stem, thin, labels, condition, "image", entry["region"])],
        }
    return _save_manifest(output, spacing, cases)


def make_msd_lesions(
    msd: Path, output: Path, region: str, spacing: float, lesion_label: int, organ_labels: dict[int, str]
) -> dict:
    """Lesion pairs from an MSD-style folder (CT + label map with a lesion value)."""
    pp.check_region(region)
    output.mkdir(parents=True, exist_ok=True)
    cases = {}
    images = sorted((msd / "imagesTr").glob("*.nii*"))
    if not images:
        raise InputError(f"No images in '{msd / 'imagesTr'}'.")
    for image_path in tqdm(images, desc="lesion pairs"):
        name = image_path.name.split(".")[0]
        try:
            ct = read_volume(image_path)
            labels = pp.labels_on_grid(read_volume(msd / "labelsTr" / image_path.name), ct.geometry).array
            anatomy = np.where(body_mask(ct.array), BODY_LABEL, 0).astype(np.uint8)
            for value, organ in organ_labels.items():
                anatomy[labels == value] = label_of(organ)
            lesion = (labels == lesion_label).astype(np.uint8)
            working = pp.isotropic_geometry(ct.geometry, spacing)
            resampled = pp.resample(ct, working, fill=-1024.0)
            entry = _write_entry(
                output,
                name,
                resampled.with_array(np.round(resampled.array).astype(np.int16)),
                pp.resample(ct.with_array(anatomy), working, labels=True),
                pp.resample(ct.with_array(lesion), working, labels=True),
                "mask",
                region,
            )
            cases[name] = {"status": "done", "source": str(image_path), "regions": [entry]}
        except (MedDiffFMError, OSError) as error:
            cases[name] = {"status": "failed", "source": str(image_path), "error": str(error)}
    return _save_manifest(output, spacing, cases)


def insert_ellipsoid_lesion(
    hu: np.ndarray, organ: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``hu`` with one ellipsoid lesion inside ``organ``, and the lesion mask.

    The lesion replaces the local mean by ``organ mean + contrast`` (contrast drawn from
    ``LESION_CONTRAST_HU``) with a soft 1-voxel edge, keeping the image's noise texture.
    """
    candidates = np.argwhere(ndimage.binary_erosion(organ, iterations=2))
    if len(candidates) == 0:
        raise InputError("The organ is too small for a synthetic lesion.")
    centre = candidates[rng.integers(len(candidates))]
    radii_mm = rng.uniform(*LESION_RADIUS_MM, size=3)
    grid = np.indices(hu.shape).astype(np.float32)
    distance = sum(((grid[a] - centre[a]) * spacing[::-1][a] / radii_mm[a]) ** 2 for a in range(3))
    mask = (distance <= 1.0) & organ
    alpha = np.clip(ndimage.gaussian_filter(mask.astype(np.float32), sigma=0.7), 0.0, 1.0) * organ
    local = ndimage.uniform_filter(hu.astype(np.float32), size=3)
    target = float(hu[organ].mean()) + rng.uniform(*LESION_CONTRAST_HU)
    return hu + alpha * (target - local), mask.astype(np.uint8)


def make_synthetic_lesions(data: Path, output: Path, count: int, seed: int = 0, organ: str = "liver") -> dict:
    """``count`` lesion variants of every prepared crop whose anatomy contains ``organ``."""
    spacing = json.loads((data / "manifest.json").read_text())["spacing_mm"]
    output.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cases = {}
    for entry in manifest_entries(data):
        ct, anatomy = read_volume(entry["image"]), read_volume(entry["anatomy"])
        organ_mask = anatomy.array == label_of(organ)
        if organ_mask.sum() < 100:
            continue
        for variant in range(count):
            hu, mask = insert_ellipsoid_lesion(ct.array.astype(np.float32), organ_mask, ct.spacing, rng)
            stem = Path(entry["image"]).name.removesuffix("_ct.nii.gz") + f"_lesion{variant:02d}"
            written = _write_entry(
                output,
                stem,
                ct.with_array(np.round(hu).astype(np.int16)),
                anatomy,
                ct.with_array(mask),
                "mask",
                entry["region"],
            )
            cases[stem] = {"status": "done", "source": entry["image"], "regions": [written]}
    if not cases:
        raise InputError(f"No prepared crop in '{data}' contains the {organ}; synthetic lesions need its labels.")
    return _save_manifest(output, spacing, cases)


def _organ_labels(items: list[str]) -> dict[int, str]:
    pairs = dict(item.split("=", 1) for item in items)
    return {int(value): name for value, name in pairs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paired data for ControlNet fine-tuning.")
    makers = parser.add_subparsers(dest="maker", required=True)
    sr = makers.add_parser("sr", help="thick/thin pairs from a prepared cache")
    sr.add_argument("--data", type=Path, required=True)
    sr.add_argument("--output", type=Path, required=True)
    sr.add_argument("--thickness", type=float, nargs="+", default=[5.0], help="slab thickness(es) in mm (default 5)")
    msd = makers.add_parser("lesion", help="CT + lesion masks in MSD layout")
    msd.add_argument("--msd", type=Path, required=True, help="folder with imagesTr/ and labelsTr/")
    msd.add_argument("--output", type=Path, required=True)
    msd.add_argument("--region", required=True, choices=tuple(pp.REGIONS))
    msd.add_argument("--spacing", type=float, default=1.0)
    msd.add_argument("--lesion-label", type=int, default=2, help="label value of the lesion (MSD liver: 2)")
    msd.add_argument(
        "--organ-label",
        action="append",
        default=[],
        metavar="VALUE=NAME",
        help="organ label value and its TotalSegmentator name, e.g. 1=liver (repeatable)",
    )
    synthetic = makers.add_parser("synthetic-lesions", help="ellipsoid lesions in the liver of prepared CT")
    synthetic.add_argument("--data", type=Path, required=True)
    synthetic.add_argument("--output", type=Path, required=True)
    synthetic.add_argument("--count", type=int, default=8, help="variants per crop (default 8)")
    synthetic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.maker == "sr":
            manifest = make_sr_pairs(args.data, args.output, args.thickness)
        elif args.maker == "lesion":
            manifest = make_msd_lesions(
                args.msd, args.output, args.region, args.spacing, args.lesion_label, _organ_labels(args.organ_label)
            )
        else:
            manifest = make_synthetic_lesions(args.data, args.output, args.count, args.seed)
    except MedDiffFMError as error:
        print(f"make_pairs: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(manifest['cases'])} pairs to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
