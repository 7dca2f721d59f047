"""z-axis super-resolution of thick-slice CT (ControlNet + DiffPIR, Docs/METHOD.md 1.5).

The thick CT is brought in-plane to the model's spacing, keeping its slices; ``H`` averages
``factor`` thin working slices into one thick slice (``factor`` = thick spacing / model spacing).
The ControlNet is conditioned on the thick volume brought to the thin grid (``H^+ y``). DiffPIR
starts from ``H^+ y`` noised to ``t_start`` (``sigma_bar = sigma_n``), applies the data step
``x0 + H^+(y - H x0) / (1 + rho_t)`` at every step, and ends with an exact projection onto the
data (``rho = 0``), so the result's slab averages reproduce the input inside the HU window.
The result is resampled to the input's in-plane grid and the requested slice spacing; voxels of
thick slices outside the window (which the model cannot represent) take the thick input's linear
interpolation along z.
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
DEFAULT_STEPS, DEFAULT_SIGMA, DEFAULT_LAMBDA, DEFAULT_ZETA = (
    SPEC.setting(name).default for name in ("steps", "sigma_n", "lam", "zeta")
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
    """
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
    predictor = engine.predictor(Conditions(pp.REGION_CLASS[region], control=upsampled[None]), thin_working.shape)
    generator = make_generator(seed)
    t_start = engine.schedule.timestep_for_sigma(sigma_n)
    x_start = engine.schedule.q_sample(upsampled, t_start, randn(tuple(upsampled.shape), generator, engine.device))
    with torch.no_grad():
        x0 = diffpir(
            predictor,
            engine.schedule,
            y0,
            sigma_n,
            lam,
            steps,
            zeta,
            generator,
            data_step=operator.data_step,
            x_start=x_start,
            progress=progress,
            cancel=cancel,
        )
    x0 = operator.data_step(x0, y0, 0.0).clamp(-1.0, 1.0)
    output = thin_geometry(ct.geometry, output_factor)
    result = WorkingGrid(output, thin_working, region).hu(x0)
    # Slabs whose average the model cannot represent (air, bone) take the thick input interpolated along z.
    nearest = pp.resample(ct, output, labels=True).array
    interpolated = pp.resample(ct.with_array(hu), output).array.astype(np.float32)
    merged, carried = pp.restore_outside_window(result, interpolated, region, pp.outside_window(nearest, region))
    return Volume.on_geometry(
        merged,
        output,
        MedDiffFM_task="super-resolve",
        MedDiffFM_model=engine.name,
        MedDiffFM_region=region,
        MedDiffFM_slab_factor=str(factor),
        MedDiffFM_seed=str(seed),
        MedDiffFM_carried_over_voxels=str(carried),
        MedDiffFM_note=(
            f"{carried} voxels outside the {region} window were interpolated (linearly) from the thick input."
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
