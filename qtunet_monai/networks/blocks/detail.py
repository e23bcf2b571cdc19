# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The full-resolution detail path: residual conv blocks on the input whose features join the last
decoder stage on the way back to the input grid (the role of SwinUNETR's ``encoder1``/``decoder1``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock
from torch import nn

from .patching import _pad_to_multiple
from .swin import maybe_checkpoint

__all__ = ["DetailPath"]


class DetailPath(nn.Module):
    """Convolutional encoder levels at strides 1, 2, 4, ... below the patch size, and a decoder that
    takes the last transformer decoder stage (at stride ``patch_size``) back to the input grid through
    them: a transposed convolution per step, the level's features concatenated, a residual conv block
    (MONAI's ``UnetrUpBlock``), then a pointwise classifier.

    Without it QT-UNet's finest feature map is at ``1 / patch_size`` and the head expands it with a
    linear layer; thin structures (CSF, vessels, small organs) are decided there. The detail levels see
    the input at full resolution, at a small width, so they add few FLOPs next to the transformer.

    Args:
        in_channels: input channels of the network.
        token_width: width of the last decoder stage's tokens (the embedding width C).
        out_channels: classes.
        spatial_dims: 2 or 3.
        patch_size: the network's patch edge; the detail levels' strides 1, 2, ... must stay below
            it and the last upsampling factor, ``patch_size / 2^(levels - 1)``, must be an integer > 1.
        widths: channels of the detail levels, finest first (e.g. ``(16, 32)``: 16 at full and 32 at
            half resolution).
        norm_name: normalisation of the conv blocks (MONAI's names; SwinUNETR's ``"instance"``).
        use_checkpoint: recompute each conv block in the backward pass instead of storing it.
    """

    def __init__(
        self,
        in_channels: int,
        token_width: int,
        out_channels: int,
        spatial_dims: int,
        patch_size: int,
        widths: Sequence[int],
        norm_name: str | tuple = "instance",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"detail_widths must be positive channel counts, finest first, got {widths!r}.")
        coarsest_stride = 2 ** (len(widths) - 1)
        if patch_size % coarsest_stride or patch_size // coarsest_stride < 2:
            raise ValueError(
                f"{len(widths)} detail level(s) (strides 1..{coarsest_stride}) need a patch_size that is a multiple "
                f"of {2 * coarsest_stride}, got patch_size={patch_size}; use fewer detail_widths."
            )
        self.patch_size = (patch_size,) * spatial_dims
        self.use_checkpoint = use_checkpoint
        self.norm = nn.LayerNorm(token_width)
        # encoder: the input at full resolution, then one stride-2 block per further level
        self.encoder = nn.ModuleList(
            UnetResBlock(spatial_dims, c_in, c_out, kernel_size=3, stride=1 if level == 0 else 2, norm_name=norm_name)
            for level, (c_in, c_out) in enumerate(zip((in_channels, *widths[:-1]), widths))
        )
        # decoder, coarse to fine: tokens -> coarsest level (x patch / coarsest stride), then x2 per level
        ups = [patch_size // coarsest_stride] + [2] * (len(widths) - 1)
        sources = (token_width, *reversed(widths[1:]))
        self.decoder = nn.ModuleList(
            UnetrUpBlock(spatial_dims, c_in, c_out, kernel_size=3, upsample_kernel_size=up, norm_name=norm_name,
                         res_block=True)
            for c_in, c_out, up in zip(sources, reversed(widths), ups)
        )
        self.classifier = UnetOutBlock(spatial_dims, widths[0], out_channels)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: the network's input ``(B, in_channels, *spatial)``.
            tokens: the last decoder stage's tokens ``(B, *ceil(spatial / patch), token_width)``.

        Returns:
            logits ``(B, out_channels, *spatial)``.
        """
        padded = _pad_to_multiple(x, self.patch_size, channels_last=False)  # the grid the tokens cover
        skips, features = [], padded
        for block in self.encoder:
            features = maybe_checkpoint(block, self.use_checkpoint, features)
            skips.append(features)
        out = self.norm(tokens).movedim(-1, 1)
        for block, skip in zip(self.decoder, reversed(skips)):
            out = maybe_checkpoint(block, self.use_checkpoint, out, skip)
        logits = self.classifier(out)
        if logits.shape[2:] != x.shape[2:]:
            logits = logits[(slice(None), slice(None), *(slice(0, s) for s in x.shape[2:]))]
        return logits
