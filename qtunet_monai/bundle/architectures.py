# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""One builder for every network a bundle can train: the thesis' QT-UNet family and MONAI's baselines.

The thesis compared QT-UNet with leaderboard numbers; :func:`build_network` puts the baselines into
the same bundles instead (same data, loss, schedule and metrics; ``--architecture SwinUNETR``), built
with the thesis' comparison settings:

- ``SwinUNETR``: feature size 48 (Swin-UNETR's BTCV/MSD model, the thesis' Table 4.2 row).
- ``UNETR``: feature size 16, ViT-B (768 hidden, 12 heads, 3072 MLP), the input size fixed to the ROI.
- ``SegResNet``: MONAI's BraTS setting (16 initial filters, blocks down 1-2-2-4, up 1-1-1, dropout 0.2).
- ``DynUNet``: nnU-Net's rule for kernels and strides from the ROI and the voxel spacing.

Baselines that need inputs divisible by their total downsampling (SwinUNETR by 32, UNETR by 16,
SegResNet by 8; SwinUNETR also to at least 64, where its instance-normalised bottleneck has two voxels
per axis) are wrapped in :class:`DivisiblePadNet`, so they run at any ROI of the bundle (the demo's 56
included) without changing the data pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import UNETR, DynUNet, SegResNet, SwinUNETR
from torch import nn

from ..networks import ARCHITECTURES, build_architecture

__all__ = ["BASELINES", "DivisiblePadNet", "build_network", "nnunet_kernels_strides"]

#: MONAI networks the bundles can train instead of QT-UNet (``--architecture``).
BASELINES = ("SwinUNETR", "UNETR", "SegResNet", "DynUNet")

# QT-UNet's own settings and their values in the thesis; the baselines have none of them.
# (_IGNORED: any value is ignored by the baselines; None is a real value, e.g. router=None: dense blocks)
_IGNORED = object()
_QTUNET_ONLY = {"drop_path_rate": _IGNORED, "num_stages": 3, "patch_size": 4, "attention_backend": _IGNORED,
                "fused_attention": _IGNORED, "detail_widths": [], "skip": "concat", "cct_preset": _IGNORED,
                "router": None, "capacity": None, "router_sites": None}
_ROUTER_KEYS = ("router", "capacity", "router_sites")
#: keys whose unset value (None) leaves a named architecture's own (QT-UNet-Cond's router, QT-UNet-CCT's skip)
_UNSET_KEEPS_OWN = (*_ROUTER_KEYS, "skip")


class DivisiblePadNet(nn.Module):
    """Run ``network`` on its input zero-padded (at the end of each axis) to a multiple of ``k``, at
    least ``min_size``, and crop the output back to the input's size.

    Args:
        network: a dense-prediction network whose input must be divisible by ``k``.
        k: the divisor.
        min_size: the smallest size per axis (e.g. 2 * k where instance norm must see 2 voxels at 1 / k).
    """

    def __init__(self, network: nn.Module, k: int, min_size: int = 0) -> None:
        super().__init__()
        self.network = network
        self.k = k
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        size = x.shape[2:]
        pads = [p for s in reversed(size) for p in (0, max(s + (-s) % self.k, self.min_size) - s)]
        out = self.network(F.pad(x, pads) if any(pads) else x)
        crop = (slice(None), slice(None), *(slice(0, s) for s in size))
        return [o[crop] for o in out] if isinstance(out, (list, tuple)) else out[crop]


class _ListedDeepSupervision(nn.Module):
    """DynUNet's training output (heads stacked on dim 1) as the list MONAI's ``DeepSupervisionLoss`` takes."""

    def __init__(self, network: DynUNet) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.network(x)
        return list(torch.unbind(out, dim=1)) if self.training else out


