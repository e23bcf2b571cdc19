# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Window geometry shared by every (shifted-)window attention of a stage.

A stage runs all its sub-blocks on one feature-map size, so the padding, window size, shift,
shift mask and relative-position index are computed once per (size, window, shift, device) and
cached; the forward pass only looks them up.

Windows are cut by pad + roll + view/permute (which inductor fuses into one copy). A cut by one
cached gather index measured no faster on a CPU (docs/performance.md, "Hot path"), and index tensors
computed in a ``torch.compile`` graph reach inductor as index arithmetic it must simplify
symbolically (more than 12 minutes for a small 3D net; 3.5 minutes with pad + roll); the gather and
scatter indices that explain reads are built on demand (:func:`window_indices`).

Under ``torch.compile`` the geometry is built inside the graph instead of being read from the
cache. With default arguments a second input size
makes dynamo trace with symbolic sizes, which is correct but slow to compile (minutes even with
the ``aot_eager`` backend); the bundles therefore compile with ``dynamic=False``: one static graph
per input size, and training and sliding-window inference see a single size.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import get_window_size, window_partition, window_reverse

__all__ = [
    "WindowGeometry",
    "window_geometry",
    "window_indices",
    "window_validity",
    "relative_position_index",
    "shift_regions",
    "region_mask",
    "MASK_VALUE",
]

#: Swin's additive mask value between shifted regions (as MONAI's ``compute_mask``): large and
#: negative but finite, so it stays finite in fp16 and never produces a fully masked row.
MASK_VALUE = -100.0


@dataclass(frozen=True, eq=False)
class WindowGeometry:
    """How a channels-last feature map of one spatial shape is cut into attention windows:
    :meth:`partition` pads at the end, shifts and cuts, :meth:`reverse` undoes all three.

    Attributes:
        spatial_shape: the (unpadded) spatial shape of the feature map.
        window_size: the window per axis (shrunk to the map on axes no larger than the window).
        shift_size: the cyclic shift per axis (0 on axes where the window was shrunk).
        padded_shape: ``spatial_shape`` padded at the end to a multiple of ``window_size``.
        attn_mask: ``(num_windows, N, N)`` additive mask between shifted regions, or None.
        relative_index: ``(N, N)`` index into a ``(2w-1)^n`` relative-position bias table.
        region_index: ``(num_windows, N)`` shifted region of each window position (tokens attend
            only within their region: ``attn_mask`` is :data:`MASK_VALUE` where regions differ), or
            None without a shift. Lets an attention kernel compute the mask instead of reading it.
    """

    spatial_shape: tuple[int, ...]
    window_size: tuple[int, ...]
    shift_size: tuple[int, ...]
    padded_shape: tuple[int, ...]
    attn_mask: torch.Tensor | None
    relative_index: torch.Tensor
    region_index: torch.Tensor | None = None

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
        x = F.pad(x, [0, 0, *_end_pads(self.spatial_shape, self.padded_shape)])  # channels last: no pad
        if any(self.shift_size):
            x = torch.roll(x, shifts=tuple(-s for s in self.shift_size), dims=self._axes)
        return window_partition(x, self.window_size)

    def reverse(self, windows: torch.Tensor, batch: int) -> torch.Tensor:
        """Inverse of :meth:`partition`: ``(B * num_windows, N, C)`` -> ``(B, *spatial, C)``."""
        x = window_reverse(windows, self.window_size, (batch, *self.padded_shape))
        if any(self.shift_size):
            x = torch.roll(x, shifts=self.shift_size, dims=self._axes)
        return x[(slice(None), *(slice(0, s) for s in self.spatial_shape))]

    @property
    def _axes(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.spatial_shape) + 1))


def _end_pads(spatial_shape, padded_shape) -> list[int]:
    """``F.pad`` amounts (last axis first) that pad each spatial axis at its end to ``padded_shape``."""
    pads: list[int] = []
    for size, padded in zip(reversed(spatial_shape), reversed(padded_shape)):
        pads += [0, padded - size]
    return pads


@functools.lru_cache(maxsize=128)
def _window_indices(spatial_shape, padded_shape, window_size, shift_size, device):
    # index grids moved through the same pad, roll and window cut as the features
    tokens = math.prod(spatial_shape)
    grid = torch.arange(tokens, device=device).view(spatial_shape)
    grid = F.pad(grid, _end_pads(spatial_shape, padded_shape), value=tokens)  # padding -> the zero token
    axes = tuple(range(len(shift_size)))
    if any(shift_size):
        grid = torch.roll(grid, shifts=tuple(-s for s in shift_size), dims=axes)
    gather = window_partition(grid[None, ..., None], window_size).reshape(-1)
    # the window position of every point of the shifted, padded map; unshifted and cropped, of every token
    positions = torch.arange(gather.numel(), device=device).view(-1, math.prod(window_size), 1)
    grid = window_reverse(positions, window_size, (1, *padded_shape))[0, ..., 0]
    if any(shift_size):
        grid = torch.roll(grid, shifts=tuple(shift_size), dims=axes)
    scatter = grid[tuple(slice(0, s) for s in spatial_shape)].reshape(-1)
    return gather, scatter


