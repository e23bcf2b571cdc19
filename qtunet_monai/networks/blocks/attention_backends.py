# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""How window attention is computed: one registry of backends, name -> function.

Every attention of the network (the window self- and cross-attention, and the routed attention of a
conditional block) computes ``softmax(scale q k^T + bias) v``, where the additive ``bias`` (the
relative-position bias, the shift mask, for routed attention the gathered rows and columns) is an
:class:`AttentionBias`. A backend is one function ``(q, k, v, bias, scale) -> out`` in
:data:`ATTENTION_FUNCTIONS`; to add one, write the function and add one line to the registry (and its
name to :data:`AttentionBackend`); ``tests/networks/test_attention_backends.py`` then checks it against the
others. :func:`attention_weights` is the one definition of the attention weights: the explicit backend
and ``qtunet_monai.explain`` both call it. :func:`use_attention_backend` switches a whole model for a
while (fvcore counting and ONNX export need the explicit backend).
"""

from __future__ import annotations

import abc
import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .windows import MASK_VALUE, WindowGeometry

__all__ = [
    "ATTENTION_FUNCTIONS",
    "AttentionBackend",
    "AttentionBias",
    "BackendAttention",
    "WindowBias",
    "add_bias",
    "attend",
    "attention_weights",
    "explicit_attention",
    "flex_attention",
    "relative_bias",
    "resolve_attention_backend",
    "sdpa_attention",
    "use_attention_backend",
]

#: the backend names :class:`~qtunet_monai.networks.QTUNet` takes (``attention_backend=``)
AttentionBackend = Literal["sdpa", "flex", "explicit"]


class AttentionBias(abc.ABC):
    """The additive score bias of one attention call, for queries ``(b, heads, n_q, d)`` and keys
    ``(b, heads, n_k, d)`` whose batch rows are windows, batch-major.

    A backend reads it either whole (:meth:`dense`) or as a FlexAttention ``score_mod``
    (:meth:`score_mod`), which adds it inside the kernel without the ``(b, heads, n_q, n_k)`` tensor.
    """

    @abc.abstractmethod
    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``(g, heads, n_q, n_k)``: the bias of ``g`` consecutive batch rows, repeated over the batch
        (``g`` is 1 or divides ``b``)."""

    @abc.abstractmethod
    def score_mod(self, dtype: torch.dtype) -> Callable:
        """``score_mod(score, b, h, q_idx, kv_idx)`` adding the bias, for ``flex_attention``."""

    @property
    @abc.abstractmethod
    def requires_grad(self) -> bool:
        """Whether the bias is learned in this call (a parameter that needs a gradient, grad mode on)."""


