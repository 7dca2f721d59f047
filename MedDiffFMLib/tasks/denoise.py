"""Low-dose CT denoising with DiffPIR (zero-shot, Docs/METHOD.md 1.5)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .. import preprocessing as pp
from ..anatomy import body_mask
from ..device import make_generator
from ..diffusion.diffpir import diffpir
from ..diffusion.sliding_window import Conditions
from ..errors import InputError
from ..preprocessing import REGION_CLASS, check_region
from ..progress import CancelToken, ProgressCallback, no_progress
from ..region import detect_region
from ..task_spec import TASKS, RunContext, TaskResult
from ..volume import Geometry, Volume
from .engine import Engine, anatomy_on, checked_ct

SPEC = TASKS["denoise"]
DEFAULT_STEPS, DEFAULT_LAMBDA, DEFAULT_ZETA, DEFAULT_NOISE_GAIN = (
    SPEC.setting(name).default for name in ("steps", "lam", "zeta", "noise_gain")
)
NEIGHBOURHOOD_MM = 5.0
NOISE_PERCENTILE = 25
NOISE_CALIBRATION = 1.26
NOISE_CORRELATION_PX = 0.9


def estimate_noise_sigma(image: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """Noise standard deviation of a CT image ``[z, y, x]`` on its own grid, in the image's units.

    The local standard deviation is taken in-plane over about 5 x 5 mm (at least 3 x 3 pixels;
    ``spacing`` is (x, y, z) in mm) where no voxel is clipped by the window (|value| < 0.95) and the
    values are not all equal (padding outside the field of view, e.g. -1024 HU); the 25th percentile
    of those values, the spread of homogeneous tissue, times ``NOISE_CALIBRATION`` is the estimate.
    The constant was fitted on projection-domain simulated low-dose CT of the training scans
    (``benchmarks/noise_level.py``). Working on the input's own slices avoids the
    bias of interpolated slices, whose noise is lower than the scan's; :func:`resampled_noise_factor`
    carries the estimate to another grid.
    """
    image = np.asarray(image, dtype=np.float64)
    pixels = max(3, int(round(NEIGHBOURHOOD_MM / min(spacing[0], spacing[1]))) | 1)
    size = (1, pixels, pixels)
    count = pixels * pixels
    mean = ndimage.uniform_filter(image, size=size)
    variance = np.maximum(ndimage.uniform_filter(image * image, size=size) - mean * mean, 0.0) * count / (count - 1)
    # Constant neighbourhoods are padding (outside the scanner's field of view), not tissue.
    usable = ndimage.minimum_filter(np.abs(image) < 0.95, size=size) & (variance > 1e-12)
    if usable.sum() < 1000:
        raise InputError(
            "Too few voxels inside the window to estimate the noise level; give the noise level explicitly "
            "(sigma_n in the model's [-1, 1] scale, e.g. 0.05)."
        )
    return float(np.percentile(np.sqrt(variance[usable]), NOISE_PERCENTILE) * NOISE_CALIBRATION)


def resampled_noise_factor(source: Geometry, spacing_mm: float) -> float:
    """Ratio of the noise standard deviation after linear resampling of ``source`` to ``spacing_mm``.

    Measured on reconstructed-CT-like noise (Gaussian-correlated in-plane over
    ``NOISE_CORRELATION_PX`` pixels, independent between slices) on a block of ``source`` of up to
    12 x 96 x 96 voxels, resampled to the isotropic grid over it (:func:`isotropic_geometry`, as
    the working grid is made). Interpolation averages neighbouring voxels, so the factor is below 1
    when the working grid is finer than the input's.
    """
    block = source.subgrid(tuple(slice(0, min(n, limit)) for n, limit in zip(source.shape, (12, 96, 96))))
    noise = np.random.default_rng(0).standard_normal(block.shape)
    noise = ndimage.gaussian_filter(noise, (0, NOISE_CORRELATION_PX, NOISE_CORRELATION_PX))
    noise = (noise / noise.std()).astype(np.float32)
    resampled = pp.resample(Volume.on_geometry(noise, block), pp.isotropic_geometry(block, spacing_mm)).array
    interior = tuple(slice(1, -1) if n > 4 else slice(None) for n in resampled.shape)
    return float(resampled[interior].std())


@dataclass
class DenoiseResult:
    """The denoised CT (HU, input grid) and the settings that were used."""

    volume: Volume
    region: str
    region_source: str
    sigma_n: float
    t_start: int
    network_evaluations: int
    skipped_windows: int


def denoise(
    ct: Volume,
    engine: Engine,
    region: str | None = None,
    anatomy: Volume | None = None,
    sigma_n: float | str = "auto",
    lam: float = DEFAULT_LAMBDA,
    steps: int = DEFAULT_STEPS,
    zeta: float = DEFAULT_ZETA,
    seed: int | None = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    skip_air: bool = True,
    noise_gain: float = DEFAULT_NOISE_GAIN,
) -> DenoiseResult:
    """Denoise a (low-dose) CT with DiffPIR.

    Args:
        ct: CT in HU on any grid.
        engine: the loaded base model.
        region: ``head_neck``, ``chest`` or ``abdomen``; detected when None (see :mod:`.region`).
        anatomy: optional anatomy label map (any overlapping grid) used for conditioning and region detection.
        sigma_n: noise std in the model's [-1, 1] scale on the working grid, or ``auto`` to estimate it.
        lam: DiffPIR lambda (weight of the prior against the data; larger trusts the model more).
        steps: network evaluations between t_start and 0 (uniform skipping).
        zeta: share of fresh noise when stepping down (0..1).
        seed: random seed (None for a random one).
        skip_air: skip windows entirely outside the body (those voxels keep the input's values).
        noise_gain: DiffPIR runs at ``noise_gain * sigma_n`` (see
            :data:`~MedDiffFMLib.task_spec.DENOISE_NOISE_GAIN`; 1 for
            white noise).

    Returns:
        A :class:`DenoiseResult`. Structures outside the region window (air, lung, bone) are carried
        over unchanged; noise spikes past the window edge take the model's value
        (:func:`~MedDiffFMLib.preprocessing.outside_window_structures`, margin: the noise level).
    """
    hu = checked_ct(ct)
    body = body_mask(hu)
    labels = anatomy_on(anatomy, ct.geometry, hu, body)
    if region is None:
        region, source = detect_region(ct, hu, labels, body)
    else:
        check_region(region)
        source = "given"
    grid = engine.grid(ct.geometry, region)
    y0 = torch.from_numpy(grid.image(hu)).to(engine.device)
    working_labels = None if labels is None else torch.from_numpy(grid.labels(labels))
    factor = resampled_noise_factor(ct.geometry, engine.config.spacing_mm)
    if sigma_n == "auto":
        sigma_n = estimate_noise_sigma(pp.hu_to_model(hu, region), ct.spacing) * factor
    sigma_n = float(sigma_n)
    if not sigma_n > 0:
        raise InputError(f"The noise level must be positive, got {sigma_n}.")
    noise_hu = sigma_n / factor * pp.REGIONS[region].width / 2
    if not noise_gain > 0:
        raise InputError(f"The noise gain must be positive, got {noise_gain}.")
    level = sigma_n * noise_gain
    # Windows at least two working voxels outside the body need no network call.
    outside_body = torch.from_numpy(~ndimage.binary_dilation(grid.mask(body), iterations=2))
    known = (outside_body, y0) if skip_air else None
    predictor = engine.predictor(Conditions(REGION_CLASS[region], working_labels), grid.working.shape, known=known)
    with torch.no_grad():
        x0 = diffpir(
            predictor,
            engine.schedule,
            y0,
            level,
            lam,
            steps,
            zeta,
            make_generator(seed),
            progress=progress,
            cancel=cancel,
        )
    t_start = engine.schedule.timestep_for_sigma(level)
    volume = grid.restore(
        x0,
        ct,
        hu,
        keep=pp.outside_window_structures(hu, region, noise_hu),
        MedDiffFM_task="denoise",
        MedDiffFM_model=engine.name,
        MedDiffFM_sigma_n=f"{sigma_n:.5f}",
        MedDiffFM_noise_gain=f"{noise_gain:g}",
        MedDiffFM_t_start=str(t_start),
        MedDiffFM_seed=str(seed),
        MedDiffFM_skipped_windows=str(predictor.skipped_windows),
    )
    return DenoiseResult(volume, region, source, sigma_n, t_start, predictor.evaluations, predictor.skipped_windows)


def run(engine: Engine, inputs: dict[str, Volume], settings: dict, context: RunContext) -> TaskResult:
    """The ``denoise`` task (:data:`~MedDiffFMLib.task_spec.TASKS`): ``ct`` and optional ``anatomy`` in."""
    result = denoise(inputs["ct"], engine, anatomy=inputs.get("anatomy"), **context.keywords(), **settings)
    fields = {name: getattr(result, name) for name in ("region", "region_source", "sigma_n", "t_start")}
    fields.update(network_evaluations=result.network_evaluations, skipped_windows=result.skipped_windows)
    message = (
        f"region {result.region} ({result.region_source}), sigma_n {result.sigma_n:.4f}, t_start {result.t_start}, "
        f"{result.network_evaluations} window evaluations"
    )
    return TaskResult({"volume": result.volume}, fields, message)
