# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The network options on at once (detail path, UCTransNet's channel-transformer skips, the light router):
``torch.compile`` and ONNX at the ROI each see every option's code in one network. One export and one
compile cover the three options, and show that they compose; each option's own file tests it alone."""

from __future__ import annotations

import pytest
import torch

from qtunet_monai import QTUNet

#: 2D, two stages, width 6 and window 3: padded, shifted windows at 20 x 24, and a graph small enough to
#: export and compile in seconds
EVERY_OPTION = {
    "spatial_dims": 2, "feature_size": 6, "window_size": 3, "num_stages": 2, "num_heads": (1, 2, 2),
    "detail_widths": (4, 8),
    "skip": "cct", "cct_preset": "lite",
    "router": "light", "capacity": 0.5, "router_options": {"ff_group": "window"},
}


def _every_option_network() -> QTUNet:
    torch.manual_seed(0)
    net = QTUNet(1, 2, **EVERY_OPTION)
    with torch.no_grad():  # the CCT's output projections start at zero; training makes them act
        for projection in net.skip_fusion.reconstructions:
            projection.weight.normal_(0, 0.05)
            projection.bias.normal_(0, 0.05)
    return net


def test_every_option_is_on_and_shapes_hold():
    net = _every_option_network()
    x = torch.randn(2, 1, 23, 17)
    out = net(x)
    assert out.shape == (2, 2, 23, 17)
    out.square().mean().backward()
    for part in ("detail_path.", "skip_fusion.", ".router."):  # each option has parameters, and they learn
        grads = [p.grad for n, p in net.named_parameters() if part in n]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), part


@pytest.mark.slow
def test_every_option_compiles_to_one_graph_equal_to_eager(compiles_to_one_graph):
    """``torch.compile(dynamic=False)`` as the bundles run it, captured with ``aot_eager`` (as
    tests/networks/test_compile.py does): forward and backward equal eager, one graph, no break."""
    compiles_to_one_graph(_every_option_network(), torch.randn(2, 1, 20, 24))


@pytest.mark.slow
def test_every_option_exports_to_onnx_at_the_roi_equal_to_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qtunet_monai.bundle.onnx_export import export_onnx

    report = export_onnx(_every_option_network().eval(), str(tmp_path / "model.onnx"), [1, 1, 20, 24])
    assert not report["dynamic_spatial_size"] and max(report["max_abs_difference"].values()) <= 1e-4
