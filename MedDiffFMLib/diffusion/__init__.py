"""Noise schedule, samplers, DiffPIR, sampling constraints and whole-volume sliding-window noise estimation."""

from .constraints import StructureMedians
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
    "StructureMedians",
    "NoiseSchedule",
    "Conditions",
    "WindowedNoisePredictor",
]
