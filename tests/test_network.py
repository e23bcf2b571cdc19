# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Behaviour of the QT-UNet family on small sizes: shapes, gradients, equivalences, learning."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss

from qtunet_monai import QTUNet
from qtunet_monai.networks.blocks.windows import _cached_geometry, window_geometry

# A small width keeps every test fast; window 3 makes shifted windows appear on small maps.
SMALL = {"feature_size": 12, "window_size": 3}


def _net(**kwargs) -> QTUNet:
    torch.manual_seed(0)
    return QTUNet(**{"in_channels": 2, "out_channels": 3, **SMALL, **kwargs})


CONFIGS_3D = [
    pytest.param({"decoder": "qt"}, id="qt"),
    pytest.param({"decoder": "vt"}, id="vt"),
    pytest.param({"decoder": "none"}, id="none"),
    pytest.param({"decoder": "qt", "merge_depth": False}, id="qt-A"),
    pytest.param({"decoder": "vt", "merge_depth": False}, id="vt-noDepthMerge"),
]


@pytest.mark.parametrize("config", CONFIGS_3D)
def test_3d_odd_sizes_batch_two(config):
    net = _net(**config)
    x = torch.randn(2, 2, 23, 37, 19)
    y = net(x)
    assert y.shape == (2, 3, 23, 37, 19)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("decoder", ["qt", "vt", "none"])
def test_2d_odd_sizes_batch_two(decoder):
    net = _net(spatial_dims=2, decoder=decoder)
    x = torch.randn(3, 2, 45, 71)
    assert net(x).shape == (3, 3, 45, 71)


def test_the_spec_example_size_with_default_window():
    net = QTUNet(1, 2, feature_size=12)
    assert net(torch.randn(1, 1, 50, 61, 37)).shape == (1, 2, 50, 61, 37)


def test_batch_items_are_independent():
    """Padding, windows and masks must not mix samples of a batch."""
    net = _net().eval()
    x = torch.randn(2, 2, 20, 24, 16)
    with torch.no_grad():
        both = net(x)
        second = net(x[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", CONFIGS_3D[:3] + [pytest.param({"spatial_dims": 2}, id="2d")])
def test_gradients_reach_every_parameter(config):
    net = _net(**config)
    # large enough for a bottleneck of 2 tokens per axis: with one token, its bias gets no gradient
    shape = (1, 2, 64, 56, 40) if config.get("spatial_dims", 3) == 3 else (1, 2, 64, 72)
    net(torch.randn(shape)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("decoder", ["qt", "vt"])
def test_checkpointing_gives_same_output_and_gradients(decoder):
    plain = _net(decoder=decoder, drop_path_rate=0.2)
    checkpointed = copy.deepcopy(plain)
    for m in checkpointed.modules():
        if hasattr(m, "use_checkpoint"):
            m.use_checkpoint = True
    x = torch.randn(1, 2, 20, 24, 16)
    outputs, grads = [], []
    for net in (plain, checkpointed):
        torch.manual_seed(123)  # the same drop-path draws in both runs
        y = net(x)
        y.square().mean().backward()
        outputs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("config", CONFIGS_3D[:3] + [pytest.param({"spatial_dims": 2}, id="2d")])
def test_fused_and_explicit_attention_agree(config):
    fused = _net(**config).eval()
    explicit = _net(**config, fused_attention=False).eval()
    explicit.load_state_dict(fused.state_dict())
    shape = (2, 2, 24, 28, 20) if config.get("spatial_dims", 3) == 3 else (2, 2, 40, 36)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), explicit(x), atol=1e-5, rtol=1e-4)


def test_shifted_windows_are_exercised_by_the_small_tests():
    """Guard for the tests above: their feature maps are larger than the window, so shift masks exist."""
    geometry = window_geometry((6, 7, 5), window=3, shift=1, device=torch.device("cpu"))
    assert geometry.attn_mask is not None and geometry.shift_size == (1, 1, 1)
    assert geometry.padded_shape == (6, 9, 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_under_autocast(dtype):
    net = _net().eval()
    x = torch.randn(1, 2, 24, 20, 16)
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=dtype):
            y = net(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    # low precision drifts, but must stay close to the float32 result
    assert (y.float() - reference).abs().mean() < 0.05 * reference.abs().mean() + 1e-3


def test_training_step_under_bf16_autocast():
    net = _net()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(torch.randn(1, 2, 16, 16, 16)).float().square().mean()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_masks_and_indices_are_built_once_per_size():
    net = _net().eval()
    x = torch.randn(1, 2, 28, 24, 20)
    with torch.no_grad():
        net(x)
        misses = _cached_geometry.cache_info().misses
        net(x)
        net(torch.randn(2, 2, 28, 24, 20))  # the batch size does not change the geometry
    assert _cached_geometry.cache_info().misses == misses


def test_geometry_built_in_inference_mode_serves_training():
    net = _net()
    x = torch.randn(1, 2, 36, 20, 20)  # a size no other test uses, so inference mode builds the cache
    with torch.inference_mode():
        net.eval()(x)
    net.train()(x).mean().backward()
    assert net.patch_embed.proj.weight.grad is not None


def test_sliding_window_inference_with_monai():
    net = _net().eval()
    image = torch.randn(1, 2, 40, 35, 30)
    with torch.no_grad():
        out = sliding_window_inference(image, roi_size=(24, 24, 24), sw_batch_size=2, predictor=net, overlap=0.5)
    assert out.shape == (1, 3, 40, 35, 30)


def test_overfits_one_synthetic_volume():
    """The network learns: Dice loss on one volume with a sphere and a cube falls steeply."""
    torch.manual_seed(0)
    size = 32
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    sphere = ((grid - 10).square().sum(0) < 36).long()
    cube = ((grid > 18) & (grid < 28)).all(0).long()
    label = (sphere + 2 * cube).clamp(max=2)[None, None]
    image = torch.cat([label.float() + 0.3 * torch.randn_like(label.float()), torch.randn_like(label.float())], 1)
    net = QTUNet(2, 3, feature_size=12, window_size=4)
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    assert max(losses[-5:]) < 0.25, losses


def test_chunked_inference_head_equals_the_full_head():
    net = _net().eval()
    net.head_expand.inference_chunk = 50  # far fewer tokens than the map has, so the head runs in chunks
    x = torch.randn(1, 2, 40, 36, 28)
    with torch.no_grad():
        chunked = net(x)
    full = net(x).detach()  # gradients on: the head runs in one piece
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-4)
