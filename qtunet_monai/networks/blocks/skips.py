# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The skip kinds of :class:`~qtunet_monai.networks.QTUNet` (``skip=``), by name: what is done to the
encoder's skips before each decoder step concatenates its skip to the expanded tokens.

A kind is one :class:`SkipKind` in :data:`SKIPS`. Its ``build`` takes the encoder's geometry
(:class:`SkipGeometry`) and the kind's resolved options and returns the module stored as
``QTUNet.skip_fusion``: it maps the list of skips ``(B, *S_i, C_i)`` (shallow first, channels-last) to a
list of the same shapes; or None when the skips pass unchanged (``"concat"``, which then has no
parameters and no state-dict keys). To add a kind, write its module and add one entry here (or
``SKIPS["name"] = SkipKind(...)`` from outside; ``tests/networks/test_skips.py`` does so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .channel_transformer import ChannelTransformer, common_grid_factors, resolve_cct_options

__all__ = ["SKIPS", "SkipGeometry", "SkipKind", "build_skip", "no_options", "resolve_skip"]


@dataclass(frozen=True)
class SkipGeometry:
    """What a skip module may depend on: the encoder's shape.

    Attributes:
        widths: ``C_i`` of each skip, shallow first.
        merge_factors: the patch merging's factor per spatial axis (1 on a kept depth axis): skip
            ``i + 1`` is skip ``i``'s grid divided by these (rounded up).
        spatial_dims: 2 or 3.
        use_checkpoint: the network's activation checkpointing.
    """

    widths: tuple[int, ...]
    merge_factors: tuple[int, ...]
    spatial_dims: int
    use_checkpoint: bool = False


def no_options(name: str, given: Mapping[str, Any]) -> None:
    """The options of a kind that takes none: every kind-specific argument (``cct_*``) must be unset.

    Args:
        name: the skip kind.
        given: the kind-specific arguments of :class:`~qtunet_monai.networks.QTUNet` by name.
    """
    set_ = sorted(k for k, v in given.items() if v is not None)
    if set_:
        takers = [k for k, kind in SKIPS.items() if kind.options is not no_options]
        raise ValueError(f"{', '.join(set_)} only apply with skip={' or '.join(map(repr, takers))} "
                         f"(the skip is {name!r}).")


@dataclass(frozen=True)
class SkipKind:
    """One skip kind.

    Attributes:
        build: ``(geometry, options) -> module or None``: the module that transforms the list of skips
            (None: they pass unchanged); ``options`` is what ``options`` returned.
        options: ``(name, given) -> options``: checks and resolves the kind-specific arguments of
            :class:`~qtunet_monai.networks.QTUNet` (``given``: ``cct_preset``, ...; None where unset) and
            raises a one-line ValueError on a bad one. Default: the kind takes none.
        gated: whether ``cca`` (the CCA gate in each decoder step) defaults to on with this kind.
        description: one line for the documentation and error messages.
    """

    build: Callable[[SkipGeometry, Any], nn.Module | None]
    options: Callable[[str, Mapping[str, Any]], Any] = no_options
    gated: bool = False
    description: str = ""


def _cct_options(name: str, given: Mapping[str, Any]) -> dict:
    return resolve_cct_options(given.get("cct_preset"), given.get("cct_layers"), given.get("cct_heads"),
                               given.get("cct_embedding"), given.get("cct_grid"), given.get("cct_position"))


def _build_cct(geometry: SkipGeometry, options: dict) -> ChannelTransformer:
    options = dict(options)
    factors = common_grid_factors(geometry.merge_factors, len(geometry.widths), options.pop("grid"))
    return ChannelTransformer(geometry.widths, factors, geometry.spatial_dims, **options,
                              use_checkpoint=geometry.use_checkpoint)


#: the skip kinds by the name :class:`~qtunet_monai.networks.QTUNet` takes (``skip="concat"``)
SKIPS: dict[str, SkipKind] = {
    "concat": SkipKind(lambda geometry, options: None, description="the thesis' skips, concatenated unchanged"),
    "cct": SkipKind(_build_cct, _cct_options, gated=True,
                    description="UCTransNet's channel-wise cross fusion transformer over all skips"),
}


def resolve_skip(name: str, given: Mapping[str, Any]) -> Any:
    """Check the skip kind ``name`` and resolve its options from the kind-specific ``given`` arguments.

    Args:
        name: a key of :data:`SKIPS`.
        given: the kind-specific arguments by name (None where unset).

    Raises:
        ValueError: an unknown kind (the message lists :data:`SKIPS`) or a bad option.
    """
    if name not in SKIPS:
        raise ValueError(f"unknown skip {name!r}; choose one of {list(SKIPS)}.")
    return SKIPS[name].options(name, given)


def build_skip(name: str, geometry: SkipGeometry, options: Any = None) -> nn.Module | None:
    """The skip module of kind ``name`` (None for skips that pass unchanged).

    Args:
        name: a key of :data:`SKIPS`.
        geometry: the encoder's geometry.
        options: the kind's options, as :func:`resolve_skip` returned them.
    """
    if name not in SKIPS:
        raise ValueError(f"unknown skip {name!r}; choose one of {list(SKIPS)}.")
    return SKIPS[name].build(geometry, options)
