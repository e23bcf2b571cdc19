# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Where a conditional network (``QTUNet(router="light" | "iterative")``) spends its heavy branches:
the router scores and the heavy-token selection of every routed sub-layer, on the token grid, and the
heavy share per label class (is the heavy compute spent on the foreground?).

Recorded on request only: while a :class:`RoutingRecorder` is open, each router's ``select`` is wrapped
on the instance (and each routed block gets a forward pre-hook for its window geometry); the wrapper
returns the router's own selection unchanged and keeps a copy. On exit the routers are as before.

Routers are named after their block (the attention sites' names) and sub-layer:
``encoder.stage1.block2.attn.q`` and ``.attn.kv`` (self-attention queries and keys/values, routed per
window), ``.cross.q`` and ``.cross.kv`` (a routed decoder cross-attention), ``.mlp`` (the feed-forward,
routed per volume or per window).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..networks.blocks.conditional import BlockRouting
from ..networks.blocks.windows import WindowGeometry
from .maps import tokens_to_voxels
from .sites import attention_sites

__all__ = ["RoutingCapture", "RoutingRecorder", "heavy_share_table", "routed_blocks"]

#: BlockRouting attribute -> (sub-layer, router) in a recorded name, and the capacity key it uses
_ROUTERS = {"q": ("attn.q", "q"), "kv": ("attn.kv", "kv"), "cross_q": ("cross.q", "q"),
            "cross_kv": ("cross.kv", "kv"), "ff": ("mlp", "ff")}


@dataclass
class RoutingCapture:
    """One router's decision in the recorded forward pass, on its block's token grid.

    Attributes:
        name: e.g. ``encoder.stage1.block1.attn.q``.
        level: resolution level of the block's token grid (0: stage 1).
        group: ``"window"`` or ``"volume"``: what the router picked its ``k`` tokens from.
        k: tokens routed per group; ``group_size``: tokens per group (a window's N includes padding).
        capacity: the routed fraction the block was set to.
        scores: float32 router scores ``(B, *tokens)``.
        selected: bool ``(B, *tokens)``: True where the token went through the heavy branch.
    """

    name: str
    level: int
    group: str
    k: int
    group_size: int
    capacity: float
    scores: torch.Tensor
    selected: torch.Tensor

    @property
    def heavy_share(self) -> float:
        """Fraction of the tokens routed to the heavy branch."""
        return float(self.selected.float().mean())


def routed_blocks(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """The conditional sub-blocks of ``model`` by name (``encoder.stage1.block2``, ...) with their
    resolution level, in forward order; empty for a dense network."""
    blocks = {}
    by_attention = {id(site.module): site for site in attention_sites(model).values() if not site.cross}
    for module in model.modules():
        if isinstance(getattr(module, "router", None), BlockRouting) and id(module.attn) in by_attention:
            site = by_attention[id(module.attn)]
            blocks[site.name.rsplit(".", 1)[0]] = (module, site.level)
    order = {site.name.rsplit(".", 1)[0]: i for i, site in enumerate(by_attention.values())}
    return dict(sorted(blocks.items(), key=lambda item: order[item[0]]))


class RoutingRecorder:
    """Context manager recording the scores and the selection of every router of a conditional network.

    Example::

        with torch.no_grad(), RoutingRecorder(model) as recorder:
            logits = model(image)
        rows = heavy_share_table(recorder.captures.values(), logits.argmax(1), level_strides(model))

    A dense network records nothing (:attr:`active` is False). Captures keep the last forward pass.

    Args:
        model: a :class:`~qtunet_monai.networks.QTUNet`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = routed_blocks(model)
        self.captures: dict[str, RoutingCapture] = {}
        self._geometry: dict[str, WindowGeometry] = {}
        self._handles: list = []
        self._wrapped: list[nn.Module] = []

    @property
    def active(self) -> bool:
        """Whether the network has routers to record."""
        return bool(self.blocks)

    def __enter__(self) -> RoutingRecorder:  # noqa: PYI034 - Python 3.10 has no typing.Self
        for name, (block, level) in self.blocks.items():
            self._handles.append(block.register_forward_pre_hook(self._geometry_hook(name), with_kwargs=True))
            for attribute, (suffix, capacity_key) in _ROUTERS.items():
                router = getattr(block.router, attribute, None)
                if router is not None:
                    router.select = self._wrap(router, f"{name}.{suffix}", name, level, block.router, capacity_key)
                    self._wrapped.append(router)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for router in self._wrapped:
            del router.select  # the class's method again
        self._wrapped.clear()

    def _geometry_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            geometries = [v for v in (*args, *kwargs.values()) if isinstance(v, WindowGeometry)]
            if len(geometries) != 1:
                raise RuntimeError(f"{name} was called without its window geometry; the routing recorder needs it.")
            self._geometry[name] = geometries[0]

        return hook

    def _wrap(self, router: nn.Module, name: str, block: str, level: int, routing: BlockRouting, capacity_key: str):
        select = router.select

        def recorded_select(x: torch.Tensor, k: int, valid: torch.Tensor | None = None, weighting: str = "st"):
            indices, weights = select(x, k, valid, weighting)
            with torch.no_grad():
                scores = router(x.detach())  # (G, n) float32, as select computed them
                chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, indices, True)
            self._record(name, block, level, routing, capacity_key, scores, chosen, k)
            return indices, weights

        return recorded_select

    def _record(self, name: str, block: str, level: int, routing: BlockRouting, capacity_key: str,
                scores: torch.Tensor, chosen: torch.Tensor, k: int) -> None:
        geometry = self._geometry[block]
        groups, size = scores.shape
        if capacity_key == "ff" and routing.ff_group == "volume":
            group = "volume"
            grid = [t.view(groups, *geometry.spatial_shape) for t in (scores, chosen)]
        else:  # windows, batch-major: back onto the map, padding dropped
            group = "window"
            batch = groups // geometry.num_windows
            grid = [geometry.reverse(t.unsqueeze(-1).float(), batch)[..., 0] for t in (scores, chosen)]
        self.captures[name] = RoutingCapture(name, level, group, int(k), int(size),
                                             float(routing.capacity[capacity_key]), grid[0], grid[1].bool())


def heavy_share_table(
    captures: Sequence[RoutingCapture] | dict[str, RoutingCapture],
    labels: torch.Tensor,
    strides: Sequence[Sequence[int]],
    class_names: Sequence[str] | None = None,
) -> list[dict]:
    """The heavy share per label class of every recorded router.

    Each voxel of the network input inherits the decision of the token that covers it; a class's
    heavy share is the fraction of its voxels whose token went through the heavy branch (the fraction
    of the class's tokens, weighted by how much of each token the class fills).

    Args:
        captures: :attr:`RoutingRecorder.captures` (or its values).
        labels: integer class map ``(B, *spatial)`` of the network input (a label, or the prediction).
        strides: voxels per token at each level (:func:`~qtunet_monai.explain.sites.level_strides`).
        class_names: a name per class value (default ``class {c}``).

    Returns:
        one row per router: ``router``, ``level``, ``group``, ``capacity``, ``all`` (share over every
        voxel) and ``share <class>`` per class (NaN for a class absent from ``labels``); the shares lie in
        [0, 1], and their mean weighted by the classes' voxel counts is ``all``.
    """
    captures = list(captures.values()) if isinstance(captures, dict) else list(captures)
    labels = labels.long()
    count = int(labels.max()) + 1 if class_names is None else len(class_names)
    names = list(class_names) if class_names is not None else [f"class {c}" for c in range(count)]
    spatial = tuple(labels.shape[1:])
    rows = []
    for capture in captures:
        heavy = tokens_to_voxels(capture.selected.float(), strides[capture.level], spatial).to(labels.device)
        if heavy.shape != labels.shape:
            raise ValueError(f"labels {tuple(labels.shape)} do not match the routed input {tuple(heavy.shape)}.")
        row = {"router": capture.name, "level": capture.level, "group": capture.group,
               "capacity": capture.capacity, "all": float(heavy.mean())}
        for value, name in enumerate(names):
            inside = labels == value
            row[f"share {name}"] = float(heavy[inside].mean()) if inside.any() else float("nan")
        rows.append(row)
    return rows