def shift_regions(padded_shape, window_size, shift_size, device) -> torch.Tensor:
    """``(num_windows, N)`` region of each window position of a shifted map: the regions of MONAI's
    ``compute_mask`` (per shifted axis: the part that stays, the window before the wrap, the wrapped
    part), computed per axis and combined, which traces to a few arithmetic ops instead of 27 slice
    assignments."""
    regions = torch.zeros((1,) * len(padded_shape), dtype=torch.long, device=device)
    for axis, (size, window, shift) in enumerate(zip(padded_shape, window_size, shift_size)):
        coords = torch.arange(size, device=device)
        per_axis = (coords >= size - window).long() + (coords >= size - shift).long() if shift else coords * 0
        view = [1] * len(padded_shape)
        view[axis] = size
        regions = regions * 3 + per_axis.view(view)
    return window_partition(regions[None, ..., None], window_size).squeeze(-1)


def _build_validity(spatial_shape, padded_shape, window_size, shift_size, device) -> torch.Tensor:
    grid = F.pad(torch.ones(spatial_shape, dtype=torch.long, device=device), _end_pads(spatial_shape, padded_shape))
    if any(shift_size):
        grid = torch.roll(grid, shifts=tuple(-s for s in shift_size), dims=tuple(range(len(shift_size))))
    return window_partition(grid[None, ..., None], window_size).squeeze(-1) > 0


@functools.lru_cache(maxsize=128)
def _cached_validity(spatial_shape, padded_shape, window_size, shift_size, device) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        return _build_validity(spatial_shape, padded_shape, window_size, shift_size, device)


def window_validity(geometry: WindowGeometry) -> torch.Tensor | None:
    """``(num_windows, N)`` bool: True at the window positions that hold a token of the map, False at
    padding; None when the map is not padded. Every window holds at least one token (padding is
    narrower than a window on every axis). Cached per geometry; built in the graph under a tracer or
    ``torch.compile`` (as :func:`window_geometry`). Only the conditional blocks read it, so the dense
    network's graph does not change."""
    if not geometry.is_padded:
        return None
    shapes = (geometry.spatial_shape, geometry.padded_shape, geometry.window_size, geometry.shift_size)
    device = geometry.relative_index.device
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return _build_validity(*shapes, device)
    return _cached_validity(*(tuple(int(s) for s in shape) for shape in shapes), device)


def region_mask(regions: torch.Tensor) -> torch.Tensor:
    """``(num_windows, N, N)`` additive mask: :data:`MASK_VALUE` between positions of different regions."""
    different = regions.unsqueeze(1) != regions.unsqueeze(2)
    return torch.zeros(different.shape, device=regions.device).masked_fill(different, MASK_VALUE)


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


def window_indices(geometry: WindowGeometry) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each token goes in the windows of ``geometry`` (for explain's maps; built on demand, cached).

    Returns:
        ``gather``: ``(num_windows * N,)`` token of the flattened map (first batch item) at each window
        position, ``prod(spatial_shape)`` (one past the last token) at padding; ``scatter``:
        ``(prod(spatial_shape),)`` window position of each token. ``geometry.partition`` equals
        gathering the flattened map, with a zero token appended, at ``gather``.
    """
    shapes = (geometry.spatial_shape, geometry.padded_shape, geometry.window_size, geometry.shift_size)
    with torch.inference_mode(False), torch.no_grad():
        return _window_indices(*(tuple(int(s) for s in shape) for shape in shapes), geometry.relative_index.device)


def _build_geometry(spatial_shape: tuple, window: int, shift: int, device: torch.device) -> WindowGeometry:
    full = (window,) * len(spatial_shape)
    window_size, shift_size = get_window_size(spatial_shape, full, (shift,) * len(spatial_shape))
    # ceiling division in integers keeps symbolic sizes symbolic under torch.compile
    padded = tuple(-(-s // w) * w for s, w in zip(spatial_shape, window_size))
    regions = shift_regions(padded, window_size, shift_size, device) if any(shift_size) else None
    mask = region_mask(regions) if regions is not None else None
    index = relative_position_index(window_size, window, device)
    return WindowGeometry(tuple(spatial_shape), tuple(window_size), tuple(shift_size), padded, mask, index, regions)


@functools.lru_cache(maxsize=128)
def _cached_geometry(spatial_shape: tuple[int, ...], window: int, shift: int, device: torch.device) -> WindowGeometry:
    # Cached tensors must be ordinary tensors even when first built under inference_mode, or a
    # later training step could not save them for backward.
    with torch.inference_mode(False), torch.no_grad():
        return _build_geometry(spatial_shape, window, shift, device)


def window_geometry(spatial_shape: Sequence[int], window: int, shift: int, device: torch.device) -> WindowGeometry:
    """The cached :class:`WindowGeometry` for a feature map.

    Args:
        spatial_shape: spatial shape of the channels-last feature map.
        window: the nominal window size per axis.
        shift: the nominal cyclic shift (0 for plain windows); axes where the map is no larger than
            the window get a window equal to the map and no shift.
        device: where the mask and index tensors live.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        # Build in the graph: a tracer records whatever runs, so every trace holds the same graph
        # and no traced tensor enters the cache; torch.compile keeps sizes symbolic (no int()).
        return _build_geometry(tuple(spatial_shape), window, shift, torch.device(device))
    key = (tuple(int(s) for s in spatial_shape), int(window), int(shift), torch.device(device))
    return _cached_geometry(*key)
