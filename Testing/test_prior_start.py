"""Synthesis from a label-painted prior (Docs/METHOD.md 1.1): the painting and the sampler's start."""

import numpy as np
import pytest
import torch

from MedDiffFMLib.diffusion.samplers import sample
from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.preprocessing import REGIONS
from MedDiffFMLib.tasks.synthesize import painted


def test_painted_maps_labels_air_and_unknown_to_the_window():
    window = REGIONS["abdomen"]
    labels = np.array([[[0, 5, 118, 7]]], dtype=np.uint8)
    image = painted(labels, {5: window.level, 118: window.low}, "abdomen")
    np.testing.assert_allclose(image[0, 0], [-1.0, 0.0, -1.0, 0.0])


def test_sampling_from_a_prior_starts_from_it_noised():
    schedule = NoiseSchedule()
    prior = torch.full((4, 4, 4), 0.5)
    seen = []

    def predict(x, t):
        seen.append(x.clone())
        return torch.zeros_like(x)

    sample(
        predict,
        schedule,
        (4, 4, 4),
        torch.Generator().manual_seed(0),
        torch.device("cpu"),
        sampler="ddim",
        steps=1,
        prior=prior,
        start=500,
    )
    noise = torch.randn((4, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen[0], schedule.q_sample(prior, 500, noise))
    with pytest.raises(InputError):
        sample(predict, schedule, (4, 4, 4), torch.Generator(), torch.device("cpu"), prior=torch.zeros(2, 2, 2))
