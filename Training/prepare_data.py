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
``<case>_<region>_anatomy.nii.gz`` (uint8), each file atomically (temporary name, then rename). The
manifest records for each crop the slices of the source scan it was resampled from
(``source_slices``: start, stop), so that :mod:`Training.pack_data` can redo the resampling.

Scale: ``--workers N`` prepares N cases at a time in worker processes; ``--shard i/n`` (SLURM
arrays: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) or ``torchrun``'s ``RANK`` /
``WORLD_SIZE`` make each machine or job take every n-th case, so shards are disjoint. Every case
leaves a record in ``.records/<case>.json`` (done with its region crops, or failed with its error;
a failing case never stops the others); re-running skips finished cases. ``manifest.json`` is
merged from the records when a shard ends (under a lock) and with ``--merge``; it holds a summary
(cases per region, voxels, failed). Progress shows cases done and an ETA.

Usage::

    python -m Training.prepare_data --csv cases.csv --output data/prepared --spacing 1.0 --workers 8
    python -m Training.prepare_data --csv cases.csv --output data/prepared --shard 3/16   # one of 16 jobs
    python -m Training.prepare_data --output data/prepared --merge                       # after all shards
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import BODY_LABEL, body_mask, from_totalsegmentator, label_of
from MedDiffFMLib.batch import shard_of
from MedDiffFMLib.errors import InputError, MedDiffFMError
from MedDiffFMLib.region import region_structures
from MedDiffFMLib.volume import Volume, read_volume, write_volume

logger = logging.getLogger("prepare_data")
MANIFEST = "manifest.json"
RECORDS = ".records"
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
    """Whether TotalSegmentator can label scans here: its Python package, or else its command."""
    return importlib.util.find_spec("totalsegmentator") is not None or shutil.which("TotalSegmentator") is not None


def run_totalsegmentator(ct: Volume) -> np.ndarray:
    """TotalSegmentator v2 ``total`` labels of ``ct`` on its grid, through its Python API when the package
    is importable (else its command). Its weights must be installed; the error says how when they are not."""
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "ct.nii.gz", Path(folder) / "seg.nii.gz"
        write_volume(ct, source)
        if importlib.util.find_spec("totalsegmentator") is not None:
            from totalsegmentator.python_api import totalsegmentator

            try:
                totalsegmentator(str(source), str(target), ml=True, task="total", quiet=True)
            except Exception as error:  # noqa: BLE001 - its download and model errors come in many types
                raise MedDiffFMError(
                    f"TotalSegmentator failed ({error}). If its weights are missing, run "
                    "'totalseg_download_weights -t total' on a computer with network access (or copy them into "
                    "TOTALSEG_HOME_DIR), or give label maps in the CSV's 'labels' column."
                ) from error
        else:
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
    source_slices = slice(case.z_start, case.z_stop).indices(ct.array.shape[0])[:2]
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
                source_slices=list(source_slices),
            )
        )
    return entries


def read_manifest(output: Path) -> dict:
    path = output / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"spacing_mm": None, "cases": {}}


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


def write_manifest(output: Path, manifest: dict) -> None:
    _write_json(output / MANIFEST, manifest)


def read_records(output: Path) -> dict[str, dict]:
    """Every case's record (``.records/<case>.json``), by case name."""
    folder = output / RECORDS
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        record = json.loads(path.read_text())
        records[record["case"]] = record
    return records


def summary_of(cases: dict[str, dict]) -> dict:
    """Cases per region, region crops, voxels, done and failed cases of a manifest's ``cases``."""
    regions, voxels = Counter(), 0
    for case in cases.values():
        for entry in case.get("regions", []) if case["status"] == "done" else []:
            regions[entry["region"]] += 1
            voxels += int(np.prod(entry["shape"]))
    failed = sorted(name for name, case in cases.items() if case["status"] == "failed")
    return {
        "cases_done": len(cases) - len(failed),
        "cases_failed": len(failed),
        "failed": failed,
        "crops_per_region": dict(sorted(regions.items())),
        "voxels": voxels,
    }


