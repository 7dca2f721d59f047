"""Multi-level training samples (DESIGN.md 1.2) from a prepared cache.

Each sample is one of three views of a region crop, chosen with ``level_probabilities``:

1. image level: the whole region resized to the patch (coordinates span [-1, 1]),
2. coarse patch level: a random crop of twice the patch size, resized to the patch,
3. fine patch level: a random crop of the patch size (volumes smaller than the patch are padded at
   the far end with air / "outside body", their coordinates extrapolated as at inference).

Every view carries the global position coordinates of its voxels in the whole region. Randomness
comes from ``numpy.random.default_rng([seed, epoch, index])``, so the data of a given step are the
same whenever it runs (resume reproduces the data order).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from MedDiffFMLib.anatomy import UNKNOWN_LABEL
from MedDiffFMLib.errors import InputError
from MedDiffFMLib.model.embeddings import window_coordinates
from MedDiffFMLib.preprocessing import REGION_CLASS, hu_to_model
from MedDiffFMLib.volume import read_volume


def manifest_entries(folder: Path) -> list[dict]:
    """Region crops of a prepared cache (absolute paths), in a stable order."""
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise InputError(f"No manifest.json in '{folder}'. Run 'python -m Training.prepare_data' first.")
    manifest = json.loads(path.read_text())
    entries = [
        {**entry, "image": str(Path(folder) / entry["image"]), "anatomy": str(Path(folder) / entry["anatomy"])}
        for name in sorted(manifest["cases"])
        if manifest["cases"][name]["status"] == "done"
        for entry in manifest["cases"][name]["regions"]
    ]
    if not entries:
        raise InputError(f"The cache '{folder}' holds no prepared case.")
    return entries


def load_entry(entry: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A region crop as ``(image [-1, 1] float32 (D, H, W), anatomy uint8 (D, H, W))``, cached per process."""
    return _load(entry["image"], entry["anatomy"], entry["region"])


@functools.lru_cache(maxsize=32)
def _load(image: str, anatomy: str, region: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(hu_to_model(read_volume(image).array, region)),
        torch.from_numpy(read_volume(anatomy).array.astype(np.uint8)),
    )


def _index_grid(start: int, stop: int, size: int) -> torch.Tensor:
    """Nearest voxel indices of ``size`` points spread evenly over ``start..stop-1``."""
    return torch.linspace(start, stop - 1, size).round().long()


class MultiLevelDataset(Dataset):
    """Samples: ``image (1, P, P, P)``, ``coordinates (3, P, P, P)``, ``anatomy (P, P, P)``, ``region ()``.

    Args:
        entries: region crops from :func:`manifest_entries`.
        patch_size: P.
        level_probabilities: chances of image level, coarse patch level, fine patch level.
        region_dropout / anatomy_dropout: chances of the null region / unknown anatomy.
        samples_per_volume: how many samples of each crop one epoch holds.
        seed: base seed of all randomness.
    """

    def __init__(
        self,
        entries: list[dict],
        patch_size: int,
        level_probabilities: tuple[float, float, float] = (0.2, 0.3, 0.5),
        region_dropout: float = 0.0,
        anatomy_dropout: float = 0.0,
        samples_per_volume: int = 16,
        seed: int = 0,
    ) -> None:
        self.entries = entries
        self.patch = patch_size
        self.levels = np.asarray(level_probabilities, dtype=np.float64)
        self.region_dropout = region_dropout
        self.anatomy_dropout = anatomy_dropout
        self.samples_per_volume = samples_per_volume
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        entry = self.entries[index % len(self.entries)]
        image, anatomy = load_entry(entry)
        level = int(rng.choice(3, p=self.levels))
        sample = self.view(image, anatomy, level, rng)
        region = 0 if rng.random() < self.region_dropout else REGION_CLASS[entry["region"]]
        if rng.random() < self.anatomy_dropout:
            sample["anatomy"] = torch.full_like(sample["anatomy"], UNKNOWN_LABEL)
        sample["region"] = torch.tensor(region, dtype=torch.long)
        return sample

    def view(self, image: torch.Tensor, anatomy: torch.Tensor, level: int, rng: np.random.Generator) -> dict:
        """One multi-level view (0 image level, 1 coarse patch, 2 fine patch) of a region crop."""
        shape = tuple(image.shape)
        extent = [n if level == 0 else min(n, self.patch * (2 if level == 1 else 1)) for n in shape]
        starts = [int(rng.integers(0, n - e + 1)) for n, e in zip(shape, extent)]
        window = tuple(slice(s, s + e) for s, e in zip(starts, extent))
        if level == 2:
            return self._fine_patch(image, anatomy, window)
        size = (self.patch,) * 3
        crop = image[window][None, None]
        resized = F.interpolate(crop, size=size, mode="trilinear", align_corners=True)[0]
        index = [_index_grid(s.start, s.stop, self.patch) for s in window]
        labels = anatomy[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
        return dict(image=resized, coordinates=window_coordinates(window, shape, size), anatomy=labels)

    def _fine_patch(self, image: torch.Tensor, anatomy: torch.Tensor, window: tuple[slice, ...]) -> dict:
        pads = [self.patch - (s.stop - s.start) for s in window]
        padding = (0, pads[2], 0, pads[1], 0, pads[0])
        crop = F.pad(image[window], padding, value=-1.0)
        labels = F.pad(anatomy[window], padding, value=0)
        full = tuple(slice(s.start, s.start + self.patch) for s in window)
        return dict(image=crop[None], coordinates=window_coordinates(full, tuple(image.shape)), anatomy=labels)
