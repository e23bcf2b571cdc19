# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Window geometry shared by every (shifted-)window attention of a stage.

A stage runs all its sub-blocks on one feature-map size, so the padding, window size, shift,
shift mask and relative-position index are computed once per (size, window, shift, device) and
cached; the forward pass only looks them up.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import compute_mask, get_window_size, window_partition

__all__ = ["WindowGeometry", "window_geometry", "relative_position_index"]

# The MONAI Swin helpers keep Swin's convention of a large negative (not -inf) mask value, which
# stays finite in fp16 and never produces a fully masked row.


@dataclass(frozen=True, eq=False)
class WindowGeometry:
    """How a channels-last feature map of one spatial shape is cut into attention windows.

    Padding, the cyclic shift and the cut into windows are one cached index: :meth:`partition` is a
    single gather and :meth:`reverse` a single gather back (shift undone and padding cropped), where
    the textbook pad + roll + permute takes three copies each way and ``torch.roll`` alone costs
    more than all the rest.

    Attributes:
        spatial_shape: the (unpadded) spatial shape of the feature map.
        window_size: the window per axis (shrunk to the map on axes no larger than the window).
        shift_size: the cyclic shift per axis (0 on axes where the window was shrunk).
        padded_shape: ``spatial_shape`` padded at the end to a multiple of ``window_size``.
        attn_mask: ``(num_windows, N, N)`` additive mask between shifted regions, or None.
        relative_index: ``(N, N)`` index into a ``(2w-1)^n`` relative-position bias table.
        gather_index: ``(num_windows * N,)`` token of the flattened map at each window position;
            padding points one past the end, at a zero token.
        scatter_index: ``(prod(spatial_shape),)`` window position of each token of the map.
    """

    spatial_shape: tuple[int, ...]
    window_size: tuple[int, ...]
    shift_size: tuple[int, ...]
    padded_shape: tuple[int, ...]
    attn_mask: torch.Tensor | None
    relative_index: torch.Tensor
    gather_index: torch.Tensor
    scatter_index: torch.Tensor

    @property
    def tokens_per_window(self) -> int:
        return math.prod(self.window_size)

    @property
    def num_windows(self) -> int:
        return math.prod(p // w for p, w in zip(self.padded_shape, self.window_size))

    @property
    def is_padded(self) -> bool:
        return self.padded_shape != self.spatial_shape

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *spatial, C)`` -> ``(B * num_windows, N, C)``: pad at the end, shift, cut."""
        b, c = x.shape[0], x.shape[-1]
        flat = x.reshape(b, -1, c)
        if self.is_padded:
            flat = F.pad(flat, (0, 0, 0, 1))  # the zero token that padding positions point at
        return flat.index_select(1, self.gather_index).view(-1, self.tokens_per_window, c)

    def reverse(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of :meth:`partition`: ``(B * num_windows, N, C)`` -> ``(B, *spatial, C)``."""
        c = windows.shape[-1]
        flat = windows.reshape(batch, -1, c).index_select(1, self.scatter_index)
        return flat.view(batch, *self.spatial_shape, c)


def _window_indices(spatial_shape, padded_shape, window_size, shift_size, device):
    """Gather and scatter indices of :class:`WindowGeometry` (see there)."""
    tokens = math.prod(spatial_shape)
    grid = torch.arange(tokens, device=device).view(spatial_shape)
    pads: list[int] = []
    for size, padded in zip(reversed(spatial_shape), reversed(padded_shape)):
        pads += [0, padded - size]
    grid = F.pad(grid, pads, value=tokens)  # padding -> the zero token
    if any(shift_size):
        grid = torch.roll(grid, shifts=tuple(-s for s in shift_size), dims=tuple(range(len(shift_size))))
    gather = window_partition(grid[None, ..., None], window_size).reshape(-1)
    real = gather < tokens
    scatter = torch.empty(tokens, dtype=torch.long, device=device)
    scatter[gather[real]] = torch.arange(gather.numel(), device=device)[real]
    return gather, scatter


def relative_position_index(window_size: Sequence[int], table_window: int, device: torch.device | None = None):
    """Index of each (query, key) pair of a window into a ``(2 * table_window - 1)^n`` bias table.

    The table is sized for the full window; a shrunk window (on a small feature map) indexes the
    entries of its true relative offsets, so a bias learned at one input size means the same
    offsets at another.
    """
    grids = torch.meshgrid([torch.arange(w, device=device) for w in window_size], indexing="ij")
    coords = torch.stack(grids).flatten(1)  # (n, N)
    relative = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # (n, N, N), in [0, 2w-2]
    index = torch.zeros_like(relative[0])
    for axis in range(len(window_size)):
        index = index * (2 * table_window - 1) + relative[axis]
    return index


def _build_geometry(spatial_shape: tuple[int, ...], window: int, shift: int, device: torch.device) -> WindowGeometry:
    full = (window,) * len(spatial_shape)
    window_size, shift_size = get_window_size(spatial_shape, full, (shift,) * len(spatial_shape))
    window_size, shift_size = tuple(int(w) for w in window_size), tuple(int(s) for s in shift_size)
    padded = tuple(math.ceil(s / w) * w for s, w in zip(spatial_shape, window_size))
    # Cached tensors must be ordinary tensors even when first built under inference_mode, or a
    # later training step could not save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        mask = compute_mask(padded, window_size, shift_size, device) if any(shift_size) else None
        index = relative_position_index(window_size, window, device)
        gather, scatter = _window_indices(spatial_shape, padded, window_size, shift_size, device)
    return WindowGeometry(spatial_shape, window_size, shift_size, padded, mask, index, gather, scatter)


def window_geometry(spatial_shape: Sequence[int], window: int, shift: int, device: torch.device) -> WindowGeometry:
    """The cached :class:`WindowGeometry` for a feature map.

    Args:
        spatial_shape: spatial shape of the channels-last feature map.
        window: the nominal window size per axis.
        shift: the nominal cyclic shift (0 for plain windows); axes where the map is no larger than
            the window get a window equal to the map and no shift.
        device: where the mask and index tensors live.
    """
    key = (tuple(int(s) for s in spatial_shape), int(window), int(shift), torch.device(device))
    if torch.jit.is_tracing():
        # A tracer records whatever runs: build afresh so every trace holds the same graph, and keep
        # traced tensors out of the cache.
        return _build_geometry(*key)
    return _cached_geometry(*key)


_cached_geometry = functools.lru_cache(maxsize=128)(_build_geometry)
