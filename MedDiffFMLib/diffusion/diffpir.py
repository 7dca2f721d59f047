"""DiffPIR plug-and-play restoration (Zhu et al. 2023; Docs/METHOD.md 1.5).

Observation model ``y0 = H(x0) + sigma_n z`` in the model's [-1, 1] scale. Sampling starts at the
timestep ``t_start`` whose ``sigma_bar`` equals ``sigma_n``, from ``x = sqrt(abar_t_start) * y0``
for denoising (``y0`` already carries noise of that level) or from a given start (e.g. the
up-sampled observation noised to ``t_start``), and runs strided steps down to 0. Each step
predicts ``x0_hat`` with the network, applies the data proximal step with
``rho_t = lambda * sigma_n^2 / sigma_bar_t^2``, and moves to the next timestep mixing the
re-derived noise with fresh noise (weight ``zeta``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..device import randn
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from .samplers import NoisePredictor
from .schedule import NoiseSchedule

DataStep = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""``(x0_hat, y0, rho_t) -> x0_hat`` after the data-consistency step."""


def identity_data_step(x0: torch.Tensor, y0: torch.Tensor, rho: float) -> torch.Tensor:
    """Closed-form proximal step for denoising (H = identity): ``(y0 + rho x0) / (1 + rho)``."""
    return (y0 + rho * x0) / (1.0 + rho)


def diffpir(
    predict: NoisePredictor,
    schedule: NoiseSchedule,
    y0: torch.Tensor,
    sigma_n: float,
    lam: float,
    steps: int,
    zeta: float,
    generator: torch.Generator,
    data_step: DataStep = identity_data_step,
    x_start: torch.Tensor | None = None,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Restore ``y0`` ([-1, 1] scale); returns the final clean estimate in [-1, 1].

    ``x_start`` (shape of the result) replaces the default start ``sqrt(abar_t_start) * y0``, for
    operators whose output is smaller than their input.
    """
    if lam <= 0:
        raise InputError(f"lambda must be positive, got {lam}.")
    if not 0.0 <= zeta <= 1.0:
        raise InputError(f"zeta must be in [0, 1], got {zeta}.")
    t_start = schedule.timestep_for_sigma(sigma_n)
    timesteps = schedule.strided_timesteps(t_start, steps)
    x = schedule.abar(t_start) ** 0.5 * y0 if x_start is None else x_start
    for index, t in enumerate(timesteps):
        if cancel is not None:
            cancel.raise_if_cancelled()
        x0 = schedule.predict_x0(x, t, predict(x, t))
        x0 = data_step(x0, y0, lam * sigma_n**2 / schedule.sigma_bar(t) ** 2)
        t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        if t_prev >= 0:
            eps = schedule.predict_eps(x, t, x0)
            noise = randn(tuple(x.shape), generator, x.device)
            abar_prev = schedule.abar(t_prev)
            x = abar_prev**0.5 * x0 + (1.0 - abar_prev) ** 0.5 * ((1.0 - zeta) ** 0.5 * eps + zeta**0.5 * noise)
        progress(index + 1, len(timesteps), f"t={t}")
    return x0.clamp(-1.0, 1.0)
