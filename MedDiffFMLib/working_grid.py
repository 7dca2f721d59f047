"""Between the user's grid and the model's: one object per task run (Docs/METHOD.md 1.3).

A :class:`WorkingGrid` pairs the grid of the user's volume (``source``: any spacing, orientation,
slice thickness) with the model's grid over it (``working``: isotropic at the model's spacing, or
a crop of it) for one region's HU window. Images go to the working grid linearly and into the
model's ``[-1, 1]`` scale; label maps and masks by nearest neighbour (points beyond the source's
last voxel centre take the nearest voxel's value); results come back to the source grid in HU, with
the voxels the model cannot represent carried over from the input unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from . import preprocessing as pp
from .volume import Geometry, Volume


@dataclass(frozen=True)
class WorkingGrid:
    """The user's grid ``source`` and the model's grid ``working`` for ``region``'s window.

    Arrays on either grid are indexed ``[z, y, x]`` (:class:`~MedDiffFMLib.volume.Volume`'s order).
    """

    source: Geometry
    working: Geometry
    region: str

    @classmethod
    def over(cls, source: Geometry, spacing_mm: float, region: str) -> WorkingGrid:
        """The isotropic ``spacing_mm`` grid over the extent of ``source`` (see ``isotropic_geometry``)."""
        pp.check_region(region)
        return cls(source, pp.isotropic_geometry(source, spacing_mm), region)

    def cropped(self, box: tuple[slice, slice, slice]) -> WorkingGrid:
        """The same grids with the working grid cut to ``box`` (indices of the working grid)."""
        return replace(self, working=self.working.subgrid(box))

    def image(self, hu: np.ndarray) -> np.ndarray:
        """A CT ``hu`` (HU, on ``source``) on the working grid in the model's scale (float32, [-1, 1])."""
        return pp.hu_to_model(
            pp.resample(Volume.on_geometry(np.asarray(hu), self.source), self.working).array, self.region
        )

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """A label map on ``source`` on the working grid (uint8, nearest neighbour)."""
        source = Volume.on_geometry(np.asarray(labels).astype(np.uint8), self.source)
        return pp.resample(source, self.working, labels=True, extrapolate=True).array.astype(np.uint8)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """A mask on ``source`` on the working grid (bool, nearest neighbour)."""
        return self.labels(np.asarray(mask) > 0) > 0

    def to_source(self, values: np.ndarray | torch.Tensor, target: Geometry | None = None) -> np.ndarray:
        """Values on the working grid resampled (linearly) to ``target`` (default: ``source``); float32."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        working = Volume.on_geometry(np.asarray(values, dtype=np.float32), self.working)
        return pp.resample(working, target or self.source).array.astype(np.float32)

    def hu(self, values: np.ndarray | torch.Tensor, target: Geometry | None = None) -> np.ndarray:
        """Model-scale values on the working grid as HU on ``target`` (default: ``source``); float32."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        return self.to_source(pp.model_to_hu(np.asarray(values), self.region), target)

    def restore(
        self,
        values: np.ndarray | torch.Tensor,
        ct: Volume,
        input_hu: np.ndarray,
        keep: np.ndarray | None = None,
        **metadata: str,
    ) -> Volume:
        """A model-scale result back to HU on the CT's grid (``source``), lossless outside the window.

        The voxels in ``keep`` (bool on ``source``; default: those whose input HU lies outside the
        window) are carried over from ``input_hu``; how many, and the window, go into the metadata.
        """
        merged, carried = pp.restore_outside_window(self.hu(values), input_hu, self.region, keep)
        window = pp.REGIONS[self.region]
        return ct.with_array(
            merged.astype(np.float32),
            MedDiffFM_region=self.region,
            MedDiffFM_carried_over_voxels=str(carried),
            MedDiffFM_note=(
                f"{carried} voxels outside the {self.region} window [{window.low:g}, {window.high:g}] HU were copied "
                "from the input unchanged."
            ),
            **metadata,
        )
