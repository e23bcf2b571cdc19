# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The skip-kind registry (``QTUNet(skip=...)``, networks/blocks/skips.py): a new kind is one entry, built
from the encoder's geometry, trained through the decoder in 2D and 3D, and gone again once unregistered."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtunet_monai import ARCHITECTURES
from qtunet_monai.explain import skip_sites
from qtunet_monai.networks.blocks.skips import SKIPS, SkipGeometry, SkipKind


class _Project(nn.Module):
    """A contributor's skip kind: a 1x1 convolution of each skip (on channels-last tokens, a Linear per scale)."""

    def __init__(self, geometry: SkipGeometry) -> None:
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(c, c) for c in geometry.widths)

    def forward(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        return [project(skip) for project, skip in zip(self.projections, skips)]


PROJECT = SkipKind(lambda geometry, options: _Project(geometry), description="a 1x1 convolution of each skip")


def test_the_registry_holds_the_networks_skip_kinds():
    assert list(SKIPS) == ["concat", "cct"]
    assert {a.get("skip", "concat") for a in ARCHITECTURES.values()} <= set(SKIPS)
    assert not SKIPS["concat"].gated and SKIPS["cct"].gated


@pytest.mark.parametrize("spatial_dims, shape", [(2, (2, 2, 37, 29)), (3, (1, 2, 23, 20, 16))])
def test_a_new_skip_kind_is_one_registry_entry(monkeypatch, tiny_qtunet, spatial_dims, shape):
    """Registered, it is built from the encoder's widths, transforms the skips the decoder reads (identity
    weights: the plain network's output; others: a different one), trains, and leaves every other key alone."""
    plain = tiny_qtunet(spatial_dims=spatial_dims).eval()
    x = torch.randn(shape)
    with monkeypatch.context() as registry:
        registry.setitem(SKIPS, "project", PROJECT)
        net = tiny_qtunet(spatial_dims=spatial_dims, skip="project").eval()
        assert isinstance(net.skip_fusion, _Project) and not net.cca and net.skip_gates is None
        assert [p.in_features for p in net.skip_fusion.projections] == list(net.widths[: net.num_stages])
        new = [k for k in net.state_dict() if k not in plain.state_dict()]
        assert new and all(k.startswith("skip_fusion.projections.") for k in new)
        report = net.load_state_dict(plain.state_dict(), strict=False)
        assert sorted(report.missing_keys) == sorted(new) and not report.unexpected_keys
        with torch.no_grad():
            for projection in net.skip_fusion.projections:
                projection.weight.copy_(torch.eye(projection.in_features))
                projection.bias.zero_()
            expected = plain(x)
            torch.testing.assert_close(net(x), expected)
            net.skip_fusion.projections[0].weight.mul_(0.5)
            assert (net(x) - expected).abs().max() > 1e-4  # the shallowest skip reaches the output
        assert skip_sites(net) == {}  # explain lists CCT sites only for a CCT
        net.train()
        out = net(x)
        assert out.shape == (shape[0], 3, *shape[2:])
        out.square().mean().backward()
        grads = [p.grad for p in net.skip_fusion.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        with pytest.raises(ValueError, match=r"cct_preset only apply with skip='cct' \(the skip is 'project'\)"):
            tiny_qtunet(spatial_dims=spatial_dims, skip="project", cct_preset="lite")
        registry.setitem(SKIPS, "project", SkipKind(PROJECT.build, gated=True))  # a kind may gate by default
        assert len(tiny_qtunet(spatial_dims=spatial_dims, skip="project").skip_gates) == 3
    assert "project" not in SKIPS  # unregistered: refused by name, with the registered kinds listed
    with pytest.raises(ValueError, match=r"^unknown skip 'project'; choose one of \['concat', 'cct'\]\.$"):
        tiny_qtunet(spatial_dims=spatial_dims, skip="project")
