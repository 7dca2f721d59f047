"""MedDiffFMLib: the MedDiff-FM diffusion foundation model for CT, without any Slicer dependency.

Typical use::

    from MedDiffFMLib import Engine, denoise, read_volume, write_volume
    from MedDiffFMLib.model import load_task_model

    engine = Engine(load_task_model(task_key="denoise"))  # the model the command line runs for the task
    result = denoise(read_volume("low_dose.nii.gz"), engine)
    write_volume(result.volume, "denoised.nii.gz")
"""

import importlib
from typing import TYPE_CHECKING

from .errors import (
    CancelledError,
    ChecksumError,
    InputError,
    MaskError,
    MedDiffFMError,
    OutputExistsError,
    ReadError,
    WeightsError,
)

# torch and MONAI load only when a model or task is first used, so that file handling, data
# preparation and the command line's --help start in a fraction of a second; numpy and SimpleITK
# only with volumes, so that the task definitions (task_spec) import with the standard library alone.
_LAZY = {
    "Geometry": "volume",
    "Volume": "volume",
    "read_volume": "volume",
    "write_volume": "volume",
    "load_controlled_model": "model",
    "load_model": "model",
    "resolve_weights": "model",
    "untrained_model": "model",
    "CancelToken": "progress",
    "Engine": "tasks",
    "denoise": "tasks",
    "detect_anomalies": "tasks",
    "generate_lesion": "tasks",
    "inpaint_lesion": "tasks",
    "stack_slices": "tasks",
    "super_resolve": "tasks",
    "synthesize": "tasks",
}

if TYPE_CHECKING:
    from .model import load_controlled_model, load_model, resolve_weights, untrained_model
    from .progress import CancelToken
    from .tasks import (
        Engine,
        denoise,
        detect_anomalies,
        generate_lesion,
        inpaint_lesion,
        stack_slices,
        super_resolve,
        synthesize,
    )
    from .volume import Geometry, Volume, read_volume, write_volume


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'MedDiffFMLib' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CancelToken",
    "CancelledError",
    "ChecksumError",
    "Engine",
    "Geometry",
    "InputError",
    "MaskError",
    "MedDiffFMError",
    "OutputExistsError",
    "ReadError",
    "Volume",
    "WeightsError",
    "__version__",
    "denoise",
    "detect_anomalies",
    "generate_lesion",
    "inpaint_lesion",
    "load_controlled_model",
    "load_model",
    "read_volume",
    "resolve_weights",
    "stack_slices",
    "super_resolve",
    "synthesize",
    "untrained_model",
    "write_volume",
]
