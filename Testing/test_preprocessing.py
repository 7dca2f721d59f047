"""HU windows: exact inside the window, lossless outside (Docs/METHOD.md 1.3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from MedDiffFMLib import anatomy
from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.errors import InputError, MaskError
from MedDiffFMLib.volume import Geometry, Volume

hu_arrays = hnp.arrays(np.float32, (4, 5, 6), elements=st.floats(-3000, 4000, width=32))


@pytest.mark.parametrize("region", list(pp.REGIONS))
def test_window_bounds_map_to_minus_one_and_one(region):
    window = pp.REGIONS[region]
    assert pp.hu_to_model(np.array([window.low, window.high]), region).tolist() == [-1.0, 1.0]


@settings(max_examples=50, deadline=None)
@given(hu=hu_arrays, region=st.sampled_from(list(pp.REGIONS)))
def test_round_trip_inside_window_and_restoration_outside(hu, region):
    back = pp.model_to_hu(pp.hu_to_model(hu, region), region)
    inside = ~pp.outside_window(hu, region)
    np.testing.assert_allclose(back[inside], hu[inside], atol=1e-3)
    restored, carried = pp.restore_outside_window(back, hu, region)
    assert carried == int((~inside).sum())
    np.testing.assert_array_equal(restored[~inside], hu[~inside])


def test_structures_outside_the_window_are_told_from_noise_spikes():
    """Abdomen window [-120, 240] HU: air, a bone disk and a one-pixel 1000 HU line count; spikes
    and fat that noise pushed past -120 HU do not."""
    hu = np.full((2, 40, 40), 40.0)
    hu[:, :, :8] = -1000.0  # air
    hu[:, 10:20, 20:30] = 700.0  # bone
    hu[:, 30, 10:30] = 1000.0  # one-pixel cortex (its two end pixels are too thin to count)
    hu[:, 25:29, 30:40] = -100.0  # fat
    fat = np.zeros(hu.shape, bool)
    fat[:, 25:29, 30:40] = True
    hu[fat] += np.where(np.arange(fat.sum()) % 3 == 0, -60.0, 0.0)  # a third of the fat below the window
    hu[0, 5, 15], hu[1, 35, 35] = 500.0, -400.0  # single spikes
    kept = pp.outside_window_structures(hu, "abdomen", margin_hu=30.0)
    assert kept[:, :, :8].all() and kept[:, 10:20, 20:30].all() and kept[:, 30, 11:29].all()
    assert not kept[fat].any() and not kept[0, 5, 15] and not kept[1, 35, 35]
    assert not (kept & ~pp.outside_window(hu, "abdomen")).any()
    restored, carried = pp.restore_outside_window(np.zeros_like(hu), hu, "abdomen", kept)
    assert carried == int(kept.sum())
    np.testing.assert_array_equal(restored[kept], hu[kept])
    assert not restored[~kept].any()


def test_unknown_region_lists_valid_ones():
    with pytest.raises(InputError, match="head_neck, chest, abdomen"):
        pp.hu_to_model(np.zeros(3), "pelvis")


def test_anatomy_scheme_has_118_classes_and_body(sample_ct, sample_seg):
    assert len(anatomy.CLASS_NAMES) == 119 and anatomy.CLASS_NAMES[anatomy.BODY_LABEL] == "body"
    assert anatomy.label_of("liver") == 5
    labels = anatomy.from_totalsegmentator(sample_seg.array, sample_ct.array)
    assert (labels == anatomy.BODY_LABEL).sum() > 0
    np.testing.assert_array_equal(labels[sample_seg.array > 0], sample_seg.array[sample_seg.array > 0])
    assert not (labels[sample_ct.array < -900] == anatomy.BODY_LABEL).all()


def test_named_label_conversion_and_unknown_names():
    labels = np.array([[[0, 1, 2]]])
    converted = anatomy.from_named_labels(labels, {1: "liver", 2: "spleen"})
    assert converted.tolist() == [[[0, 5, 1]]]
    with pytest.raises(InputError, match="Did you mean 'liver'"):
        anatomy.from_named_labels(labels, {1: "livr"})


def test_organ_mask_errors():
    labels = np.zeros((2, 2, 2), dtype=np.uint8)
    with pytest.raises(MaskError, match="contains no voxel of liver"):
        anatomy.organ_mask(labels, ["liver"])
    with pytest.raises(InputError, match="Unknown structure 'lever'. Did you mean 'liver'"):
        anatomy.organ_mask(labels, ["lever"])
    with pytest.raises(InputError, match="Names are the TotalSegmentator v2 classes: spleen, kidney_right"):
        anatomy.label_of("xyz")
    assert anatomy.label_of(" Portal vein-and splenic_VEIN ") == anatomy.label_of("portal_vein_and_splenic_vein")
    assert anatomy.label_of("Right kidney") == anatomy.label_of("kidney_right")


def test_intensities_beyond_the_last_voxel_centre_take_the_nearest_voxel():
    """The working grid reaches up to one voxel past the input's last voxel centre: no fake air there."""
    volume = Volume(np.full((3, 4, 4), 40.0, np.float32), spacing=(1.0, 1.0, 3.0))
    volume.array[0] = -1000.0
    beyond = pp.isotropic_geometry(Geometry((4, 4, 4), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0), volume.direction), 1.0)
    resampled = pp.resample(volume, beyond).array
    assert resampled.shape[0] > 7 and resampled[-1].min() == 40.0
    assert pp.resample(volume, beyond, fill=-2000.0).array[-1].min() == -2000.0
