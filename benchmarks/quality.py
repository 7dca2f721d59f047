"""Each task against what a user would otherwise use, on a real scan the models never saw, in one run.

    python benchmarks/quality.py [--model PATH] [--tasks denoise anomaly super-resolution]
                                 [--output quality_output] [--tuning-data FOLDER] [--quick]

Held-out scan: the upper-abdomen DICOM series bundled in ``Testing/Data/totalsegmentator_example``
(512 x 512 x 20, 0.98 x 0.98 x 2 mm, with its TotalSegmentator labels). It is in no training set of
the models this benchmark is run for (their cards say so) and nothing is tuned on it.

Tuning scans (baselines' parameters, DiffPIR's lambda, steps and noise gain, the anomaly timestep): the chest
CTA and the abdomen CT of the ``totalsegmentator`` 2.18.0 source archive (fetched with pip into
``--tuning-data``), which are training data. Denoising is tuned in the held-out case's region window
on the CTA's upper-abdominal slices.

1. Denoising: projection-domain simulated low dose (23 dB in [-160, 240] HU) of the held-out scan
   (whole slices simulated; the central 256 x 256 mm scored, liver, spine and bowel);
   DiffPIR blind (automatic noise level) and with the true noise level (each with its own tuned
   noise gain) against a Gaussian filter, non-local means (scikit-image) and curvature anisotropic
   diffusion (SimpleITK, Slicer's own filter). PSNR and SSIM in [-160, 240] HU inside the body.
   Also the working grid alone: the low-dose scan resampled to the model's grid and back, and what
   ``meddiff-fm denoise LOW OUT`` gives (the task's default settings, region detected, no anatomy).
2. Anomaly detection: six seeded lesions (5-15 mm, three hypo- and three hyperdense) in the held-out
   liver; pixel AUROC inside the liver and image (slice) AUROC, against |HU - liver median|; all
   score maps get the same Gaussian smoothing. The model with the CT around the liver as context
   (the default; t and draws tuned on the training CT), as the paper does (liver alone, t = 950),
   and with the command line's default t and draws (nothing tuned).
3. Super-resolution: 6 mm slab averages of the held-out 2 mm slices back to 2 mm (no held-out scan
   has 1 mm slices, so the paper's 5 -> 1 mm case cannot be scored here); the SR ControlNet (when
   one exists for the base model) against cubic and linear interpolation.
4. Synthesis from the held-out TotalSegmentator map (its label 0 is both air and unlabelled tissue;
   the body is derived from the labelled structures): the share of true air synthesised below
   -900 HU, the body outline's Dice, and every large organ's median HU against the real scan's.
5. Lesions (when a lesion ControlNet exists for the base model): a 12 mm sphere painted in the
   held-out liver. Inpainting: its HU statistics, the share that came out as air, its contrast to
   the liver (whole, and 2-8 mm around it) against the training lesions' range, and the voxels
   changed outside the mask. Generation: the same mask in a CT synthesised from the held-out labels
   (96 mm around it), with the whole synthesis conditioned on it (the default) and with the lesion
   RePainted into the lesion-free synthesis (``--scope lesion``); its contrast to the synthetic
   liver (whole, and around it), and how much the lesion changes the liver more than 10 mm away
   from it (against the same model's synthesis without the lesion, same seed).

Without ``--model`` each task runs the model the command line runs for it (the catalogue's
``default_for``, with its ControlNet), so that one run gives the figures a user gets; ``--model``
runs one base model for every task (with its newest ControlNets). Prints one Markdown table per task
and writes a PNG per task into ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_roc_auc
from scipy import ndimage
from scipy.special import expit
from skimage.metrics import structural_similarity
from skimage.restoration import denoise_nl_means

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib import preprocessing as pp  # noqa: E402
from MedDiffFMLib.anatomy import CLASS_NAMES, body_mask, from_totalsegmentator, label_of, organ_mask  # noqa: E402
from MedDiffFMLib.diffusion.operators import ZSlabAverage  # noqa: E402
from MedDiffFMLib.errors import MedDiffFMError  # noqa: E402
from MedDiffFMLib.figures import comparison_png  # noqa: E402
from MedDiffFMLib.lowdose import simulate  # noqa: E402
from MedDiffFMLib.metrics import psnr, scaled_pair  # noqa: E402
from MedDiffFMLib.model import load_controlled_model, load_model, load_task_model, resolve_weights  # noqa: E402
from MedDiffFMLib.task_spec import START_FROM, TASKS  # noqa: E402
from MedDiffFMLib.tasks import (  # noqa: E402
    Engine,
    denoise,
    detect_anomalies,
    generate_lesion,
    inpaint_lesion,
    super_resolve,
    synthesize,
)
from MedDiffFMLib.tasks.engine import EngineOptions  # noqa: E402
from MedDiffFMLib.volume import Volume, read_volume  # noqa: E402
from Training.demo_data import fetch_totalsegmentator  # noqa: E402
from Training.make_pairs import LESION_CONTRAST_HU  # noqa: E402
from Training.prepare_data import crop_z  # noqa: E402

TEST_DATA = ROOT / "Testing" / "Data" / "totalsegmentator_example"
WINDOW = pp.Window(40.0, 400.0)
LOW_DOSE_PSNR = 23.0
SR_EXTENT_MM = 160.0


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


def held_out() -> tuple[Volume, Volume]:
    """The held-out CT (HU) and its TotalSegmentator label map on the CT's grid."""
    ct = read_volume(TEST_DATA / "example_ct_dicom")
    labels = pp.labels_on_grid(read_volume(TEST_DATA / "example_seg_dicom.nii.gz"), ct.geometry)
    return ct, labels


def crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    return Volume.on_geometry(volume.array[box].copy(), volume.geometry.subgrid(box))


