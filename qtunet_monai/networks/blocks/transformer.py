# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Swin sub-blocks of the encoder and the three decoder sub-blocks (QT, VT, plain), and the stages
that pair them (plain windows, then shifted windows). Tokens are channels-last ``(B, *spatial, C)``."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from monai.networks.blocks import MLPBlock
from monai.networks.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import WindowAttention, WindowCrossAttention
from .attention_backends import AttentionBackend
from .windows import WindowGeometry, window_geometry

__all__ = [
    "DECODERS",
    "DecoderStage",
    "DecoderSubBlock",
    "EncoderStage",
    "QTDecoderSubBlock",
    "SwinDecoderSubBlock",
    "SwinSubBlock",
    "VTDecoderSubBlock",
    "maybe_checkpoint",
    "sinusoidal_position_encoding",
]


class _WindowBlock(nn.Module):
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


class SwinSubBlock(_WindowBlock):
    """Encoder sub-block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``, attention in
    windows.

    Args: as :class:`_WindowBlock`.
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


class DecoderSubBlock(_WindowBlock):
    """The one interface of the decoder sub-blocks: ``forward(x, geometry, skip, skip_kv=None)``.

    ``x`` are the decoder tokens, ``skip`` the same-stage encoder features (channels-last, the same
    grid as ``x``) and ``skip_kv`` the keys and values the matching encoder sub-block computed, given
    only to blocks whose class sets :attr:`needs_encoder_kv`.

    Args: as :class:`_WindowBlock`.
    """

    #: whether the block reads the encoder's keys/values (the encoder then computes and keeps them)
    needs_encoder_kv: ClassVar[bool] = False

    def forward(
        self,
        x: torch.Tensor,
        geometry: WindowGeometry,
        skip: torch.Tensor,
        skip_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class SwinDecoderSubBlock(DecoderSubBlock):
    """A plain Swin sub-block in the decoder (no cross-attention; the QT-UNet-2D-A ablation): the
    encoder features reach it only through the stage's skip projection.

    Args: as :class:`_WindowBlock`.
    """

    def forward(
        self,
        x: torch.Tensor,
        geometry: WindowGeometry,
        skip: torch.Tensor,
        skip_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self._self_attention(x, geometry)
        return x + self._mlp_residual(x, geometry)


class QTDecoderSubBlock(DecoderSubBlock):
    """QT decoder sub-block: windowed self-attention, then windowed cross-attention whose keys and
    values the block computes itself from the same-stage encoder features (``skip``), then the MLP;
    each with its own pre-LayerNorm and residual.

    Args: as :class:`_WindowBlock`.
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
        super().__init__(dim, num_heads, window_size, spatial_dims, mlp_ratio, drop_path, attention_backend)
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.cross_attn = WindowCrossAttention(
            dim, num_heads, window_size, spatial_dims, attention_backend=attention_backend
        )
        self.light_cross = None  # the light cross-attention of a conditional block with routed cross-attention

    def forward(
        self,
        x: torch.Tensor,
        geometry: WindowGeometry,
        skip: torch.Tensor,
        skip_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self._self_attention(x, geometry)
        queries = self._windows(x, self.norm_query, geometry)
        keys_values = self._windows(skip, self.norm_context, geometry)
        if self.router is not None and self.router.route_cross:
            attended = self.router.attention(self.cross_attn, self.light_cross, queries, keys_values, geometry, True)
        else:
            attended = self.cross_attn(queries, keys_values, geometry)
        x = x + self.drop_path(geometry.reverse(attended, x.shape[0]))
        return x + self._mlp_residual(x, geometry)


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


class VTDecoderSubBlock(DecoderSubBlock):
    """VT-UNet decoder sub-block (Peiris et al.), used for the thesis' baselines and ablations.

    The block's own queries attend to its own keys/values (self-attention) and, through the same
    projection, to the keys/values the matching encoder sub-block computed (cross-attention). The two
    branches each get the shared MLP and are fused with a fixed weight ``alpha``, plus the MLP of a
    sinusoidal position encoding: ``(1-a)(x1 + MLP(LN(x1))) + a(x2 + MLP(LN(x2))) + MLP(LN(PE))``.
    It adds no weights beyond a plain Swin sub-block.

    Args: as :class:`_WindowBlock`, plus ``alpha``, the weight of the cross-attention branch.
    """

    needs_encoder_kv = True

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        spatial_dims: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        attention_backend: AttentionBackend = "sdpa",
        alpha: float = 0.3,
    ) -> None:
        super().__init__(dim, num_heads, window_size, spatial_dims, mlp_ratio, drop_path, attention_backend)
        self.alpha = alpha

    def forward(
        self,
        x: torch.Tensor,
        geometry: WindowGeometry,
        skip: torch.Tensor,
        skip_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if skip_kv is None:
            raise ValueError("VTDecoderSubBlock attends to the encoder's keys/values: pass them as skip_kv.")
        batch = x.shape[0]
        q, k, v = self.attn.project_qkv(self._windows(x, self.norm1, geometry))
        x_self = x + self.drop_path(geometry.reverse(self.attn.attend(q, k, v, geometry), batch))
        x_cross = x + self.drop_path(geometry.reverse(self.attn.attend(q, *skip_kv, geometry), batch))
        x_self = x_self + self._mlp_residual(x_self)
        x_cross = x_cross + self._mlp_residual(x_cross)
        position = sinusoidal_position_encoding(x.shape[1:-1], x.shape[-1], x.device).to(x.dtype).unsqueeze(0)
        return (1 - self.alpha) * x_self + self.alpha * x_cross + self._mlp_residual(position)


#: the decoder sub-blocks by the name :class:`QTUNet` takes (``decoder="qt"``)
DECODERS: dict[str, type[DecoderSubBlock]] = {
    "qt": QTDecoderSubBlock,
    "vt": VTDecoderSubBlock,
    "none": SwinDecoderSubBlock,
}


def maybe_checkpoint(block, use_checkpoint: bool, *args):
    """``block(*args)``, recomputed in the backward pass instead of stored when ``use_checkpoint``
    and gradients are on."""
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class _Stage(nn.Module):
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


class EncoderStage(_Stage):
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


class DecoderStage(_Stage):
    """A pair of decoder sub-blocks of one kind (plain windows, then shifted windows).

    Args: as :class:`EncoderStage`, plus ``decoder``, a key of :data:`DECODERS`: ``"qt"`` (own
    cross-attention to the encoder features), ``"vt"`` (VT-UNet fusion with the encoder's keys/values)
    or ``"none"`` (plain Swin sub-blocks, no cross-attention).
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
        decoder: str = "qt",
        attention_backend: AttentionBackend = "sdpa",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__(window_size, shift_size, use_checkpoint)
        block_type = DECODERS[decoder]
        self.needs_encoder_kv = block_type.needs_encoder_kv
        for i in range(depth):
            self.blocks.append(block_type(dim, num_heads, window_size, spatial_dims, 4.0, drop_path[i], attention_backend))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, skip_kv: Sequence | None = None) -> torch.Tensor:
        """
        Args:
            x: decoder tokens ``(B, *spatial, dim)``.
            skip: the same-stage encoder features, same shape.
            skip_kv: the keys/values of each encoder sub-block of the stage (only when
                :attr:`needs_encoder_kv`).
        """
        for i, (block, geometry) in enumerate(zip(self.blocks, self.geometries(x))):
            block_kv = skip_kv[i] if skip_kv is not None else None
            x = maybe_checkpoint(block, self.use_checkpoint, x, geometry, skip, block_kv)
        return x
