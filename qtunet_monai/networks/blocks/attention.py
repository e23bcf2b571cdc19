# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Multi-head attention inside (shifted) windows, for self- and cross-attention, 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .windows import WindowGeometry

__all__ = ["WindowAttention", "WindowCrossAttention"]


class WindowAttention(nn.Module):
    """Windowed multi-head self-attention with a learned relative-position bias (Swin / Video Swin).

    Operates on windows ``(B * num_windows, N, C)`` cut by a :class:`WindowGeometry`. The
    projection to queries, keys and values (:meth:`project_qkv`) and the attention itself
    (:meth:`attend`) are separate so that the VT-UNet decoder can attend its own queries to keys
    and values an encoder block computed.

    Args:
        dim: token width.
        num_heads: attention heads; ``dim`` must be divisible by it.
        window_size: nominal window per axis; the bias table holds ``(2 * window_size - 1)^n`` offsets.
        spatial_dims: 2 or 3.
        qkv_bias: bias on the query/key/value projections.
        fused_attention: use ``torch.nn.functional.scaled_dot_product_attention`` (bias and shift mask
            passed as one additive mask); otherwise explicit matmul and softmax, which fvcore counts.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        spatial_dims: int,
        qkv_bias: bool = True,
        fused_attention: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by the number of heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attention = fused_attention
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** spatial_dims, num_heads))
        self._init_projections(dim, qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _init_projections(self, dim: int, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def _split_heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """``(b, N, parts * C)`` -> ``parts`` tensors of ``(b, heads, N, head_dim)``."""
        b, n, _ = x.shape
        return x.view(b, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of windows ``x``, each ``(b, heads, N, head_dim)``."""
        q, k, v = self._split_heads(self.qkv(x), 3)
        return q, k, v

    def relative_bias(self, geometry: WindowGeometry) -> torch.Tensor:
        """``(heads, N, N)`` bias for the windows of ``geometry``."""
        n = geometry.tokens_per_window
        bias = self.relative_position_bias_table[geometry.relative_index.reshape(-1)]
        return bias.view(n, n, self.num_heads).permute(2, 0, 1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """Attention of ``q`` over ``k, v`` within each window, then the output projection.

        Returns windows ``(b, N, C)``.
        """
        b, heads, n, head_dim = q.shape
        bias = self.relative_bias(geometry).to(q.dtype)
        mask = geometry.attn_mask
        if self.fused_attention:
            if mask is None:
                attn_mask = bias.unsqueeze(0)  # broadcast over all windows
            else:
                num_windows = mask.shape[0]
                attn_mask = bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)  # (nW, heads, N, N)
                attn_mask = attn_mask.unsqueeze(0).expand(b // num_windows, -1, -1, -1, -1).reshape(b, heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias.unsqueeze(0)
            if mask is not None:
                num_windows = mask.shape[0]
                attn = attn.view(b // num_windows, num_windows, heads, n, n) + mask.to(attn.dtype)[None, :, None]
                attn = attn.view(b, heads, n, n)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, heads * head_dim))

    def forward(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        return self.attend(*self.project_qkv(x), geometry)


class WindowCrossAttention(WindowAttention):
    """Windowed cross-attention of the QT decoder: queries from the decoder tokens, keys and values
    from the same-stage encoder features through the block's own projections (q: d -> d,
    kv: d -> 2d, out: d -> d) and its own relative-position bias.

    Args: as :class:`WindowAttention`.
    """

    def _init_projections(self, dim: int, qkv_bias: bool) -> None:
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:  # type: ignore[override]
        (q,) = self._split_heads(self.q(x), 1)
        k, v = self._split_heads(self.kv(context), 2)
        return self.attend(q, k, v, geometry)