def nnunet_kernels_strides(roi_size: Sequence[int], spacing: Sequence[float] | None = None):
    """nnU-Net's kernels and strides (MONAI's DynUNet tutorial rule): halve an axis while it is at
    least 8 voxels, even, and not over twice as coarse as the finest axis; 1-wide kernels on axes
    that coarse. Returns ``(kernels, strides)``, one entry per level, the first stride 1."""
    sizes, spacings = list(roi_size), list(spacing or [1.0] * len(roi_size))
    kernels, strides = [], [[1] * len(sizes)]
    while True:
        ratios = [s / min(spacings) for s in spacings]
        stride = [2 if r <= 2 and size >= 8 and size % 2 == 0 else 1 for r, size in zip(ratios, sizes)]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if r <= 2 else 1 for r in ratios])
        strides.append(stride)
        sizes = [size // s for size, s in zip(sizes, stride)]
        spacings = [sp * s for sp, s in zip(spacings, stride)]
    kernels.append([3] * len(sizes))
    return kernels, strides


def build_network(
    name: str,
    in_channels: int,
    out_channels: int,
    roi_size: Sequence[int],
    variant: str = "tiny",
    pixdim: Sequence[float] | None = None,
    deep_supervision: bool = False,
    use_checkpoint: bool = False,
    **qtunet_kwargs,
) -> nn.Module:
    """The bundles' network by name: a QT-UNet architecture of the thesis or a MONAI baseline.

    Args:
        name: a key of :data:`qtunet_monai.networks.ARCHITECTURES` (``QT-UNet``, ``VT-UNet``, ...) or of
            :data:`BASELINES` (case-insensitive).
        in_channels: input channels.
        out_channels: classes.
        roi_size: the training crop and sliding-window size; its length is the number of spatial dims
            (UNETR's input size, DynUNet's kernels and strides).
        variant: QT-UNet's ``tiny`` / ``small`` / ``base`` (the baselines have one size each).
        pixdim: voxel spacing in mm, for DynUNet's anisotropy rule (None: isotropic).
        deep_supervision: auxiliary outputs in training mode (QT-UNet; DynUNet); the baselines
            SwinUNETR, UNETR and SegResNet have none and refuse it.
        use_checkpoint: activation checkpointing (QT-UNet, SwinUNETR).
        qtunet_kwargs: further :class:`qtunet_monai.QTUNet` arguments (``drop_path_rate``,
            ``num_stages``, ...); the baselines ignore ``drop_path_rate`` and refuse ``num_stages`` or
            ``patch_size`` other than the thesis' 3 and 4, a detail path, CCT skips and a ``router``
            (or ``capacity``, ``router_sites``) by name.
    """
    by_lower = {b.lower(): b for b in BASELINES}
    qtunet_kwargs = {k: v for k, v in qtunet_kwargs.items() if not (k in _UNSET_KEEPS_OWN and v is None)}
    if name.lower() not in by_lower:
        if name.lower() not in {a.lower() for a in ARCHITECTURES}:
            raise ValueError(f"unknown architecture {name!r}; choose one of {list(ARCHITECTURES) + list(BASELINES)}.")
        if deep_supervision:
            qtunet_kwargs["deep_supervision"] = True
        return build_architecture(name, in_channels, out_channels, variant=variant, use_checkpoint=use_checkpoint,
                                  **qtunet_kwargs)

    name = by_lower[name.lower()]
    unknown = sorted(set(qtunet_kwargs) - set(_QTUNET_ONLY))
    if unknown:
        raise TypeError(f"unexpected argument(s) {unknown} for the {name} baseline.")
    changed = [k for k, v in qtunet_kwargs.items()
               if _QTUNET_ONLY[k] is not _IGNORED and (list(v) if isinstance(v, (list, tuple)) else v) != _QTUNET_ONLY[k]]
    if changed:
        raise ValueError(f"{name} has no QT-UNet {changed}; leave them at the thesis' values "
                         f"{ {k: _QTUNET_ONLY[k] for k in changed} } for a baseline.")
    if deep_supervision and name != "DynUNet":
        raise ValueError(f"{name} has no deep-supervision heads; use deep_supervision with QT-UNet or DynUNet.")
    dims = len(roi_size)
    if name == "SwinUNETR":
        net = SwinUNETR(in_channels, out_channels, feature_size=48, use_checkpoint=use_checkpoint, spatial_dims=dims)
        # its bottleneck (1/32) is instance-normalised: at least 2 voxels there in training
        return DivisiblePadNet(net, 32, min_size=64)
    if name == "UNETR":
        padded = [math.ceil(s / 16) * 16 for s in roi_size]  # the patch grid's size is fixed at construction
        net = UNETR(in_channels, out_channels, img_size=padded, feature_size=16, hidden_size=768, mlp_dim=3072,
                    num_heads=12, spatial_dims=dims)
        return DivisiblePadNet(net, 16)
    if name == "SegResNet":
        net = SegResNet(spatial_dims=dims, init_filters=16, in_channels=in_channels, out_channels=out_channels,
                        dropout_prob=0.2, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1))
        return DivisiblePadNet(net, 8)
    kernels, strides = nnunet_kernels_strides(roi_size, pixdim)
    net = DynUNet(dims, in_channels, out_channels, kernel_size=kernels, strides=strides,
                  upsample_kernel_size=strides[1:], deep_supervision=deep_supervision,
                  deep_supr_num=max(1, min(len(strides) - 2, 3)) if deep_supervision else 1)
    divisor = math.prod(max(s) for s in strides)  # a multiple of every axis' total stride
    return DivisiblePadNet(_ListedDeepSupervision(net) if deep_supervision else net, divisor)