def body_box(hu: np.ndarray, margin: int = 4) -> tuple[slice, slice, slice]:
    """All slices and the in-plane bounding box of the body (plus ``margin`` voxels)."""
    inside = np.argwhere(body_mask(hu).any(axis=0))
    low = np.maximum(inside.min(axis=0) - margin, 0)
    high = np.minimum(inside.max(axis=0) + margin + 1, hu.shape[1:])
    return slice(None), slice(int(low[0]), int(high[0])), slice(int(low[1]), int(high[1]))


def central_box(shape: tuple[int, ...], spacing: tuple[float, float, float], extent_mm: float) -> tuple[slice, ...]:
    """All slices and the central ``extent_mm`` x ``extent_mm`` in-plane (``spacing`` is (x, y, z))."""
    half = [round(extent_mm / 2 / s) for s in spacing[1::-1]]
    centre = [n // 2 for n in shape[1:]]
    return (slice(None), *(slice(max(c - h, 0), c + h) for c, h in zip(centre, half)))


def ssim(reference: np.ndarray, test: np.ndarray, mask: np.ndarray) -> float:
    """Mean 3D SSIM (7-voxel window, [-160, 240] HU scaled to [0, 1]) over the voxels in ``mask``."""
    a, b = scaled_pair(reference, test, WINDOW)
    _, full = structural_similarity(a, b, data_range=1.0, win_size=7, full=True)
    return float(full[mask].mean())


# --- baselines -------------------------------------------------------------------------------------


def gaussian(volume: Volume, sigma_mm: float) -> np.ndarray:
    sigma = [sigma_mm / s for s in volume.spacing[::-1]]
    return ndimage.gaussian_filter(volume.array.astype(np.float32), sigma)


def nl_means(volume: Volume, h_hu: float) -> np.ndarray:
    """Non-local means per axial slice (5 x 5 patches, search radius 6 pixels), filter strength ``h_hu``."""
    image = volume.array.astype(np.float32)
    return np.stack(
        [denoise_nl_means(plane, patch_size=5, patch_distance=6, h=h_hu, fast_mode=True) for plane in image]
    ).astype(np.float32)


def anisotropic_diffusion(volume: Volume, time_mm2: float, conductance: float) -> np.ndarray:
    """SimpleITK's curvature anisotropic diffusion (Slicer's filter) in physical units, run for the
    diffusion time ``time_mm2`` (mm^2: the same smoothing on any grid, so a setting tuned on one scan
    carries over to another) in equal steps of at most 0.05 mm^2, below ITK's stability limit for
    this filter (0.5 / 2^3 = 0.0625) and 0.9 of that times the smallest spacing squared (mm^2)."""
    limit = min(0.05, 0.9 * 0.0625 * min(volume.spacing) ** 2)
    iterations = max(1, math.ceil(time_mm2 / limit - 1e-9))
    image = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    result = sitk.CurvatureAnisotropicDiffusion(
        image, timeStep=time_mm2 / iterations, conductanceParameter=conductance, numberOfIterations=iterations
    )
    return sitk.GetArrayFromImage(result).astype(np.float32)


# Denoising is tuned and scored in the held-out case's region window; the tuning slab is the part of
# the chest CTA (1.5 mm, contrast-enhanced) that shows the same anatomy.
DENOISE_REGION = "abdomen"
DENOISE_TUNING_SLICES = slice(10, 34)

BASELINE_GRIDS = {
    "Gaussian filter": (gaussian, [dict(sigma_mm=s) for s in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)]),
    "non-local means (scikit-image)": (nl_means, [dict(h_hu=h) for h in (20.0, 30.0, 40.0, 55.0, 70.0, 90.0)]),
    "curvature anisotropic diffusion (SimpleITK)": (
        anisotropic_diffusion,
        [
            dict(time_mm2=t, conductance=c)
            for t, c in itertools.product((0.25, 0.5, 1.0, 2.0, 4.0), (0.5, 1.0, 2.0, 4.0))
        ],
    ),
}


@dataclass
class DenoiseCase:
    low: Volume
    reference: Volume
    body: np.ndarray

    @classmethod
    def simulated(cls, ct: Volume, box: tuple[slice, slice, slice], seed: int) -> DenoiseCase:
        result = simulate(ct, target_psnr=LOW_DOSE_PSNR, seed=seed)
        reference = crop(result.reference, box)
        return cls(crop(result.low_dose, box), reference, body_mask(reference.array))

    def score(self, array: np.ndarray) -> tuple[float, float]:
        return psnr(self.reference.array, array, WINDOW, self.body), ssim(self.reference.array, array, self.body)


def tuning_case(tuning: Path) -> DenoiseCase:
    """A training scan for tuning, in the held-out case's region: 24 axial slices (36 mm) of the chest
    CTA's upper abdomen (liver, spleen, stomach; simulated whole), the central 160 x 160 mm scored."""
    cta = read_volume(fetch_totalsegmentator(tuning) / "aorta_report" / "example_ct.nii.gz")
    slab = crop_z(cta, DENOISE_TUNING_SLICES)
    return DenoiseCase.simulated(slab, central_box(slab.array.shape, slab.spacing, 160.0), seed=7)


def true_sigma(engine: Engine, case: DenoiseCase, region: str) -> float:
    """The noise level in the model's scale on its working grid: std of low dose - reference in the body."""
    grid = engine.grid(case.low.geometry, region)
    low, reference = grid.image(case.low.array), grid.image(case.reference.array)
    body = grid.mask(case.body)
    return float(np.std((low - reference)[body]))


