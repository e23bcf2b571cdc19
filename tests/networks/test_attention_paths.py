# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The attention backends ("sdpa", "flex", "explicit") compute the same function: window attention
modules on shifted and plain, padded and unpadded maps in 2D and 3D, and whole networks with every
decoder. Outputs and gradients; FlexAttention has no backward pass on CPU (torch 2.13), so its
gradients are left to a GPU."""

from __future__ import annotations

import collections

import pytest
import torch
from monai.networks.nets.swin_unetr import compute_mask
from torch.utils._python_dispatch import TorchDispatchMode

from qtunet_monai.networks import QTUNet, use_attention_backend
from qtunet_monai.networks.blocks.attention import WindowAttention, WindowCrossAttention
from qtunet_monai.networks.blocks.attention_backends import ATTENTION_FUNCTIONS
from qtunet_monai.networks.blocks.windows import _build_geometry

CPU = torch.device("cpu")

#: (spatial shape, shift): with window 3, every combination of shifted/plain and padded/unpadded
GEOMETRIES = {
    "3d-plain-unpadded": ((6, 6, 3), 0),
    "3d-shifted-unpadded": ((6, 6, 3), 1),
    "3d-plain-padded": ((5, 7, 4), 0),
    "3d-shifted-padded": ((5, 7, 4), 1),
    "2d-plain-padded": ((7, 5), 0),
    "2d-shifted-unpadded": ((6, 9), 1),
    "2d-shifted-padded": ((7, 5), 1),
}


def _attention(cross: bool, spatial_dims: int) -> WindowAttention:
    torch.manual_seed(0)
    attention = (WindowCrossAttention if cross else WindowAttention)(8, 2, 3, spatial_dims)
    with torch.no_grad():  # the table starts at zero: make the bias matter
        attention.relative_position_bias_table.normal_(std=0.5)
    return attention


def _queries_keys_values(attention: WindowAttention, x: torch.Tensor, context: torch.Tensor, geometry):
    if isinstance(attention, WindowCrossAttention):
        (q,) = attention._split_heads(attention.q(geometry.partition(x)), 1)
        return (q, *attention._split_heads(attention.kv(geometry.partition(context)), 2))
    return attention.project_qkv(geometry.partition(x))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_attention_backends_agree_in_outputs_and_gradients(name, cross):
    """Each backend's function itself (``attend`` would route CPU training from SDPA to explicit)."""
    shape, shift = GEOMETRIES[name]
    geometry = _build_geometry(shape, 3, shift, CPU)
    assert (geometry.attn_mask is not None) == bool(shift) and geometry.is_padded == ("unpadded" not in name)
    attention = _attention(cross, len(shape))
    x = torch.randn(2, *shape, 8, requires_grad=True)
    context = torch.randn(2, *shape, 8, requires_grad=True)
    inputs = [x, context, *attention.parameters()]
    outputs, grads = {}, {}
    for backend in ("explicit", "sdpa", "flex"):
        with torch.set_grad_enabled(backend != "flex"):  # flex: no backward on CPU
            bias = attention.score_bias(geometry)
            out = ATTENTION_FUNCTIONS[backend](*_queries_keys_values(attention, x, context, geometry), bias,
                                               attention.scale)
        outputs[backend] = out.detach()
        if backend != "flex":
            grads[backend] = torch.autograd.grad(out.square().sum(), inputs, allow_unused=True)
    for backend in ("sdpa", "flex"):
        torch.testing.assert_close(outputs[backend], outputs["explicit"], atol=1e-5, rtol=1e-4)
    for grad, expected in zip(grads["sdpa"], grads["explicit"]):
        if expected is not None:  # cross-attention does not use the qkv projection
            torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    bias_grad = grads["sdpa"][2 + [p is attention.relative_position_bias_table for p in inputs[2:]].index(True)]
    assert bias_grad.abs().sum() > 0


