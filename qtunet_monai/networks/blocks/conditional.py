# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Conditional computation in Swin sub-blocks (CoLT5, Ainslie et al. 2023; seed 003's Conditional Swin
U-Net): a light branch over all tokens plus the block's own attention / MLP as a heavy branch over the
tokens a router picks,

    CondW-MSA(X) = LightW-MSA(X) + s_q (.) HeavyW-MSA(X_q, s_kv (.) X_kv)
    ConditionalFF(X) = LightFF(X) + s (.) HeavyFF(X_routed)

The heavy branches *are* the dense block's ``attn``, ``cross_attn`` and ``mlp`` (same parameter
names), so a dense checkpoint loads with only the ``light_*`` and ``router.*`` parameters missing
("upcycling"). The light branches' output projections start at zero: an upcycled block at capacity 1
computes the dense block.

Routing is per window for attention (``k = ceil(capacity * N)`` of a window's N positions; padding is
never chosen while real tokens remain) and per volume or per window for the feed-forward. ``k`` depends
only on the input size, never on the data, so tracing, ONNX and ``torch.compile(dynamic=False)`` see
static shapes; every window (and volume) is routed on its own, so batch items stay independent.
Routed queries attend to the routed keys of their window with the relative-position bias and the
shift mask gathered at the selected rows and columns, plus a learned null key/value (when not all keys
are routed) so that every query has a key of its own region.

Routers score tokens with a learned vector (``s = x . u``) in float32:

