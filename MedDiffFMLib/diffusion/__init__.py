"""Noise schedule, samplers, DiffPIR and whole-volume sliding-window noise estimation."""

from .diffpir import diffpir, identity_data_step
from .samplers import ddim_step, ddpm_step, sample
from .schedule import NoiseSchedule
from .sliding_window import Conditions, WindowedNoisePredictor

__all__ = [
    "diffpir",
    "identity_data_step",
    "ddim_step",
    "ddpm_step",
    "sample",
    "NoiseSchedule",
    "Conditions",
    "WindowedNoisePredictor",
]
