"""Every task's invariants on random grids far from the model's: anisotropic, oblique, thick slices.

For each drawn grid (spacing 0.5-5 mm per axis, a random rotation, optionally mirrored), a small
phantom CT (air, soft tissue, bone, a liver label) is run through all six tasks with tiny random
networks. Invariants: outputs lie on the input's grid (super-resolution: the input's in-plane grid
and the requested slices); voxel type float32 HU for whole-volume results, the input's own type for
inpainting; synthesised HU within the CT range; every voxel the model cannot represent carried over
with its exact value; inpainting leaves every voxel outside the mask bit-identical, and lesion generation (scope
"lesion") every voxel outside it as the synthesis without a lesion.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_tiny_model, randomise_zero_parameters
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import label_of
from MedDiffFMLib.model.network import ControlledNet
from MedDiffFMLib.tasks import (
    Engine,
    denoise,
    detect_anomalies,
    generate_lesion,
    inpaint_lesion,
    super_resolve,
    synthesize,
)
from MedDiffFMLib.volume import Volume


def rotation(angles: tuple[float, float, float], mirror: bool) -> np.ndarray:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    matrix = rz @ ry @ rx
    return matrix @ np.diag([1.0, 1.0, -1.0]) if mirror else matrix


def phantom(spacing: tuple[float, float, float], direction: np.ndarray) -> tuple[Volume, Volume, Volume]:
    """CT (int16 HU), anatomy labels and a lesion mask covering about 60 x 60 x 40 mm."""
    shape = tuple(int(np.clip(round(extent / s), 4, 48)) for extent, s in zip((40.0, 60.0, 60.0), spacing[::-1]))
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    body = y**2 + x**2 < 0.8
    hu = np.where(body, 40, -1000) + np.where(x**2 + (y - 0.4) ** 2 < 0.05, 700, 0)
    hu = hu + np.random.default_rng(0).normal(0, 20, shape) * body
    ct = Volume(hu.astype(np.int16), spacing, (-15.0, 22.5, 40.0), direction.ravel())
    liver = body & (x < 0) & (y < 0.2)
    labels = np.where(liver, label_of("liver"), np.where(body, label_of("body"), 0)).astype(np.uint8)
    lesion = (liver & ((x + 0.4) ** 2 + y**2 + z**2 < 0.15)).astype(np.uint8)
    return ct, ct.with_array(labels), ct.with_array(lesion)


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    base = Engine(random_tiny_model(), device="cpu", batch_size=16)
    controlled = Engine(randomise_zero_parameters(ControlledNet(random_tiny_model())), device="cpu", batch_size=16)
    return base, controlled


grids = dict(
    spacing=st.tuples(st.floats(0.5, 1.5), st.floats(0.5, 1.5), st.sampled_from([1.25, 2.5, 5.0])),
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    mirror=st.booleans(),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**grids)
def test_every_task_keeps_its_invariants_on_far_grids(engines, spacing, angles, mirror):
    base, controlled = engines
    ct, anatomy, lesion = phantom(spacing, rotation(angles, mirror))
    region = "abdomen"
    outside = pp.outside_window(ct.array, region)
    assert outside.any() and (~outside).any()

    denoised = denoise(ct, base, region, anatomy, sigma_n=0.05, steps=1).volume
    assert denoised.geometry.same_grid(ct.geometry) and denoised.array.dtype == np.float32
    # Air and bone (every voxel of an in-plane 3 x 3 neighbourhood far outside the window) are kept.
    window = pp.REGIONS[region]
    far = (ct.array < window.low - 200) | (ct.array > window.high + 200)
    structure = ndimage.minimum_filter(far, size=(1, 3, 3), mode="nearest")
    assert structure.any()
    np.testing.assert_array_equal(denoised.array[structure], ct.array[structure])

    found = detect_anomalies(ct, anatomy, ["liver"], base, region, t=500)
    for volume in (found.anomaly_map, found.anomaly_mask):
        assert volume.geometry.same_grid(ct.geometry)
    liver = anatomy.array == label_of("liver")
    assert not found.anomaly_mask.array[~liver].any() and not found.anomaly_map.array[~liver].any()

    synthetic = synthesize(anatomy, region, base, steps=1)
    assert synthetic.geometry.same_grid(anatomy.geometry) and synthetic.array.dtype == np.float32
    assert synthetic.array.min() >= -1024 and synthetic.array.max() <= 3071

    painted = inpaint_lesion(ct, lesion, controlled, region, steps=2, jump_length=0)
    keep = lesion.array == 0
    assert painted.geometry.same_grid(ct.geometry) and painted.array.dtype == ct.array.dtype
    np.testing.assert_array_equal(painted.array[keep], ct.array[keep])

    for scope in ("volume", "lesion"):
        generated = generate_lesion(anatomy, lesion, region, controlled, steps=1, scope=scope, lesion_steps=2)
        assert generated.geometry.same_grid(anatomy.geometry)
    plain = synthesize(anatomy, region, controlled, steps=1, control=np.zeros(keep.shape, np.float32))
    np.testing.assert_array_equal(generated.array[keep], plain.array[keep])

    # Super-resolution works in whole multiples of the model's spacing: thick slices of 2-3 of them.
    model_mm = controlled.config.spacing_mm
    thick_mm = model_mm * (2 + int(spacing[2] >= 2.5))
    thick, _, _ = phantom((spacing[0], spacing[1], thick_mm), rotation(angles, mirror))
    resolved = super_resolve(thick, controlled, spacing=model_mm, steps=1, region=region)
    assert resolved.spacing[:2] == pytest.approx(thick.spacing[:2]) and resolved.spacing[2] == pytest.approx(model_mm)
    np.testing.assert_allclose(resolved.direction, thick.direction, atol=1e-9)
    assert resolved.array.shape[1:] == thick.array.shape[1:] and resolved.array.dtype == np.float32
