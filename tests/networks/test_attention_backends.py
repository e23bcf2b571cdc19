# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The attention-backend registry: one name -> function table, a context manager that switches a whole
network, the deprecated ``fused_attention`` alias, one definition of the attention weights shared by
the explicit backend and explain, and ONNX export through the explicit backend whatever the network's."""

from __future__ import annotations

import collections
import typing

import pytest
import torch

from qtunet_monai.explain import AttentionRecorder, attention_sites, explicit_attention_output
from qtunet_monai.networks import use_attention_backend
from qtunet_monai.networks.blocks.attention import WindowAttention
from qtunet_monai.networks.blocks.attention_backends import (
    ATTENTION_FUNCTIONS,
    AttentionBackend,
    BackendAttention,
    add_bias,
    attention_weights,
)
from qtunet_monai.networks.blocks.windows import _build_geometry


def _randomise_bias(net: torch.nn.Module) -> torch.nn.Module:
    """The bias tables start at zero: make the relative-position bias (and so the shift mask's rows) matter."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(std=0.5)
    return net


def _backends(net: torch.nn.Module) -> list[str]:
    return [m.attention_backend for m in net.modules() if isinstance(m, BackendAttention)]


def test_the_literal_names_the_registered_backends():
    assert set(typing.get_args(AttentionBackend)) == set(ATTENTION_FUNCTIONS) == {"sdpa", "flex", "explicit"}


def test_use_attention_backend_switches_every_attention_module_and_restores_each(tiny_qtunet):
    """Self-, cross- and a conditional block's light attention alike, each back to its own backend after
    the block, also when the block raises."""
    net = tiny_qtunet(router="light", capacity=0.5, router_sites=["encoder", "decoder.cross"])
    light = [m for name, m in net.named_modules() if name.endswith(("light_attn", "light_cross"))]
    assert light and all(isinstance(m, BackendAttention) for m in light)
    modules = [m for m in net.modules() if isinstance(m, BackendAttention)]
    modules[0].attention_backend = "explicit"  # one module that differs from the rest
    before = _backends(net)
    assert len(before) == len(modules) > 2 * len(light) and set(before) == {"sdpa", "explicit"}
    with use_attention_backend(net, "flex") as switched:
        assert switched is net and set(_backends(net)) == {"flex"}
    assert _backends(net) == before
    with pytest.raises(RuntimeError, match="inside"), use_attention_backend(net, "explicit"):
        assert set(_backends(net)) == {"explicit"}
        raise RuntimeError("inside")
    assert _backends(net) == before
    with pytest.raises(ValueError, match="unknown attention backend attention_backend='fast'"), \
            use_attention_backend(net, "fast"):
        pass
    assert _backends(net) == before


def test_fused_attention_is_a_deprecated_alias_with_the_same_weights(tiny_qtunet):
    keys = list(tiny_qtunet().state_dict())
    for old, new in ((True, "sdpa"), (False, "explicit"), ("flex", "flex")):
        with pytest.warns(FutureWarning, match="fused_attention is deprecated"):
            net = tiny_qtunet(fused_attention=old)
        assert set(_backends(net)) == {new} and list(net.state_dict()) == keys
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="disagree"):
        tiny_qtunet(attention_backend="flex", fused_attention=False)
    module = next(m for m in tiny_qtunet().modules() if isinstance(m, BackendAttention))
    with pytest.warns(FutureWarning):
        module.fused_attention = False
    assert module.attention_backend == "explicit"


def _logsumexp_attention(q, k, v, bias, scale):
    """A fourth backend as a contributor would write it: softmax through the log-sum-exp."""
    scores = add_bias((q * scale) @ k.transpose(-2, -1), bias.dense(q.dtype))
    return torch.exp(scores - scores.logsumexp(dim=-1, keepdim=True)) @ v


def test_a_fourth_backend_is_one_function_and_one_registry_entry(monkeypatch, tiny_qtunet):
    """Registered, it is accepted by name and runs dense (shifted, padded) and routed attention alike."""
    monkeypatch.setitem(ATTENTION_FUNCTIONS, "logsumexp", _logsumexp_attention)
    x = torch.randn(1, 2, 23, 20, 16)  # stage-1 maps padded and shifted for window 3
    for options in ({}, {"router": "light", "capacity": 0.5}):
        net = _randomise_bias(tiny_qtunet(**options).eval())
        with torch.no_grad():
            with use_attention_backend(net, "explicit"):
                expected = net(x)
            with use_attention_backend(net, "logsumexp"):
                got = net(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert set(_backends(tiny_qtunet(attention_backend="logsumexp"))) == {"logsumexp"}


def test_window_bias_of_selected_rows_is_the_bias_of_their_windows():
    """``windows=`` (explain's selection of rows) gives each row its own window's shift mask."""
    geometry = _build_geometry((5, 7, 4), 3, 1, torch.device("cpu"))  # shifted and padded
    torch.manual_seed(0)
    attention = _randomise_bias(WindowAttention(8, 2, 3, 3))
    q, k = torch.randn(2, 2 * geometry.num_windows, 2, 27, 4).unbind(0)  # two volumes' windows, 2 heads
    full = attention.attention_weights(q, k, geometry)
    rows = torch.tensor([geometry.num_windows + 3, 1, 2 * geometry.num_windows - 1])
    picked = attention.attention_weights(q[rows], k[rows], geometry, windows=rows % geometry.num_windows)
    torch.testing.assert_close(picked, full[rows], rtol=0, atol=1e-7)


def _queries_keys(capture):
    module = capture.site.module
    if capture.site.cross:
        return module.project_queries(capture.queries), module.project_keys_values(capture.keys)[0]
    return module.project_qkv(capture.queries)[:2]


def test_explain_weights_are_the_explicit_backends(tiny_qtunet):
    """Explain's recomputed weights and output are the explicit backend's, number for number, in plain,
    shifted and padded windows, self- and cross-attention."""
    net = _randomise_bias(tiny_qtunet(in_channels=1).eval())
    x = torch.randn(2, 1, 24, 20, 16)
    sites = attention_sites(net)
    recorder = AttentionRecorder(net, list(sites), keep_outputs=True)
    with torch.no_grad(), use_attention_backend(net, "explicit"), recorder:
        net(x)
    captures = recorder.captures.values()
    assert any(c.geometry.attn_mask is not None for c in captures) and any(c.geometry.is_padded for c in captures)
    assert any(c.site.cross for c in captures)
    for name, capture in recorder.captures.items():
        module = capture.site.module
        with torch.no_grad():
            expected = attention_weights(*_queries_keys(capture), module.score_bias(capture.geometry), module.scale)
            recomputed = explicit_attention_output(capture.site, capture.queries, capture.geometry, capture.keys)
        assert torch.equal(capture.probabilities(), expected), name
        assert torch.equal(recomputed, capture.output), name


@pytest.mark.slow
def test_onnx_export_computes_explicit_attention_whatever_the_backend(tmp_path, tiny_qtunet):
    """An "sdpa" network exports the explicit attention's graph (the export once switched only modules
    whose backend was ``True``) and keeps its own backend afterwards; two stages keep the exported graph small."""
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from qtunet_monai.bundle.onnx_export import export_onnx

    graphs = {}
    for backend in ("sdpa", "explicit"):
        net = tiny_qtunet(in_channels=1, spatial_dims=2, feature_size=6, num_stages=2, num_heads=(1, 2, 2),
                          attention_backend=backend)
        report = export_onnx(net, str(tmp_path / f"{backend}.onnx"), [1, 1, 24, 24])
        assert max(report["max_abs_difference"].values()) <= 1e-4
        assert set(_backends(net)) == {backend}
        graphs[backend] = collections.Counter(node.op_type for node in onnx.load(report["onnx_file"]).graph.node)
    assert graphs["sdpa"] == graphs["explicit"]
