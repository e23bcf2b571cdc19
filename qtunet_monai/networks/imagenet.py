# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Initialise the QT-UNet encoder from a 2D Swin-T ImageNet checkpoint, inflated to 3D as VT-UNet and
the thesis did for the Base variant (C = 96, heads 3-6-12-24). Nothing is downloaded: the user gives
the file (timm's ``swin_tiny_patch4_window7_224`` or Microsoft's ``swin_tiny_patch4_window7_224.pth``).

Mapping (Swin-T has 2-2-6-2 blocks; QT-UNet's encoder 2-2-2 and a 1-block bottleneck):

- patch embedding: the RGB kernel is summed over colour and shared by the input channels
  (divided by their number); in 3D it is repeated along depth and divided by the depth patch size,
  so a volume that is constant along depth gives each slice the 2D embedding;
- stage ``i`` block ``j`` (j < 2) <- Swin layer ``i`` block ``j``; the bottleneck <- layer 3 block 0;
  ``bottleneck_norm`` <- Swin's final norm;
- relative-position bias tables: the 2D table repeated over every depth offset;
- patch merging ``i`` <- Swin's downsampling after layer ``i`` (``layers.i.downsample`` in the
  official code, ``layers.{i+1}.downsample`` in timm); each of the 2x2x2 neighbours takes the weight
  of its in-plane neighbour, halved (two depth neighbours share it), and the LayerNorm is repeated.

With these choices a depth-constant input reproduces the 2D network's features through the
patch embedding and the merging layers exactly (tested).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from .nets.qtunet import QTUNet
from .utils import unwrap_module, unwrap_state_dict

__all__ = ["swin_to_qtunet", "load_imagenet_swin"]

logger = logging.getLogger(__name__)
_BLOCK_PARTS = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj", "norm2": "norm2",
                "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}


def _merge_offsets(factors: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Neighbour offsets in the order of QT-UNet's ``space_to_channels`` (row-major over axes)."""
    return [tuple(int(v) for v in o) for o in torch.cartesian_prod(*[torch.arange(f) for f in factors]).reshape(
        -1, len(factors)).tolist()]


def swin_to_qtunet(state: Mapping[str, torch.Tensor], network: QTUNet) -> dict[str, torch.Tensor]:
    """A 2D Swin-T state dict (timm or official names) -> QT-UNet encoder tensors for ``network``.

    Raises:
        ValueError: the checkpoint is not a Swin with 4 stages, its width differs from the network's, or the
            network is not the thesis' encoder (3 stages and the bottleneck, patch size 4).
    """
    state = unwrap_state_dict(state)
    if "patch_embed.proj.weight" not in state or "layers.3.blocks.0.attn.qkv.weight" not in state:
        raise ValueError("not a Swin Transformer checkpoint: 'patch_embed.proj.weight' or "
                         "'layers.3.blocks.0.attn.qkv.weight' is missing.")
    width = state["patch_embed.proj.weight"].shape[0]
    if width != network.feature_size:
        raise ValueError(f"the checkpoint has width C={width} but the network C={network.feature_size}: "
                         f"build it with feature_size={width} (Swin-T/S: 96 = QT-UNet-B).")
    if (network.num_stages, network.patch_size) != (3, 4):
        raise ValueError(f"Swin-T's stages fit QT-UNet's encoder with num_stages=3 and patch_size=4 only; the network "
                         f"has num_stages={network.num_stages}, patch_size={network.patch_size}.")
    official = "layers.0.downsample.reduction.weight" in state
    own = network.state_dict()
    dims = network.spatial_dims
    out: dict[str, torch.Tensor] = {}

    # patch embedding
    kernel = state["patch_embed.proj.weight"].float()  # (C, 3, p, p)
    target = own["patch_embed.proj.weight"]  # (C, n, p, p[, p_d])
    n = target.shape[1]
    if not (n == kernel.shape[1] and dims == 2):
        kernel = kernel.sum(1, keepdim=True).repeat(1, n, 1, 1) / n
    if dims == 3:
        depth = target.shape[-1]
        kernel = kernel.unsqueeze(-1).repeat(1, 1, 1, 1, depth) / depth
    out["patch_embed.proj.weight"] = kernel
    for part in ("patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"):
        out[part] = state[part]

    def block(src: str, dst: str) -> None:
        for s, d in _BLOCK_PARTS.items():
            for kind in ("weight", "bias"):
                out[f"{dst}.{d}.{kind}"] = state[f"{src}.{s}.{kind}"]
        table = state[f"{src}.attn.relative_position_bias_table"]  # ((2w-1)^2, heads)
        own_table = own[f"{dst}.attn.relative_position_bias_table"]
        if dims == 3:  # our index is row-major over (axis0, axis1, depth): repeat over depth offsets
            table = table.repeat_interleave(own_table.shape[0] // table.shape[0], dim=0)
        if table.shape != own_table.shape:
            raise ValueError(f"{src}: relative-position table {tuple(table.shape)} does not fit "
                             f"{tuple(own_table.shape)} (the window sizes differ).")
        out[f"{dst}.attn.relative_position_bias_table"] = table

    for stage in range(3):
        for j in range(2):
            block(f"layers.{stage}.blocks.{j}", f"encoder_stages.{stage}.blocks.{j}")
        src = f"layers.{stage}.downsample" if official else f"layers.{stage + 1}.downsample"
        reduction, norm_w, norm_b = (state[f"{src}.reduction.weight"], state[f"{src}.norm.weight"],
                                     state[f"{src}.norm.bias"])
        c = reduction.shape[1] // 4
        factors = network.merges[stage].factors
        # Swin concatenates (h, w) neighbours as (0,0), (1,0), (0,1), (1,1): chunk h + 2 w
        chunks = [h + 2 * w for h, w, *_ in _merge_offsets(factors)]
        share = len(chunks) // 4  # neighbours sharing one in-plane chunk (2 when depth is merged)
        pick = torch.cat([torch.arange(k * c, (k + 1) * c) for k in chunks])
        out[f"merges.{stage}.reduction.weight"] = reduction[:, pick] / share
        out[f"merges.{stage}.norm.weight"] = norm_w[pick]
        out[f"merges.{stage}.norm.bias"] = norm_b[pick]
    block("layers.3.blocks.0", "bottleneck.blocks.0")
    out["bottleneck_norm.weight"], out["bottleneck_norm.bias"] = state["norm.weight"], state["norm.bias"]

    for key, value in out.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{key}: converted shape {tuple(value.shape)} does not fit {tuple(own[key].shape)}.")
    return {k: v.to(own[k].dtype) for k, v in out.items()}


def load_imagenet_swin(network, path: str) -> dict[str, list[str]]:
    """Initialise ``network``'s encoder (a QTUNet, possibly DDP-wrapped) from a Swin-T ImageNet file.

    Returns the loaded and the not-initialised (decoder, head) keys, and logs them.
    """
    target = unwrap_module(network)
    from ..bundle.checkpoints import read_checkpoint  # the bundles' one reader (weights only, one-line errors)

    state = read_checkpoint(path, unwrap=False, what="ImageNet checkpoint")
    converted = swin_to_qtunet(state, target)
    target.load_state_dict(converted, strict=False)
    report = {"loaded": sorted(converted), "missing": sorted(k for k in target.state_dict() if k not in converted)}
    logger.info(f"initialised the encoder from the Swin ImageNet checkpoint {path}: {len(report['loaded'])} tensors "
                f"loaded, {len(report['missing'])} left as initialised (decoder and head).")
    return report
