"""Embeddings, the network, ControlNet and samplers against their mathematics."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import randomise_zero_parameters
from monai.networks.schedulers import DDPMScheduler
from monai.networks.utils import copy_model_state

from MedDiffFMLib.diffusion.samplers import ddim_step, ddpm_step
from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.errors import InputError, WeightsError
from MedDiffFMLib.model.config import ModelConfig, preset
from MedDiffFMLib.model.embeddings import fourier_features, window_coordinates
from MedDiffFMLib.model.network import ControlledNet, MedDiffFMNet


def test_position_embedding_of_a_crop_is_the_sub_block_of_the_whole():
    shape = (9, 14, 11)
    whole = window_coordinates((slice(0, 9), slice(0, 14), slice(0, 11)), shape)
    crop = (slice(2, 7), slice(5, 14), slice(0, 4))
    torch.testing.assert_close(window_coordinates(crop, shape), whole[(slice(None), *crop)], rtol=0, atol=1e-6)
    assert whole[0, 0, 0, 0] == -1 and whole[0, 0, 0, -1] == 1  # x runs along the last axis
    assert whole[2, 0, 0, 0] == -1 and whole[2, -1, 0, 0] == 1  # z along the first
    features = fourier_features(whole[None], 4)
    assert features.shape == (1, 24, *shape)
    torch.testing.assert_close(features[0, 3], torch.cos(torch.pi * whole[0]))


def test_resized_crop_spans_the_crops_global_range():
    coordinates = window_coordinates((slice(0, 8), slice(4, 12), slice(0, 16)), (16, 16, 16), size=(4, 4, 4))
    assert coordinates[1].min().item() == pytest.approx(-1 + 4 * 2 / 15)
    assert coordinates[1].max().item() == pytest.approx(-1 + 11 * 2 / 15)


def test_paper_preset_matches_the_published_size():
    model = MedDiffFMNet(preset("paper"))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(28.8e6, rel=0.01)
    assert model.unet.conv_in.conv.in_channels == 1 + 24 + 4


def test_config_validation():
    with pytest.raises(Exception, match="multiple of norm_num_groups"):
        ModelConfig(channels=(12, 24), attention_levels=(False, True), norm_num_groups=8)


def _inputs(size: int = 16, batch: int = 2):
    generator = torch.Generator().manual_seed(1)
    shape = (batch, 1, size, size, size)
    return dict(
        x=torch.randn(shape, generator=generator),
        t=torch.tensor([3, 700][:batch]),
        coordinates=torch.rand((batch, 3, size, size, size), generator=generator) * 2 - 1,
        region=torch.tensor([1, 3][:batch]),
        anatomy=torch.randint(0, 120, (batch, size, size, size), generator=generator),
    )


def test_controlnet_at_initialisation_equals_the_base_model():
    torch.manual_seed(0)
    base = randomise_zero_parameters(MedDiffFMNet(preset("tiny"))).eval()
    controlled = ControlledNet(base).eval()
    inputs = _inputs()
    with torch.no_grad():
        expected = base(**inputs)
        actual = controlled(**inputs, control=torch.randn(2, 1, 16, 16, 16))
    assert expected.abs().mean() > 1e-3
    assert torch.equal(expected, actual)
    assert all(not p.requires_grad for p in controlled.base.parameters())
    assert any(p.requires_grad for p in controlled.controlnet.parameters())


def test_controlnet_copies_the_encoder_without_logging_to_stdout():
    """``--progress-format json`` promises only JSON lines on stdout, where MONAI's logger writes."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    monai_logger = logging.getLogger(copy_model_state.__module__)
    monai_logger.addHandler(handler)
    try:
        base = MedDiffFMNet(preset("tiny"))
        controlled = ControlledNet(base)
    finally:
        monai_logger.removeHandler(handler)
    assert records == []
    assert monai_logger.level == logging.INFO  # MONAI's own setting, restored
    torch.testing.assert_close(controlled.controlnet.conv_in.conv.weight, base.unet.conv_in.conv.weight)


