# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The decoder's sub-blocks (QT, VT, plain) and stage, and :data:`DECODERS`, the registry that names them.

A new decoder block kind is one :class:`DecoderSubBlock` subclass and one :data:`DECODERS` entry here (and its
test in tests/networks/test_network_layout.py); ``QTUNet(decoder=...)``, its argument check and the stages read the
registry. Tokens are channels-last ``(B, *spatial, C)``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from .attention import WindowCrossAttention
from .attention_backends import AttentionBackend
from .swin import WindowBlock, WindowStage, maybe_checkpoint, sinusoidal_position_encoding
from .windows import WindowGeometry

__all__ = [
    "DECODERS",
    "DecoderStage",
    "DecoderSubBlock",
    "QTDecoderSubBlock",
    "SwinDecoderSubBlock",
    "VTDecoderSubBlock",
]


class DecoderSubBlock(WindowBlock):
    """The one interface of the decoder sub-blocks: ``forward(x, geometry, skip, skip_kv=None)``.

    ``x`` are the decoder tokens, ``skip`` the same-stage encoder features (channels-last, the same
    grid as ``x``) and ``skip_kv`` the keys and values the matching encoder sub-block computed, given
    only to blocks whose class sets :attr:`needs_encoder_kv`.

    Args: as :class:`WindowBlock`.
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

    Args: as :class:`WindowBlock`.
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

    Args: as :class:`WindowBlock`.
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


class VTDecoderSubBlock(DecoderSubBlock):
    """VT-UNet decoder sub-block (Peiris et al.), used for the thesis' baselines and ablations.

    The block's own queries attend to its own keys/values (self-attention) and, through the same
    projection, to the keys/values the matching encoder sub-block computed (cross-attention). The two
    branches each get the shared MLP and are fused with a fixed weight ``alpha``, plus the MLP of a
    sinusoidal position encoding: ``(1-a)(x1 + MLP(LN(x1))) + a(x2 + MLP(LN(x2))) + MLP(LN(PE))``.
    It adds no weights beyond a plain Swin sub-block.

    Args: as :class:`WindowBlock`, plus ``alpha``, the weight of the cross-attention branch.
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


class DecoderStage(WindowStage):
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
