"""Reverse-diffusion updates and the sampling loop for synthesis.

All functions work on whole tensors of any shape; the noise prediction comes from a callable
``predict(x_t, t) -> eps`` (usually a :class:`~.sliding_window.WindowedNoisePredictor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..device import randn
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from .schedule import NoiseSchedule

NoisePredictor = Callable[[torch.Tensor, int], torch.Tensor]
SAMPLERS = ("ddpm", "ddim", "dpm++2m")


def ddpm_step(
    schedule: NoiseSchedule, x_t: torch.Tensor, t: int, eps: torch.Tensor, noise: torch.Tensor | None
) -> torch.Tensor:
    """Ancestral DDPM step ``x_t -> x_{t-1}``: posterior mean from the clipped x0 plus
    ``sqrt(beta_tilde_t) * noise`` (no noise at ``t = 0``)."""
    abar_t, abar_prev = schedule.abar(t), schedule.abar(t - 1)
    alpha_t = abar_t / abar_prev
    x0 = schedule.predict_x0(x_t, t, eps)
    mean = (abar_prev**0.5 * (1.0 - alpha_t) * x0 + alpha_t**0.5 * (1.0 - abar_prev) * x_t) / (1.0 - abar_t)
    if t == 0 or noise is None:
        return mean
    variance = max((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - alpha_t), 1e-20)
    return mean + variance**0.5 * noise


def ddim_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    x0: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Generalised DDIM step from ``t`` to ``t_prev < t`` given the (clipped) clean estimate ``x0``.

    The noise direction is re-derived from ``x0`` so that ``eta = 1`` over consecutive timesteps is
    exactly the DDPM posterior; ``eta = 0`` is deterministic DDIM.
    """
    abar_t, abar_prev = schedule.abar(t), schedule.abar(t_prev)
    sigma = eta * ((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)) ** 0.5
    eps = schedule.predict_eps(x_t, t, x0)
    x_prev = abar_prev**0.5 * x0 + max(1.0 - abar_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0 and noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev


def dpm_solver_2m_step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    t: int,
    t_next: int,
    x0: torch.Tensor,
    previous: tuple[int, torch.Tensor] | None,
) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, data prediction, multistep) from ``t`` to ``t_next``.

    With ``lambda = log(alpha / sigma)``, ``h = lambda_next - lambda_t``: first order
    ``x_next = (sigma_next / sigma_t) x_t - alpha_next (exp(-h) - 1) x0``; second order replaces
    ``x0`` by ``(1 + 1/(2r)) x0 - 1/(2r) x0_prev`` with ``r = h_prev / h``, where ``previous`` is
    ``(t_prev, x0_prev)`` of the step before. ``t_next = -1`` returns ``x0``.
    """
    if t_next < 0:
        return x0

    def log_snr(step: int) -> float:
        abar = schedule.abar(step)
        return 0.5 * math.log(abar / (1.0 - abar))

    abar_t, abar_next = schedule.abar(t), schedule.abar(t_next)
    h = log_snr(t_next) - log_snr(t)
    estimate = x0
    if previous is not None:
        ratio = (log_snr(t) - log_snr(previous[0])) / h
        estimate = (1.0 + 0.5 / ratio) * x0 - (0.5 / ratio) * previous[1]
    scale = ((1.0 - abar_next) / (1.0 - abar_t)) ** 0.5
    return scale * x_t - abar_next**0.5 * math.expm1(-h) * estimate


def sample(
    predict: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 1.0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
    prior: torch.Tensor | None = None,
    start: int | None = None,
) -> torch.Tensor:
    """Generate a sample of ``shape`` from pure noise; returns x_0 in [-1, 1].

    Sampling starts at :meth:`~.schedule.NoiseSchedule.sampling_start` (t = 978 of the cosine
    schedule's 999 for a noise-predicting network, 999 for a ``v`` one). ``ddpm`` runs every step
    from there; ``ddim`` runs ``steps`` strided steps (default 50) with ``eta`` (0 deterministic, 1
    stochastic); ``dpm++2m`` runs ``steps`` steps of the deterministic second-order
    DPM-Solver++(2M) (default 20) on the timesteps of
    :meth:`~.schedule.NoiseSchedule.log_snr_timesteps`, which needs far fewer steps than DDIM for
    the same accuracy.

    With ``prior`` (an image of ``shape`` in [-1, 1], e.g. the anatomy painted with each
    structure's typical intensity), sampling starts from ``prior`` noised to timestep ``start``
    (default: the pure-noise start) instead of from pure noise (Docs/METHOD.md 1.1): at t = 978 it
    sets only the windows' coarse intensities, which a noise-predicting network reads there but
    cannot make itself.
    """
    if sampler not in SAMPLERS:
        raise InputError(f"Unknown sampler '{sampler}'. Choose one of: {', '.join(SAMPLERS)}.")
    last = schedule.sampling_start() if start is None else start
    if not 0 <= last < schedule.num_timesteps:
        raise InputError(f"The start timestep {last} is outside 0..{schedule.num_timesteps - 1}.")
    if sampler == "dpm++2m":
        timesteps = schedule.log_snr_timesteps(last, steps or 20)
    else:
        timesteps = schedule.strided_timesteps(last, last + 1 if sampler == "ddpm" else steps or 50)
    x = randn(shape, generator, device)
    if prior is not None:
        if tuple(prior.shape) != tuple(shape):
            raise InputError(f"The prior's shape {tuple(prior.shape)} differs from the sample's {tuple(shape)}.")
        x = schedule.q_sample(prior.to(device=device, dtype=x.dtype), last, x)
    previous = None
    for index, t in enumerate(timesteps):
        if cancel is not None:
            cancel.raise_if_cancelled()
        eps = predict(x, t)
        t_prev = timesteps[index + 1] if index + 1 < len(timesteps) else -1
        if sampler == "dpm++2m":
            x0 = schedule.predict_x0(x, t, eps)
            x = dpm_solver_2m_step(schedule, x, t, t_prev, x0, previous)
            previous = (t, x0)
        else:
            noise = randn(shape, generator, device) if t_prev >= 0 and (sampler == "ddpm" or eta > 0) else None
            if sampler == "ddpm":
                x = ddpm_step(schedule, x, t, eps, noise)
            else:
                x = ddim_step(schedule, x, t, t_prev, schedule.predict_x0(x, t, eps), eta, noise)
        progress(index + 1, len(timesteps), f"t={t}")
    return x.clamp(-1.0, 1.0)
