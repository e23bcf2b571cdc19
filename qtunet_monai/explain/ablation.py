# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Switch attention blocks off for an evaluation, and back on afterwards.

An ablated block's attention branch contributes nothing: a forward hook replaces the attention
module's output with zeros, so its residual connection passes the tokens on unchanged (the block
becomes identity / skip for that branch; LayerNorms and MLP stay). For a QT decoder's cross-attention
this is the thesis' RQ2 question asked of a trained network: what does the decoder lose without it?
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .sites import select_sites

__all__ = ["ablate"]


def _zero_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


@contextmanager
def ablate(model: nn.Module, specs: str | list[str]) -> Iterator[list[str]]:
    """Within the ``with`` block the attention blocks matching ``specs`` contribute zero.

    Example::

        with ablate(model, "decoder.stage2.cross") as names:
            ablated = model(image)   # names: the two cross-attention blocks of decoder stage 2
        restored = model(image)      # the original network again

    Args:
        model: a :class:`~qtunet_monai.networks.QTUNet`.
        specs: site names or patterns (see :func:`~qtunet_monai.explain.sites.select_sites`).

    Yields:
        the names of the ablated blocks.
    """
    sites = select_sites(model, specs)
    handles = [site.module.register_forward_hook(_zero_output) for site in sites]
    try:
        yield [site.name for site in sites]
    finally:
        for handle in handles:
            handle.remove()
