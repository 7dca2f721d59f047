"""Whole-volume noise estimation: exact averaging, single window = direct, padding."""

from __future__ import annotations

import pytest
import torch
from conftest import CoordinateNet, random_tiny_model

from MedDiffFMLib.diffusion.sliding_window import Conditions, KnownVoxels, WindowedNoisePredictor
from MedDiffFMLib.errors import ResourceError
from MedDiffFMLib.model.embeddings import window_coordinates


def test_single_window_covering_the_volume_equals_a_direct_call():
    model = random_tiny_model()
    anatomy = torch.randint(0, 120, (16, 16, 16), dtype=torch.uint8)
    predictor = WindowedNoisePredictor(model, Conditions(2, anatomy), (16, 16, 16), 16, 2)
    x = torch.randn(16, 16, 16)
    assert len(predictor.windows) == 1
    with torch.no_grad():
        direct = model(
            x[None, None],
            torch.tensor([40]),
            window_coordinates([slice(0, 16)] * 3, (16, 16, 16))[None],
            torch.tensor([2]),
            anatomy[None],
        )[0, 0]
    assert direct.abs().mean() > 1e-3
    torch.testing.assert_close(predictor(x, 40), direct, rtol=1e-5, atol=1e-6)


def test_overlap_averaging_reproduces_the_global_embedding():
    shape = (20, 37, 29)
    for blend in ("gaussian", "constant"):
        predictor = WindowedNoisePredictor(
            CoordinateNet(), Conditions(0), shape, 16, 2, overlap=0.5, blend=blend, batch_size=3
        )
        assert len(predictor.windows) > 8
        expected = window_coordinates([slice(0, n) for n in shape], shape)[0]
        torch.testing.assert_close(predictor(torch.zeros(shape), 10), expected, rtol=0, atol=1e-5)


def test_volumes_smaller_than_a_window_are_padded_and_cropped_back():
    shape = (5, 37, 9)
    predictor = WindowedNoisePredictor(CoordinateNet(), Conditions(0), shape, 16, 2)
    assert predictor.window == (6, 16, 10)
    result = predictor(torch.zeros(shape), 10)
    assert result.shape == shape
    torch.testing.assert_close(result, window_coordinates([slice(0, n) for n in shape], shape)[0], rtol=0, atol=1e-5)


def test_window_batching_does_not_change_the_result():
    model = random_tiny_model()
    shape = (16, 24, 20)
    x = torch.randn(shape)
    results = [WindowedNoisePredictor(model, Conditions(3), shape, 16, 2, batch_size=b)(x, 100) for b in (1, 5)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


class _MemoryHungry(CoordinateNet):
    """Fails with out-of-memory whenever it is given more than ``limit`` windows at once."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x, t, coordinates, region, anatomy, control=None):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(x, t, coordinates, region, anatomy, control)


def test_out_of_memory_halves_the_batch_and_then_gives_advice():
    shape = (20, 37, 29)
    predictor = WindowedNoisePredictor(_MemoryHungry(limit=2), Conditions(0), shape, 16, 2, batch_size=8)
    expected = window_coordinates([slice(0, n) for n in shape], shape)[0]
    torch.testing.assert_close(predictor(torch.zeros(shape), 10), expected, rtol=0, atol=1e-5)
    assert predictor.batch_size == 2
    hopeless = WindowedNoisePredictor(_MemoryHungry(limit=0), Conditions(0), shape, 16, 2, batch_size=4)
    with pytest.raises(ResourceError, match="even with one"):
        hopeless(torch.zeros(shape), 10)


def test_bf16_autocast_stays_close_to_float32():
    model = random_tiny_model()
    shape = (16, 24, 20)
    x = torch.randn(shape)
    exact = WindowedNoisePredictor(model, Conditions(3), shape, 16, 2)(x, 100)
    mixed = WindowedNoisePredictor(model, Conditions(3), shape, 16, 2, autocast=torch.bfloat16)(x, 100)
    assert mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 0.05 * exact.abs().max()
    assert not torch.equal(mixed, exact)


def test_windows_of_known_voxels_are_skipped_and_keep_their_known_values():
    from MedDiffFMLib.diffusion.schedule import NoiseSchedule

    schedule = NoiseSchedule()
    shape = (16, 48, 48)
    known_mask = torch.ones(shape, dtype=torch.bool)
    known_mask[:, 20:30, 20:30] = False
    values = torch.full(shape, -1.0)
    model = random_tiny_model()
    full = WindowedNoisePredictor(model, Conditions(3), shape, 16, 2)
    skipping = WindowedNoisePredictor(
        model, Conditions(3), shape, 16, 2, known=KnownVoxels(known_mask, values, schedule)
    )
    assert skipping.skipped_windows > 0 and len(skipping.windows) + skipping.skipped_windows == len(full.windows)
    x = torch.randn(shape)
    eps = skipping(x, 300)
    x0 = schedule.predict_x0(x, 300, eps, clip=False)
    uncovered = ~skipping.covered
    assert uncovered.any()
    torch.testing.assert_close(x0[uncovered], values[uncovered], rtol=0, atol=1e-4)
    # voxels covered by an evaluated window get exactly the full computation's estimate where all their
    # windows were evaluated (the unknown core)
    torch.testing.assert_close(eps[:, 20:30, 20:30], full(x, 300)[:, 20:30, 20:30], rtol=1e-4, atol=1e-5)


def test_a_v_predicting_network_gives_the_same_noise_estimate_and_samples_as_its_noise_predicting_twin():
    from conftest import OracleNet

    from MedDiffFMLib.device import make_generator
    from MedDiffFMLib.diffusion.samplers import sample
    from MedDiffFMLib.diffusion.schedule import NoiseSchedule

    shape = (10, 20, 24)
    clean = torch.rand(shape, generator=torch.Generator().manual_seed(2)) * 2 - 1
    eps_net = OracleNet(clean)

    def v_net(x, t, coordinates, region, anatomy, control=None):
        abar = torch.tensor([eps_net.schedule.abar(int(s)) for s in t]).view(-1, 1, 1, 1, 1)
        eps = eps_net(x, t, coordinates, region, anatomy)
        return abar.sqrt() * eps - (1 - abar).sqrt() * (x - (1 - abar).sqrt() * eps) / abar.sqrt()

    v_schedule = NoiseSchedule(1000, "cosine", "v")
    by_eps = WindowedNoisePredictor(eps_net, Conditions(3), shape, 16, 2)
    by_v = WindowedNoisePredictor(v_net, Conditions(3), shape, 16, 2, schedule=v_schedule)
    x = torch.randn(shape)
    for t in (10, 600, 950):
        torch.testing.assert_close(by_v(x, t), by_eps(x, t), rtol=0, atol=1e-4)
    result = sample(by_v, v_schedule, shape, make_generator(0), torch.device("cpu"), "ddim", steps=6)
    torch.testing.assert_close(result, clean, rtol=0, atol=1e-4)
