# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Capture the inputs of chosen attention blocks during one forward pass.

The network's forward pass is not changed: the (fused) attention runs as always, and forward
pre-hooks, registered only while a :class:`AttentionRecorder` is open and only on the blocks asked
for, keep each block's input windows and window geometry. The weights are then recomputed
explicitly from the block's own projections, relative-position bias and shift mask
(:func:`~qtunet_monai.explain.sites.attention_probabilities`). Nothing is added to training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..networks.blocks.windows import WindowGeometry
from .sites import AttentionSite, attention_probabilities, select_sites

__all__ = ["AttentionRecorder", "Capture"]


@dataclass
class Capture:
    """What one attention block received in the recorded forward pass.

    Attributes:
        site: the block.
        queries: query-side windows ``(B * num_windows, N, C)``.
        keys: key/value-side windows of a cross-attention, else None.
        geometry: the windows' :class:`WindowGeometry`.
        output: the block's own output windows, kept only with ``keep_outputs``.
    """

    site: AttentionSite
    queries: torch.Tensor
    keys: torch.Tensor | None
    geometry: WindowGeometry
    output: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.queries.shape[0] // self.geometry.num_windows

    def probabilities(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights ``(rows, heads, N, N)`` of window rows ``rows`` (default all)."""
        return attention_probabilities(self.site, self.queries, self.geometry, self.keys, rows)


def _split_inputs(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], WindowGeometry]:
    values = list(args) + list(kwargs.values())
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    geometries = [v for v in values if isinstance(v, WindowGeometry)]
    if not tensors or len(geometries) != 1:
        raise RuntimeError("an attention block was called without (windows, geometry); the explain hooks need both.")
    return tensors, geometries[0]


class AttentionRecorder:
    """Context manager recording the inputs of the attention blocks matching ``specs``.

    Example::

        with AttentionRecorder(model, "decoder.cross") as recorder:
            logits = model(image)
        weights = recorder["decoder.stage1.block1.cross"].probabilities()

    Args:
        model: a :class:`~qtunet_monai.networks.QTUNet`.
        specs: site names or patterns (see :func:`~qtunet_monai.explain.sites.select_sites`).
        keep_outputs: also keep each block's output windows (to compare with the recomputation).
    """

    def __init__(self, model: nn.Module, specs: str | list[str], keep_outputs: bool = False) -> None:
        self.sites = select_sites(model, specs)
        self.keep_outputs = keep_outputs
        self.captures: dict[str, Capture] = {}
        self._handles: list = []

    def __enter__(self) -> AttentionRecorder:  # noqa: PYI034 - Python 3.10 has no typing.Self
        for site in self.sites:
            self._handles.append(site.module.register_forward_pre_hook(self._pre_hook(site), with_kwargs=True))
            if self.keep_outputs:
                self._handles.append(site.module.register_forward_hook(self._output_hook(site)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, site: AttentionSite):
        def hook(module, args, kwargs):
            tensors, geometry = _split_inputs(args, kwargs)
            keys = tensors[1].detach() if site.cross else None
            self.captures[site.name] = Capture(site, tensors[0].detach(), keys, geometry)

        return hook

    def _output_hook(self, site: AttentionSite):
        def hook(module, args, output):
            self.captures[site.name].output = output.detach()

        return hook

    def __getitem__(self, name: str) -> Capture:
        if name not in self.captures:
            raise KeyError(f"{name!r} was not recorded (not asked for, or not called as a module: the VT decoder "
                           f"calls attend() directly); recorded: {list(self.captures)}.")
        return self.captures[name]
