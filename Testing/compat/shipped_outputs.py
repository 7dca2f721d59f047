"""Outputs of the shipped demo models on a fixed input, with whatever MONAI is first on sys.path.

    python Testing/compat/shipped_outputs.py OUT.npz

``Testing/test_compat.py`` runs it with the MONAI of this environment and with the oldest MONAI
that a supported Slicer can install, and compares: the weights, trained with one MONAI, must load
into the other's networks (same parameter names and shapes) and give the same outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import monai
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from MedDiffFMLib.model import load_controlled_model, load_model  # noqa: E402
from MedDiffFMLib.model.embeddings import window_coordinates  # noqa: E402


def main(output: str) -> int:
    torch.manual_seed(0)
    base = load_model(ROOT / "models" / "meddiff-fm-demo-0.1.safetensors")
    size = base.config.patch_size
    x = torch.randn(1, 1, size, size, size)
    t = torch.tensor([500])
    coordinates = window_coordinates([slice(0, size)] * 3, [size] * 3)[None]
    region = torch.tensor([3])
    anatomy = torch.randint(0, 119, (1, size, size, size))
    outputs = {"monai": np.array(monai.__version__)}
    with torch.no_grad():
        outputs["base"] = base(x, t, coordinates, region, anatomy).numpy()
        for task in ("sr", "lesion"):
            controlled = load_controlled_model(
                base, ROOT / "models" / f"meddiff-fm-demo-{task}-0.1.safetensors", f"controlnet-{task}"
            )
            control = torch.rand(1, base.config.control_channels, size, size, size)
            outputs[task] = controlled(x, t, coordinates, region, anatomy, control).numpy()
    np.savez(output, **outputs)
    print("MONAI", monai.__version__, "outputs", {k: v.shape for k, v in outputs.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
