# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Reconstruction metrics as fastMRI computes them, per volume, and the training loss.

MONAI has MAE and PSNR (``MAEMetric``, ``PSNRMetric``) but no NMSE, and its ``SSIMMetric`` uses the
population (co)variance inside each window, where fastMRI's evaluation (scikit-image's
``structural_similarity``: 7 x 7 uniform window, ``K1 = 0.01``, ``K2 = 0.03``, sample covariance) scales
them by ``N / (N - 1)``; the difference is small, but the numbers should mean what fastMRI's mean. So:

- :func:`nmse` / :class:`NMSEMetric`: ``||y - x||^2 / ||y||^2`` over a whole volume;
- :func:`ssim` / :class:`FastMRISSIMMetric`: SSIM of each slice (the channels of ``(B, slices, H, W)``),
  averaged over the slices, scikit-image's way, with the data range fastMRI uses (the volume's target
  maximum; 1 after :class:`~.transforms.ReconstructionOutputd` has scaled by it);
- :func:`psnr`: ``10 log10(data_range^2 / MSE)`` over a volume (MONAI's ``PSNRMetric`` with ``max_val=1``
  on the scaled volumes gives the same).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.metrics.regression import RegressionMetric
from torch import nn

__all__ = ["nmse", "psnr", "ssim", "NMSEMetric", "FastMRISSIMMetric", "L1SSIMLoss"]


def nmse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Normalised MSE per batch item: ``sum((target - pred)^2) / sum(target^2)`` over all other axes; ``(B, 1)``."""
    diff = (target.float() - pred.float()).flatten(1)
    return (diff.pow(2).sum(1) / target.float().flatten(1).pow(2).sum(1)).unsqueeze(1)


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor | None = None) -> torch.Tensor:
    """PSNR in dB per batch item, over all other axes; ``data_range`` default: each item's target maximum."""
    mse = (target.float() - pred.float()).flatten(1).pow(2).mean(1)
    peak = target.float().flatten(1).amax(1) if data_range is None else torch.as_tensor(data_range).float()
    return (10 * torch.log10(peak**2 / mse)).unsqueeze(1)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float | torch.Tensor | None = None, win_size: int = 7,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """fastMRI's SSIM: of every 2D slice (``(B, slices, H, W)``: the slices are the channels), averaged over
    the slices and the window positions that fit inside the slice; ``(B, 1)``.

    Args:
        pred: reconstruction.
        target: reference.
        data_range: ``L`` of the constants ``(k L)^2``: a number, a ``(B,)`` tensor, or None for each item's
            target maximum (fastMRI).
        win_size: edge of the uniform window.
        k1: luminance constant.
        k2: contrast constant.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"ssim expects two (batch, slices, H, W) tensors of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}.")
    x, y = pred.float(), target.float()
    if data_range is None:
        data_range = y.flatten(1).amax(1)
    L = torch.as_tensor(data_range, dtype=x.dtype, device=x.device).reshape(-1, 1, 1, 1)
    pool = lambda t: F.avg_pool2d(t, win_size, stride=1)  # valid window positions only
    ux, uy = pool(x), pool(y)
    cov_norm = win_size**2 / (win_size**2 - 1)  # sample covariance, as scikit-image (fastMRI)
    vx = cov_norm * (pool(x * x) - ux * ux)
    vy = cov_norm * (pool(y * y) - uy * uy)
    vxy = cov_norm * (pool(x * y) - ux * uy)
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1, keepdim=True)


class NMSEMetric(RegressionMetric):
    """NMSE per volume (:func:`nmse`), for MONAI's ``IgniteMetricHandler`` (the fastMRI metric MONAI lacks)."""

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nmse(y_pred, y)


class FastMRISSIMMetric(RegressionMetric):
    """SSIM per volume as fastMRI computes it (:func:`ssim`), for MONAI's ``IgniteMetricHandler``.

    Args:
        data_range: the constants' range (1: volumes scaled by their target maximum); None: each target's maximum.
        win_size: uniform window edge (7).
        reduction: MONAI's reduction over the volumes.
    """

    def __init__(self, data_range: float | None = 1.0, win_size: int = 7, k1: float = 0.01, k2: float = 0.03,
                 reduction: str = "mean", get_not_nans: bool = False) -> None:
        super().__init__(reduction=reduction, get_not_nans=get_not_nans)
        self.data_range, self.win_size, self.k1, self.k2 = data_range, win_size, k1, k2

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.ndim == 3:  # one (slices, H, W) volume
            y_pred, y = y_pred[None], y[None]
        return ssim(y_pred, y, self.data_range, self.win_size, self.k1, self.k2)


class L1SSIMLoss(nn.Module):
    """L1 loss (MONAI's and fastMRI's U-Net recipe), plus ``ssim_weight * (1 - SSIM)`` when the weight is
    positive; SSIM on each item's slices with its target's range (max - min) as the data range, since the
    normalised images are not positive."""

    def __init__(self, ssim_weight: float = 0.0, win_size: int = 7) -> None:
        super().__init__()
        if ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {ssim_weight!r}.")
        self.ssim_weight, self.win_size = float(ssim_weight), win_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = F.l1_loss(pred, target)
        if self.ssim_weight > 0:
            flat = target.detach().flatten(1)
            data_range = (flat.amax(1) - flat.amin(1)).clamp_min(1e-6)
            loss = loss + self.ssim_weight * (1 - ssim(pred, target, data_range, self.win_size).mean())
        return loss