def tune_diffpir(engine: Engine, tune: DenoiseCase, sigma_n: float | str, grid: list[dict]) -> dict:
    """DiffPIR's settings from ``grid`` that score best on the tuning case at noise level ``sigma_n``
    ("auto" or the model-scale level)."""
    scores = []
    for settings in grid:
        result = denoise(tune.low, engine, DENOISE_REGION, sigma_n=sigma_n, seed=0, **settings)
        scores.append((tune.score(result.volume.array)[0], settings))
        level = sigma_n if isinstance(sigma_n, str) else f"{sigma_n:.4f}"
        print(f"tuning DiffPIR (noise level {level}): {settings} -> {scores[-1][0]:.2f} dB", flush=True)
    return max(scores, key=lambda pair: pair[0])[1]


def tune_baselines(tune: DenoiseCase) -> dict[str, tuple[float, dict]]:
    """Each classical baseline's best PSNR (dB) on the tuning case and the settings of its grid that give it."""
    return {
        name: max(((tune.score(function(tune.low, **settings))[0], settings) for settings in grid), key=lambda p: p[0])
        for name, (function, grid) in BASELINE_GRIDS.items()
    }


def bench_denoise(engine: Engine, tuning: Path, output: Path, quick: bool) -> None:
    tune = tuning_case(tuning)
    chosen = {name: settings for name, (_, settings) in tune_baselines(tune).items()}
    auto_grid = [dict(lam=10.0, steps=4, noise_gain=gain) for gain in (1.0, 2.0, 3.0, 4.0)]
    if not quick:
        auto_grid += [dict(lam=1.0, steps=4, noise_gain=3.0), dict(lam=10.0, steps=10, noise_gain=3.0)]
    tuned = {"auto": tune_diffpir(engine, tune, "auto", auto_grid)}
    # The automatic level under-estimates the true one (0.72 of it on the tuning and held-out scans), so
    # the true level gets its own gain: at the automatic level's gain it over-smooths.
    true_grid = [dict(lam=10.0, steps=4, noise_gain=gain) for gain in (1.0, 1.5, 2.0, 3.0)]
    if not quick:
        true_grid += [dict(lam=10.0, steps=10, noise_gain=gain) for gain in (2.0, 3.0)]
    tuned["true"] = tune_diffpir(engine, tune, true_sigma(engine, tune, DENOISE_REGION), true_grid)
    print(f"\ntuned on the chest CTA's upper abdomen (training data): {chosen}; DiffPIR {tuned}")

    ct, labels = held_out()
    box = central_box(ct.array.shape, ct.spacing, 256.0)
    case = DenoiseCase.simulated(ct, box, seed=1)
    region = DENOISE_REGION
    rows, figures = [], [case.low, case.reference]
    low_psnr, low_ssim = case.score(case.low.array)
    rows.append(["low dose (input)", "", f"{low_psnr:.2f}", f"{low_ssim:.3f}", "", ""])
    working = engine.grid(case.low.geometry, region).working
    round_trip = pp.resample(pp.resample(case.low, working), case.low.geometry).array
    trip_psnr, trip_ssim = case.score(round_trip)
    rows.append(
        [
            f"working grid alone ({engine.config.spacing_mm:g} mm and back)",
            "",
            f"{trip_psnr:.2f}",
            f"{trip_ssim:.3f}",
            f"{trip_psnr - low_psnr:+.2f}",
            "",
        ]
    )
    best_baseline = -math.inf
    for name, (function, _) in BASELINE_GRIDS.items():
        started = time.perf_counter()
        array = function(case.low, **chosen[name])
        seconds = time.perf_counter() - started
        value, structure = case.score(array)
        best_baseline = max(best_baseline, value)
        settings = ", ".join(f"{k}={v:g}" for k, v in chosen[name].items())
        rows.append([name, settings, f"{value:.2f}", f"{structure:.3f}", f"{value - low_psnr:+.2f}", f"{seconds:.0f}"])
        figures.append(case.low.with_array(array))
    anatomy = labels.with_array(labels.array)
    sigma = true_sigma(engine, case, region)
    for label, sigma_n, settings in (
        ("DiffPIR, automatic noise level", "auto", tuned["auto"]),
        ("DiffPIR, true noise level", sigma, tuned["true"]),
    ):
        started = time.perf_counter()
        result = denoise(
            case.low,
            engine,
            region,
            anatomy=crop(anatomy, box),
            sigma_n=sigma_n,
            seed=0,
            **settings,
        )
        seconds = time.perf_counter() - started
        value, structure = case.score(result.volume.array)
        rows.append(
            [
                f"{label} ({engine.name})",
                f"sigma_n={result.sigma_n:.4f} x {settings['noise_gain']:g}, t_start={result.t_start}, "
                f"{result.network_evaluations} evaluations",
                f"{value:.2f}",
                f"{structure:.3f}",
                f"{value - low_psnr:+.2f}",
                f"{seconds:.0f}",
            ]
        )
        figures.append(result.volume)
    # What `meddiff-fm denoise LOW OUT` does: the task's and the engine's defaults (window overlap 0.5
    # where the rows above use 0.25), region detected, no anatomy, nothing tuned.
    cli = EngineOptions()
    started = time.perf_counter()
    result = denoise(case.low, dataclasses.replace(engine, overlap=cli.overlap, batch_size=cli.batch_size))
    seconds = time.perf_counter() - started
    value, structure = case.score(result.volume.array)
    spec = TASKS["denoise"]
    defaults = ", ".join(f"{name} {spec.setting(name).default:g}" for name in ("steps", "noise_gain", "lam"))
    defaults += f", overlap {cli.overlap:g}"
    rows.append(
        [
            f"DiffPIR, command-line defaults ({engine.name})",
            f"{defaults}, sigma_n={result.sigma_n:.4f}, {result.network_evaluations} evaluations",
            f"{value:.2f}",
            f"{structure:.3f}",
            f"{value - low_psnr:+.2f}",
            f"{seconds:.0f}",
        ]
    )
    figures.append(result.volume)
    automatic = float(rows[-3][2])
    rows.append(["best baseline -> DiffPIR (automatic, tuned)", "", "", "", f"{automatic - best_baseline:+.2f}", ""])
    rows.append(["best baseline -> DiffPIR (defaults)", "", "", "", f"{value - best_baseline:+.2f}", ""])
    table(
        "Denoising: held-out upper-abdomen CT, 0.98 x 0.98 x 2 mm, simulated low dose",
        ["method", "settings", "PSNR dB", "SSIM", "gain dB", "s"],
        rows,
    )
    captions = ["low dose", "reference", "Gaussian", "NL-means", "aniso. diff.", "DiffPIR auto", "DiffPIR true"]
    captions.append("DiffPIR defaults")
    comparison_png(figures, captions, WINDOW, output / "denoise.png")


