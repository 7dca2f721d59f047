"""Training checkpoints, written and read without pickle.

A checkpoint is a folder ``checkpoint/`` holding ``model.safetensors``, ``ema.safetensors``,
``optimizer.safetensors`` (every per-parameter optimiser tensor) with ``optimizer.json`` (the rest
of the optimiser state: hyper-parameters, parameter groups) and ``state.json`` (step, epoch,
position in the epoch, elapsed time). It is written to ``checkpoint.part/`` and swapped in by
renames; if a crash falls between them, the previous checkpoint is still found as
``checkpoint.old/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT = "checkpoint"


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().contiguous() for key, value in module.state_dict().items()}


def split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimiser ``state_dict`` as (tensors keyed ``"<param>.<name>"``, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of :func:`split_optimizer_state`."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def save_training_state(
    folder: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, state: dict
) -> Path:
    """Write a resumable checkpoint into ``folder/checkpoint``."""
    target, temporary, previous = folder / CHECKPOINT, folder / f"{CHECKPOINT}.part", folder / f"{CHECKPOINT}.old"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    save_file(_tensors(model), temporary / "model.safetensors")
    if ema is not None:
        save_file(_tensors(ema), temporary / "ema.safetensors")
    tensors, rest = split_optimizer_state(optimizer.state_dict())
    save_file(tensors, temporary / "optimizer.safetensors")
    (temporary / "optimizer.json").write_text(json.dumps(rest))
    (temporary / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(previous, ignore_errors=True)
    if target.exists():
        target.rename(previous)
    temporary.rename(target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def load_training_state(
    folder: Path, model: nn.Module, ema: nn.Module | None, optimizer: torch.optim.Optimizer, device: torch.device
) -> dict | None:
    """Restore the newest complete checkpoint of ``folder`` if there is one; returns its state or None."""
    source = next(
        (folder / name for name in (CHECKPOINT, f"{CHECKPOINT}.old") if (folder / name / "state.json").exists()), None
    )
    if source is None:
        return None
    model.load_state_dict(load_file(source / "model.safetensors", device=str(device)))
    if ema is not None:
        ema.load_state_dict(load_file(source / "ema.safetensors", device=str(device)))
    rest = json.loads((source / "optimizer.json").read_text())
    optimizer.load_state_dict(
        join_optimizer_state(load_file(source / "optimizer.safetensors", device=str(device)), rest)
    )
    return json.loads((source / "state.json").read_text())
