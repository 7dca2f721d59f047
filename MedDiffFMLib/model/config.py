"""Architecture configuration and its named presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import WeightsError

PREDICTIONS = ("eps", "v")
"""What a network can be trained to output (see :class:`ModelConfig`)."""


@dataclass(frozen=True)
class ModelConfig:
    """Every architecture choice of a MedDiff-FM network (and its ControlNet).

    Attributes:
        patch_size: edge of the cubic training patch / sampling window, in voxels.
        spacing_mm: isotropic voxel spacing the model works at (1.0 in the paper).
        channels: feature channels per U-Net level.
        attention_levels: self-attention per level (the paper: only at 16^3).
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (divides every entry of ``channels``).
        position_frequencies: L of the Fourier position encoding (6L input channels).
        anatomy_channels: width of the learned anatomy label embedding.
        control_channels: input channels of the ControlNet task condition.
        num_train_timesteps: T of the diffusion process.
        schedule: noise schedule name known to MONAI's schedulers.
        prediction: what the network outputs: ``eps`` (the noise, as in the paper) or ``v``
            (``sqrt(abar) eps - sqrt(1 - abar) x0``, Salimans & Ho 2022), whose clean estimate
            ``sqrt(abar) x_t - sqrt(1 - abar) v`` does not amplify the network's error at high
            noise, so sampling can start from the schedule's last timestep (Docs/METHOD.md 1.1).
    """

    patch_size: int = 128
    spacing_mm: float = 1.0
    channels: tuple[int, ...] = (32, 64, 128, 256)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    position_frequencies: int = 4
    anatomy_channels: int = 4
    control_channels: int = 1
    num_train_timesteps: int = 1000
    schedule: str = "cosine"
    prediction: str = "eps"

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "num_res_blocks",
            "num_head_channels",
            "norm_num_groups",
            "position_frequencies",
            "anatomy_channels",
            "control_channels",
            "num_train_timesteps",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise WeightsError(f"ModelConfig: '{name}' must be a positive integer, got {value!r}.")
        if (
            isinstance(self.spacing_mm, bool)
            or not isinstance(self.spacing_mm, (int, float))
            or not self.spacing_mm > 0
        ):
            raise WeightsError(f"ModelConfig: 'spacing_mm' must be a positive number, got {self.spacing_mm!r}.")
        if not isinstance(self.schedule, str):
            raise WeightsError(f"ModelConfig: 'schedule' must be a name, got {self.schedule!r}.")
        if self.prediction not in PREDICTIONS:
            raise WeightsError(
                f"ModelConfig: 'prediction' must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}."
            )
        sequences = (self.channels, self.attention_levels)
        if not all(isinstance(v, (list, tuple)) and v for v in sequences):
            raise WeightsError("ModelConfig: 'channels' and 'attention_levels' must be non-empty lists.")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in self.channels):
            raise WeightsError(f"ModelConfig: 'channels' must be positive integers, got {self.channels!r}.")
        if not all(isinstance(a, bool) for a in self.attention_levels):
            raise WeightsError(f"ModelConfig: 'attention_levels' must be true/false, got {self.attention_levels!r}.")
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        if len(self.channels) != len(self.attention_levels):
            raise WeightsError("ModelConfig: channels and attention_levels must have the same length.")
        if any(c % self.norm_num_groups for c in self.channels):
            raise WeightsError("ModelConfig: every channel count must be a multiple of norm_num_groups.")
        if self.patch_size % 2 ** (len(self.channels) - 1):
            raise WeightsError("ModelConfig: patch_size must be divisible by 2^(number of levels - 1).")

    @property
    def downsampling_factor(self) -> int:
        """Spatial sizes given to the network must be multiples of this."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["attention_levels"] = list(self.attention_levels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise WeightsError(f"Unknown model configuration keys: {', '.join(sorted(unknown))}.")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "demo": ModelConfig(
        patch_size=32,
        spacing_mm=3.0,
        channels=(16, 32, 64),
        attention_levels=(False, False, True),
        num_head_channels=16,
        norm_num_groups=8,
    ),
    "base1mm": ModelConfig(
        patch_size=32,
        spacing_mm=1.0,
        channels=(32, 64, 128),
        attention_levels=(False, False, True),
        num_head_channels=32,
        norm_num_groups=16,
    ),
    # base1mm with a fourth level (4^3 at the bottom, attention there), so that one window's
    # features see all of its 32 mm; 11.8 M parameters, 23.5 MB in bfloat16.
    "large1mm": ModelConfig(
        patch_size=32,
        spacing_mm=1.0,
        channels=(32, 64, 128, 128),
        attention_levels=(False, False, False, True),
        num_head_channels=32,
        norm_num_groups=16,
    ),
    "tiny": ModelConfig(
        patch_size=16,
        spacing_mm=3.0,
        channels=(8, 16),
        attention_levels=(False, True),
        num_head_channels=8,
        norm_num_groups=8,
        position_frequencies=2,
        anatomy_channels=2,
    ),
}
"""Named configurations: ``paper`` (MedDiff-FM as published, for GPUs), ``base1mm`` (the paper's 1 mm
grid and first three channel widths with 32^3 windows, trainable on a CPU with bfloat16), ``demo`` (the small
3 mm demonstration network), ``tiny`` (unit tests)."""


def preset(name: str) -> ModelConfig:
    """The named preset, or a :class:`WeightsError` listing the valid names."""
    if name not in PRESETS:
        raise WeightsError(f"Unknown model preset '{name}'. Choose one of: {', '.join(PRESETS)}.")
    return PRESETS[name]
