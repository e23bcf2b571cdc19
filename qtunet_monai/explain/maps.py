# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""From recorded attention to maps on the token grid and the input grid: where a voxel's tokens
attend, attention rollout through the encoder, and mean attention distance.

Conventions: maps are for the first item of the batch; a token grid is the ``spatial_shape`` of a
block's :class:`~qtunet_monai.networks.blocks.windows.WindowGeometry`; padding positions of a window
(beyond the feature map) carry no image content, so the weight they receive is left out of the maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..networks.blocks.windows import window_indices
from .recorder import Capture
from .sites import attention_sites, level_strides

__all__ = [
    "attention_rollout",
    "mean_attention_distance",
    "query_attention_map",
    "tokens_to_voxels",
    "voxels_to_tokens",
]


def voxels_to_tokens(voxels: torch.Tensor, stride: Sequence[int], token_shape: Sequence[int]) -> torch.Tensor:
    """Flat indices (unique, sorted) of the tokens of a grid with ``stride`` voxels per token that
    contain the voxels ``(V, n)`` (integer input-grid coordinates)."""
    tokens = torch.div(voxels.long(), torch.tensor(stride, device=voxels.device), rounding_mode="floor")
    shape = torch.tensor(token_shape, device=voxels.device)
    if (tokens < 0).any() or (tokens >= shape).any():
        raise ValueError(f"voxels {voxels.tolist()} lie outside the token grid {tuple(token_shape)} x {tuple(stride)}.")
    flat = torch.zeros(len(tokens), dtype=torch.long, device=voxels.device)
    for axis, size in enumerate(token_shape):
        flat = flat * size + tokens[:, axis]
    return flat.unique()


def tokens_to_voxels(token_map: torch.Tensor, stride: Sequence[int], spatial_shape: Sequence[int]) -> torch.Tensor:
    """``(..., *token_shape)`` -> ``(..., *spatial_shape)``: each voxel takes the value of its token."""
    n = len(stride)
    for axis, s in enumerate(stride):
        token_map = token_map.repeat_interleave(s, dim=token_map.ndim - n + axis)
    return token_map[(..., *(slice(0, size) for size in spatial_shape))]


def _window_positions(capture: Capture, tokens: torch.Tensor) -> torch.Tensor:
    """Position of each token in the (first batch item's) window layout."""
    _, scatter = window_indices(capture.geometry)
    return scatter[tokens.to(scatter.device)]


@torch.no_grad()
def query_attention_map(capture: Capture, query_tokens: torch.Tensor) -> torch.Tensor:
    """Where the query tokens attend: the mean over ``query_tokens`` (flat indices of the block's
    token grid) of their attention weights, scattered onto the key token grid.

    For a cross-attention the key grid is the same-stage encoder grid, the same shape as the query grid.

    Returns:
        ``(heads, *spatial_shape)``; each head's map sums to at most 1 (less by the weight on padding).
    """
    geometry = capture.geometry
    n = geometry.tokens_per_window
    total = math.prod(geometry.spatial_shape)
    gather, _ = window_indices(geometry)
    positions = _window_positions(capture, query_tokens)
    windows, rows = positions // n, positions % n
    unique_windows, which = windows.unique(return_inverse=True)
    per_query = capture.probabilities(unique_windows)[which, :, rows]  # (Q, heads, N)
    keys = gather.view(-1, n)[windows]  # (Q, N): key tokens, ``total`` for padding
    heads = per_query.shape[1]
    flat = torch.zeros(heads, total + 1, dtype=per_query.dtype, device=per_query.device)
    flat.index_add_(1, keys.reshape(-1), per_query.transpose(0, 1).reshape(heads, -1))
    return (flat[:, :total] / len(rows)).view(heads, *geometry.spatial_shape)


def _head_mean_windows(capture: Capture, chunk: int = 64) -> torch.Tensor:
    """Head-averaged attention weights ``(num_windows, N, N)`` of the first batch item."""
    num_windows = capture.geometry.num_windows
    parts = [capture.probabilities(torch.arange(start, min(start + chunk, num_windows))).mean(1)
             for start in range(0, num_windows, chunk)]
    return torch.cat(parts)


def _propagate_block(rows: torch.Tensor, attention: torch.Tensor, capture: Capture, residual: float) -> torch.Tensor:
    """``rows (R, T) @ ((1 - residual) A + residual I)`` for a windowed, block-diagonal ``A``."""
    geometry = capture.geometry
    total = rows.shape[1]
    gather, _ = window_indices(geometry)
    windowed = F.pad(rows, (0, 1))[:, gather].view(rows.shape[0], geometry.num_windows, -1)
    mixed = (1 - residual) * torch.einsum("rwq,wqk->rwk", windowed, attention) + residual * windowed
    out = torch.zeros(rows.shape[0], total + 1, dtype=rows.dtype, device=rows.device)
    out.index_add_(1, gather, mixed.reshape(rows.shape[0], -1))
    return out[:, :total]


def _propagate_merge(rows: torch.Tensor, coarse_shape: Sequence[int], fine_shape: Sequence[int],
                     factors: Sequence[int]) -> torch.Tensor:
    """Back through patch merging: each merged token's share goes equally to the fine tokens it was made of."""
    grid = rows.view(rows.shape[0], *coarse_shape) / math.prod(factors)
    return tokens_to_voxels(grid, factors, fine_shape).reshape(rows.shape[0], -1)


