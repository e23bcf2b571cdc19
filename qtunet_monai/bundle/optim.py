# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Optimiser parameter groups (weight decay where Swin applies it, and nowhere else) and the learning-rate
schedule that the bundles and the Auto3DSeg template train with."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.optimizers import WarmupCosineSchedule

from ..networks.utils import unwrap_module as _unwrap

__all__ = ["NO_DECAY_KEYWORD", "no_weight_decay_names", "param_groups", "lr_schedule"]

#: Swin's ``no_weight_decay_keywords``: what a network without ``no_weight_decay()`` is searched for
NO_DECAY_KEYWORD = "relative_position_bias_table"


def no_weight_decay_names(network: nn.Module) -> set[str]:
    """Parameter names (of the unwrapped ``network``) that get no weight decay: the network's own
    ``no_weight_decay()`` list when it has one, else names containing ``relative_position_bias_table``,
    plus every norm weight and bias (the one-dimensional parameters), as Swin trains."""
    network = _unwrap(network)
    listed = set(network.no_weight_decay()) if hasattr(network, "no_weight_decay") else set()
    names = set()
    for name, param in network.named_parameters():
        if name in listed or (not listed and NO_DECAY_KEYWORD in name) or param.ndim <= 1:
            names.add(name)
    return names


def param_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups for a torch optimiser: ``weight_decay`` for weight matrices and kernels, 0 for the
    relative-position bias tables, norms and biases. Frozen parameters (``requires_grad=False``, e.g. the
    BYOL target) are left out; an empty group is dropped.

    Args:
        network: the model, possibly wrapped in ``DistributedDataParallel``.
        weight_decay: the decay of the decayed group.
    """
    skip = no_weight_decay_names(network)
    decay, no_decay = [], []
    for name, param in _unwrap(network).named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_schedule(optimizer: torch.optim.Optimizer, warmup_epochs: int, max_epochs: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing over ``max_epochs`` (stepped once per epoch), after ``warmup_epochs`` of linear warm-up
    (MONAI's ``WarmupCosineSchedule``) when there are any.

    Args:
        optimizer: the optimiser whose learning rate is scheduled.
        warmup_epochs: epochs of linear warm-up from 0 (0: none, plain ``CosineAnnealingLR``).
        max_epochs: the schedule's length in epochs.
    """
    if warmup_epochs:
        return WarmupCosineSchedule(optimizer, warmup_steps=int(warmup_epochs), t_total=max(int(max_epochs), 1))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(max_epochs), 1))
