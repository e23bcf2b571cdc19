# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Image-domain reconstruction networks: a 2D network that refines the zero-filled magnitude residually.

``build_recon_network("QT-UNet-2D")`` (the default), ``"QT-UNet-2D-A"`` (no decoder cross-attention: a
Swin U-Net), any other 2D architecture of :data:`qtunet_monai.networks.ARCHITECTURES` (the CCT
variants, and the conditional ones once they exist), or ``"BasicUNet"`` (MONAI's, the features of MONAI's
reconstruction tutorial), each as ``x + net(x)`` (:class:`ResidualRefiner`) unless ``residual=False``.

MONAI's e2e-VarNet (``VariationalNetworkModel``) takes the masked k-space and the mask, not an image: it
needs its own batch preparation and a complex-valued pipeline, so it is not part of this image-domain
bundle (QT-UNet-2D with ``in_channels=out_channels=2`` can be its ``ComplexUnet``'s ``conv_net``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["BASICUNET_FEATURES", "ResidualRefiner", "build_recon_network", "recon_architectures"]

#: MONAI's reconstruction tutorial (unet_demo): BasicUNet's six feature widths
BASICUNET_FEATURES = (32, 64, 128, 256, 512, 32)


class ResidualRefiner(nn.Module):
    """``x + net(x)``: the network learns the correction of the zero-filled image (starting at the identity
    when its last layer starts near zero)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)

    def no_weight_decay(self) -> set[str]:
        inner = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else set()
        return {f"net.{name}" for name in inner}


def recon_architectures() -> list[str]:
    """The names :func:`build_recon_network` accepts: the 2D QT-UNet family and ``BasicUNet``."""
    from ..networks import ARCHITECTURES

    return [name for name, spec in ARCHITECTURES.items() if spec.get("spatial_dims") == 2] + ["BasicUNet"]


def build_recon_network(name: str = "QT-UNet-2D", variant: str = "tiny", residual: bool = True, in_channels: int = 1,
                        out_channels: int = 1, patch_size: int = 4, num_stages: int = 3, drop_path_rate: float = 0.0,
                        basicunet_features: Sequence[int] = BASICUNET_FEATURES, use_checkpoint: bool = False,
                        **qtunet_kwargs) -> nn.Module:
    """An image-domain reconstruction network (one magnitude channel in and out by default).

    Args:
        name: a 2D architecture of the QT-UNet family (``QT-UNet-2D``, ``QT-UNet-2D-A``, ...) or ``BasicUNet``
            (case-insensitive).
        variant: QT-UNet's ``tiny``/``small``/``base``.
        residual: wrap in :class:`ResidualRefiner` (``x + net(x)``; needs ``in_channels == out_channels``).
        in_channels: input channels.
        out_channels: output channels.
        patch_size: QT-UNet's patch partition (4; 2 for finer detail at four times the tokens).
        num_stages: QT-UNet's encoder stages.
        drop_path_rate: QT-UNet's stochastic depth.
        basicunet_features: BasicUNet's six widths.
        use_checkpoint: QT-UNet's activation checkpointing.
        qtunet_kwargs: further :class:`qtunet_monai.QTUNet` arguments.
    """
    from ..bundle.architectures import DivisiblePadNet
    from ..networks import ARCHITECTURES, build_architecture

    if residual and in_channels != out_channels:
        raise ValueError(f"a residual refiner needs in_channels == out_channels, got {in_channels} and {out_channels}.")
    if name.lower() == "basicunet":
        from monai.networks.nets import BasicUNet

        if qtunet_kwargs:
            raise TypeError(f"unexpected argument(s) {sorted(qtunet_kwargs)} for BasicUNet.")
        # BasicUNet halves four times: inputs padded to a multiple of 16 inside
        net = DivisiblePadNet(BasicUNet(spatial_dims=2, in_channels=in_channels, out_channels=out_channels,
                                        features=tuple(basicunet_features)), 16)
    else:
        spec = {k.lower(): v for k, v in ARCHITECTURES.items()}.get(name.lower())
        if spec is None or spec.get("spatial_dims") != 2:
            raise ValueError(f"unknown or not 2D architecture {name!r} for reconstruction; choose one of "
                             f"{recon_architectures()}.")
        net = build_architecture(name, in_channels, out_channels, variant=variant, patch_size=patch_size,
                                 num_stages=num_stages, drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint,
                                 **qtunet_kwargs)
    return ResidualRefiner(net) if residual else net