# --- anomaly detection -----------------------------------------------------------------------------


def seed_lesions(ct: Volume, organ: np.ndarray, count: int, seed: int) -> tuple[Volume, np.ndarray]:
    """``count`` ellipsoidal lesions (diameters 5-15 mm, contrast -60..-20 or +20..+40 HU, 1 mm soft
    edge) added to the CT inside ``organ``, alternately hypo- and hyperdense, each fully inside."""
    rng = np.random.default_rng(seed)
    spacing = np.asarray(ct.spacing[::-1])
    inner = ndimage.distance_transform_edt(organ, sampling=spacing)
    grid = np.indices(organ.shape).reshape(3, -1).T * spacing
    hu = ct.array.astype(np.float32)
    lesions = np.zeros(organ.shape, dtype=bool)
    for index in range(count):
        radii = rng.uniform(2.5, 7.5, 3)
        candidates = np.argwhere((inner > radii.max() + 1) & ~ndimage.binary_dilation(lesions, iterations=4))
        centre = candidates[rng.integers(len(candidates))] * spacing
        distance = np.sqrt((((grid - centre) / radii) ** 2).sum(axis=1)).reshape(organ.shape)
        contrast = rng.uniform(-60, -20) if index % 2 == 0 else rng.uniform(20, 40)
        weight = expit(-(distance - 1.0) * radii.mean() / 0.5)
        hu += contrast * weight
        lesions |= distance <= 1.0
    return ct.with_array(hu), lesions & organ


def smoothed(score: np.ndarray, spacing: tuple[float, float, float], sigma_mm: float = 1.5) -> np.ndarray:
    return ndimage.gaussian_filter(score, [sigma_mm / s for s in spacing[::-1]])


def aurocs(score: np.ndarray, lesions: np.ndarray, organ: np.ndarray) -> tuple[float, float]:
    """Pixel AUROC inside the organ and slice AUROC (a slice's score: its organ's maximum)."""
    pixel = float(compute_roc_auc(torch.from_numpy(score[organ]), torch.from_numpy(lesions[organ].astype(np.int64))))
    slices = [z for z in range(score.shape[0]) if organ[z].any()]
    slice_scores = torch.tensor([score[z][organ[z]].max() for z in slices])
    slice_labels = torch.tensor([int(lesions[z].any()) for z in slices])
    image = float(compute_roc_auc(slice_scores, slice_labels)) if 0 < slice_labels.sum() < len(slices) else math.nan
    return pixel, image


def median_baseline(ct: Volume, organ: np.ndarray) -> np.ndarray:
    """The baseline anomaly score: ``|HU - organ median|``, smoothed."""
    hu = ct.array.astype(np.float32)
    return smoothed(np.abs(hu - np.median(hu[organ])), ct.spacing)


def seeded_training_slab(
    ct: Volume, segmentation: Volume, first: int, seed: int, slices: int = 30
) -> tuple[Volume, Volume, np.ndarray, np.ndarray]:
    """``(seeded CT, labels, lesion mask, liver mask)``: slices ``first`` to ``first + slices`` of a
    training CT with six lesions seeded in its liver (:func:`seed_lesions`), its labels on that slab."""
    slab = crop_z(ct, slice(first, first + slices))
    labels = pp.labels_on_grid(segmentation, slab.geometry)
    liver = organ_mask(from_totalsegmentator(labels.array), ["liver"])
    seeded, lesions = seed_lesions(slab, liver, 6, seed=seed)
    return seeded, labels, lesions, liver


