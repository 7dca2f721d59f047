"""The working grid: the user's grid <-> the model's, on grids unlike the model's."""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.volume import Geometry
from MedDiffFMLib.working_grid import WorkingGrid


def oblique_source() -> Geometry:
    direction = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix()
    return Geometry((12, 40, 36), (0.7, 0.7, 5.0), (-12.0, 30.0, 5.0), tuple(direction.ravel()))


def test_images_labels_and_results_cross_between_an_oblique_5mm_grid_and_the_model_s():
    source = oblique_source()
    grid = WorkingGrid.over(source, 1.0, "abdomen")
    assert grid.working.spacing == (1.0, 1.0, 1.0) and grid.working.direction == source.direction
    z, y, x = np.indices(source.shape)
    hu = (-50.0 + 4.0 * x + 2.0 * y + 6.0 * z).astype(np.float32)  # linear: interpolation is exact inside
    image = grid.image(hu)
    assert image.shape == grid.working.shape and image.dtype == np.float32 and np.abs(image).max() <= 1.0
    back = grid.hu(image)
    inner = (slice(1, -1), slice(2, -2), slice(2, -2))
    inside = ~pp.outside_window(hu, "abdomen")[inner]
    np.testing.assert_allclose(back[inner][inside], hu[inner][inside], atol=1.0)

    organ = np.zeros(source.shape, np.uint8)
    organ[3:9, 10:30, 8:28] = 5
    labels = grid.labels(organ)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) == {0, 5}
    volume_mm3 = (labels == 5).sum() * 1.0
    assert abs(volume_mm3 / ((organ == 5).sum() * 0.7 * 0.7 * 5.0) - 1.0) < 0.15
    assert grid.mask(organ).sum() == (labels == 5).sum()


def test_restore_carries_what_the_model_cannot_represent_and_says_so():
    from MedDiffFMLib.volume import Volume

    source = oblique_source()
    grid = WorkingGrid.over(source, 1.0, "abdomen")
    hu = np.full(source.shape, 40.0, np.float32)
    hu[:, :, :5] = -1000.0
    hu[:, 20, 20] = 900.0
    ct = Volume.on_geometry(hu, source)
    restored = grid.restore(np.zeros(grid.working.shape, np.float32), ct, hu, MedDiffFM_task="test")
    outside = pp.outside_window(hu, "abdomen")
    np.testing.assert_array_equal(restored.array[outside], hu[outside])
    np.testing.assert_allclose(restored.array[~outside], pp.model_to_hu(np.zeros(1), "abdomen")[0])
    assert restored.metadata["MedDiffFM_carried_over_voxels"] == str(int(outside.sum()))
    assert restored.metadata["MedDiffFM_task"] == "test" and restored.geometry.same_grid(source)
    cropped = grid.cropped((slice(0, 4), slice(None), slice(None)))
    assert cropped.working.shape[0] == 4 and cropped.source == source
