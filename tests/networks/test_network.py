# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Behaviour of the QT-UNet family on small sizes: shapes, gradients, equivalences, learning."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceLoss

from qtunet_monai import QTUNet
from qtunet_monai.networks import QTUNetEncoder
from qtunet_monai.networks.blocks import DecoderSubBlock, WindowAttention
from qtunet_monai.networks.blocks.windows import _cached_geometry, window_geometry

CONFIGS_3D = [
    pytest.param({"decoder": "qt"}, id="qt"),
    pytest.param({"decoder": "vt"}, id="vt"),
    pytest.param({"decoder": "none"}, id="none"),
    pytest.param({"decoder": "qt", "merge_depth": False}, id="qt-A"),
    pytest.param({"decoder": "vt", "merge_depth": False}, id="vt-noDepthMerge"),
]


@pytest.mark.parametrize("config", CONFIGS_3D)
def test_3d_odd_sizes_batch_two(config, tiny_qtunet):
    net = tiny_qtunet(**config)
    x = torch.randn(2, 2, 23, 37, 19)
    y = net(x)
    assert y.shape == (2, 3, 23, 37, 19)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("decoder", ["qt", "vt", "none"])
def test_2d_odd_sizes_batch_two(decoder, tiny_qtunet):
    net = tiny_qtunet(spatial_dims=2, decoder=decoder)
    x = torch.randn(3, 2, 45, 71)
    assert net(x).shape == (3, 3, 45, 71)


def test_the_spec_example_size_with_default_window():
    net = QTUNet(1, 2, feature_size=12)
    assert net(torch.randn(1, 1, 50, 61, 37)).shape == (1, 2, 50, 61, 37)


def test_batch_items_are_independent(tiny_qtunet):
    """Padding, windows and masks must not mix samples of a batch."""
    net = tiny_qtunet().eval()
    x = torch.randn(2, 2, 20, 24, 16)
    with torch.no_grad():
        both = net(x)
        second = net(x[1:])
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", CONFIGS_3D[:3] + [pytest.param({"spatial_dims": 2}, id="2d")])
def test_gradients_reach_every_parameter(config, tiny_qtunet):
    net = tiny_qtunet(**config)
    # large enough for a bottleneck of 2 tokens per axis: with one token, its bias gets no gradient
    shape = (1, 2, 64, 56, 40) if config.get("spatial_dims", 3) == 3 else (1, 2, 64, 72)
    net(torch.randn(shape)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("decoder", ["qt", "vt"])
def test_checkpointing_gives_same_output_and_gradients(decoder, tiny_qtunet):
    plain = tiny_qtunet(decoder=decoder, drop_path_rate=0.2)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    assert all(stage.use_checkpoint for stage in checkpointed.decoder_stages) and checkpointed.head.use_checkpoint
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
def test_fused_and_explicit_attention_agree(config, tiny_qtunet):
    fused = tiny_qtunet(**config).eval()
    explicit = tiny_qtunet(**config, attention_backend="explicit").eval()
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
def test_runs_under_autocast(dtype, tiny_qtunet):
    net = tiny_qtunet().eval()
    x = torch.randn(1, 2, 24, 20, 16)
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=dtype):
            y = net(x)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    # low precision drifts, but must stay close to the float32 result
    assert (y.float() - reference).abs().mean() < 0.05 * reference.abs().mean() + 1e-3


def test_training_step_under_bf16_autocast(tiny_qtunet):
    net = tiny_qtunet()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = net(torch.randn(1, 2, 16, 16, 16)).float().square().mean()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_masks_and_indices_are_built_once_per_size(tiny_qtunet):
    net = tiny_qtunet().eval()
    x = torch.randn(1, 2, 28, 24, 20)
    with torch.no_grad():
        net(x)
        misses = _cached_geometry.cache_info().misses
        net(x)
        net(torch.randn(2, 2, 28, 24, 20))  # the batch size does not change the geometry
    assert _cached_geometry.cache_info().misses == misses


