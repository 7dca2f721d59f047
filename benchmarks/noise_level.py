"""How well the automatic noise level of ``denoise`` matches the truth, on training scans only.

    python benchmarks/noise_level.py [--tuning-data FOLDER]

Each scan is given projection-domain simulated low dose at 20, 23, 26 and 29 dB (in [-160, 240]
HU); the true noise level is the standard deviation of low dose minus the noise-free reference
inside the body, on the model's 1 mm working grid, in the region's [-1, 1] scale (what DiffPIR
needs). The estimate is :func:`estimate_noise_sigma` on the input's own slices times
:func:`resampled_noise_factor`. Scans: the chest CTA (1.5 mm, chest and abdomen windows, and
resampled to 0.75 x 0.75 x 3 mm for thick slices), the abdomen CT (3 mm) and the InVesalius head CT
(0.96 x 0.96 x 1.5 mm). ``NOISE_CALIBRATION`` in ``MedDiffFMLib/tasks/denoise.py`` is the geometric
mean of true / estimate printed at the end, divided by the constant in use. The held-out scan of
``benchmarks/quality.py`` is not used here; that benchmark reports the estimate on it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib import preprocessing as pp  # noqa: E402
from MedDiffFMLib.anatomy import body_mask  # noqa: E402
from MedDiffFMLib.lowdose import simulate  # noqa: E402
from MedDiffFMLib.tasks.denoise import NOISE_CALIBRATION, estimate_noise_sigma, resampled_noise_factor  # noqa: E402
from MedDiffFMLib.volume import Geometry, Volume, read_volume  # noqa: E402
from Training.demo_data import fetch_cranium, fetch_totalsegmentator  # noqa: E402
from Training.prepare_data import crop_z  # noqa: E402

SPACING_MM = 1.0
TARGETS_DB = (20.0, 23.0, 26.0, 29.0)


def training_scans(folder: Path) -> list[tuple[str, Volume, str]]:
    reference = fetch_totalsegmentator(folder)
    cta = read_volume(reference / "aorta_report" / "example_ct.nii.gz")
    middle = cta.array.shape[0] // 2
    chest = crop_z(cta, slice(middle - 12, middle + 12))
    upper_abdomen = crop_z(cta, slice(10, 34))
    thick_geometry = pp.isotropic_geometry(chest.geometry, 0.75)
    thick_geometry = Geometry(
        (max(1, chest.array.shape[0] * 1.5 // 3),) + thick_geometry.shape[1:],
        (0.75, 0.75, 3.0),
        thick_geometry.origin,
        thick_geometry.direction,
    )
    thick = pp.resample(chest, thick_geometry)
    abdomen = crop_z(read_volume(reference / "example_ct.nii.gz"), slice(20, 60))
    head = read_volume(fetch_cranium(folder))
    middle = head.array.shape[0] // 2
    return [
        ("chest CTA, 1.5 mm (chest window)", chest, "chest"),
        ("chest CTA, 1.5 mm (abdomen window)", upper_abdomen, "abdomen"),
        ("chest CTA, 0.75 x 0.75 x 3 mm", thick, "chest"),
        ("abdomen CT, 3 mm", abdomen, "abdomen"),
        ("head CT, 0.96 x 0.96 x 1.5 mm", crop_z(head, slice(middle - 8, middle + 8)), "head_neck"),
    ]


def true_sigma(low: Volume, reference: Volume, region: str) -> float:
    working = pp.isotropic_geometry(low.geometry, SPACING_MM)
    difference = pp.hu_to_model(pp.resample(low, working).array, region) - pp.hu_to_model(
        pp.resample(reference, working).array, region
    )
    body = body_mask(reference.array).astype(np.uint8)
    inside = pp.resample(reference.with_array(body), working, labels=True).array > 0
    return float(np.std(difference[inside]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuning-data", type=Path, default=Path("quality_data"), help="folder for the training scans")
    args = parser.parse_args(argv)
    print("| scan | low dose dB | true sigma | estimate | estimate / true |")
    print("|---|---|---|---|---|")
    ratios = []
    for name, scan, region in training_scans(args.tuning_data):
        factor = resampled_noise_factor(scan.geometry, SPACING_MM)
        for target in TARGETS_DB:
            result = simulate(scan, target_psnr=target, seed=3)
            truth = true_sigma(result.low_dose, result.reference, region)
            estimate = estimate_noise_sigma(pp.hu_to_model(result.low_dose.array, region), scan.spacing) * factor
            ratios.append(estimate / truth)
            print(f"| {name} | {result.psnr:.1f} | {truth:.4f} | {estimate:.4f} | {estimate / truth:.3f} |", flush=True)
    ratios = np.asarray(ratios)
    mean = math.exp(np.log(ratios).mean())
    print(
        f"\nestimate / true: geometric mean {mean:.3f}, range {ratios.min():.3f}-{ratios.max():.3f}; "
        f"NOISE_CALIBRATION {NOISE_CALIBRATION:g} -> {NOISE_CALIBRATION / mean:.3f} would centre it"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
