# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Which device a process uses, and joining the process group, for one or several nodes.

torchrun numbers processes globally (``RANK``, 0..world-1 over all nodes) and per node
(``LOCAL_RANK``, 0..processes-per-node-1). A process's GPU is ``cuda:<LOCAL_RANK>``: on the second of
two 8-GPU nodes the global ranks are 8-15, and ``cuda:8`` does not exist there.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

__all__ = ["DeviceError", "local_rank", "local_gpu", "process_device", "init_distributed", "finish_distributed"]

logger = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The device a process asked for does not exist on its machine; the message says what to do."""


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``; 0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_gpu() -> torch.device:
    """The GPU this process uses on a CUDA machine: ``cuda:<LOCAL_RANK>`` (never the global rank)."""
    return torch.device("cuda", local_rank())


def process_device(device: str | torch.device = "auto", gpu_count: int | None = None) -> torch.device:
    """The device for this process, checked against the GPUs this machine has.

    Args:
        device: ``auto`` (this process's GPU when CUDA is available, else the CPU), ``cpu``, ``cuda``
            (``cuda:<LOCAL_RANK>``) or an explicit ``cuda:N``.
        gpu_count: visible GPUs; default ``torch.cuda.device_count()``.

    Raises:
        DeviceError: a GPU was asked for that this machine does not have, e.g. two processes per node
            on a one-GPU machine (the message names the process and the way out: fewer processes, or
            ``--device cpu`` for gloo on the CPU).
    """
    count = torch.cuda.device_count() if gpu_count is None else gpu_count
    if str(device) == "auto":
        device = "cuda" if count > 0 else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    index = local_rank() if device.index is None else device.index
    if index >= count:
        processes = os.environ.get("LOCAL_WORLD_SIZE")
        launched = f" of {processes} on this node" if processes else ""
        raise DeviceError(
            f"process with local rank {local_rank()}{launched} needs GPU cuda:{index}, but this machine has "
            f"{count} visible GPU(s). Start at most {count} process(es) per node (torchrun --nproc_per_node), "
            "or run on the CPU with gloo: --device cpu.")
    return torch.device("cuda", index)


def init_distributed(device: str | torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun with more than one process (NCCL for a GPU
    device, gloo for the CPU), make ``device`` the current GPU, and log where this process runs.

    Returns:
        (global rank, world size); (0, 1) for a single process.
    """
    device = torch.device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if world > 1:
        logger.info(f"process {rank} of {world} (local rank {local_rank()}): {device}")
    return rank, world


def finish_distributed() -> None:
    """Leave the process group together: wait for every rank, then destroy the group (no-op when none).

    Ranks reach the end of a run at different times (rank 0 still writes the last checkpoints); a rank
    that shuts its gloo connections down while a peer is still working can make that peer abort
    (SIGABRT), and torchrun then reports the finished run as failed.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
