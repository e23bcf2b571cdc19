# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Look inside a QT-UNet: cross- and self-attention maps of a voxel, attention rollout through the
encoder, mean attention distance per block and head, ablation of attention blocks and of UCTransNet's
skips, a CCT's channel attention, and where a conditional network's routers send the heavy compute.

The tools work on any :class:`~qtunet_monai.networks.QTUNet`, fused attention included: forward
hooks, registered only while a tool runs and only on the blocks asked for, capture the blocks'
inputs; the attention weights are then recomputed explicitly from each block's own projections,
relative-position bias and shift mask. The network's forward pass and training are untouched.
``python -m qtunet_monai explain`` runs them on a trained bundle.
"""

from .ablation import ablate
from .channels import ChannelAttentionRecorder, SkipSite, attention_mass_table, skip_sites
from .maps import (
    attention_rollout,
    level_token_spacing,
    mean_attention_distance,
    query_attention_map,
    tokens_to_voxels,
    voxels_to_tokens,
)
from .recorder import AttentionRecorder, Capture
from .report import (
    ablation_dice,
    attention_distance_table,
    class_names,
    explain_image,
    format_ablation_table,
    load_bundle_network,
    parse_voxels,
)
from .routing import RoutingCapture, RoutingRecorder, heavy_share_table, routed_blocks
from .sites import (
    AttentionSite,
    attention_probabilities,
    attention_sites,
    explicit_attention_output,
    level_strides,
    select_sites,
)

__all__ = [
    "AttentionRecorder",
    "AttentionSite",
    "Capture",
    "ChannelAttentionRecorder",
    "RoutingCapture",
    "RoutingRecorder",
    "SkipSite",
    "ablate",
    "ablation_dice",
    "attention_distance_table",
    "attention_mass_table",
    "attention_probabilities",
    "attention_rollout",
    "class_names",
    "attention_sites",
    "explain_image",
    "explicit_attention_output",
    "format_ablation_table",
    "heavy_share_table",
    "level_strides",
    "level_token_spacing",
    "load_bundle_network",
    "mean_attention_distance",
    "parse_voxels",
    "query_attention_map",
    "routed_blocks",
    "select_sites",
    "skip_sites",
    "tokens_to_voxels",
    "voxels_to_tokens",
]