def bench_anomaly(engine: Engine, tuning: Path, output: Path, quick: bool) -> None:
    reference = fetch_totalsegmentator(tuning)
    seeded, train_labels, lesions, train_liver = seeded_training_slab(
        read_volume(reference / "example_ct.nii.gz"),
        read_volume(reference / "example_seg_fast_force_split.nii.gz"),
        first=48,
        seed=11,
    )
    scores = []
    for t, draws in [(t, d) for t in ((150, 300, 600, 950) if not quick else (300, 600)) for d in (2, 8)]:
        result = detect_anomalies(seeded, train_labels, ["liver"], engine, "abdomen", t=t, draws=draws, seed=0)
        value = aurocs(smoothed(np.abs(result.anomaly_map.array), seeded.spacing), lesions, train_liver)[0]
        scores.append((value, t, draws))
    _, t, draws = max(scores)
    print(f"\nanomaly t and draws tuned on the training abdomen CT (seeded lesions): t = {t}, {draws} draws {scores}")

    ct, labels = held_out()
    liver = organ_mask(from_totalsegmentator(labels.array), ["liver"])
    seeded, lesions = seed_lesions(ct, liver, 6, seed=3)
    baseline = median_baseline(seeded, liver)
    result = detect_anomalies(seeded, labels, ["liver"], engine, "abdomen", t=t, draws=draws, seed=0)
    model_map = smoothed(np.abs(result.anomaly_map.array), ct.spacing)
    paper = detect_anomalies(seeded, labels, ["liver"], engine, "abdomen", t=950, draws=draws, organ_only=True, seed=0)
    # What `meddiff-fm detect-anomalies CT MAP --anatomy LABELS --organ liver` gives: the task's defaults.
    spec = TASKS["detect_anomalies"]
    defaults = detect_anomalies(seeded, labels, ["liver"], engine)
    rows = []
    for name, score in (
        ("|HU - liver median|, smoothed", baseline),
        (f"MedDiffFM t={t}, {draws} draws, CT around the liver as context ({engine.name})", model_map),
        (
            f"MedDiffFM as the paper: liver alone, t=950, {draws} draws",
            smoothed(np.abs(paper.anomaly_map.array), ct.spacing),
        ),
        (
            f"MedDiffFM, command-line defaults (t={spec.setting('t').default}, {spec.setting('draws').default} draw)",
            smoothed(np.abs(defaults.anomaly_map.array), ct.spacing),
        ),
    ):
        pixel, image = aurocs(score, lesions, liver)
        rows.append([name, f"{pixel:.3f}", f"{image:.3f}"])
    rows.append(["model - baseline", f"{float(rows[1][1]) - float(rows[0][1]):+.3f}", ""])
    rows.append(["model with the defaults - baseline", f"{float(rows[3][1]) - float(rows[0][1]):+.3f}", ""])
    table(
        f"Anomaly detection: 6 seeded liver lesions (5-15 mm) in the held-out CT ({int(lesions.sum())} lesion voxels)",
        ["method", "pixel AUROC", "slice AUROC"],
        rows,
    )
    centre = int(np.argmax(lesions.sum(axis=(1, 2))))
    maps = [
        seeded.with_array(np.where(liver, m / max(float(m[liver].max()), 1e-6) * 400.0 - 160.0, -160.0))
        for m in (baseline, model_map)
    ]
    comparison_png(
        [seeded, seeded.with_array(np.where(lesions, 240.0, -160.0)), *maps],
        ["seeded CT", "lesions", "baseline map", "model map"],
        WINDOW,
        output / "anomaly.png",
        centre,
    )


# --- super-resolution ------------------------------------------------------------------------------


def controlled_engine(engine: Engine, task: str, folder: Path) -> tuple[Engine | None, str]:
    """An engine with the newest ``task`` ControlNet trained on ``engine``'s base model (installed,
    shipped, or a checkpoint in ``folder``, the base model's own folder), or (None, why)."""
    try:
        weights = resolve_weights(task=task, base_sha256=engine.model.card.sha256, folders=(folder,))
    except MedDiffFMError as error:
        return None, f"not run: {error}".split(". ")[0]
    model = load_controlled_model(engine.model, weights, task)
    return Engine(model, device=engine.device, batch_size=8, overlap=0.25, precision=engine.precision), ""


def slab_pair(ct: Volume, factor: int, extent_mm: float = SR_EXTENT_MM) -> tuple[Volume, Volume]:
    """``(thin, thick)``: ``ct``'s central ``extent_mm`` in-plane (its slices cut to a multiple of
    ``factor``), and the averages of its slabs of ``factor`` slices, each placed at its slab's centre."""
    depth = ct.array.shape[0] // factor * factor
    thin = crop(ct, (slice(0, depth), *central_box(ct.array.shape, ct.spacing, extent_mm)[1:]))
    slabs = thin.array.astype(np.float32).reshape(depth // factor, factor, *thin.array.shape[1:]).mean(axis=1)
    first = thin.geometry.subgrid((slice(0, depth, factor), slice(None), slice(None)))
    spacing = (thin.spacing[0], thin.spacing[1], thin.spacing[2] * factor)
    origin = first.index_to_physical() @ np.array([0.0, 0.0, (factor - 1) / 2.0, 1.0])
    return thin, Volume(slabs, spacing, tuple(origin[:3]), thin.direction)


SR_DRAWS = 4
"""Posterior samples averaged in the benchmark's second super-resolution row (the command line's
``--draws``; its default is 1): their mean approaches the posterior mean, which PSNR rewards."""


def bench_super_resolution(sr_engine: Engine | None, why: str, output: Path) -> None:
    """The held-out CT's central 160 x 160 mm: 6 mm slab averages back to its 2 mm slices, with the SR
    ControlNet of ``sr_engine`` (None: the baselines only, and ``why`` in the table)."""
    ct, _ = held_out()
    factor = 3
    thin, thick = slab_pair(ct, factor)
    body = body_mask(thin.array)
    rows = []
    interpolators = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}
    for name, order in (
        ("each thick slice repeated (the ControlNet's condition)", 0),
        ("linear interpolation", 1),
        ("cubic interpolation", 3),
    ):
        image = sitk.Resample(
            thick.to_sitk(), thin.geometry.to_sitk_reference(), sitk.Transform(), interpolators[order], -1024.0
        )
        array = sitk.GetArrayFromImage(image)
        rows.append([name, f"{psnr(thin.array, array, WINDOW, body):.2f}", f"{ssim(thin.array, array, body):.3f}"])
    consistent = ZSlabAverage(factor).interpolate(torch.from_numpy(thick.array)).numpy()
    rows.append(
        [
            "cubic made consistent with the slabs (the SR start, no model)",
            f"{psnr(thin.array, consistent, WINDOW, body):.2f}",
            f"{ssim(thin.array, consistent, body):.3f}",
        ]
    )
    figures = [thin, Volume.on_geometry(array, thin.geometry)]
    if sr_engine is None:
        rows.append(["SR ControlNet", why, ""])
    else:
        steps = TASKS["super_resolve"].setting("steps").default
        for draws in (1, SR_DRAWS):
            started = time.perf_counter()
            result = super_resolve(thick, sr_engine, spacing=thin.spacing[2], steps=steps, draws=draws, seed=0).array
            seconds = time.perf_counter() - started
            if result.shape != thin.array.shape:
                rows.append([sr_engine.name, f"not scored: output {result.shape}, reference {thin.array.shape}", ""])
                break
            rows.append(
                [
                    f"SR ControlNet {sr_engine.name}, {steps} steps"
                    + (f", mean of {draws} draws (--draws {draws})" if draws > 1 else "")
                    + f" ({seconds:.0f} s)",
                    f"{psnr(thin.array, result, WINDOW, body):.2f}",
                    f"{ssim(thin.array, result, body):.3f}",
                ]
            )
            figures.append(thin.with_array(result))
    comparison_png(
        figures,
        ["2 mm (held out)", f"cubic from {thick.spacing[2]:g} mm", "SR ControlNet", f"mean of {SR_DRAWS} draws"][
            : len(figures)
        ],
        WINDOW,
        output / "super_resolution.png",
    )
    table(
        f"Super-resolution: {thick.spacing[2]:g} mm slab averages of the held-out CT (central {SR_EXTENT_MM:g} mm) "
        f"back to {thin.spacing[2]:g} mm",
        ["method", "PSNR dB", "SSIM"],
        rows,
    )


