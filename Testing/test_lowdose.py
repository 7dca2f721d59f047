"""Projection-domain low-dose CT simulator (MedDiffFMLib/lowdose.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import crop

from MedDiffFMLib import lowdose
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.volume import Volume, read_volume, write_volume
from Training.evaluate import psnr


@pytest.fixture(scope="module")
def patch(sample_ct) -> Volume:
    """A 3-slice 64 x 64 crop through the abdomen of the sample CT (3 mm pixels)."""
    return crop(sample_ct, slice(10, 13), slice(20, 84), slice(30, 94))


@pytest.fixture(scope="module")
def simulator(patch) -> lowdose.LowDoseSimulator:
    return lowdose.LowDoseSimulator(patch.array, lowdose.square_pixel_mm(patch))


def phantom(rows: int = 41, columns: int = 52) -> np.ndarray:
    """One slice: air, an off-centre water ellipse and a 300 HU insert."""
    y, x = np.mgrid[:rows, :columns]
    hu = np.full((rows, columns), -1000.0)
    hu[((y - 20) / 17) ** 2 + ((x - 24) / 22) ** 2 < 1] = 0.0
    hu[(y - 14) ** 2 + (x - 31) ** 2 < 16] = 300.0
    return hu[None]


def test_hu_and_attenuation():
    assert lowdose.hu_to_mu(np.array([0.0, -1000.0, -1100.0, 1000.0])) == pytest.approx(
        [lowdose.MU_WATER, 0.0, 0.0, 2 * lowdose.MU_WATER]
    )
    hu = np.array([-1000.0, -50.0, 0.0, 1500.0])
    assert lowdose.mu_to_hu(lowdose.hu_to_mu(hu)) == pytest.approx(hu)


def test_reference_keeps_units_and_position_of_a_phantom():
    hu = phantom()
    reference = lowdose.LowDoseSimulator(hu, pixel_mm=2.0).reference
    assert reference.shape == hu.shape and reference.dtype == np.float32
    assert np.median(reference[0, 22:30, 10:20]) == pytest.approx(0.0, abs=3.0)  # water
    assert reference[0, 13:16, 30:33].mean() == pytest.approx(300.0, abs=30.0)  # insert, not shifted
    assert np.median(reference[0, :, -3:]) == pytest.approx(-1000.0, abs=3.0)  # air
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    errors = [np.abs(np.roll(hu, shift, axis=(1, 2)) - reference).mean() for shift in shifts]
    assert shifts[int(np.argmin(errors))] == (0, 0)  # the padded, non-square slice comes back in place


def test_noise_free_path_reproduces_the_reference(simulator):
    np.testing.assert_array_equal(simulator.low_dose(math.inf), simulator.reference)
    assert simulator.psnr(simulator.low_dose(1e9)) > 60.0


def test_noise_decreases_with_the_photon_count(simulator):
    stds = [float(np.std(simulator.low_dose(i0) - simulator.reference)) for i0 in (1e4, 1e5, 1e6)]
    assert stds[0] > stds[1] > stds[2] > 0.0
    assert 2.5 < stds[1] / stds[2] < 4.0  # about sqrt(10): variance ~ 1 / I0


def test_seeded_and_reproducible(simulator):
    first = simulator.low_dose(1e5, seed=7)
    np.testing.assert_array_equal(first, simulator.low_dose(1e5, seed=7))
    assert not np.array_equal(first, simulator.low_dose(1e5, seed=8))


def test_photon_starvation_stays_finite(simulator):
    assert np.isfinite(simulator.low_dose(1.0)).all()
    with pytest.raises(InputError, match="positive"):
        simulator.low_dose(0.0)


def test_calibration_hits_the_target(simulator):
    calibration = simulator.calibrate(23.0, seed=3)
    assert calibration.psnr == pytest.approx(23.0, abs=0.3)
    assert simulator.psnr(simulator.low_dose(calibration.i0, seed=3)) == pytest.approx(calibration.psnr)
    assert calibration.evaluations <= 8
    assert simulator.calibrate(30.0, seed=3).i0 > calibration.i0
    with pytest.raises(InputError, match="Could not reach"):
        simulator.calibrate(400.0, max_evaluations=3)


def test_simulate_keeps_the_geometry(patch):
    result = lowdose.simulate(patch, i0=2e4, seed=1)
    for volume in (result.low_dose, result.reference):
        assert volume.geometry.same_grid(patch.geometry)
        assert volume.metadata["MedDiffFM_lowdose_i0"] == "20000"
    assert result.psnr == pytest.approx(psnr(result.reference.array, result.low_dose.array, (-160, 240)))


def test_simulate_refuses_non_square_pixels_and_non_axial_slices(patch):
    with pytest.raises(InputError, match="square pixels"):
        lowdose.simulate(Volume(patch.array, spacing=(0.7, 0.8, 3.0)), i0=1e5)
    sagittal = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    with pytest.raises(InputError, match="not axial"):
        lowdose.simulate(Volume(patch.array, direction=sagittal), i0=1e5)


def test_command_line_writes_both_volumes_on_the_input_grid(patch, tmp_path, capsys):
    source = write_volume(patch, tmp_path / "ct.nrrd")
    low, reference = tmp_path / "low.nii.gz", tmp_path / "reference.nii.gz"
    assert lowdose.main([str(source), str(low), str(reference), "--target-psnr", "25", "--seed", "2"]) == 0
    assert "PSNR 25.0" in capsys.readouterr().out
    for path in (low, reference):
        assert read_volume(path).geometry.same_grid(patch.geometry)
    assert psnr(read_volume(reference).array, read_volume(low).array, (-160, 240)) == pytest.approx(25.0, abs=0.3)
    assert lowdose.main([str(source), str(low), str(reference), "--i0", "1e5"]) == 2
    assert "already exists" in capsys.readouterr().err
