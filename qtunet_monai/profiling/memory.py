# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Training memory of QT-UNet, for choosing the batch size and crop from a GPU's memory the way
MONAI's Auto3DSeg templates do (a memory model from measured points, batch scaled to the card).

A training step holds the parameters, their gradients and Adam's two moments (16 bytes per
parameter), the activations saved for the backward pass (per sample, proportional to the batch) and
what the GPU runtime itself takes (context, cuDNN workspace, allocator slack: :data:`RESERVE_GB`).
The activations come from :data:`ACTIVATION_GB`, measured by :func:`activation_gb` (``python -m
qtunet_monai.profiling.memory``): the bytes of the distinct tensors autograd saves in one float32 forward pass of
batch 1. With AMP on a GPU many of them are half precision, so the model errs on the safe side (an 80 GB
H100 running QT-UNet-B at 96^3, batch 2, with AMP was seen using 6 GB in all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["ACTIVATION_GB", "RESERVE_GB", "MAX_BATCH", "activation_gb", "parameter_state_gb", "choose_batch_and_roi"]

#: saved activations (GiB) of one training forward pass at batch 1, float32, 4 input channels, 3 classes,
#: per (variant, cubic crop edge); measured on CPU with :func:`activation_gb` (``python -m qtunet_monai.profiling.memory``)
ACTIVATION_GB: dict[tuple[str, int], float] = {
    ("tiny", 96): 1.351, ("small", 96): 1.709, ("base", 96): 2.079,
    ("tiny", 128): 3.331, ("small", 128): 4.153, ("base", 128): 4.987,
}
#: GPU memory not available to tensors: CUDA context, cuDNN workspace, allocator fragmentation (GiB)
RESERVE_GB = 1.5
#: the largest batch chosen (MONAI's SwinUNETR template scales from 2 to about 9 over 16-80 GB cards)
MAX_BATCH = 8
#: crops tried, largest first: the thesis' two (128^3 BraTS and MSD Task 1, 96^3 elsewhere)
CROP_EDGES = (128, 96)
#: crop edge without a GPU (training on a CPU is for trying things out)
CPU_EDGE = 56
#: a crop axis is a multiple of this (the 7-token window after the 4x patch embedding)
ROI_STEP = 28


def activation_gb(variant: str, edge: int, in_channels: int = 4, out_channels: int = 3) -> float:
    """Measure the saved activations (GiB) of one float32 training forward pass of QT-UNet at ``edge``^3,
    batch 1: the distinct storages autograd keeps for the backward pass."""
    from ..networks import QTUNet

    network = QTUNet(in_channels, out_channels, variant=variant)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(torch.randn(1, in_channels, edge, edge, edge))
    return sum(storages.values()) / 2**30


def parameter_state_gb(variant: str) -> float:
    """Parameters, gradients and Adam's two moments of QT-UNet in ``variant`` (float32), in GiB."""
    from ..networks import QTUNet

    return 16 * sum(p.numel() for p in QTUNet(4, 3, variant=variant).parameters()) / 2**30


def _roi(edge: int, image_shape: Sequence[int]) -> list[int]:
    """``edge`` on every axis the image fills; a smaller axis rounded down to the window step (at least one)."""
    return [edge if int(s) >= edge else ROI_STEP * max(1, int(s) // ROI_STEP) for s in image_shape]


def choose_batch_and_roi(memory_gb: float, variant: str, image_shape: Sequence[int],
                         parameters_gb: float | None = None) -> tuple[list[int], int]:
    """The training crop and batch for a GPU with ``memory_gb`` GiB (0: no GPU).

    Without a GPU: a 56^3 crop (no larger than the image) and batch 1. On a GPU: the largest of the
    thesis' crops (128^3, then 96^3; each axis no larger than the image) at which a batch of 2 fits, and
    the largest batch that fits there (1 when not even 2 fit at 96^3; at most :data:`MAX_BATCH`).

    Args:
        memory_gb: the GPU's memory in GiB, 0 without a GPU.
        variant: tiny, small or base.
        image_shape: the (median) image size in voxels after resampling.
        parameters_gb: memory of parameters, gradients and Adam state; default :func:`parameter_state_gb`.
    """
    if memory_gb <= 0:
        return _roi(CPU_EDGE, image_shape), 1
    state = parameter_state_gb(variant) if parameters_gb is None else parameters_gb
    usable = memory_gb - RESERVE_GB - state
    for edge in CROP_EDGES:
        roi = _roi(edge, image_shape)
        per_sample = ACTIVATION_GB[(variant, edge)] * math.prod(roi) / edge**3
        batch = min(MAX_BATCH, int(usable // per_sample))
        if batch >= 2:
            return roi, batch
    return _roi(CROP_EDGES[-1], image_shape), 1


if __name__ == "__main__":
    for (name, size) in ACTIVATION_GB:
        print(f'("{name}", {size}): {activation_gb(name, size):.3f},', flush=True)
