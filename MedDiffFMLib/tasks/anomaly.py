"""Anomaly detection inside an organ (zero-shot, Docs/METHOD.md 1.5).

The CT is noised to a fixed timestep (600 by default) and the network predicts the clean image in
one step: a healthy-looking reconstruction. The anomaly map is ``input - reconstruction`` in HU
inside the organ (0 outside); the anomaly mask thresholds its absolute value. The default threshold
is robust statistics of the map inside the organ: ``median(|map|) + 3 * 1.4826 * MAD(|map|)``.

By default the CT around the organ stays in the model's input as context. ``organ_only`` does as
the paper: every voxel outside the organ is set to -1 (the window floor) and kept there, so the
model sees the organ alone (paper: t = 950). On a training abdomen CT with seeded liver lesions the
context raised pixel AUROC from 0.50-0.58 (organ only, t = 300-600) to 0.70-0.72 (t = 150-600); the
default t was chosen the same way (``benchmarks/tune_anomaly.py``, Docs/METHOD.md 1.5).

A stack of 2D slices is treated as a pseudo-3D volume, as in the paper's BMAD evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..anatomy import organ_mask
from ..device import make_generator, randn
from ..diffusion.sliding_window import Conditions
from ..errors import InputError, MaskError
from ..preprocessing import REGION_CLASS, REGIONS, check_region
from ..progress import CancelToken, ProgressCallback, no_progress
from ..region import detect_region
from ..task_spec import TASKS, RunContext, TaskResult
from ..volume import Volume
from .engine import Engine, anatomy_on, checked_ct

DEFAULT_TIMESTEP = TASKS["detect_anomalies"].setting("t").default


@dataclass
class AnomalyResult:
    """Anomaly map (float32 HU difference) and binary mask (uint8), both on the CT's grid."""

    anomaly_map: Volume
    anomaly_mask: Volume
    threshold: float
    region: str
    network_evaluations: int


def default_threshold(values: np.ndarray) -> float:
    """``median + 3 * 1.4826 * MAD`` of the absolute anomaly values inside the organ (HU)."""
    magnitude = np.abs(values)
    median = float(np.median(magnitude))
    return median + 3.0 * 1.4826 * float(np.median(np.abs(magnitude - median)))


