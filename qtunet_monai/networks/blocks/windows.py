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
from monai.networks.nets.swin_unetr import compute_mask, get_window_size, window_partition, window_reverse

__all__ = ["WindowGeometry", "window_geometry", "relative_position_index"]

# The MONAI Swin helpers keep Swin's convention of a large negative (not -inf) mask value, which
# stays finite in fp16 and never produces a fully masked row.


@dataclass(frozen=True, eq=False)
class WindowGeometry:
    """How a channels-last feature map of one spatial shape is cut into attention windows.

    Attributes:
        spatial_shape: the (unpadded) spatial shape of the feature map.
        window_size: the window per axis (shrunk to the map on axes no larger than the window).
        shift_size: the cyclic shift per axis (0 on axes where the window was shrunk).
        padded_shape: ``spatial_shape`` padded at the end to a multiple of ``window_size``.
        attn_mask: ``(num_windows, N, N)`` additive mask between shifted regions, or None.
        relative_index: ``(N, N)`` index into a ``(2w-1)^n`` relative-position bias table.
    """

    spatial_shape: tuple[int, ...]
    window_size: tuple[int, ...]
    shift_size: tuple[int, ...]
    padded_shape: tuple[int, ...]
    attn_mask: torch.Tensor | None
    relative_index: torch.Tensor

    @property
    def tokens_per_window(self) -> int:
        return math.prod(self.window_size)

    @property
    def num_windows(self) -> int:
        return math.prod(p // w for p, w in zip(self.padded_shape, self.window_size))

    def partition(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *spatial, C)`` -> ``(B * num_windows, N, C)``: pad at the end, shift, cut."""
        pads: list[int] = []
        for size, padded in zip(reversed(self.spatial_shape), reversed(self.padded_shape)):
            pads += [0, padded - size]
        if any(pads):
            x = F.pad(x, [0, 0] + pads)  # the channel axis is last and never padded
        if any(self.shift_size):
            axes = tuple(range(1, 1 + len(self.shift_size)))
            x = torch.roll(x, shifts=tuple(-s for s in self.shift_size), dims=axes)
        return window_partition(x, self.window_size)

    def reverse(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of :meth:`partition`: ``(B * num_windows, N, C)`` -> ``(B, *spatial, C)``."""
        x = window_reverse(windows, self.window_size, (batch, *self.padded_shape))
        if any(self.shift_size):
            axes = tuple(range(1, 1 + len(self.shift_size)))
            x = torch.roll(x, shifts=self.shift_size, dims=axes)
        if self.padded_shape != self.spatial_shape:
            x = x[(slice(None), *(slice(0, s) for s in self.spatial_shape))]
        return x


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
    return WindowGeometry(spatial_shape, window_size, shift_size, padded, mask, index)


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
