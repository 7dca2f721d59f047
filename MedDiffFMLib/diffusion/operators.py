"""Degradation operators for DiffPIR restoration.

:class:`ZSlabAverage` models thick-slice acquisition along the first (z) axis of a ``(D, H, W)``
tensor: every ``factor`` contiguous thin slices average into one thick slice, so ``D`` thin
slices give ``D / factor`` thick ones.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError


class ZSlabAverage:
    """``H``: average ``factor`` contiguous slices along z; with its adjoint and pseudo-inverse.

    * ``H x``: ``(D, H, W) -> (D / factor, H, W)``, mean of each slab.
    * ``H^T y``: each thick value divided by ``factor`` and copied to its slab (``<Hx, y> = <x, H^T y>``).
    * ``H^+ y``: each thick value copied to its slab (``H H^+ = I``), the "up-sampling" of the paper.
    * :meth:`interpolate`: cubic B-spline interpolation between slab centres, made consistent.
    """

    def __init__(self, factor: int) -> None:
        if factor < 1:
            raise InputError(f"The slab factor must be a positive integer, got {factor}.")
        self.factor = int(factor)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % self.factor:
            raise InputError(f"{x.shape[0]} slices do not split into slabs of {self.factor}.")
        return x.reshape(x.shape[0] // self.factor, self.factor, *x.shape[1:]).mean(dim=1)

    def pseudo_inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y.repeat_interleave(self.factor, dim=0)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.pseudo_inverse(y) / self.factor

    def data_step(self, x0: torch.Tensor, y0: torch.Tensor, rho: float) -> torch.Tensor:
        """DiffPIR data step ``x0 + H^+(y0 - H x0) / (1 + rho)`` (exact data consistency at rho = 0)."""
        return x0 + self.pseudo_inverse(y0 - self(x0)) / (1.0 + rho)

    def interpolate(self, y: torch.Tensor) -> torch.Tensor:
        """Thin slices ``(D * factor, H, W)`` from thick ``y (D, H, W)``: cubic B-spline along z
        through the slab centres (nearest-value padding beyond the first and last centre), then
        the exact data step, so that ``H`` of the result is ``y``."""
        thick = y.shape[0]
        centres = (np.arange(thick * self.factor) + 0.5) / self.factor - 0.5
        basis = np.stack(
            [ndimage.map_coordinates(np.eye(thick)[:, k], [centres], order=3, mode="nearest") for k in range(thick)],
            axis=1,
        )
        weights = torch.from_numpy(basis.astype(np.float64 if y.dtype == torch.float64 else np.float32)).to(y.device)
        thin = torch.tensordot(weights, y, dims=([1], [0]))
        return self.data_step(thin, y, 0.0)
