# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Conditional light/heavy Swin blocks (``QTUNet(router=...)``; CoLT5, seed 003): equivalences with the
dense blocks, the routers' selections and soft top-k, upcycling, and the network suites with a router on.
Everything tiny (width 12, window 3)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from qtunet_monai import ARCHITECTURES, QTUNet, build_architecture
from qtunet_monai.networks import QTUNetEncoder
from qtunet_monai.networks.blocks import QTDecoderSubBlock, SwinDecoderSubBlock, SwinSubBlock
from qtunet_monai.networks.blocks.attention import WindowAttention
from qtunet_monai.networks.blocks.conditional import (
    BlockRouting,
    IterativeRouter,
    LightRouter,
    attach_routing,
    coordinate_descent_top_k,
    resolve_routing,
    routed_count,
)
from qtunet_monai.networks.blocks.windows import _build_geometry, window_validity

CPU = torch.device("cpu")
SMALL = {"feature_size": 12, "window_size": 3}

try:
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

    BACKENDS = ["sdpa", "explicit", "flex"]
except ImportError:  # pragma: no cover - older torch
    BACKENDS = ["sdpa", "explicit"]

#: (spatial shape, shift) with window 3: plain and shifted, padded and unpadded, 2D and 3D
GEOMETRIES = {
    "3d-plain-unpadded": ((6, 6, 3), 0),
    "3d-shifted-unpadded": ((6, 6, 3), 1),
    "3d-plain-padded": ((5, 7, 4), 0),
    "3d-shifted-padded": ((5, 7, 4), 1),
    "2d-plain-padded": ((7, 5), 0),
    "2d-shifted-unpadded": ((6, 9), 1),
    "2d-shifted-padded": ((7, 5), 1),
}

#: block kind -> (class, routed sub-layers, MLP routing group)
KINDS = {
    "encoder": (SwinSubBlock, ("attn", "mlp"), "volume"),
    "encoder-ffwindow": (SwinSubBlock, ("attn", "mlp"), "window"),
    "qt": (QTDecoderSubBlock, ("attn", "mlp"), "volume"),
    "qt-cross": (QTDecoderSubBlock, ("attn", "mlp", "cross"), "window"),
    "none": (SwinDecoderSubBlock, ("attn", "mlp"), "volume"),
}


def _block(kind: str, spatial_dims: int, backend, dim: int = 12, heads: int = 2):
    torch.manual_seed(0)
    block = KINDS[kind][0](dim, heads, 3, spatial_dims, 4.0, 0.0, backend)
    with torch.no_grad():  # tables start at zero: make the bias (and its gathering) matter
        for m in block.modules():
            if isinstance(m, WindowAttention):
                m.relative_position_bias_table.normal_(std=0.5)
    return block


def _conditional(block, kind: str, capacity=1.0, router: str = "light", weighting: str = "st", **options):
    conditional = copy.deepcopy(block)
    _, parts, ff_group = KINDS[kind]
    config = resolve_routing(router, capacity, "decoder", weighting, {"ff_group": ff_group, **options})
    torch.manual_seed(1)
    attach_routing(conditional, parts, config)
    return conditional


def _run(block, x, geometry, skip):
    return block(x, geometry) if isinstance(block, SwinSubBlock) else block(x, geometry, skip)


def _zero_routers(block) -> None:
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, LightRouter):
                m.weight.zero_()


# --------------------------------------------------------------------------------------------------
# capacity 1 with the light branches off (zero outputs, as initialised) is the dense block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_capacity_one_with_light_branches_off_equals_the_dense_block(name, kind, backend):
    shape, shift = GEOMETRIES[name]
    geometry = _build_geometry(shape, 3, shift, CPU)
    dense = _block(kind, len(shape), backend)
    conditional = _conditional(dense, kind)
    _zero_routers(conditional)  # the straight-through weights then pass no gradient to the tokens
    x = torch.randn(2, *shape, 12, requires_grad=True)
    skip = torch.randn(2, *shape, 12)
    if backend == "flex":  # no backward pass on CPU
        with torch.no_grad():
            torch.testing.assert_close(_run(conditional, x, geometry, skip), _run(dense, x, geometry, skip),
                                       atol=1e-5, rtol=1e-4)
        return
    outputs, grads = [], []
    for block in (dense, conditional):
        y = _run(block, x, geometry, skip)
        names = [n for n, _ in dense.named_parameters()]
        params = [block.get_parameter(n) for n in names]
        grads.append(torch.autograd.grad(y.square().sum(), [x, *params]))
        outputs.append(y.detach())
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-4)
    for label, got, expected in zip(["input", *names], grads[1], grads[0]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=label)


