# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""ImageNet Swin-T -> QT-UNet encoder, in 2D and inflated to 3D, from timm and official key names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtunet_monai import QTUNet
from qtunet_monai.networks.imagenet import load_imagenet_swin, swin_to_qtunet

DEPTHS, HEADS, C, WINDOW = (2, 2, 6, 2), (3, 6, 12, 24), 96, 7


def random_swin_tiny(official: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised Swin-T state dict with timm's (or Microsoft's) key names and shapes."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    state = {"patch_embed.proj.weight": r(C, 3, 4, 4), "patch_embed.proj.bias": r(C),
             "patch_embed.norm.weight": r(C), "patch_embed.norm.bias": r(C)}
    for i, (depth, heads) in enumerate(zip(DEPTHS, HEADS)):
        d = C * 2**i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}"
            state.update({f"{p}.norm1.weight": r(d), f"{p}.norm1.bias": r(d),
                          f"{p}.attn.relative_position_bias_table": r((2 * WINDOW - 1) ** 2, heads),
                          f"{p}.attn.qkv.weight": r(3 * d, d), f"{p}.attn.qkv.bias": r(3 * d),
                          f"{p}.attn.proj.weight": r(d, d), f"{p}.attn.proj.bias": r(d),
                          f"{p}.norm2.weight": r(d), f"{p}.norm2.bias": r(d),
                          f"{p}.mlp.fc1.weight": r(4 * d, d), f"{p}.mlp.fc1.bias": r(4 * d),
                          f"{p}.mlp.fc2.weight": r(d, 4 * d), f"{p}.mlp.fc2.bias": r(d)})
        if i < 3:  # downsampling after layer i: official keeps it in layer i, timm in layer i + 1
            p = f"layers.{i}.downsample" if official else f"layers.{i + 1}.downsample"
            state.update({f"{p}.norm.weight": r(4 * d), f"{p}.norm.bias": r(4 * d),
                          f"{p}.reduction.weight": r(2 * d, 4 * d)})
    state.update({"norm.weight": r(8 * C), "norm.bias": r(8 * C), "head.fc.weight": r(1000, 8 * C),
                  "head.fc.bias": r(1000)})
    return {"model": state} if official else state


def swin_merge_2d(x: torch.Tensor, norm_w, norm_b, reduction) -> torch.Tensor:
    """Swin's 2D patch merging, written as the official code does it, on (B, H, W, C)."""
    x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
    x = torch.cat([x0, x1, x2, x3], -1)
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm_w, norm_b), reduction)


def test_refuses_an_encoder_that_is_not_the_thesis_one():
    with pytest.raises(ValueError, match="num_stages=3 and patch_size=4 only; the network has num_stages=3, patch_size=2"):
        swin_to_qtunet(random_swin_tiny(False), QTUNet(3, 2, spatial_dims=2, variant="base", patch_size=2))


@pytest.mark.parametrize("official", [False, True])
def test_2d_copies_swin_exactly(official):
    state = random_swin_tiny(official)
    flat = state["model"] if official else state
    net = QTUNet(3, 20, spatial_dims=2, variant="base")
    converted = swin_to_qtunet(state, net)
    assert torch.equal(converted["patch_embed.proj.weight"], flat["patch_embed.proj.weight"])
    qkv = "attn.qkv.weight"
    assert torch.equal(converted[f"encoder_stages.2.blocks.1.{qkv}"], flat[f"layers.2.blocks.1.{qkv}"])
    assert torch.equal(converted["encoder_stages.0.blocks.0.attn.relative_position_bias_table"],
                       flat["layers.0.blocks.0.attn.relative_position_bias_table"])
    assert torch.equal(converted["bottleneck.blocks.0.mlp.linear2.weight"], flat["layers.3.blocks.0.mlp.fc2.weight"])
    assert torch.equal(converted["bottleneck_norm.weight"], flat["norm.weight"])
    net.load_state_dict(converted, strict=False)
    # the merging layer computes exactly Swin's
    down = "layers.0.downsample" if official else "layers.1.downsample"
    x = torch.randn(2, 8, 8, C)
    expected = swin_merge_2d(x, flat[f"{down}.norm.weight"], flat[f"{down}.norm.bias"],
                             flat[f"{down}.reduction.weight"])
    assert torch.allclose(net.merges[0](x), expected, atol=1e-4)


def test_3d_inflation_reproduces_2d_on_depth_constant_input():
    state = random_swin_tiny(official=False)
    net = QTUNet(1, 14, variant="base")
    net.load_state_dict(swin_to_qtunet(state, net), strict=False)
    image = torch.randn(1, 1, 16, 16)  # one grey slice, repeated along depth
    volume = image.unsqueeze(-1).repeat(1, 1, 1, 1, 8)
    with torch.no_grad():
        tokens = net.patch_embed(volume)  # (1, 4, 4, 2, C)
        grey = state["patch_embed.proj.weight"].sum(1, keepdim=True)  # an RGB net on a grey image
        ref = F.conv2d(image, grey, state["patch_embed.proj.bias"], stride=4).movedim(1, -1)
        ref = F.layer_norm(ref, (C,), state["patch_embed.norm.weight"], state["patch_embed.norm.bias"])
        for z in range(tokens.shape[3]):
            assert torch.allclose(tokens[:, :, :, z], ref, atol=1e-4)
        x = torch.randn(1, 8, 8, 1, C).repeat(1, 1, 1, 2, 1)  # depth-constant tokens
        merged = net.merges[0](x)[:, :, :, 0]
        down = "layers.1.downsample"
        expected = swin_merge_2d(x[:, :, :, 0], state[f"{down}.norm.weight"], state[f"{down}.norm.bias"],
                                 state[f"{down}.reduction.weight"])
        assert torch.allclose(merged, expected, atol=1e-4)
    table = net.encoder_stages[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (13**3, 3)
    table_2d = state["layers.0.blocks.0.attn.relative_position_bias_table"]
    assert torch.equal(table[(4 * 13 + 9) * 13 + 2], table_2d[4 * 13 + 9])


def test_load_from_file_reports_and_refuses_wrong_width(tmp_path):
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save(random_swin_tiny(official=True), path)
    net = QTUNet(4, 3, variant="base")
    report = load_imagenet_swin(net, str(path))
    assert "patch_embed.proj.weight" in report["loaded"] and "head.classifier.weight" in report["missing"]
    assert net(torch.randn(1, 4, 32, 32, 32)).shape == (1, 4 - 1, 32, 32, 32)
    with pytest.raises(ValueError, match="width C=96 but the network C=48"):
        load_imagenet_swin(QTUNet(4, 3, variant="tiny"), str(path))
    with pytest.raises(ValueError, match="not a Swin Transformer"):
        swin_to_qtunet({"conv.weight": torch.zeros(1)}, net)


def test_timm_swin_tiny_if_installed():
    timm = pytest.importorskip("timm", exc_type=ImportError)
    state = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).state_dict()
    net = QTUNet(1, 2, variant="base")
    converted = swin_to_qtunet(state, net)
    assert len(converted) == sum(1 for k in net.state_dict() if k.startswith(("patch_embed", "encoder_stages",
                                                                                 "merges", "bottleneck")))
