"""Prepare raw CT for pre-training: resample, label, split into regions, cache with a manifest.

Input: a CSV with columns ``case,image[,labels,region,z_start,z_stop]`` (``image`` a NIfTI/NRRD/MHA
file or a DICOM folder, ``labels`` a TotalSegmentator v2 ``total`` label map, ``region`` forces one
region for the whole scan, ``z_start``/``z_stop`` keep only those slices) or a folder whose CT files
``NAME.nii.gz`` may have labels beside them as ``NAME_seg.nii.gz``.

For each case: labels are taken from the file, else computed with TotalSegmentator when its command
is installed (with weights), else, only with ``--threshold-labels``, made by thresholding (body only;
recorded in the manifest). Without any of these the run stops first and names the missing files.
The CT and its 118-class anatomy map are resampled to ``--spacing`` mm, whole-body scans are split
into head & neck / chest / abdomen by the z-extent of each region's characteristic structures, and
each region crop is written as ``<case>_<region>_ct.nii.gz`` (int16 HU) and
``<case>_<region>_anatomy.nii.gz`` (uint8). ``manifest.json`` records every case (done or failed
with its error); re-running skips finished cases.

Usage::

    python -m Training.prepare_data --csv cases.csv --output data/prepared --spacing 1.0
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import BODY_LABEL, body_mask, from_totalsegmentator, label_of
from MedDiffFMLib.errors import InputError, MedDiffFMError
from MedDiffFMLib.tasks.region import region_structures
from MedDiffFMLib.volume import Volume, read_volume, write_volume

logger = logging.getLogger("prepare_data")
MANIFEST = "manifest.json"
MIN_REGION_EXTENT_MM = 40.0


@dataclass(frozen=True)
class Case:
    """One scan to prepare."""

    name: str
    image: Path
    labels: Path | None = None
    region: str | None = None
    z_start: int | None = None
    z_stop: int | None = None


def _optional(row: dict, key: str) -> str | None:
    value = (row.get(key) or "").strip()
    return value or None


def cases_from_csv(path: Path) -> list[Case]:
    """Cases listed in a CSV (paths relative to the CSV's folder)."""
    cases = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("case") or not row.get("image"):
                raise InputError(f"'{path}': every row needs 'case' and 'image'.")
            labels, z_start, z_stop = (_optional(row, key) for key in ("labels", "z_start", "z_stop"))
            cases.append(
                Case(
                    row["case"],
                    path.parent / row["image"],
                    path.parent / labels if labels else None,
                    _optional(row, "region"),
                    int(z_start) if z_start else None,
                    int(z_stop) if z_stop else None,
                )
            )
    return cases


def cases_from_folder(folder: Path) -> list[Case]:
    """CT files in ``folder`` with optional ``NAME_seg.nii.gz`` label maps beside them."""
    cases = []
    for path in sorted(folder.iterdir()):
        name = path.name.split(".")[0]
        if name.endswith("_seg") or not (path.is_dir() or path.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha"))):
            continue
        labels = folder / f"{name}_seg.nii.gz"
        cases.append(Case(name, path, labels if labels.exists() else None))
    return cases


def totalsegmentator_available() -> bool:
    return shutil.which("TotalSegmentator") is not None


def run_totalsegmentator(ct: Volume) -> np.ndarray:
    """TotalSegmentator v2 ``total`` labels of ``ct`` (needs its command and weights installed)."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "ct.nii.gz", Path(folder) / "seg.nii.gz"
        write_volume(ct, source)
        result = subprocess.run(
            ["TotalSegmentator", "-i", str(source), "-o", str(target), "--ml", "--task", "total"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise MedDiffFMError(f"TotalSegmentator failed: {result.stderr.strip()[-500:]}")
        return pp.labels_on_grid(read_volume(target), ct.geometry).array


def anatomy_of(case: Case, ct: Volume, hu: np.ndarray, threshold_labels: bool) -> tuple[np.ndarray, str]:
    """The 118-class anatomy of a case and where it came from."""
    if case.labels is not None:
        labels = pp.labels_on_grid(read_volume(case.labels), ct.geometry).array
        return from_totalsegmentator(labels, hu), "totalsegmentator (given)"
    if totalsegmentator_available():
        return from_totalsegmentator(run_totalsegmentator(ct), hu), "totalsegmentator (computed)"
    if threshold_labels:
        return np.where(body_mask(hu), BODY_LABEL, 0).astype(np.uint8), "threshold (body only)"
    raise InputError(f"No labels for case '{case.name}'.")


def region_slices(anatomy: np.ndarray, spacing_z: float) -> dict[str, slice]:
    """Slices ``[z0, z1)`` of each region present, from the z-extent of its characteristic structures."""
    found = {}
    for region in pp.REGIONS:
        present = np.isin(anatomy, [label_of(name) for name in region_structures(region)]).any(axis=(1, 2))
        if not present.any():
            continue
        indices = np.flatnonzero(present)
        if (indices[-1] - indices[0] + 1) * spacing_z >= MIN_REGION_EXTENT_MM:
            found[region] = slice(int(indices[0]), int(indices[-1]) + 1)
    return found


def crop_z(volume: Volume, z: slice) -> Volume:
    """Slices ``z`` of a volume, with the origin moved so every voxel keeps its position."""
    return Volume.on_geometry(volume.array[z].copy(), volume.geometry.subgrid((z, slice(None), slice(None))))


def prepare_case(case: Case, output: Path, spacing: float, threshold_labels: bool) -> list[dict]:
    """Prepare one case; returns its manifest entries (one per region crop)."""
    ct = read_volume(case.image)
    if case.z_start is not None or case.z_stop is not None:
        ct = crop_z(ct, slice(case.z_start, case.z_stop))
    hu = ct.array.astype(np.float32)
    anatomy, source = anatomy_of(case, ct, hu, threshold_labels)
    working = pp.isotropic_geometry(ct.geometry, spacing)
    image = pp.resample(ct, working, fill=-1024.0)
    labels = pp.resample(Volume.on_geometry(anatomy, ct.geometry), working, labels=True)
    if case.region is not None:
        pp.check_region(case.region)
        regions = {case.region: slice(0, working.shape[0])}
    else:
        regions = region_slices(labels.array, spacing)
        if not regions:
            raise InputError(
                f"Case '{case.name}': no region found from its labels; give its region in the CSV's 'region' column."
            )
    entries = []
    for region, z in regions.items():
        stem = f"{case.name}_{region}"
        ct_path, anatomy_path = output / f"{stem}_ct.nii.gz", output / f"{stem}_anatomy.nii.gz"
        region_ct = crop_z(image, z)
        region_ct.array = np.clip(np.round(region_ct.array), -1024, 3071).astype(np.int16)
        region_labels = crop_z(labels, z)
        write_volume(region_ct, ct_path, overwrite=True)
        write_volume(region_labels, anatomy_path, overwrite=True)
        entries.append(
            dict(
                region=region,
                image=ct_path.name,
                anatomy=anatomy_path.name,
                shape=list(region_ct.array.shape),
                labels=source,
            )
        )
    return entries


def read_manifest(output: Path) -> dict:
    path = output / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"spacing_mm": None, "cases": {}}


def write_manifest(output: Path, manifest: dict) -> None:
    temporary = output / f".{MANIFEST}.part"
    temporary.write_text(json.dumps(manifest, indent=2))
    os.replace(temporary, output / MANIFEST)


def prepare(cases: list[Case], output: Path, spacing: float, threshold_labels: bool = False) -> dict:
    """Prepare every case not yet done; returns the manifest. Failed cases are recorded, not dropped."""
    output.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(output)
    if manifest["spacing_mm"] not in (None, spacing):
        raise InputError(
            f"'{output}' was prepared at {manifest['spacing_mm']} mm; use another folder for {spacing} mm."
        )
    manifest["spacing_mm"] = spacing
    missing = [
        str(c.image) for c in cases if c.labels is None and not threshold_labels and not totalsegmentator_available()
    ]
    if missing:
        raise InputError(
            "These scans have no label map and TotalSegmentator is not installed: "
            + ", ".join(missing)
            + ". Provide TotalSegmentator v2 label maps, install TotalSegmentator with its weights, or pass "
            "--threshold-labels to use thresholded body labels."
        )
    todo = [c for c in cases if manifest["cases"].get(c.name, {}).get("status") != "done"]
    for case in tqdm(todo, desc="prepare", unit="case"):
        try:
            entries = prepare_case(case, output, spacing, threshold_labels)
            manifest["cases"][case.name] = {"status": "done", "source": str(case.image), "regions": entries}
        except (MedDiffFMError, OSError, ValueError) as error:
            logger.error("case %s failed: %s", case.name, error)
            manifest["cases"][case.name] = {"status": "failed", "source": str(case.image), "error": str(error)}
        write_manifest(output, manifest)
    return manifest


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="CSV of cases (case,image[,labels,region,z_start,z_stop])")
    source.add_argument("--folder", type=Path, help="folder of CT files with optional NAME_seg.nii.gz labels")
    parser.add_argument("--output", type=Path, required=True, help="cache folder (manifest.json and region crops)")
    parser.add_argument("--spacing", type=float, default=1.0, help="isotropic spacing in mm (paper: 1.0)")
    parser.add_argument(
        "--threshold-labels", action="store_true", help="allow body-threshold labels for unlabelled scans"
    )
    args = parser.parse_args(argv)
    try:
        cases = cases_from_csv(args.csv) if args.csv else cases_from_folder(args.folder)
        manifest = prepare(cases, args.output, args.spacing, args.threshold_labels)
    except MedDiffFMError as error:
        print(f"prepare_data: error: {error}", file=sys.stderr)
        return 2
    failed = [name for name, case in manifest["cases"].items() if case["status"] == "failed"]
    done = len(manifest["cases"]) - len(failed)
    print(f"{done} cases prepared, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
