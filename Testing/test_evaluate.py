"""Evaluation metrics (Training/evaluate.py) on cases with known answers, and its command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DATA
from scipy import ndimage
from scipy.integrate import trapezoid

from MedDiffFMLib.anatomy import label_of
from MedDiffFMLib.errors import InputError, WeightsError
from MedDiffFMLib.metrics import psnr as library_psnr
from MedDiffFMLib.preprocessing import REGIONS, hu_to_model
from MedDiffFMLib.volume import Volume, read_volume, write_volume
from Training import evaluate as ev

WINDOW = (-160.0, 240.0)


def smooth_volume(shape=(16, 32, 28), seed=0) -> np.ndarray:
    """A smooth random HU volume spanning the window, with structure at several scales."""
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 2.0) * 1500.0 + 40.0


def noisy(volume: np.ndarray, std: float, seed: int = 1) -> np.ndarray:
    return volume + np.random.default_rng(seed).normal(0.0, std, volume.shape)


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    metrics = pytest.importorskip("skimage.metrics")
    scaled = [(np.clip(image, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0]) for image in (a, b)]
    return metrics.structural_similarity(
        *scaled, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


# --------------------------------------------------------------------------------------- PSNR


def test_psnr_identical_is_infinite_and_known_mse_is_exact():
    reference = np.full((3, 4, 5), 50.0)
    assert ev.psnr(reference, reference.copy(), (0, 100)) == math.inf
    # error 10 everywhere in a window of width 100: PSNR = 10 log10(100^2 / 10^2) = 20 dB exactly
    assert ev.psnr(reference, reference + 10.0, (0, 100)) == pytest.approx(20.0, abs=1e-12)
    # half the voxels off by 20: MSE = 200 -> 10 log10(10000 / 200)
    test = reference.copy()
    test[:, :2] += 20.0
    assert ev.psnr(reference, test, (0, 100)) == pytest.approx(10 * math.log10(50.0), abs=1e-12)


def test_psnr_clips_to_the_window_and_honours_the_mask():
    reference = np.zeros((2, 3, 4))
    test = reference.copy()
    test[0] = 1000.0
    assert ev.psnr(reference + 500.0, test + 500.0, (0, 100)) == math.inf  # both clipped to 100
    mask = np.zeros(reference.shape, dtype=bool)
    mask[1] = True
    assert ev.psnr(reference, test, WINDOW, mask) == math.inf
    with pytest.raises(InputError, match="empty"):
        ev.psnr(reference, test, WINDOW, np.zeros_like(mask))


def test_psnr_same_in_hu_and_model_scale_and_as_the_library():
    reference, test = smooth_volume(), noisy(smooth_volume(), 40.0)
    window = REGIONS["abdomen"]
    in_hu = ev.psnr(reference, test, window)
    assert in_hu == pytest.approx(ev.psnr(hu_to_model(reference, "abdomen"), hu_to_model(test, "abdomen"), (-1, 1)))
    assert in_hu == pytest.approx(library_psnr(reference, test, window))


# --------------------------------------------------------------------------------------- SSIM


def test_ssim_of_identical_images_is_one():
    volume = smooth_volume()
    assert ev.ssim(volume, volume.copy(), WINDOW) == pytest.approx(1.0)
    assert ev.ssim(volume, volume.copy(), WINDOW, per_slice=True) == pytest.approx(1.0)


def test_ssim_matches_scikit_image_in_2d_and_3d():
    reference, test = smooth_volume(), noisy(smooth_volume(), 60.0)
    per_slice = np.mean([skimage_ssim(a, b) for a, b in zip(reference, test)])
    assert ev.ssim(reference, test, WINDOW, per_slice=True) == pytest.approx(per_slice, abs=1e-10)
    assert ev.ssim(reference, test, WINDOW) == pytest.approx(skimage_ssim(reference, test), abs=1e-10)
    assert ev.ssim(reference, test, WINDOW) < 0.99


def test_ssim_3d_matches_monai():
    from monai.metrics import SSIMMetric

    reference, test = smooth_volume(), noisy(smooth_volume(), 60.0)
    scaled = [torch.from_numpy((np.clip(v, *WINDOW) - WINDOW[0]) / 400.0)[None, None] for v in (test, reference)]
    expected = float(SSIMMetric(spatial_dims=3, data_range=1.0)(*scaled))
    assert ev.ssim(reference, test, WINDOW) == pytest.approx(expected, abs=1e-5)


def test_ssim_mask_and_size_checks():
    reference = smooth_volume()
    test = reference.copy()
    test[:, :, 14:] = noisy(reference, 80.0)[:, :, 14:]
    left = np.zeros(reference.shape, dtype=bool)
    left[:, :, :9] = True  # windows centred here do not reach the noisy half
    assert ev.ssim(reference, test, WINDOW, left) == pytest.approx(1.0)
    assert ev.ssim(reference, test, WINDOW) < 1.0
    with pytest.raises(InputError, match="per-slice"):
        ev.ssim(reference[:10], test[:10], WINDOW)
    assert ev.ssim(reference[:3], test[:3], WINDOW, per_slice=True) < 1.0


def test_ms_ssim_follows_the_ssim_conventions():
    reference, test = smooth_volume(), noisy(smooth_volume(), 60.0)
    assert ev.ms_ssim(reference, reference.copy(), WINDOW, weights=(0.5, 0.5)) == pytest.approx(1.0, abs=1e-6)
    # one scale with weight 1 is plain SSIM (MONAI computes in float32)
    single = ev.ms_ssim(reference, test, WINDOW, weights=(1.0,))
    assert single == pytest.approx(ev.ssim(reference, test, WINDOW, per_slice=True), abs=1e-5)
    with pytest.raises(InputError, match="fewer scales"):
        ev.ms_ssim(reference, test, WINDOW)
    large = smooth_volume((2, 176, 176))
    slight, strong = (ev.ms_ssim(large, noisy(large, std), WINDOW) for std in (20.0, 80.0))
    assert 1.0 > slight > strong > 0.0


# -------------------------------------------------------------------------------------- AUROC


def test_auroc_known_cases():
    labels = np.array([0, 0, 0, 1, 1])
    assert ev.auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert ev.auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    assert ev.auroc(np.ones(5), labels) == 0.5
    # positives {0.35, 0.8, 0.4}, negatives {0.1, 0.4}: 4 wins + 1 tie out of 6 pairs
    assert ev.auroc([0.1, 0.4, 0.35, 0.8, 0.4], [0, 0, 1, 1, 1]) == pytest.approx(4.5 / 6)
    rng = np.random.default_rng(0)
    assert ev.auroc(rng.random(20000), rng.random(20000) < 0.3) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(InputError, match="both"):
        ev.auroc([0.1, 0.2], [1, 1])


def test_pixel_and_image_auroc():
    truth = np.zeros((4, 6, 6), dtype=bool)
    truth[1, 2:4, 2:4] = True
    anomaly_map = np.where(truth, 2.0, 1.0)
    anomaly_map[3, 0, 0] = 5.0  # a false alarm, outside the organ below
    organ = np.ones_like(truth)
    organ[3, 0, 0] = False
    assert ev.pixel_auroc(anomaly_map, truth, organ) == 1.0
    assert ev.pixel_auroc(anomaly_map, truth) < 1.0
    # slices as images: slice 1 is the only abnormal one, slice 3 scores highest without the organ mask
    assert ev.image_auroc(anomaly_map, truth) == pytest.approx(2 / 3)
    assert ev.image_auroc(anomaly_map, truth, organ) == 1.0
    empty = organ.copy()
    empty[0] = False  # slices without organ are skipped
    assert ev.image_auroc(anomaly_map, truth, empty & organ) == 1.0


# ---------------------------------------------------------------------------------------- PRO


def brute_force_pro(anomaly_map, truth, max_fpr=0.3):
    """PRO by thresholding at every distinct score (reference for the vectorised version)."""
    components, count = ndimage.label(truth, structure=np.ones((3,) * truth.ndim))
    points = [(0.0, 0.0)]
    for threshold in np.unique(anomaly_map)[::-1]:
        above = anomaly_map >= threshold
        overlap = np.mean([above[components == c].mean() for c in range(1, count + 1)])
        points.append((above[~truth].mean(), overlap))
    fpr, overlap = np.array(points).T
    limit = np.interp(max_fpr, fpr, overlap)
    inside = fpr <= max_fpr
    return trapezoid(np.append(overlap[inside], limit), np.append(fpr[inside], max_fpr)) / max_fpr


def test_pro_hand_computed_case():
    # components {0, 1} and {5}; normal scores 0.7, 0.3, 0.2, ... The curve passes (0, 0.25),
    # (0, 0.75), (1/7, 0.75), (1/7, 1), (2/7, 1): area to 0.3 is 0.75 / 7 + (0.3 - 1 / 7).
    scores = np.array([[0.9, 0.4, 0.7, 0.3, 0.2, 0.8, 0.1, 0.05, 0.02, 0.01]])
    truth = np.array([[1, 1, 0, 0, 0, 1, 0, 0, 0, 0]])
    assert ev.pro(scores, truth) == pytest.approx((0.75 / 7 + 0.3 - 1 / 7) / 0.3, abs=1e-12)
    assert ev.pro(np.where(truth, 1.0, 0.0), truth) == pytest.approx(1.0)
    assert ev.pro(np.where(truth, 0.0, 1.0), truth) == pytest.approx(0.0)


def test_pro_matches_brute_force_with_ties():
    rng = np.random.default_rng(3)
    truth = ndimage.binary_dilation(rng.random((5, 12, 12)) < 0.02, iterations=1)
    scores = np.round(rng.random(truth.shape) + 0.6 * truth, 1)  # few distinct values: many ties
    assert ev.pro(scores, truth) == pytest.approx(brute_force_pro(scores, truth), abs=1e-12)


def test_pro_of_one_region_up_to_fpr_one_is_the_auroc():
    rng = np.random.default_rng(4)
    truth = np.zeros((6, 10, 10), dtype=bool)
    truth[2:4, 3:6, 3:6] = True
    scores = rng.integers(0, 5, truth.shape) + 2 * truth
    assert ev.pro(scores, truth, max_fpr=1.0) == pytest.approx(ev.pixel_auroc(scores, truth), abs=1e-12)


def test_pro_regions_in_3d_or_per_slice():
    truth = np.zeros((2, 5, 5), dtype=bool)
    truth[0, 2, 1:4] = True  # three voxels in slice 0 ...
    truth[1, 2, 1] = True  # ... touching one voxel in slice 1
    scores = np.full(truth.shape, 0.5)
    scores[truth] = 0.1
    scores[1, 2, 1] = 0.9
    assert ev.pro(scores, truth) == pytest.approx(0.25)  # one region of 4, a quarter found
    assert ev.pro(scores, truth, per_slice=True) == pytest.approx(0.5)  # two regions, one found
    with pytest.raises(InputError, match="anomalous region"):
        ev.pro(scores, np.zeros_like(truth))


# --------------------------------------------------------------------------------------- Dice


def test_dice_known_cases():
    a = np.zeros((1, 4, 4), dtype=bool)
    b = a.copy()
    a[0, 0, :4] = True
    b[0, 0, 1:4] = True
    b[0, 1, :3] = True
    assert ev.dice(a, b) == pytest.approx(2 * 3 / (4 + 6))
    assert ev.dice(a, a) == 1.0
    assert ev.dice(a, ~a) == 0.0
    assert math.isnan(ev.dice(np.zeros_like(a), np.zeros_like(a)))


def test_label_and_organ_dice():
    labels = np.array([[0, 1, 1, 2, 2, 2, 0, 0]])
    reference = np.array([[0, 1, 2, 2, 2, 0, 0, 5]])
    assert ev.label_dice(labels, reference) == pytest.approx({1: 2 / 3, 2: 2 * 2 / 6, 5: 0.0})
    scores = ev.label_dice(labels, reference, values=[1, 7])
    assert scores[1] == pytest.approx(2 / 3) and math.isnan(scores[7])

    liver, right, left = label_of("liver"), label_of("kidney_right"), label_of("kidney_left")
    generated = np.array([[liver, liver, right, 0]])
    condition = np.array([[liver, liver, left, 0]])
    organs = ev.organ_dice(generated, condition, "abdomen")
    assert organs["liver"] == 1.0 and organs["kidney"] == 1.0  # the paper's "kidney" merges both sides
    assert math.isnan(organs["pancreas"])
    assert set(ev.organ_dice(generated, condition, "chest")) == {"lung", "heart", "aorta"}


# ---------------------------------------------------------------------------------- FID and MMD


def test_frechet_distance_closed_forms():
    mean_a, mean_b = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    cov_a, cov_b = np.diag([4.0, 1.0]), np.diag([1.0, 9.0])
    # commuting covariances: |dm|^2 + sum (sqrt(a_i) - sqrt(b_i))^2 = 13 + 1 + 4
    assert ev.frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(18.0)
    assert ev.frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0.0, abs=1e-12)
    # general 2x2 case: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = A B
    cov_c = np.array([[2.0, 0.8], [0.8, 1.0]])
    trace_root = math.sqrt(np.trace(cov_a @ cov_c) + 2 * math.sqrt(np.linalg.det(cov_a) * np.linalg.det(cov_c)))
    expected = 13.0 + np.trace(cov_a) + np.trace(cov_c) - 2 * trace_root
    assert ev.frechet_distance(mean_a, cov_a, mean_b, cov_c) == pytest.approx(expected, rel=1e-10)


def test_fid_of_feature_sets():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    assert ev.fid(a, a.copy()) == pytest.approx(0.0, abs=1e-9)
    assert ev.fid(a, a + 2.0) == pytest.approx(4.0 * 8)  # a shift moves only the means
    assert ev.fid(a[:5], rng.normal(size=(5, 8))) >= 0.0  # singular covariances stay real
    samples_a = rng.multivariate_normal([0, 0], np.diag([4.0, 1.0]), 40000)
    samples_b = rng.multivariate_normal([3, -2], np.diag([1.0, 9.0]), 40000)
    assert ev.fid(samples_a, samples_b) == pytest.approx(18.0, rel=0.02)
    with pytest.raises(InputError, match="dimension"):
        ev.fid(a, a[:, :3])


def test_mmd_known_value_and_two_sample_behaviour():
    # a = {0, 1}, b = {0, 2}, bandwidth 1: within a e^-1/2, within b e^-2, across (1 + e^-2 + 2 e^-1/2) / 4;
    # MMD^2 = e^-1/2 + e^-2 - 2 * across = (e^-2 - 1) / 2 (negative: the estimator is unbiased, not positive)
    expected = (math.exp(-2.0) - 1.0) / 2
    assert ev.mmd([[0.0], [1.0]], [[0.0], [2.0]], bandwidth=1.0) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    same = ev.mmd(rng.normal(size=(300, 5)), rng.normal(size=(300, 5)))
    shifted = ev.mmd(rng.normal(size=(300, 5)), rng.normal(size=(300, 5)) + 1.0)
    assert abs(same) < 0.01 and shifted > 0.1


# -------------------------------------------------------------------------------- feature extractor


def test_feature_extractor_needs_local_weights(tmp_path):
    with pytest.raises(WeightsError, match="never downloads"):
        ev.load_feature_extractor(None)
    with pytest.raises(WeightsError, match="do not exist"):
        ev.load_feature_extractor(tmp_path / "missing.pth")


def saved_medicalnet(tmp_path):
    """Random MedicalNet-layout ResNet-10 weights saved like MedicalNet's checkpoints (.pth and .safetensors)."""
    from monai.networks.nets import resnet10
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = resnet10(spatial_dims=3, n_input_channels=1, feed_forward=False, bias_downsample=False).state_dict()
    wrapped = {f"module.{key}": value for key, value in state.items()}
    wrapped["module.conv_seg.0.weight"] = torch.zeros(2, 512, 1, 1, 1)
    torch.save({"state_dict": wrapped}, tmp_path / "resnet_10.pth")
    save_file(wrapped, tmp_path / "resnet_10.safetensors")
    return tmp_path / "resnet_10.pth", tmp_path / "resnet_10.safetensors"