# --- lesions --------------------------------------------------------------------------------------


def synthesis_steps(quick: bool) -> int:
    """DDIM steps (eta 1, the command line's sampler) of synthesis and lesion generation: 50 as on
    the command line, 20 with ``--quick``."""
    return 20 if quick else 50


def bench_lesions(lesion_engine: Engine | None, why: str, output: Path, quick: bool) -> None:
    """A 12 mm sphere in the held-out liver. Inpainting: it must not come out as air, the voxels
    around it must be kept, and its contrast to the liver should fall in the training lesions'
    range. Generation: the same mask in a CT synthesised from the held-out labels (a 96 mm cube
    around it), per scope; its contrast to the synthetic liver, against the same range, and the
    liver away from it against the synthesis without the lesion (empty mask, same seed). Run with the
    lesion ControlNet of ``lesion_engine`` (None: ``why`` is printed instead)."""
    if lesion_engine is None:
        table("Lesion inpainting and generation", ["model", "result"], [["lesion ControlNet", why]])
        return
    ct, labels = held_out()
    liver = organ_mask(from_totalsegmentator(labels.array), ["liver"])
    spacing = np.asarray(ct.spacing[::-1])
    inner = ndimage.distance_transform_edt(liver, sampling=spacing)
    centre = np.unravel_index(int(np.argmax(inner)), liver.shape)
    distance = np.sqrt((((np.indices(liver.shape).T - np.asarray(centre)) * spacing) ** 2).sum(axis=-1)).T
    mask = distance <= 6.0
    low, high = LESION_CONTRAST_HU
    started = time.perf_counter()
    result = inpaint_lesion(ct, ct.with_array(mask.astype(np.uint8)), lesion_engine, "abdomen", labels, seed=0)
    seconds = time.perf_counter() - started
    inside, outside = result.array[mask], result.array[~mask] != ct.array[~mask]
    liver_mean = float(ct.array[liver & ~mask].mean())
    shell = liver & (distance > 8.0) & (distance <= 14.0)  # the liver 2-8 mm around the lesion
    rows = [
        ["inpainting: mean / std HU inside the painted lesion", f"{inside.mean():.0f} / {inside.std():.0f}", ""],
        [
            "inpainting: share of lesion voxels below -500 HU (air)",
            f"{100 * float((inside < -500).mean()):.1f} %",
            "0 %",
        ],
        [
            "inpainting: lesion mean - liver mean (HU)",
            f"{inside.mean() - liver_mean:+.0f}",
            f"training lesions {low:+.0f} .. {high:+.0f}",
        ],
        [
            "inpainting: lesion mean - mean of the liver 2-8 mm around it (HU)",
            f"{inside.mean() - ct.array[shell].mean():+.0f}",
            "",
        ],
        [f"inpainting: voxels changed outside the mask ({seconds:.0f} s)", f"{int(outside.sum())}", "0"],
    ]
    half = [int(round(48.0 / s)) for s in spacing]
    box = tuple(slice(max(0, c - h), min(n, c + h)) for c, h, n in zip(centre, half, liver.shape))
    liver_box, mask_box = liver[box], mask[box]
    real_liver = ct.array[box][liver_box & ~mask_box]
    real = f"real {real_liver.mean():.0f} / {real_liver.std():.0f}"
    # The default start (auto: the painted anatomy where the base card has typical HU) for both scopes;
    # the full run adds the method's pure-noise start.
    variants = [("volume", "auto"), ("lesion", "auto")] + ([] if quick else [("volume", "noise")])
    lesion_box = crop(ct.with_array(mask.astype(np.uint8)), box)
    plain: dict[str, Volume] = {}
    far = liver_box & (ndimage.distance_transform_edt(~mask_box, sampling=spacing) > 10.0)
    generated = {}
    for scope, start_from in variants:
        started = time.perf_counter()
        volume = generate_lesion(
            crop(labels, box),
            lesion_box,
            "abdomen",
            lesion_engine,
            sampler="ddim",
            steps=synthesis_steps(quick),
            seed=0,
            start_from=start_from,
            scope=scope,
        )
        seconds = time.perf_counter() - started
        name = f"generation, scope {scope}, from {start_from}"
        generated[name] = volume
        if start_from not in plain:  # same seed, same labels, an empty lesion mask: the CT without the lesion
            plain[start_from] = synthesize(
                crop(labels, box),
                "abdomen",
                lesion_engine,
                sampler="ddim",
                steps=synthesis_steps(quick),
                seed=0,
                control=np.zeros(lesion_box.array.shape, dtype=np.float32),
                start_from=start_from,
            )
        synthetic_liver = volume.array[liver_box & ~mask_box]
        made = volume.array[mask_box]
        change = np.abs(volume.array - plain[start_from].array)[far]
        rows += [
            [f"{name}: mean / std HU inside the lesion ({seconds:.0f} s)", f"{made.mean():.0f} / {made.std():.0f}", ""],
            [
                f"{name}: synthetic liver mean / std HU around it ({real})",
                f"{synthetic_liver.mean():.0f} / {synthetic_liver.std():.0f}",
                "",
            ],
            [
                f"{name}: lesion mean - synthetic liver mean (HU)",
                f"{made.mean() - synthetic_liver.mean():+.0f}",
                f"training lesions {low:+.0f} .. {high:+.0f}",
            ],
            [
                f"{name}: lesion mean - mean of the synthetic liver 2-8 mm around it (HU)",
                f"{made.mean() - volume.array[shell[box]].mean():+.0f}",
                "",
            ],
            [
                f"{name}: median / 90th percentile absolute HU change in the liver > 10 mm from the lesion, against "
                "the same model's synthesis without it (empty mask, same seed)",
                f"{np.median(change):.0f} / {np.percentile(change, 90):.0f}",
                "0" if scope == "lesion" else "small against the liver's std",
            ],
        ]
    table(
        f"Lesion inpainting and generation: a 12 mm sphere in the held-out liver ({lesion_engine.name})",
        ["measure", "value", "expected"],
        rows,
    )
    comparison_png([ct, result], ["held-out CT", "inpainted lesion"], WINDOW, output / "lesion.png", int(centre[0]))
    comparison_png(
        [crop(ct, box), *generated.values(), plain["auto"]],
        ["held-out CT", *(name.replace("generation, ", "") for name in generated), "without the lesion, same seed"],
        WINDOW,
        output / "lesion_generation.png",
        int(centre[0] - box[0].start),
    )


