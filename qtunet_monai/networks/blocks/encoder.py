# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The encoder's Swin sub-block and stage (also the bottleneck's). Tokens are channels-last ``(B, *spatial, C)``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention_backends import AttentionBackend
from .swin import WindowBlock, WindowStage, maybe_checkpoint
from .windows import WindowGeometry

__all__ = ["EncoderStage", "SwinSubBlock"]


class SwinSubBlock(WindowBlock):
    """Encoder sub-block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, attention in
    windows.

    Args: as :class:`WindowBlock`.
    """

    def forward(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        x = self._self_attention(x, geometry)
        return x + self._mlp_residual(x, geometry)

    def forward_with_kv(self, x: torch.Tensor, geometry: WindowGeometry):
        """As :meth:`forward`, also returning this block's keys and values (for the VT decoder)."""
        if self.router is not None:
            raise ValueError("a conditional (routed) block computes keys/values of routed tokens only; the VT "
                             "decoder, which reads all the encoder's keys/values, cannot use it.")
        q, k, v = self.attn.project_qkv(self._windows(x, self.norm1, geometry))
        x = x + self.drop_path(geometry.reverse(self.attn.attend(q, k, v, geometry), x.shape[0]))
        return x + self._mlp_residual(x), (k, v)


class EncoderStage(WindowStage):
    """Swin sub-blocks alternating plain and shifted windows (a pair in the encoder, one in the
    bottleneck).

    Args:
        dim: token width.
        num_heads: attention heads.
        depth: number of sub-blocks.
        window_size: nominal window.
        shift_size: shift of the odd sub-blocks.
        spatial_dims: 2 or 3.
        drop_path: stochastic-depth rate per sub-block.
        attention_backend: see :class:`WindowAttention`.
        use_checkpoint: recompute each sub-block in the backward pass to save memory.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        depth: int,
        window_size: int,
        shift_size: int,
        spatial_dims: int,
        drop_path: Sequence[float],
        attention_backend: AttentionBackend = "sdpa",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__(window_size, shift_size, use_checkpoint)
        for i in range(depth):
            self.blocks.append(
                SwinSubBlock(dim, num_heads, window_size, spatial_dims, 4.0, drop_path[i], attention_backend)
            )

    def forward(self, x: torch.Tensor, return_kv: bool = False):
        """Returns the stage output, and with ``return_kv`` the keys/values of each sub-block."""
        kvs = []
        for block, geometry in zip(self.blocks, self.geometries(x)):
            if return_kv:
                x, kv = maybe_checkpoint(block.forward_with_kv, self.use_checkpoint, x, geometry)
                kvs.append(kv)
            else:
                x = maybe_checkpoint(block, self.use_checkpoint, x, geometry)
        return (x, kvs) if return_kv else x
