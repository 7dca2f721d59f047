"""PNG comparison figures (axial slices side by side, CT window, captions)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from .preprocessing import Window
from .volume import Volume, default_file_mode


def comparison_png(
    volumes: Sequence[Volume],
    captions: Sequence[str],
    window: Window,
    path: str | os.PathLike,
    slice_index: int | None = None,
) -> None:
    """Write the same axial slice of each volume side by side, in ``window``, with captions above.

    Volumes are first reoriented to LPS so slices show in the radiological convention (anterior up,
    patient's right on the left); pixels keep their physical aspect ratio.
    """
    oriented = [Volume.from_sitk(sitk.DICOMOrient(volume.to_sitk(), "LPS")) for volume in volumes]
    index = oriented[0].array.shape[0] // 2 if slice_index is None else slice_index
    panels = []
    for volume in oriented:
        data = np.asarray(volume.array[index], dtype=np.float64)
        grey = np.clip((data - window.low) / window.width, 0.0, 1.0) * 255.0
        panel = Image.fromarray(grey.astype(np.uint8))
        aspect = volume.spacing[1] / volume.spacing[0]
        width = 256
        panels.append(panel.resize((width, max(1, round(width * data.shape[0] / data.shape[1] * aspect)))))
    caption_height = 20
    height = max(p.height for p in panels) + caption_height
    figure = Image.new("L", (sum(p.width for p in panels), height), color=0)
    draw = ImageDraw.Draw(figure)
    x = 0
    for panel, caption in zip(panels, captions):
        figure.paste(panel, (x, caption_height))
        draw.text((x + 4, 4), caption, fill=255)
        x += panel.width
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part.png", dir=path.parent)
    os.close(handle)
    try:
        figure.save(temporary)
        os.chmod(temporary, default_file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
