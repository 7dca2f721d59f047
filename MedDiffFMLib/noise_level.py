"""The noise level of a CT, for DiffPIR's automatic ``sigma_n`` (Docs/METHOD.md 1.5).

Reconstructed low-dose CT noise is correlated in-plane over about a pixel, independent between
slices and not stationary: it is strongest along dense paths (streaks), which is where a global
standard deviation gets much of its value. The estimate therefore has two parts:

1. :func:`noise_statistic_hu`: a robust measurement on the input's own slices, the 25th percentile
   of the local RMS (about 3 x 3 mm in-plane) of the in-plane high-pass residual (each pixel minus
   the mean of its 8 neighbours), over voxels inside the region's window. The high-pass suppresses
   smooth tissue texture; the low percentile keeps edges out.
2. :func:`estimate_noise_sigma`: the statistic mapped to the noise standard deviation by the power
   law ``std = NOISE_LAW_SCALE * statistic ** NOISE_LAW_EXPONENT`` (HU), fitted on
   projection-domain simulated low-dose CT of the training scans at 15-33 dB
   (``benchmarks/noise_level.py``). The exponent above 1 carries what a quantile misses at high
   noise (streaks); a single constant factor, as before, was off by -40 % to +60 % across doses.

:func:`resampled_noise_factor` carries a level from the input's grid to the working grid.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import preprocessing as pp
from .errors import InputError
from .volume import Geometry, Volume

NEIGHBOURHOOD_MM = 3.0
"""In-plane side of the neighbourhood of the local RMS, in mm (at least 3 pixels)."""

NOISE_PERCENTILE = 25
"""Percentile of the local RMS values taken as the statistic."""

NOISE_LAW_SCALE = 1.083
NOISE_LAW_EXPONENT = 1.219
"""``std_HU = NOISE_LAW_SCALE * statistic_HU ** NOISE_LAW_EXPONENT``: least squares in log-log over
5 training scans x 6 doses (``python benchmarks/noise_level.py``)."""

NOISE_LAW_RANGE_HU = (6.0, 50.0)
"""Statistic range (HU) the law was fitted on; outside it the ratio std / statistic is held at the
nearest end instead of extrapolating the power law."""

NOISE_CORRELATION_PX = 0.9
"""In-plane Gaussian correlation (pixels) of the CT-like noise in :func:`resampled_noise_factor`."""


def high_pass_residual(image: np.ndarray) -> np.ndarray:
    """Each pixel minus the mean of its 8 in-plane neighbours, ``[z, y, x]`` in and out (float64).
    For white noise of standard deviation s its standard deviation is ``s * sqrt(9 / 8)``."""
    kernel = np.full((1, 3, 3), 1.0 / 8.0)
    kernel[0, 1, 1] = 0.0
    image = np.asarray(image, dtype=np.float64)
    return image - ndimage.convolve(image, kernel, mode="nearest")


def noise_statistic_hu(hu: np.ndarray, region: str, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """The uncalibrated noise statistic of a CT ``[z, y, x]`` in HU (module docstring, step 1).

    ``spacing`` is (x, y, z) in mm. Voxels count where the whole neighbourhood (plus the residual's
    one-pixel reach) lies inside the region's window with 2.5 % to spare at each end, so clipped
    air, lung and bone are excluded, and where the neighbourhood is not constant (padding outside
    the scanner's field of view, e.g. -1024 HU inside a wide window).
    """
    window = pp.check_region(region)
    image = pp.hu_to_model(hu, region).astype(np.float64)
    pixels = max(3, int(round(NEIGHBOURHOOD_MM / min(spacing[0], spacing[1]))) | 1)
    size = (1, pixels, pixels)
    residual = high_pass_residual(image)
    mean_square = ndimage.uniform_filter(residual * residual, size=size)
    inside = ndimage.minimum_filter(np.abs(image) < 0.95, size=(1, pixels + 2, pixels + 2))
    usable = inside & (ndimage.maximum_filter(image, size=size) > ndimage.minimum_filter(image, size=size))
    if usable.sum() < 1000:
        raise InputError(
            "Too few voxels inside the window to estimate the noise level; give the noise level explicitly "
            "(sigma_n in the model's [-1, 1] scale, e.g. 0.05)."
        )
    return float(np.percentile(np.sqrt(mean_square[usable]), NOISE_PERCENTILE) * window.width / 2)


def noise_law_hu(statistic_hu: float) -> float:
    """The noise standard deviation (HU) that :func:`noise_statistic_hu` = ``statistic_hu`` stands for."""
    low, high = NOISE_LAW_RANGE_HU
    anchor = min(max(statistic_hu, low), high)
    return statistic_hu * NOISE_LAW_SCALE * anchor ** (NOISE_LAW_EXPONENT - 1.0)


def estimate_noise_sigma(hu: np.ndarray, region: str, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> float:
    """Noise standard deviation of a CT ``[z, y, x]`` (HU) on its own grid, in the model's ``[-1, 1]``
    scale of ``region`` (what DiffPIR's ``sigma_n`` needs before :func:`resampled_noise_factor`).

    The std is over the body with the image clipped to the window, as DiffPIR sees it; the law was
    fitted on simulated low dose (module docstring), so on scans reconstructed with other kernels
    or iterative methods it is an approximation: give ``sigma_n`` explicitly where it matters.
    """
    window = pp.check_region(region)
    return noise_law_hu(noise_statistic_hu(hu, region, spacing)) / (window.width / 2)


def resampled_noise_factor(source: Geometry, spacing_mm: float) -> float:
    """Ratio of the noise standard deviation after linear resampling of ``source`` to ``spacing_mm``.

    Measured on reconstructed-CT-like noise (Gaussian-correlated in-plane over
    ``NOISE_CORRELATION_PX`` pixels, independent between slices) on a block of ``source`` of up to
    12 x 96 x 96 voxels, resampled to the isotropic grid over it (:func:`isotropic_geometry`, as
    the working grid is made). Interpolation averages neighbouring voxels, so the factor is below 1
    when the working grid is finer than the input's.
    """
    block = source.subgrid(tuple(slice(0, min(n, limit)) for n, limit in zip(source.shape, (12, 96, 96))))
    noise = np.random.default_rng(0).standard_normal(block.shape)
    noise = ndimage.gaussian_filter(noise, (0, NOISE_CORRELATION_PX, NOISE_CORRELATION_PX))
    noise = (noise / noise.std()).astype(np.float32)
    resampled = pp.resample(Volume.on_geometry(noise, block), pp.isotropic_geometry(block, spacing_mm)).array
    interior = tuple(slice(1, -1) if n > 4 else slice(None) for n in resampled.shape)
    return float(resampled[interior].std())
