# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""UCTransNet's channel-wise skips (``QTUNet(skip="cct")``): the channel attention and the gate
against literal re-implementations of UCTransNet's code, their invariances, the zero-initialised
equivalence with the plain network, gradients, checkpointing, tracing and the untouched default."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qtunet_monai import ARCHITECTURES, QTUNet, build_architecture
from qtunet_monai.networks.blocks import ChannelCrossAttention, ChannelGate, ChannelTransformerLayer
from qtunet_monai.networks.blocks.channel_transformer import _grouped_mean, common_grid_factors

SMALL = {"feature_size": 12, "window_size": 3}
NEW = ("skip_fusion.", "skip_gates.")


def _net(**kwargs) -> QTUNet:
    torch.manual_seed(0)
    return QTUNet(**{"in_channels": 1, "out_channels": 2, **SMALL, **kwargs})


def _randomise_reconstruction(net: QTUNet, std: float = 0.05) -> None:
    """Make the CCT's zero-initialised output projections nonzero (as training does)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for projection in net.skip_fusion.reconstructions:
            projection.weight.normal_(0, std)
            projection.bias.normal_(0, std)


# ---------------------------------------------------------------------------------------------------------
# literal re-implementations of UCTransNet's code (McGregorWwww/UCTransNet, nets/CTrans.py and
# nets/UCTransNet.py), generalised from 4 fixed scales to a list of them


class _UCTransNetAttention(nn.Module):
    """``Attention_org``: per head and scale its own query Linear, per head a key and a value Linear over
    all ``KV_size`` channels, ``InstanceNorm2d(heads)``, ``Softmax(dim=3)``, mean over heads, ``out``."""

    def __init__(self, channel_num, heads):
        super().__init__()
        self.kv_size = sum(channel_num)
        self.query = nn.ModuleList(
            nn.ModuleList(nn.Linear(c, c, bias=False) for _ in range(heads)) for c in channel_num
        )
        self.key = nn.ModuleList(nn.Linear(self.kv_size, self.kv_size, bias=False) for _ in range(heads))
        self.value = nn.ModuleList(nn.Linear(self.kv_size, self.kv_size, bias=False) for _ in range(heads))
        self.psi = nn.InstanceNorm2d(heads)
        self.softmax = nn.Softmax(dim=3)
        self.out = nn.ModuleList(nn.Linear(c, c, bias=False) for c in channel_num)

    def forward(self, embs, emb_all):
        multi_head_k = torch.stack([key(emb_all) for key in self.key], dim=1)
        multi_head_v = torch.stack([value(emb_all) for value in self.value], dim=1)
        outputs, probs = [], []
        for emb, queries, out in zip(embs, self.query, self.out):
            multi_head_q = torch.stack([query(emb) for query in queries], dim=1).transpose(-1, -2)
            attention_scores = torch.matmul(multi_head_q, multi_head_k) / math.sqrt(self.kv_size)
            attention_probs = self.softmax(self.psi(attention_scores))
            context_layer = torch.matmul(attention_probs, multi_head_v.transpose(-1, -2))
            context_layer = context_layer.permute(0, 3, 2, 1).contiguous().mean(dim=3)
            outputs.append(out(context_layer))
            probs.append(attention_probs)
        return outputs, probs


class _UCTransNetCCA(nn.Module):
    """``CCA``: channels-first ``g`` (decoder) and ``x`` (skip), 2D or 3D."""

    def __init__(self, f_g, f_x):
        super().__init__()
        self.mlp_x = nn.Sequential(nn.Flatten(), nn.Linear(f_x, f_x))
        self.mlp_g = nn.Sequential(nn.Flatten(), nn.Linear(f_g, f_x))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g, x):
        pool = F.avg_pool2d if x.ndim == 4 else F.avg_pool3d
        avg_pool_x = pool(x, x.shape[2:], stride=x.shape[2:])
        channel_att_x = self.mlp_x(avg_pool_x)
        avg_pool_g = pool(g, g.shape[2:], stride=g.shape[2:])
        channel_att_g = self.mlp_g(avg_pool_g)
        channel_att_sum = (channel_att_x + channel_att_g) / 2.0
        scale = torch.sigmoid(channel_att_sum).view(*channel_att_sum.shape, *([1] * (x.ndim - 2))).expand_as(x)
        x_after_channel = x * scale
        return self.relu(x_after_channel)


def _copy_into(ours: ChannelCrossAttention, ref: _UCTransNetAttention) -> None:
    heads, total = ours.num_heads, ours.total
    with torch.no_grad():
        for i, c in enumerate(ours.widths):
            ours.queries[i].weight.copy_(torch.cat([q.weight for q in ref.query[i]]))
            ours.outputs[i].weight.copy_(ref.out[i].weight)
        key_value = torch.stack([torch.stack([k.weight for k in ref.key]), torch.stack([v.weight for v in ref.value])])
        ours.key_value.weight.copy_(key_value.reshape(2 * heads * total, total))


@pytest.mark.parametrize("widths", [(8, 16, 32), (6, 12, 24, 48)], ids=["3-scales", "4-scales"])
def test_channel_attention_matches_uctransnet_formula(widths):
    torch.manual_seed(0)
    heads, n = 3, 10
    ref = _UCTransNetAttention(widths, heads)  # PyTorch's default init, as UCTransNet's
    ours = ChannelCrossAttention(widths, heads)
    _copy_into(ours, ref)
    embs = [torch.randn(2, n, c) for c in widths]
    emb_all = torch.randn(2, n, sum(widths))
    expected, expected_probs = ref(embs, emb_all)
    for out, exp in zip(ours(embs, emb_all), expected):
        torch.testing.assert_close(out, exp, atol=1e-6, rtol=1e-5)
    for probs, exp in zip(ours.maps(embs, emb_all), expected_probs):
        assert probs.shape == (2, heads, exp.shape[2], sum(widths))
        torch.testing.assert_close(probs, exp, atol=1e-6, rtol=1e-5)


def test_channel_transformer_layers_are_equivariant_to_token_order():
    """Without position information the channel maps are sums over tokens: permuting the tokens permutes
    every layer's outputs the same way and leaves the maps unchanged."""
    torch.manual_seed(0)
    widths = (6, 12, 24)
    layers = [ChannelTransformerLayer(widths, num_heads=2) for _ in range(2)]
    tokens = [torch.randn(2, 15, c) for c in widths]
    perm = torch.randperm(15)
    out, out_perm = tokens, [t[:, perm] for t in tokens]
    for layer in layers:
        out, out_perm = layer(*out), layer(*out_perm)
    for a, b in zip(out, out_perm):
        torch.testing.assert_close(a[:, perm], b, atol=1e-5, rtol=1e-4)
    attn, context = layers[0].attn, torch.cat(tokens, dim=-1)
    for a, b in zip(attn.maps(tokens, context), attn.maps([t[:, perm] for t in tokens], context[:, perm])):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_scaling_the_queries_leaves_the_maps_unchanged():
    """The instance norm removes the scale of the scores (hence their dependence on n)."""
    torch.manual_seed(0)
    widths = (8, 16, 32)
    attn = ChannelCrossAttention(widths, num_heads=2)
    for linear in [*attn.queries, attn.key_value]:
        nn.init.normal_(linear.weight, std=linear.in_features**-0.5)  # scores well above the norm's epsilon
    queries = [torch.randn(1, 20, c) for c in widths]
    context = torch.randn(1, 20, sum(widths))
    maps = attn.maps(queries, context)
    for factor in (10.0, 100.0):
        for a, b in zip(maps, attn.maps([factor * q for q in queries], context)):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gate_is_uctransnets_cca(relu, spatial_dims):
    torch.manual_seed(0)
    c, c_g = 12, 20
    ref = _UCTransNetCCA(c_g, c)
    ours = ChannelGate(c, c_g, relu=relu)
    with torch.no_grad():
        ours.skip_fc.load_state_dict(ref.mlp_x[1].state_dict())
        ours.decoder_fc.load_state_dict(ref.mlp_g[1].state_dict())
    spatial = (7, 5) if spatial_dims == 2 else (5, 4, 3)
    skip, decoder = torch.randn(2, *spatial, c), torch.randn(2, *spatial, c_g)
    if not relu:
        skip = skip.abs()  # UCTransNet's skips are post-ReLU: its ReLU after a positive gate changes nothing
    expected = ref(decoder.movedim(-1, 1), skip.movedim(-1, 1).clone()).movedim(1, -1)
    torch.testing.assert_close(ours(skip, decoder), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pooled_embedding_averages_real_voxels_only(spatial_dims):
    x = torch.randn(2, *((13, 10) if spatial_dims == 2 else (9, 6, 5)), 4)
    factors = (4, 2) if spatial_dims == 2 else (4, 2, 1)
    pool = F.avg_pool2d if spatial_dims == 2 else F.avg_pool3d
    expected = pool(x.movedim(-1, 1), factors, stride=factors, ceil_mode=True).movedim(1, -1)
    torch.testing.assert_close(_grouped_mean(x, factors), expected)


def test_common_grid_factors():
    assert common_grid_factors((2, 2, 2), 3) == [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    assert common_grid_factors((2, 2, 1), 3) == [(8, 8, 1), (4, 4, 1), (2, 2, 1)]
    assert common_grid_factors((2, 2, 1), 3, "deepest_skip") == [(4, 4, 1), (2, 2, 1), (1, 1, 1)]
    assert common_grid_factors((2, 2), 4) == [(16, 16), (8, 8), (4, 4), (2, 2)]


# ---------------------------------------------------------------------------------------------------------
# the network

EQUIVALENCE = [
    pytest.param({"decoder": "qt"}, (1, 1, 23, 29, 19), id="3d-qt-odd"),
    pytest.param({"decoder": "vt", "merge_depth": False}, (1, 1, 21, 18, 11), id="3d-vt-keepdepth"),
    pytest.param({"decoder": "none", "num_stages": 4, "patch_size": 2}, (1, 1, 33, 31, 17), id="3d-none-4stages-p2"),
    pytest.param({"decoder": "qt", "cct_grid": "deepest_skip", "cct_preset": "lite", "cct_position": "sine"},
                 (1, 1, 25, 22, 20), id="3d-qt-lite-deepest"),
    pytest.param({"spatial_dims": 2, "decoder": "qt"}, (2, 1, 45, 71), id="2d-qt-odd"),
    pytest.param({"spatial_dims": 2, "decoder": "none", "num_stages": 4, "patch_size": 2}, (1, 1, 67, 53),
                 id="2d-none-4stages-p2"),
    pytest.param({"spatial_dims": 2, "decoder": "vt", "deep_supervision": True}, (1, 1, 40, 52), id="2d-vt-ds"),
]


@pytest.mark.parametrize(("config", "shape"), EQUIVALENCE)
def test_zero_initialised_cct_is_the_plain_network(config, shape):
    plain_config = {k: v for k, v in config.items() if not k.startswith("cct_")}
    plain = _net(**plain_config).train()
    cct = _net(skip="cct", cca=False, **config).train()
    cct_keys = [k for k in cct.state_dict() if k.startswith("skip_fusion.")]
    report = cct.load_state_dict(plain.state_dict(), strict=False)
    assert report.unexpected_keys == [] and sorted(report.missing_keys) == sorted(cct_keys) and cct_keys
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = plain(x), cct(x)
    if config.get("deep_supervision"):
        assert isinstance(got, list) and len(got) == len(expected)
    for a, b in zip(expected if isinstance(expected, list) else [expected], got if isinstance(got, list) else [got]):
        assert torch.equal(a, b)
    _randomise_reconstruction(cct)  # guard: the CCT is on the path, and acts once trained
    with torch.no_grad():
        changed = cct(x)
    assert not torch.allclose(changed[0] if isinstance(changed, list) else changed, got[0] if isinstance(got, list) else got)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_saturated_gate_is_no_gate(spatial_dims):
    shape = (1, 1, 44, 36) if spatial_dims == 2 else (1, 1, 24, 20, 28)
    gated = _net(spatial_dims=spatial_dims, skip="cct", cct_preset="lite")
    _randomise_reconstruction(gated)
    ungated = _net(spatial_dims=spatial_dims, skip="cct", cct_preset="lite", cca=False)
    report = ungated.load_state_dict(gated.state_dict(), strict=False)
    assert report.missing_keys == [] and report.unexpected_keys and all(
        k.startswith("skip_gates.") for k in report.unexpected_keys)
    x = torch.randn(shape)
    with torch.no_grad():
        untouched = gated(x)
        for gate in gated.skip_gates:
            gate.skip_fc.weight.zero_()
            gate.decoder_fc.weight.zero_()
            gate.skip_fc.bias.fill_(20.0)  # sigmoid(20) is 1 in float32
            gate.decoder_fc.bias.fill_(20.0)
        saturated, expected = gated(x), ungated(x)
    assert torch.equal(saturated, expected)
    assert not torch.allclose(untouched, expected)  # the gate at its initialisation (about 1/2) does act


def test_gate_feeds_the_cross_attention_only_when_asked():
    x = torch.randn(1, 1, 24, 20, 28)
    outputs = {}
    for flag in (True, False):
        net = _net(skip="cct", cct_preset="lite", cca_for_cross_attention=flag).eval()
        with torch.no_grad():
            outputs[flag] = net(x)
    assert not torch.allclose(outputs[True], outputs[False])
    # the VT decoder reads the encoder's own keys/values: the switch changes nothing there
    vt = [_net(decoder="vt", skip="cct", cct_preset="lite", cca_for_cross_attention=f).eval() for f in (True, False)]
    with torch.no_grad():
        assert torch.equal(vt[0](x), vt[1](x))


def test_skip_concat_is_the_default_network():
    default = _net()
    concat = _net(skip="concat")
    assert list(default.state_dict()) == list(concat.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), concat.state_dict().values()))
    assert concat.skip_fusion is None and concat.skip_gates is None
    x = torch.randn(1, 1, 24, 20, 28)
    with torch.no_grad():
        assert torch.equal(default(x), concat(x))
    # the CCT network adds modules under new names only, built after the others: same names, same initial values
    cct = _net(skip="cct")
    shared = {k: v for k, v in cct.state_dict().items() if not k.startswith(NEW)}
    assert list(shared) == list(default.state_dict())
    assert all(torch.equal(shared[k], v) for k, v in default.state_dict().items())
    assert {k.split(".")[0] for k in cct.state_dict() if k not in shared} == {"skip_fusion", "skip_gates"}


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        pytest.param({"spatial_dims": 2, "cct_position": "conv"}, (1, 1, 64, 72), id="2d-full-conv"),
        pytest.param({"spatial_dims": 2, "cct_preset": "lite", "cct_position": "sine", "decoder": "none"},
                     (1, 1, 64, 72), id="2d-lite-sine"),
        pytest.param({"cct_preset": "lite", "cct_grid": "deepest_skip", "merge_depth": False}, (1, 1, 32, 32, 12),
                     id="3d-lite-deepest"),
    ],
)
def test_gradients_reach_every_new_parameter_after_one_step(config, shape):
    """The zero-initialised reconstruction blocks the CCT's gradients in the first step only."""
    net = _net(skip="cct", **config)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.randn(shape)
    net(x).square().mean().backward()
    opt.step()
    assert all(p.abs().sum() > 0 for p in net.skip_fusion.reconstructions.parameters())
    opt.zero_grad()
    net(x).square().mean().backward()
    new = [(n, p) for n, p in net.named_parameters() if n.startswith(NEW)]
    assert new
    missing = [n for n, p in new if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_checkpointing_gives_same_output_and_gradients():
    plain = _net(skip="cct", cct_layers=2, cct_heads=2, drop_path_rate=0.2)
    _randomise_reconstruction(plain)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    assert checkpointed.skip_fusion.use_checkpoint
    assert _net(skip="cct", cct_preset="lite", use_checkpoint=True).skip_fusion.use_checkpoint
    x = torch.randn(1, 1, 24, 20, 28)
    outputs, grads = [], []
    for net in (plain, checkpointed):
        torch.manual_seed(123)
        y = net(x)
        y.square().mean().backward()
        outputs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    torch.testing.assert_close(outputs[0], outputs[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "shape"),
    [
        pytest.param({"decoder": "qt"}, (1, 1, 24, 20, 28), id="3d-full"),
        pytest.param({"spatial_dims": 2, "cct_preset": "lite", "cct_position": "sine"}, (1, 1, 44, 36), id="2d-lite"),
    ],
)
def test_trace_at_a_fixed_size_equals_eager(config, shape):
    net = _net(skip="cct", **config).eval()
    _randomise_reconstruction(net)
    x = torch.randn(shape)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings: the trace is specialised to this size, by design
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), net(x))


