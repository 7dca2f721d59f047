"""The automatic noise level: the statistic's invariants and the calibrated estimate against
projection-domain simulated low dose of a phantom that the law was not fitted on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import body_mask
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.lowdose import simulate
from MedDiffFMLib.noise_level import (
    NOISE_LAW_EXPONENT,
    NOISE_LAW_RANGE_HU,
    NOISE_LAW_SCALE,
    high_pass_residual,
    noise_law_hu,
    noise_statistic_hu,
    resampled_noise_factor,
)
from MedDiffFMLib.tasks import estimate_noise_sigma
from MedDiffFMLib.volume import Volume


def organs_with_noise(sigma_hu: float, flat: bool = False) -> np.ndarray:
    """Piecewise-flat organs (-60..140 HU, blocks of 4 x 32 x 32; one organ of 40 HU if ``flat``)
    plus CT-like noise (correlated in-plane over 0.9 px) of standard deviation ``sigma_hu``, the same
    noise for every call."""
    rng = np.random.default_rng(0)
    organs = np.kron(rng.uniform(-60, 140, (2, 4, 4)), np.ones((4, 32, 32)))
    if flat:
        organs = np.full_like(organs, 40.0)
    noise = ndimage.gaussian_filter(rng.normal(0, 1, organs.shape), (0, 0.9, 0.9))
    return organs + noise * sigma_hu / noise.std()


def test_high_pass_residual_removes_planes_and_scales_white_noise():
    z, y, x = np.mgrid[:3, :20, :20].astype(np.float64)
    np.testing.assert_allclose(high_pass_residual(5 * z + 2 * y - 3 * x)[:, 1:-1, 1:-1], 0.0, atol=1e-9)
    white = np.random.default_rng(2).normal(0, 1, (8, 128, 128))
    assert high_pass_residual(white)[:, 1:-1, 1:-1].std() == pytest.approx(np.sqrt(9 / 8), rel=0.02)


def test_noise_statistic_is_linear_in_the_noise_and_ignores_edges_and_padding():
    base = noise_statistic_hu(organs_with_noise(10.0), "abdomen")
    assert noise_statistic_hu(organs_with_noise(20.0), "abdomen") == pytest.approx(2 * base, rel=0.05)
    # The same noise on one flat organ: the organs' edges do not move the statistic.
    assert noise_statistic_hu(organs_with_noise(10.0, flat=True), "abdomen") == pytest.approx(base, rel=0.08)
    # Constant padding outside the field of view (inside a wide window such as the chest's) is no tissue.
    padded = np.pad(organs_with_noise(10.0), ((0, 0), (40, 40), (40, 40)), constant_values=-1024.0)
    unpadded = noise_statistic_hu(organs_with_noise(10.0), "chest")
    assert noise_statistic_hu(padded, "chest") == pytest.approx(unpadded, rel=0.05)
    # Voxels clipped by the window (air) are no tissue either.
    with pytest.raises(InputError, match="give the noise level explicitly"):
        air = np.random.default_rng(3).normal(-1000.0, 10.0, (4, 64, 64))
        noise_statistic_hu(air, "abdomen")


def test_noise_law_is_the_fitted_power_law_inside_its_range_and_proportional_outside():
    low, high = NOISE_LAW_RANGE_HU
    middle = (low * high) ** 0.5
    assert noise_law_hu(middle) == pytest.approx(NOISE_LAW_SCALE * middle**NOISE_LAW_EXPONENT)
    assert noise_law_hu(2 * high) == pytest.approx(2 * noise_law_hu(high))
    assert noise_law_hu(low / 2) == pytest.approx(noise_law_hu(low) / 2)
    values = [noise_law_hu(s) for s in np.geomspace(low / 4, high * 4, 50)]
    assert np.all(np.diff(values) > 0)


def phantom(slices: int = 4, rows: int = 160, columns: int = 200) -> Volume:
    """An elliptic body (bone-like rim, soft tissue, a liver-like and a fatty organ, a contrast-filled
    vessel, smooth texture) at 0.8 x 0.8 x 2.5 mm: no scan the law was fitted on."""
    y, x = np.mgrid[:rows, :columns]

    def ellipse(ry: float, rx: float, dy: float = 0.0, dx: float = 0.0) -> np.ndarray:
        return ((y - rows / 2 - dy) / ry) ** 2 + ((x - columns / 2 - dx) / rx) ** 2 < 1

    plane = np.full((rows, columns), -1000.0)
    for ry, rx, dy, dx, hu in ((70, 92, 0, 0, 700), (65, 87, 0, 0, 30), (25, 30, -10, -35, 60), (12, 12, 15, 40, -80)):
        plane[ellipse(ry, rx, dy, dx)] = hu
    plane[ellipse(8, 8, 20, -5)] = 200.0
    rng = np.random.default_rng(0)
    texture = ndimage.gaussian_filter(plane + 8 * rng.standard_normal((slices, rows, columns)), (0, 3, 3))
    return Volume(texture.astype(np.float32), spacing=(0.8, 0.8, 2.5))


@pytest.mark.parametrize("target_db", [19.0, 27.0])
def test_noise_estimate_matches_projection_domain_low_dose(target_db):
    ct = phantom()
    result = simulate(ct, target_psnr=target_db, seed=0)
    low, reference = result.low_dose.array, result.reference.array
    truth = np.std((pp.hu_to_model(low, "abdomen") - pp.hu_to_model(reference, "abdomen"))[body_mask(reference)])
    assert estimate_noise_sigma(low, "abdomen", ct.spacing) == pytest.approx(truth, rel=0.3)


def test_resampled_noise_factor_predicts_the_noise_on_the_working_grid():
    rng = np.random.default_rng(1)
    angle = np.deg2rad(25.0)
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    for spacing in ((0.7, 0.7, 2.5), (0.6, 0.6, 5.0), (1.0, 1.0, 1.0)):
        shape = (int(60 / spacing[2]), 128, 128)
        volume = Volume(np.zeros(shape, np.float32), spacing=spacing, direction=direction)
        noise = ndimage.gaussian_filter(rng.normal(0, 1, shape), (0, 0.9, 0.9))
        noise = (noise / noise.std()).astype(np.float32)
        working = pp.resample(volume.with_array(noise), pp.isotropic_geometry(volume.geometry, 1.0)).array
        factor = resampled_noise_factor(volume.geometry, 1.0)
        assert factor == pytest.approx(working[2:-2, 4:-4, 4:-4].std(), rel=0.05), spacing
    assert resampled_noise_factor(volume.geometry, 1.0) == pytest.approx(1.0, abs=0.03)