def test_feature_extractor_loads_medicalnet_checkpoints(tmp_path):
    pth, safetensors = saved_medicalnet(tmp_path)
    volumes = [smooth_volume((16, 16, 16), seed) for seed in range(3)]
    features = ev.volume_features(ev.load_feature_extractor(pth), volumes)
    assert features.shape == (3, 512) and np.isfinite(features).all()
    again = ev.volume_features(ev.load_feature_extractor(safetensors), volumes)
    np.testing.assert_allclose(features, again, rtol=1e-6)
    with pytest.raises(WeightsError, match="not a MedicalNet ResNet-18"):
        ev.load_feature_extractor(pth, depth=18)


# ------------------------------------------------------------------------------------ command line


@pytest.fixture
def files(tmp_path, small_ct, small_seg):
    """A CT crop, a noisy copy, its label map and a synthetic liver lesion, as files."""
    noisy_ct = small_ct.with_array(noisy(small_ct.array.astype(np.float64), 30.0).astype(np.float32))
    truth = np.zeros(small_ct.array.shape, dtype=np.uint8)
    truth[6:9, 15:22, 20:28] = 1
    anomaly_map = np.where(truth, 80.0, 0.0) + noisy(np.zeros(truth.shape), 10.0)
    paths = {
        "ct": write_volume(small_ct, tmp_path / "ct.nii.gz"),
        "noisy": write_volume(noisy_ct, tmp_path / "noisy.nrrd"),
        "seg": write_volume(small_seg, tmp_path / "seg.nii.gz"),
        "truth": write_volume(small_ct.with_array(truth), tmp_path / "truth.nii.gz"),
        "map": write_volume(small_ct.with_array(anomaly_map.astype(np.float32)), tmp_path / "map.nii.gz"),
    }
    return {name: str(path) for name, path in paths.items()}


