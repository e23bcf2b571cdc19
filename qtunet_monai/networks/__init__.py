# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The QT-UNet network family (2D and 3D) and its building blocks."""
from .blocks.attention_backends import use_attention_backend
from .nets import ARCHITECTURES, VARIANTS, EncoderFeatures, QTUNet, QTUNetEncoder, build_architecture

__all__ = [
    "ARCHITECTURES",
    "VARIANTS",
    "EncoderFeatures",
    "QTUNet",
    "QTUNetEncoder",
    "build_architecture",
    "use_attention_backend",
]
