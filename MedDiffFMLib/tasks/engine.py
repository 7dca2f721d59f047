"""The pieces every task shares: the loaded model with its schedule and device, input checks, and
the trip from the user's grid in HU to the model's working grid in [-1, 1] and back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .. import preprocessing as pp
from ..anatomy import BODY_LABEL, CLASS_NAMES, NUM_ANATOMY_VALUES, UNKNOWN_LABEL, body_mask
from ..device import native_bf16, select_device
from ..diffusion.schedule import NoiseSchedule
from ..diffusion.sliding_window import Conditions, KnownVoxels, WindowedNoisePredictor
from ..errors import InputError, ResourceError
from ..model.config import ModelConfig
from ..volume import Geometry, Volume
from ..working_grid import WorkingGrid

logger = logging.getLogger(__name__)


@dataclass
class Engine:
    """A loaded network plus how to run it.

    Attributes:
        model: :class:`~MedDiffFMLib.model.network.MedDiffFMNet` or ``ControlledNet``.
        device: ``auto``, ``cuda``, ``mps`` or ``cpu``.
        overlap: window overlap fraction for whole-volume sampling.
        batch_size: windows per network call.
        blend: ``gaussian`` or ``constant`` weighting of overlapping windows.
        name: model identifier written into result metadata.
        precision: ``auto`` (bfloat16 autocast where the device computes it natively: CUDA GPUs that
            support it and CPUs with AMX-BF16 or AVX512-BF16; float32 elsewhere), ``fp32``, ``bf16``
            or ``fp16``. On a CPU with AMX-BF16 the network runs 2-2.5x faster in bfloat16, its
            outputs within about 1 HU of float32 (``benchmarks/run.py``, benchmark 1).
        memory_format: ``auto`` (channels-last-3D on CPU and CUDA, contiguous elsewhere),
            ``channels_last`` or ``contiguous``: the layout of the network's 5-D weights, which
            convolutions follow. Results are the same either way; on CPU channels-last measured 0.96x
            to 1.24x the contiguous speed (benchmarks/README.md). The model is converted in place.
            ``channels_last`` on another device (MPS) is refused.
        compile: run the network through ``torch.compile`` (compiled on the first call of each
            window shape, then faster; falls back to eager mode with a warning if compilation fails,
            e.g. without a C++ compiler).
    """

    model: nn.Module
    device: str | torch.device = "auto"
    overlap: float = 0.5
    batch_size: int = 4
    blend: str = "gaussian"
    name: str = ""
    precision: str = "auto"
    memory_format: str = "auto"
    compile: bool = False
    schedule: NoiseSchedule = field(init=False)
    network: Callable[..., torch.Tensor] = field(init=False, repr=False)
    _reported_unlearned: set[tuple[int, ...]] = field(init=False, repr=False, default_factory=set)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"Unknown precision '{self.precision}'. Choose one of: {', '.join(PRECISIONS)}.")
        if self.memory_format not in MEMORY_FORMATS:
            raise InputError(
                f"Unknown memory format '{self.memory_format}'. Choose one of: {', '.join(MEMORY_FORMATS)}."
            )
        self.device = self.device if isinstance(self.device, torch.device) else select_device(self.device)
        if self.memory_format == "channels_last" and self.device.type not in CHANNELS_LAST_DEVICES:
            raise InputError(
                f"Channels-last weights are supported on {' and '.join(CHANNELS_LAST_DEVICES)} only, not on "
                f"{self.device.type}. Use memory format 'auto' or 'contiguous'."
            )
        self.model = self.model.to(self.device, memory_format=self.torch_memory_format).eval()
        self.network = CompiledNetwork(self.model) if self.compile else self.model
        self.schedule = NoiseSchedule(self.config.num_train_timesteps, self.config.schedule, self.config.prediction)
        if not self.name:
            card = getattr(self.model, "card", None)
            self.name = card.identifier if card is not None else "unsaved model"

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def typical_hu(self, region: str) -> dict[int, float]:
        """The base model card's typical HU of each label value in ``region`` (its labelled training
        data's medians; empty for a model without a card or a card without the table)."""
        base = getattr(self.model, "base", self.model)
        card = getattr(base, "card", None)
        return card.typical_hu(region) if card is not None else {}

    @property
    def learned_labels(self) -> frozenset[int] | None:
        """The label values the base model learned: those of its card's ``anatomy_hu`` (every value
        with at least 100 voxels in its labelled training data, any region), plus outside-body,
        body and unknown. None when the card has no such table (any value is passed through)."""
        base = getattr(self.model, "base", self.model)
        card = getattr(base, "card", None)
        if card is None or not card.anatomy_hu:
            return None
        values = {int(value) for table in card.anatomy_hu.values() for value in table}
        return frozenset(values | {0, BODY_LABEL, UNKNOWN_LABEL})

    def learned_anatomy(self, anatomy: torch.Tensor | None) -> torch.Tensor | None:
        """``anatomy`` (label map, values 0..119) with every label value the model never learned
        replaced by the body label, with a warning naming those structures (once per set of
        structures: a task that builds several predictors warns once).

        An unlearned value's embedding is still its random initialisation, which tells the network
        nothing true; as "body" the structure is generated as unlabelled tissue in context.
        """
        learned = self.learned_labels
        if anatomy is None or learned is None:
            return anatomy
        present = np.flatnonzero(np.bincount(anatomy.reshape(-1).cpu().numpy(), minlength=NUM_ANATOMY_VALUES))
        unlearned = [int(value) for value in present if int(value) not in learned]
        if not unlearned:
            return anatomy
        if tuple(unlearned) not in self._reported_unlearned:
            self._reported_unlearned.add(tuple(unlearned))
            logger.warning(
                "%s was not trained on %s: these structures are treated as unlabelled body tissue.",
                self.name,
                ", ".join(CLASS_NAMES[value] for value in unlearned),
            )
        lookup = torch.arange(NUM_ANATOMY_VALUES, dtype=anatomy.dtype)
        lookup[unlearned] = BODY_LABEL
        return lookup[anatomy.long()]

    def predictor(
        self,
        conditions: Conditions,
        shape: tuple[int, int, int],
        frame: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
        known: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> WindowedNoisePredictor:
        """Whole-volume noise predictor for a volume of ``shape`` on the working grid (``frame``: see
        :class:`~MedDiffFMLib.diffusion.sliding_window.WindowedNoisePredictor`; ``known``: ``(mask,
        values)`` of voxels whose clean value is known, whose windows are skipped).

        Refuses volumes whose estimated memory exceeds the device's (see :func:`check_memory`).
        """
        check_memory(shape, self.device)
        conditions = replace(conditions, anatomy=self.learned_anatomy(conditions.anatomy))
        return WindowedNoisePredictor(
            self.network,
            conditions,
            shape,
            patch_size=self.config.patch_size,
            multiple=self.config.downsampling_factor,
            overlap=self.overlap,
            batch_size=self.batch_size,
            blend=self.blend,
            device=self.device,
            frame=frame,
            autocast=self.autocast_dtype,
            known=None if known is None else KnownVoxels(known[0], known[1], self.schedule),
            schedule=self.schedule,
        )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of network calls (None: float32)."""
        if self.precision == "auto":
            return torch.bfloat16 if native_bf16(self.device) else None
        return PRECISIONS[self.precision]

    @property
    def torch_memory_format(self) -> torch.memory_format:
        """The layout the network's weights are kept in."""
        channels_last = self.memory_format != "contiguous" and self.device.type in CHANNELS_LAST_DEVICES
        return torch.channels_last_3d if channels_last else torch.contiguous_format

    def grid(self, geometry: Geometry, region: str) -> WorkingGrid:
        """The model's isotropic grid over the extent of ``geometry``, for ``region``'s window."""
        return WorkingGrid.over(geometry, self.config.spacing_mm, region)


@dataclass(frozen=True)
class EngineOptions:
    """How to build an :class:`Engine`: the one description the CLI, the Slicer module and the
    benchmarks share (hashable, so it can key a cache of loaded engines).

    ``model`` is an installed name[@version] or a ``.safetensors`` path (None: the model the
    catalogue recommends for the task ``task_key``, or its fast ``preview`` model, else the newest
    installed; :func:`~MedDiffFMLib.model.weights.load_task_model`); ``untrained`` a preset name
    for a randomly initialised network instead (seeded by ``seed``); ``controlnet_task`` attaches
    the ControlNet of that task (``controlnet`` names one). The rest are :class:`Engine`'s fields.
    """

    model: str | None = None
    untrained: str | None = None
    controlnet_task: str | None = None
    controlnet: str | None = None
    task_key: str | None = None
    preview: bool = False
    device: str = "auto"
    overlap: float = 0.5
    batch_size: int = 4
    blend: str = "gaussian"
    precision: str = "auto"
    memory_format: str = "auto"
    compile: bool = False
    seed: int | None = 0

    def for_task(self, task_key: str, preview: bool = False) -> EngineOptions:
        """These options with the task (and whether it is a fast preview) that picks the model when
        none is named; unchanged when one is, so that runs of one model share one engine cache key."""
        if self.model or self.controlnet or self.untrained:
            return self
        return replace(self, task_key=task_key, preview=preview)


def build_engine(options: EngineOptions) -> Engine:
    """Load the model (or make the untrained network) that ``options`` names and wrap it in an Engine."""
    from ..model import weights
    from ..model.network import ControlledNet

    if options.untrained:
        model = weights.untrained_model(options.untrained, seed=options.seed)
        name = f"untrained {options.untrained} network"
        if options.controlnet_task:
            model = ControlledNet(model)
    else:
        model = weights.load_task_model(
            options.model, options.controlnet_task, options.controlnet, options.task_key, options.preview
        )
        name = model.card.identifier
        if options.controlnet_task:
            name = f"{model.base.card.identifier} + {name}"
    engine = Engine(
        model,
        options.device,
        options.overlap,
        options.batch_size,
        options.blend,
        name=name,
        precision=options.precision,
        memory_format=options.memory_format,
        compile=options.compile,
    )
    fine = engine.config.spacing_mm < COARSE_GRID_MM
    if fine and engine.device.type == "cpu" and options.task_key and not options.preview:
        fast = weights.recommended(options.task_key, preview=True)
        logger.warning(
            "%s works on a %g mm grid: on a CPU a whole CT takes an hour or more (a GPU: minutes). %s",
            name,
            engine.config.spacing_mm,
            f"The fast preview (--preview; the panel's 'Fast preview') uses {fast.identifier}: minutes, less detail."
            if fast is not None and fast != weights.recommended(options.task_key)
            else "Crop the CT to the region you need.",
        )
    return engine


COARSE_GRID_MM = 3.0
"""Working grids this coarse or coarser run a whole CT in minutes on a CPU (benchmarks/whole_ct.py)."""


PRECISIONS: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


class CompiledNetwork:
    """``torch.compile`` of a network that falls back to eager mode, with a warning, when the
    compiler fails (no C++ compiler, unsupported Python or platform). Called like the network.

    Compilation happens on the first call and again for a new input shape (a different window
    size, or the smaller last batch of windows, after which the batch size is treated as dynamic).
    Out-of-memory errors pass through, also when raised while compiling, so that the caller can
    retry with fewer windows.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.compiled: Callable[..., torch.Tensor] | None = None
        try:
            self.compiled = torch.compile(model)
        except RuntimeError as error:
            logger.warning("torch.compile is not available here (%s); running without compilation.", error)

    def __call__(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                if isinstance(error.inner_exception, torch.OutOfMemoryError):
                    raise error.inner_exception from error
                logger.warning("torch.compile failed (%s); continuing without compilation.", error)
                self.compiled = None
        return self.model(*args, **kwargs)


FULL_VOLUME_TENSORS = 10
"""Float32 volumes of the working grid alive at once while sampling (image, noise estimate,
accumulator, weights, observation, clean estimate, fresh noise, condition, padding copies)."""


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device``: the GPU's, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_memory(shape: tuple[int, ...], device: torch.device) -> int:
    """Estimated bytes for sampling a working volume of ``shape``; refused above 90 % of the
    device's memory, a warning above 50 %. Returns the estimate."""
    estimate = int(np.prod(shape)) * 4 * FULL_VOLUME_TENSORS
    capacity = device_memory_bytes(device)
    message = (
        f"The working volume {'x'.join(map(str, shape))} needs about {estimate / 2**30:.2f} GiB on {device} "
        f"({capacity / 2**30:.2f} GiB in total)"
    )
    if estimate > 0.9 * capacity:
        raise ResourceError(message + ". Crop the CT to the region of interest or use a device with more memory.")
    if estimate > 0.5 * capacity:
        logger.warning("%s; other programs may run short of memory.", message)
    return estimate


def checked_ct(volume: Volume) -> np.ndarray:
    """The CT's voxels as float32 HU after checking they look like a usable CT.

    Refuses non-3D data, NaN/Inf voxels, constant images and images without negative values
    (not HU, e.g. 0..255 pictures or raw scanner values without the rescale offset).
    """
    volume.geometry  # noqa: B018 - raises for non-3D arrays
    hu = np.asarray(volume.array, dtype=np.float32)
    if hu.size == 0:
        raise InputError("The image is empty.")
    if not np.isfinite(hu).all():
        raise InputError(
            f"The image has {int((~np.isfinite(hu)).sum())} NaN or infinite voxels. Replace them (for example "
            "with -1024 HU) before running MedDiffFM."
        )
    low, high = float(hu.min()), float(hu.max())
    if low == high:
        raise InputError(f"The image is constant ({low}); there is nothing to process.")
    if low >= 0:
        raise InputError(
            f"The image's values span {low:g}..{high:g} with no negative value, so it does not look like a CT in "
            "Hounsfield units (air is -1000 HU). Convert it to HU (apply the DICOM rescale slope/intercept, "
            "e.g. subtract 1024) or use a CT image."
        )
    return hu


def anatomy_on(
    anatomy: Volume | None, geometry: Geometry, hu: np.ndarray, body: np.ndarray | None = None
) -> np.ndarray | None:
    """An anatomy label map brought onto the CT's ``geometry`` (nearest neighbour), or None.

    Values must be 0..119 (TotalSegmentator v2 classes, 118 body, 119 unknown). A map without the
    body class (a plain TotalSegmentator output) gets it from the CT's thresholded body (``body``,
    computed from ``hu`` when not given), as in training.
    """
    if anatomy is None:
        return None
    values = np.asarray(anatomy.array)
    integral = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
    if not integral or values.min() < 0 or values.max() > UNKNOWN_LABEL:
        raise InputError(
            f"Anatomy label values must be integers in 0..{UNKNOWN_LABEL} (TotalSegmentator v2 'total' classes, "
            f"{BODY_LABEL} = body); found {values.min()}..{values.max()} ({values.dtype})."
        )
    labels = np.asarray(pp.labels_on_grid(anatomy, geometry, "anatomy label map").array).astype(np.uint8)
    if not (labels == BODY_LABEL).any():
        labels[(labels == 0) & (body_mask(hu) if body is None else body)] = BODY_LABEL
    return labels


def unknown_anatomy(shape: tuple[int, ...]) -> torch.Tensor:
    """An anatomy map that says "no anatomy given" everywhere."""
    return torch.full(shape, UNKNOWN_LABEL, dtype=torch.uint8)
