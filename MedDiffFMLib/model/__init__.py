"""Network, configuration and weights of MedDiff-FM."""

from .config import PRESETS, ModelConfig, preset
from .network import ControlledNet, MedDiffFMNet
from .weights import (
    ModelCard,
    cache_dir,
    import_checkpoint,
    install,
    list_installed,
    load_controlled_model,
    load_model,
    load_task_model,
    read_catalogue,
    resolve_weights,
    save_checkpoint,
    untrained_model,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "preset",
    "ControlledNet",
    "MedDiffFMNet",
    "ModelCard",
    "cache_dir",
    "import_checkpoint",
    "install",
    "list_installed",
    "load_controlled_model",
    "load_model",
    "load_task_model",
    "read_catalogue",
    "resolve_weights",
    "save_checkpoint",
    "untrained_model",
]
