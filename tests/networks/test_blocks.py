# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The building blocks: window geometry, relative-position indices, patch (un)folding."""

from __future__ import annotations

import pytest
import torch

from qtunet_monai.networks.blocks import relative_position_index, sinusoidal_position_encoding, window_geometry
from qtunet_monai.networks.blocks.patching import PatchExpanding, PatchMerging, channels_to_space, space_to_channels

CPU = torch.device("cpu")


@pytest.mark.parametrize("shape, shift", [((9, 10, 7), 1), ((9, 10, 7), 0), ((11, 5), 1), ((2, 3, 8), 1)])
def test_partition_then_reverse_is_identity(shape, shift):
    geometry = window_geometry(shape, window=3, shift=shift, device=CPU)
    x = torch.randn(2, *shape, 4)
    windows = geometry.partition(x)
    assert windows.shape == (2 * geometry.num_windows, geometry.tokens_per_window, 4)
    torch.testing.assert_close(geometry.reverse(windows, 2), x)


def test_small_axes_shrink_the_window_and_are_not_shifted():
    geometry = window_geometry((2, 9, 3), window=3, shift=1, device=CPU)
    assert geometry.window_size == (2, 3, 3)
    assert geometry.shift_size == (0, 1, 0)


def test_shift_mask_separates_regions_that_the_roll_brought_together():
    geometry = window_geometry((6, 3), window=3, shift=1, device=CPU)
    # along axis 0 the rolled order is rows 1,2,3,4,5,0: the last window mixes rows 4,5 with the
    # wrapped row 0; axis 1 fits in one window and is not shifted. Token (i, j) is i * 3 + j.
    assert geometry.attn_mask.shape == (2, 9, 9)
    assert (geometry.attn_mask[0] == 0).all()
    last = geometry.attn_mask[1]
    assert last[0, 3] == 0 and last[0, 6] < -50 and last[6, 8] == 0


def test_relative_index_of_a_shrunk_window_uses_the_true_offsets():
    full = relative_position_index((7, 7), 7)
    small = relative_position_index((2, 3), 7)
    # token (i, j) of a 2x3 window is token (i, j) of the 7x7 window: same offsets, same table rows
    rows = [i * 7 + j for i in range(2) for j in range(3)]
    torch.testing.assert_close(small, full[rows][:, rows])
    assert int(full.max()) == 13 * 13 - 1 and int(full.min()) == 0


@pytest.mark.parametrize("factors", [(2, 2, 2), (2, 2, 1), (4, 4)])
def test_space_to_channels_round_trip(factors):
    shape = (2, *[4 * f for f in factors], 3)
    x = torch.randn(shape)
    folded = space_to_channels(x, factors)
    assert folded.shape[-1] == 3 * int(torch.tensor(factors).prod())
    torch.testing.assert_close(channels_to_space(folded, factors), x)


def test_merging_pads_odd_sizes_and_expansion_crops_back():
    merge, expand = PatchMerging(8, (2, 2, 2)), PatchExpanding(16, (2, 2, 2), 8)
    x = torch.randn(1, 5, 7, 3, 8)
    merged = merge(x)
    assert merged.shape == (1, 3, 4, 2, 16)
    assert expand(merged, x.shape[1:-1]).shape == x.shape


def test_merging_concatenates_neighbourhoods():
    x = torch.arange(16.0).view(1, 4, 4, 1)
    folded = space_to_channels(x, (2, 2))
    assert folded[0, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


def test_position_encoding_is_bounded_and_distinct_per_position():
    pe = sinusoidal_position_encoding((4, 5, 6), 30, CPU)
    assert pe.shape == (4, 5, 6, 30)
    assert pe.abs().max() <= 1.0
    flat = pe.reshape(-1, 30)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 0


@pytest.mark.parametrize("shape, shift", [((9, 10, 7), 1), ((8, 6, 5), 0), ((11, 5), 1), ((2, 9, 8), 1), ((7, 7, 7), 1)])
def test_partition_is_undone_by_reverse_and_matches_explains_indices(shape, shift):
    """The cut is exact both ways, and explain's on-demand gather/scatter indices place every token where
    the cut does (padding at the zero token)."""
    from qtunet_monai.networks.blocks.windows import window_indices

    geometry = window_geometry(shape, window=3, shift=shift, device=CPU)
    x = torch.randn(2, *shape, 4)
    windows = geometry.partition(x)
    assert windows.shape == (2 * geometry.num_windows, geometry.tokens_per_window, 4)
    assert torch.equal(geometry.reverse(windows, 2), x)
    gather, scatter = window_indices(geometry)
    flat = torch.nn.functional.pad(x.reshape(2, -1, 4), (0, 0, 0, 1))  # the zero token padding points at
    assert torch.equal(flat[:, gather].reshape(windows.shape), windows)
    assert torch.equal(windows.reshape(2, -1, 4)[:, scatter], x.reshape(2, -1, 4))
