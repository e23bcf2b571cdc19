# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
from .attention import WindowAttention, WindowCrossAttention
from .attention_backends import ATTENTION_FUNCTIONS, AttentionBackend, use_attention_backend
from .channel_transformer import (
    CCT_PRESETS,
    ChannelCrossAttention,
    ChannelEmbedding,
    ChannelGate,
    ChannelTransformer,
    ChannelTransformerLayer,
)
from .conditional import BlockRouting, IterativeRouter, LightRouter, coordinate_descent_top_k
from .decoder import (
    DECODERS,
    DecoderStage,
    DecoderSubBlock,
    QTDecoderSubBlock,
    SwinDecoderSubBlock,
    VTDecoderSubBlock,
)
from .detail import DetailPath
from .encoder import EncoderStage, SwinSubBlock
from .head import SegmentationHead
from .patching import PatchEmbedding, PatchExpanding, PatchMerging
from .skips import SKIPS, SkipGeometry, SkipKind
from .swin import sinusoidal_position_encoding
from .windows import WindowGeometry, relative_position_index, window_geometry

__all__ = [
    "ATTENTION_FUNCTIONS",
    "AttentionBackend",
    "CCT_PRESETS",
    "ChannelCrossAttention",
    "ChannelEmbedding",
    "ChannelGate",
    "ChannelTransformer",
    "BlockRouting",
    "ChannelTransformerLayer",
    "DECODERS",
    "IterativeRouter",
    "LightRouter",
    "coordinate_descent_top_k",
    "DecoderStage",
    "DecoderSubBlock",
    "DetailPath",
    "EncoderStage",
    "PatchEmbedding",
    "PatchExpanding",
    "PatchMerging",
    "QTDecoderSubBlock",
    "SKIPS",
    "SegmentationHead",
    "SkipGeometry",
    "SkipKind",
    "SwinDecoderSubBlock",
    "SwinSubBlock",
    "VTDecoderSubBlock",
    "WindowAttention",
    "WindowCrossAttention",
    "WindowGeometry",
    "relative_position_index",
    "sinusoidal_position_encoding",
    "use_attention_backend",
    "window_geometry",
]
