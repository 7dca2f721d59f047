"""Fine-tuned tasks: z-slab operator, super-resolution, lesion generation, RePaint inpainting, and
ControlNet fine-tuning."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA, OracleNet, crop, random_tiny_model, randomise_zero_parameters
from scipy import ndimage

from MedDiffFMLib import cli
from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import label_of
from MedDiffFMLib.diffusion.operators import ZSlabAverage
from MedDiffFMLib.diffusion.repaint import repaint_schedule
from MedDiffFMLib.errors import InputError, MaskError, WeightsError
from MedDiffFMLib.model import weights as w
from MedDiffFMLib.model.network import ControlledNet
from MedDiffFMLib.tasks import Engine, generate_lesion, inpaint_lesion, super_resolve, synthesize
from MedDiffFMLib.tasks.lesion import blend_weights, bounding_box
from MedDiffFMLib.tasks.super_resolution import thin_geometry
from MedDiffFMLib.volume import Volume, read_volume, write_volume
from Training import make_pairs
from Training.config import load_config
from Training.pretrain import Distributed, Trainer

REPO = Path(__file__).resolve().parents[1]


def test_slab_operator_adjoint_and_pseudo_inverse():
    generator = torch.Generator().manual_seed(0)
    operator = ZSlabAverage(5)
    x = torch.randn(20, 3, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(4, 3, 4, generator=generator, dtype=torch.float64)
    assert torch.dot(operator(x).ravel(), y.ravel()).item() == pytest.approx(
        torch.dot(x.ravel(), operator.adjoint(y).ravel()).item(), rel=1e-12
    )
    torch.testing.assert_close(operator(operator.pseudo_inverse(y)), y)
    consistent = operator.data_step(x, y, rho=0.0)
    torch.testing.assert_close(operator(consistent), y)
    with pytest.raises(InputError):
        operator(x[:7])


def test_slab_interpolation_is_consistent_smooth_and_exact_on_smooth_data():
    """The cubic start of super-resolution: ``H`` of it is the data; a smooth profile along z
    (a low-frequency cosine, sampled as slab averages) comes back ten times closer than the
    repeated slices."""
    operator = ZSlabAverage(4)
    z = (torch.arange(48, dtype=torch.float64) + 0.5) / 48
    thin = torch.cos(2.5 * z)[:, None, None].expand(48, 2, 3).contiguous()
    thick = operator(thin)
    interpolated = operator.interpolate(thick)
    torch.testing.assert_close(operator(interpolated), thick)
    inner = slice(4, -4)
    error = (interpolated - thin)[inner].abs().max().item()
    assert error < 0.1 * (operator.pseudo_inverse(thick) - thin)[inner].abs().max().item()


def test_thin_grid_slabs_are_centred_on_thick_slices(sample_ct):
    thick = sample_ct.geometry
    thin = thin_geometry(thick, 3)
    assert thin.shape == (thick.shape[0] * 3, *thick.shape[1:]) and thin.spacing[2] == pytest.approx(1.0)
    for k in (0, 7):
        centre = (thick.index_to_physical() @ [0, 0, k, 1])[:3]
        slab = [(thin.index_to_physical() @ [0, 0, 3 * k + j, 1])[:3] for j in range(3)]
        np.testing.assert_allclose(np.mean(slab, axis=0), centre, atol=1e-9)


def _thick_from(thin: Volume, factor: int) -> Volume:
    thick = ZSlabAverage(factor)(torch.from_numpy(thin.array.astype(np.float64))).numpy()
    axis = np.asarray(thin.direction).reshape(3, 3)[:, 2]
    spacing_z = thin.spacing[2] * factor
    origin = np.asarray(thin.origin) + axis * (spacing_z - thin.spacing[2]) / 2
    return Volume(thick.astype(np.float32), (*thin.spacing[:2], spacing_z), tuple(origin), thin.direction)


@pytest.mark.parametrize("draws", [1, 2])
def test_super_resolution_with_an_oracle_recovers_thin_slices_and_is_data_consistent(small_ct, draws):
    region, factor = "abdomen", 3
    thin = crop(small_ct, slice(0, 15), slice(None), slice(None))
    thick = _thick_from(thin, factor)
    clean = torch.from_numpy(pp.hu_to_model(thin.array, region))
    engine = Engine(OracleNet(clean), device="cpu", batch_size=16)
    reports = []
    result = super_resolve(
        thick, engine, spacing=3.0, steps=10, region=region, draws=draws, progress=lambda *r: reports.append(r)
    )
    assert result.geometry.same_grid(thin.geometry) and result.metadata["MedDiffFM_draws"] == str(draws)
    assert [done for done, _, _ in reports] == list(range(1, 10 * draws + 1))
    assert {total for _, total, _ in reports} == {10 * draws}
    slab_in_window = ZSlabAverage(factor)(torch.from_numpy((~pp.outside_window(thin.array, region)).astype(np.float64)))
    in_window = slab_in_window.numpy() == 1
    inside = np.repeat(in_window, factor, axis=0)
    assert np.abs(result.array - thin.array)[inside].max() < 1.0
    averaged = ZSlabAverage(factor)(torch.from_numpy(result.array.astype(np.float64))).numpy()
    np.testing.assert_allclose(averaged[in_window], thick.array[in_window], atol=0.05)
    # Slabs outside the window (air, bone) keep the thick input's consistent cubic interpolation along z.
    outside = np.repeat(pp.outside_window(thick.array, region), factor, axis=0)
    assert outside.any() and result.metadata["MedDiffFM_carried_over_voxels"] == str(int(outside.sum()))
    cubic = ZSlabAverage(factor).interpolate(torch.from_numpy(thick.array.astype(np.float64))).numpy()
    np.testing.assert_allclose(result.array[outside], cubic[outside], atol=1e-3)


def test_super_resolution_rejects_incompatible_spacing(small_ct, tiny_engine):
    with pytest.raises(InputError, match="whole multiple"):
        super_resolve(small_ct, tiny_engine, spacing=2.0)
    with pytest.raises(InputError, match="draws"):
        super_resolve(small_ct, tiny_engine, spacing=2.0, draws=0)


def test_repaint_schedule():
    assert repaint_schedule([3, 2, 1, 0], 0, 0) == [(3, 2), (2, 1), (1, 0), (0, -1)]
    transitions = repaint_schedule(list(range(19, -1, -1)), 5, 2)
    assert transitions[0] == (19, 18) and transitions[-1] == (0, -1)
    reverse = [t for t in transitions if t[1] < t[0]]
    jumps = [t for t in transitions if t[1] > t[0]]
    assert len(reverse) - len(jumps) == 20 and len(jumps) == 3 * 2 * 5


@pytest.fixture
def lesion_engine() -> Engine:
    model = randomise_zero_parameters(ControlledNet(random_tiny_model()))
    return Engine(model, device="cpu", batch_size=16)


def _lesion(ct: Volume, box: tuple[slice, ...]) -> Volume:
    mask = np.zeros(ct.array.shape, dtype=np.uint8)
    mask[box] = 1
    return ct.with_array(mask)


def test_inpainting_changes_only_the_mask_and_margin(small_ct, lesion_engine):
    ct = small_ct.with_array(small_ct.array.astype(np.int16))
    lesion = _lesion(ct, (slice(6, 9), slice(15, 20), slice(20, 26)))
    result = inpaint_lesion(
        ct, lesion, lesion_engine, region="abdomen", steps=4, jump_length=2, jump_count=1, margin_mm=7.0
    )
    assert result.array.dtype == np.int16 and result.geometry.same_grid(ct.geometry)
    changed = blend_weights(lesion.array > 0, ct.spacing, 7.0) > 0
    np.testing.assert_array_equal(result.array[~changed], ct.array[~changed])
    assert (result.array[lesion.array > 0] != ct.array[lesion.array > 0]).any()
    assert result.metadata["MedDiffFM_changed_voxels"] == str(int(changed.sum()))
    assert result.metadata["MedDiffFM_changed_outside_mask"] == str(int((changed & (lesion.array == 0)).sum()))
    assert int(result.metadata["MedDiffFM_changed_outside_mask"]) > 0


@pytest.mark.parametrize(
    "spacing, direction",
    [
        ((0.6, 0.6, 5.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)),
        ((0.8, 0.7, 2.5), (0.866, -0.5, 0.0, 0.5, 0.866, 0.0, 0.0, 0.0, 1.0)),  # oblique, 30 degrees in-plane
    ],
)
def test_inpainting_by_default_keeps_every_voxel_outside_the_mask_bit_identical(lesion_engine, spacing, direction):
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 30, (8, 60, 60)).astype(np.int16)
    ct = Volume(hu, spacing, (10.0, -20.0, 30.0), direction)
    lesion = _lesion(ct, (slice(3, 6), slice(20, 40), slice(20, 40)))
    result = inpaint_lesion(ct, lesion, lesion_engine, region="abdomen", steps=2, jump_length=0)
    outside = lesion.array == 0
    np.testing.assert_array_equal(result.array[outside], ct.array[outside])
    assert result.array.dtype == np.int16 and result.geometry.same_grid(ct.geometry)
    assert (result.array[~outside] != ct.array[~outside]).any()
    assert result.metadata["MedDiffFM_changed_outside_mask"] == "0"


def test_inpainting_with_an_oracle_of_the_image_returns_the_image(small_ct):
    region = "abdomen"
    clean = torch.from_numpy(pp.hu_to_model(small_ct.array, region))
    engine = Engine(OracleNet(clean), device="cpu", batch_size=16)
    lesion = _lesion(small_ct, (slice(6, 9), slice(15, 20), slice(20, 26)))
    result = inpaint_lesion(small_ct, lesion, engine, region=region, steps=6, jump_length=0, margin_mm=0.0)
    inside = (lesion.array > 0) & ~pp.outside_window(small_ct.array, region)
    assert np.abs(result.array[inside] - small_ct.array[inside]).max() < 1.0


def test_inpainting_mask_errors_and_resampling(small_ct, lesion_engine):
    with pytest.raises(MaskError, match="empty"):
        inpaint_lesion(small_ct, small_ct.with_array(np.zeros(small_ct.array.shape, np.uint8)), lesion_engine)
    far = Volume(np.ones((4, 4, 4), np.uint8), spacing=(1, 1, 1), origin=(9000.0, 9000.0, 9000.0))
    with pytest.raises(MaskError, match="does not overlap"):
        inpaint_lesion(small_ct, far, lesion_engine)
    fine = pp.resample(
        _lesion(small_ct, (slice(6, 9), slice(15, 20), slice(20, 26))),
        pp.isotropic_geometry(small_ct.geometry, 1.5),
        labels=True,
    )
    result = inpaint_lesion(small_ct, fine, lesion_engine, region="abdomen", steps=2, jump_length=0, margin_mm=0.0)
    assert result.geometry.same_grid(small_ct.geometry)


def test_crop_and_paste_keeps_geometry(small_ct):
    mask = np.zeros(small_ct.array.shape, dtype=bool)
    mask[5, 10, 12] = True
    box = bounding_box(mask, (1, 2, 3))
    assert box == (slice(4, 7), slice(8, 13), slice(9, 16))
    part = small_ct.geometry.subgrid(box)
    assert part.shape == (3, 5, 7)
    position = (small_ct.geometry.index_to_physical() @ [12, 10, 5, 1])[:3]
    np.testing.assert_allclose((part.index_to_physical() @ [3, 2, 1, 1])[:3], position)
    pasted = pp.resample(Volume.on_geometry(small_ct.array[box], part), small_ct.geometry, fill=0.0).array
    np.testing.assert_array_equal(pasted[box], small_ct.array[box])


@pytest.mark.parametrize("scope", ["volume", "lesion"])
def test_lesion_generation_follows_the_mask(small_seg, lesion_engine, scope):
    lesion = _lesion(small_seg, (slice(4, 10), slice(10, 25), slice(15, 30)))
    first = generate_lesion(small_seg, lesion, "abdomen", lesion_engine, steps=3, lesion_steps=2, seed=1, scope=scope)
    again = generate_lesion(small_seg, lesion, "abdomen", lesion_engine, steps=3, lesion_steps=2, seed=1, scope=scope)
    other = generate_lesion(
        small_seg,
        _lesion(small_seg, (slice(0, 2), slice(0, 5), slice(0, 5))),
        "abdomen",
        lesion_engine,
        steps=3,
        lesion_steps=2,
        seed=1,
        scope=scope,
    )
    assert first.geometry.same_grid(small_seg.geometry)
    np.testing.assert_array_equal(first.array, again.array)
    assert not np.array_equal(first.array, other.array)
    with pytest.raises(MaskError):
        generate_lesion(small_seg, small_seg.with_array(np.zeros_like(small_seg.array)), "abdomen", lesion_engine)


def test_lesion_generation_changes_only_the_lesion_of_the_lesion_free_synthesis(small_seg, lesion_engine):
    """Scope "lesion": every voxel outside the mask and its band is the synthesis without a lesion
    (an empty mask) with the same seed, bit for bit; the lesion itself is RePainted. Scope "volume"
    (the default: the ControlNet conditions the whole synthesis on the mask) changes voxels outside it,
    also more than 10 mm away on this tiny model's 3 mm grid."""
    box = (slice(4, 10), slice(10, 25), slice(15, 30))
    lesion = _lesion(small_seg, box)
    mask = lesion.array > 0
    plain = synthesize(small_seg, "abdomen", lesion_engine, steps=3, seed=1, control=np.zeros(mask.shape, np.float32))
    reports = []
    local = generate_lesion(
        small_seg,
        lesion,
        "abdomen",
        lesion_engine,
        steps=3,
        lesion_steps=2,
        seed=1,
        scope="lesion",
        progress=lambda *report: reports.append(report),
    )
    np.testing.assert_array_equal(local.array[~mask], plain.array[~mask])
    assert np.abs(local.array[mask] - plain.array[mask]).mean() > 1.0
    assert local.metadata["MedDiffFM_task"] == "generate-lesion" and local.metadata["MedDiffFM_scope"] == "lesion"
    done = [report[0] for report in reports]
    assert done == sorted(done) and reports[-1][:2] == (2000, 2000) and {r[1] for r in reports} == {2000}
    assert reports[0][2].startswith("synthesis: ") and reports[-1][2].startswith("lesion: ")

    banded = generate_lesion(
        small_seg, lesion, "abdomen", lesion_engine, steps=3, lesion_steps=2, seed=1, scope="lesion", margin_mm=4.0
    )
    distance = ndimage.distance_transform_edt(~mask, sampling=small_seg.spacing[::-1])
    np.testing.assert_array_equal(banded.array[distance > 4.0], plain.array[distance > 4.0])
    assert (banded.array[(distance > 0) & (distance <= 4.0)] != plain.array[(distance > 0) & (distance <= 4.0)]).any()

    whole = generate_lesion(small_seg, lesion, "abdomen", lesion_engine, steps=3, seed=1)
    assert whole.metadata["MedDiffFM_task"] == "generate-lesion"
    assert (whole.array[distance > 10.0] != plain.array[distance > 10.0]).any()
    with pytest.raises(InputError, match="scope"):
        generate_lesion(small_seg, lesion, "abdomen", lesion_engine, scope="organ")


