"""Noise schedule and the closed-form quantities of DDPM (Docs/METHOD.md 1.1).

``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` with ``abar`` from MONAI's scheduler (cosine by
default, T = 1000). Timesteps are integers ``0..T-1``; ``t = -1`` stands for the clean image
(``abar_{-1} = 1``). A network predicts either ``eps`` or ``v = sqrt(abar_t) eps - sqrt(1 - abar_t)
x_0``; :meth:`NoiseSchedule.eps_from_output` turns either into ``eps``, which every sampler uses.
"""

from __future__ import annotations

import torch
from monai.networks.schedulers import DDPMScheduler

from ..errors import InputError

LOG_SNR_FLOOR = -3.0
"""log(alpha / sigma) below which the image is almost pure noise (signal 5 % of the noise)."""
NOISE_STRETCH_WEIGHT = 0.25
"""DPM-Solver++ steps below :data:`LOG_SNR_FLOOR` are 1 / this times wider than above it."""
START_SNR = 1e-3
"""Sampling from pure noise starts at the last timestep whose SNR ``abar / (1 - abar)`` is at least this."""


class NoiseSchedule:
    """Cumulative signal rates ``abar_t`` and conversions between x_t, x_0 and eps.

    Attributes:
        num_timesteps: T.
        name: MONAI's name of the schedule (``cosine``, ``linear_beta``, ...).
        prediction: what the network outputs, ``eps`` or ``v``.
        alphas_cumprod: ``(T,)`` float64, ``abar_t`` for t = 0..T-1.
    """

    def __init__(self, num_timesteps: int = 1000, schedule: str = "cosine", prediction: str = "eps") -> None:
        if prediction not in ("eps", "v"):
            raise InputError(f"Unknown prediction '{prediction}'. Choose 'eps' or 'v'.")
        scheduler = DDPMScheduler(num_train_timesteps=num_timesteps, schedule=schedule)
        self.num_timesteps = num_timesteps
        self.name = schedule
        self.prediction = prediction
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)

    def abar(self, t: int) -> float:
        """``abar_t`` (1.0 for ``t = -1``)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def sigma_bar(self, t: int) -> float:
        """Noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` of ``x_t / sqrt(abar_t)``."""
        abar = self.abar(t)
        return ((1.0 - abar) / abar) ** 0.5

    def timestep_for_sigma(self, sigma: float) -> int:
        """The timestep whose ``sigma_bar`` is closest to ``sigma`` (in the [-1, 1] image scale)."""
        if not sigma > 0:
            raise InputError(f"The noise level must be positive, got {sigma}.")
        sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        return int(torch.argmin((sigmas - sigma).abs()))

    def sampling_start(self, min_snr: float = START_SNR) -> int:
        """The timestep that sampling from pure noise starts at: for a ``v`` network the last one,
        for an ``eps`` network the last one with SNR >= ``min_snr``.

        A noise-predicting network's clean estimate ``(x_t - sqrt(1 - abar) eps) / sqrt(abar)``
        multiplies its error by ``1 / sqrt(abar)``: 20,000 at the cosine schedule's t = 999 (SNR
        2.4e-9), where the estimate is noise clipped to the window, and the samplers carried it on
        as the image's coarse intensities. At SNR 1e-3 (t = 978 for cosine, 825 for linear) the
        factor is 32 and pure noise differs from ``x_t`` by a signal of 3 % of the image. A ``v``
        network's estimate ``sqrt(abar) x_t - sqrt(1 - abar) v`` has no such factor.
        """
        if self.prediction == "v":
            return self.num_timesteps - 1
        snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        above = (snr >= min_snr).nonzero()
        return int(above.max()) if len(above) else 0

    def eps_from_output(self, x_t: torch.Tensor, t: int, output: torch.Tensor) -> torch.Tensor:
        """The noise estimate from a network's output at timestep ``t``: the output itself for an
        ``eps`` network, ``sqrt(1 - abar_t) x_t + sqrt(abar_t) v`` for a ``v`` network."""
        if self.prediction == "eps":
            return output
        abar = self.abar(t)
        return (1.0 - abar) ** 0.5 * x_t + abar**0.5 * output

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output for a batch ``(N, ...)`` noised with ``noise`` to timesteps
        ``t`` ``(N,)``: ``noise`` (``eps``) or ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (``v``)."""
        if self.prediction == "eps":
            return noise
        abar = self.alphas_cumprod[t.cpu()].to(x0.device, torch.float32).view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * noise - (1.0 - abar).sqrt() * x0

    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """Noise a clean image to timestep ``t``."""
        abar = self.abar(t)
        return abar**0.5 * x0 + (1.0 - abar) ** 0.5 * noise

    def predict_x0(self, x_t: torch.Tensor, t: int, eps: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, clipped to [-1, 1] if ``clip``."""
        abar = self.abar(t)
        x0 = (x_t - (1.0 - abar) ** 0.5 * eps) / abar**0.5
        return x0.clamp(-1.0, 1.0) if clip else x0

    def predict_eps(self, x_t: torch.Tensor, t: int, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t`` at timestep ``t``."""
        abar = self.abar(t)
        return (x_t - abar**0.5 * x0) / (1.0 - abar) ** 0.5

    def log_snr_timesteps(
        self, start: int, steps: int, floor: float = LOG_SNR_FLOOR, weight: float = NOISE_STRETCH_WEIGHT
    ) -> list[int]:
        """Up to ``steps`` distinct timesteps from ``start`` down to 0, evenly spaced in
        ``lambda = log(alpha / sigma)`` (the spacing DPM-Solver is designed for), except that the
        noise-dominated stretch below ``floor`` gets steps ``1 / weight`` times wider.

        ``floor`` is in lambda's units (natural log). There the image is almost pure noise and the
        probability flow almost linear; even spacing from the cosine schedule's own end (lambda =
        -9.9 at t = 999) puts 4 of its 9 distinct timesteps for 10 steps there (benchmarks/README.md,
        benchmark 6). Above about 40 steps, steps that fall on the same integer timestep merge.
        """
        if not 0.0 < weight <= 1.0:
            raise InputError(f"The weight of the noise-dominated stretch must be in (0, 1], got {weight}.")
        log_snr = 0.5 * torch.log(self.alphas_cumprod / (1.0 - self.alphas_cumprod))
        first, last = float(log_snr[start]), float(log_snr[0])
        head = max(floor - first, 0.0) * weight
        length = head + last - max(first, floor)
        u = torch.linspace(0.0, length, max(1, steps), dtype=torch.float64)
        targets = torch.where(u < head, first + u / weight, max(first, floor) + (u - head))
        nearest = [int(torch.argmin((log_snr[: start + 1] - value).abs())) for value in targets]
        return list(dict.fromkeys(nearest))

    def strided_timesteps(self, start: int, steps: int) -> list[int]:
        """``steps`` distinct timesteps from ``start`` down to 0, evenly spaced (uniform skipping)."""
        if not 0 <= start < self.num_timesteps:
            raise InputError(f"Timestep {start} is outside 0..{self.num_timesteps - 1}.")
        if steps < 1:
            raise InputError(f"The number of steps must be at least 1, got {steps}.")
        steps = min(steps, start + 1)
        grid = torch.linspace(start, 0, steps, dtype=torch.float64).round().long().tolist()
        return list(dict.fromkeys(grid))
