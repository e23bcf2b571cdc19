# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The network's layout may be rearranged, its checkpoints may not: the state-dict keys of QT-UNet in
several configurations, and its seeded outputs, must stay those recorded in
``tests/networks/qtunet_layout_reference.json`` (written once from the code before the encoder/decoder split by
running this file as a script: ``python tests/networks/test_network_layout.py``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qtunet_monai import QTUNet

REFERENCE = Path(__file__).resolve().parent / "qtunet_layout_reference.json"

#: configurations whose keys and outputs are pinned; the small width and window keep outputs cheap
CONFIGURATIONS: dict[str, dict] = {
    "3d": {"spatial_dims": 3},
    "3d_vt_keep_depth": {"spatial_dims": 3, "decoder": "vt", "merge_depth": False},
    "2d_no_cross": {"spatial_dims": 2, "decoder": "none"},
    "3d_4_stages_deep_supervision": {"spatial_dims": 3, "num_stages": 4, "deep_supervision": True},
    "2d_detail_path": {"spatial_dims": 2, "detail_widths": (4,), "deep_supervision": True},
    "3d_cct": {"spatial_dims": 3, "skip": "cct"},
    "2d_cct_lite_gate_off": {"spatial_dims": 2, "skip": "cct", "cct_preset": "lite", "cca": False},
    "2d_router_light": {"spatial_dims": 2, "router": "light", "capacity": 0.5},
    "3d_router_iterative_cross": {"spatial_dims": 3, "router": "iterative", "capacity": 0.5,
                                  "router_sites": ("encoder", "bottleneck", "decoder", "decoder.cross")},
}
#: the thesis' 3D Tiny network, keys only (its width does not change its keys' structure, but pin it as shipped)
TINY_3D = {"spatial_dims": 3, "variant": "tiny"}
SMALL = {"in_channels": 2, "out_channels": 3, "feature_size": 6, "window_size": 2, "patch_size": 2}
SAMPLES = 48


def _build(config: dict) -> QTUNet:
    torch.manual_seed(0)
    return QTUNet(**{**SMALL, **config})


def _output_summary(config: dict) -> dict:
    """Sum, absolute sum and evenly spaced samples of the eval-mode logits of a seeded network on a seeded input."""
    net = _build(config).eval()
    spatial = (16,) * config["spatial_dims"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, SMALL["in_channels"], *spatial, generator=generator)
    with torch.no_grad():
        logits = net(x).double().flatten()
    index = torch.linspace(0, logits.numel() - 1, SAMPLES).long()
    return {"sum": logits.sum().item(), "abs_sum": logits.abs().sum().item(), "samples": logits[index].tolist()}


def _record() -> dict:
    keys = {name: list(_build(config).state_dict()) for name, config in CONFIGURATIONS.items()}
    torch.manual_seed(0)
    keys["3d_tiny"] = list(QTUNet(1, 3, **TINY_3D).state_dict())
    return {"keys": keys, "outputs": {name: _output_summary(config) for name, config in CONFIGURATIONS.items()}}


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_state_dict_keys_unchanged(reference: dict, name: str) -> None:
    assert list(_build(CONFIGURATIONS[name]).state_dict()) == reference["keys"][name]


def test_state_dict_keys_unchanged_3d_tiny(reference: dict) -> None:
    assert list(QTUNet(1, 3, **TINY_3D).state_dict()) == reference["keys"]["3d_tiny"]


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_seeded_outputs_unchanged(reference: dict, name: str) -> None:
    # same seed, same parameters created in the same order, same forward: the same logits
    expected, got = reference["outputs"][name], _output_summary(CONFIGURATIONS[name])
    assert got["samples"] == pytest.approx(expected["samples"], rel=1e-5, abs=1e-6)
    assert got["sum"] == pytest.approx(expected["sum"], rel=1e-5, abs=1e-4)
    assert got["abs_sum"] == pytest.approx(expected["abs_sum"], rel=1e-5)


def test_decoder_widths_come_from_the_encoder() -> None:
    net = _build({"spatial_dims": 2, "num_stages": 4})
    # deep to shallow: each decoder stage works at the width of the encoder stage it mirrors
    assert [stage.blocks[0].norm1.normalized_shape[0] for stage in net.decoder_stages] == net.widths[-2::-1]
    assert [len(stage.blocks) for stage in net.decoder_stages] == [2] * 4


def test_decoder_registry_is_the_one_place_for_a_block_kind() -> None:
    from qtunet_monai.networks.blocks.decoder import DECODERS, DecoderStage, DecoderSubBlock

    class GatedSwinDecoderSubBlock(DecoderSubBlock):
        """A decoder block a contributor might add: self-attention, then a gated MLP residual."""

        def forward(self, x, geometry, skip, skip_kv=None):
            x = self._self_attention(x, geometry)
            return x + 0.5 * self._mlp_residual(x, geometry)

    DECODERS["gated"] = GatedSwinDecoderSubBlock
    try:
        net = _build({"spatial_dims": 2, "decoder": "gated"})
        assert all(isinstance(block, GatedSwinDecoderSubBlock) for s in net.decoder_stages for block in s.blocks)
        assert isinstance(net.decoder_stages[0], DecoderStage)
        out = net(torch.randn(1, 2, 16, 16))
        assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    finally:
        del DECODERS["gated"]
    with pytest.raises(ValueError, match="unknown decoder 'gated'"):
        _build({"spatial_dims": 2, "decoder": "gated"})


if __name__ == "__main__":
    if REFERENCE.exists() and "--overwrite" not in sys.argv:
        sys.exit(f"{REFERENCE} exists; it pins the layout of the past: pass --overwrite only if keys are meant to change")
    REFERENCE.write_text(json.dumps(_record(), indent=1) + "\n")
