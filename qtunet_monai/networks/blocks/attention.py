# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Multi-head attention inside (shifted) windows, for self- and cross-attention, 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_backends import AttentionBackend, BackendAttention, WindowBias, attend, attention_weights
from .attention_backends import relative_bias as _relative_bias
from .windows import WindowGeometry

__all__ = ["WindowAttention", "WindowCrossAttention"]


class WindowAttention(BackendAttention):
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
        attention_backend: a key of
            :data:`~qtunet_monai.networks.blocks.attention_backends.ATTENTION_FUNCTIONS`. ``"sdpa"``
            (default): ``torch.nn.functional.scaled_dot_product_attention`` with the bias (and shift
            mask) as an additive mask that broadcasts over the batch; on CPU while the bias needs a
            gradient, the explicit path with its probabilities recomputed in the backward pass instead
            of stored (see :func:`~qtunet_monai.networks.blocks.attention_backends.attend`). ``"flex"``:
            ``torch.nn.attention.flex_attention`` with the bias and the shift mask added inside the
            kernel by a ``score_mod`` from the bias and the windows' region ids, so no
            ``(windows, heads, N, N)`` tensor exists; fused only under ``torch.compile`` and, in torch
            2.13, without a backward pass on CPU. ``"explicit"``: matmul and softmax, the reference,
            which fvcore counts. All compute the same function (padding tokens are attended to as zero
            tokens, as in Swin).
        inner_dim: width of the queries, keys and values (all heads together); default ``dim``. A
            narrower attention (the light branch of a conditional block) projects ``dim -> inner_dim``
            and back.
        fused_attention: deprecated alias of ``attention_backend`` (True: ``"sdpa"``, False:
            ``"explicit"``), with a FutureWarning.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        spatial_dims: int,
        qkv_bias: bool = True,
        attention_backend: AttentionBackend = "sdpa",
        inner_dim: int | None = None,
        fused_attention: bool | str | None = None,
    ) -> None:
        super().__init__(attention_backend, fused_attention)
        inner_dim = dim if inner_dim is None else inner_dim
        if inner_dim % num_heads:
            raise ValueError(f"token width {inner_dim} is not divisible by the number of heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads
        self.inner_dim = inner_dim
        self.window_size = window_size
        self.spatial_dims = spatial_dims
        self.scale = self.head_dim**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** spatial_dims, num_heads))
        self._init_projections(dim, qkv_bias)
        self.proj = nn.Linear(inner_dim, dim)

    def _init_projections(self, dim: int, qkv_bias: bool) -> None:
        self.qkv = nn.Linear(dim, 3 * self.inner_dim, bias=qkv_bias)

    def _split_heads(self, x: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        """``(b, N, parts * C)`` -> ``parts`` tensors of ``(b, heads, N, head_dim)``."""
        b, n, _ = x.shape
        return x.view(b, n, parts, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of windows ``x``, each ``(b, heads, N, head_dim)``."""
        q, k, v = self._split_heads(self.qkv(x), 3)
        return q, k, v

    def project_queries(self, x: torch.Tensor) -> torch.Tensor:
        """Queries of tokens ``x`` ``(b, n, C)`` alone, ``(b, heads, n, head_dim)`` (the first third of
        the ``qkv`` projection; for attention between different token sets)."""
        bias = self.qkv.bias[: self.inner_dim] if self.qkv.bias is not None else None
        (q,) = self._split_heads(F.linear(x, self.qkv.weight[: self.inner_dim], bias), 1)
        return q

    def project_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens ``x`` ``(b, n, C)`` alone, each ``(b, heads, n, head_dim)``."""
        bias = self.qkv.bias[self.inner_dim :] if self.qkv.bias is not None else None
        k, v = self._split_heads(F.linear(x, self.qkv.weight[self.inner_dim :], bias), 2)
        return k, v

    def relative_bias(self, geometry: WindowGeometry) -> torch.Tensor:
        """``(heads, N, N)`` bias for the windows of ``geometry``."""
        return _relative_bias(self.relative_position_bias_table, geometry)

    def score_bias(self, geometry: WindowGeometry, windows: torch.Tensor | None = None) -> WindowBias:
        """The relative-position bias and shift mask of the windows of ``geometry``.

        Args:
            geometry: the windows' geometry.
            windows: the window of each batch row for a selection of rows; default all, batch-major.
        """
        return WindowBias(self.relative_position_bias_table, geometry, windows)

    def attention_weights(
        self, q: torch.Tensor, k: torch.Tensor, geometry: WindowGeometry, windows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attention weights ``softmax(q k^T / sqrt(d) + bias + mask)`` ``(b, heads, N, N)``, as the
        explicit backend computes them.

        Args:
            q, k: queries and keys ``(b, heads, N, head_dim)`` of windows of ``geometry``.
            geometry: the windows' geometry.
            windows: the window of each batch row for a selection of rows; default all, batch-major.
        """
        return attention_weights(q, k, self.score_bias(geometry, windows), self.scale)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """Attention of ``q`` over ``k, v`` within each window by :attr:`attention_backend`, then the
        output projection.

        Returns windows ``(b, N, C)``.
        """
        b, heads, n, head_dim = q.shape
        out = attend(self.attention_backend, q, k, v, self.score_bias(geometry), self.scale)
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
        self.q = nn.Linear(dim, self.inner_dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * self.inner_dim, bias=qkv_bias)

    def project_queries(self, x: torch.Tensor) -> torch.Tensor:
        (q,) = self._split_heads(self.q(x), 1)
        return q

    def project_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._split_heads(self.kv(x), 2)
        return k, v

    def forward(self, x: torch.Tensor, context: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:  # type: ignore[override]
        return self.attend(self.project_queries(x), *self.project_keys_values(context), geometry)