def test_training_step_under_bf16_autocast():
    net = _net(skip="cct", cct_layers=1)
    _randomise_reconstruction(net)
    x = torch.randn(1, 1, 24, 20, 16)
    with torch.no_grad():
        reference = net(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert (y.float() - reference).abs().mean() < 0.05 * reference.abs().mean() + 1e-3
    y.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown skip 'sum'"):
        _net(skip="sum")
    with pytest.raises(ValueError, match="cct_layers, cct_preset only apply with skip='cct'"):
        _net(cct_preset="lite", cct_layers=2)
    with pytest.raises(ValueError, match="unknown cct_preset 'huge'"):
        _net(skip="cct", cct_preset="huge")
    with pytest.raises(ValueError, match="unknown cct_grid"):
        _net(skip="cct", cct_grid="input")
    with pytest.raises(ValueError, match="cct_heads must be a positive integer"):
        _net(skip="cct", cct_heads=0)
    lite = _net(skip="cct", cct_preset="lite", cct_heads=2)
    assert len(lite.skip_fusion.layers) == 1 and lite.skip_fusion.layers[0].attn.num_heads == 2
    assert lite.skip_fusion.embeddings[0].embedding == "pool"
    full = _net(skip="cct")
    assert len(full.skip_fusion.layers) == 4 and full.skip_fusion.layers[0].attn.num_heads == 4
    assert full.skip_fusion.embeddings[0].embedding == "conv" and len(full.skip_gates) == 3
    assert full.skip_fusion.factors == [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    gate_only = _net(cca=True)  # UCTransNet's CCA-only ablation
    assert gate_only.skip_fusion is None and len(gate_only.skip_gates) == 3


def test_named_architectures():
    expected = {"QT-UNet-CCT": (3, "qt"), "QT-UNet-2D-CCT": (2, "qt"), "Swin-UNet-2D-CCT": (2, "none")}
    for name, (spatial_dims, decoder) in expected.items():
        assert ARCHITECTURES[name] == {"spatial_dims": spatial_dims, "merge_depth": True, "decoder": decoder,
                                       "skip": "cct"}
    torch.manual_seed(0)
    net = build_architecture("Swin-UNet-2D-CCT", 1, 2, cct_preset="lite").eval()
    assert net.decoder_type == "none" and net.skip_type == "cct" and net.cca
    with torch.no_grad():
        assert net(torch.randn(1, 1, 64, 64)).shape == (1, 2, 64, 64)


# ---------------------------------------------------------------------------------------------------------
# the network suites with the option on: attention backends, deep supervision (compile and ONNX with every
# option on: tests/networks/test_options_together.py)

try:
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

    _BACKENDS = ["sdpa", "explicit", "flex"]
except ImportError:  # pragma: no cover - older torch
    _BACKENDS = ["sdpa", "explicit"]


def test_attention_backends_agree_with_the_option_on():
    """sdpa, explicit and (forward only on CPU) flex attention give the same CCT network output."""
    x = torch.randn(1, 1, 24, 20, 28)
    outputs = []
    for backend in _BACKENDS:
        net = _net(skip="cct", cct_preset="lite", attention_backend=backend).eval()
        _randomise_reconstruction(net)
        with torch.no_grad():
            outputs.append(net(x))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-4)
    # training through the explicit path reaches the CCT
    net = _net(skip="cct", cct_preset="lite", attention_backend="explicit")
    _randomise_reconstruction(net)
    net(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.skip_fusion.parameters())


@pytest.mark.parametrize("decoder", ["qt", "none"])
def test_deep_supervision_training_step_with_the_option_on(decoder):
    net = _net(spatial_dims=2, skip="cct", cct_preset="lite", decoder=decoder, deep_supervision=True).train()
    _randomise_reconstruction(net)
    x = torch.randn(2, 1, 44, 36)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 3 and outputs[0].shape == (2, 2, 44, 36)
    sum(o.float().square().mean() for o in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.skip_fusion.reconstructions.parameters())
    with torch.no_grad():
        assert torch.is_tensor(net.eval()(x))  # one output at inference
