# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The one DDP / compile unwrapping helper and the one checkpoint state-dict unwrapping helper."""

from __future__ import annotations

import torch

from qtunet_monai import QTUNet
from qtunet_monai.bundle import load_pretrained
from qtunet_monai.networks.utils import unwrap_module, unwrap_state_dict


def test_unwrap_module_sees_through_data_parallel_and_compile():
    net = torch.nn.Linear(3, 2)
    assert unwrap_module(net) is net
    assert unwrap_module(torch.nn.DataParallel(net)) is net
    assert unwrap_module(torch.compile(torch.nn.DataParallel(net))) is net  # compiled lazily: no compile here


def test_unwrap_state_dict_nesting_and_wrapper_prefixes():
    a, b = torch.ones(2), torch.zeros(1)
    weights = {"a.weight": a, "b.bias": b}

    def same(state) -> bool:
        return list(state) == list(weights) and state["a.weight"] is a and state["b.bias"] is b

    assert same(unwrap_state_dict(weights))
    assert same(unwrap_state_dict({"model": weights, "epoch": 3}))
    assert same(unwrap_state_dict({"state_dict": {f"module.{k}": v for k, v in weights.items()}}))
    assert same(unwrap_state_dict({f"_orig_mod.module.{k}": v for k, v in weights.items()}))
    mixed = {"module.a": a, "b": b}  # not every key wrapped: left alone
    assert list(unwrap_state_dict(mixed)) == ["module.a", "b"]


def test_fine_tuning_loads_a_checkpoint_saved_from_a_ddp_wrapped_network(tmp_path):
    source = QTUNet(1, 2, spatial_dims=2, feature_size=24, num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
    path = tmp_path / "ddp.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = QTUNet(1, 2, spatial_dims=2, feature_size=24, num_heads=(1, 2, 2, 4), drop_path_rate=0.0)
    report = load_pretrained(target, str(path))
    assert not report["missing"] and not report["unexpected"]
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
