"""The conditional noise-prediction network of MedDiff-FM and its ControlNet extension.

Both take the same inputs:

* ``x``: noisy image ``(N, 1, D, H, W)`` in the model's [-1, 1] scale,
* ``t``: timesteps ``(N,)`` (int64, 0..T-1),
* ``coordinates``: global position coordinates ``(N, 3, D, H, W)`` in [-1, 1]
  (see :mod:`.embeddings`), turned into 6L Fourier channels inside,
* ``region``: region classes ``(N,)`` (0 = null, 1 head & neck, 2 chest, 3 abdomen),
* ``anatomy``: anatomy label maps ``(N, D, H, W)`` (values 0..119, see :mod:`..anatomy`),
* ``control`` (ControlNet only): task condition ``(N, C_t, D, H, W)``,

and return the predicted noise ``(N, 1, D, H, W)``. D, H, W must be multiples of
``config.downsampling_factor``.
"""

from __future__ import annotations

import logging

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from monai.networks.utils import copy_model_state
from torch import nn

from ..preprocessing import REGION_CLASS
from .config import ModelConfig
from .embeddings import AnatomyEmbedding, fourier_features

NUM_REGION_CLASSES = len(REGION_CLASS)


def _unet_arguments(config: ModelConfig) -> dict:
    return dict(
        spatial_dims=3,
        in_channels=1 + 6 * config.position_frequencies + config.anatomy_channels,
        num_res_blocks=config.num_res_blocks,
        channels=config.channels,
        attention_levels=config.attention_levels,
        norm_num_groups=config.norm_num_groups,
        num_head_channels=config.num_head_channels,
        num_class_embeds=NUM_REGION_CLASSES,
    )


class MedDiffFMNet(nn.Module):
    """MONAI ``DiffusionModelUNet`` with position, region and anatomy conditioning."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.anatomy_embedding = AnatomyEmbedding(config.anatomy_channels)
        self.unet = DiffusionModelUNet(out_channels=1, **_unet_arguments(config))

    def network_input(self, x: torch.Tensor, coordinates: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
        """The U-Net input ``(N, 1 + 6L + C_a, D, H, W)``: image, position features, anatomy embedding."""
        position = fourier_features(coordinates.to(x.dtype), self.config.position_frequencies)
        return torch.cat([x, position, self.anatomy_embedding(anatomy).to(x.dtype)], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        coordinates: torch.Tensor,
        region: torch.Tensor,
        anatomy: torch.Tensor,
        control: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if control is not None:
            raise ValueError("This is a base model; a task condition needs a ControlledNet.")
        return self.unet(self.network_input(x, coordinates, anatomy), t, class_labels=region)


class ControlledNet(nn.Module):
    """A frozen base :class:`MedDiffFMNet` steered by a trainable MONAI ``ControlNet``.

    The ControlNet is a copy of the base encoder (weights copied at construction), its task
    condition enters through a single-stage, full-resolution embedding whose last convolution is
    zero, and its residuals pass through zero convolutions, so at initialisation the output equals
    the base model's output exactly.
    """

    def __init__(self, base: MedDiffFMNet) -> None:
        super().__init__()
        config = base.config
        self.config = config
        self.base = base
        for parameter in self.base.parameters():
            parameter.requires_grad_(False)
        self.controlnet = ControlNet(
            conditioning_embedding_in_channels=config.control_channels,
            conditioning_embedding_num_channels=(config.channels[0],),
            **_unet_arguments(config),
        )
        # MONAI logs the copy at INFO on its own stdout handler, which would break the JSON lines
        # that `--progress-format json` promises on stdout.
        monai_logger = logging.getLogger(copy_model_state.__module__)
        level = monai_logger.level
        monai_logger.setLevel(logging.WARNING)
        try:
            copy_model_state(self.controlnet, self.base.unet.state_dict())
        finally:
            monai_logger.setLevel(level)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        coordinates: torch.Tensor,
        region: torch.Tensor,
        anatomy: torch.Tensor,
        control: torch.Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> torch.Tensor:
        if control is None:
            raise ValueError("A ControlledNet needs its task condition ('control').")
        hidden = self.base.network_input(x, coordinates, anatomy)
        down, mid = self.controlnet(
            hidden, t, controlnet_cond=control.to(x.dtype), conditioning_scale=conditioning_scale, class_labels=region
        )
        return self.base.unet(
            hidden, t, class_labels=region, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
