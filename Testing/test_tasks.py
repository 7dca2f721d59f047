"""Denoising, anomaly detection and synthesis against oracles and invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import OracleNet, crop
from scipy import ndimage

from MedDiffFMLib import preprocessing as pp
from MedDiffFMLib.anatomy import body_mask, derived_body, label_of
from MedDiffFMLib.device import make_generator
from MedDiffFMLib.diffusion.diffpir import diffpir, identity_data_step
from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.errors import CancelledError, InputError, MaskError
from MedDiffFMLib.lowdose import simulate
from MedDiffFMLib.progress import CancelToken
from MedDiffFMLib.region import detect_region
from MedDiffFMLib.tasks import Engine, denoise, detect_anomalies, estimate_noise_sigma, stack_slices, synthesize
from MedDiffFMLib.tasks.denoise import DEFAULT_NOISE_GAIN, resampled_noise_factor
from MedDiffFMLib.volume import Volume


def test_data_step_is_the_closed_form_proximal_operator():
    x0, y0 = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    rho = 0.7
    result = identity_data_step(x0, y0, rho)
    # argmin_z |y0 - z|^2 + rho |z - x0|^2: the gradient vanishes there.
    torch.testing.assert_close(-(y0 - result) + rho * (result - x0), torch.zeros(50, dtype=torch.float64))
    torch.testing.assert_close(identity_data_step(x0, y0, 1e-12), y0)  # lambda -> 0: the observation
    torch.testing.assert_close(identity_data_step(x0, y0, 1e12), x0)  # lambda -> infinity: the prior


def test_t_start_matches_sigma_n():
    schedule = NoiseSchedule()
    for sigma in (0.01, 0.03, 0.15, 1.0):
        t = schedule.timestep_for_sigma(sigma)
        assert schedule.sigma_bar(t) == pytest.approx(sigma, rel=0.1)
        assert abs(schedule.sigma_bar(t) - sigma) <= abs(schedule.sigma_bar(t + 1) - sigma)
        assert abs(schedule.sigma_bar(t) - sigma) <= abs(schedule.sigma_bar(max(t - 1, 0)) - sigma)


def test_diffpir_with_an_oracle_recovers_the_clean_image():
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(8, 8, 8, generator=generator, dtype=torch.float64) * 1.6 - 0.8
    sigma_n = 0.1
    y0 = clean + sigma_n * torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    schedule = NoiseSchedule()

    def oracle(x, t):
        return schedule.predict_eps(x, t, clean)

    restored = diffpir(oracle, schedule, y0, sigma_n, 10.0, 20, 0.3, make_generator(0))
    assert (restored - clean).abs().max() < 1e-3
    assert (y0 - clean).abs().mean() > 0.05


def test_denoise_with_an_oracle_network_recovers_the_clean_ct(small_ct):
    region = "abdomen"
    clean_hu = small_ct.array.astype(np.float32)
    clean = torch.from_numpy(pp.hu_to_model(clean_hu, region))
    noisy = small_ct.with_array(clean_hu + np.random.default_rng(0).normal(0, 30, clean_hu.shape).astype(np.float32))
    engine = Engine(OracleNet(clean), device="cpu", batch_size=16)
    result = denoise(noisy, engine, region=region, sigma_n=30 * 2 / 360, steps=8, noise_gain=1.0)  # white noise
    inside = ~pp.outside_window(noisy.array, region)
    error = np.abs(result.volume.array - clean_hu)[inside]
    assert error.mean() < 1.0
    assert np.abs(noisy.array - clean_hu)[inside].mean() > 20
    margin = 30.0 / resampled_noise_factor(small_ct.geometry, engine.config.spacing_mm)  # the noise on the input
    kept = pp.outside_window_structures(noisy.array, region, margin)
    np.testing.assert_array_equal(result.volume.array[kept], noisy.array[kept])
    assert result.volume.metadata["MedDiffFM_carried_over_voxels"] == str(int(kept.sum()))
    # Voxels noise pushed past the window edge are denoised (to the window), not copied.
    spikes = ~inside & ~kept & ~pp.outside_window(clean_hu, region)
    assert spikes.sum() > 20
    window = pp.REGIONS[region]
    clamped = np.clip(clean_hu[spikes], window.low, window.high)
    assert np.abs(result.volume.array[spikes] - clamped).mean() < 2.0
    assert np.abs(noisy.array[spikes] - clamped).mean() > 10
    assert result.volume.geometry.same_grid(small_ct.geometry)
    assert result.t_start == engine.schedule.timestep_for_sigma(30 * 2 / 360)
    correlated = denoise(noisy, engine, region=region, sigma_n=30 * 2 / 360, steps=1)  # the default gain for CT
    assert correlated.t_start == engine.schedule.timestep_for_sigma(DEFAULT_NOISE_GAIN * 30 * 2 / 360)
    assert correlated.sigma_n == pytest.approx(30 * 2 / 360)
    assert correlated.volume.metadata["MedDiffFM_noise_gain"] == f"{DEFAULT_NOISE_GAIN:g}"


def test_noise_estimate_is_close_to_the_truth():
    """Reconstructed-CT-like noise (correlated in-plane over about a pixel) on piecewise-flat organs."""
    rng = np.random.default_rng(0)
    organs = np.kron(rng.uniform(-0.6, 0.6, (2, 8, 8)), np.ones((4, 16, 16))).astype(np.float32)
    for sigma in (0.02, 0.1):
        correlated = ndimage.gaussian_filter(rng.normal(0, 1, organs.shape), (0, 0.9, 0.9))
        correlated *= sigma / correlated.std()
        assert estimate_noise_sigma(organs + correlated) == pytest.approx(sigma, rel=0.15)
        white = rng.normal(0, sigma, organs.shape)
        assert sigma < estimate_noise_sigma(organs + white) < 1.35 * sigma
        # Constant padding outside the field of view (inside a wide window such as the chest's) is no tissue.
        padded = np.pad(organs + correlated, ((0, 0), (40, 40), (40, 40)), constant_values=-0.5)
        assert estimate_noise_sigma(padded) == pytest.approx(sigma, rel=0.15)


def noise_phantom(slices: int = 4, rows: int = 160, columns: int = 200) -> Volume:
    """An elliptic body (bone-like rim, soft tissue, a liver-like and a fatty organ, a contrast-filled
    vessel, smooth texture) at 0.8 x 0.8 x 2.5 mm: no scan the noise calibration was fitted on."""
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
    ct = noise_phantom()
    result = simulate(ct, target_psnr=target_db, seed=0)
    low, reference = (pp.hu_to_model(v.array, "abdomen") for v in (result.low_dose, result.reference))
    truth = np.std((low - reference)[body_mask(result.reference.array)])
    assert estimate_noise_sigma(low, ct.spacing) == pytest.approx(truth, rel=0.3)


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


def test_denoise_is_reproducible_and_keeps_geometry(small_ct, tiny_engine):
    first = denoise(small_ct, tiny_engine, steps=2, seed=3)
    second = denoise(small_ct, tiny_engine, steps=2, seed=3)
    np.testing.assert_array_equal(first.volume.array, second.volume.array)
    assert first.volume.geometry.same_grid(small_ct.geometry)
    assert first.region == "abdomen" and first.region_source == "image heuristic"
    assert first.network_evaluations > 0


def test_region_detection(sample_ct, sample_seg):
    assert detect_region(sample_ct, sample_ct.array, sample_seg.array) == ("abdomen", "anatomy label map")
    assert detect_region(sample_ct, sample_ct.array)[0] == "abdomen"
    chest = np.full((10, 100, 100), -1000.0, dtype=np.float32)
    chest[:, 10:90, 10:90] = 40.0
    chest[:, 20:80, 20:45] = -850.0
    chest[:, 20:80, 55:80] = -850.0
    assert detect_region(Volume(chest, spacing=(3.0, 3.0, 3.0)), chest)[0] == "chest"
    head = np.full((10, 100, 100), -1000.0, dtype=np.float32)
    head[:, 30:70, 30:70] = 40.0
    assert detect_region(Volume(head, spacing=(3.0, 3.0, 3.0)), head)[0] == "head_neck"


def test_cancel_stops_between_steps(small_ct, tiny_engine):
    cancel = CancelToken()

    def progress(done, total, message):
        if done == 1:
            cancel.cancel()

    with pytest.raises(CancelledError):
        denoise(small_ct, tiny_engine, steps=4, progress=progress, cancel=cancel)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4)), "3D"),
        (np.full((4, 4, 4), np.nan), "NaN"),
        (np.full((4, 4, 4), 7.0), "constant"),
        (np.random.default_rng(0).integers(0, 255, (4, 8, 8)).astype(np.float32), "Hounsfield"),
    ],
)
def test_bad_input_gets_a_clear_error(array, message, tiny_engine):
    with pytest.raises(InputError, match=message):
        denoise(Volume(array), tiny_engine)


def _healthy_and_lesion(small_ct, small_seg):
    liver = small_seg.array == label_of("liver")
    z, y, x = np.argwhere(liver).mean(axis=0).round().astype(int)
    lesion = np.zeros_like(liver)
    lesion[z - 2 : z + 2, y - 3 : y + 3, x - 3 : x + 3] = True
    lesion &= liver
    image = small_ct.array.astype(np.float32).copy()
    image[lesion] = 200.0
    return liver, lesion, small_ct.with_array(image)


@pytest.mark.parametrize("organ_only", [False, True])
def test_anomaly_map_peaks_at_an_inserted_blob_with_a_healthy_oracle(small_ct, small_seg, organ_only):
    """The oracle knows the healthy CT: with context (the whole CT), or the organ alone on air."""
    liver, lesion, with_blob = _healthy_and_lesion(small_ct, small_seg)
    region = "abdomen"
    healthy = pp.hu_to_model(small_ct.array, region)
    seen = np.where(liver, healthy, -1.0) if organ_only else healthy
    engine = Engine(OracleNet(torch.from_numpy(seen.astype(np.float32))), device="cpu", batch_size=16)
    result = detect_anomalies(with_blob, small_seg, ["liver"], engine, region=region, organ_only=organ_only)
    assert result.anomaly_map.metadata["MedDiffFM_context"] == ("organ only" if organ_only else "CT around the organ")
    anomaly = result.anomaly_map.array
    assert np.all(anomaly[~liver] == 0)
    assert np.abs(anomaly[lesion]).min() > np.abs(anomaly[liver & ~lesion]).max()
    np.testing.assert_array_equal(result.anomaly_mask.array.astype(bool), lesion)
    assert result.anomaly_map.geometry.same_grid(small_ct.geometry)


def test_anomaly_detection_errors(small_ct, small_seg, tiny_engine):
    with pytest.raises(MaskError):
        detect_anomalies(small_ct, None, ["liver"], tiny_engine)
    with pytest.raises(InputError, match="Unknown structure"):
        detect_anomalies(small_ct, small_seg, ["livr"], tiny_engine)
    with pytest.raises(MaskError, match="no voxel of brain"):
        detect_anomalies(small_ct, small_seg, ["brain"], tiny_engine)


def test_anomaly_on_stacked_2d_slices(tiny_engine):
    rng = np.random.default_rng(0)
    slices = [rng.normal(40, 10, (40, 40)).astype(np.float32) - 1000 * (rng.random((40, 40)) < 0.01) for _ in range(6)]
    ct = stack_slices(slices, spacing=(3.0, 3.0, 3.0))
    labels = ct.with_array(np.full(ct.array.shape, label_of("liver"), dtype=np.uint8))
    result = detect_anomalies(ct, labels, ["liver"], tiny_engine, region="abdomen", draws=2)
    assert result.anomaly_map.array.shape == (6, 40, 40) and np.isfinite(result.anomaly_map.array).all()
    assert result.network_evaluations > 0


def test_synthesis_returns_the_label_maps_grid_and_is_reproducible(small_seg, tiny_engine):
    first = synthesize(small_seg, "abdomen", tiny_engine, steps=3, seed=1)
    second = synthesize(small_seg, "abdomen", tiny_engine, steps=3, seed=1)
    other = synthesize(small_seg, "abdomen", tiny_engine, steps=3, seed=2)
    assert first.geometry.same_grid(small_seg.geometry)
    np.testing.assert_array_equal(first.array, second.array)
    assert not np.array_equal(first.array, other.array)
    window = pp.REGIONS["abdomen"]
    body = derived_body(small_seg.array, small_seg.spacing)
    assert first.array[body].min() >= window.low - 1e-3 and first.array[body].max() <= window.high + 1e-3
    assert (first.array[~body] == -1000.0).all()


def test_synthesis_derives_the_body_of_a_map_without_body_class_and_takes_a_given_one(tiny_engine):
    labels = np.zeros((6, 40, 40), dtype=np.uint8)
    labels[:, 15:25, 15:25] = label_of("liver")
    anatomy = Volume(labels, (2.0, 2.0, 5.0))
    derived = synthesize(anatomy, "abdomen", tiny_engine, steps=2, seed=0)
    body = derived_body(labels, anatomy.spacing)
    assert body[:, 20, 20].all() and body[:, 20, 30].all() and not body[:, 20, 39].any()
    assert (derived.array[~body] == -1000.0).all() and (derived.array[body] > -1000.0).all()
    assert "derived from the labelled structures" in derived.metadata["MedDiffFM_note"]
    given_body = np.zeros_like(labels, dtype=bool)
    given_body[:, 10:30, 10:30] = True
    given = synthesize(anatomy, "abdomen", tiny_engine, steps=2, seed=0, body=given_body)
    assert (given.array[~given_body] == -1000.0).all() and (given.array[given_body] > -1000.0).all()
    assert "the given body mask" in given.metadata["MedDiffFM_note"]


def test_derived_body_grows_the_labelled_hull_by_the_margin_and_fills_unlabelled_slices():
    labels = np.zeros((3, 50, 50), dtype=np.uint8)
    labels[0, 20:30, 10:14] = 5
    labels[0, 20:30, 30:34] = 6
    body = derived_body(labels, (1.0, 1.0, 3.0), margin_mm=4.0)
    assert body[0, 25, 20]  # between the two blocks: inside their convex hull, though unlabelled
    assert body[0, 25, 37] and not body[0, 25, 39]  # 4 mm beyond the hull's edge at x = 33, not 6 mm
    np.testing.assert_array_equal(body[1], body[0])
    np.testing.assert_array_equal(body[2], body[0])


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_every_few_step_sampler_synthesises_on_the_label_maps_grid(small_seg, tiny_engine, sampler):
    result = synthesize(small_seg, "abdomen", tiny_engine, sampler=sampler, steps=3, eta=0.0, seed=1)
    assert result.geometry.same_grid(small_seg.geometry)
    assert result.metadata["MedDiffFM_sampler"] == sampler
    window = pp.REGIONS["abdomen"]
    inside = result.array[small_seg.array > 0]
    assert inside.min() >= window.low - 1e-3 and inside.max() <= window.high + 1e-3 and inside.std() > 0


def test_synthesis_steps_default_to_the_samplers_own(small_seg, tiny_engine):
    def evaluations(**options) -> int:
        return int(synthesize(small_seg, "abdomen", tiny_engine, **options).metadata["MedDiffFM_network_evaluations"])

    per_step = evaluations(sampler="ddim", steps=1)
    assert evaluations(sampler="dpm++2m") == 20 * per_step


def test_synthesis_handles_any_size_by_padding(sample_seg, tiny_engine):
    thin = crop(sample_seg, slice(10, 13), slice(20, 60), slice(20, 40))
    assert synthesize(thin, "abdomen", tiny_engine, steps=2).array.shape == (3, 40, 20)
    with pytest.raises(InputError, match="empty"):
        synthesize(thin.with_array(np.zeros_like(thin.array)), "abdomen", tiny_engine)


def test_very_large_volumes_are_refused_with_an_estimate(small_ct, tiny_engine, monkeypatch):
    from MedDiffFMLib.errors import ResourceError
    from MedDiffFMLib.tasks import engine as engine_module

    monkeypatch.setattr(engine_module, "device_memory_bytes", lambda device: 2**20)
    with pytest.raises(ResourceError, match=r"needs about .* GiB"):
        denoise(small_ct, tiny_engine, steps=1)
    assert engine_module.check_memory((10, 10, 10), torch.device("cpu")) == 10**3 * 4 * 10


def test_synthesis_sets_outside_body_to_air_and_skips_air_windows(sample_ct, sample_seg, tiny_engine):
    from MedDiffFMLib.anatomy import from_totalsegmentator

    labels = sample_seg.with_array(from_totalsegmentator(sample_seg.array, sample_ct.array))
    result = synthesize(labels, "abdomen", tiny_engine, steps=2, seed=0)
    assert np.all(result.array[labels.array == 0] == -1000.0)
    inside = labels.array > 0
    assert result.array[inside].min() >= pp.REGIONS["abdomen"].low - 1e-3
    assert int(result.metadata["MedDiffFM_skipped_windows"]) > 0


def test_denoise_skips_windows_outside_the_body(sample_ct, tiny_engine):
    result = denoise(sample_ct, tiny_engine, region="abdomen", sigma_n=0.05, steps=1)
    assert result.skipped_windows > 0
    outside = sample_ct.array < -900
    np.testing.assert_array_equal(result.volume.array[outside], sample_ct.array[outside])


def test_far_edges_of_the_input_survive_the_working_grid(tiny_engine):
    rng = np.random.default_rng(0)
    hu = rng.normal(40, 5, (21, 20, 22)).astype(np.float32)
    hu[0, 0, 0] = -1000.0
    ct = Volume(hu, spacing=(1.0, 1.0, 1.0))
    engine = Engine(OracleNet(torch.from_numpy(pp.hu_to_model(hu[::3, ::3, ::3], "abdomen"))), device="cpu")
    result = denoise(ct, engine, region="abdomen", sigma_n=0.05, steps=2, skip_air=False)
    assert np.abs(result.volume.array[-1] - hu[-1]).max() < 60  # no constant fill on the last slice
    assert np.abs(result.volume.array[:, -1] - hu[:, -1]).max() < 60
    del tiny_engine


def test_anatomy_values_are_checked_and_body_is_added(small_ct, small_seg, tiny_engine):
    from MedDiffFMLib.tasks.engine import anatomy_on

    labels = anatomy_on(small_seg, small_ct.geometry, small_ct.array)
    assert (labels == 118).any() and (labels == 5).any()
    with pytest.raises(InputError, match="0..119"):
        denoise(small_ct, tiny_engine, anatomy=small_seg.with_array(small_seg.array.astype(np.int32) + 150))
