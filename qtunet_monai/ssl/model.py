# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The QT-UNet encoder with the three pre-training heads of the thesis (docs/architecture.md section 4).

- reconstruction: one transposed convolution from the encoder output back to the input size,
  L1 against the un-masked view;
- rotation: an MLP with BatchNorm and ReLU over the pooled encoder output, 4 classes;
- BYOL: online projector and predictor; a target encoder and projector that follow the online ones
  as an exponential moving average and get no gradient; symmetrised cosine loss.

The encoder is :class:`~qtunet_monai.networks.QTUNetEncoder`: only the encoder is built, under
QT-UNet's parameter names (``patch_embed.*``, ``encoder_stages.*``, ``merges.*``, ``bottleneck.*``,
``bottleneck_norm.*``), so its state dict initialises a task network directly.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..networks import QTUNetEncoder

__all__ = ["QTUNetEncoder", "QTUNetSSL", "byol_momentum", "collapse_signal", "ssl_loss"]

ENCODER_KEYS = ("patch_embed.", "encoder_stages.", "merges.", "bottleneck.", "bottleneck_norm.")


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class QTUNetSSL(nn.Module):
    """Encoder + reconstruction, rotation and BYOL heads, with the BYOL target network.

    Args:
        in_channels: input channels.
        roi_size: the crop size the reconstruction head restores.
        spatial_dims: 2 or 3.
        variant: tiny, small or base (sets the width C).
        merge_depth: as :class:`QTUNet` (False for the ``-A`` ablation).
        num_stages / patch_size: as :class:`QTUNet` (3 and 4 in the thesis).
        projection_dim / hidden_dim: BYOL's projector and predictor sizes.
        head_downsample: pool the encoder output by this factor before the heads (the thesis used 4 in 2D).
        drop_path_rate / use_checkpoint: as :class:`QTUNet`.
    """

    def __init__(self, in_channels: int, roi_size, spatial_dims: int = 3, variant: str = "tiny",
                 merge_depth: bool = True, projection_dim: int = 256, hidden_dim: int = 4096,
                 head_downsample: int | None = None, drop_path_rate: float = 0.0, use_checkpoint: bool = False,
                 num_stages: int = 3, patch_size: int = 4) -> None:
        super().__init__()
        self.encoder = QTUNetEncoder(in_channels, spatial_dims=spatial_dims, variant=variant, merge_depth=merge_depth,
                                     num_stages=num_stages, patch_size=patch_size, drop_path_rate=drop_path_rate,
                                     use_checkpoint=use_checkpoint)
        self.roi_size = tuple(int(s) for s in roi_size)
        if len(self.roi_size) != spatial_dims:
            raise ValueError(f"roi_size {self.roi_size} does not have {spatial_dims} dimensions.")
        self.head_downsample = head_downsample if head_downsample is not None else (4 if spatial_dims == 2 else 1)
        width = self.encoder.width
        stride = [s * self.head_downsample for s in self.encoder.bottleneck_stride]
        conv_t = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
        self.reconstruction = conv_t(width, in_channels, kernel_size=stride, stride=stride)
        self.rotation = _mlp(width, 512, 4)
        self.projector = _mlp(width, hidden_dim, projection_dim)
        self.predictor = _mlp(projection_dim, hidden_dim, projection_dim)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)

    def target_parameters(self):
        yield from self.target_encoder.parameters()
        yield from self.target_projector.parameters()

    def _features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        features = encoder(x)
        if self.head_downsample > 1:
            mode = "bilinear" if features.ndim == 4 else "trilinear"
            size = [max(1, s // self.head_downsample) for s in features.shape[2:]]
            features = F.interpolate(features, size=size, mode=mode, align_corners=False)
        return features

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both views through the online network in one batch, and through the target without gradient."""
        views = torch.cat([view1, view2])
        features = self._features(self.encoder, views)
        reconstruction = self.reconstruction(features)
        if tuple(reconstruction.shape[2:]) != tuple(views.shape[2:]):  # crops not a multiple of the stride
            mode = "bilinear" if views.ndim == 4 else "trilinear"
            reconstruction = F.interpolate(reconstruction, size=views.shape[2:], mode=mode, align_corners=False)
        pooled = features.flatten(2).mean(-1)
        projection = self.projector(pooled)
        with torch.no_grad():
            target_pooled = self._features(self.target_encoder, views).flatten(2).mean(-1)
            target_projection = self.target_projector(target_pooled)
        return {
            "reconstruction": reconstruction,
            "rotation_logits": self.rotation(pooled),
            "projection": projection,
            "prediction": self.predictor(projection),
            "target_projection": target_projection.detach(),
        }

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online (parameters); buffers copied."""
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for p_o, p_t in zip(online.parameters(), target.parameters()):
                p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)
            for b_o, b_t in zip(online.buffers(), target.buffers()):
                b_t.copy_(b_o)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The online encoder's weights under QT-UNet's names, for fine-tuning."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}


def byol_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: ``1 - (1 - base) * (cos(pi * step / total) + 1) / 2``, from ``base`` to 1."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)) + 1.0) / 2.0


def ssl_loss(outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The three losses and their unweighted sum (``loss``)."""
    targets = torch.cat([batch["target1"], batch["target2"]])
    rotations = torch.cat([batch["rotation1"], batch["rotation2"]]).long()
    recon = F.l1_loss(outputs["reconstruction"], targets)
    rot = F.cross_entropy(outputs["rotation_logits"], rotations)
    p1, p2 = outputs["prediction"].chunk(2)
    z1, z2 = outputs["target_projection"].chunk(2)
    # online prediction of one view against the target projection of the other, both ways
    byol = (2 - 2 * F.cosine_similarity(p1, z2, dim=-1)).mean() + (2 - 2 * F.cosine_similarity(p2, z1, dim=-1)).mean()
    return {"loss": recon + rot + byol, "loss_reconstruction": recon, "loss_rotation": rot, "loss_byol": byol}


def collapse_signal(projection: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension standard deviation of the L2-normalised projections, times sqrt(dim):
    about 1 for well-spread representations, 0 when every input maps to the same vector."""
    z = F.normalize(projection.detach().float(), dim=-1)
    return z.std(dim=0).mean() * math.sqrt(z.shape[-1])