def relative_bias(table: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
    """``(heads, N, N)`` relative-position bias of the windows of ``geometry`` from a ``((2w-1)^n, heads)`` table."""
    n = geometry.tokens_per_window
    bias = table[geometry.relative_index.reshape(-1)]
    # contiguous: a permuted bias makes every sum with it (the shift mask) permuted too, and SDPA
    # then copies that (windows * heads, N, N) mask once more
    return bias.view(n, n, table.shape[1]).permute(2, 0, 1).contiguous()


class WindowBias(AttentionBias):
    """Relative-position bias plus shift mask of dense window attention.

    Args:
        table: the ``((2w-1)^n, heads)`` relative-position bias table.
        geometry: the windows' geometry (relative-position index, shift mask and regions).
        windows: the window (of ``geometry``) of each batch row, for a selection of rows; default: all
            windows of every volume, batch-major.
    """

    def __init__(self, table: torch.Tensor, geometry: WindowGeometry, windows: torch.Tensor | None = None) -> None:
        self.table = table
        self.geometry = geometry
        self.windows = windows

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        bias = relative_bias(self.table, self.geometry).to(dtype)
        mask = self.geometry.attn_mask
        if mask is None:  # (1, heads, N, N) broadcasts over all windows
            return bias.unsqueeze(0)
        if self.windows is not None:
            mask = mask[self.windows]
        return mask.to(dtype).unsqueeze(1) + bias

    def score_mod(self, dtype: torch.dtype) -> Callable:
        bias = relative_bias(self.table, self.geometry).to(dtype)
        regions = self.geometry.region_index
        if regions is None:

            def unshifted(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]

            return unshifted
        if self.windows is not None:
            regions = regions[self.windows]
        num_windows = regions.shape[0]

        def shifted(score, b, h, q_idx, kv_idx):
            window = b % num_windows  # windows are batch-major: index = volume * num_windows + window
            same_region = regions[window, q_idx] == regions[window, kv_idx]
            return score + bias[h, q_idx, kv_idx] + torch.where(same_region, 0.0, MASK_VALUE)

        return shifted

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and self.table.requires_grad


def add_bias(scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``scores (b, h, n, m) + bias (g, h, n, m)`` with the bias repeated over the batch (``g`` of
    :meth:`AttentionBias.dense`): how a backend that reads the bias whole adds it to its scores."""
    b, g = scores.shape[0], bias.shape[0]
    if g in (1, b):
        return scores + bias
    return (scores.view(b // g, g, *scores.shape[1:]) + bias).view(scores.shape)


def attention_weights(q: torch.Tensor, k: torch.Tensor, bias: AttentionBias, scale: float) -> torch.Tensor:
    """The attention weights ``softmax(scale q k^T + bias)``, ``(b, heads, n_q, n_k)``: the explicit
    backend's, and what ``qtunet_monai.explain`` shows.

    Args:
        q: queries ``(b, heads, n_q, head_dim)``; ``k``: keys ``(b, heads, n_k, head_dim)``.
        bias: the additive bias (relative position, shift mask, ...).
        scale: the score scale, ``head_dim ** -0.5``.
    """
    scores = (q * scale) @ k.transpose(-2, -1)
    return add_bias(scores, bias.dense(scores.dtype)).softmax(dim=-1)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, scale: float
) -> torch.Tensor:
    """Matmul and softmax, probabilities stored for the backward pass: the reference, and what fvcore counts.

    Args: as :func:`sdpa_attention`.
    """
    return attention_weights(q, k, bias, scale) @ v


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, scale: float) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the bias as an additive mask that
    broadcasts over the batch (fused kernels on GPU).

    Args:
        q: queries ``(b, heads, n_q, head_dim)``; ``k``, ``v``: keys and values ``(b, heads, n_k, head_dim)``.
        bias: the additive bias.
        scale: the score scale.

    Returns:
        ``(b, heads, n_q, head_dim)``.
    """
    mask = bias.dense(q.dtype)
    b, heads, n, head_dim = q.shape
    groups = mask.shape[0]
    if groups in (1, b):  # a (1, heads, N, N) mask broadcasts (a 3-d one misses the fused kernels)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Windows joined with the heads: the (windows * heads, N, N) mask then broadcasts over the volumes
    # of the batch, where a per-window mask would be copied for every volume.
    q, k, v = (t.reshape(b // groups, groups * heads, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(1, groups * heads, *mask.shape[2:]), scale=scale)
    return out.view(b, heads, n, head_dim)


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, scale: float) -> torch.Tensor:
    """``torch.nn.attention.flex_attention`` with the bias added inside the kernel by a ``score_mod``,
    so no ``(b, heads, n_q, n_k)`` tensor exists; fused only under ``torch.compile`` (eager flex
    materialises the scores) and, in torch 2.13, without a backward pass on CPU.

    Args: as :func:`sdpa_attention`.
    """
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError(
            f"attention backend 'flex' cannot train on CPU: torch {torch.__version__}'s flex_attention has no "
            "backward pass there. Use attention_backend='sdpa' for training on CPU."
        )
    return _flex_attention()(q, k, v, score_mod=bias.score_mod(q.dtype), scale=scale)


#: the attention backends by name; a new backend is one function ``(q, k, v, bias, scale) -> out`` and one line here
ATTENTION_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": sdpa_attention,
    "flex": flex_attention,
    "explicit": explicit_attention,
}


def attend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: AttentionBias, scale: float
) -> torch.Tensor:
    """Attention by the backend ``backend``, ``(b, heads, n_q, head_dim)``.

    ``"sdpa"`` on CPU while the bias is learned runs the explicit backend with its probabilities
    recomputed in the backward pass instead of stored: torch's fused CPU kernel has no gradient for an
    additive mask, and its math fallback upcasts to float32 under autocast; like a fused kernel this
    keeps only q, k, v for the backward pass and recomputes the (windows, heads, N, N) probabilities,
    the largest activation of a window transformer (about half a training step's peak memory).

    Args:
        backend: a key of :data:`ATTENTION_FUNCTIONS`.
        q, k, v, bias, scale: as :func:`sdpa_attention`.
    """
    if backend == "sdpa" and q.device.type == "cpu" and bias.requires_grad:
        return checkpoint(explicit_attention, q, k, v, bias, scale, use_reentrant=False, preserve_rng_state=False)
    return ATTENTION_FUNCTIONS[backend](q, k, v, bias, scale)


def resolve_attention_backend(
    attention_backend: str | bool = "sdpa", fused_attention: bool | str | None = None
) -> str:
    """The backend name from ``attention_backend`` and the deprecated ``fused_attention`` (True is
    ``"sdpa"``, False ``"explicit"``, a name that name; a FutureWarning). A bool passed as
    ``attention_backend`` (a positional argument of the old signature) is read as ``fused_attention``.

    Args:
        attention_backend: a key of :data:`ATTENTION_FUNCTIONS`.
        fused_attention: the deprecated alias, or None.

    Raises:
        ValueError: an unknown backend, or both arguments naming different backends.
    """
    if isinstance(attention_backend, bool):
        attention_backend, fused_attention = "sdpa", attention_backend if fused_attention is None else fused_attention
    if fused_attention is not None:
        warnings.warn(
            "fused_attention is deprecated; use attention_backend='sdpa' (for True), 'explicit' (for False) or 'flex'.",
            FutureWarning,
            stacklevel=3,
        )
        legacy = {True: "sdpa", False: "explicit"}.get(fused_attention, fused_attention)
        if attention_backend not in ("sdpa", legacy):
            raise ValueError(f"attention_backend={attention_backend!r} and fused_attention={fused_attention!r} "
                             "disagree; give attention_backend alone.")
        attention_backend = legacy
    if attention_backend not in ATTENTION_FUNCTIONS:
        raise ValueError(
            f"unknown attention backend attention_backend={attention_backend!r}; choose one of {list(ATTENTION_FUNCTIONS)}."
        )
    return attention_backend


class BackendAttention(nn.Module):
    """Base of the attention modules whose backend :func:`use_attention_backend` switches: they hold
    the backend name in :attr:`attention_backend`.

    Args:
        attention_backend: a key of :data:`ATTENTION_FUNCTIONS`.
        fused_attention: the deprecated alias (see :func:`resolve_attention_backend`).
    """

    def __init__(self, attention_backend: AttentionBackend = "sdpa", fused_attention: bool | str | None = None) -> None:
        super().__init__()
        self.attention_backend: str = resolve_attention_backend(attention_backend, fused_attention)

    @property
    def fused_attention(self) -> str:
        """Deprecated: :attr:`attention_backend`."""
        warnings.warn("fused_attention is deprecated; read attention_backend.", FutureWarning, stacklevel=2)
        return self.attention_backend

    @fused_attention.setter
    def fused_attention(self, value: bool | str) -> None:
        self.attention_backend = resolve_attention_backend(fused_attention=value)


@contextlib.contextmanager
def use_attention_backend(model: nn.Module, backend: AttentionBackend) -> Iterator[nn.Module]:
    """Switch every attention module of ``model`` to ``backend`` inside the ``with`` block, and back
    to each module's own backend after it (also on an error).

    Example::

        with use_attention_backend(net, "explicit"):
            flops = FlopCountAnalysis(net, x).total()

    Args:
        model: any module; its :class:`BackendAttention` modules are switched.
        backend: a key of :data:`ATTENTION_FUNCTIONS`.
    """
    backend = resolve_attention_backend(backend)
    modules = [m for m in model.modules() if isinstance(m, BackendAttention)]
    saved = [m.attention_backend for m in modules]
    try:
        for m in modules:
            m.attention_backend = backend
        yield model
    finally:
        for m, previous in zip(modules, saved):
            m.attention_backend = previous