@torch.no_grad()
def attention_rollout(
    model: nn.Module,
    captures: dict[str, Capture],
    query_tokens: torch.Tensor,
    residual: float = 0.5,
    from_level: int | None = None,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020) through the encoder, from bottleneck tokens down to
    the stage-1 tokens.

    Each block's head-averaged attention ``A`` is mixed with the residual, ``(1 - residual) A + residual I``,
    and the products are taken block by block in reverse order: the shifted and the plain windows of a
    stage compose to a map wider than a window; patch merging sends each merged token's share equally
    to the fine tokens it concatenated.

    Args:
        model: the QTUNet whose encoder and bottleneck attention ``captures`` holds (an
            :class:`AttentionRecorder` on ``"encoder"`` and ``"bottleneck"``).
        captures: the recorded blocks by site name.
        query_tokens: flat indices of the tokens to start from (their rows are averaged), or a
            ``(R, T)`` matrix of start rows, on the token grid of the start level.
        residual: weight of the identity (0.5 in the rollout paper).
        from_level: start at the output of this level's blocks instead of the bottleneck (0: stage 1 only).

    Returns:
        ``(R, *stage1_token_shape)`` rollout rows (R = 1 for indices); each row sums to the share of its
        start row that does not end on padding.
    """
    sites = attention_sites(model)
    level = len(model.merges) if from_level is None else from_level
    encoder = [name for name in sites if name.startswith(("encoder.", "bottleneck.")) and sites[name].level <= level]
    missing = [name for name in encoder if name not in captures]
    if missing:
        raise ValueError(f"attention rollout needs every encoder block recorded; missing {missing}.")
    deepest = captures[encoder[-1]].geometry
    total = math.prod(deepest.spatial_shape)
    if query_tokens.ndim == 1:
        rows = torch.zeros(1, total, device=deepest.relative_index.device)
        rows[0, query_tokens] = 1.0 / len(query_tokens)
    else:
        rows = query_tokens.to(deepest.relative_index.device).float()
    shape = deepest.spatial_shape
    for name in reversed(encoder):
        capture = captures[name]
        if sites[name].level < level:  # crossed a patch merging on the way down
            level = sites[name].level
            rows = _propagate_merge(rows, shape, capture.geometry.spatial_shape, model.merges[level].factors)
        rows = _propagate_block(rows, _head_mean_windows(capture), capture, residual)
        shape = capture.geometry.spatial_shape
    return rows.view(rows.shape[0], *shape)


def _window_coordinates(capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-grid coordinates ``(num_windows, N, n)`` of each window position, and which are real tokens."""
    geometry = capture.geometry
    total = math.prod(geometry.spatial_shape)
    gather, _ = window_indices(geometry)
    grids = torch.meshgrid([torch.arange(s, device=gather.device) for s in geometry.spatial_shape],
                           indexing="ij")
    coords = torch.stack([g.reshape(-1) for g in grids], dim=-1).float()
    coords = torch.cat([coords, torch.zeros(1, coords.shape[1], device=coords.device)])  # padding: ignored
    n = geometry.tokens_per_window
    real = (gather < total).view(-1, n)
    return coords[gather].view(-1, n, coords.shape[1]), real


@torch.no_grad()
def mean_attention_distance(capture: Capture, token_spacing: Sequence[float], chunk: int = 64) -> torch.Tensor:
    """Mean attention distance of a block per head (Dosovitskiy et al., 2021): for every query token,
    the attention-weighted mean distance to its keys, averaged over all query tokens of the map.

    Distances are between token centres in physical units (``token_spacing`` per axis, e.g. mm);
    queries and keys on padding are left out and each query's weights renormalised over real keys.

    Returns:
        ``(heads,)``.
    """
    geometry = capture.geometry
    coords, real = _window_coordinates(capture)
    spacing = torch.tensor(list(token_spacing), dtype=coords.dtype, device=coords.device)
    total_distance, total_queries = 0.0, 0
    for start in range(0, geometry.num_windows, chunk):
        windows = torch.arange(start, min(start + chunk, geometry.num_windows), device=coords.device)
        weights = capture.probabilities(windows)  # (w, heads, N, N)
        key_real = real[windows][:, None, None, :].to(weights.dtype)
        weights = weights * key_real
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
        position = coords[windows] * spacing
        distance = torch.cdist(position, position)  # (w, N, N)
        per_query = (weights * distance[:, None]).sum(-1)  # (w, heads, N)
        query_real = real[windows][:, None, :].to(per_query.dtype)
        total_distance = total_distance + (per_query * query_real).sum((0, 2))
        total_queries += int(real[windows].sum())
    return total_distance / max(total_queries, 1)


def level_token_spacing(model: nn.Module, level: int, voxel_spacing: Sequence[float]) -> tuple[float, ...]:
    """Physical size of a token of ``level`` per axis: voxel spacing times voxels per token."""
    return tuple(float(v) * s for v, s in zip(voxel_spacing, level_strides(model)[level]))
