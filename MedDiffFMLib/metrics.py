"""Image-quality metrics used by the demo and the benchmarks."""

from __future__ import annotations

import numpy as np

from .preprocessing import Window


def psnr(reference_hu: np.ndarray, test_hu: np.ndarray, window: Window, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of ``test`` against ``reference`` after clipping both to ``window`` (HU).

    The peak is the window width; ``mask`` (non-zero voxels) restricts the voxels compared.
    """
    reference = np.clip(np.asarray(reference_hu, dtype=np.float64), window.low, window.high)
    test = np.clip(np.asarray(test_hu, dtype=np.float64), window.low, window.high)
    if mask is not None:
        selected = np.asarray(mask) != 0
        reference, test = reference[selected], test[selected]
    mse = float(np.mean((reference - test) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(window.width**2 / mse)
