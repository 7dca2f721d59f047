"""Training configuration: a YAML file validated into dataclasses (no code in configs)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

import yaml

from MedDiffFMLib.errors import InputError
from MedDiffFMLib.model.config import ModelConfig, preset


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a (pre-)training run.

    Attributes:
        model: name of a model preset (``paper``, ``demo``, ``tiny``) the architecture starts from.
        model_overrides: architecture fields that differ from the preset.
        level_probabilities: chances of the three multi-level inputs (whole region resized to the
            patch, 2x-patch crop resized, patch crop; Docs/METHOD.md 1.2).
        foreground: chance that a patch is centred on a voxel inside the body (else placed uniformly).
        condition_focus: for mask conditions (lesion fine-tuning), chance that a patch is centred on
            a voxel of the mask, so that most patches show a lesion; checked before ``foreground``.
        case_weights: how many times a case of the prepared cache (by its name in the manifest) is
            listed per epoch; unlisted cases once. Weighs a scan with real labels against scans
            with body-threshold labels.
        position_jitter: random shift and stretch of each sample's position coordinates, up to
            this fraction per axis (see :class:`~.dataset.MultiLevelDataset`).
        field_of_view_crop: chance that a sample's coordinates span a random sub-box of its scan
            containing it instead of the whole scan (see :class:`~.dataset.MultiLevelDataset`).
        region_dropout / anatomy_dropout: chances of replacing the region by the null class and the
            anatomy by "unknown" (classifier-free conditioning, unconditioned use).
        learning_rate, batch_size, accumulation: Adam step size, samples per step per process, and
            micro-batches accumulated per optimiser step.
        ema_decay: decay of the exponential moving average of the weights (0 disables it).
        grad_clip: maximum gradient norm (0 disables clipping).
        low_snr_cap: weight of each sample's L1 noise loss, ``clamp(1 / sqrt(SNR_t), 1, cap)`` with
            ``SNR_t = abar_t / (1 - abar_t)`` (1 disables it). The noise error is the clean-image
            error times ``sqrt(SNR_t)``, so a plain noise loss gives the image at high noise almost
            no weight and the model learns little of what the anatomy and region alone imply, which
            is all synthesis from pure noise has. With the weight, where ``SNR_t < 1`` the loss is
            the clean-image L1 error, down to ``SNR_t = 1 / cap**2``.
        pure_noise_share: chance that a sample's timestep is drawn from the last ones of the
            schedule, where even the patch's mean intensity is lost in the noise (``SNR_t`` times
            the patch's voxel count below 1: t >= 996 of the cosine schedule for 32^3 patches),
            instead of uniformly. Uniform timesteps put 0.4 % of the samples there, and only there
            must the model make the image's coarse intensities from the anatomy and region alone,
            as sampling from pure noise asks of it; meant for ``v`` models (model ``prediction``),
            whose clean estimate is usable there.
        max_sigma: draw timesteps only up to the one whose DiffPIR noise level
            ``sigma_bar_t = sqrt((1 - abar_t) / abar_t)`` is this (0: the whole schedule). The
            restoration tasks start from a low noise level (super-resolution: ``sigma_n`` 0.3), so
            a ControlNet for them learns only there: 1 (the paper's ``sigma_n``) is t <= 495 of the
            cosine schedule, twice the uniform share of samples at or below its default start (t 178).
        mixed_precision: ``auto`` (bfloat16 autocast where the device computes it natively: CUDA
            GPUs that support it, CPUs with AMX-BF16 or AVX512-BF16; float32 elsewhere), ``bf16``
            (always, emulated where not native) or ``no`` (float32).
        memory_format: ``auto`` (channels-last-3D weights on CPU and CUDA), ``channels_last`` or
            ``contiguous``.
        steps: optimiser steps in total.
        checkpoint_every, log_every, preview_every: intervals in optimiser steps.
        seed: seed of the model initialisation and of the data order.
        num_workers: data-loader worker processes.
        samples_per_volume: samples drawn from each listed region crop per epoch. A data loader
            starts its workers anew each epoch, so a fast device needs epochs of many batches.
    """

    model: str = "demo"
    model_overrides: dict = field(default_factory=dict)
    level_probabilities: tuple[float, float, float] = (0.2, 0.3, 0.5)
    foreground: float = 0.0
    condition_focus: float = 0.0
    case_weights: dict = field(default_factory=dict)
    position_jitter: float = 0.0
    field_of_view_crop: float = 0.0
    region_dropout: float = 0.1
    anatomy_dropout: float = 0.2
    learning_rate: float = 1e-4
    batch_size: int = 1
    accumulation: int = 4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    low_snr_cap: float = 1.0
    pure_noise_share: float = 0.0
    max_sigma: float = 0.0
    mixed_precision: str = "auto"
    memory_format: str = "auto"
    steps: int = 1000
    checkpoint_every: int = 200
    log_every: int = 10
    preview_every: int = 500
    seed: int = 0
    num_workers: int = 0
    samples_per_volume: int = 16

    def __post_init__(self) -> None:
        if len(self.level_probabilities) != 3 or abs(sum(self.level_probabilities) - 1.0) > 1e-6:
            raise InputError("level_probabilities must be three numbers that sum to 1.")
        for name in ("foreground", "condition_focus", "pure_noise_share", "field_of_view_crop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be between 0 and 1.")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise InputError("mixed_precision must be 'auto', 'bf16' or 'no'.")
        if self.memory_format not in ("auto", "channels_last", "contiguous"):
            raise InputError("memory_format must be 'auto', 'channels_last' or 'contiguous'.")
        if not 0.0 <= self.position_jitter < 1.0:
            raise InputError("position_jitter must be at least 0 and below 1.")
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in self.case_weights.values()):
            raise InputError("case_weights must map case names to whole numbers of at least 1.")
        if self.max_sigma < 0.0:
            raise InputError("max_sigma must be positive, or 0 for the whole schedule.")
        if self.max_sigma > 0.0 and self.pure_noise_share > 0.0:
            raise InputError("max_sigma and pure_noise_share exclude each other: set one of them to 0.")
        if self.low_snr_cap < 1.0:
            raise InputError("low_snr_cap must be at least 1 (1 disables the weighting).")
        for name in (
            "batch_size",
            "accumulation",
            "steps",
            "checkpoint_every",
            "log_every",
            "preview_every",
            "samples_per_volume",
        ):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1.")

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({**preset(self.model).to_dict(), **self.model_overrides})

    def to_dict(self) -> dict:
        data = asdict(self)
        data["level_probabilities"] = list(self.level_probabilities)
        return data


def load_config(path: str | os.PathLike) -> TrainingConfig:
    """Read a YAML training configuration; unknown keys are an error."""
    with open(path) as handle:
        data = yaml.safe_load(handle) or {}
    known = {f.name for f in fields(TrainingConfig)}
    unknown = set(data) - known
    if unknown:
        raise InputError(
            f"Unknown keys in '{path}': {', '.join(sorted(unknown))}. Known keys: {', '.join(sorted(known))}."
        )
    if "level_probabilities" in data:
        data["level_probabilities"] = tuple(data["level_probabilities"])
    return TrainingConfig(**data)
