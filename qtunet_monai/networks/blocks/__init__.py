# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
from .attention import WindowAttention, WindowCrossAttention
from .patching import PatchEmbedding, PatchExpanding, PatchMerging
from .transformer import (
    DecoderStage,
    EncoderStage,
    QTDecoderSubBlock,
    SwinSubBlock,
    VTDecoderSubBlock,
    sinusoidal_position_encoding,
)
from .windows import WindowGeometry, relative_position_index, window_geometry