def test_geometry_built_in_inference_mode_serves_training(tiny_qtunet):
    net = tiny_qtunet()
    x = torch.randn(1, 2, 36, 20, 20)  # a size no other test uses, so inference mode builds the cache
    with torch.inference_mode():
        net.eval()(x)
    net.train()(x).mean().backward()
    assert net.patch_embed.proj.weight.grad is not None


def test_sliding_window_inference_with_monai(tiny_qtunet):
    net = tiny_qtunet().eval()
    image = torch.randn(1, 2, 40, 35, 30)
    with torch.no_grad():
        out = sliding_window_inference(image, roi_size=(24, 24, 24), sw_batch_size=2, predictor=net, overlap=0.5)
    assert out.shape == (1, 3, 40, 35, 30)


@pytest.mark.slow
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


def test_chunked_inference_head_equals_the_full_head(tiny_qtunet):
    net = tiny_qtunet().eval()
    net.head.expand.inference_chunk = 50  # far fewer tokens than the map has, so the head runs in chunks
    x = torch.randn(1, 2, 40, 36, 28)
    with torch.no_grad():
        chunked = net(x)
    full = net(x).detach()  # gradients on: the head runs in one piece
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=1e-4)


def test_forward_features_are_what_the_decoder_reads(tiny_qtunet):
    net = tiny_qtunet(decoder="vt").eval()
    x = torch.randn(1, 2, 40, 36, 28)
    with torch.no_grad():
        features = net.forward_features(x)
        assert [tuple(s.shape) for s in features.skips] == [(1, 10, 9, 7, 12), (1, 5, 5, 4, 24), (1, 3, 3, 2, 48)]
        assert features.bottleneck.shape == (1, 2, 2, 1, 96)
        assert [len(kv) for kv in features.keys_values] == [2, 2, 2]  # the VT decoder reads them per sub-block
        decoded = net.forward_decoder(features)
        torch.testing.assert_close(net.head(decoded[-1], x.shape[2:]), net(x))
    assert tiny_qtunet(decoder="qt").forward_features(x).keys_values is None


def test_the_encoder_alone_builds_no_decoder_and_matches_qtunets_encoder(tiny_qtunet):
    net = tiny_qtunet().eval()
    encoder = QTUNetEncoder(2, feature_size=12, window_size=3).eval()  # tiny_qtunet's encoder
    assert not any(k.startswith(("decoder_stages", "expansions", "skip_projections", "head")) for k in encoder.state_dict())
    report = net.load_state_dict(encoder.state_dict(), strict=False)
    assert report.unexpected_keys == []
    x = torch.randn(1, 2, 32, 32, 24)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), net.forward_features(x).bottleneck.movedim(-1, 1))


def test_no_weight_decay_names_exactly_the_relative_position_bias_tables(tiny_qtunet):
    net = tiny_qtunet(decoder="qt")
    tables = {f"{name}.relative_position_bias_table" for name, m in net.named_modules()
              if isinstance(m, WindowAttention)}
    assert net.no_weight_decay() == tables
    assert len(tables) == 2 * 3 + 1 + 2 * 2 * 3  # encoder pairs, bottleneck, decoder pairs with self and cross
    # usable as parameter groups: every parameter in exactly one group
    decay = [p for n, p in net.named_parameters() if n not in net.no_weight_decay()]
    torch.optim.AdamW([{"params": decay}, {"params": [net.get_parameter(n) for n in tables], "weight_decay": 0.0}])


@pytest.mark.parametrize("decoder", ["qt", "vt", "none"])
def test_every_decoder_sub_block_has_the_one_interface(decoder, tiny_qtunet):
    net = tiny_qtunet(decoder=decoder)
    blocks = [block for stage in net.decoder_stages for block in stage.blocks]
    assert all(isinstance(block, DecoderSubBlock) for block in blocks)
    assert {block.needs_encoder_kv for block in blocks} == {decoder == "vt"}
    assert net.needs_encoder_kv == (decoder == "vt")
    block, x = blocks[-1], torch.randn(1, 6, 5, 4, 12)
    geometry = window_geometry(x.shape[1:-1], 3, 1, x.device)
    if decoder == "vt":
        with pytest.raises(ValueError, match="skip_kv"):
            block(x, geometry, x)
    else:
        assert block(x, geometry, torch.randn_like(x)).shape == x.shape