@contextlib.contextmanager
def _locked(output: Path):
    """An exclusive lock on ``output/.manifest.lock`` where the platform has ``fcntl`` (POSIX)."""
    with open(output / ".manifest.lock", "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def merge_manifest(output: Path, spacing: float | None = None) -> dict:
    """Merge the case records into ``manifest.json`` (atomically, under a lock); returns the manifest."""
    with _locked(output):
        manifest = read_manifest(output)
        records = read_records(output)
        for name, record in records.items():
            manifest["cases"][name] = {key: value for key, value in record.items() if key not in ("case", "spacing_mm")}
        spacings = {record["spacing_mm"] for record in records.values()} | ({spacing} if spacing else set())
        if len(spacings - {None}) > 1:
            raise InputError(f"'{output}' holds cases prepared at different spacings: {sorted(spacings - {None})}.")
        manifest["spacing_mm"] = next(iter(spacings - {None}), manifest["spacing_mm"])
        manifest["summary"] = summary_of(manifest["cases"])
        write_manifest(output, manifest)
    return manifest


def _prepare_one(case: Case, output: Path, spacing: float, threshold_labels: bool) -> dict:
    """Prepare one case and write its record; errors become a 'failed' record (also in worker processes)."""
    try:
        entries = prepare_case(case, output, spacing, threshold_labels)
        record = {"status": "done", "source": str(case.image), "regions": entries}
    except (MedDiffFMError, OSError, ValueError, RuntimeError, MemoryError) as error:
        record = {"status": "failed", "source": str(case.image), "error": f"{type(error).__name__}: {error}"}
    record = {"case": case.name, "spacing_mm": spacing, **record}
    _write_json(output / RECORDS / f"{case.name}.json", record)
    return record


def prepare(
    cases: list[Case],
    output: Path,
    spacing: float,
    threshold_labels: bool = False,
    workers: int = 1,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Prepare this shard's cases that are not done yet; returns the merged manifest.

    Cases are sorted by name and shard ``(i, n)`` takes every n-th from the i-th, so shards are
    disjoint. ``workers > 1`` runs that many cases at a time in separate processes.
    """
    names = [case.name for case in cases]
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise InputError(f"Case names must be unique; repeated: {', '.join(duplicates)}.")
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
    output.mkdir(parents=True, exist_ok=True)
    (output / RECORDS).mkdir(exist_ok=True)
    manifest = merge_manifest(output)
    if manifest["spacing_mm"] not in (None, spacing):
        raise InputError(
            f"'{output}' was prepared at {manifest['spacing_mm']} mm; use another folder for {spacing} mm."
        )
    index, count = shard
    mine = sorted(cases, key=lambda case: case.name)[index::count]
    todo = [c for c in mine if manifest["cases"].get(c.name, {}).get("status") != "done"]
    logger.info(
        "shard %d/%d: %d cases, %d already done, %d to prepare",
        index,
        count,
        len(mine),
        len(mine) - len(todo),
        len(todo),
    )
    progress = tqdm(total=len(todo), desc="prepare", unit="case")
    if workers <= 1 or len(todo) <= 1:
        for case in todo:
            _report(_prepare_one(case, output, spacing, threshold_labels))
            progress.update()
    else:
        context = multiprocessing.get_context("spawn")
        processes = min(workers, len(todo))
        threads = max(1, (os.cpu_count() or 1) // processes)
        with concurrent.futures.ProcessPoolExecutor(
            processes, mp_context=context, initializer=_share_cores, initargs=(threads,)
        ) as pool:
            futures = [pool.submit(_prepare_one, case, output, spacing, threshold_labels) for case in todo]
            for future in concurrent.futures.as_completed(futures):
                _report(future.result())
                progress.update()
    progress.close()
    return merge_manifest(output, spacing)


def _share_cores(threads: int) -> None:
    """Worker start-up: SimpleITK's filters use this worker's share of the cores, not all of them."""
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _report(record: dict) -> None:
    if record["status"] == "failed":
        logger.error("case %s failed: %s", record["case"], record["error"])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="CSV of cases (case,image[,labels,region,z_start,z_stop])")
    source.add_argument("--folder", type=Path, help="folder of CT files with optional NAME_seg.nii.gz labels")
    source.add_argument("--merge", action="store_true", help="only merge the case records into manifest.json")
    parser.add_argument("--output", type=Path, required=True, help="cache folder (manifest.json and region crops)")
    parser.add_argument("--spacing", type=float, default=1.0, help="isotropic spacing in mm (paper: 1.0)")
    parser.add_argument(
        "--threshold-labels", action="store_true", help="allow body-threshold labels for unlabelled scans"
    )
    parser.add_argument("--workers", type=int, default=1, help="cases prepared at a time in worker processes")
    parser.add_argument(
        "--shard", help="i/n: prepare every n-th case from the i-th (default: torchrun RANK/WORLD_SIZE)"
    )
    args = parser.parse_args(argv)
    try:
        if args.merge:
            manifest = merge_manifest(args.output)
        else:
            cases = cases_from_csv(args.csv) if args.csv else cases_from_folder(args.folder)
            shard = shard_of(args.shard)
            manifest = prepare(cases, args.output, args.spacing, args.threshold_labels, args.workers, shard)
    except MedDiffFMError as error:
        print(f"prepare_data: error: {error}", file=sys.stderr)
        return 2
    summary = manifest["summary"]
    regions = ", ".join(f"{region} {n}" for region, n in summary["crops_per_region"].items()) or "none"
    print(
        f"{summary['cases_done']} cases prepared ({regions}; {summary['voxels'] / 1e6:.1f} M voxels), "
        f"{summary['cases_failed']} failed{': ' + ', '.join(summary['failed']) if summary['failed'] else ''}"
    )
    return 1 if summary["cases_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
