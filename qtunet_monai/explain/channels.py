# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""UCTransNet's channel-wise skips inside a ``QTUNet(skip="cct")``: the channel x channel attention
maps of the CCT per layer and scale, how much attention mass each scale's channels receive, and the
skip modules (CCT scales and CCA gates) that :func:`~qtunet_monai.explain.ablate` can switch off.

The maps are recorded on request only: a forward pre-hook, registered while a
:class:`ChannelAttentionRecorder` is open, hands each layer's inputs to the module's own
:meth:`~qtunet_monai.networks.blocks.ChannelCrossAttention.maps` (the forward pass's computation
without the values); the network's forward pass is unchanged.

Skip sites are named as the attention sites are, by resolution level (``stage1`` is the shallowest):

- ``skip.cct.stage{1,2,3}``: the CCT's update of that scale's skip; ablated, the skip passes unchanged
  (as if its zero-initialised reconstruction were still zero); ``skip.cct`` ablates every scale, which
  gives the plain skips;
- ``skip.gate.stage{1,2,3}``: the CCA gate of the decoder step reading that skip; ablated, the skip
  passes ungated (the gate saturated at 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..networks.blocks.channel_transformer import ChannelTransformer

__all__ = [
    "ChannelAttentionRecorder",
    "SkipSite",
    "attention_mass_table",
    "skip_ablation_hook",
    "skip_sites",
]


@dataclass(frozen=True)
class SkipSite:
    """One switchable part of UCTransNet's skips.

    Attributes:
        name: e.g. ``skip.cct.stage2`` or ``skip.gate.stage1``.
        module: the :class:`~qtunet_monai.networks.blocks.ChannelTransformer` (``cct``) or the
            :class:`~qtunet_monai.networks.blocks.ChannelGate` (``gate``).
        kind: ``"cct"`` or ``"gate"``.
        level: resolution level of the skip (0: the shallowest, ``stage1``).
    """

    name: str
    module: nn.Module
    kind: str
    level: int


def skip_sites(model: nn.Module) -> dict[str, SkipSite]:
    """The CCT scales and CCA gates of ``model`` by name (none for plain skips), in forward order."""
    sites: dict[str, SkipSite] = {}
    fusion = getattr(model, "skip_fusion", None)
    if isinstance(fusion, ChannelTransformer):  # another skip kind (networks/blocks/skips.py) has no CCT sites
        for level in range(len(fusion.widths)):
            name = f"skip.cct.stage{level + 1}"
            sites[name] = SkipSite(name, fusion, "cct", level)
    gates = getattr(model, "skip_gates", None)
    if gates is not None:
        for step, gate in enumerate(gates):  # the decoder runs deep to shallow
            level = len(gates) - 1 - step
            name = f"skip.gate.stage{level + 1}"
            sites[name] = SkipSite(name, gate, "gate", level)
    return sites


def skip_ablation_hook(site: SkipSite):
    """A forward hook that switches ``site`` off: the CCT returns that scale's skip unchanged, the gate
    returns its skip ungated (the identity a saturated gate computes)."""
    if site.kind == "cct":
        def hook(module: nn.Module, args: tuple, output: list[torch.Tensor]) -> list[torch.Tensor]:
            fused = list(output)
            fused[site.level] = args[0][site.level]
            return fused
    else:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            return args[0]
    return hook


class ChannelAttentionRecorder:
    """Context manager that averages the CCT's channel attention maps over heads and cases.

    Every forward pass inside the ``with`` block adds its batch items; :meth:`maps` returns, per layer
    and query scale, the mean map ``(C_i, C_S)``: row ``c`` is how channel ``c`` of scale ``i`` spreads
    its attention over the ``C_S`` channels of all scales (shallow first), and sums to 1.

    Example::

        with torch.no_grad(), ChannelAttentionRecorder(model) as recorder:
            for image in images:
                model(image)
        maps = recorder.maps()           # {"layer1": [(C_1, C_S), (C_2, C_S), ...], ...}
        table = attention_mass_table(maps, recorder.widths)

    A network without a CCT records nothing (:attr:`active` is False).

    Args:
        model: a :class:`~qtunet_monai.networks.QTUNet`.
    """

    def __init__(self, model: nn.Module) -> None:
        fusion = getattr(model, "skip_fusion", None)
        fusion = fusion if isinstance(fusion, ChannelTransformer) else None
        self.modules = [] if fusion is None else [layer.attn for layer in fusion.layers]
        self.widths: tuple[int, ...] = () if fusion is None else tuple(fusion.widths)
        self.cases = 0
        self._sums: list[list[torch.Tensor]] = []
        self._handles: list = []

    @property
    def active(self) -> bool:
        """Whether the network has a CCT to record."""
        return bool(self.modules)

    def __enter__(self) -> ChannelAttentionRecorder:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self.cases = 0
        self._sums = [[] for _ in self.modules]
        for index, module in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            queries, context = args
            with torch.no_grad():
                maps = module.maps([q.detach() for q in queries], context.detach())  # (B, H, C_i, C_S) each
            sums = [m.mean(1).sum(0).double().cpu() for m in maps]  # head mean, summed over the batch
            if self._sums[index]:
                self._sums[index] = [a + b for a, b in zip(self._sums[index], sums)]
            else:
                self._sums[index] = sums
            if index == 0:
                self.cases += maps[0].shape[0]

        return hook

    def maps(self) -> dict[str, list[torch.Tensor]]:
        """``{"layer{l}": [map of scale 1, ...]}``: the ``(C_i, C_S)`` maps averaged over heads and cases.

        Raises:
            ValueError: nothing was recorded (no CCT, or no forward pass inside the ``with`` block).
        """
        if not self.cases:
            raise ValueError("no channel attention recorded: the network has no CCT (skip='cct') or did not run "
                             "inside the recorder.")
        return {f"layer{index + 1}": [s / self.cases for s in sums] for index, sums in enumerate(self._sums)}


def attention_mass_table(maps: dict[str, Sequence[torch.Tensor]], widths: Sequence[int]) -> list[dict]:
    """How the attention mass of each layer falls on each scale's channels.

    Args:
        maps: :meth:`ChannelAttentionRecorder.maps`.
        widths: ``C_i`` of each scale (:attr:`ChannelAttentionRecorder.widths`).

    Returns:
        per layer, one row per query scale (``query``: ``stage{i}``) with the share of that scale's mass
        on each key scale (``stage{j}``: the summed weights of ``C_j``'s columns, averaged over the query
        channels), then a row ``query="all"`` with the share each scale receives from all query channels;
        last, a row ``layer="uniform"``: the shares ``C_j / C_S`` of uniform attention. Every row sums to 1.
    """
    widths = [int(c) for c in widths]
    bounds = [sum(widths[:j]) for j in range(len(widths) + 1)]
    stages = [f"stage{j + 1}" for j in range(len(widths))]

    def shares(block: torch.Tensor) -> dict[str, float]:
        return {stage: float(block[:, bounds[j]:bounds[j + 1]].sum(1).mean()) for j, stage in enumerate(stages)}

    rows = []
    for layer, per_scale in maps.items():
        for i, scale_map in enumerate(per_scale):
            rows.append({"layer": layer, "query": stages[i], **shares(scale_map)})
        rows.append({"layer": layer, "query": "all", **shares(torch.cat(list(per_scale)))})
    total = sum(widths)
    rows.append({"layer": "uniform", "query": "all", **{s: c / total for s, c in zip(stages, widths)}})
    return rows