@pytest.mark.parametrize("router", ["light", "iterative"])
@pytest.mark.parametrize("kind", ["encoder", "qt-cross"])
def test_capacity_one_with_scoring_routers_keeps_the_dense_output_and_mlp_gradients(kind, router):
    """Routers that score tokens still route all of them at capacity 1 with weight 1: the dense output, and
    the dense gradients of the last heavy branch (the MLP). Upstream of a router the gradients differ by
    what the straight-through weights pass to the tokens through the routers' scores."""
    shape, shift = GEOMETRIES["3d-shifted-padded"]
    geometry = _build_geometry(shape, 3, shift, CPU)
    dense = _block(kind, 3, "sdpa")
    conditional = _conditional(dense, kind, router=router)
    x, skip = torch.randn(2, *shape, 12), torch.randn(2, *shape, 12)
    heavy = [n for n, _ in dense.named_parameters() if n.startswith("mlp.")]
    results = []
    for block in (dense, conditional):
        y = _run(block, x, geometry, skip)
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), [block.get_parameter(n) for n in heavy])))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-4)
    for label, got, expected in zip(heavy, results[1][1], results[0][1]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=label)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["3d-shifted-padded", "2d-shifted-padded", "3d-plain-unpadded"])
def test_partial_capacity_is_dense_attention_over_the_routed_keys_and_a_null_key(name, backend):
    """At capacity < 1 the heavy branch is the dense attention's rows of the routed queries, with every
    unrouted key masked out and the null key/value appended: the gathered bias and shift mask are right."""
    shape, shift = GEOMETRIES[name]
    geometry = _build_geometry(shape, 3, shift, CPU)
    dense = _block("encoder", len(shape), backend)
    block = _conditional(dense, "encoder", capacity={"q": 0.4, "kv": 0.6, "ff": 0.25})
    routing, attn = block.router, block.attn
    x = torch.randn(2, *shape, 12)
    with torch.no_grad():
        windows = geometry.partition(block.norm1(x))
        g, n, c = windows.shape
        got = routing.attention(attn, block.light_attn, windows, windows, geometry)  # light output: zero
        valid = window_validity(geometry)
        valid = None if valid is None else valid.repeat(2, 1)
        q_idx, _ = routing.q.select(windows, routed_count(0.4, n), valid)
        kv_idx, _ = routing.kv.select(windows, routed_count(0.6, n), valid)
        q, k, v = attn.project_qkv(windows)
        scores = (q * attn.scale) @ k.transpose(-2, -1) + attn.relative_bias(geometry)
        if geometry.attn_mask is not None:
            scores = scores + geometry.attn_mask.repeat(2, 1, 1).unsqueeze(1)
        routed_keys = torch.zeros(g, n, dtype=torch.bool).scatter(1, kv_idx, True)
        scores = scores.masked_fill(~routed_keys[:, None, None, :], float("-inf"))
        null_k, null_v = routing.null_kv[:, None, :, None, :].expand(2, g, -1, 1, -1).unbind(0)
        scores = torch.cat([scores, (q * attn.scale) @ null_k.transpose(-2, -1)], dim=-1)
        out = scores.softmax(-1) @ torch.cat([v, null_v], dim=2)
        out = attn.proj(out.transpose(1, 2).reshape(g, n, c))
        expected = torch.zeros_like(out).scatter(1, q_idx[..., None].expand(-1, -1, c), out.gather(1, q_idx[..., None].expand(-1, -1, c)))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        assert (got.abs().sum(-1) > 0).sum() == q_idx.numel()
        # the MLP: the heavy MLP on the top quarter of each volume's tokens, the light one (zero) elsewhere
        tokens = block.norm2(x).reshape(2, -1, c)
        f_idx, _ = routing.ff.select(tokens, routed_count(0.25, tokens.shape[1]))
        ff = routing.feed_forward(block.mlp, block.light_mlp, block.norm2(x), geometry).reshape(2, -1, c)
        expected = torch.zeros_like(tokens).scatter(1, f_idx[..., None].expand(-1, -1, c),
                                                    block.mlp(tokens.gather(1, f_idx[..., None].expand(-1, -1, c))))
        torch.testing.assert_close(ff, expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# capacity 0 is the light branches alone


def _randomise_light_outputs(block) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for name in ("light_attn", "light_cross"):
            if getattr(block, name, None) is not None:
                getattr(block, name).proj.weight.normal_(std=0.2)
        block.light_mlp.linear2.weight.normal_(std=0.2)


@pytest.mark.parametrize("kind", ["encoder", "qt-cross", "none", "encoder-ffwindow"])
@pytest.mark.parametrize("name", ["3d-shifted-padded", "2d-shifted-unpadded"])
def test_capacity_zero_is_the_light_branches_alone(name, kind):
    shape, shift = GEOMETRIES[name]
    geometry = _build_geometry(shape, 3, shift, CPU)
    block = _conditional(_block(kind, len(shape), "sdpa"), kind, capacity=0.0)
    _randomise_light_outputs(block)
    x, skip = torch.randn(2, *shape, 12), torch.randn(2, *shape, 12)
    with torch.no_grad():
        y = _run(block, x, geometry, skip)
        windows = geometry.partition(block.norm1(x))
        expected = x + geometry.reverse(block.light_attn(windows, geometry), 2)
        if KINDS[kind][0] is QTDecoderSubBlock:
            queries = geometry.partition(block.norm_query(expected))
            context = geometry.partition(block.norm_context(skip))
            cross = block.light_cross if block.router.route_cross else block.cross_attn
            attended = cross(queries, context, geometry)
            expected = expected + geometry.reverse(attended, 2)
        expected = expected + block.light_mlp(block.norm2(expected))
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-5)
    assert block.light_mlp.linear2.weight.abs().sum() > 0  # the light branches do contribute


