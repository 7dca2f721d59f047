"""Fetch and convert the CT that installs offline, for training the demonstration models.

Sources (both reachable from package registries, so they work where model hubs and dataset hosts
do not):

* the source archive of the PyPI package ``totalsegmentator`` 2.18.0 (Apache-2.0): an abdomen CT
  (``example_ct.nii.gz``, 3 mm), an upper-abdomen DICOM series with TotalSegmentator labels, and a
  chest CT angiography (``aorta_report/example_ct.nii.gz``, 1.5 mm);
* the Debian package ``invesalius-examples`` (GPL-2): a head CT inside ``Cranium.inv3``
  (``matrix.dat``: int16, 108 x 256 x 256, 0.957 x 0.957 x 1.5 mm). It is converted locally and
  never committed.

The bundled test sample ``example_ct_sm.nii.gz`` is slices 82-111 of ``example_ct.nii.gz``; those
slices (and a 4-slice gap) are held out of the 3 mm demonstration models' training, so their
figures on the sample are measured on data the model has not seen.

Writes ``<output>/cases.csv`` for :mod:`Training.prepare_data`. Two case lists:

* ``demo`` (the 3 mm demonstration models): the four scans, the DICOM series with its labels;
* ``base1mm`` (``meddiff-fm-1mm``): the whole abdomen CT with its TotalSegmentator labels
  (``example_seg_fast_force_split.nii.gz``; versions 0.3 and 0.4 used slices 0-77 only, which hold
  no spleen, stomach, ribs or costal cartilage and 3 % of the liver), the chest CTA with the
  TotalSegmentator masks its aorta and pulmonary reports ship (heart, aorta and its branches, T12;
  the iliac masks lie outside this CT; since 2026-12-07, :func:`chest_cta_labels`) and the head CT;
  the upper-abdomen DICOM series (0.98 x 0.98 x 2 mm) is held out entirely, as the held-out scan of
  ``benchmarks/quality.py`` and ``meddiff-fm demo``.

Usage::

    python -m Training.demo_data --output data/demo_raw [--cases base1mm]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from MedDiffFMLib.anatomy import label_of
from MedDiffFMLib.preprocessing import labels_on_grid
from MedDiffFMLib.volume import Volume, read_volume, write_volume

TOTALSEGMENTATOR = "totalsegmentator==2.18.0"
REFERENCE = "totalsegmentator-2.18.0/tests/reference_files"
HELD_OUT_FROM_SLICE = 78
CRANIUM_SHAPE = (108, 256, 256)
CRANIUM_SPACING = (0.95703125, 0.95703125, 1.5)
CRANIUM_DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
# TotalSegmentator masks of the chest CTA in the archive's report test results (each on its own
# crop of the CT), by the TotalSegmentator v2 class they are; later masks overwrite earlier ones.
CHEST_CTA_MASKS = {
    "pulmonary_report/models/heart.nii.gz": "heart",
    "aorta_report/test_result/models/aorta.nii.gz": "aorta",
    "aorta_report/test_result/models/brachiocephalic_trunk.nii.gz": "brachiocephalic_trunk",
    "aorta_report/test_result/models/subclavian_artery_left.nii.gz": "subclavian_artery_left",
    "aorta_report/test_result/models/common_carotid_artery_left.nii.gz": "common_carotid_artery_left",
    "aorta_report/test_result/models/iliac_artery_left.nii.gz": "iliac_artery_left",
    "aorta_report/test_result/models/iliac_artery_right.nii.gz": "iliac_artery_right",
    "aorta_report/test_result/models/vertebrae_T12.nii.gz": "vertebrae_T12",
}


def fetch_totalsegmentator(folder: Path) -> Path:
    """Download and unpack the totalsegmentator source archive; returns its reference-file folder."""
    target = folder / REFERENCE
    if target.exists():
        return target
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            TOTALSEGMENTATOR,
            "-d",
            str(folder),
        ],
        check=True,
    )
    with tarfile.open(next(folder.glob("totalsegmentator-2.18.0.tar.gz"))) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(REFERENCE) or m.name.endswith("/LICENSE")]
        archive.extractall(folder, members=members, filter="data")
    return target


def fetch_cranium(folder: Path) -> Path:
    """Download ``invesalius-examples`` with apt and convert the head CT to NIfTI (HU, LPS geometry)."""
    target = folder / "cranium.nii.gz"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["apt-get", "download", "invesalius-examples"], cwd=work, check=True)
        package = next(Path(work).glob("invesalius-examples_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(package), str(Path(work) / "root")], check=True)
        project = next(Path(work).glob("root/**/Cranium.inv3"))
        with tarfile.open(project) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("matrix.dat"))
            data = archive.extractfile(member).read()
    array = np.frombuffer(data, dtype=np.int16).reshape(CRANIUM_SHAPE).copy()
    write_volume(Volume(array, CRANIUM_SPACING, (0.0, 0.0, 0.0), CRANIUM_DIRECTION), target)
    return target


def chest_cta_labels(reference: Path, output: Path) -> Path:
    """Write the chest CTA's TotalSegmentator v2 label map (``CHEST_CTA_MASKS``, each brought onto
    the CT's grid by physical position, nearest neighbour) to ``output``; other voxels are 0."""
    if output.exists():
        return output
    ct = read_volume(reference / "aorta_report" / "example_ct.nii.gz")
    labels = np.zeros(ct.array.shape, dtype=np.uint8)
    for path, name in CHEST_CTA_MASKS.items():
        mask = labels_on_grid(read_volume(reference / path), ct.geometry, f"mask '{path}'").array > 0
        labels[mask] = label_of(name)
    write_volume(ct.with_array(labels), output)
    return output


def write_cases(output: Path, cases: str = "demo") -> Path:
    """Fetch everything and write the ``cases.csv`` of a training set (``demo`` or ``base1mm``)."""
    output.mkdir(parents=True, exist_ok=True)
    reference = fetch_totalsegmentator(output)
    chest = dict(case="ts_chest_cta", image=reference / "aorta_report" / "example_ct.nii.gz", region="chest")
    head = dict(case="invesalius_cranium", image=fetch_cranium(output), region="head_neck")
    if cases == "base1mm":
        abdomen = dict(
            case="ts_abdomen",
            image=reference / "example_ct.nii.gz",
            labels=reference / "example_seg_fast_force_split.nii.gz",
        )
        chest["labels"] = chest_cta_labels(reference, output / "ts_chest_cta_labels.nii.gz")
        rows = [abdomen, chest, head]
    else:
        rows = [
            dict(
                case="ts_abdomen", image=reference / "example_ct.nii.gz", region="abdomen", z_stop=HELD_OUT_FROM_SLICE
            ),
            dict(
                case="ts_dicom",
                image=reference / "example_ct_dicom",
                labels=reference / "example_seg_dicom.nii.gz",
                region="abdomen",
            ),
            chest,
            head,
        ]
    path = output / "cases.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["case", "image", "labels", "region", "z_start", "z_stop"])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: str(value) for key, value in row.items()})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the offline-installable CT used to train the demo models.")
    parser.add_argument("--output", type=Path, required=True, help="folder for the raw data and cases.csv")
    parser.add_argument("--cases", choices=("demo", "base1mm"), default="demo", help="which training set")
    args = parser.parse_args(argv)
    print(f"wrote {write_cases(args.output, args.cases)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
