# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""What the encoder's and the decoder's Swin sub-blocks and stages share: the pre-LayerNorm windowed
self-attention and MLP of a sub-block, a stage's pairing of plain and shifted windows, gradient
checkpointing and the fixed sinusoidal position encoding. Tokens are channels-last ``(B, *spatial, C)``."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import WindowAttention
from .attention_backends import AttentionBackend
from .windows import WindowGeometry, window_geometry

__all__ = ["WindowBlock", "WindowStage", "maybe_checkpoint", "sinusoidal_position_encoding"]


class WindowBlock(nn.Module):
    """What every sub-block has: a pre-LayerNorm windowed self-attention and a pre-LayerNorm MLP, each
    added back through DropPath. Sub-classes define ``forward``.

    Args:
        dim: token width.
        num_heads: attention heads.
        window_size: nominal window size.
        spatial_dims: 2 or 3.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        drop_path: stochastic-depth rate of this sub-block.
        attention_backend: see :class:`WindowAttention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        spatial_dims: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attention_backend: AttentionBackend = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, spatial_dims, attention_backend=attention_backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act="GELU")
        # Conditional computation (CoLT5): blocks.conditional.attach_routing adds light branches and a
        # BlockRouting; ``attn`` and ``mlp`` then become the heavy branches. None in a dense block.
        self.router = None
        self.light_attn = None
        self.light_mlp = None

    def _windows(self, x: torch.Tensor, norm: nn.Module, geometry: WindowGeometry) -> torch.Tensor:
        return geometry.partition(norm(x))

    def _self_attention(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """``x + DropPath(Attn(LN(x)))``; conditional: ``Attn = LightAttn + routed HeavyAttn``."""
        windows = self._windows(x, self.norm1, geometry)
        if self.router is not None and self.router.route_attn:
            attended = self.router.attention(self.attn, self.light_attn, windows, windows, geometry)
        else:
            attended = self.attn(windows, geometry)
        return x + self.drop_path(geometry.reverse(attended, x.shape[0]))

    def _mlp_residual(self, x: torch.Tensor, geometry: WindowGeometry | None = None) -> torch.Tensor:
        """``DropPath(MLP(LN(x)))``, to be added to ``x``; conditional: ``MLP = LightMLP + routed
        HeavyMLP`` (``geometry``: the windows of per-window routing)."""
        if self.router is not None and self.router.route_mlp:
            return self.drop_path(self.router.feed_forward(self.mlp, self.light_mlp, self.norm2(x), geometry))
        return self.drop_path(self.mlp(self.norm2(x)))


def maybe_checkpoint(block, use_checkpoint: bool, *args):
    """``block(*args)``, recomputed in the backward pass instead of stored when ``use_checkpoint``
    and gradients are on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class WindowStage(nn.Module):
    """A pair of sub-blocks on one feature-map size: plain windows, then shifted windows."""

    def __init__(self, window_size: int, shift_size: int, use_checkpoint: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList()

    def geometries(self, x: torch.Tensor) -> list[WindowGeometry]:
        spatial = x.shape[1:-1]
        return [
            window_geometry(spatial, self.window_size, self.shift_size if i % 2 else 0, x.device)
            for i in range(len(self.blocks))
        ]


@functools.lru_cache(maxsize=32)
def _cached_position_encoding(spatial_shape: tuple[int, ...], channels: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # cached: must be usable by later training steps
        return _build_position_encoding(spatial_shape, channels, device)


def _build_position_encoding(spatial_shape: tuple[int, ...], channels: int, device: torch.device) -> torch.Tensor:
    per_axis = 2 * math.ceil(channels / (2 * len(spatial_shape)))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, per_axis, 2, device=device, dtype=torch.float32) / per_axis))
    encodings = []
    for axis, size in enumerate(spatial_shape):
        angles = torch.arange(size, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (size, per_axis)
        view = [1] * len(spatial_shape) + [per_axis]
        view[axis] = size
        encodings.append(emb.view(view).expand(*spatial_shape, per_axis))
    return torch.cat(encodings, dim=-1)[..., :channels].contiguous()


def sinusoidal_position_encoding(spatial_shape: Sequence[int], channels: int, device) -> torch.Tensor:
    """Fixed sinusoidal encoding ``(*spatial, channels)``: per axis, sines and cosines of the
    position at geometric frequencies, concatenated over axes (as VT-UNet's 3D encoding)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # see window_geometry: built in the graph
        return _build_position_encoding(tuple(spatial_shape), channels, torch.device(device))
    return _cached_position_encoding(tuple(int(s) for s in spatial_shape), int(channels), torch.device(device))
