# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The segmentation head: decoder tokens to class logits (the role of MONAI's ``UnetOutBlock``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .patching import PatchExpanding
from .swin import maybe_checkpoint

__all__ = ["SegmentationHead"]


class SegmentationHead(nn.Module):
    """LayerNorm, an optional ``x scale_factor`` patch expansion, then a pointwise classifier (a 1x1(x1)
    convolution without bias, as a Linear on channels-last tokens). Channels-last tokens in,
    channels-first logits out.

    With ``scale_factor`` equal to the patch size this is QT-UNet's classifier (docs/architecture.md section 1,
    "classifier"); with 1 it is an auxiliary head of deep supervision, giving logits on the
    decoder stage's own grid.

    The expansion holds the network's largest activations, so it is what ``use_checkpoint``
    recomputes in the backward pass, and, without gradients, :class:`PatchExpanding` runs it in chunks
    of tokens (``expand.inference_chunk``) so that the full-width sub-tokens never exist at once.

    Args:
        dim: width of the incoming tokens.
        out_channels: classes.
        spatial_dims: 2 or 3.
        scale_factor: expansion per spatial axis before the classifier (1: none).
        use_checkpoint: recompute the expansion and classifier in the backward pass.
    """

    def __init__(
        self, dim: int, out_channels: int, spatial_dims: int, scale_factor: int = 1, use_checkpoint: bool = False
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.norm = nn.LayerNorm(dim)
        self.expand = PatchExpanding(dim, (scale_factor,) * spatial_dims, dim) if scale_factor > 1 else None
        self.classifier = nn.Linear(dim, out_channels, bias=False)

    def forward(self, x: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        """
        Args:
            x: tokens ``(B, *spatial, dim)``.
            output_shape: spatial shape to crop the expanded grid to (e.g. the input's, when it was
                padded to a multiple of the patch); default: the whole expanded grid. Not used
                without expansion.

        Returns:
            logits ``(B, out_channels, *output_shape)``.
        """
        x = self.norm(x)
        if self.expand is None:
            logits = self.classifier(x)
        else:
            if output_shape is None:
                output_shape = [s * f for s, f in zip(x.shape[1:-1], self.expand.factors)]
            logits = maybe_checkpoint(self.expand, self.use_checkpoint, x, output_shape, self.classifier)
        return logits.movedim(-1, 1)
