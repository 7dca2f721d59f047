"""Multi-level training samples (Docs/METHOD.md 1.2) from a prepared cache.

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


def manifest_entries(folder: Path, case_weights: dict[str, int] | None = None) -> list[dict]:
    """Region crops of a prepared cache (absolute paths, ``case``: the case name), in a stable order.

    ``case_weights`` lists a case's crops that many times in a row (default once), so that an epoch
    samples it proportionally more often; a name the cache does not hold is an error.
    """
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise InputError(f"No manifest.json in '{folder}'. Run 'python -m Training.prepare_data' first.")
    manifest = json.loads(path.read_text())
    done = sorted(name for name, case in manifest["cases"].items() if case["status"] == "done")
    weights = dict(case_weights or {})
    unknown = sorted(set(weights) - set(done))
    if unknown:
        raise InputError(
            f"case_weights names {', '.join(unknown)}, which the cache '{folder}' does not hold; "
            f"its cases are: {', '.join(done)}."
        )
    entries = [
        {
            **entry,
            "case": name,
            **{key: str(Path(folder) / entry[key]) for key in ("image", "anatomy", "condition") if key in entry},
        }
        for name in done
        for entry in manifest["cases"][name]["regions"]
        for _ in range(weights.get(name, 1))
    ]
    if not entries:
        raise InputError(f"The cache '{folder}' holds no prepared case.")
    return entries


def read_array(path: str | Path) -> np.ndarray:
    """The voxel array ``(D, H, W)`` of a cache file: a NumPy ``.npy`` file (an unpacked
    :mod:`Training.pack_data` cache, read without SimpleITK) or any image :func:`read_volume` reads."""
    return np.load(path) if str(path).endswith(".npy") else read_volume(path).array


def load_entry(entry: dict) -> dict[str, torch.Tensor]:
    """A region crop's tensors ``(D, H, W)``, cached per process: ``image`` (float32, [-1, 1]),
    ``anatomy`` (uint8) and, for fine-tuning data, ``condition`` (float32: windowed like the image
    for ``condition_kind == "image"``, 0/1 for ``"mask"``)."""
    return _load(
        entry["image"], entry["anatomy"], entry["region"], entry.get("condition"), entry.get("condition_kind", "image")
    )


@functools.lru_cache(maxsize=32)
def _load(image: str, anatomy: str, region: str, condition: str | None, kind: str) -> dict[str, torch.Tensor]:
    tensors = {
        "image": torch.from_numpy(hu_to_model(read_array(image), region)),
        "anatomy": torch.from_numpy(read_array(anatomy).astype(np.uint8)),
    }
    if condition is not None:
        values = read_array(condition)
        scaled = hu_to_model(values, region) if kind == "image" else (values > 0).astype(np.float32)
        tensors["condition"] = torch.from_numpy(scaled)
    return tensors


@functools.lru_cache(maxsize=32)
def _body_voxels(anatomy: str, stride: int = 4) -> np.ndarray:
    """``[z, y, x]`` indices ``(K, 3)`` of every ``stride``-th voxel per axis inside the body (label > 0)."""
    labels = read_array(anatomy)[::stride, ::stride, ::stride]
    return np.argwhere(labels > 0) * stride


@functools.lru_cache(maxsize=64)
def _mask_voxels(mask: str) -> np.ndarray:
    """``[z, y, x]`` indices ``(K, 3)`` of every voxel inside a 0/1 mask (lesions are small)."""
    return np.argwhere(read_array(mask) > 0)


def _random_voxel(voxels: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """One row of ``voxels (K, 3)`` drawn uniformly, or None when there is none."""
    return voxels[int(rng.integers(len(voxels)))] if len(voxels) else None


def _nearest(key: str, kind: str) -> bool:
    """Whether a tensor is resized by nearest neighbour (labels, masks) rather than linearly."""
    return key == "anatomy" or (key == "condition" and kind == "mask")


def _frame_coordinates(
    window: tuple[slice, ...], frame: tuple[slice, ...], size: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Coordinates ``(3, ...)`` of ``window`` (resampled to ``size``) in a scan whose extent is the
    sub-box ``frame`` (both ``[z, y, x]`` slices of the crop)."""
    shifted = tuple(slice(s.start - f.start, s.stop - f.start) for s, f in zip(window, frame))
    return window_coordinates(shifted, [f.stop - f.start for f in frame], size)


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
        foreground: chance that a patch (levels 1 and 2) is centred on a random voxel inside the
            body (anatomy label > 0) rather than placed uniformly, so fewer patches are all air.
        condition_focus: chance that a patch (levels 1 and 2) of a crop with a mask condition is
            centred on a voxel of that mask (checked first; crops with an empty mask fall through).
        position_jitter: ``j``: each sample's coordinates ``c`` become ``c * (1 + s) + o`` with
            ``s`` and ``o`` drawn per axis from ``U(-j, j)``, as if the scan covered a shifted,
            stretched extent (every scan's coordinates span its own field of view). With few training
            scans the exact position alone identifies the anatomy, and the model learns to ignore
            the label map that synthesis relies on.
        field_of_view_crop: chance that a sample's coordinates are taken relative to a random
            sub-box of the crop that contains the sample (per axis, its start drawn uniformly up to
            the sample's start, its end from the sample's end), as if the scan had covered only that
            field of view. Users' scans cover anything from a few slices to a whole trunk, and the
            coordinates span each scan's own extent.
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
        foreground: float = 0.0,
        condition_focus: float = 0.0,
        position_jitter: float = 0.0,
        field_of_view_crop: float = 0.0,
    ) -> None:
        self.entries = entries
        self.patch = patch_size
        self.levels = np.asarray(level_probabilities, dtype=np.float64)
        self.region_dropout = region_dropout
        self.anatomy_dropout = anatomy_dropout
        self.samples_per_volume = samples_per_volume
        self.seed = seed
        self.foreground = foreground
        self.condition_focus = condition_focus
        self.position_jitter = position_jitter
        self.field_of_view_crop = field_of_view_crop
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries) * self.samples_per_volume

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        entry = self.entries[index % len(self.entries)]
        level = int(rng.choice(3, p=self.levels))
        volumes = load_entry(entry)
        centre = None
        kind = entry.get("condition_kind", "image")
        if level > 0 and kind == "mask" and self.condition_focus > 0 and rng.random() < self.condition_focus:
            centre = _random_voxel(_mask_voxels(entry["condition"]), rng)
        if centre is None and level > 0 and self.foreground > 0 and rng.random() < self.foreground:
            centre = _random_voxel(_body_voxels(entry["anatomy"]), rng)
        sample = self.view(volumes, level, rng, kind, centre)
        if self.position_jitter > 0:
            scale, offset = torch.from_numpy(rng.uniform(-self.position_jitter, self.position_jitter, (2, 3, 1, 1, 1)))
            sample["coordinates"] = sample["coordinates"] * (1.0 + scale.float()) + offset.float()
        region = 0 if rng.random() < self.region_dropout else REGION_CLASS[entry["region"]]
        if rng.random() < self.anatomy_dropout:
            sample["anatomy"] = torch.full_like(sample["anatomy"], UNKNOWN_LABEL)
        sample["region"] = torch.tensor(region, dtype=torch.long)
        return sample

    def view(
        self,
        volumes: dict[str, torch.Tensor],
        level: int,
        rng: np.random.Generator,
        kind: str = "image",
        centre: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """One multi-level view (0 image level, 1 coarse patch, 2 fine patch) of a region crop.

        ``volumes`` maps names to ``(D, H, W)`` tensors of one crop; image-like tensors come back as
        ``(1, P, P, P)``, the anatomy as ``(P, P, P)``, plus ``coordinates (3, P, P, P)``. A patch
        is placed uniformly, or around the voxel ``centre`` (``[z, y, x]``) when given.
        """
        shape = tuple(volumes["image"].shape)
        extent = [n if level == 0 else min(n, self.patch * (2 if level == 1 else 1)) for n in shape]
        if centre is None:
            starts = [int(rng.integers(0, n - e + 1)) for n, e in zip(shape, extent)]
        else:
            starts = [int(np.clip(c - e // 2, 0, n - e)) for c, n, e in zip(centre, shape, extent)]
        window = tuple(slice(s, s + e) for s, e in zip(starts, extent))
        frame = self._field_of_view(window, shape, rng)
        if level == 2:
            return self._fine_patch(volumes, window, kind, frame)
        size = (self.patch,) * 3
        index = [_index_grid(s.start, s.stop, self.patch) for s in window]
        sample = {"coordinates": _frame_coordinates(window, frame, size)}
        for key, volume in volumes.items():
            if _nearest(key, kind):
                picked = volume[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
                sample[key] = picked if key == "anatomy" else picked[None]
            else:
                sample[key] = F.interpolate(
                    volume[window][None, None], size=size, mode="trilinear", align_corners=True
                )[0]
        return sample

    def _field_of_view(
        self, window: tuple[slice, ...], shape: tuple[int, ...], rng: np.random.Generator
    ) -> tuple[slice, ...]:
        """The extent ``[z, y, x]`` the sample's coordinates span: the whole crop, or with chance
        ``field_of_view_crop`` a random sub-box of it containing ``window``."""
        if self.field_of_view_crop <= 0 or rng.random() >= self.field_of_view_crop:
            return tuple(slice(0, n) for n in shape)
        return tuple(
            slice(int(rng.integers(0, s.start + 1)), int(rng.integers(s.stop, n + 1))) for s, n in zip(window, shape)
        )

    def _fine_patch(
        self, volumes: dict[str, torch.Tensor], window: tuple[slice, ...], kind: str, frame: tuple[slice, ...]
    ) -> dict:
        pads = [self.patch - (s.stop - s.start) for s in window]
        padding = (0, pads[2], 0, pads[1], 0, pads[0])
        full = tuple(slice(s.start, s.start + self.patch) for s in window)
        sample = {"coordinates": _frame_coordinates(full, frame)}
        for key, volume in volumes.items():
            air = 0 if _nearest(key, kind) else -1.0
            crop = F.pad(volume[window], padding, value=air)
            sample[key] = crop if key == "anatomy" else crop[None]
        return sample
