"""One module per task; each task is one function shared by the CLI, the Slicer module and tests."""

from ..region import detect_region
from .anomaly import AnomalyResult, detect_anomalies, stack_slices
from .denoise import DenoiseResult, denoise, estimate_noise_sigma
from .engine import Engine
from .lesion import generate_lesion, inpaint_lesion
from .super_resolution import super_resolve
from .synthesize import synthesize

__all__ = [
    "AnomalyResult",
    "DenoiseResult",
    "Engine",
    "denoise",
    "detect_anomalies",
    "detect_region",
    "estimate_noise_sigma",
    "generate_lesion",
    "inpaint_lesion",
    "stack_slices",
    "super_resolve",
    "synthesize",
]
