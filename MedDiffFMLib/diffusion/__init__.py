"""Noise schedule, samplers, DiffPIR, sampling constraints and whole-volume sliding-window noise estimation."""

from .constraints import shift_to_medians
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
    "shift_to_medians",
    "NoiseSchedule",
    "Conditions",
    "WindowedNoisePredictor",
]
