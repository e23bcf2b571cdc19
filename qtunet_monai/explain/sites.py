# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Names of the attention modules of a :class:`~qtunet_monai.networks.QTUNet`, and the explicit
recomputation of their attention weights from captured inputs.

Every windowed attention of the network is a *site* named by where it sits, with stages numbered by
resolution level so that a decoder stage and the encoder stage it reads share a number:

- ``encoder.stage{1,2,3}.block{1,2}.attn``: encoder self-attention (block 1 plain windows, block 2
  shifted windows);
- ``bottleneck.block1.attn``;
- ``decoder.stage{1,2,3}.block{1,2}.attn`` and ``.cross``: decoder self- and cross-attention
  (``decoder.stage1`` is the full-resolution stage that cross-attends to ``encoder.stage1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..networks.blocks.windows import WindowGeometry

__all__ = [
    "AttentionSite",
    "attention_probabilities",
    "attention_sites",
    "explicit_attention_output",
    "level_strides",
    "select_sites",
]


@dataclass(frozen=True)
class AttentionSite:
    """One windowed attention module of the network.

    Attributes:
        name: e.g. ``decoder.stage2.block1.cross``.
        module: the attention module (``WindowAttention`` or ``WindowCrossAttention``).
        cross: True for the decoder's cross-attention (keys and values from the encoder features).
        level: resolution level of its token grid: 0 for stage 1 (input / patch size), 3 for the bottleneck.
    """

    name: str
    module: nn.Module
    cross: bool
    level: int


def attention_sites(model: nn.Module) -> dict[str, AttentionSite]:
    """All attention sites of ``model`` by name, in the order the forward pass runs them."""
    for attribute in ("encoder_stages", "merges", "bottleneck", "patch_embed"):
        if not hasattr(model, attribute):
            raise ValueError(f"{type(model).__name__} is not a QTUNet (or its encoder): it has no '{attribute}'.")
    sites: dict[str, AttentionSite] = {}

    def add(prefix: str, stage: nn.Module, level: int) -> None:
        for index, block in enumerate(stage.blocks, start=1):
            name = f"{prefix}.block{index}"
            sites[f"{name}.attn"] = AttentionSite(f"{name}.attn", block.attn, False, level)
            if hasattr(block, "cross_attn"):
                sites[f"{name}.cross"] = AttentionSite(f"{name}.cross", block.cross_attn, True, level)

    for level, stage in enumerate(model.encoder_stages):
        add(f"encoder.stage{level + 1}", stage, level)
    add("bottleneck", model.bottleneck, len(model.encoder_stages))
    decoder_stages = getattr(model, "decoder_stages", [])  # none in an encoder alone
    levels = len(decoder_stages)
    for index, stage in enumerate(decoder_stages):  # deep to shallow
        add(f"decoder.stage{levels - index}", stage, levels - 1 - index)
    return sites


def select_sites(model: nn.Module, specs: str | list[str] | tuple[str, ...]) -> list[AttentionSite]:
    """The sites matching any of ``specs``, in forward order.

    A spec matches a site when its dot-separated parts appear, in order, among the site's parts:
    ``decoder.stage2.cross`` selects both cross-attention blocks of decoder stage 2,
    ``decoder.cross`` every cross-attention, ``encoder`` every encoder block, and a full name one site.

    Raises:
        ValueError: a spec that matches nothing (the message lists the names).
    """
    sites = attention_sites(model)
    specs = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else [str(s).strip() for s in specs]
    chosen: dict[str, AttentionSite] = {}
    for spec in specs:
        matches = [site for name, site in sites.items() if _is_subsequence(spec.split("."), name.split("."))]
        if not spec or not matches:
            raise ValueError(f"no attention block matches {spec!r}; the network has: {', '.join(sites)}.")
        chosen.update((site.name, site) for site in matches)
    return [site for name, site in sites.items() if name in chosen]


def _is_subsequence(parts: list[str], within: list[str]) -> bool:
    remaining = iter(within)
    return all(part in remaining for part in parts)


def level_strides(model: nn.Module) -> list[tuple[int, ...]]:
    """Voxels per token along each axis at each resolution level (level 0: the patch size).

    Patch embedding and merging pad at the end, so token ``t`` of level ``l`` covers voxels
    ``[t * stride, (t + 1) * stride)`` of the network input.
    """
    stride = tuple(int(p) for p in model.patch_embed.patch_size)
    strides = [stride]
    for merge in model.merges:
        stride = tuple(s * f for s, f in zip(stride, merge.factors))
        strides.append(stride)
    return strides


def _project(site: AttentionSite, queries: torch.Tensor, keys: torch.Tensor | None):
    module = site.module
    if site.cross:
        return (module.project_queries(queries), *module.project_keys_values(keys))
    return module.project_qkv(queries)


@torch.no_grad()
def attention_probabilities(
    site: AttentionSite,
    queries: torch.Tensor,
    geometry: WindowGeometry,
    keys: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The attention weights ``softmax(q k^T / sqrt(d) + bias + mask)`` of a site, computed explicitly by
    the module's :meth:`~qtunet_monai.networks.blocks.attention.WindowAttention.attention_weights`, the
    function the explicit backend computes them with.

    Args:
        site: the attention site.
        queries: its query-side input windows ``(B * num_windows, N, C)`` (after the block's LayerNorm and partition).
        geometry: the windows' geometry (relative-position index and shift mask).
        keys: for cross-attention, the key/value-side input windows (the normalised encoder features).
        rows: window rows of ``queries`` to compute (default all); the result follows their order.

    Returns:
        ``(len(rows), heads, N, N)``: each query's weights over the keys of its window; rows sum to 1,
        keys of another shifted region get (numerically) zero.
    """
    if rows is None:
        rows = torch.arange(queries.shape[0], device=queries.device)
    q, k, _ = _project(site, queries[rows], None if keys is None else keys[rows])
    # the explicit backend's own definition (relative-position bias and shift mask of each row's window)
    return site.module.attention_weights(q, k, geometry, windows=rows % geometry.num_windows)


@torch.no_grad()
def explicit_attention_output(
    site: AttentionSite, queries: torch.Tensor, geometry: WindowGeometry, keys: torch.Tensor | None = None
) -> torch.Tensor:
    """The site's output recomputed from :func:`attention_probabilities` (weights @ values, output
    projection): equal to the module's own (fused) output; used to check the recomputation."""
    weights = attention_probabilities(site, queries, geometry, keys)
    _, _, v = _project(site, queries, keys)
    b, heads, n, head_dim = v.shape
    return site.module.proj((weights @ v).transpose(1, 2).reshape(b, n, heads * head_dim))
