"""Volumes keep their geometry through every file format and every resampling path."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA
from hypothesis import given, settings
from hypothesis import strategies as st

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.errors import InputError, OutputExistsError, ReadError
from MedDiffFMLib.volume import Volume, default_file_mode, read_volume, write_volume


def oblique_volume() -> Volume:
    """Anisotropic, oblique, left-handed-free rotation about an arbitrary axis."""
    angle = np.deg2rad(20.0)
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    array = np.random.default_rng(0).integers(-1000, 1500, size=(5, 7, 9)).astype(np.int16)
    return Volume(array, spacing=(0.7, 0.9, 2.5), origin=(-12.5, 30.25, 100.0), direction=rotation.ravel())


@pytest.mark.parametrize("extension", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_geometry_round_trip_every_format(tmp_path, extension):
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / f"ct{extension}")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.geometry.same_grid(volume.geometry, tolerance=1e-4)


def test_dicom_series_matches_its_label_map():
    ct = read_volume(DATA / "example_ct_dicom")
    labels = read_volume(DATA / "example_seg_dicom.nii.gz")
    assert ct.array.shape == (20, 512, 512)
    # TotalSegmentator wrote the labels with the y axis flipped: same space, mirrored rows.
    on_ct = pp.labels_on_grid(labels, ct.geometry).array
    np.testing.assert_array_equal(on_ct, labels.array[:, ::-1, :])
    assert ct.array[on_ct == 5].mean() > 0  # liver is soft tissue, not air


def test_write_refuses_to_overwrite_and_leaves_no_temporary_files(tmp_path):
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / "ct.nrrd")
    with pytest.raises(OutputExistsError):
        write_volume(volume, path)
    write_volume(volume.with_array(volume.array * 0), path, overwrite=True)
    assert read_volume(path).array.max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]
    assert path.stat().st_mode & 0o777 == default_file_mode()


def test_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(ReadError, match="does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ReadError, match="Could not read"):
        read_volume(tmp_path / "junk.nii.gz")
    with pytest.raises(InputError, match="extensions"):
        write_volume(oblique_volume(), tmp_path / "out.png")


def test_2d_image_is_refused(tmp_path):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "slice.nrrd"))
    with pytest.raises(InputError, match="3D"):
        read_volume(tmp_path / "slice.nrrd")


def test_resampling_to_model_spacing_and_back_keeps_grid(sample_ct):
    working = pp.isotropic_geometry(sample_ct.geometry, 1.0)
    assert working.spacing == (1.0, 1.0, 1.0)
    assert working.shape == tuple(3 * (n - 1) + 1 for n in sample_ct.array.shape)
    there = pp.resample(sample_ct, working)
    back = pp.resample(there, sample_ct.geometry)
    assert back.geometry.same_grid(sample_ct.geometry)
    # 3 mm voxels land exactly on 1 mm voxels, so linear interpolation returns them unchanged.
    np.testing.assert_allclose(back.array, sample_ct.array, atol=1e-3)


def test_label_maps_use_nearest_neighbour(sample_seg):
    working = pp.isotropic_geometry(sample_seg.geometry, 1.5)
    labels = pp.resample(sample_seg, working, labels=True).array
    assert set(np.unique(labels)) <= set(np.unique(sample_seg.array))


def test_mask_on_a_distant_grid_is_refused(sample_seg, sample_ct):
    far = Volume(sample_seg.array, sample_seg.spacing, (5000.0, 5000.0, 5000.0), sample_seg.direction)
    with pytest.raises(InputError, match="does not overlap"):
        pp.labels_on_grid(far, sample_ct.geometry)


def _write_dicom_series(folder, volume: Volume, series_uid: str) -> None:
    import SimpleITK as sitk

    image = volume.to_sitk()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.4f}" for p in position),
            "0020|0037": "\\".join(f"{d:.6f}" for d in (*image.GetDirection()[0::3], *image.GetDirection()[1::3])),
            "0008|0060": "CT",
            "0028|1052": "0",
            "0028|1053": "1",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-4:]}_{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_folder_with_several_series_asks_for_a_uid(tmp_path):
    volume = Volume(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 30, spacing=(0.5, 0.5, 2.0))
    _write_dicom_series(tmp_path, volume, "1.2.826.0.1.3680043.2.1125.1.1111")
    _write_dicom_series(tmp_path, volume.with_array(volume.array + 100), "1.2.826.0.1.3680043.2.1125.1.2222")
    with pytest.raises(ReadError, match="holds 2 DICOM series.*1111.*2222|holds 2 DICOM series.*2222.*1111"):
        read_volume(tmp_path)
    second = read_volume(tmp_path, series_uid="1.2.826.0.1.3680043.2.1125.1.2222")
    np.testing.assert_array_equal(second.array, volume.array + 100)
    assert second.geometry.same_grid(volume.geometry)
    with pytest.raises(ReadError, match="is not in"):
        read_volume(tmp_path, series_uid="9.9.9")


@settings(max_examples=25, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-500.0, 500.0)] * 3),
    flip=st.booleans(),
)
def test_any_geometry_survives_files_and_resampling(tmp_path_factory, angles, spacing, origin, flip):
    from scipy.spatial.transform import Rotation

    direction = Rotation.from_euler("xyz", angles).as_matrix()
    if flip:
        direction[:, 2] *= -1  # left-handed
    array = np.random.default_rng(0).integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    volume = Volume(array, spacing, origin, direction.ravel())
    path = write_volume(volume, tmp_path_factory.mktemp("geometry") / "v.nrrd")
    back = read_volume(path)
    np.testing.assert_array_equal(back.array, array)
    assert back.geometry.same_grid(volume.geometry, tolerance=1e-3)
    again = pp.resample(back, volume.geometry)
    assert again.geometry.same_grid(volume.geometry)
    np.testing.assert_allclose(again.array, array, atol=1e-3)


def _truncate(path, keep: float | int) -> None:
    """Keep a share (float) of the file, or all but ``-keep`` bytes (negative int)."""
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


@pytest.mark.parametrize(
    ("extension", "compressed"),
    [(".nii.gz", True), (".nii", False), (".nrrd", True), (".nrrd", False), (".mha", True), (".mha", False)],
)
def test_truncated_files_are_refused(tmp_path, extension, compressed):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    volume = Volume(rng.integers(-1000, 1500, size=(20, 40, 40)).astype(np.int16), spacing=(0.7, 0.7, 5.0))
    path = tmp_path / f"ct{extension}"
    sitk.WriteImage(volume.to_sitk(), str(path), useCompression=compressed)
    np.testing.assert_array_equal(read_volume(path).array, volume.array)
    data = path.read_bytes()
    for keep in (0.6, -100):
        path.write_bytes(data)
        _truncate(path, keep)
        with pytest.raises(ReadError, match="incomplete or corrupt"):
            read_volume(path)


def test_corrupt_compressed_data_is_refused(tmp_path):
    volume = Volume(np.random.default_rng(1).integers(-1000, 1500, size=(8, 32, 32)).astype(np.int16))
    path = write_volume(volume, tmp_path / "ct.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ReadError, match="incomplete or corrupt"):
        read_volume(path)


def test_detached_data_files_are_checked(tmp_path):
    import SimpleITK as sitk

    volume = Volume(np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10))
    sitk.WriteImage(volume.to_sitk(), str(tmp_path / "ct.mhd"), useCompression=False)
    np.testing.assert_array_equal(read_volume(tmp_path / "ct.mhd").array, volume.array)
    _truncate(tmp_path / "ct.raw", 0.5)
    with pytest.raises(ReadError, match="incomplete or corrupt"):
        read_volume(tmp_path / "ct.mhd")
    (tmp_path / "ct.raw").unlink()
    with pytest.raises(ReadError, match="does not exist"):
        read_volume(tmp_path / "ct.mhd")


def test_a_truncated_dicom_slice_is_refused(tmp_path):
    volume = Volume(np.arange(3 * 16 * 16, dtype=np.int16).reshape(3, 16, 16) - 300, spacing=(0.5, 0.5, 2.0))
    _write_dicom_series(tmp_path, volume, "1.2.826.0.1.3680043.2.1125.1.3333")
    np.testing.assert_array_equal(read_volume(tmp_path).array, volume.array)
    slices = sorted(tmp_path.glob("*.dcm"))
    _truncate(slices[1], 0.9)
    with pytest.raises(ReadError, match=f"{slices[1].name}.*incomplete or corrupt"):
        read_volume(tmp_path)
    with pytest.raises(ReadError, match="incomplete or corrupt"):
        read_volume(slices[1])


def test_a_dicom_series_with_missing_slices_is_refused(tmp_path):
    volume = Volume(np.zeros((6, 8, 8), dtype=np.int16), spacing=(0.5, 0.5, 2.0))
    _write_dicom_series(tmp_path, volume, "1.2.826.0.1.3680043.2.1125.1.4444")
    assert read_volume(tmp_path).array.shape == (6, 8, 8)
    sorted(tmp_path.glob("*.dcm"))[3].unlink()
    with pytest.raises(ReadError, match="gap of 4.00 mm after slice 3 of 5"):
        read_volume(tmp_path)


def test_a_subnormal_direction_entry_does_not_break_resampling():
    """ITK's direction SVD fails on subnormal numbers; such entries are zeroed before ITK sees them."""
    tiny, angle = 2.2250738585072014e-308, 1.0
    about_z = np.array([[1.0, -tiny, 0.0], [tiny, 1.0, 0.0], [0.0, 0.0, 1.0]])
    about_x = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(angle), -np.sin(angle)], [0.0, np.sin(angle), np.cos(angle)]])
    direction = about_z @ about_x
    array = np.zeros((10, 12, 14), dtype=np.uint8)
    array[3:7, 4:8, 5:9] = 1
    volume = Volume(array, (1.0, 1.0, 1.25), (5.0, -3.0, 2.0), direction.ravel())
    coarse = pp.resample(volume, pp.isotropic_geometry(volume.geometry, 2.0), labels=True)
    assert coarse.array.sum() > 0
    back = pp.resample(coarse, volume.geometry, labels=True)
    assert (back.array & array).sum() >= 0.5 * array.sum()
