# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""A process's device comes from its node-local rank (LOCAL_RANK), never the global rank; too few GPUs
for the processes of a node stop the run with a message that says what to do."""

from __future__ import annotations

import pytest
import torch

from qtunet_monai.bundle import DeviceError, local_gpu, process_device


def test_the_gpu_is_the_local_rank_not_the_global_rank(monkeypatch):
    # the first process of the second 8-GPU node: global rank 8, local rank 0
    monkeypatch.setenv("RANK", "8")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert local_gpu() == torch.device("cuda:0")
    assert process_device("auto", gpu_count=8) == torch.device("cuda:0")
    monkeypatch.setenv("RANK", "13")
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert process_device("cuda", gpu_count=8) == torch.device("cuda:5")
    assert process_device("cuda:2", gpu_count=8) == torch.device("cuda:2")  # an explicit index is kept


def test_no_gpu_or_cpu_asked_for_gives_the_cpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device("auto", gpu_count=0) == torch.device("cpu")
    assert process_device("cpu", gpu_count=2) == torch.device("cpu")


def test_fewer_gpus_than_processes_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(DeviceError, match=r"local rank 1 of 2 on this node needs GPU cuda:1, but this machine "
                                          r"has 1 visible GPU\(s\).*--device cpu"):
        process_device("auto", gpu_count=1)
