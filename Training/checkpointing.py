"""Training checkpoints: weights in safetensors, optimiser state loaded with ``weights_only=True``.

A checkpoint is a folder ``checkpoint/`` holding ``model.safetensors``, ``ema.safetensors``,
``optimizer.pt`` and ``state.json`` (step, epoch, position in the epoch, elapsed time). It is
written to ``checkpoint.part/`` and renamed over the previous one, so a crash never leaves a
half-written checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT = "checkpoint"


def save_training_state(
    folder: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write a resumable checkpoint into ``folder/checkpoint``."""
    target, temporary = folder / CHECKPOINT, folder / f"{CHECKPOINT}.part"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, temporary / "model.safetensors"
    )
    if ema is not None:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, temporary / "ema.safetensors"
        )
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    (temporary / "state.json").write_text(json.dumps(state, indent=2))
    previous = folder / f"{CHECKPOINT}.old"
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    temporary.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def load_training_state(
    folder: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict | None:
    """Restore a checkpoint from ``folder/checkpoint`` if there is one; returns its state or None."""
    source = folder / CHECKPOINT
    if not (source / "state.json").exists():
        return None
    model.load_state_dict(load_file(source / "model.safetensors", device=str(device)))
    if ema is not None:
        ema.load_state_dict(load_file(source / "ema.safetensors", device=str(device)))
    optimizer.load_state_dict(torch.load(source / "optimizer.pt", map_location=device, weights_only=True))
    return json.loads((source / "state.json").read_text())
