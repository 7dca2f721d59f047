"""Constraints on a sampled image.

:func:`shift_to_medians` sets chosen structures of a label map to given median intensities: each
structure is shifted by one value, so the texture inside it, and every other voxel, stay as the
network made them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import InputError


def shift_to_medians(image: torch.Tensor, labels: torch.Tensor, targets: Mapping[int, float]) -> torch.Tensor:
    """``image`` (model scale, [-1, 1]) with each labelled structure shifted so that its median is
    its target; returns a new tensor of ``image``'s shape, every other voxel unchanged.

    A median, not a mean: the typical HU a model card holds and a user asks for are medians, and a
    median ignores the few bright or dark voxels of a synthetic texture. Clipping to [-1, 1] after
    the shift keeps the median (clipping is monotone) unless the target is at a bound.

    Args:
        image: the sample, any shape.
        labels: integer label map of ``image``'s shape.
        targets: ``{label value: median}`` in the model's [-1, 1] scale; values outside it are
            clipped (a structure cannot be brighter than the window's top). Label values absent
            from ``labels`` are ignored.
    """
    if tuple(labels.shape) != tuple(image.shape):
        raise InputError(f"The label map's shape {tuple(labels.shape)} differs from the image's {tuple(image.shape)}.")
    labels = labels.to(image.device)
    shifted = image.clone()
    for value, median in targets.items():
        inside = labels == int(value)
        if inside.any():
            values = image[inside]
            shifted[inside] = (values + (min(max(float(median), -1.0), 1.0) - values.median())).clamp(-1.0, 1.0)
    return shifted
