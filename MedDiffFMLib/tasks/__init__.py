"""One module per task; each task is one function shared by the CLI, the Slicer module and tests."""

from .anomaly import AnomalyResult, detect_anomalies, stack_slices
from .denoise import DenoiseResult, denoise, estimate_noise_sigma
from .engine import Engine
from .region import detect_region
from .synthesize import synthesize

__all__ = [
    "AnomalyResult",
    "detect_anomalies",
    "stack_slices",
    "DenoiseResult",
    "denoise",
    "estimate_noise_sigma",
    "Engine",
    "detect_region",
    "synthesize",
]
