# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Multi-head attention inside (shifted) windows, for self- and cross-attention, 2D and 3D."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .windows import MASK_VALUE, WindowGeometry

__all__ = ["WindowAttention", "WindowCrossAttention", "ATTENTION_BACKENDS", "attention_backend"]

#: how :meth:`WindowAttention.attend` computes attention (see :class:`WindowAttention`)
ATTENTION_BACKENDS = ("sdpa", "flex", "explicit")


def attention_backend(fused_attention: bool | str) -> str:
    """The backend name for a ``fused_attention`` argument: True is ``"sdpa"``, False ``"explicit"``."""
    if fused_attention is True or fused_attention is False:
        return "sdpa" if fused_attention else "explicit"
    if fused_attention not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend fused_attention={fused_attention!r}; choose True, False or one of "
            f"{list(ATTENTION_BACKENDS)}."
        )
    return fused_attention


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


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
        fused_attention: the attention backend. ``True`` or ``"sdpa"``:
            ``torch.nn.functional.scaled_dot_product_attention`` with the bias (and shift mask) as an
            additive mask that broadcasts over the batch; on CPU while the bias needs a gradient, the
            explicit path with its probabilities recomputed in the backward pass instead of stored
            (torch's fused CPU kernel has no mask gradient, and its math fallback would compute the
            same in float32). ``"flex"``: ``torch.nn.attention.flex_attention`` with the
            bias and the shift mask added inside the kernel by a ``score_mod`` from the bias and the
            windows' region ids, so no ``(windows, heads, N, N)`` tensor exists; fused only under
            ``torch.compile`` (eager flex materialises the scores) and, in torch 2.13, without a
            backward pass on CPU. ``False`` or ``"explicit"``: matmul and softmax, the reference, which
            fvcore counts. All three compute the same function (padding tokens are attended to as zero
            tokens, as in Swin).
        inner_dim: width of the queries, keys and values (all heads together); default ``dim``. A
            narrower attention (the light branch of a conditional block) projects ``dim -> inner_dim``
            and back.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        spatial_dims: int,
        qkv_bias: bool = True,
        fused_attention: bool = True,
        inner_dim: int | None = None,
    ) -> None:
        super().__init__()
        inner_dim = dim if inner_dim is None else inner_dim
        if inner_dim % num_heads:
            raise ValueError(f"token width {inner_dim} is not divisible by the number of heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = inner_dim // num_heads
        self.inner_dim = inner_dim
        self.window_size = window_size
        self.spatial_dims = spatial_dims
        self.scale = self.head_dim**-0.5
        attention_backend(fused_attention)  # refuse an unknown backend now, not at the first forward
        self.fused_attention = fused_attention
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
        n = geometry.tokens_per_window
        bias = self.relative_position_bias_table[geometry.relative_index.reshape(-1)]
        # contiguous: a permuted bias makes every sum with it (the shift mask) permuted too, and SDPA
        # then copies that (windows * heads, N, N) mask once more
        return bias.view(n, n, self.num_heads).permute(2, 0, 1).contiguous()

    @property
    def attention_backend(self) -> str:
        """``"sdpa"``, ``"flex"`` or ``"explicit"``, from :attr:`fused_attention` (which may be reassigned)."""
        return attention_backend(self.fused_attention)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """Attention of ``q`` over ``k, v`` within each window, then the output projection.

        Returns windows ``(b, N, C)``.
        """
        b, heads, n, head_dim = q.shape
        backend = self.attention_backend
        bias_grad = torch.is_grad_enabled() and self.relative_position_bias_table.requires_grad
        if backend == "sdpa" and q.device.type == "cpu" and bias_grad:
            # torch's fused CPU kernel has no gradient for an additive mask: SDPA would take its math
            # path, which upcasts to float32 under autocast and adds a NaN-guarded softmax. The explicit
            # path computes the same in the autocast dtype, and faster; like a fused kernel it keeps only
            # q, k, v for the backward pass and recomputes the (windows, heads, N, N) probabilities, the
            # largest activation of a window transformer (about half a training step's peak memory).
            out = checkpoint(self._attend_explicit, q, k, v, geometry, use_reentrant=False, preserve_rng_state=False)
        else:
            attend = {"sdpa": self._attend_sdpa, "flex": self._attend_flex, "explicit": self._attend_explicit}
            out = attend[backend](q, k, v, geometry)
        return self.proj(out.transpose(1, 2).reshape(b, n, heads * head_dim))

    def _attend_explicit(self, q, k, v, geometry: WindowGeometry) -> torch.Tensor:
        b, heads, n, _ = q.shape
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.relative_bias(geometry).to(q.dtype).unsqueeze(0)
        mask = geometry.attn_mask
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(b // num_windows, num_windows, heads, n, n) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(b, heads, n, n)
        return attn.softmax(dim=-1) @ v

    def _attend_sdpa(self, q, k, v, geometry: WindowGeometry) -> torch.Tensor:
        bias = self.relative_bias(geometry).to(q.dtype)
        mask = geometry.attn_mask
        if mask is None:  # (1, heads, N, N) broadcasts over all windows (a 3-d mask misses the fused kernels)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        # Windows joined with the heads: the (windows * heads, N, N) bias + mask then broadcasts over
        # the volumes of the batch, where a per-window mask would be copied for every volume.
        b, heads, n, head_dim = q.shape
        num_windows = mask.shape[0]
        batch = b // num_windows
        attn_mask = (mask.to(q.dtype).unsqueeze(1) + bias).reshape(1, num_windows * heads, n, n)
        q, k, v = (t.reshape(batch, num_windows * heads, n, t.shape[-1]) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).view(b, heads, n, head_dim)

    def _attend_flex(self, q, k, v, geometry: WindowGeometry) -> torch.Tensor:
        if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            raise ValueError(
                f"attention backend 'flex' cannot train on CPU: torch {torch.__version__}'s flex_attention has no "
                "backward pass there. Use fused_attention='sdpa' (or True) for training on CPU."
            )
        bias = self.relative_bias(geometry).to(q.dtype)
        regions = geometry.region_index
        if regions is None:

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]

        else:
            num_windows = regions.shape[0]

            def score_mod(score, b, h, q_idx, kv_idx):
                window = b % num_windows  # windows are batch-major: index = volume * num_windows + window
                same_region = regions[window, q_idx] == regions[window, kv_idx]
                return score + bias[h, q_idx, kv_idx] + torch.where(same_region, 0.0, MASK_VALUE)

        return _flex_attention()(q, k, v, score_mod=score_mod, scale=self.scale)

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
