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