def detect_anomalies(
    ct: Volume,
    anatomy: Volume,
    organs: Sequence[str],
    engine: Engine,
    region: str | None = None,
    t: int = DEFAULT_TIMESTEP,
    threshold: float | None = None,
    draws: int = 1,
    organ_only: bool = False,
    seed: int | None = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> AnomalyResult:
    """Find anomalies in ``organs`` (TotalSegmentator names, e.g. ``["liver"]``) of a CT.

    Args:
        ct: CT in HU (a 3D volume or a stack of 2D slices).
        anatomy: anatomy label map (TotalSegmentator v2 values) overlapping the CT.
        t: diffusion timestep the image is noised to.
        threshold: HU threshold on ``|map|``; None picks it from the map's statistics inside the organ.
        draws: number of noise draws whose maps are averaged.
        organ_only: set every voxel outside the organ to the window floor (the paper) instead of
            keeping the CT around it as context.
    """
    if anatomy is None:
        raise MaskError("Anomaly detection needs an anatomy label map that contains the organ to inspect.")
    if not 0 <= t < engine.schedule.num_timesteps:
        raise InputError(f"t must be in 0..{engine.schedule.num_timesteps - 1}, got {t}.")
    if draws < 1:
        raise InputError(f"draws must be at least 1, got {draws}.")
    hu = checked_ct(ct)
    labels = anatomy_on(anatomy, ct.geometry, hu)
    organ = organ_mask(labels, organs)
    if region is None:
        region, _ = detect_region(ct, hu, labels)
    window = check_region(region)
    grid = engine.grid(ct.geometry, region)
    image = torch.from_numpy(grid.image(hu)).to(engine.device)
    working_labels = torch.from_numpy(grid.labels(labels))
    working_organ = torch.from_numpy(organ_mask_on(working_labels.numpy(), organs)).to(engine.device)
    if organ_only:
        seen = torch.where(working_organ, image, torch.full_like(image, -1.0))
        known = (~working_organ, torch.full_like(seen, -1.0))
    else:
        # Windows without an organ voxel are skipped; the others see the whole CT around it.
        seen, known = image, (~working_organ, image)
    predictor = engine.predictor(Conditions(REGION_CLASS[region], working_labels), grid.working.shape, known=known)
    generator = make_generator(seed)
    difference = torch.zeros_like(seen)
    with torch.no_grad():
        for draw in range(draws):
            if cancel is not None:
                cancel.raise_if_cancelled()
            noisy = engine.schedule.q_sample(seen, t, randn(tuple(seen.shape), generator, engine.device))
            reconstruction = engine.schedule.predict_x0(noisy, t, predictor(noisy, t))
            difference += (seen - reconstruction) / draws
            progress(draw + 1, draws, f"draw {draw + 1}/{draws}")
    difference = torch.where(working_organ, difference, torch.zeros_like(difference))
    on_input = grid.to_source(difference * (REGIONS[region].width / 2.0))
    anomaly_map = np.where(organ, on_input, 0.0).astype(np.float32)
    if threshold is None:
        threshold = default_threshold(anomaly_map[organ])
    mask = ((np.abs(anomaly_map) > threshold) & organ).astype(np.uint8)
    metadata = dict(
        MedDiffFM_task="detect-anomalies",
        MedDiffFM_model=engine.name,
        MedDiffFM_region=region,
        MedDiffFM_organs=",".join(organs),
        MedDiffFM_t=str(t),
        MedDiffFM_context="organ only" if organ_only else "CT around the organ",
        MedDiffFM_threshold_hu=f"{threshold:.3f}",
        MedDiffFM_window=f"[{window.low:g}, {window.high:g}] HU",
        MedDiffFM_seed=str(seed),
    )
    return AnomalyResult(
        ct.with_array(anomaly_map, **metadata),
        ct.with_array(mask, **metadata),
        float(threshold),
        region,
        predictor.evaluations,
    )


def organ_mask_on(labels: np.ndarray, organs: Sequence[str]) -> np.ndarray:
    """Organ mask on the working grid; an organ too small to survive resampling is an error."""
    try:
        return organ_mask(labels, organs)
    except MaskError:
        raise MaskError(
            f"{', '.join(organs)} is too small to be seen at the model's voxel spacing; inspect a larger organ."
        ) from None


def stack_slices(slices: Sequence[np.ndarray], spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Volume:
    """A pseudo-3D volume ``[z, y, x]`` from 2D slices ``[y, x]`` of equal shape (spacing in mm, x/y/z)."""
    shapes = {np.shape(s) for s in slices}
    if not slices or len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError("Give one or more 2D slices, all of the same shape.")
    return Volume(np.stack([np.asarray(s) for s in slices]), spacing=spacing)


def run(engine: Engine, inputs: dict[str, Volume], settings: dict, context: RunContext) -> TaskResult:
    """The ``detect_anomalies`` task: ``ct`` and ``anatomy`` in, ``map`` and ``mask`` out."""
    result = detect_anomalies(
        inputs["ct"],
        inputs["anatomy"],
        engine=engine,
        **context.keywords(),
        **settings,
    )
    anomalous = int(result.anomaly_mask.array.sum())
    return TaskResult(
        {"map": result.anomaly_map, "mask": result.anomaly_mask},
        dict(
            threshold=result.threshold,
            region=result.region,
            network_evaluations=result.network_evaluations,
            anomalous_voxels=anomalous,
        ),
        f"threshold {result.threshold:.1f} HU, {anomalous} anomalous voxels",
    )
