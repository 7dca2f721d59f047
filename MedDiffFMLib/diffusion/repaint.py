"""RePaint inpainting (Lugmayr et al. 2022; Docs/METHOD.md 1.5).

At every reverse step the known region is replaced by the original image noised to the same
timestep: ``x_{t-1} = (1 - m) * x_{t-1}^known + m * x_{t-1}^generated``, ``m = 1`` where content is
generated. Optional resampling jumps re-noise the result ``jump_length`` steps back ``jump_count``
times, which harmonises the generated region with its surroundings.
"""

from __future__ import annotations

import torch

from ..device import randn
from ..errors import InputError
from ..progress import CancelToken, ProgressCallback, no_progress
from .samplers import NoisePredictor, ddim_step
from .schedule import NoiseSchedule


def repaint_schedule(timesteps: list[int], jump_length: int, jump_count: int) -> list[tuple[int, int]]:
    """Transitions ``(t, t_next)`` over a decreasing list of timesteps, ending at ``t_next = -1``.

    ``t_next < t`` is a reverse (denoising) step, ``t_next > t`` a re-noising jump. Counting levels
    ``k`` as reverse steps still to go (``k = 0`` is the clean image), the chain jumps back
    ``jump_length`` levels ``jump_count`` times at every level that is a multiple of ``jump_length``
    (RePaint's schedule); ``jump_length = 0`` or ``jump_count = 0`` gives plain reverse steps.
    """
    if jump_length < 0 or jump_count < 0:
        raise InputError("jump_length and jump_count must not be negative.")
    chain = [*timesteps, -1]
    top = len(timesteps)
    jumps = {k: jump_count for k in range(0, top - jump_length, jump_length)} if jump_length and jump_count else {}
    levels, level = [top], top
    while level >= 1:
        level -= 1
        levels.append(level)
        if jumps.get(level, 0) > 0:
            jumps[level] -= 1
            for _ in range(jump_length):
                level += 1
                levels.append(level)
    values = [chain[top - k] for k in levels]
    return list(zip(values[:-1], values[1:]))


def repaint(
    predict: NoisePredictor,
    schedule: NoiseSchedule,
    known: torch.Tensor,
    generate: torch.Tensor,
    timesteps: list[int],
    generator: torch.Generator,
    jump_length: int = 0,
    jump_count: int = 0,
    progress: ProgressCallback = no_progress,
    cancel: CancelToken | None = None,
) -> torch.Tensor:
    """Inpaint ``known`` ([-1, 1]) where ``generate`` (bool or 0/1, same shape) is set.

    Returns the final x0; outside ``generate`` it equals ``known`` exactly.
    """
    mask = generate.to(known.dtype)
    shape = tuple(known.shape)
    x = randn(shape, generator, known.device)
    transitions = repaint_schedule(timesteps, jump_length, jump_count)
    for index, (t, t_next) in enumerate(transitions):
        if cancel is not None:
            cancel.raise_if_cancelled()
        if t_next > t:
            ratio = schedule.abar(t_next) / schedule.abar(t)
            x = ratio**0.5 * x + (1.0 - ratio) ** 0.5 * randn(shape, generator, known.device)
        else:
            x0 = schedule.predict_x0(x, t, predict(x, t))
            noise = randn(shape, generator, known.device) if t_next >= 0 else None
            generated = ddim_step(schedule, x, t, t_next, x0, 1.0, noise) if t_next >= 0 else x0
            known_t = schedule.q_sample(known, t_next, randn(shape, generator, known.device)) if t_next >= 0 else known
            x = mask * generated + (1.0 - mask) * known_t
        progress(index + 1, len(transitions), f"t={t}")
    return torch.where(mask > 0, x.clamp(-1.0, 1.0), known)
