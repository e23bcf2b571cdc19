# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Weight decay as Swin applies it: not on relative-position bias tables, norms or biases."""

from __future__ import annotations

import torch

from qtunet_monai import QTUNet
from qtunet_monai.bundle import no_weight_decay_names, param_groups


def test_bias_tables_norms_and_biases_get_no_weight_decay():
    network = QTUNet(3, 4, spatial_dims=2)
    groups = param_groups(network, weight_decay=1e-3)
    assert [g["weight_decay"] for g in groups] == [1e-3, 0.0]
    decayed, kept = ({id(p) for p in g["params"]} for g in groups)
    names = dict(network.named_parameters())
    assert len(decayed) + len(kept) == len(names) and not decayed & kept
    tables = [n for n in names if n.endswith("relative_position_bias_table")]
    norms = [n for n, m in network.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert tables and norms
    assert all(id(names[n]) in kept for n in tables)
    assert all(id(names[f"{n}.weight"]) in kept and id(names[f"{n}.bias"]) in kept for n in norms)
    matrices = [n for n, p in names.items() if p.ndim >= 2 and n not in tables]
    assert matrices and all(id(names[n]) in decayed for n in matrices)
    assert no_weight_decay_names(network) == {n for n, p in names.items() if id(p) in kept}


def test_adam_decays_only_the_decayed_group():
    """With zero gradients only weight decay moves a parameter: the bias tables must not move."""
    torch.manual_seed(0)
    network = QTUNet(1, 2, spatial_dims=2)
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    optimizer = torch.optim.Adam(param_groups(network, weight_decay=0.1), lr=1e-2)
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    moved = {n for n, p in network.named_parameters() if not torch.equal(p, before[n])}
    tables = {n for n in before if n.endswith("relative_position_bias_table")}
    assert tables and not moved & tables
    assert not any(n.endswith(".bias") or "norm" in n for n in moved)
    assert moved == {n for n, p in before.items() if p.ndim >= 2 and n not in tables}


def test_frozen_parameters_are_left_out():
    from qtunet_monai.ssl import QTUNetSSL

    model = QTUNetSSL(1, (32, 32), spatial_dims=2, hidden_dim=16, projection_dim=8)
    grouped = {id(p) for g in param_groups(model, 1.5e-6) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert not grouped & {id(p) for p in model.target_parameters()}