def test_cli_fine_tuned_commands(tmp_path, small_ct, small_seg):
    thick = _thick_from(crop(small_ct, slice(0, 15), slice(None), slice(None)), 3)
    write_volume(thick, tmp_path / "thick.nrrd")
    write_volume(small_ct, tmp_path / "ct.nrrd")
    write_volume(small_seg, tmp_path / "seg.nrrd")
    write_volume(_lesion(small_ct, (slice(6, 9), slice(15, 20), slice(20, 26))), tmp_path / "lesion.nrrd")
    common = ["--untrained", "tiny", "--quiet", "--steps", "2"]
    assert (
        cli.main(["super-resolve", str(tmp_path / "thick.nrrd"), str(tmp_path / "sr.nrrd"), "--spacing", "3", *common])
        == 0
    )
    assert read_volume(tmp_path / "sr.nrrd").array.shape == (15, 40, 48)
    assert (
        cli.main(
            [
                "generate-lesion",
                str(tmp_path / "seg.nrrd"),
                str(tmp_path / "gen.nrrd"),
                "--lesion",
                str(tmp_path / "lesion.nrrd"),
                "--region",
                "abdomen",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "inpaint-lesion",
                str(tmp_path / "ct.nrrd"),
                str(tmp_path / "inp.nrrd"),
                "--lesion",
                str(tmp_path / "lesion.nrrd"),
                "--region",
                "abdomen",
                "--jump-length",
                "0",
                *common,
            ]
        )
        == 0
    )
    assert read_volume(tmp_path / "inp.nrrd").geometry.same_grid(small_ct.geometry)


