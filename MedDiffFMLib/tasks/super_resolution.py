"""z-axis super-resolution of thick-slice CT (ControlNet + DiffPIR, Docs/METHOD.md 1.5).

The thick CT is brought in-plane to the model's spacing, keeping its slices; ``H`` averages
``factor`` thin working slices into one thick slice (``factor`` = thick spacing / model spacing).
The ControlNet is conditioned on the thick volume brought to the thin grid (``H^+ y``). DiffPIR
starts from the thick volume's cubic B-spline interpolation along z, made consistent with the data
(``H`` of it is ``y``) and noised to ``t_start`` (``sigma_bar = sigma_n``); it applies the data
step ``x0 + H^+(y - H x0) / (1 + rho_t)`` at every step and ends with an exact projection
(``rho = 0``). With ``draws > 1`` the estimate is the mean of that many independent posterior
samples (lower error, less invented texture; still consistent, since every sample is).

The result is the same consistent cubic interpolation built on the input's own in-plane grid at
the requested slice spacing, plus the model's change to its start (resampled from the working
grid; averaged over each output slice when those are thicker), projected exactly onto the data:
the working grid's in-plane resampling touches only what the model adds, and the result's slab
averages reproduce the input. Slabs of thick slices outside the window (which the model cannot
represent) keep the cubic interpolation.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import preprocessing as pp
from ..device import make_generator, randn
from ..diffusion.diffpir import diffpir
from ..diffusion.operators import ZSlabAverage
from ..diffusion.sliding_window import Conditions
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from ..region import detect_region
from ..task_spec import TASKS, RunContext, TaskResult
from ..volume import Geometry, Volume
from ..working_grid import WorkingGrid
from .engine import Engine, checked_ct

SPEC = TASKS["super_resolve"]
DEFAULT_STEPS, DEFAULT_SIGMA, DEFAULT_LAMBDA, DEFAULT_ZETA, DEFAULT_DRAWS = (
    SPEC.setting(name).default for name in ("steps", "sigma_n", "lam", "zeta", "draws")
)


def thin_geometry(thick: Geometry, factor: int) -> Geometry:
    """The grid whose slabs of ``factor`` slices average to the slices of ``thick``.

    Same in-plane grid; ``factor`` times as many slices, ``factor`` times thinner, placed so that
    each thick slice's centre is the centre of its slab.
    """
    spacing_z = thick.spacing[2] / factor
    axis_k = np.asarray(thick.direction).reshape(3, 3)[:, 2]
    origin = np.asarray(thick.origin) - axis_k * (thick.spacing[2] - spacing_z) / 2.0
    return Geometry(
        (thick.shape[0] * factor, *thick.shape[1:]),
        (thick.spacing[0], thick.spacing[1], spacing_z),
        tuple(origin),
        thick.direction,
    )


def slab_factor(thick_spacing: float, thin_spacing: float, what: str) -> int:
    """Integer ratio of the spacings, or an :class:`InputError` explaining what is possible."""
    factor = int(round(thick_spacing / thin_spacing))
    if factor < 2 or abs(factor * thin_spacing - thick_spacing) > 0.05 * thin_spacing:
        raise InputError(
            f"The slice spacing {thick_spacing:g} mm must be at least twice, and a whole multiple of, "
            f"{thin_spacing:g} mm ({what})."
        )
    return factor


def super_resolve(
    ct: Volume,
    engine: Engine,
    spacing: float = 1.0,
    steps: int = DEFAULT_STEPS,
    sigma_n: float = DEFAULT_SIGMA,
    lam: float = DEFAULT_LAMBDA,
    zeta: float = DEFAULT_ZETA,
    draws: int = DEFAULT_DRAWS,
    region: str | None = None,
    seed: int | None = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> Volume:
    """Thin-slice CT (HU) from a thick-slice CT, with the input's in-plane grid and slice spacing ``spacing`` mm.

    Args:
        ct: thick-slice CT in HU (slices along the array's first axis).
        engine: a base model with a super-resolution ControlNet (``controlnet-sr``).
        spacing: slice spacing of the result in mm (default 1.0).
        steps: network evaluations from t_start to 0 (uniform skipping; the paper uses 100).
        sigma_n, lam: DiffPIR noise level (sets t_start) and prior weight.
        draws: independent samples averaged into the result (``draws`` x ``steps`` evaluations).
    """
    if draws < 1:
        raise InputError(f"draws must be at least 1, got {draws}.")
    hu = checked_ct(ct)
    if region is None:
        region, _ = detect_region(ct, hu)
    model_spacing = engine.config.spacing_mm
    factor = slab_factor(ct.spacing[2], model_spacing, "the model's spacing; use a model trained at another spacing")
    output_factor = slab_factor(ct.spacing[2], spacing, "the requested slice spacing")
    shape_xy = pp.isotropic_geometry(ct.geometry, model_spacing).shape[1:]
    thick_working = Geometry(
        (ct.geometry.shape[0], *shape_xy), (model_spacing, model_spacing, ct.spacing[2]), ct.origin, ct.direction
    )
    thin_working = thin_geometry(thick_working, factor)
    operator = ZSlabAverage(factor)
    y0 = torch.from_numpy(WorkingGrid(ct.geometry, thick_working, region).image(hu)).to(engine.device)
    upsampled = operator.pseudo_inverse(y0)
    start = operator.interpolate(y0)
    predictor = engine.predictor(Conditions(pp.REGION_CLASS[region], control=upsampled[None]), thin_working.shape)
    generator = make_generator(seed)
    t_start = engine.schedule.timestep_for_sigma(sigma_n)
    per_draw = len(engine.schedule.strided_timesteps(t_start, steps))
    total = draws * per_draw
    x0 = torch.zeros_like(upsampled)
    for draw in range(draws):
        done = draw * per_draw

        def draw_progress(step: int, _: int, message: str, done: int = done, draw: int = draw) -> None:
            progress(done + step, total, f"draw {draw + 1}/{draws}, {message}" if draws > 1 else message)

        noise = randn(tuple(start.shape), generator, engine.device)
        with torch.no_grad():
            x0 += (
                diffpir(
                    predictor,
                    engine.schedule,
                    y0,
                    sigma_n,
                    lam,
                    steps,
                    zeta,
                    generator,
                    data_step=operator.data_step,
                    x_start=engine.schedule.q_sample(start, t_start, noise),
                    progress=draw_progress,
                    cancel=cancel,
                )
                / draws
            )
    x0 = operator.data_step(x0, y0, 0.0).clamp(-1.0, 1.0)
    # The model's change to its start is added to the same cubic start built on the input's own
    # in-plane grid, so the working grid's in-plane resampling touches only what the model adds.
    # Output slices thicker than the working ones take the mean of the working slices they cover.
    output = thin_geometry(ct.geometry, output_factor)
    output_operator = ZSlabAverage(output_factor)
    change, change_grid = x0 - start, thin_working
    if factor % output_factor == 0 and factor > output_factor:
        change = ZSlabAverage(factor // output_factor)(change)
        change_grid = thin_geometry(thick_working, output_factor)
    # The model saw the input clipped to the window, so its start is rebuilt from the clipped input.
    window = pp.REGIONS[region]
    thick_hu = torch.from_numpy(hu.astype(np.float32))
    merged = output_operator.interpolate(thick_hu.clamp(window.low, window.high))
    merged += torch.from_numpy(WorkingGrid(output, change_grid, region).to_source(change * (window.width / 2.0)))
    # Slabs whose average the model cannot represent (air, bone) keep the cubic interpolation.
    unrepresentable = torch.from_numpy(pp.outside_window(pp.resample(ct, output, labels=True).array, region))
    merged[unrepresentable] = output_operator.interpolate(thick_hu)[unrepresentable]
    merged = output_operator.data_step(merged, thick_hu, 0.0).numpy()
    carried = int(unrepresentable.sum())
    return Volume.on_geometry(
        merged,
        output,
        MedDiffFM_task="super-resolve",
        MedDiffFM_model=engine.name,
        MedDiffFM_region=region,
        MedDiffFM_slab_factor=str(factor),
        MedDiffFM_seed=str(seed),
        MedDiffFM_draws=str(draws),
        MedDiffFM_carried_over_voxels=str(carried),
        MedDiffFM_note=(
            f"{carried} voxels outside the {region} window are the thick input's cubic interpolation along z."
        ),
    )


def run(engine: Engine, inputs: dict[str, Volume], settings: dict, context: RunContext) -> TaskResult:
    """The ``super_resolve`` task: the thick ``ct`` in, the thin ``volume`` out."""
    ct = inputs["ct"]
    volume = super_resolve(ct, engine, **context.keywords(), **settings)
    return TaskResult(
        {"volume": volume},
        dict(region=volume.metadata["MedDiffFM_region"], slab_factor=int(volume.metadata["MedDiffFM_slab_factor"])),
        f"{ct.array.shape[0]} slices of {ct.spacing[2]:g} mm -> {volume.array.shape[0]} of {volume.spacing[2]:g} mm",
    )
