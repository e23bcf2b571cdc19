# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The family's weight initialisation, in one place."""

from __future__ import annotations

from torch import nn

__all__ = ["init_weights"]


def init_weights(module: nn.Module) -> None:
    """Swin's initialisation (``module.apply(init_weights)``): truncated normal (std 0.02) for linear layers and
    relative-position bias tables, zero biases, unit LayerNorms; convolutions are left to their owners."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if hasattr(module, "relative_position_bias_table"):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)