@pytest.mark.parametrize("spatial_dims, shape", [(3, (1, 2, 37, 29, 23)), (2, (2, 2, 45, 71))])
@pytest.mark.parametrize("config", [
    pytest.param({"num_stages": 4}, id="4-stages"),
    pytest.param({"patch_size": 2}, id="patch-2"),
    pytest.param({"num_stages": 4, "patch_size": 2, "decoder": "vt"}, id="4-stages-patch-2-vt"),
])
def test_four_stages_and_patch_two_take_odd_sizes(config, spatial_dims, shape, tiny_qtunet):
    net = tiny_qtunet(spatial_dims=spatial_dims, **config)
    y = net(torch.randn(shape))
    assert y.shape == (shape[0], 3, *shape[2:])
    assert torch.isfinite(y).all()
    stages = config.get("num_stages", 3)
    assert len(net.encoder_stages) == len(net.decoder_stages) == stages
    assert net.num_heads == tuple(3 * 2**i for i in range(stages + 1))  # heads double with the width
    assert net.bottleneck_norm.normalized_shape == (12 * 2**stages,)
    assert net.head.expand.factors == (config.get("patch_size", 4),) * spatial_dims


def test_deep_supervision_outputs_in_training_and_plain_logits_in_eval(tiny_qtunet):
    net = tiny_qtunet(deep_supervision=True, num_stages=4, patch_size=2)
    x = torch.randn(2, 2, 37, 29, 23)
    outputs = net.train()(x)
    # the full-size logits, then each decoder stage but the last, finest first, on its own token grid
    grids = [[math.ceil(s / (2 * 2**i)) for s in x.shape[2:]] for i in (1, 2, 3)]
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 37, 29, 23)] + [(2, 3, *g) for g in grids]
    sum(o.square().mean() for o in outputs).backward()
    assert all(head.classifier.weight.grad is not None for head in net.aux_heads)
    with torch.no_grad():
        logits = net.eval()(x)
    torch.testing.assert_close(logits, outputs[0].detach())  # no dropout or drop path: train and eval agree
    plain = tiny_qtunet(num_stages=4, patch_size=2)
    aux = {k for k in net.state_dict() if k.startswith("aux_heads.")}
    assert set(net.state_dict()) - aux == set(plain.state_dict())  # deep supervision only adds the heads


def test_deep_supervision_network_traces_to_plain_logits(tiny_qtunet):
    net = tiny_qtunet(deep_supervision=True).train()
    x = torch.randn(1, 2, 24, 24, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the trace is specialised to this size
        traced = torch.jit.trace(net, x, check_trace=False)
    y = traced(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, 24, 24, 20)


def test_deep_supervision_trains_in_monais_supervised_trainer(tiny_qtunet):
    """What a bundle needs: the network argument and the loss wrapped in DeepSupervisionLoss."""
    net = tiny_qtunet(deep_supervision=True)
    data = [{"image": torch.randn(2, 16, 16, 16), "label": torch.randint(0, 3, (1, 16, 16, 16)).float()}] * 2
    loss = DeepSupervisionLoss(DiceLoss(to_onehot_y=True, softmax=True), weight_mode="exp")
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(data, batch_size=2), network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3), loss_function=loss,
    )
    trainer.run()
    first = trainer.state.output[0]  # decollated: per sample, the full-size logits and the two auxiliary ones
    assert [tuple(p.shape) for p in first["pred"]] == [(3, 16, 16, 16), (3, 2, 2, 2), (3, 1, 1, 1)]
    assert torch.isfinite(torch.as_tensor(first["loss"]))
