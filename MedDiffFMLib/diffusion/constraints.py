"""Constraints on a sampled image.

:class:`StructureMedians` sets chosen structures of a label map to given median intensities: each
structure is shifted by one value, so the texture inside it, and every other voxel, stay as the
network made them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import InputError


class StructureMedians:
    """Callable ``x0 -> x0``: each structure shifted so that its median is its target.

    A median, not a mean: the typical HU a model card holds and a user asks for are medians, and a
    median ignores the few bright or dark voxels of a synthetic texture. Clipping to [-1, 1] after
    the shift keeps the median (clipping is monotone) unless the target is at a bound.

    Args:
        labels: integer label map of the sample's shape (any leading dimensions).
        targets: ``{label value: median}`` in the model's [-1, 1] scale; values outside it are
            clipped (a structure cannot be brighter than the window's top). Label values absent
            from ``labels`` are ignored.
    """

    def __init__(self, labels: torch.Tensor, targets: Mapping[int, float]) -> None:
        self.shape = tuple(labels.shape)
        self.structures = []
        for value, median in sorted(targets.items()):
            index = (labels == int(value)).flatten().nonzero().squeeze(1)
            if index.numel():
                self.structures.append((index, min(max(float(median), -1.0), 1.0)))

    def __call__(self, x0: torch.Tensor) -> torch.Tensor:
        if tuple(x0.shape) != self.shape:
            raise InputError(f"The estimate's shape {tuple(x0.shape)} differs from the label map's {self.shape}.")
        if not self.structures:
            return x0
        flat = x0.flatten().clone()
        for index, median in self.structures:
            index = index.to(flat.device)
            values = flat[index]
            flat[index] = (values + (median - values.median())).clamp(-1.0, 1.0)
        return flat.view(x0.shape)
