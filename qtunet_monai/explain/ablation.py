# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Switch attention blocks off for an evaluation, and back on afterwards.

An ablated block's attention branch contributes nothing: a forward hook replaces the attention
module's output with zeros, so its residual connection passes the tokens on unchanged (the block
becomes identity / skip for that branch; LayerNorms and MLP stay). For a QT decoder's cross-attention
this is the thesis' RQ2 question asked of a trained network: what does the decoder lose without it?

UCTransNet's skips (``skip="cct"``) are switched off the same way, by name (see
:mod:`~qtunet_monai.explain.channels`): ``skip.cct`` returns the plain skips (the CCT's update dropped),
``skip.gate`` the ungated ones (a saturated CCA gate).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .channels import SkipSite, skip_ablation_hook, skip_sites
from .sites import AttentionSite, _is_subsequence, attention_sites

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
        specs: attention site names or patterns (see :func:`~qtunet_monai.explain.sites.select_sites`),
            or skip sites of a CCT network (``skip.cct``, ``skip.gate.stage2``, ...; see
            :func:`~qtunet_monai.explain.channels.skip_sites`).

    Yields:
        the names of the ablated blocks.

    Raises:
        ValueError: a spec that matches nothing (the message lists the names).
    """
    attention, skips = _select(model, specs)
    handles = [site.module.register_forward_hook(_zero_output) for site in attention]
    handles += [site.module.register_forward_hook(skip_ablation_hook(site)) for site in skips]
    try:
        yield [site.name for site in attention] + [site.name for site in skips]
    finally:
        for handle in handles:
            handle.remove()


def _select(model: nn.Module, specs: str | list[str]) -> tuple[list[AttentionSite], list[SkipSite]]:
    """The attention sites and the skip sites matching any of ``specs``, each in forward order
    (the matching rule of :func:`~qtunet_monai.explain.sites.select_sites`, over both kinds of names)."""
    specs = [s.strip() for s in specs.split(",")] if isinstance(specs, str) else [str(s).strip() for s in specs]
    named = {**attention_sites(model), **skip_sites(model)}
    chosen: set[str] = set()
    for spec in specs:
        matches = [name for name in named if _is_subsequence(spec.split("."), name.split("."))]
        if not spec or not matches:
            raise ValueError(f"no attention block or skip module matches {spec!r}; the network has: "
                             f"{', '.join(named)}.")
        chosen.update(matches)
    picked = [site for name, site in named.items() if name in chosen]
    return ([site for site in picked if isinstance(site, AttentionSite)],
            [site for site in picked if isinstance(site, SkipSite)])
