"""Position and anatomy embeddings (Docs/METHOD.md 1.2).

Global position coordinates: the voxel at index ``n`` of an axis with ``N`` voxels in the whole
volume has coordinate ``-1 + 2 n / (N - 1)`` (``0`` when ``N == 1``), so the first voxel is at
-1 and the last at +1. Coordinate channels are ordered ``(x, y, z)``, i.e. the array axes
``(2, 1, 0)`` of a ``[z, y, x]`` volume. A window or crop gets the coordinates of its voxels in
the whole volume, computed on the fly; nothing is materialised for the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..anatomy import NUM_ANATOMY_VALUES


def axis_coordinates(start: float, stop: float, samples: int, length: int) -> torch.Tensor:
    """Global coordinates of ``samples`` points spread evenly from voxel ``start`` to ``stop - 1``.

    ``length`` is the size of the whole axis. With ``samples == stop - start`` these are exactly
    the coordinates of voxels ``start..stop-1``; with fewer samples they describe a crop resized
    to ``samples`` voxels (the multi-level inputs of training).
    """
    scale = 2.0 / (length - 1) if length > 1 else 0.0
    first = -1.0 + start * scale if length > 1 else 0.0
    last = -1.0 + (stop - 1) * scale if length > 1 else 0.0
    return torch.linspace(first, last, samples, dtype=torch.float32)


def window_coordinates(
    window: Sequence[slice], volume_shape: Sequence[int], size: Sequence[int] | None = None
) -> torch.Tensor:
    """Coordinates ``(3, d, h, w)`` (channels x, y, z) of a window ``[z, y, x]`` slices of a volume.

    ``size`` (default: the window's own size) resamples the window to another voxel count.
    """
    size = size or [s.stop - s.start for s in window]
    z, y, x = (axis_coordinates(s.start, s.stop, n, length) for s, n, length in zip(window, size, volume_shape))
    grid_z, grid_y, grid_x = torch.meshgrid(z, y, x, indexing="ij")
    return torch.stack((grid_x, grid_y, grid_z))


def fourier_features(coordinates: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Fourier features of coordinates: ``(N, 3, ...)`` -> ``(N, 6 L, ...)``.

    For each coordinate p: ``sin(2^0 pi p), cos(2^0 pi p), ..., sin(2^(L-1) pi p), cos(2^(L-1) pi p)``.
    """
    bands = [2.0**level * math.pi * coordinates for level in range(frequencies)]
    return torch.cat([f(b) for b in bands for f in (torch.sin, torch.cos)], dim=1)


class AnatomyEmbedding(nn.Module):
    """Learned embedding of an anatomy label map: ``(N, D, H, W)`` int -> ``(N, C, D, H, W)`` float.

    Replaces a 118-channel one-hot (1 GB at 128^3) by ``C`` channels per voxel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(NUM_ANATOMY_VALUES, channels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding(labels.long()).movedim(-1, 1)