# --- synthesis -------------------------------------------------------------------------------------


ASKED_START = "real-medians"
COMPARED_STARTS = (*(start for start in START_FROM if start != "auto"), ASKED_START)
"""Synthesis starts the benchmark compares: pure noise, the anatomy painted with the card's typical HU,
and the anatomy painted with the held-out scan's own medians given as typical HU (``label_hu``, the
command line's ``--typical-hu``): an oracle table, which measures how far the model follows a table it
is given (a contrast phase, say), not a result against the target."""

START_HEADERS = {ASKED_START: "start from anatomy, asked for the real scan's medians (--typical-hu; oracle)"}


def bench_synthesis(engine: Engine, output: Path, quick: bool, starts: tuple[str, ...] = COMPARED_STARTS) -> None:
    """Synthesis from the held-out TotalSegmentator map (no body class: the body is derived), from
    each of ``starts`` (:data:`COMPARED_STARTS`); the painted starts need a model card with the
    typical HU of the abdomen's labels."""
    trained = engine.typical_hu("abdomen")
    window = pp.REGIONS["abdomen"]
    ct, labels = held_out()
    box = body_box(ct.array, margin=24)
    liver = labels.array == label_of("liver")
    middle = (box[2].start + box[2].stop) // 2
    left = liver[:, box[1], box[2].start : middle].sum() >= liver[:, box[1], middle : box[2].stop].sum()
    box = (box[0], box[1], slice(box[2].start, middle) if left else slice(middle, box[2].stop))
    real, anatomy = crop(ct, box), crop(labels, box)
    steps = synthesis_steps(quick)
    starts = [start for start in starts if trained or start == "noise"]
    real_medians = {
        int(value): float(np.median(real.array[anatomy.array == value])) for value in np.unique(anatomy.array) if value
    }
    keywords = {
        "noise": dict(start_from="noise"),
        "anatomy": dict(start_from="anatomy"),
        ASKED_START: dict(start_from="anatomy", label_hu=real_medians),
    }
    synthetic, seconds = {}, {}
    for start_from in starts:
        started = time.perf_counter()
        synthetic[start_from] = synthesize(
            anatomy, "abdomen", engine, sampler="ddim", steps=steps, eta=1.0, seed=0, **keywords[start_from]
        ).array
        seconds[start_from] = time.perf_counter() - started
    real_body = body_mask(real.array)
    air = (real.array < -900) & ~real_body
    dice = {}
    for start_from, array in synthetic.items():
        synthetic_body = body_mask(array)
        dice[start_from] = 2 * float((synthetic_body & real_body).sum()) / float(synthetic_body.sum() + real_body.sum())
    rows = [
        [
            "true air (< -900 HU, outside the body) synthesised below -900 HU",
            *(f"{100 * float((array[air] < -900).mean()):.1f} %" for array in synthetic.values()),
            ">= 95 %",
        ],
        ["body outline Dice (thresholded body masks)", *(f"{dice[start]:.3f}" for start in starts), ""],
    ]
    organs = []
    for value in np.unique(anatomy.array):
        mask = anatomy.array == value
        if value == 0 or mask.sum() < 2000:
            continue
        real_median = real_medians[int(value)]
        medians = [float(np.median(array[mask])) for array in synthetic.values()]
        painted = float(np.clip(trained[value], window.low, window.high)) if value in trained else math.nan
        organs.append((CLASS_NAMES[value], real_median, medians, painted))
        seen = f"training median {trained[value]:.0f}" if value in trained else "not in the card's training labels"
        rows.append(
            [
                f"{CLASS_NAMES[value]} median HU (real {real_median:.0f}; {seen})",
                *(f"{median:.0f} ({median - real_median:+.0f})" for median in medians),
                "within 25 HU",
            ]
        )

    def within(chosen: list) -> list[str]:
        return [f"{sum(abs(m[i] - a) <= 25 for _, a, m, _ in chosen)} of {len(chosen)}" for i in range(len(starts))]

    rows += [
        [
            "structures (>= 2000 voxels) with median within 25 HU of the real (seconds: "
            + ", ".join(f"{seconds[start]:.0f}" for start in starts)
            + ")",
            *within(organs),
            "all",
        ],
        [
            f"of them with a real median below the window's top ({window.high:g} HU; bone above it cannot be made)",
            *within([organ for organ in organs if organ[1] < window.high]),
            "",
        ],
        [
            "of them in the card's training labels",
            *within([organ for organ in organs if label_of(organ[0]) in trained]),
            "",
        ],
    ]
    if trained:
        learned = [organ for organ in organs if label_of(organ[0]) in trained]
        rows.append(
            [
                "label fidelity: of the structures in the card's training labels, synthesised within 25 HU of "
                "their training median (the held-out scan's contrast aside, does the model follow the label map?)",
                *(
                    f"{sum(abs(m[i] - c) <= 25 for _, _, m, c in learned)} of {len(learned)}"
                    for i in range(len(starts))
                ),
                "all",
            ]
        )
        rows.append(
            [
                "baseline: each structure painted with its training median (window-clipped), within 25 HU",
                f"{sum(abs(c - a) <= 25 for _, a, _, c in organs)} of {len(organs)}",
                *[""] * (len(starts) - 1),
                "the labelled training data's limit",
            ]
        )
    headers = [START_HEADERS.get(start, f"start from {start}") for start in starts]
    table(
        f"Synthesis from the held-out TotalSegmentator map ({engine.name}; body derived; DDIM eta 1, {steps} steps)",
        ["measure", *headers, "target"],
        rows,
    )
    comparison_png(
        [real, *(real.with_array(array) for array in synthetic.values())],
        ["real (held out)", *(f"synthesised, {header}" for header in headers)],
        WINDOW,
        output / "synthesis.png",
    )