def test_cpu_training_recomputes_the_attention_probabilities_instead_of_keeping_them():
    """Through ``attend``: the default backend trains on CPU by the explicit path, with the same gradients,
    but, as a fused kernel would, keeps no (windows, heads, N, N) tensor for the backward pass."""
    shape, shift = GEOMETRIES["3d-shifted-padded"]
    geometry = _build_geometry(shape, 3, shift, CPU)
    n = geometry.tokens_per_window
    attention = _attention(False, 3)
    x = torch.randn(2, *shape, 8, requires_grad=True)

    def train_step(backend: str):
        attention.attention_backend = backend
        kept = []

        def pack(t):
            kept.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = attention(geometry.partition(x), geometry)
        table = attention.relative_position_bias_table
        others = [p for p in attention.parameters() if p is not table]
        grads = torch.autograd.grad(out.square().sum(), [x, table, *others])
        return [s for s in kept if len(s) >= 3 and s[-2:] == (n, n)], grads

    kept_explicit, grads_explicit = train_step("explicit")
    kept_sdpa, grads_sdpa = train_step("sdpa")
    assert (2 * geometry.num_windows, 2, n, n) in kept_explicit  # the softmax output, kept
    assert kept_sdpa == []
    for grad, expected in zip(grads_sdpa, grads_explicit):
        torch.testing.assert_close(grad, expected)
    assert grads_sdpa[1].abs().sum() > 0  # the relative-position bias table learns


def test_region_ids_give_monais_shift_mask():
    for shape, window, shift in [((9, 10, 4), 3, 1), ((14, 14, 14), 7, 3), ((30, 3, 9), 3, 1), ((16, 9), 3, 1)]:
        geometry = _build_geometry(shape, window, shift, CPU)
        expected = compute_mask(geometry.padded_shape, geometry.window_size, geometry.shift_size, CPU)
        assert torch.equal(geometry.attn_mask, expected)
        assert geometry.region_index.shape == (geometry.num_windows, geometry.tokens_per_window)


def _net(spatial_dims: int, decoder: str) -> QTUNet:
    torch.manual_seed(0)
    net = QTUNet(2, 3, spatial_dims, feature_size=6, window_size=3, decoder=decoder, num_heads=(1, 2, 2, 2))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(std=0.5)
    return net


#: inputs whose first-stage maps (/4) are shifted and partly padded, deeper ones shrunk and unshifted
NET_INPUTS = {2: (2, 2, 36, 20), 3: (2, 2, 20, 24, 16)}


@pytest.mark.parametrize("decoder", ["qt", "vt", "none"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_networks_agree_across_backends(spatial_dims, decoder):
    net = _net(spatial_dims, decoder)
    x = torch.randn(NET_INPUTS[spatial_dims])
    outputs, grads = {}, {}
    for backend in ("explicit", "sdpa", "flex"):
        with use_attention_backend(net, backend), torch.no_grad():
            outputs[backend] = net(x)
    for backend in ("explicit", "sdpa"):
        with use_attention_backend(net, backend):
            grads[backend] = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
    for backend in ("sdpa", "flex"):
        torch.testing.assert_close(outputs[backend], outputs["explicit"], atol=1e-5, rtol=1e-4)
    for grad, expected in zip(grads["sdpa"], grads["explicit"]):
        torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-4)


def test_flex_refuses_cpu_training_with_a_clear_error():
    net = _net(2, "qt")
    with use_attention_backend(net, "flex"), pytest.raises(ValueError, match="'flex' cannot train on CPU"):
        net(torch.randn(NET_INPUTS[2]))


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown attention backend attention_backend='fast'"):
        QTUNet(1, 2, feature_size=6, attention_backend="fast")


class _GemmDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product that reaches the kernels."""

    GEMMS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_attention_math",
             "_scaled_dot_product_flash_attention_for_cpu", "convolution", "convolution_backward")

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.GEMMS:
            self.calls[name, tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("decoder", ["qt", "vt"])
def test_no_float32_matrix_products_under_bf16_autocast(decoder):
    """Training and inference steps under bf16 autocast multiply only bf16 matrices (on CPU, SDPA's math
    fallback upcasts to float32; training takes the explicit path there instead)."""
    net = _net(3, decoder)
    x = torch.randn(NET_INPUTS[3])
    with _GemmDtypes() as log:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(x).float().square().mean()
        loss.backward()
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            net.eval()(x)
    assert sum(log.calls.values()) > 50
    assert not [call for call in log.calls if torch.float32 in call[1]], log.calls
