# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Bad arguments and bad input fail early with a clear ValueError."""

from __future__ import annotations

import pytest
import torch

from qtunet_monai import QTUNet, build_architecture


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
        ({"decoder": "unet"}, "unknown decoder 'unet'"),
        ({"variant": "huge"}, "unknown variant 'huge'"),
        ({"variant": "base", "feature_size": 72}, "variant='base' means feature_size=96"),
        ({"feature_size": 50}, "feature_size=50 cannot work"),
        ({"feature_size": 0}, "feature_size must be a positive integer"),
        ({"window_size": 0}, "window_size must be a positive integer"),
        ({"window_size": 4, "shift_size": 4}, "shift_size must be in [0, window_size=4)"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"drop_path_rate": 1.5}, "drop_path_rate must be in [0, 1)"),
        ({"num_heads": (3, 6, 12)}, "num_heads needs 4 entries"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        QTUNet(**{"in_channels": 1, "out_channels": 2, **kwargs})
    assert message in str(excinfo.value)


def test_variant_shortcut_sets_the_width():
    assert QTUNet(1, 2).feature_size == 48
    assert QTUNet(1, 2, variant="small").feature_size == 72
    assert QTUNet(1, 2, variant="B").feature_size == 96
    assert QTUNet(1, 2, feature_size=96, variant="base").feature_size == 96  # agreeing with the variant is fine


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'SwinUNETR'"):
        build_architecture("SwinUNETR", 1, 2)


def test_wrong_channel_count_names_both_counts():
    net = QTUNet(4, 3, feature_size=12)
    with pytest.raises(ValueError, match=r"built for 4 input channel\(s\) but the input has 1"):
        net(torch.randn(1, 1, 16, 16, 16))


@pytest.mark.parametrize("spatial_dims, shape", [(3, (1, 1, 16, 16)), (2, (1, 1, 16, 16, 16)), (3, (16, 16, 16))])
def test_wrong_number_of_spatial_dimensions(spatial_dims, shape):
    net = QTUNet(1, 2, spatial_dims=spatial_dims, feature_size=12)
    with pytest.raises(ValueError, match=f"QTUNet\\(spatial_dims={spatial_dims}\\) expects input of shape"):
        net(torch.randn(shape))