def test_thick_condition_is_slab_average_copied_back():
    thin = np.arange(7 * 2 * 2, dtype=np.float32).reshape(7, 2, 2)
    condition = make_pairs.thick_condition(thin, 3)
    assert condition.shape == (6, 2, 2)
    np.testing.assert_allclose(condition[0], thin[0:3].mean(axis=0))
    np.testing.assert_allclose(condition[4], thin[3:6].mean(axis=0))


def test_synthetic_lesions_sit_in_the_liver_with_the_chosen_contrast(sample_ct, sample_seg):
    rng = np.random.default_rng(0)
    liver = sample_seg.array == 5
    hu, mask = make_pairs.insert_ellipsoid_lesion(sample_ct.array.astype(np.float32), liver, sample_ct.spacing, rng)
    assert mask.sum() > 0 and not (mask.astype(bool) & ~liver).any()
    contrast = hu[mask > 0].mean() - sample_ct.array[mask > 0].mean()
    assert make_pairs.LESION_CONTRAST_HU[0] - 15 < contrast < make_pairs.LESION_CONTRAST_HU[1] + 5
    np.testing.assert_array_equal(hu[~liver], sample_ct.array[~liver])


def _finetune(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "Training.finetune_controlnet", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_controlnet_fine_tuning_runs_resumes_and_exports(tmp_path):
    csv = tmp_path / "cases.csv"
    csv.write_text(f"case,image,labels,region\nsm,{DATA / 'example_ct_sm.nii.gz'},{DATA / 'example_seg.nii.gz'},\n")
    from Training import prepare_data

    assert prepare_data.main(["--csv", str(csv), "--output", str(tmp_path / "prepared"), "--spacing", "3"]) == 0
    assert (
        make_pairs.main(
            [
                "synthetic-lesions",
                "--data",
                str(tmp_path / "prepared"),
                "--output",
                str(tmp_path / "lesions"),
                "--count",
                "2",
            ]
        )
        == 0
    )
    assert (
        make_pairs.main(
            ["sr", "--data", str(tmp_path / "prepared"), "--output", str(tmp_path / "sr"), "--thickness", "9"]
        )
        == 0
    )
    base_path = tmp_path / "base.safetensors"
    base_card = w.save_checkpoint(
        random_tiny_model(), base_path, w.ModelCard(name="base", version="1", task="base", config={})
    )
    config = str(REPO / "Training" / "configs" / "controlnet_tiny.yaml")
    common = [
        "--task",
        "lesion",
        "--base",
        str(base_path),
        "--config",
        config,
        "--data",
        str(tmp_path / "lesions"),
        "--output",
        str(tmp_path / "run"),
    ]
    first = _finetune([*common, "--stop-after-minutes", "0"])
    assert first.returncode == 0, first.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 1
    second = _finetune([*common, "--export", "lesion@1"])
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 1" in second.stderr
    exported = tmp_path / "run" / "lesion-1.safetensors"
    card = w.read_card(exported)
    assert card.task == "controlnet-lesion" and card.base_sha256 == base_card.sha256
    controlled = w.load_controlled_model(w.load_model(base_path), exported, "controlnet-lesion")
    assert isinstance(controlled, ControlledNet)
    other = tmp_path / "other.safetensors"
    w.save_checkpoint(random_tiny_model(seed=5), other, w.ModelCard(name="other", version="1", task="base", config={}))
    with pytest.raises(WeightsError, match="trained on base model"):
        w.load_controlled_model(w.load_model(other), exported, "controlnet-lesion")
    moved = Trainer(
        load_config(Path(config)),
        tmp_path / "lesions",
        tmp_path / "moved",
        Distributed(),
        "controlnet-lesion",
        other,
        init_weights=exported,
    )
    carried = w.load_controlled_model(w.load_model(base_path), exported, "controlnet-lesion").controlnet.state_dict()
    for key, value in carried.items():
        assert torch.equal(moved.model.controlnet.state_dict()[key], value), key
    assert moved.model.base.card.sha256 != base_card.sha256
    sr = _finetune(
        [
            "--task",
            "sr",
            "--base",
            str(base_path),
            "--config",
            config,
            "--data",
            str(tmp_path / "sr"),
            "--output",
            str(tmp_path / "sr_run"),
        ]
    )
    assert sr.returncode == 0, sr.stderr[-2000:]
    wrong = _finetune(
        [
            "--task",
            "sr",
            "--base",
            str(base_path),
            "--config",
            config,
            "--data",
            str(tmp_path / "prepared"),
            "--output",
            str(tmp_path / "wrong"),
        ]
    )
    assert wrong.returncode == 2 and "make_pairs" in wrong.stderr


def test_typical_hu_alone_select_the_painted_start_and_reach_lesion_generation(lesion_engine, small_seg):
    lesion = _lesion(small_seg, (slice(4, 10), slice(10, 25), slice(15, 30)))
    keywords = dict(steps=2, seed=1, start=1)
    asked = generate_lesion(small_seg, lesion, "abdomen", lesion_engine, label_hu={"liver": 150.0}, **keywords)
    direct = synthesize(
        small_seg,
        "abdomen",
        lesion_engine,
        control=lesion.array.astype(np.float32),
        task="generate-lesion",
        start_from="anatomy",
        label_hu={5: 150.0},
        **keywords,
    )
    np.testing.assert_array_equal(asked.array, direct.array)
    liver = small_seg.array == label_of("liver")
    assert abs(float(np.median(asked.array[liver & (lesion.array == 0)])) - 150.0) < 15.0
