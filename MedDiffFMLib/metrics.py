"""Image-quality metrics shared by the demo, the benchmarks and ``Training.evaluate``.

A window is given as ``(low, high)`` in the data's units (HU, or ``(-1, 1)`` for the model's
scale) or as a :class:`~MedDiffFMLib.preprocessing.Window`; images are clipped to it and the
data range is ``high - low``.
"""

from __future__ import annotations

import math
from typing import Union

import numpy as np

from .errors import InputError
from .preprocessing import Window

WindowLike = Union[tuple[float, float], Window]


def window_bounds(window: WindowLike) -> tuple[float, float]:
    """``(low, high)`` of a window given as a pair or a :class:`Window`; ``low < high`` is checked."""
    low, high = (window.low, window.high) if isinstance(window, Window) else (float(window[0]), float(window[1]))
    if not low < high:
        raise InputError(f"A window needs low < high, got ({low:g}, {high:g}).")
    return low, high


def scaled_pair(reference: np.ndarray, test: np.ndarray, window: WindowLike) -> tuple[np.ndarray, np.ndarray]:
    """Both images clipped to ``window`` and scaled to ``[0, 1]`` (float64), after shape checks."""
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise InputError(f"The images differ in shape: {reference.shape} vs {test.shape}.")
    low, high = window_bounds(window)

    def scale(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float64)
        if not np.isfinite(image).all():
            raise InputError("An image contains NaN or infinite values.")
        return (np.clip(image, low, high) - low) / (high - low)

    return scale(reference), scale(test)


def checked_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask of ``shape`` (all True when ``mask`` is None); an empty mask is an error."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(mask) != 0
    if mask.shape != shape:
        raise InputError(f"The mask's shape {mask.shape} differs from the images' {shape}.")
    if not mask.any():
        raise InputError("The mask is empty: it selects no voxel.")
    return mask


def psnr(reference: np.ndarray, test: np.ndarray, window: WindowLike, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference``.

    Both are clipped to ``window``; the peak is the window width ``high - low``; the mean squared
    error is taken over all voxels of the volume (or those in ``mask``) at once, not per slice.
    Identical images give ``inf``.
    """
    reference, test = scaled_pair(reference, test, window)
    mask = checked_mask(mask, reference.shape)
    mse = float(np.mean((reference[mask] - test[mask]) ** 2))
    return math.inf if mse == 0.0 else -10.0 * math.log10(mse)
