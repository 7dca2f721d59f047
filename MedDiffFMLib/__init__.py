"""MedDiffFMLib: the MedDiff-FM diffusion foundation model for CT, without any Slicer dependency.

Typical use::

    from MedDiffFMLib import Engine, denoise, load_model, read_volume, resolve_weights, write_volume

    engine = Engine(load_model(resolve_weights()))
    result = denoise(read_volume("low_dose.nii.gz"), engine)
    write_volume(result.volume, "denoised.nii.gz")
"""

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
from .model import load_controlled_model, load_model, resolve_weights, untrained_model
from .progress import CancelToken
from .tasks import Engine, denoise, detect_anomalies, stack_slices, synthesize
from .volume import Geometry, Volume, read_volume, write_volume

__version__ = "0.1.0"

__all__ = [
    "CancelledError",
    "ChecksumError",
    "InputError",
    "MaskError",
    "MedDiffFMError",
    "OutputExistsError",
    "ReadError",
    "WeightsError",
    "load_controlled_model",
    "load_model",
    "resolve_weights",
    "untrained_model",
    "CancelToken",
    "Engine",
    "denoise",
    "detect_anomalies",
    "stack_slices",
    "synthesize",
    "Geometry",
    "Volume",
    "read_volume",
    "write_volume",
    "__version__",
]