def test_controlnet_responds_to_its_condition_once_trained():
    torch.manual_seed(0)
    controlled = randomise_zero_parameters(ControlledNet(randomise_zero_parameters(MedDiffFMNet(preset("tiny")))))
    controlled.eval()
    inputs = _inputs()
    with torch.no_grad():
        a = controlled(**inputs, control=torch.zeros(2, 1, 16, 16, 16))
        b = controlled(**inputs, control=torch.ones(2, 1, 16, 16, 16))
    assert not torch.allclose(a, b)


def test_ddpm_step_matches_monai_scheduler():
    schedule = NoiseSchedule()
    monai = DDPMScheduler(num_train_timesteps=1000, schedule="cosine")
    generator = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 1, 4, 4, 4, generator=generator), torch.randn(2, 1, 4, 4, 4, generator=generator)
    for t in (999, 500, 10, 1):
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        expected, _ = monai.step(eps, t, x, generator=torch.Generator().manual_seed(t))
        torch.testing.assert_close(
            ddpm_step(schedule, x.double(), t, eps.double(), noise.double()).float(), expected, rtol=1e-4, atol=1e-5
        )


def test_ddim_with_eta_one_over_all_steps_is_ddpm():
    schedule = NoiseSchedule()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    for t in (999, 600, 31, 1):
        eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        ddpm = ddpm_step(schedule, x, t, eps, noise)
        ddim = ddim_step(schedule, x, t, t - 1, schedule.predict_x0(x, t, eps), eta=1.0, noise=noise)
        torch.testing.assert_close(ddim, ddpm, rtol=1e-9, atol=1e-9)


def test_x0_prediction_inverts_forward_noising():
    schedule = NoiseSchedule()
    x0 = torch.rand(4, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 4, 4, dtype=torch.float64)
    for t in (0, 15, 500, 950):
        torch.testing.assert_close(schedule.predict_x0(schedule.q_sample(x0, t, eps), t, eps), x0)
    assert schedule.strided_timesteps(15, 100) == list(range(15, -1, -1))
    assert schedule.strided_timesteps(999, 4) == [999, 666, 333, 0]


