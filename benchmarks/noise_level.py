"""Fit and check the automatic noise level of ``denoise`` on training scans only.

    python benchmarks/noise_level.py [--tuning-data FOLDER]

Each scan is given projection-domain simulated low dose: ``I0`` calibrated to 23 dB (in [-160, 240]
HU), then scaled for 17, 20, 26, 29 and 32 dB (noise variance about 1 / I0; the PSNR reached is
printed). The true noise level is the standard deviation of low dose minus the noise-free reference
inside the body, on the model's 1 mm working grid, in the region's [-1, 1] scale (what DiffPIR
needs); divided by :func:`resampled_noise_factor` it is the level on the input's grid that
:func:`noise_statistic_hu` is fitted to. Scans: the chest CTA (1.5 mm, chest and abdomen windows,
and resampled to 0.75 x 0.75 x 3 mm for thick slices), the abdomen CT (3 mm) and the InVesalius head
CT (0.96 x 0.96 x 1.5 mm). Prints the table with the constants in use, the least-squares power law
(``NOISE_LAW_SCALE``, ``NOISE_LAW_EXPONENT`` in ``MedDiffFMLib/noise_level.py``) and its
leave-one-scan-out error. The held-out scan of ``benchmarks/quality.py`` is not used here; that
benchmark reports the estimate on it.
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
from MedDiffFMLib.lowdose import LowDoseSimulator, square_pixel_mm  # noqa: E402
from MedDiffFMLib.noise_level import (  # noqa: E402
    NOISE_LAW_EXPONENT,
    NOISE_LAW_SCALE,
    estimate_noise_sigma,
    noise_statistic_hu,
    resampled_noise_factor,
)
from MedDiffFMLib.volume import Geometry, Volume, read_volume  # noqa: E402
from Training.demo_data import fetch_cranium, fetch_totalsegmentator  # noqa: E402
from Training.prepare_data import crop_z  # noqa: E402

SPACING_MM = 1.0
CALIBRATION_DB = 23.0
TARGETS_DB = (17.0, 20.0, 23.0, 26.0, 29.0, 32.0)


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


def power_law(statistic: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Least squares ``log truth = log scale + exponent * log statistic``: (scale, exponent)."""
    exponent, intercept = np.polyfit(np.log(statistic), np.log(truth), 1)
    return math.exp(intercept), float(exponent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tuning-data", type=Path, default=Path("quality_data"), help="folder for the training scans")
    args = parser.parse_args(argv)
    print("| scan | low dose dB | statistic HU | true sigma | estimate | estimate / true |")
    print("|---|---|---|---|---|---|")
    names, statistics, truths, ratios = [], [], [], []
    for name, scan, region in training_scans(args.tuning_data):
        factor = resampled_noise_factor(scan.geometry, SPACING_MM)
        half_width = pp.REGIONS[region].width / 2
        simulator = LowDoseSimulator(scan.array, square_pixel_mm(scan))
        calibration = simulator.calibrate(CALIBRATION_DB, seed=3)
        reference = scan.with_array(simulator.reference)
        for target in TARGETS_DB:
            i0 = calibration.i0 * 10.0 ** ((target - CALIBRATION_DB) / 10.0)
            low = calibration.low_dose if target == CALIBRATION_DB else simulator.low_dose(i0, seed=3)
            truth = true_sigma(scan.with_array(low), reference, region)
            statistic = noise_statistic_hu(low, region, scan.spacing)
            estimate = estimate_noise_sigma(low, region, scan.spacing) * factor
            names.append(name)
            statistics.append(statistic)
            truths.append(truth / factor * half_width)
            ratios.append(estimate / truth)
            print(
                f"| {name} | {simulator.psnr(low):.1f} | {statistic:.1f} | {truth:.4f} | {estimate:.4f} | "
                f"{estimate / truth:.3f} |",
                flush=True,
            )
    names, statistics, truths, ratios = map(np.asarray, (names, statistics, truths, ratios))
    print(
        f"\nwith the constants in use (scale {NOISE_LAW_SCALE:g}, exponent {NOISE_LAW_EXPONENT:g}): estimate / true "
        f"{ratios.min():.3f}-{ratios.max():.3f}, log error sd {np.log(ratios).std():.3f}"
    )
    scale, exponent = power_law(statistics, truths)
    errors = []
    for name in dict.fromkeys(names):
        held = names == name
        fold_scale, fold_exponent = power_law(statistics[~held], truths[~held])
        errors.extend(np.log(fold_scale * statistics[held] ** fold_exponent / truths[held]))
    errors = np.asarray(errors)
    print(
        f"least squares over all scans: NOISE_LAW_SCALE {scale:.3f}, NOISE_LAW_EXPONENT {exponent:.3f}; "
        f"leave one scan out: estimate / true {math.exp(errors.min()):.3f}-{math.exp(errors.max()):.3f}, "
        f"log error sd {errors.std():.3f}; statistic range {statistics.min():.1f}-{statistics.max():.1f} HU"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