BENCH_TASKS = {
    "denoise": ("denoise", None),
    "anomaly": ("detect_anomalies", None),
    "super-resolution": ("super_resolve", "controlnet-sr"),
    "synthesis": ("synthesize", None),
    "lesions": ("inpaint_lesion", "controlnet-lesion"),
}
"""Each benchmark's task (a :data:`~MedDiffFMLib.task_spec.TASKS` key, whose catalogue model it runs
when no model is named) and the ControlNet it needs."""


def engine_for(bench: str, model: str | None, precision: str) -> tuple[Engine | None, str]:
    """The engine benchmark ``bench`` runs, or (None, why): with ``model`` None, the network the
    command line runs for its task (the catalogue's pick, :func:`load_task_model`); else that base
    model, with its newest ControlNet where the task needs one (:func:`controlled_engine`)."""
    task_key, controlnet_task = BENCH_TASKS[bench]
    options = {"device": "auto", "batch_size": 8, "overlap": 0.25, "precision": precision}
    if model is None:
        try:
            network = load_task_model(task_key=task_key, controlnet_task=controlnet_task)
        except MedDiffFMError as error:
            if controlnet_task is None:
                raise
            return None, f"not run: {error}".split(". ")[0]
        return Engine(network, **options), ""
    weights = resolve_weights(model)
    engine = Engine(load_model(weights), **options)
    if controlnet_task is None:
        return engine, ""
    return controlled_engine(engine, controlnet_task, weights.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        help="base model for every task (path or catalogue name; default: each task's catalogue model, "
        "as the command line runs it)",
    )
    parser.add_argument("--tasks", nargs="+", choices=list(BENCH_TASKS), default=list(BENCH_TASKS))
    parser.add_argument("--output", type=Path, default=Path("quality_output"))
    parser.add_argument(
        "--tuning-data",
        type=Path,
        default=Path("quality_tuning"),
        help="folder for the totalsegmentator archive (training scans used for tuning)",
    )
    parser.add_argument("--precision", default="auto", help="network precision (Engine; auto: bf16 where native)")
    parser.add_argument("--quick", action="store_true", help="smaller tuning grids")
    parser.add_argument(
        "--synthesis-starts",
        nargs="+",
        choices=COMPARED_STARTS,
        default=list(COMPARED_STARTS),
        help="where synthesis starts (the painted ones only for models whose card has typical HU)",
    )
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    args.tuning_data.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    print(f"{platform.machine()}, torch {torch.__version__}, {threads} threads, precision {args.precision}")
    benches = {
        "denoise": lambda engine, _: bench_denoise(engine, args.tuning_data, args.output, args.quick),
        "anomaly": lambda engine, _: bench_anomaly(engine, args.tuning_data, args.output, args.quick),
        "super-resolution": lambda engine, why: bench_super_resolution(engine, why, args.output),
        "synthesis": lambda engine, _: bench_synthesis(engine, args.output, args.quick, tuple(args.synthesis_starts)),
        "lesions": lambda engine, why: bench_lesions(engine, why, args.output, args.quick),
    }
    failed = []
    for task in args.tasks:
        started = time.perf_counter()
        try:
            engine, why = engine_for(task, args.model, args.precision)
            if engine is not None:
                print(f"\n{task}: {engine.name} ({engine.config.spacing_mm:g} mm) on {engine.device}", flush=True)
            benches[task](engine, why)
        except Exception:  # one task's failure must not hide the others' results
            traceback.print_exc()
            failed.append(task)
        print(f"({task}: {time.perf_counter() - started:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