def test_log_snr_timesteps_are_even_above_the_floor_and_sparse_below_it():
    from MedDiffFMLib.diffusion.schedule import LOG_SNR_FLOOR

    schedule = NoiseSchedule()
    log_snr = 0.5 * torch.log(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
    assert log_snr[999] < LOG_SNR_FLOOR
    for steps in (10, 20):
        timesteps = schedule.log_snr_timesteps(999, steps)
        assert len(timesteps) == steps and timesteps[0] == 999 and timesteps[-1] == 0
        assert all(a > b for a, b in zip(timesteps, timesteps[1:]))
        above = [t for t in timesteps if log_snr[t] >= LOG_SNR_FLOOR]
        gaps = torch.diff(log_snr[above].double())  # integer timesteps near 0 lie up to 0.1 apart in lambda
        torch.testing.assert_close(gaps, torch.full_like(gaps, float(gaps.mean())), rtol=0.25, atol=0)
        below = len(timesteps) - len(above)
        assert 0 < below <= 0.25 * steps  # plain even spacing from lambda(999) would put ~40 % there
    assert schedule.log_snr_timesteps(999, 1) == [999]
    with pytest.raises(InputError, match="weight"):
        schedule.log_snr_timesteps(999, 10, weight=0.0)
    above = schedule.log_snr_timesteps(400, 6)  # starts above the floor: evenly spaced from the start
    assert above[0] == 400 and log_snr[400] > LOG_SNR_FLOOR
    gaps = torch.diff(log_snr[above].double())
    torch.testing.assert_close(gaps, torch.full_like(gaps, float(gaps.mean())), rtol=0.15, atol=0)


def test_dpm_solver_follows_the_probability_flow_of_gaussian_data_better_than_ddim():
    from MedDiffFMLib.device import make_generator, randn
    from MedDiffFMLib.diffusion.samplers import sample

    schedule, spread, shape = NoiseSchedule(), 0.3, (4000,)

    def exact_eps(x, t):
        a, s = schedule.abar(t) ** 0.5, (1 - schedule.abar(t)) ** 0.5
        return (x - a * (a * spread**2 / (a**2 * spread**2 + s**2)) * x) / s

    start = randn(shape, make_generator(7), torch.device("cpu"))
    a_top, s_top = schedule.abar(999) ** 0.5, (1 - schedule.abar(999)) ** 0.5
    expected = spread * start / (a_top**2 * spread**2 + s_top**2) ** 0.5
    errors, calls = {}, []

    def counted(x, t):
        calls.append(t)
        return exact_eps(x, t)

    for sampler in ("ddim", "dpm++2m"):
        calls.clear()
        result = sample(
            counted, schedule, shape, make_generator(7), torch.device("cpu"), sampler=sampler, steps=10, eta=0.0
        )
        errors[sampler] = (result - expected.clamp(-1, 1)).abs().max().item()
        assert len(calls) == 10
    assert errors["dpm++2m"] < 0.25 * errors["ddim"]
    assert errors["dpm++2m"] < 0.05
    # DPM-Solver++ converges: more steps, smaller error (second order: ~4x per doubling)
    previous = errors["dpm++2m"]
    for steps in (20, 40, 80):
        result = sample(exact_eps, schedule, shape, make_generator(7), torch.device("cpu"), "dpm++2m", steps)
        error = (result - expected.clamp(-1, 1)).abs().max().item()
        assert error < 0.5 * previous, (steps, error, previous)
        previous = error


def test_sampling_from_pure_noise_starts_where_the_clean_estimate_is_usable():
    from MedDiffFMLib.diffusion.samplers import sample

    for name, start in (("cosine", 978), ("linear_beta", 825)):
        schedule = NoiseSchedule(1000, name)
        snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
        assert schedule.sampling_start() == start and snr[start] >= 1e-3 > snr[start + 1]
    schedule = NoiseSchedule(1000, "cosine")
    for sampler in ("ddim", "dpm++2m", "ddpm"):
        seen: list[int] = []

        def predict(x, t, seen=seen):
            seen.append(t)
            return torch.zeros_like(x)

        sample(predict, schedule, (2, 2, 2), torch.Generator().manual_seed(0), torch.device("cpu"), sampler, steps=5)
        assert seen[0] == 978 and seen[-1] == 0, sampler
        assert len(seen) == (979 if sampler == "ddpm" else 5), sampler


def test_v_prediction_round_trips_to_the_noise_and_the_clean_image_and_starts_at_the_last_timestep():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.rand((3, 1, 4, 4, 4), generator=generator) * 2 - 1
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0, 500, 999])
    v_schedule, eps_schedule = NoiseSchedule(1000, "cosine", "v"), NoiseSchedule(1000, "cosine")
    assert torch.equal(eps_schedule.training_target(x0, noise, t), noise)
    target = v_schedule.training_target(x0, noise, t)
    for index, step in enumerate(t.tolist()):
        x_t = v_schedule.q_sample(x0[index], step, noise[index])
        eps = v_schedule.eps_from_output(x_t, step, target[index])
        torch.testing.assert_close(eps, noise[index], rtol=0, atol=1e-5)
        x0_hat = v_schedule.predict_x0(x_t, step, eps, clip=False)
        torch.testing.assert_close(x0_hat, x0[index], rtol=0, atol=5e-3 if step == 999 else 1e-5)
        assert torch.equal(eps_schedule.eps_from_output(x_t, step, target[index]), target[index])
    # at the last timestep (SNR 2.4e-9) v is the negated clean image: the network has nothing to amplify
    torch.testing.assert_close(target[2], -x0[2], rtol=0, atol=1e-3)
    assert v_schedule.sampling_start() == 999 and eps_schedule.sampling_start() == 978
    with pytest.raises(InputError, match="prediction"):
        NoiseSchedule(1000, "cosine", "x0")
    with pytest.raises(WeightsError, match="prediction"):
        ModelConfig(prediction="x0")
