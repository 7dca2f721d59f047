"""Low-dose CT denoising with DiffPIR (zero-shot, Docs/METHOD.md 1.5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import ndimage

from .. import preprocessing as pp
from ..anatomy import body_mask
from ..device import make_generator
from ..diffusion.diffpir import diffpir
from ..diffusion.sliding_window import Conditions
from ..errors import InputError
from ..noise_level import estimate_noise_sigma, resampled_noise_factor
from ..preprocessing import REGION_CLASS, check_region
from ..progress import CancelToken, ProgressCallback, no_progress
from ..region import detect_region
from ..task_spec import TASKS, RunContext, TaskResult
from ..volume import Volume
from .engine import Engine, anatomy_on, checked_ct

SPEC = TASKS["denoise"]
DEFAULT_STEPS, DEFAULT_LAMBDA, DEFAULT_ZETA, DEFAULT_NOISE_GAIN = (
    SPEC.setting(name).default for name in ("steps", "lam", "zeta", "noise_gain")
)


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
        sigma_n = estimate_noise_sigma(hu, region, ct.spacing) * factor
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
