"""Lesion generation and lesion inpainting with the lesion ControlNet (Docs/METHOD.md 1.5).

* :func:`generate_lesion`: synthesis from an anatomy label map with a lesion where a mask says:
  the whole synthesis conditioned on the lesion mask (the paper's method, default), or the CT
  synthesised without the lesion and the lesion RePainted into it, every other voxel kept.
* :func:`inpaint_lesion`: RePaint on a real CT. Only voxels inside the lesion mask change (plus, on
  request, a blended band around it, whose voxels outside the region's HU window, such as gas or
  bone, are kept); every other voxel is returned bit-identical (same values, same dtype). The work
  is done on a crop of the model's working grid around the mask (mask plus margin plus half a
  model window of context), whose windows keep their position coordinates in the whole CT, so a
  small lesion in a large CT is fast.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy import ndimage

from .. import preprocessing as pp
from ..device import make_generator
from ..diffusion.repaint import repaint
from ..diffusion.sliding_window import Conditions
from ..errors import InputError, MaskError
from ..progress import CancelToken, ProgressCallback, no_progress, stage_progress
from ..region import detect_region
from ..task_spec import LESION_SCOPES, TASKS, RunContext, TaskResult
from ..volume import Volume
from .engine import Engine, anatomy_on, checked_ct
from .synthesize import synthesize

DEFAULT_STEPS, DEFAULT_JUMP_LENGTH, DEFAULT_JUMP_COUNT, DEFAULT_MARGIN_MM = (
    TASKS["inpaint_lesion"].setting(name).default for name in ("steps", "jump_length", "jump_count", "margin_mm")
)


def lesion_mask_on(lesion: Volume, ct: Volume) -> np.ndarray:
    """Boolean lesion mask on the CT's grid (resampled if it overlaps); empty masks are refused."""
    mask = pp.labels_on_grid(lesion, ct.geometry, "lesion mask").array > 0
    if not mask.any():
        raise MaskError("The lesion mask is empty. Draw the lesion (e.g. in Segment Editor) before running.")
    return mask


def generate_lesion(
    anatomy: Volume,
    lesion: Volume,
    region: str,
    engine: Engine,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 1.0,
    seed: int | None = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    start_from: str = "auto",
    start: int | None = None,
    label_hu: Mapping[int | str, float] | None = None,
    scope: str = "volume",
    lesion_steps: int = DEFAULT_STEPS,
    margin_mm: float = DEFAULT_MARGIN_MM,
) -> Volume:
    """A synthetic CT (HU, on the anatomy's grid) with a lesion where ``lesion`` is set.

    ``engine`` must hold the lesion ControlNet (``controlnet-lesion``); ``sampler`` to ``label_hu`` as
    in :func:`~.synthesize.synthesize` (the base model card's typical HU).

    ``scope="volume"`` (default): the ControlNet conditions the whole synthesis on the mask (the
    paper's method). Only windows that overlap the lesion see it, so tissue a model window away is
    unchanged, but tissue near it may change.
    ``scope="lesion"``: first the CT without the lesion, exactly ``synthesize(anatomy, region,
    engine, control=<an empty mask>, ...)`` with the same settings and seed (the lesion ControlNet
    with nothing to add, as in its lesion-free training patches); then :func:`inpaint_lesion`
    RePaints the lesion into it with the ControlNet and the anatomy in ``lesion_steps`` steps (its
    default jumps, ``margin_mm``). Every voxel outside the mask (and the band) is that lesion-free
    synthesis, bit for bit: pairs with and without a lesion.
    """
    if scope not in LESION_SCOPES:
        raise InputError(f"scope must be one of {', '.join(LESION_SCOPES)}, got '{scope}'.")
    mask = lesion_mask_on(lesion, anatomy)
    synthesis = dict(
        sampler=sampler, steps=steps, eta=eta, seed=seed, cancel=cancel, start_from=start_from, label_hu=label_hu
    )
    if scope == "volume":
        return synthesize(
            anatomy, region, engine, progress=progress, control=mask, task="generate-lesion", start=start, **synthesis
        )
    base = synthesize(
        anatomy,
        region,
        engine,
        progress=stage_progress(progress, 0, 2, "synthesis"),
        control=np.zeros(mask.shape, dtype=np.float32),
        start=start,
        **synthesis,
    )
    result = inpaint_lesion(
        base,
        base.with_array(mask.astype(np.uint8)),
        engine,
        region,
        anatomy,
        steps=lesion_steps,
        margin_mm=margin_mm,
        seed=seed,
        progress=stage_progress(progress, 1, 2, "lesion"),
        cancel=cancel,
    )
    band = f" and a {margin_mm:g} mm band around it" if margin_mm > 0 else ""
    return result.with_array(
        result.array,
        MedDiffFM_task="generate-lesion",
        MedDiffFM_model=engine.name,
        MedDiffFM_scope=scope,
        MedDiffFM_note=(
            f"{base.metadata['MedDiffFM_note']} The lesion mask{band} was RePainted into the synthesis without a "
            f"lesion (seed {seed}); every other voxel is that synthesis."
        ),
    )


def blend_weights(mask: np.ndarray, spacing: tuple[float, float, float], margin_mm: float) -> np.ndarray:
    """1 inside ``mask``, falling linearly to 0 at ``margin_mm`` outside it (array ``[z, y, x]``)."""
    if margin_mm <= 0:
        return mask.astype(np.float32)
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing[::-1])
    return np.clip(1.0 - distance / margin_mm, 0.0, 1.0).astype(np.float32) * (distance <= margin_mm)


