"""Bad input, cancellation at any point, and determinism (issue 8 matrix, the parts not covered elsewhere)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import random_tiny_model, randomise_zero_parameters

from MedDiffFMLib import cli
from MedDiffFMLib.errors import CancelledError, InputError, MaskError, MedDiffFMError
from MedDiffFMLib.model.network import ControlledNet
from MedDiffFMLib.progress import CancelToken
from MedDiffFMLib.tasks import Engine, denoise, detect_anomalies, inpaint_lesion, synthesize
from MedDiffFMLib.volume import Volume, read_volume, write_volume


def test_vector_and_4d_images_are_refused(tmp_path):
    vector = sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 3)
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    with pytest.raises(InputError, match="components per voxel"):
        read_volume(tmp_path / "vector.nrrd")
    sitk.WriteImage(sitk.Image([3, 4, 5, 2], sitk.sitkFloat32), str(tmp_path / "four.nrrd"))
    with pytest.raises(InputError, match="4D"):
        read_volume(tmp_path / "four.nrrd")
    with pytest.raises(InputError, match="empty"):
        denoise(Volume(np.zeros((0, 4, 4), np.float32)), Engine(random_tiny_model(), device="cpu"))


def test_every_library_error_is_a_meddifffm_error():
    import MedDiffFMLib.errors as errors

    kinds = [getattr(errors, name) for name in dir(errors) if name.endswith("Error") and name != "MedDiffFMError"]
    assert kinds and all(issubclass(kind, MedDiffFMError) for kind in kinds)


def test_a_volume_smaller_than_a_window_works(tiny_engine):
    rng = np.random.default_rng(0)
    tiny = Volume(
        rng.normal(40, 10, (3, 7, 5)).astype(np.float32) - 1000 * (rng.random((3, 7, 5)) < 0.2), spacing=(3.0, 3.0, 3.0)
    )
    result = denoise(tiny, tiny_engine, region="abdomen", sigma_n=0.05, steps=2)
    assert result.volume.array.shape == (3, 7, 5) and np.isfinite(result.volume.array).all()


def test_lesion_mask_outside_the_body_still_changes_only_the_mask(small_ct):
    engine = Engine(randomise_zero_parameters(ControlledNet(random_tiny_model())), device="cpu", batch_size=16)
    ct = small_ct.with_array(small_ct.array.astype(np.float32))
    ct.array[:, :6, :6] = -1000.0  # a corner of air
    lesion = np.zeros(ct.array.shape, np.uint8)
    lesion[5:8, 1:4, 1:4] = 1
    result = inpaint_lesion(ct, ct.with_array(lesion), engine, region="abdomen", steps=2, jump_length=0, margin_mm=0.0)
    np.testing.assert_array_equal(result.array[lesion == 0], ct.array[lesion == 0])


@pytest.mark.parametrize("stop_after", [0, 1, 2])
def test_cancelling_at_any_step_raises_and_the_cli_writes_nothing(
    tmp_path, small_ct, small_seg, stop_after, monkeypatch
):
    engine = Engine(random_tiny_model(), device="cpu", batch_size=16)
    for run in (
        lambda progress, cancel: denoise(small_ct, engine, steps=4, progress=progress, cancel=cancel),
        lambda progress, cancel: synthesize(small_seg, "abdomen", engine, steps=4, progress=progress, cancel=cancel),
        lambda progress, cancel: detect_anomalies(
            small_ct, small_seg, ["liver"], engine, draws=3, progress=progress, cancel=cancel
        ),
    ):
        cancel = CancelToken()
        if stop_after == 0:
            cancel.cancel()

        def progress(done, total, message, cancel=cancel):
            if done == stop_after:
                cancel.cancel()

        with pytest.raises(CancelledError):
            run(progress, cancel)

    source = write_volume(small_ct, tmp_path / "ct.nrrd")
    task_module = importlib.import_module("MedDiffFMLib.tasks.denoise")
    real_denoise = task_module.denoise

    def cancelled_denoise(*args, **kwargs):
        kwargs["cancel"].cancel()
        return real_denoise(*args, **kwargs)

    monkeypatch.setattr(task_module, "denoise", cancelled_denoise)
    assert cli.main(["denoise", str(source), str(tmp_path / "out.nrrd"), "--untrained", "tiny", "--quiet"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_same_seed_same_output_for_every_zero_shot_task(small_ct, small_seg):
    engine = Engine(random_tiny_model(), device="cpu", batch_size=16)
    for run in (
        lambda seed: denoise(small_ct, engine, sigma_n=0.1, steps=3, zeta=0.3, seed=seed).volume.array,
        lambda seed: detect_anomalies(small_ct, small_seg, ["liver"], engine, seed=seed).anomaly_map.array,
        lambda seed: synthesize(small_seg, "abdomen", engine, steps=3, seed=seed).array,
    ):
        np.testing.assert_array_equal(run(5), run(5))
        assert not np.array_equal(run(5), run(6))


def test_mask_errors_name_the_problem(small_ct):
    engine = Engine(randomise_zero_parameters(ControlledNet(random_tiny_model())), device="cpu")
    with pytest.raises(MaskError, match="empty"):
        inpaint_lesion(small_ct, small_ct.with_array(np.zeros(small_ct.array.shape, np.uint8)), engine)


def test_the_input_file_is_never_modified(tmp_path, small_ct):
    import hashlib

    source = write_volume(small_ct, tmp_path / "ct.nii.gz")
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    assert (
        cli.main(
            ["denoise", str(source), str(tmp_path / "out.nii.gz"), "--untrained", "tiny", "--steps", "1", "--quiet"]
        )
        == 0
    )
    assert cli.main(["denoise", str(source), str(source), "--untrained", "tiny", "--steps", "1", "--quiet"]) == 2
    assert hashlib.sha256(source.read_bytes()).hexdigest() == before