def test_light_outputs_start_at_zero_and_heads_are_narrower():
    block = _conditional(_block("qt-cross", 3, True, dim=24, heads=4), "qt-cross")
    for light in (block.light_attn, block.light_cross):
        assert light.num_heads == 2 and light.head_dim == block.attn.head_dim and light.inner_dim == 12
        assert light.proj.weight.abs().sum() == 0 and light.proj.bias.abs().sum() == 0
    assert block.light_mlp.linear1.out_features == 24  # hidden width d (heavy: 4d)
    assert block.light_mlp.linear2.weight.abs().sum() == 0


# --------------------------------------------------------------------------------------------------
# whole networks: router=None unchanged, upcycling, sites, refusals


def test_router_none_is_todays_network(tiny_qtunet):
    dense = tiny_qtunet()
    explicit_none = tiny_qtunet(router=None)
    conditional = tiny_qtunet(router="light", capacity=1.0)
    assert list(dense.state_dict()) == list(explicit_none.state_dict())
    assert not any(k for k in dense.state_dict() if "light_" in k or ".router." in k)
    assert all(getattr(m, "router", None) is None for m in dense.modules() if hasattr(m, "light_mlp"))
    # the conditional network adds parameters last: its dense parameters are the dense network's
    dense_state, cond_state = dense.state_dict(), conditional.state_dict()
    assert all(torch.equal(cond_state[k], v) for k, v in dense_state.items())
    x = torch.randn(1, 2, 24, 20, 16)
    with torch.no_grad():
        torch.testing.assert_close(explicit_none(x), dense(x), rtol=0, atol=0)
        torch.testing.assert_close(conditional(x), dense(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("config", [
    pytest.param({"spatial_dims": 3, "decoder": "qt"}, id="3d-qt"),
    pytest.param({"spatial_dims": 2, "decoder": "none"}, id="2d-none"),
    pytest.param({"spatial_dims": 2, "decoder": "qt", "router": "iterative",
                  "router_sites": ("encoder", "bottleneck", "decoder", "decoder.cross")}, id="2d-qt-cross-iterative"),
])
def test_an_upcycled_dense_checkpoint_at_capacity_one_is_the_dense_network(config, tiny_qtunet):
    config = dict(config)
    router = config.pop("router", "light")
    sites = config.pop("router_sites", None)
    dense = tiny_qtunet(**config)
    with torch.no_grad():  # a "trained" dense network
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.manual_seed(7)  # a different initialisation than the dense one
    conditional = QTUNet(2, 3, **SMALL, **config, router=router, capacity=1.0, router_sites=sites)
    result = conditional.load_state_dict(dense.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(".light_" in k or ".router." in k for k in result.missing_keys)
    shape = (2, 2, 24, 20, 16) if config["spatial_dims"] == 3 else (2, 2, 44, 52)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(conditional.eval()(x), dense.eval()(x), atol=1e-5, rtol=1e-4)
        conditional.set_capacity(0.25)
        assert not torch.allclose(conditional(x), dense(x), atol=1e-5)


def test_an_ssl_encoder_loads_into_a_conditional_network(tiny_qtunet):
    encoder = QTUNetEncoder(2, **SMALL)
    conditional = tiny_qtunet(router="light")
    result = conditional.load_state_dict(encoder.state_dict(), strict=False)
    assert not result.unexpected_keys
    encoder_missing = [k for k in result.missing_keys if k.startswith(("encoder_stages.", "bottleneck."))]
    assert encoder_missing and all(".light_" in k or ".router." in k for k in encoder_missing)


def test_sites_choose_the_conditional_sub_layers(tiny_qtunet):
    net = tiny_qtunet(router="light", router_sites=("encoder.mlp", "decoder.cross"))
    enc, dec = net.encoder_stages[0].blocks[0], net.decoder_stages[0].blocks[1]
    assert enc.router.route_mlp and not enc.router.route_attn and enc.light_attn is None
    assert dec.router.route_cross and not dec.router.route_attn and dec.light_mlp is None
    assert net.bottleneck.blocks[0].router is None
    assert all(not hasattr(b.router, "q") for b in (enc, dec)) and hasattr(dec.router, "cross_q")
    default = tiny_qtunet(router="light")
    assert all(b.router is not None and not b.router.route_cross for s in default.decoder_stages for b in s.blocks)
    y = net(torch.randn(1, 2, 24, 20, 16))
    y.square().mean().backward()
    assert dec.router.cross_q.weight.grad is not None and enc.router.ff.weight.grad is not None


def test_refusals_are_clear(tiny_qtunet):
    with pytest.raises(ValueError, match="decoder='vt' cannot be conditional"):
        tiny_qtunet(decoder="vt", router="light")
    with pytest.raises(ValueError, match="unknown router"):
        tiny_qtunet(router="heavy")
    with pytest.raises(ValueError, match="apply only to a conditional network"):
        tiny_qtunet(capacity=0.5)
    with pytest.raises(ValueError, match="capacity must lie in"):
        tiny_qtunet(router="light", capacity=1.5)
    with pytest.raises(ValueError, match="unknown router site"):
        tiny_qtunet(router="light", router_sites=("head",))
    with pytest.raises(ValueError, match="needs decoder='qt'"):
        tiny_qtunet(router="light", decoder="none", router_sites=("decoder.cross",))
    with pytest.raises(ValueError, match="unknown router_options"):
        tiny_qtunet(router="light", router_options={"eps": 0.1})  # a descent setting for the light router
    with pytest.raises(ValueError, match="unknown router_weighting"):
        tiny_qtunet(router="light", router_weighting="sigmoid-ish")
    with pytest.raises(ValueError, match="needs a conditional network"):
        tiny_qtunet().set_capacity(0.5)


def test_named_architectures():
    for name, spatial_dims, decoder in [("QT-UNet-Cond", 3, "qt"), ("QT-UNet-2D-Cond", 2, "qt"),
                                        ("Swin-UNet-2D-Cond", 2, "none")]:
        assert ARCHITECTURES[name]["router"] == "light" and ARCHITECTURES[name]["capacity"] == 0.25
        net = build_architecture(name, 1, 2, variant=None, feature_size=12, window_size=3)
        assert net.spatial_dims == spatial_dims and net.decoder_type == decoder and net.router_type == "light"
        shape = (1, 1) + (24,) * spatial_dims if spatial_dims == 3 else (1, 1, 48, 48)
        with torch.no_grad():
            assert net.eval()(torch.randn(shape)).shape == (1, 2, *shape[2:])


def test_set_capacity_changes_the_routed_counts(tiny_qtunet):
    net = tiny_qtunet(router="light", capacity=0.5)
    net.set_capacity({"ff": 0.125})
    routings = [m for m in net.modules() if isinstance(m, BlockRouting)]
    assert routings and all(r.capacity == {"q": 0.5, "kv": 0.5, "ff": 0.125} for r in routings)
    net.set_capacity(1)
    assert all(r.capacity == {"q": 1.0, "kv": 1.0, "ff": 1.0} for r in routings)
    assert [routed_count(c, 27) for c in (0.0, 0.1, 0.25, 1.0)] == [0, 3, 7, 27]
    assert routed_count(0.1, 30) == 3  # 0.1 * 30 = 3.0000000000000004


# --------------------------------------------------------------------------------------------------
# routers


def test_the_light_router_takes_exactly_the_top_k_real_tokens():
    torch.manual_seed(0)
    geometry = _build_geometry((5, 7, 4), 3, 1, CPU)  # shifted and padded
    valid = window_validity(geometry).repeat(2, 1)
    n = geometry.tokens_per_window
    router = LightRouter(12)
    windows = geometry.partition(torch.randn(2, 5, 7, 4, 12))
    scores = router(windows)
    for capacity in (0.1, 0.25, 0.5, 1.0):
        k = routed_count(capacity, n)
        indices, weights = router.select(windows, k, valid)
        assert indices.shape == (windows.shape[0], k) and torch.equal(weights, torch.ones_like(weights))
        for row in range(windows.shape[0]):
            real = valid[row].nonzero().flatten()
            chosen = set(indices[row].tolist())
            if k <= len(real):  # never padding while real tokens remain, and the k best of them
                best = real[scores[row, real].topk(k).indices]
                assert chosen == set(best.tolist())
            else:
                assert set(real.tolist()) <= chosen
    assert (~valid).any() and any(valid[r].sum() < routed_count(0.5, n) for r in range(valid.shape[0]))
    # per volume (the MLP's default group): the top ceil(rho T) tokens of each sample
    tokens = torch.randn(3, 40, 12)
    indices, _ = router.select(tokens, routed_count(0.25, 40))
    expected = router(tokens).topk(10, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(indices, expected)


def _bisection(s: torch.Tensor, k: float, eps: float) -> torch.Tensor:
    """Solve the dual of the entropic top-k exactly: find a with sum min(1, exp((s + a) / eps)) = k."""
    s = s.double()
    lo, hi = -s.max() - 50 * eps, -s.min() + 50 * eps
    for _ in range(200):
        a = (lo + hi) / 2
        if torch.clamp(((s + a) / eps).exp(), max=1).sum() > k:
            hi = a
        else:
            lo = a
    return torch.clamp(((s + (lo + hi) / 2) / eps).exp(), max=1)


@pytest.mark.parametrize("eps", [0.03, 0.3])
def test_coordinate_descent_solves_the_entropic_top_k(eps):
    torch.manual_seed(0)
    s = torch.randn(4, 10)
    # 200 iterations: at eps 0.03 the descent moves slowly (see coordinate_descent_top_k)
    weights = coordinate_descent_top_k(s, 3, n_iters=200, eps=eps, eps_init=4.0, eps_decay=0.7)
    assert weights.dtype == torch.float32
    assert (weights > 0).all() and (weights <= 1).all()
    torch.testing.assert_close(weights.sum(-1), torch.full((4,), 3.0), atol=1e-3, rtol=0)
    for row in range(4):
        order = s[row].argsort()
        assert (weights[row, order].diff() >= -1e-6).all()  # monotone in the score
        torch.testing.assert_close(weights[row].double(), _bisection(s[row], 3, eps), atol=1e-3, rtol=0)
    # padding takes no mass; a row with fewer valid positions than k gets all of them
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 7:] = False
    valid[1, 2:] = False
    masked = coordinate_descent_top_k(s[:2], 3, valid, n_iters=200, eps=eps)
    assert (masked[~valid] == 0).all()
    torch.testing.assert_close(masked.sum(-1), torch.tensor([3.0, 2.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(masked[0, :7].double(), _bisection(s[0, :7], 3, eps), atol=1e-3, rtol=0)


def test_iterative_router_in_float32_under_autocast_and_weights_are_straight_through():
    torch.manual_seed(0)
    router = IterativeRouter(12, n_iters=200)  # converged soft weights (20 iterations fall short at eps 0.03)
    x = torch.randn(3, 27, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = router(x.bfloat16())
        soft = router.soft_weights(scores, 7, None)
        indices, weights = router.select(x.bfloat16(), 7)
    assert scores.dtype == soft.dtype == weights.dtype == torch.float32
    assert torch.equal(weights, torch.ones_like(weights))
    # fetch_k_ratio 9/8: the soft mass is ceil(7 * 9/8) = 8, spread over more than the 7 chosen tokens
    torch.testing.assert_close(soft.sum(-1), torch.full((3,), 8.0), atol=1e-3, rtol=0)
    assert torch.equal(indices, scores.topk(7, dim=-1).indices.sort(dim=-1).values)


@pytest.mark.parametrize("weighting", ["st", "soft", "softmax"])
@pytest.mark.parametrize("router", ["light", "iterative"])
def test_routers_receive_gradients(router, weighting, tiny_qtunet):
    # The iterative router's weights are exactly 1 for saturated tokens, whose gradient is then 0 (that of
    # the exact soft top-k); in this network's 4- and 9-token windows every routed token of a window can
    # saturate, so the test softens the descent (eps 1, CoLT5's upper end) to see a gradient reach every router.
    options = {"eps": 1.0} if router == "iterative" else None
    net = tiny_qtunet(spatial_dims=2, router=router, router_weighting=weighting, capacity=0.25, router_options=options,
               router_sites=("encoder", "bottleneck", "decoder", "decoder.cross"))
    net(torch.randn(2, 2, 48, 48)).square().mean().backward()
    routers = {n: p for n, p in net.named_parameters() if ".router." in n}
    assert routers
    missing = [n for n, p in routers.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    light = [p for n, p in net.named_parameters() if ".light_" in n]
    assert all(p.grad is not None for p in light)


def test_softmax_weighting_scales_the_heavy_branch_down_as_the_seed_did():
    """The seed's weighting: heavy outputs times a softmax over the window (mean 1/N); "st": times 1."""
    shape, shift = GEOMETRIES["3d-plain-unpadded"]
    geometry = _build_geometry(shape, 3, shift, CPU)
    dense = _block("encoder", 3, "sdpa")
    x = torch.randn(1, *shape, 12)
    with torch.no_grad():
        residual = {}
        for weighting in ("st", "softmax"):
            block = _conditional(dense, "encoder", capacity=0.25, weighting=weighting, ff_group="window")
            residual[weighting] = (block(x, geometry) - x).abs().mean()
    assert residual["softmax"] < 0.2 * residual["st"]


# --------------------------------------------------------------------------------------------------
# the network suites with a router on


@pytest.mark.parametrize("router", ["light", "iterative"])
def test_odd_sizes_batch_independence_and_gradients(router, tiny_qtunet):
    net = tiny_qtunet(router=router)
    x = torch.randn(2, 2, 23, 37, 19)
    y = net(x)
    assert y.shape == (2, 3, 23, 37, 19) and torch.isfinite(y).all()
    y.square().mean().backward()
    with torch.no_grad():
        net.eval()
        torch.testing.assert_close(net(x)[1:], net(x[1:]), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spatial_dims, shape", [(3, (1, 2, 37, 29, 23)), (2, (2, 2, 45, 71))])
@pytest.mark.parametrize("config", [
    pytest.param({"num_stages": 4}, id="4-stages"),
    pytest.param({"patch_size": 2, "router_options": {"ff_group": "window"}}, id="patch-2-ffwindow"),
])
def test_four_stages_and_patch_two_take_odd_sizes(config, spatial_dims, shape, tiny_qtunet):
    net = tiny_qtunet(spatial_dims=spatial_dims, router="light", **config)
    with torch.no_grad():
        y = net(torch.randn(shape))
    assert y.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(y).all()


def test_checkpointing_gives_same_output_and_gradients(tiny_qtunet):
    plain = tiny_qtunet(router="iterative", drop_path_rate=0.2)
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x = torch.randn(1, 2, 20, 24, 16)
    outputs, grads = [], []
    for net in (plain, checkpointed):
        torch.manual_seed(123)
        y = net(x)
        y.square().mean().backward()
        outputs.append(y.detach())
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outputs[0], outputs[1])
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_bf16_autocast_training_step(tiny_qtunet):
    net = tiny_qtunet(router="iterative")
    with torch.no_grad():
        reference = net.eval()(torch.randn(1, 2, 24, 20, 16))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net.train()(torch.randn(1, 2, 16, 16, 16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(reference).all()
    y.float().square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in net.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_traces_at_a_fixed_size(spatial_dims, tiny_qtunet):
    net = tiny_qtunet(spatial_dims=spatial_dims, router="light", router_options={"ff_group": "window"}).eval()
    x = torch.randn((1, 2, 24, 20, 16) if spatial_dims == 3 else (1, 2, 44, 52))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the trace is specialised to this size
        traced = torch.jit.trace(net, x, check_trace=False)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x), atol=1e-5, rtol=1e-4)
        other = torch.randn_like(x)
        torch.testing.assert_close(traced(other), net(other), atol=1e-5, rtol=1e-4)


def test_routed_counts_are_static_per_input_size(tiny_qtunet):
    """k follows the window size alone: the same for every batch and every input of one size."""
    net = tiny_qtunet(router="light", capacity=0.25)
    block = net.encoder_stages[0].blocks[1]
    seen = []
    handle = block.router.q.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    with torch.no_grad():
        for batch in (1, 2):
            net(torch.randn(batch, 2, 24, 20, 16))
    handle.remove()
    geometry = _build_geometry((6, 5, 4), 3, 1, CPU)
    assert seen == [(geometry.num_windows, 27), (2 * geometry.num_windows, 27)]
    assert math.ceil(0.25 * 27) == routed_count(0.25, 27) == 7


@pytest.mark.slow
def test_iterative_router_compiles_without_graph_breaks_and_equals_eager(compiles_to_one_graph):
    """``torch.compile(dynamic=False)`` as the bundles run it (captured with ``aot_eager``, as
    tests/networks/test_compile.py does): forward and backward equal eager on a padded, shifted size, one graph.
    The light router compiles in tests/networks/test_options_together.py with the other options. The iterative
    router runs 2 coordinate-descent steps: dynamo unrolls the loop, and 20 steps doubled this test's time
    without a path the graph does not already hold at 2."""
    torch.manual_seed(0)
    net = QTUNet(1, 2, spatial_dims=2, feature_size=6, window_size=3, num_stages=2, num_heads=(1, 2, 2),
                 router="iterative", capacity=0.5, router_options={"ff_group": "window", "n_iters": 2})
    compiles_to_one_graph(net, torch.randn(2, 1, 20, 24))


@pytest.mark.parametrize("router", ["light", "iterative"])
def test_attention_backends_agree_in_the_network(router, tiny_qtunet):
    """sdpa, explicit and (forward only on CPU) flex attention give the same conditional network output on a
    padded, shifted size."""
    x = torch.randn(1, 2, 23, 20, 16)
    outputs = []
    for backend in BACKENDS:
        net = tiny_qtunet(router=router, capacity=0.5, attention_backend=backend).eval()
        with torch.no_grad():
            outputs.append(net(x))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], atol=1e-5, rtol=1e-4)


def test_deep_supervision_training_step_with_a_router(tiny_qtunet):
    net = tiny_qtunet(spatial_dims=2, router="light", capacity=0.5, deep_supervision=True).train()
    x = torch.randn(2, 2, 44, 36)
    outputs = net(x)
    assert isinstance(outputs, list) and len(outputs) == 3 and outputs[0].shape == (2, 3, 44, 36)
    sum(o.square().mean() for o in outputs).backward()
    routers = [p for n, p in net.named_parameters() if ".router." in n and n.endswith(".weight")]
    assert routers and all(p.grad is not None and torch.isfinite(p.grad).all() for p in routers)
    with torch.no_grad():
        assert torch.is_tensor(net.eval()(x))
