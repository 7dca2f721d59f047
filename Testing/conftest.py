"""Shared fixtures: the bundled sample CT, tiny models and test-only networks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.model.config import preset
from MedDiffFMLib.model.weights import untrained_model
from MedDiffFMLib.tasks.engine import Engine
from MedDiffFMLib.volume import Volume, read_volume

DATA = Path(__file__).parent / "Data" / "totalsegmentator_example"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own empty model cache, the shipped catalogue, and no models shipped in the
    checkout (tests that want them say so)."""
    from MedDiffFMLib.model import weights

    monkeypatch.setenv("MEDDIFFFM_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("MEDDIFFFM_CATALOGUE", raising=False)
    monkeypatch.setattr(weights, "BUNDLED_DIR", tmp_path_factory.mktemp("no_shipped_models"))


@pytest.fixture(scope="session")
def sample_ct() -> Volume:
    return read_volume(DATA / "example_ct_sm.nii.gz")


@pytest.fixture(scope="session")
def sample_seg() -> Volume:
    return read_volume(DATA / "example_seg.nii.gz")


def crop(volume: Volume, z: slice, y: slice, x: slice) -> Volume:
    """A sub-volume with the geometry that keeps every voxel at its physical position."""
    geometry = volume.geometry
    start = np.array([x.start or 0, y.start or 0, z.start or 0, 1.0])
    origin = (geometry.index_to_physical() @ start)[:3]
    return Volume(volume.array[z, y, x].copy(), volume.spacing, tuple(origin), volume.direction)


@pytest.fixture(scope="session")
def small_ct(sample_ct) -> Volume:
    """A 16 x 40 x 48 crop through the liver of the sample CT (3 mm voxels)."""
    return crop(sample_ct, slice(8, 24), slice(30, 70), slice(10, 58))


@pytest.fixture(scope="session")
def small_seg(sample_seg) -> Volume:
    return crop(sample_seg, slice(8, 24), slice(30, 70), slice(10, 58))


def randomise_zero_parameters(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give MONAI's zero-initialised layers (output convolution, ControlNet zero convolutions) random
    weights, so that tests see a network whose output depends on its inputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.abs().max() == 0:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return module


def random_tiny_model(seed: int = 0) -> nn.Module:
    return randomise_zero_parameters(untrained_model("tiny", seed=seed), seed)


@pytest.fixture
def tiny_engine() -> Engine:
    return Engine(random_tiny_model(), device="cpu", batch_size=8)


class OracleNet(nn.Module):
    """Test network that knows the clean image: returns the exact noise of ``x_t`` w.r.t. it.

    It finds each voxel's clean value from the global position coordinates it is given, so it
    also checks that every window receives the right coordinates.
    """

    def __init__(self, clean: torch.Tensor, config_name: str = "tiny") -> None:
        super().__init__()
        self.config = preset(config_name)
        self.clean = clean.float()
        self.schedule = NoiseSchedule()

    def forward(self, x, t, coordinates, region, anatomy, control=None):
        shape = self.clean.shape
        index = [((coordinates[:, axis] + 1) / 2 * (n - 1)).round().long() for axis, n in zip((2, 1, 0), shape)]
        clean = self.clean[
            index[0].clamp(0, shape[0] - 1), index[1].clamp(0, shape[1] - 1), index[2].clamp(0, shape[2] - 1)
        ][:, None]
        abar = torch.tensor([self.schedule.abar(int(s)) for s in t], dtype=x.dtype).view(-1, 1, 1, 1, 1)
        return (x - abar.sqrt() * clean) / (1 - abar).sqrt()


class CoordinateNet(nn.Module):
    """Test network whose "noise estimate" is its x position coordinate."""

    def __init__(self, config_name: str = "tiny") -> None:
        super().__init__()
        self.config = preset(config_name)

    def forward(self, x, t, coordinates, region, anatomy, control=None):
        return coordinates[:, :1].clone()
