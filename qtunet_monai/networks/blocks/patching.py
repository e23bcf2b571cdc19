# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Patch partition, merging (down) and expansion (up) on channels-last tokens, 2D and 3D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv

__all__ = ["PatchEmbedding", "PatchMerging", "PatchExpanding", "space_to_channels", "channels_to_space"]


def space_to_channels(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """``(B, *S, C)`` -> ``(B, *(S / f), prod(f) * C)``: each ``f`` neighbourhood becomes one token."""
    b, *spatial, c = x.shape
    n = len(spatial)
    split = [b]
    for size, f in zip(spatial, factors):
        split += [size // f, f]
    x = x.reshape(*split, c)
    order = [0, *range(1, 2 * n, 2), *range(2, 2 * n + 1, 2), 2 * n + 1]
    return x.permute(order).reshape(b, *(s // f for s, f in zip(spatial, factors)), math.prod(factors) * c)


def channels_to_space(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`space_to_channels`: ``(B, *S, prod(f) * C)`` -> ``(B, *(S * f), C)``."""
    b, *spatial, c = x.shape
    n = len(spatial)
    x = x.reshape(b, *spatial, *factors, c // math.prod(factors))
    order = [0]
    for axis in range(n):
        order += [1 + axis, 1 + n + axis]
    return x.permute(*order, 2 * n + 1).reshape(b, *(s * f for s, f in zip(spatial, factors)), -1)


def _pad_to_multiple(x: torch.Tensor, factors: Sequence[int], channels_last: bool) -> torch.Tensor:
    spatial = x.shape[1:-1] if channels_last else x.shape[2:]
    pads: list[int] = [0, 0] if channels_last else []
    for size, f in zip(reversed(spatial), reversed(factors)):
        pads += [0, (-size) % f]
    return F.pad(x, pads) if any(pads) else x


class PatchEmbedding(nn.Module):
    """Patch partition: a convolution with kernel = stride = ``patch_size`` (inputs padded at the
    end to a multiple of it), then LayerNorm. Channels-first in, channels-last out.

    Args:
        in_channels: input channels.
        dim: embedding width ``C``.
        patch_size: patch edge length.
        spatial_dims: 2 or 3.
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int, spatial_dims: int) -> None:
        super().__init__()
        self.patch_size = (patch_size,) * spatial_dims
        self.proj = Conv[Conv.CONV, spatial_dims](in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(_pad_to_multiple(x, self.patch_size, channels_last=False))
        return self.norm(x.movedim(1, -1))


class PatchMerging(nn.Module):
    """Concatenate each ``factors`` neighbourhood (2x2x2, or 2x2 within the slice when depth is
    kept), LayerNorm, Linear to ``2 * dim`` without bias. Odd sizes are padded at the end.

    Args:
        dim: input token width.
        factors: merge factor per spatial axis.
    """

    def __init__(self, dim: int, factors: Sequence[int]) -> None:
        super().__init__()
        self.factors = tuple(factors)
        merged = math.prod(self.factors) * dim
        self.norm = nn.LayerNorm(merged)
        self.reduction = nn.Linear(merged, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = space_to_channels(_pad_to_multiple(x, self.factors, channels_last=True), self.factors)
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """Linear ``dim -> prod(factors) * out_dim`` without bias, split into ``factors`` sub-tokens of
    ``out_dim`` channels, LayerNorm(out_dim), rearranged onto the finer grid and cropped to the
    target shape.

    The sub-tokens are normalised (and optionally projected) *before* the rearrangement: the result
    is the same, but a projection to few channels, like the classifier, then rearranges a small tensor
    instead of the full-width one.

    Args:
        dim: input token width.
        factors: expansion factor per spatial axis.
        out_dim: width of the sub-tokens (``dim // 2`` between stages, ``dim`` in the classifier).
    """

    def __init__(self, dim: int, factors: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.factors = tuple(factors)
        self.expand = nn.Linear(dim, math.prod(self.factors) * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    #: tokens expanded at a time when a ``project`` follows and no gradients are needed; None: 1024 on a
    #: CPU, where a chunk's full-width sub-tokens then stay near the caches for the norm and the
    #: projection (a third faster than 4096), and 4096 on a GPU (fewer kernels; not yet measured there)
    inference_chunk: int | None = None

    def _sub_tokens(self, tokens: torch.Tensor, project: nn.Module | None) -> torch.Tensor:
        """``(B, T, dim)`` -> normalised (and projected) sub-tokens ``(B, T, prod(factors), C)``:
        4-d whatever spatial_dims, which fvcore's norm counter requires."""
        b, t, _ = tokens.shape
        sub_tokens = self.norm(self.expand(tokens).view(b, t, math.prod(self.factors), self.norm.normalized_shape[0]))
        return sub_tokens if project is None else project(sub_tokens)

    def forward(
        self, x: torch.Tensor, target_shape: Sequence[int], project: nn.Module | None = None
    ) -> torch.Tensor:
        """
        Args:
            x: tokens ``(B, *spatial, dim)``.
            target_shape: spatial shape to crop to (that of the matching encoder stage or the input).
            project: optional per-token module applied to the normalised sub-tokens.
        """
        b, *spatial, c = x.shape
        tokens = x.reshape(b, -1, c)
        chunk = self.inference_chunk if self.inference_chunk is not None else (1024 if x.device.type == "cpu" else 4096)
        if project is not None and not torch.is_grad_enabled() and tokens.shape[1] > chunk:
            # Without autograd nothing needs the full-width sub-tokens at once: expanding a chunk of
            # tokens at a time bounds the peak memory of the classifier head (the largest tensor of
            # the network) without changing the result.
            chunks = [self._sub_tokens(t, project) for t in tokens.split(chunk, dim=1)]
            sub_tokens = torch.cat(chunks, dim=1)
        else:
            sub_tokens = self._sub_tokens(tokens, project)
        x = channels_to_space(sub_tokens.reshape(b, *spatial, -1), self.factors)
        if tuple(x.shape[1:-1]) != tuple(target_shape):
            x = x[(slice(None), *(slice(0, s) for s in target_shape))]
        return x
