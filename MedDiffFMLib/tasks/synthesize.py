"""Whole-volume CT synthesis from an anatomy label map (zero-shot, Docs/METHOD.md 1.4-1.5)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .. import preprocessing as pp
from ..anatomy import BODY_LABEL, CLASS_NAMES, DERIVED_BODY_MARGIN_MM, NUM_ANATOMY_VALUES, derived_body, label_of
from ..device import make_generator
from ..diffusion.constraints import shift_to_medians
from ..diffusion.samplers import sample
from ..diffusion.sliding_window import Conditions
from ..errors import InputError
from ..preprocessing import REGION_CLASS, check_region
from ..progress import CancelToken, ProgressCallback, no_progress
from ..task_spec import START_FROM, RunContext, TaskResult
from ..volume import Volume
from .engine import Engine

AIR_HU = -1000.0

PAINTED_START_SIGMA = 1.65
"""Default noise level (``sigma_bar``, in the [-1, 1] image scale) that a painted-anatomy start is
noised to: t = 649 of the cosine schedule. Chosen on a slab of the training abdomen CT with
``meddiff-fm-1mm-large@0.1`` (Docs/METHOD.md 1.1): from pure noise, or from the pure-noise start,
no label value makes bone; from t = 649 the vertebrae come out as bone."""


def synthesize(
    anatomy: Volume,
    region: str,
    engine: Engine,
    sampler: str = "ddim",
    steps: int | None = None,
    eta: float = 1.0,
    seed: int | None = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    control: np.ndarray | None = None,
    task: str = "synthesize",
    body: np.ndarray | None = None,
    start_from: str = "auto",
    label_hu: Mapping[int | str, float] | None = None,
    start: int | None = None,
) -> Volume:
    """Generate a CT in HU on the grid of ``anatomy``.

    Args:
        anatomy: label map in the 118-class scheme (0 outside body, 1..117 TotalSegmentator v2,
            118 body); its grid fixes the output's size, spacing, origin and direction.
        region: ``head_neck``, ``chest`` or ``abdomen`` (selects the HU window).
        sampler: ``ddpm`` (every timestep), ``ddim`` (``steps`` strided steps, stochasticity ``eta``) or
            ``dpm++2m`` (``steps`` DPM-Solver++(2M) steps).
        steps: number of steps; None: the sampler's default (``ddim`` 50, ``dpm++2m`` 20).
        control: an array on the anatomy's grid (e.g. a lesion mask), the ControlNet task condition
            when ``engine`` holds a ControlNet.
        body: a body mask on the anatomy's grid, for a label map without the body class (a plain
            TotalSegmentator output, whose label 0 means both air and unlabelled tissue). Without
            one, the body is derived from the labelled structures
            (:func:`~MedDiffFMLib.anatomy.derived_body`).
        start_from: ``noise`` (pure noise, the method's start), ``anatomy``: sampling starts from the
            anatomy painted with typical HU (:func:`painted`) noised to ``start`` (Docs/METHOD.md 1.1),
            or ``auto``: the anatomy when ``label_hu`` is given or the model card has the typical HU
            of a structure other than the body in this region, else noise (a painting with the
            body's value alone says no more than the body mask). The painted start is what makes
            bone (vertebrae, ribs) with ``meddiff-fm-1mm-large@0.1``; from noise no label value does.
        label_hu: typical HU (of label values or class names, ``{"liver": 100}``) for the painted
            start; they replace the model card's values of those structures (``anatomy_hu``: the
            medians in its labelled training data, native CT), e.g. to ask for a contrast phase.
            Asked values are also kept: the sample's structures are then shifted so that each named
            one's median is its value (:func:`~MedDiffFMLib.diffusion.constraints.shift_to_medians`;
            a lesion drawn inside a structure moves with it and keeps its contrast to it), so the
            result has them with the texture the model made (Docs/METHOD.md 1.1); the card's values
            only paint the start.
        start: the timestep sampling starts at; needs ``start_from="anatomy"``. Default: the
            schedule's pure-noise start from noise, :data:`PAINTED_START_SIGMA`'s timestep (649 of the
            cosine schedule) from the anatomy.

    Every step evaluates all overlapping windows and averages their noise estimates, so any size
    works without seams. Voxels labelled 0 (outside the body) are air: windows made only of them
    are skipped, and they are -1000 HU in the result.
    """
    check_region(region)
    asked = label_values(label_hu) if label_hu else None
    label_hu = _start_values(engine, region, start_from, asked, start)
    if label_hu is not None and start is None:
        start = engine.schedule.timestep_for_sigma(PAINTED_START_SIGMA)
    labels = np.asarray(anatomy.array)
    if labels.min() < 0 or labels.max() >= NUM_ANATOMY_VALUES or not np.issubdtype(labels.dtype, np.integer):
        raise InputError(
            "The anatomy must be an integer label map with values 0..118 (TotalSegmentator v2 classes, 118 = body)."
        )
    if not (labels > 0).any():
        raise InputError("The anatomy label map is empty; it must label the body to synthesise.")
    if (labels == BODY_LABEL).any():
        body_source = "the label map's body class"
    else:
        if body is None:
            body = derived_body(labels, anatomy.spacing)
            body_source = f"derived from the labelled structures (grown {DERIVED_BODY_MARGIN_MM:g} mm)"
        else:
            body = np.asarray(body) > 0
            if body.shape != labels.shape:
                raise InputError(f"The body mask's shape {body.shape} differs from the anatomy's {labels.shape}.")
            body_source = "the given body mask"
        labels = np.where((labels == 0) & body, BODY_LABEL, np.where(body, labels, 0)).astype(np.uint8)
        anatomy = anatomy.with_array(labels)
    grid = engine.grid(anatomy.geometry, region)
    working_labels = grid.labels(labels)
    condition = None
    if control is not None:
        condition = torch.from_numpy(grid.mask(control).astype(np.float32))[None]
    conditions = Conditions(REGION_CLASS[region], torch.from_numpy(working_labels), condition)
    outside = torch.from_numpy(working_labels == 0)
    known = (outside, torch.full(outside.shape, -1.0))
    predictor = engine.predictor(conditions, grid.working.shape, known=known)
    prior = None if label_hu is None else torch.from_numpy(painted(working_labels, label_hu, region))
    with torch.no_grad():
        x0 = sample(
            predictor,
            engine.schedule,
            grid.working.shape,
            make_generator(seed),
            engine.device,
            sampler=sampler,
            steps=steps,
            eta=eta,
            progress=progress,
            cancel=cancel,
            prior=prior,
            start=start,
        )
    if asked:
        targets = {value: float(pp.hu_to_model(np.float32(hu), region)) for value, hu in asked.items()}
        x0 = shift_to_medians(x0, torch.from_numpy(working_labels), targets)
    result = grid.hu(x0)
    result[labels == 0] = AIR_HU
    note = f"Voxels outside the body ({body_source}) are air ({AIR_HU:g} HU)."
    if asked:
        note += (
            f" Typical HU asked for: {', '.join(f'{CLASS_NAMES[value]} {hu:g}' for value, hu in asked.items())}."
            " Each of those structures was shifted to that median after sampling."
        )
    return Volume.on_geometry(
        result,
        anatomy.geometry,
        MedDiffFM_task=task,
        MedDiffFM_model=engine.name,
        MedDiffFM_region=region,
        MedDiffFM_sampler=sampler,
        MedDiffFM_seed=str(seed),
        MedDiffFM_start="noise" if prior is None else f"painted anatomy, t = {start}",
        MedDiffFM_note=note,
        MedDiffFM_skipped_windows=str(predictor.skipped_windows),
        MedDiffFM_network_evaluations=str(predictor.evaluations),
    )


def _start_values(
    engine: Engine, region: str, start_from: str, label_hu: dict[int, float] | None, start: int | None
) -> dict[int, float] | None:
    """The typical HU to paint the start with (the card's, updated with ``label_hu``), or None for a
    pure-noise start; checks the combination."""
    if start_from not in START_FROM:
        raise InputError(f"start_from must be one of {', '.join(START_FROM)}, got '{start_from}'.")
    if start_from == "auto":
        structures = set(engine.typical_hu(region)) - {0, BODY_LABEL}
        start_from = "anatomy" if label_hu is not None or structures else "noise"
    if start_from == "noise":
        if label_hu is not None or start is not None:
            raise InputError("Typical HU values and a start timestep need start_from 'anatomy' (--start-from anatomy).")
        return None
    table = engine.typical_hu(region)
    if label_hu is None and not table:
        raise InputError(
            f"The model '{engine.name}' has no typical HU of the {region} anatomy in its card (anatomy_hu), so "
            "synthesis cannot start from the anatomy. Start from noise, give the typical HU (label_hu, "
            "--typical-hu), or write the table into the card with 'python -m Training.anatomy_hu'."
        )
    return {**table, **(label_hu or {})}


def label_values(label_hu: Mapping[int | str, float]) -> dict[int, float]:
    """``label_hu`` with label values for keys: a key is a label value (int or digits) or a class name
    (:data:`~MedDiffFMLib.anatomy.CLASS_NAMES`: TotalSegmentator v2, ``body``)."""
    values = {}
    for key, hu in label_hu.items():
        text = str(key).strip()
        value = int(text) if text.isdigit() else label_of(text)
        if not 0 < value < NUM_ANATOMY_VALUES:
            raise InputError(f"Typical HU for label value {value}: label values are 1..{NUM_ANATOMY_VALUES - 1}.")
        values[value] = float(hu)
    return values


def painted(labels: np.ndarray, label_hu: Mapping[int, float], region: str) -> np.ndarray:
    """``labels`` (anatomy label map) painted with ``label_hu`` in the model's scale (float32,
    [-1, 1]): label 0 is air; a label without a value gets 0, the window's centre, which is what
    pure noise implies."""
    lookup = np.full(NUM_ANATOMY_VALUES, pp.check_region(region).level, dtype=np.float32)
    for value, hu in label_hu.items():
        lookup[int(value)] = hu
    lookup[0] = AIR_HU
    return pp.hu_to_model(lookup[labels], region)


def run(engine: Engine, inputs: dict[str, Volume], settings: dict, context: RunContext) -> TaskResult:
    """The ``synthesize`` task: the ``anatomy`` in (its grid is the result's), a CT ``volume`` out."""
    volume = synthesize(inputs["anatomy"], engine=engine, **context.keywords(), **settings)
    region = context.region
    return TaskResult(
        {"volume": volume}, dict(region=region), f"synthesised a {region} CT of shape {volume.array.shape}"
    )
