"""Preview images written during training: what the model makes of a noised training sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from MedDiffFMLib.diffusion.schedule import NoiseSchedule
from MedDiffFMLib.preprocessing import REGION_CLASS

from .dataset import MultiLevelDataset, load_entry

PREVIEW_TIMESTEP = 300


@torch.no_grad()
def save_preview(
    model: nn.Module,
    dataset: MultiLevelDataset,
    schedule: NoiseSchedule,
    output: Path,
    step: int,
    device: torch.device,
) -> Path:
    """PNG of the middle slice of [clean | noised to t=300 | one-step x0 prediction] of the first
    training volume at image level."""
    entry = dataset.entries[0]
    sample = dataset.view(load_entry(entry), level=0, rng=np.random.default_rng(0))
    x0 = sample["image"][None].to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)).to(device)
    x_t = schedule.q_sample(x0, PREVIEW_TIMESTEP, noise)
    was_training = model.training
    model.eval()
    extra = {"control": sample["condition"][None].to(device)} if "condition" in sample else {}
    estimate = model(
        x_t,
        torch.tensor([PREVIEW_TIMESTEP], device=device),
        sample["coordinates"][None].to(device),
        torch.tensor([REGION_CLASS[entry["region"]]], device=device),
        sample["anatomy"][None].to(device),
        **extra,
    )
    model.train(was_training)
    prediction = schedule.predict_x0(x_t, PREVIEW_TIMESTEP, schedule.eps_from_output(x_t, PREVIEW_TIMESTEP, estimate))
    middle = x0.shape[2] // 2
    panels = [
        ((v[0, 0, middle].float().cpu().numpy().clip(-1, 1) + 1) * 127.5).astype(np.uint8)
        for v in (x0, x_t, prediction)
    ]
    folder = output / "previews"
    folder.mkdir(exist_ok=True)
    path = folder / f"step{step:07d}.png"
    Image.fromarray(np.concatenate(panels, axis=1)).resize((3 * 192, 192)).save(path)
    return path
