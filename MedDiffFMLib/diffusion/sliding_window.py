"""Whole-volume noise estimation with overlapping windows (Docs/METHOD.md 1.4).

At every timestep each window gets its own noise estimate, computed with that window's global
position coordinates and its crop of the conditions; the estimates are averaged over overlapping
voxels (weighted by a constant or Gaussian importance map) into one noise field for the whole
volume, so a single update is applied everywhere and no seams form. Windows are evaluated in
batches; coordinates and condition crops are built per batch, never for the whole volume.

Volumes smaller than a window along an axis get a window shrunk to the volume's size rounded up
to the network's size multiple, and are padded (reflect for the image, "outside body" for the
anatomy, edge values for the task condition) up to it; results are cropped back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices

from ..anatomy import UNKNOWN_LABEL
from ..errors import InputError, ResourceError
from ..model.embeddings import window_coordinates
from .schedule import NoiseSchedule

BLEND_MODES = ("gaussian", "constant")
logger = logging.getLogger(__name__)


@dataclass
class KnownVoxels:
    """Voxels whose clean value is known, so windows made only of them need no network call.

    Attributes:
        mask: ``(D, H, W)`` bool, True where the clean value is known (e.g. air outside the body).
        values: ``(D, H, W)`` clean values in [-1, 1] used there when no evaluated window covers a voxel.
        schedule: turns the known clean value into the noise estimate at each timestep.
    """

    mask: torch.Tensor
    values: torch.Tensor
    schedule: NoiseSchedule


@dataclass
class Conditions:
    """Conditions for a whole volume on the model's working grid.

    Attributes:
        region: region class index (0 null, 1 head & neck, 2 chest, 3 abdomen).
        anatomy: anatomy label map ``(D, H, W)`` (values 0..119) or None for "unknown everywhere".
        control: ControlNet task condition ``(C, D, H, W)`` or None.
    """

    region: int
    anatomy: torch.Tensor | None = None
    control: torch.Tensor | None = None


def window_size(shape: tuple[int, ...], patch_size: int, multiple: int) -> tuple[int, ...]:
    """Per-axis window: ``patch_size``, or the axis length rounded up to ``multiple`` if smaller."""
    return tuple(min(patch_size, -(-n // multiple) * multiple) for n in shape)


class WindowedNoisePredictor:
    """Callable ``(x_t (D, H, W), t) -> eps (D, H, W)`` over a whole volume.

    Args:
        model: a MedDiff-FM network, or anything called like one (e.g. its ``torch.compile``); see
            :mod:`..model.network` for its inputs.
        conditions: the conditions of the whole volume.
        shape: volume shape ``(D, H, W)``.
        patch_size: window edge in voxels (the model's training patch size).
        multiple: spatial sizes the network accepts are multiples of this.
        overlap: fraction of a window shared with its neighbour along each axis (0 <= overlap < 1).
        batch_size: windows per network call.
        blend: ``gaussian`` (weights fall off towards window borders) or ``constant``.
        device: where the network runs; volumes stay on this device too.
        frame: ``(offset, whole_shape)`` when the volume is a crop of a larger volume ``whole_shape``
            starting at voxel ``offset``: positions are then coordinates in the whole volume.
        autocast: run the network under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``
            on CUDA); estimates are accumulated in float32 either way.
        known: voxels of known clean value: windows holding only such voxels are skipped (counted in
            ``skipped_windows``), and voxels no evaluated window covers get the noise estimate that
            makes their x0 prediction exactly the known value.
        schedule: the network's noise schedule, for a network that predicts ``v``
            (``schedule.prediction``): the blended outputs are turned into the noise estimate. None:
            the network predicts the noise.
    """

    def __init__(
        self,
        model: Callable[..., torch.Tensor],
        conditions: Conditions,
        shape: tuple[int, int, int],
        patch_size: int,
        multiple: int,
        overlap: float = 0.5,
        batch_size: int = 4,
        blend: str = "gaussian",
        device: torch.device | str = "cpu",
        frame: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None,
        autocast: torch.dtype | None = None,
        known: KnownVoxels | None = None,
        schedule: NoiseSchedule | None = None,
    ) -> None:
        if not 0.0 <= overlap < 1.0:
            raise InputError(f"Window overlap must be in [0, 1), got {overlap}.")
        if blend not in BLEND_MODES:
            raise InputError(f"Unknown blend mode '{blend}'. Choose one of: {', '.join(BLEND_MODES)}.")
        if batch_size < 1:
            raise InputError(f"The window batch size must be at least 1, got {batch_size}.")
        self.model = model
        self.device = torch.device(device)
        self.shape = tuple(int(n) for n in shape)
        self.offset, self.frame_shape = frame if frame is not None else ((0, 0, 0), self.shape)
        self.autocast = autocast
        self.window = window_size(self.shape, patch_size, multiple)
        self.padded_shape = tuple(max(n, w) for n, w in zip(self.shape, self.window))
        self.batch_size = batch_size
        self.region = int(conditions.region)
        anatomy = conditions.anatomy
        if anatomy is None:
            anatomy = torch.full(self.shape, UNKNOWN_LABEL, dtype=torch.uint8)
        if tuple(anatomy.shape) != self.shape:
            raise InputError(f"Anatomy shape {tuple(anatomy.shape)} does not match the volume's {self.shape}.")
        self.anatomy = self._pad(anatomy.to(self.device, torch.uint8)[None].float(), "constant").to(torch.uint8)[0]
        self.control = None
        if conditions.control is not None:
            if tuple(conditions.control.shape[1:]) != self.shape:
                raise InputError("The task condition is not on the volume's grid.")
            self.control = self._pad(conditions.control.to(self.device, torch.float32), "replicate")
        interval = [max(1, int(w * (1.0 - overlap))) for w in self.window]
        self.windows: list[tuple[slice, ...]] = dense_patch_slices(self.padded_shape, self.window, interval)
        self.known = known
        self.schedule = schedule
        self.skipped_windows = 0
        if known is not None:
            skippable = self._pad(known.mask.to(self.device)[None].float(), "constant", value=1.0)[0] > 0
            kept = [w for w in self.windows if not bool(skippable[w].all())]
            self.skipped_windows = len(self.windows) - len(kept)
            self.windows = kept
            self.known_values = known.values.to(self.device, torch.float32)
        self.importance = compute_importance_map(self.window, mode=blend, device=self.device)
        total = torch.zeros(self.padded_shape, device=self.device)
        for window in self.windows:
            total[window] += self.importance
        self.covered = (total > 0)[: self.shape[0], : self.shape[1], : self.shape[2]]
        self.inverse_weight = torch.where(total > 0, 1.0 / total.clamp_min(1e-30), torch.zeros_like(total))
        self.evaluations = 0

    def _pad(self, volume: torch.Tensor, mode: str, value: float = 0.0) -> torch.Tensor:
        """Pad a ``(C, D, H, W)`` tensor at the far end of each axis up to ``padded_shape``."""
        pads = [p - n for n, p in zip(self.shape, self.padded_shape)]
        if not any(pads):
            return volume
        if mode == "reflect" and any(p >= n for n, p in zip(self.shape, pads)):
            mode = "replicate"
        padding = (0, pads[2], 0, pads[1], 0, pads[0])
        if mode == "constant":
            return F.pad(volume[None], padding, mode=mode, value=value)[0]
        return F.pad(volume[None], padding, mode=mode)[0]

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            raise InputError(f"Volume shape {tuple(x.shape)} does not match the predictor's {self.shape}.")
        padded = self._pad(x[None].to(self.device, torch.float32), "reflect")[0]
        accumulated = torch.zeros(self.padded_shape, device=self.device)
        first = 0
        while first < len(self.windows):
            batch = self.windows[first : first + self.batch_size]
            try:
                eps = self._evaluate(padded, batch, t)
            except torch.OutOfMemoryError:
                self._shrink_batch()
                continue
            for window, estimate in zip(batch, eps):
                accumulated[window] += estimate[0] * self.importance
            first += len(batch)
        eps = accumulated.mul_(self.inverse_weight)[: self.shape[0], : self.shape[1], : self.shape[2]]
        x = x.to(self.device, torch.float32)
        if self.schedule is not None:
            eps = self.schedule.eps_from_output(x, t, eps)
        if self.known is not None and not bool(self.covered.all()):
            fallback = self.known.schedule.predict_eps(x, t, self.known_values)
            eps = torch.where(self.covered, eps, fallback.to(eps.dtype))
        return eps

    def _shrink_batch(self) -> None:
        """Halve the window batch after an out-of-memory error; at one window, give up with advice."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size == 1:
            raise ResourceError(
                f"Out of memory on {self.device} even with one {'x'.join(map(str, self.window))} window per call. "
                "Close other programs using the device, or run on the CPU (device 'cpu')."
            )
        self.batch_size = max(1, self.batch_size // 2)
        logger.warning("Out of memory: continuing with %d windows per network call.", self.batch_size)

    def coordinates(self, window: tuple[slice, ...]) -> torch.Tensor:
        """Global position coordinates ``(3, d, h, w)`` of a window of this (possibly cropped) volume."""
        shifted = [slice(s.start + o, s.stop + o) for s, o in zip(window, self.offset)]
        return window_coordinates(shifted, self.frame_shape)

    def _evaluate(self, padded: torch.Tensor, batch: list[tuple[slice, ...]], t: int) -> torch.Tensor:
        """Network noise estimates ``(B, 1, d, h, w)`` for a batch of windows."""
        size = len(batch)
        x = torch.stack([padded[w] for w in batch])[:, None]
        coordinates = torch.stack([self.coordinates(w) for w in batch]).to(self.device)
        anatomy = torch.stack([self.anatomy[w] for w in batch])
        control = None
        if self.control is not None:
            control = torch.stack([self.control[(slice(None), *w)] for w in batch])
        timesteps = torch.full((size,), int(t), dtype=torch.long, device=self.device)
        region = torch.full((size,), self.region, dtype=torch.long, device=self.device)
        self.evaluations += size
        extra = {} if control is None else {"control": control}
        if self.autocast is None:
            return self.model(x, timesteps, coordinates, region, anatomy, **extra)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.model(x, timesteps, coordinates, region, anatomy, **extra).float()