- ``"light"``: top-k of the scores (hyper-parameter free, as the seed's ``LightRouter``); its soft
  weight is ``sigmoid(s)``.
- ``"iterative"``: CoLT5's entropy-regularised soft top-k, ``max_l s.l + eps H(l)`` subject to
  ``sum l = k``, ``0 <= l <= 1``, solved on its dual by coordinate descent with epsilon scaling
  (:func:`coordinate_descent_top_k`; ``log k``, not the seed's ``sqrt k``), then the hard top-k; its soft
  weight is ``l``.

Weighting of the heavy outputs (``weighting``): ``"st"`` (default) straight-through, 1 in the forward
pass and the soft weight's gradient backwards; ``"soft"``, the soft weight itself; ``"softmax"``, the
softmax of the scores over the group (the seed's weighting, for reproduction: it scales the heavy
branch by about 1/N).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from torch import nn

from .attention import WindowAttention, WindowCrossAttention
from .attention_backends import AttentionBias, attend
from .windows import MASK_VALUE, WindowGeometry, window_validity

__all__ = [
    "BlockRouting",
    "IterativeRouter",
    "LightRouter",
    "ROUTERS",
    "ROUTER_PARTS",
    "ROUTER_WEIGHTINGS",
    "RoutingConfig",
    "attach_routers",
    "attach_routing",
    "coordinate_descent_top_k",
    "resolve_routing",
    "routed_count",
    "set_capacity",
]

#: the weightings of the heavy outputs (see the module docstring)
ROUTER_WEIGHTINGS = ("st", "soft", "softmax")
#: the sub-blocks a router can take over in each part of the network; a bare part name means its
#: self-attention and MLP (the decoder's cross-attention is routed only when asked: ``"decoder.cross"``)
ROUTER_PARTS = {"encoder": ("attn", "mlp"), "bottleneck": ("attn", "mlp"), "decoder": ("attn", "mlp", "cross")}
DEFAULT_SITES = ("encoder", "bottleneck", "decoder")
DEFAULT_CAPACITY = 0.25
_CAPACITY_KEYS = ("q", "kv", "ff")
_ITERATIVE_OPTIONS = {"n_iters": 20, "eps": 0.03, "eps_init": 4.0, "eps_decay": 0.7, "fetch_k_ratio": 9 / 8}
_BLOCK_OPTIONS = {"ff_group": "volume", "light_heads_ratio": 0.5, "light_mlp_ratio": 1.0, "null_kv": True}


def routed_count(capacity: float, n: int) -> int:
    """``ceil(capacity * n)`` routed tokens of ``n`` (robust to ``0.1 * 30 = 3.0000000000000004``). A Python
    int also for a size a tracer records as a tensor: the trace, like the routing, is per input size."""
    n = int(n)
    return min(n, max(0, math.ceil(round(capacity * n, 6))))


def coordinate_descent_top_k(
    scores: torch.Tensor,
    k: float,
    valid: torch.Tensor | None = None,
    n_iters: int = 20,
    eps: float = 0.03,
    eps_init: float | None = 4.0,
    eps_decay: float = 0.7,
) -> torch.Tensor:
    """CoLT5's soft top-k: ``l = argmax_l s.l + eps H(l)`` subject to ``sum l = k`` and ``0 <= l <= 1``,
    per row of ``scores`` ``(..., n)``, in float32 (also under autocast).

    The solution is ``l_i = min(1, exp((s_i + a) / eps))`` with the scalar ``a`` that makes the sum
    ``k``. Coordinate descent on the dual alternates the exact minimisers
    ``a = eps (log k - logsumexp((s + b) / eps))`` and ``b = -relu(s + a)``, with epsilon scaling
    (``eps`` starts at ``eps_init`` and is multiplied by ``eps_decay`` every iteration down to ``eps``),
    which cuts the iterations CoLT5 needs from 50 to 20 (Lei et al. 2023). The descent moves ``a`` by
    about ``eps log(k / m)`` per iteration (``m`` saturated positions), so at ``eps = 0.03`` the 20 default
    iterations leave the mass short of ``k`` (measured: 2.1 to 2.9 of 3 on 10 unit-variance scores; 6 of 8 on
    27), as in CoLT5's code; 200 iterations reach it to 1e-5. The routers' hard top-k and straight-through
    weights do not depend on it, only the soft weights' gradients do.

    Args:
        scores: router scores ``(..., n)``.
        k: the soft mass to distribute; rows with fewer than ``k`` valid positions get all of them.
        valid: bool ``(..., n)``; invalid positions (padding) get weight 0 and take no mass.
        n_iters: iterations (at least 1).
        eps: entropy weight at the end (CoLT5: 0.02 to 1; lucidrains 0.03; the seed 0.02).
        eps_init: entropy weight of the first iteration (None: ``eps``, no scaling).
        eps_decay: factor per iteration.

    Returns:
        float32 weights ``l`` in ``[0, 1]`` (in ``(0, 1]`` where they do not underflow), summing to
        ``min(k, valid count)`` per row up to the convergence of the descent.
    """
    if n_iters < 1:
        raise ValueError(f"coordinate descent needs at least one iteration, got n_iters={n_iters}.")
    with torch.autocast(scores.device.type, enabled=False):
        s = scores.float()
        if valid is None:
            log_k = torch.full_like(s[..., :1], math.log(min(float(k), s.shape[-1])))
        else:
            log_k = valid.sum(-1, keepdim=True).clamp(min=1, max=k).float().log()
        floor = torch.finfo(torch.float32).min
        current = max(eps if eps_init is None else eps_init, eps)
        b = -s
        for _ in range(n_iters):
            sb = (s + b) / current
            if valid is not None:
                sb = sb.masked_fill(~valid, floor)
            a = current * (log_k - sb.logsumexp(-1, keepdim=True))
            b = -F.relu(s + a)
            last, current = current, max(current * eps_decay, eps)
        weights = ((s + a + b) / last).exp()  # = min(1, exp((s + a) / eps)), with the eps that gave a
        return weights if valid is None else weights.masked_fill(~valid, 0.0)


class LightRouter(nn.Module):
    """Scores tokens by a learned vector, ``s = x . u`` (CoLT5's routing token; the seed's light router),
    and routes the top-k. ``forward`` returns the float32 scores (hook it to record them).

    Args:
        dim: token width.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        # unit-variance scores for layer-normalised tokens
        self.weight = nn.Parameter(torch.randn(dim) * dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., n, C)`` tokens -> ``(..., n)`` float32 scores."""
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.weight.float()

    def soft_weights(self, scores: torch.Tensor, k: int, valid: torch.Tensor | None) -> torch.Tensor:
        """The router's own weight of every token, in ``[0, 1]``: ``sigmoid(s)``."""
        return torch.sigmoid(scores)

    def select(
        self, x: torch.Tensor, k: int, valid: torch.Tensor | None = None, weighting: str = "st"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` highest-scoring tokens of each group of ``x`` ``(G, n, C)``.

        Args:
            x: tokens, one routing group (a window or a volume) per row.
            k: tokens to route per group, ``1 <= k <= n``.
            valid: bool ``(G, n)``, False at padding: padding is chosen only once every real token
                of its group is.
            weighting: ``"st"``, ``"soft"`` or ``"softmax"``.

        Returns:
            ``indices`` ``(G, k)`` (ascending) and their float32 weights ``(G, k)``.
        """
        scores = self(x)
        key = scores if valid is None else scores.masked_fill(~valid, float("-inf"))
        indices = key.topk(k, dim=-1).indices.sort(dim=-1).values
        if weighting == "softmax":
            weights = key.softmax(dim=-1)
        else:
            weights = self.soft_weights(scores, k, valid)
        weights = weights.gather(-1, indices)
        if weighting == "st":
            weights = 1.0 + (weights - weights.detach())  # exactly 1 forward, the soft gradient backward
        return indices, weights


class IterativeRouter(LightRouter):
    """The iterative (coordinate-descent) router of CoLT5: soft top-k weights by
    :func:`coordinate_descent_top_k` for ``ceil(fetch_k_ratio * k)`` tokens, then the hard top-k.

    Args:
        dim: token width.
        n_iters, eps, eps_init, eps_decay: see :func:`coordinate_descent_top_k` (CoLT5's defaults with
            the epsilon scaling of Conditional Adapters).
        fetch_k_ratio: solve for this many times ``k`` (lucidrains: 9/8), so the k-th token keeps a weight
            that is not squeezed to zero.
    """

    def __init__(
        self,
        dim: int,
        n_iters: int = 20,
        eps: float = 0.03,
        eps_init: float | None = 4.0,
        eps_decay: float = 0.7,
        fetch_k_ratio: float = 9 / 8,
    ) -> None:
        super().__init__(dim)
        if n_iters < 1 or eps <= 0 or not 0 < eps_decay <= 1 or fetch_k_ratio < 1:
            raise ValueError(
                f"iterative router: need n_iters >= 1, eps > 0, 0 < eps_decay <= 1, fetch_k_ratio >= 1; got "
                f"n_iters={n_iters}, eps={eps}, eps_decay={eps_decay}, fetch_k_ratio={fetch_k_ratio}."
            )
        self.n_iters, self.eps, self.eps_init, self.eps_decay = n_iters, eps, eps_init, eps_decay
        self.fetch_k_ratio = fetch_k_ratio

    def soft_weights(self, scores: torch.Tensor, k: int, valid: torch.Tensor | None) -> torch.Tensor:
        fetch = min(scores.shape[-1], math.ceil(k * self.fetch_k_ratio))
        return coordinate_descent_top_k(scores, fetch, valid, self.n_iters, self.eps, self.eps_init, self.eps_decay)


#: the routers by the name :class:`~qtunet_monai.networks.QTUNet` takes (``router=``)
ROUTERS: dict[str, type[LightRouter]] = {"light": LightRouter, "iterative": IterativeRouter}


def _gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return x.gather(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _add_tokens(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x`` with ``values`` ``(G, k, C)`` added at the rows ``indices`` ``(G, k)``."""
    return x.scatter_add(1, indices.unsqueeze(-1).expand(-1, -1, x.shape[-1]), values.to(x.dtype))


class RoutedBias(AttentionBias):
    """Relative-position bias plus shift mask of a routed attention: the dense window bias at the
    selected rows (queries) and columns (keys) of each window, and a zero column for the null key.

    Args:
        attn: the heavy attention (its bias table).
        geometry: the windows' geometry (relative-position index, shift regions).
        q_idx: ``(G, k_q)`` routed query positions; ``kv_idx``: ``(G, k_kv)`` routed key/value positions.
        null: a null key is appended after the routed keys.
    """

    def __init__(self, attn: WindowAttention, geometry: WindowGeometry, q_idx: torch.Tensor, kv_idx: torch.Tensor,
                 null: bool) -> None:
        self.table = attn.relative_position_bias_table
        self.geometry, self.q_idx, self.kv_idx, self.null = geometry, q_idx, kv_idx, null

    def _regions(self) -> torch.Tensor | None:
        regions = self.geometry.region_index  # windows are batch-major: row g is window g % num_windows
        return None if regions is None else regions.repeat(self.q_idx.shape[0] // regions.shape[0], 1)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """``(G, heads, k_q, k_kv [+ 1])``."""
        n = self.geometry.tokens_per_window
        q_idx, kv_idx = self.q_idx, self.kv_idx
        pair = q_idx.unsqueeze(-1) * n + kv_idx.unsqueeze(-2)  # (G, k_q, k_kv) into the window's N x N pairs
        bias = self.table[self.geometry.relative_index.reshape(-1)[pair]].permute(0, 3, 1, 2)
        regions = self._regions()
        if regions is not None:
            same = regions.gather(1, q_idx).unsqueeze(-1) == regions.gather(1, kv_idx).unsqueeze(-2)
            bias = bias + torch.where(same, 0.0, MASK_VALUE).unsqueeze(1)
        bias = bias.to(dtype)
        return F.pad(bias, (0, 1)) if self.null else bias

    def score_mod(self, dtype: torch.dtype):
        table = self.table.to(dtype)
        relative, q_idx, null = self.geometry.relative_index, self.q_idx, self.null
        routed_keys = self.kv_idx.shape[1]
        kv_cols = F.pad(self.kv_idx, (0, 1)) if null else self.kv_idx  # the null column points anywhere; its bias is 0
        regions = self._regions()

        def score_mod(score, b, h, qi, ki):
            row, col = q_idx[b, qi], kv_cols[b, ki]
            bias = table[relative[row, col], h]
            if regions is not None:
                bias = bias + torch.where(regions[b, row] == regions[b, col], 0.0, MASK_VALUE)
            if null:
                bias = torch.where(ki == routed_keys, 0.0, bias)
            return score + bias

        return score_mod

    @property
    def requires_grad(self) -> bool:
        return torch.is_grad_enabled() and self.table.requires_grad


def routed_window_attention(
    attn: WindowAttention,
    queries: torch.Tensor,
    context: torch.Tensor,
    geometry: WindowGeometry,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    kv_weights: torch.Tensor,
    null_kv: torch.Tensor | None,
) -> torch.Tensor:
    """``attn`` (self- or cross-attention, all its heads and its output projection) of the routed
    queries over the routed keys/values of their window.

    Args:
        attn: the heavy attention.
        queries: windows ``(G, N, C)`` the queries come from; ``context``: those of the keys/values
            (the same tensor for self-attention).
        geometry: the windows' geometry (relative-position index, shift regions).
        q_idx: ``(G, k_q)`` routed query positions; ``kv_idx``: ``(G, k_kv)`` routed key/value positions.
        kv_weights: ``(G, k_kv)`` router weights that scale the key/value tokens.
        null_kv: ``(2, heads, head_dim)`` learned null key and value appended to every window's keys, or None.

    Returns:
        ``(G, k_q, C)``: the heavy output of each routed query.
    """
    q = attn.project_queries(_gather_tokens(queries, q_idx))
    routed = _gather_tokens(context, kv_idx) * kv_weights.unsqueeze(-1).to(context.dtype)
    k, v = attn.project_keys_values(routed)
    null = null_kv is not None
    if null:
        g, heads, _, head_dim = k.shape
        null_k, null_v = null_kv.to(k.dtype)[:, None, :, None, :].expand(2, g, heads, 1, head_dim).unbind(0)
        k, v = torch.cat([k, null_k], dim=2), torch.cat([v, null_v], dim=2)
    out = attend(attn.attention_backend, q, k, v, RoutedBias(attn, geometry, q_idx, kv_idx, null), attn.scale)
    g, heads, k_q, head_dim = out.shape
    return attn.proj(out.transpose(1, 2).reshape(g, k_q, heads * head_dim))


def _valid_rows(geometry: WindowGeometry, groups: int) -> torch.Tensor | None:
    """``(G, N)`` validity of the window positions of ``groups`` batch-major windows, or None unpadded."""
    valid = window_validity(geometry)
    return None if valid is None else valid.repeat(groups // valid.shape[0], 1)


class BlockRouting(nn.Module):
    """The routers of one conditional sub-block and what routing needs besides them: for a routed
    attention a query router ``q``, a key/value router ``kv`` and a learned null key/value ``null_kv``
    (``cross_q``, ``cross_kv``, ``cross_null_kv`` for a routed cross-attention), for a routed MLP a
    router ``ff``. :meth:`attention` and :meth:`feed_forward` compute a conditional sub-layer from the
    block's heavy and light modules.

    Args:
        router: ``"light"`` or ``"iterative"``.
        dim: token width.
        num_heads: heads of the heavy attention; ``head_dim``: their width.
        parts: which sub-layers are routed: any of ``"attn"``, ``"mlp"``, ``"cross"``.
        capacity: routed fraction per kind: ``{"q": .., "kv": .., "ff": ..}``.
        weighting: ``"st"``, ``"soft"`` or ``"softmax"``.
        ff_group: route the MLP's tokens per ``"volume"`` (CoLT5, the seed) or per ``"window"``.
        null_kv: add the learned null key/value whenever not every key of a window is routed.
        router_kwargs: further arguments of the router class (the iterative router's descent).
    """

    def __init__(
        self,
        router: str,
        dim: int,
        num_heads: int,
        head_dim: int,
        parts: Sequence[str],
        capacity: Mapping[str, float],
        weighting: str = "st",
        ff_group: str = "volume",
        null_kv: bool = True,
        router_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__()
        self.router_type = router
        self.route_attn, self.route_mlp, self.route_cross = ("attn" in parts), ("mlp" in parts), ("cross" in parts)
        self.capacity = dict(capacity)
        self.weighting = weighting
        self.ff_group = ff_group
        self.use_null_kv = null_kv
        make = functools.partial(ROUTERS[router], dim, **(router_kwargs or {}))

        def null() -> nn.Parameter:
            return nn.Parameter(nn.init.trunc_normal_(torch.empty(2, num_heads, head_dim), std=0.02))

        if self.route_attn:
            self.q, self.kv = make(), make()
            if null_kv:
                self.null_kv = null()
        if self.route_cross:
            self.cross_q, self.cross_kv = make(), make()
            if null_kv:
                self.cross_null_kv = null()
        if self.route_mlp:
            self.ff = make()

    def extra_repr(self) -> str:
        parts = [p for p, on in (("attn", self.route_attn), ("cross", self.route_cross), ("mlp", self.route_mlp)) if on]
        return (f"router={self.router_type!r}, parts={parts}, capacity={self.capacity}, weighting={self.weighting!r}, "
                f"ff_group={self.ff_group!r}")

    def attention(
        self,
        heavy: WindowAttention,
        light: WindowAttention,
        queries: torch.Tensor,
        context: torch.Tensor,
        geometry: WindowGeometry,
        cross: bool = False,
    ) -> torch.Tensor:
        """``Light(queries[, context]) + scatter(s_q (.) Heavy(queries[Q], s_kv (.) context[K]))`` on windows
        ``(G, N, C)``; ``cross``: ``heavy`` and ``light`` are cross-attentions and ``context`` their key/value
        source (else ``context`` is ``queries``)."""
        out = light(queries, context, geometry) if cross else light(queries, geometry)
        n = geometry.tokens_per_window
        k_q, k_kv = routed_count(self.capacity["q"], n), routed_count(self.capacity["kv"], n)
        if k_q == 0:
            return out
        if cross:
            router_q, router_kv, null_kv = self.cross_q, self.cross_kv, getattr(self, "cross_null_kv", None)
        else:
            router_q, router_kv, null_kv = self.q, self.kv, getattr(self, "null_kv", None)
        valid = _valid_rows(geometry, queries.shape[0])
        q_idx, q_weights = router_q.select(queries, k_q, valid, self.weighting)
        if k_kv > 0:
            kv_idx, kv_weights = router_kv.select(context, k_kv, valid, self.weighting)
        else:  # only the null key/value
            kv_idx, kv_weights = q_idx[:, :0], q_weights[:, :0]
        if k_kv == n:
            null_kv = None  # every key of the window is routed: each query has its own region's keys
        elif null_kv is None and k_kv == 0:
            raise ValueError("capacity['kv'] = 0 leaves the routed queries without keys; enable null_kv.")
        heavy_out = routed_window_attention(heavy, queries, context, geometry, q_idx, kv_idx, kv_weights, null_kv)
        return _add_tokens(out, q_idx, heavy_out * q_weights.unsqueeze(-1).to(heavy_out.dtype))

    def feed_forward(
        self, heavy: nn.Module, light: nn.Module, x: torch.Tensor, geometry: WindowGeometry | None = None
    ) -> torch.Tensor:
        """``Light(x) + scatter(s (.) Heavy(x[F]))`` on normalised tokens ``(B, *spatial, C)``, routed per
        volume or per window of ``geometry``."""
        out = light(x)
        batch, channels = x.shape[0], x.shape[-1]
        if self.ff_group == "volume":
            tokens, valid = x.reshape(batch, -1, channels), None
        else:
            if geometry is None:
                raise ValueError("per-window routing of the MLP needs the block's window geometry.")
            tokens = geometry.partition(x)
            valid = _valid_rows(geometry, tokens.shape[0])
        k = routed_count(self.capacity["ff"], tokens.shape[1])
        if k == 0:
            return out
        indices, weights = self.ff.select(tokens, k, valid, self.weighting)
        routed = heavy(_gather_tokens(tokens, indices))
        routed = routed * weights.unsqueeze(-1).to(routed.dtype)
        if self.ff_group == "volume":
            return _add_tokens(out.reshape(batch, -1, channels), indices, routed).view_as(out)
        return out + geometry.reverse(_add_tokens(torch.zeros_like(tokens), indices, routed), batch)


@dataclass(frozen=True)
class RoutingConfig:
    """What :class:`~qtunet_monai.networks.QTUNet`'s ``router*`` arguments resolve to (see :func:`resolve_routing`)."""

    router: str
    capacity: dict[str, float]
    sites: dict[str, tuple[str, ...]]
    weighting: str = "st"
    ff_group: str = "volume"
    light_heads_ratio: float = 0.5
    light_mlp_ratio: float = 1.0
    null_kv: bool = True
    router_kwargs: dict = field(default_factory=dict)


def _resolve_capacity(capacity, base: Mapping[str, float] | None = None) -> dict[str, float]:
    if isinstance(capacity, Mapping):
        unknown = sorted(set(capacity) - set(_CAPACITY_KEYS))
        if unknown:
            raise ValueError(f"unknown capacity key(s) {unknown}; use {list(_CAPACITY_KEYS)}.")
        resolved = {key: float(capacity.get(key, (base or {}).get(key, DEFAULT_CAPACITY))) for key in _CAPACITY_KEYS}
    else:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, float)):
            raise TypeError(f"capacity must be a fraction in [0, 1] or a dict of them, got {capacity!r}.")
        resolved = dict.fromkeys(_CAPACITY_KEYS, float(capacity))
    bad = {key: value for key, value in resolved.items() if not 0.0 <= value <= 1.0}
    if bad:
        raise ValueError(f"capacity must lie in [0, 1] (the routed fraction of a window or volume), got {bad}.")
    return resolved


def _resolve_sites(sites: Sequence[str] | str, decoder: str) -> dict[str, tuple[str, ...]]:
    if isinstance(sites, str):
        sites = (sites,)
    resolved: dict[str, list[str]] = {}
    for site in sites:
        part, _, sub = str(site).partition(".")
        if part not in ROUTER_PARTS or (sub and sub not in ROUTER_PARTS[part]):
            choices = list(ROUTER_PARTS) + [f"{p}.{s}" for p, subs in ROUTER_PARTS.items() for s in subs]
            raise ValueError(f"unknown router site {site!r}; choose from {choices}.")
        subs = (sub,) if sub else ("attn", "mlp")
        resolved.setdefault(part, [])
        resolved[part] += [s for s in subs if s not in resolved[part]]
    if "cross" in resolved.get("decoder", ()) and decoder != "qt":
        raise ValueError(f"router site 'decoder.cross' needs decoder='qt' (decoder={decoder!r} has no own "
                         "cross-attention).")
    return {part: tuple(subs) for part, subs in resolved.items()}


def resolve_routing(
    router: str | None,
    capacity=None,
    router_sites: Sequence[str] | str | None = None,
    router_weighting: str | None = None,
    router_options: Mapping | None = None,
    decoder: str = "qt",
) -> RoutingConfig | None:
    """Check :class:`~qtunet_monai.networks.QTUNet`'s routing arguments; None for a dense network.

    Args:
        router: None (dense), ``"light"`` or ``"iterative"``.
        capacity: routed fraction (default 0.25) of a window's queries and keys/values and of a volume's
            (or window's) MLP tokens; or ``{"q": .., "kv": .., "ff": ..}`` (missing keys 0.25).
        router_sites: parts made conditional (default ``("encoder", "bottleneck", "decoder")``): a part
            (its self-attention and MLP) or ``"part.attn"``, ``"part.mlp"``, and ``"decoder.cross"`` (the QT
            decoder's cross-attention, dense unless named).
        router_weighting: ``"st"`` (default), ``"soft"`` or ``"softmax"``.
        router_options: ``ff_group`` (``"volume"`` or ``"window"``), ``light_heads_ratio`` (0.5: light
            attention heads per heavy head, at least one, of the same head width), ``light_mlp_ratio``
            (1.0: the light MLP's hidden width per token width), ``null_kv`` (True); for the iterative
            router ``n_iters`` (20), ``eps`` (0.03), ``eps_init`` (4.0), ``eps_decay`` (0.7),
            ``fetch_k_ratio`` (9/8).
        decoder: the network's decoder; ``"vt"`` refuses a router.
    """
    if router is None:
        given = {name: value for name, value in (("capacity", capacity), ("router_sites", router_sites),
                 ("router_weighting", router_weighting), ("router_options", router_options)) if value is not None}
        if given:
            raise ValueError(f"{sorted(given)} apply only to a conditional network: set router='light' or "
                             "'iterative' (or leave them unset).")
        return None
    if router not in ROUTERS:
        raise ValueError(f"unknown router {router!r}; choose None or one of {list(ROUTERS)}.")
    if decoder == "vt":
        raise ValueError(
            "decoder='vt' cannot be conditional: the VT decoder attends to every key/value the encoder blocks "
            "compute, which a router computes for its routed tokens only. Use decoder='qt' or 'none', or router=None."
        )
    weighting = "st" if router_weighting is None else router_weighting
    if weighting not in ROUTER_WEIGHTINGS:
        raise ValueError(f"unknown router_weighting {weighting!r}; choose one of {list(ROUTER_WEIGHTINGS)}.")
    options = dict(router_options or {})
    allowed = {**_BLOCK_OPTIONS, **(_ITERATIVE_OPTIONS if router == "iterative" else {})}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown router_options {unknown} for router={router!r}; choose from {sorted(allowed)}.")
    block = {key: options.pop(key, default) for key, default in _BLOCK_OPTIONS.items()}
    if block["ff_group"] not in ("volume", "window"):
        raise ValueError(f"router_options['ff_group'] must be 'volume' or 'window', got {block['ff_group']!r}.")
    if not block["light_heads_ratio"] > 0 or not block["light_mlp_ratio"] > 0:
        raise ValueError("router_options 'light_heads_ratio' and 'light_mlp_ratio' must be positive.")
    if router == "iterative":
        IterativeRouter(1, **options)  # refuse bad descent settings now
    return RoutingConfig(
        router=router,
        capacity=_resolve_capacity(DEFAULT_CAPACITY if capacity is None else capacity),
        sites=_resolve_sites(DEFAULT_SITES if router_sites is None else router_sites, decoder),
        weighting=weighting,
        ff_group=block["ff_group"],
        light_heads_ratio=float(block["light_heads_ratio"]),
        light_mlp_ratio=float(block["light_mlp_ratio"]),
        null_kv=bool(block["null_kv"]),
        router_kwargs=options,
    )


def _swin_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


def _zero(linear: nn.Linear) -> None:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _light_attention(heavy: WindowAttention, ratio: float, cross: bool) -> WindowAttention:
    heads = max(1, int(heavy.num_heads * ratio))
    dim = heavy.proj.out_features
    light = (WindowCrossAttention if cross else WindowAttention)(
        dim, heads, heavy.window_size, heavy.spatial_dims, attention_backend=heavy.attention_backend,
        inner_dim=heads * heavy.head_dim,
    )
    _swin_init(light)
    _zero(light.proj)
    return light


def attach_routing(block: nn.Module, parts: Sequence[str], config: RoutingConfig) -> None:
    """Make a sub-block (encoder, bottleneck or decoder; see ``swin.WindowBlock``) conditional:
    add its light branches (``light_attn``, ``light_mlp``, ``light_cross``, output projections zero) and
    its :class:`BlockRouting` (``router``). Its ``attn``, ``mlp`` and ``cross_attn`` become the heavy
    branches, unchanged."""
    parts = [p for p in parts if p != "cross" or hasattr(block, "cross_attn")]
    if not parts:
        return
    attn = block.attn
    dim = attn.proj.out_features
    if "attn" in parts:
        block.light_attn = _light_attention(attn, config.light_heads_ratio, cross=False)
    if "cross" in parts:
        block.light_cross = _light_attention(block.cross_attn, config.light_heads_ratio, cross=True)
    if "mlp" in parts:
        block.light_mlp = MLPBlock(dim, max(1, int(dim * config.light_mlp_ratio)), act="GELU")
        _swin_init(block.light_mlp)
        _zero(block.light_mlp.linear2)
    block.router = BlockRouting(
        config.router, dim, attn.num_heads, attn.head_dim, parts, config.capacity, config.weighting,
        config.ff_group, config.null_kv, config.router_kwargs,
    )


def attach_routers(groups: Mapping[str, Sequence[nn.Module]], config: RoutingConfig) -> None:
    """:func:`attach_routing` on the sub-blocks of each part (``{"encoder": [...], "bottleneck": [...],
    "decoder": [...]}``) that ``config.sites`` names."""
    for part, blocks in groups.items():
        parts = config.sites.get(part, ())
        for block in blocks if parts else ():
            attach_routing(block, parts, config)


def set_capacity(module: nn.Module, capacity) -> int:
    """Set the routed fraction of every conditional sub-block under ``module`` (e.g. at inference):
    a fraction for queries, keys/values and MLP tokens alike, or a dict of some of ``"q"``, ``"kv"``,
    ``"ff"`` (the others keep their values). Returns the number of sub-blocks changed."""
    routings = [m for m in module.modules() if isinstance(m, BlockRouting)]
    for routing in routings:
        routing.capacity = _resolve_capacity(capacity, routing.capacity)
    # the networks' summary (QTUNet.routing) follows, so what is reported and saved is what runs
    for m in module.modules():
        config = getattr(m, "routing", None)
        if isinstance(config, RoutingConfig):
            m.routing = replace(config, capacity=_resolve_capacity(capacity, config.capacity))
    return len(routings)