def bounding_box(mask: np.ndarray, padding: tuple[int, int, int]) -> tuple[slice, ...]:
    """Slices of the box around ``mask`` grown by ``padding`` voxels per axis, clipped to the array."""
    indices = np.argwhere(mask)
    low = np.maximum(indices.min(axis=0) - padding, 0)
    high = np.minimum(indices.max(axis=0) + 1 + np.asarray(padding), mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def inpaint_lesion(
    ct: Volume,
    lesion: Volume,
    engine: Engine,
    region: str | None = None,
    anatomy: Volume | None = None,
    steps: int = DEFAULT_STEPS,
    jump_length: int = DEFAULT_JUMP_LENGTH,
    jump_count: int = DEFAULT_JUMP_COUNT,
    margin_mm: float = DEFAULT_MARGIN_MM,
    seed: int | None = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> Volume:
    """Generate a lesion inside ``lesion`` in a real CT; all other voxels come back unchanged.

    Args:
        ct: CT in HU.
        lesion: lesion mask (any grid overlapping the CT; resampled by nearest neighbour).
        engine: base model with the lesion ControlNet (``controlnet-lesion``).
        steps: reverse steps (strided from T-1); ``jump_length``/``jump_count``: RePaint resampling.
        margin_mm: width of a band around the mask where generated and original voxels are blended
            (default 0: no band, every voxel outside the mask comes back bit-identical). With a band,
            the metadata ``MedDiffFM_changed_outside_mask`` counts the voxels outside the mask that
            may differ.
    """
    hu = checked_ct(ct)
    mask = lesion_mask_on(lesion, ct)
    labels = anatomy_on(anatomy, ct.geometry, hu)
    if region is None:
        region, _ = detect_region(ct, hu, labels)
    weights = blend_weights(mask, ct.spacing, margin_mm)
    changed = weights > 0
    whole = engine.grid(ct.geometry, region)
    changed_working = whole.mask(changed)
    if not changed_working.any():
        raise MaskError("The lesion is smaller than one voxel at the model's spacing; draw a larger lesion.")
    box = bounding_box(changed_working, (engine.config.patch_size // 2,) * 3)
    grid = whole.cropped(box)
    known = torch.from_numpy(grid.image(hu)).to(engine.device)
    control = torch.from_numpy(grid.mask(mask).astype(np.float32))[None]
    working_labels = None if labels is None else torch.from_numpy(grid.labels(labels))
    conditions = Conditions(pp.REGION_CLASS[region], working_labels, control)
    frame = (tuple(s.start for s in box), whole.working.shape)
    predictor = engine.predictor(conditions, grid.working.shape, frame)
    timesteps = engine.schedule.strided_timesteps(engine.schedule.sampling_start(), steps)
    with torch.no_grad():
        x0 = repaint(
            predictor,
            engine.schedule,
            known,
            torch.from_numpy(changed_working[box]).to(engine.device),
            timesteps,
            make_generator(seed),
            jump_length,
            jump_count,
            progress,
            cancel,
        )
    target = bounding_box(changed, (0, 0, 0))
    generated = grid.hu(x0, ct.geometry.subgrid(target))
    margin_outside_window = ~mask[target] & pp.outside_window(hu[target], region)
    inside, weight = changed[target] & ~margin_outside_window, weights[target]
    blended = weight * generated + (1.0 - weight) * hu[target]
    result = ct.array.copy()
    if np.issubdtype(result.dtype, np.integer):
        info = np.iinfo(result.dtype)
        blended = np.clip(np.round(blended), info.min, info.max)
    result[target][inside] = blended[inside].astype(result.dtype)
    return ct.with_array(
        result,
        MedDiffFM_task="inpaint-lesion",
        MedDiffFM_model=engine.name,
        MedDiffFM_region=region,
        MedDiffFM_changed_voxels=str(int(changed.sum())),
        MedDiffFM_changed_outside_mask=str(int((changed & ~mask).sum())),
        MedDiffFM_seed=str(seed),
        MedDiffFM_note=(
            "Only voxels inside the lesion mask differ from the input."
            if margin_mm <= 0
            else f"Voxels inside the lesion mask and a {margin_mm:g} mm blended band around it differ from the input."
        ),
    )


def run_generate(engine: Engine, inputs: dict[str, Volume], settings: dict, context: RunContext) -> TaskResult:
    """The ``generate_lesion`` task: ``anatomy`` and ``lesion`` in, a CT ``volume`` out."""
    volume = generate_lesion(inputs["anatomy"], inputs["lesion"], engine=engine, **context.keywords(), **settings)
    region = context.region
    return TaskResult({"volume": volume}, dict(region=region), f"synthesised a {region} CT with a lesion")


def run_inpaint(engine: Engine, inputs: dict[str, Volume], settings: dict, context: RunContext) -> TaskResult:
    """The ``inpaint_lesion`` task: ``ct``, ``lesion`` and optional ``anatomy`` in, the CT ``volume`` out."""
    volume = inpaint_lesion(
        inputs["ct"],
        inputs["lesion"],
        engine,
        anatomy=inputs.get("anatomy"),
        **context.keywords(),
        **settings,
    )
    changed, outside = (
        int(volume.metadata[key]) for key in ("MedDiffFM_changed_voxels", "MedDiffFM_changed_outside_mask")
    )
    return TaskResult(
        {"volume": volume},
        dict(region=volume.metadata["MedDiffFM_region"], changed_voxels=changed, changed_outside_mask=outside),
        f"{changed} voxels may differ ({outside} of them outside the lesion mask)",
    )