def test_cli_compare_prints_the_metrics(files, small_ct, capsys):
    assert ev.main(["compare", files["noisy"], files["ct"], "--window", "-160", "240"]) == 0
    table = capsys.readouterr().out
    expected = ev.psnr(small_ct.array, read_volume(files["noisy"]).array, WINDOW)
    assert "PSNR (dB)" in table and f"{expected:.4f}" in table
    assert "SSIM 2D (slice mean)" in table and "MS-SSIM 2D (slice mean)  n/a" in table


def test_cli_anomaly_and_anatomy_json(files, capsys):
    assert ev.main(["--json", "anomaly", files["map"], files["truth"], "--threshold", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pixel AUROC"] > 0.99 and result["image AUROC (per slice)"] == 1.0
    assert result["PRO (FPR <= 0.3)"] > 0.95 and result["Dice"] > 0.9
    assert ev.main(["--json", "anatomy", files["seg"], files["seg"], "--region", "abdomen"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["Dice liver"] == 1.0 and result["Dice mean"] == 1.0
    assert {f"Dice {organ}" for organ in ev.PAPER_ORGANS["abdomen"]} < set(result)


def test_cli_distribution_and_clear_errors(files, tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.normal(size=(20, 4)))
    np.save(tmp_path / "b.npy", rng.normal(size=(20, 4)) + 1.0)
    assert ev.main(["distribution", str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]) == 0
    assert "FID" in capsys.readouterr().out
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    write_volume(read_volume(files["ct"]), volumes / "ct.nii.gz")
    assert ev.main(["distribution", str(volumes), str(tmp_path / "b.npy")]) == 2
    assert "never downloads" in capsys.readouterr().err
    other = write_volume(Volume(np.zeros((4, 4, 4), np.float32)), tmp_path / "other.nii.gz")
    assert ev.main(["compare", str(other), files["ct"]]) == 2
    assert "not on the grid" in capsys.readouterr().err


def test_module_runs_from_the_command_line():
    sample = str(DATA / "example_ct_sm.nii.gz")
    result = subprocess.run(
        [sys.executable, "-m", "Training.evaluate", "--json", "compare", sample, sample, "--region", "abdomen"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout)
    assert values["PSNR (dB)"] == "inf" and values["SSIM 3D"] == pytest.approx(1.0)
