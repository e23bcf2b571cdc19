# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""UCTransNet's channel-wise skips (Wang et al., AAAI 2022) on channels-last tokens, 2D and 3D.

* :class:`ChannelTransformer` (CCT, "channel-wise cross fusion transformer"): every encoder skip is
  embedded onto one common token grid, all scales attend to the channels of all scales
  (:class:`ChannelCrossAttention`), and the result is taken back to each skip's grid and *added* to
  the skip. Its last projection starts at zero, so an untrained CCT leaves the skips unchanged.
* :class:`ChannelGate` (CCA, "channel-wise cross attention"): in each decoder step a sigmoid gate
  per channel, from the global averages of the skip and of the up-sampled decoder features,
  scales the skip before the decoder reads it.

The arithmetic is that of UCTransNet's code (``nets/CTrans.py``, ``nets/UCTransNet.py``; see
``SEEDS-DESIGN.md`` section 1.1 in the project's shared notes); where this module departs from it, the
class says so and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import MLPBlock
from monai.networks.layers import Conv
from torch import nn

from .init import init_weights
from .patching import _pad_to_multiple, space_to_channels
from .swin import maybe_checkpoint, sinusoidal_position_encoding

__all__ = [
    "CCT_GRIDS",
    "CCT_PRESETS",
    "ChannelCrossAttention",
    "ChannelEmbedding",
    "ChannelGate",
    "ChannelTransformer",
    "ChannelTransformerLayer",
    "common_grid_factors",
    "resolve_cct_options",
]

#: the CCT presets: ``"full"`` is UCTransNet's configuration (4 layers, 4 heads, a full convolution
#: kernel = stride = patch as embedding); ``"lite"`` 1 layer, 1 head and an average-pooling embedding.
#: Both use an MLP ratio of 4.
CCT_PRESETS: dict[str, dict] = {
    "full": {"num_layers": 4, "num_heads": 4, "embedding": "conv"},
    "lite": {"num_layers": 1, "num_heads": 1, "embedding": "pool"},
}

#: where the scales meet: on the bottleneck's grid (UCTransNet's rule) or on the deepest skip's grid
#: (8x the tokens in 3D: for small ROIs, where the bottleneck holds only a few tokens)
CCT_GRIDS = ("bottleneck", "deepest_skip")

_EMBEDDINGS = ("conv", "pool")
_POSITIONS = ("conv", "sine", "none")


def common_grid_factors(
    merge_factors: Sequence[int], num_scales: int, grid: str = "bottleneck"
) -> list[tuple[int, ...]]:
    """The patch size per axis that takes each encoder scale onto the common token grid, shallow first.

    Scale ``i`` (0 = shallowest) is ``num_scales - i`` merges above the bottleneck, so its patch is
    ``merge_factors ** (num_scales - i)`` per axis (``grid="bottleneck"``; e.g. (8, 8, 8), (4, 4, 4),
    (2, 2, 2) for three isotropic stages, (8, 8, 1), (4, 4, 1), (2, 2, 1) when depth is kept), or one
    merge less (``grid="deepest_skip"``: the deepest skip is embedded with patch 1).
    """
    if grid not in CCT_GRIDS:
        raise ValueError(f"unknown cct_grid {grid!r}; choose one of {list(CCT_GRIDS)}.")
    top = num_scales if grid == "bottleneck" else num_scales - 1
    return [tuple(int(f) ** (top - i) for f in merge_factors) for i in range(num_scales)]


def resolve_cct_options(
    preset: str | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    embedding: str | None = None,
    grid: str | None = None,
    position: str | None = None,
) -> dict:
    """Check the CCT's arguments of :class:`~qtunet_monai.networks.QTUNet` (``cct_*``) and resolve them.

    Returns the keyword arguments of :class:`ChannelTransformer` (``num_layers``, ``num_heads``,
    ``embedding``, ``position``) and ``grid``: the preset's (default ``"full"``), overridden by the
    explicit values. The skip kind itself is checked by :mod:`~qtunet_monai.networks.blocks.skips`.

    Args:
        preset: a key of :data:`CCT_PRESETS`.
        num_layers: CCT layers, overriding the preset's.
        num_heads: channel-attention heads, overriding the preset's.
        embedding: ``"conv"`` or ``"pool"``, overriding the preset's.
        grid: a value of :data:`CCT_GRIDS` (default ``"bottleneck"``).
        position: ``"conv"`` (default), ``"sine"`` or ``"none"``.
    """
    preset = "full" if preset is None else str(preset).lower()
    if preset not in CCT_PRESETS:
        raise ValueError(f"unknown cct_preset {preset!r}; choose one of {list(CCT_PRESETS)}.")
    options = dict(CCT_PRESETS[preset])
    for key, value in (("num_layers", num_layers), ("num_heads", num_heads)):
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"cct_{key[4:]} must be a positive integer, got {value!r}.")
            options[key] = value
    if embedding is not None:
        if embedding not in _EMBEDDINGS:
            raise ValueError(f"unknown cct_embedding {embedding!r}; choose one of {list(_EMBEDDINGS)}.")
        options["embedding"] = embedding
    options["position"] = "conv" if position is None else position
    if options["position"] not in _POSITIONS:
        raise ValueError(f"unknown cct_position {position!r}; choose one of {list(_POSITIONS)}.")
    options["grid"] = "bottleneck" if grid is None else grid
    if options["grid"] not in CCT_GRIDS:
        raise ValueError(f"unknown cct_grid {grid!r}; choose one of {list(CCT_GRIDS)}.")
    return options


def _grouped_mean(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Average pooling with kernel = stride = ``factors`` on channels-last ``x`` ``(B, *S, C)``, the last
    (partial) patch of an odd size averaged over its real voxels only: ``(B, *ceil(S / f), C)``."""
    if all(f == 1 for f in factors):
        return x
    b, *spatial, c = x.shape
    grid = [-(-s // f) for s, f in zip(spatial, factors)]
    split = [b]
    for g, f in zip(grid, factors):
        split += [g, f]
    within = tuple(range(2, 2 * len(spatial) + 1, 2))
    padded = _pad_to_multiple(x, factors, channels_last=True)
    if padded.shape == x.shape:
        return padded.reshape(*split, c).mean(dim=within)
    ones = _pad_to_multiple(x.new_ones(1, *spatial, 1), factors, channels_last=True)
    counts = ones.reshape(1, *split[1:], 1).sum(dim=within)
    return padded.reshape(*split, c).sum(dim=within) / counts


def _upsample_nearest(x: torch.Tensor, factors: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Nearest-neighbour upsampling of channels-last ``x`` ``(B, *G, C)`` by ``factors`` per axis,
    cropped to ``shape``: ``(B, *shape, C)``."""
    if any(f != 1 for f in factors):
        b, *grid, c = x.shape
        view, expanded = [b], [b]
        for g, f in zip(grid, factors):
            view += [g, 1]
            expanded += [g, f]
        x = x.reshape(*view, c).expand(*expanded, c).reshape(b, *(g * f for g, f in zip(grid, factors)), c)
    if tuple(x.shape[1:-1]) != tuple(shape):
        x = x[(slice(None), *(slice(0, s) for s in shape))]
    return x


class ChannelEmbedding(nn.Module):
    """One encoder scale's tokens on the common grid (UCTransNet's ``Channel_Embeddings``), channels-last.

    ``embedding="conv"``: UCTransNet's convolution with kernel = stride = ``factors`` (``C -> C``, with
    bias), computed as a Linear on the concatenated patch (``space_to_channels``, as
    :class:`~qtunet_monai.networks.blocks.PatchMerging` does); ``prod(factors) * C^2`` weights.
    ``embedding="pool"``: average pooling to the grid, then ``Linear(C, C)`` (the ``"lite"`` preset).
    Odd sizes are padded at the end (the pooled average counts only real voxels).

    Position information, at any input size (UCTransNet's learned table of the positions of a fixed
    224 x 224 image does not transfer to other sizes): ``position="conv"`` adds a depthwise 3^d
    convolution of the tokens (a conditional position encoding; zero-initialised, so it starts at
    nothing, as UCTransNet's zero-initialised table), ``"sine"`` adds the fixed sinusoidal encoding
    of :func:`~qtunet_monai.networks.blocks.sinusoidal_position_encoding`, ``"none"`` adds nothing.

    Args:
        channels: width ``C`` of the scale's tokens.
        factors: patch size per spatial axis (see :func:`common_grid_factors`).
        spatial_dims: 2 or 3.
        embedding: ``"conv"`` or ``"pool"``.
        position: ``"conv"``, ``"sine"`` or ``"none"``.
    """

    def __init__(
        self, channels: int, factors: Sequence[int], spatial_dims: int, embedding: str = "conv",
        position: str = "conv",
    ) -> None:
        super().__init__()
        self.factors = tuple(int(f) for f in factors)
        if len(self.factors) != spatial_dims:
            raise ValueError(f"factors {self.factors} must have one entry per spatial axis ({spatial_dims}).")
        if embedding not in _EMBEDDINGS:
            raise ValueError(f"unknown embedding {embedding!r}; choose one of {list(_EMBEDDINGS)}.")
        if position not in _POSITIONS:
            raise ValueError(f"unknown position {position!r}; choose one of {list(_POSITIONS)}.")
        self.embedding = embedding
        self.position = position
        fan_in = math.prod(self.factors) * channels if embedding == "conv" else channels
        self.proj = nn.Linear(fan_in, channels)
        self.position_conv = None
        if position == "conv":
            self.position_conv = Conv[Conv.CONV, spatial_dims](
                channels, channels, kernel_size=3, padding=1, groups=channels
            )
            nn.init.zeros_(self.position_conv.weight)
            nn.init.zeros_(self.position_conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *S, C)`` -> ``(B, *ceil(S / factors), C)``."""
        if self.embedding == "conv":
            patches = space_to_channels(_pad_to_multiple(x, self.factors, channels_last=True), self.factors)
        else:
            patches = _grouped_mean(x, self.factors)
        tokens = self.proj(patches)
        if self.position_conv is not None:
            tokens = tokens + self.position_conv(tokens.movedim(-1, 1)).movedim(1, -1)
        elif self.position == "sine":
            encoding = sinusoidal_position_encoding(tokens.shape[1:-1], tokens.shape[-1], tokens.device)
            tokens = tokens + encoding.to(tokens.dtype)
        return tokens


class ChannelCrossAttention(nn.Module):
    """Multi-head channel-wise cross attention (UCTransNet's ``Attention_org``) on flattened tokens.

    For scale ``i`` with ``C_i`` channels and the concatenation of all scales with ``C_S = sum C_i``
    channels, over ``n`` tokens, each head ``h`` projects at full width (no bias):
    ``Q_i^h = X_i W_Qi^h`` (``n x C_i``), ``K^h = X_S W_K^h``, ``V^h = X_S W_V^h`` (``n x C_S``);
    ``M_i^h = softmax_{C_S}(InstanceNorm(Q_i^hT K^h / sqrt(C_S)))``, the instance norm (affine off,
    eps 1e-5) over each ``C_i x C_S`` map per sample and head; ``O_i = W_Oi mean_h(M_i^h V^hT)``.
    The attention is between channels: the dot products run over the ``n`` positions. The instance
    norm makes the maps independent of the scale of the scores (hence of ``n`` and of the input's size).

    The heads' projections are stored as one Linear per scale (``C_i -> H C_i``) and one for the keys
    and values (``C_S -> 2 H C_S``): rows ``h C_i .. (h + 1) C_i`` are head ``h``'s query of scale ``i``,
    rows ``(j H + h) C_S ..`` head ``h``'s key (``j = 0``) or value (``j = 1``). The instance norm and
    the softmax run in float32.

    Args:
        widths: ``C_i`` of each scale.
        num_heads: heads ``H`` (each of full width).
        attn_drop: dropout on the maps (UCTransNet: 0.1; the family uses drop path instead, so 0).
        eps: the instance norm's epsilon.
    """

    def __init__(self, widths: Sequence[int], num_heads: int = 4, attn_drop: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.widths = tuple(int(c) for c in widths)
        self.total = sum(self.widths)
        self.num_heads = num_heads
        self.eps = eps
        self.queries = nn.ModuleList(nn.Linear(c, num_heads * c, bias=False) for c in self.widths)
        self.key_value = nn.Linear(self.total, 2 * num_heads * self.total, bias=False)
        self.outputs = nn.ModuleList(nn.Linear(c, c, bias=False) for c in self.widths)
        self.attn_drop = nn.Dropout(attn_drop)

    def _keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = context.shape
        keys, values = self.key_value(context).view(b, n, 2, self.num_heads, self.total).unbind(2)
        return keys, values  # (B, n, H, C_S) each

    def _map(self, projection: nn.Module, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        queries = projection(x).view(b, n, self.num_heads, c)
        scores = torch.einsum("bnhc,bnhk->bhck", queries, keys) / math.sqrt(self.total)
        return F.instance_norm(scores.float(), eps=self.eps).softmax(dim=-1)  # (B, H, C_i, C_S)

    def maps(self, queries: Sequence[torch.Tensor], context: torch.Tensor) -> list[torch.Tensor]:
        """The attention maps ``(B, H, C_i, C_S)`` of each scale (float32, before dropout), for
        inspection: the same computation as :meth:`forward` without the values."""
        keys, _ = self._keys_values(context)
        return [self._map(proj, x, keys) for proj, x in zip(self.queries, queries)]

    def forward(self, queries: Sequence[torch.Tensor], context: torch.Tensor) -> list[torch.Tensor]:
        """
        Args:
            queries: the normalised tokens ``(B, n, C_i)`` of each scale.
            context: the normalised concatenation of all scales ``(B, n, C_S)``.

        Returns:
            the attention output ``(B, n, C_i)`` of each scale.
        """
        if len(queries) != len(self.widths):
            raise ValueError(f"expected {len(self.widths)} scales, got {len(queries)}.")
        keys, values = self._keys_values(context)
        outputs = []
        for proj, out, x in zip(self.queries, self.outputs, queries):
            maps = self.attn_drop(self._map(proj, x, keys)).to(values.dtype)
            # mean over heads of M_i^h V^hT, as one contraction over (head, channel)
            mixed = torch.einsum("bhck,bnhk->bnc", maps, values) / self.num_heads
            outputs.append(out(mixed))
        return outputs


class ChannelTransformerLayer(nn.Module):
    """One CCT layer (UCTransNet's ``Block_ViT``), pre-LayerNorm, on flattened tokens ``(B, n, C_i)``:
    ``T_i <- T_i + O_i`` with ``O = ChannelCrossAttention(LN_i(T_i), LN_S(concat T))``, then
    ``T_i <- T_i + MLP_i(LN'_i(T_i))`` (Linear ``C_i -> r C_i``, GELU, Linear back). The un-normalised
    tokens are concatenated, then normalised together.

    Args:
        widths: ``C_i`` of each scale.
        num_heads: heads of the channel attention.
        mlp_ratio: hidden width of each scale's MLP relative to ``C_i``.
        dropout: dropout after the attention and in the MLPs.
        attn_drop: dropout on the attention maps.
    """

    def __init__(
        self, widths: Sequence[int], num_heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        widths = tuple(int(c) for c in widths)
        self.attn_norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.context_norm = nn.LayerNorm(sum(widths))
        self.attn = ChannelCrossAttention(widths, num_heads, attn_drop)
        self.proj_drop = nn.Dropout(dropout)
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.mlps = nn.ModuleList(
            MLPBlock(c, int(c * mlp_ratio), dropout_rate=dropout, act="GELU") for c in widths
        )

    def forward(self, *tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        context = self.context_norm(torch.cat(tokens, dim=-1))
        attended = self.attn([norm(t) for norm, t in zip(self.attn_norms, tokens)], context)
        tokens = [t + self.proj_drop(a) for t, a in zip(tokens, attended)]
        return tuple(t + mlp(norm(t)) for t, norm, mlp in zip(tokens, self.mlp_norms, self.mlps))


class ChannelTransformer(nn.Module):
    """UCTransNet's CCT over the encoder skips, channels-last: ``F_i = E_i + R_i(CCT(E_1, ..., E_k)_i)``.

    Each skip ``E_i`` ``(B, *S_i, C_i)`` is embedded onto the common grid (:class:`ChannelEmbedding`,
    patch ``factors[i]``), the ``num_layers`` :class:`ChannelTransformerLayer` run on the ``n`` tokens of
    that grid, a final LayerNorm per scale follows, and the reconstruction ``R_i`` takes the tokens back:
    nearest upsampling by ``factors[i]``, cropped to ``S_i``, and a pointwise ``Linear(C_i, C_i)``.

    The reconstruction departs from UCTransNet's (upsample, 1x1 conv, BatchNorm, ReLU): the Linear is
    applied *before* the upsampling (a pointwise map commutes with nearest upsampling: the same result
    on ``n`` tokens instead of ``|S_i|``), BatchNorm is left out (the tokens were just LayerNorm-ed, and
    3D training runs batches of 1-2 crops, where batch statistics are noise), and so is the ReLU (the
    update is added to signed transformer features; in UCTransNet both terms are post-ReLU CNN maps).
    The Linear (weight and bias) is initialised to zero, so an untrained CCT returns the skips
    unchanged and a network with it computes exactly what the network without it does; its other
    parameters receive gradients from the first step that changes it.

    Args:
        widths: ``C_i`` of each skip, shallow first.
        factors: patch size per axis of each skip (:func:`common_grid_factors`); they must take all the
            skips onto one grid (they do for the skips of one encoder: sizes are ``ceil``-halved).
        spatial_dims: 2 or 3.
        num_layers: CCT layers (UCTransNet: 4).
        num_heads: heads of the channel attention (UCTransNet: 4).
        mlp_ratio: MLP hidden width relative to ``C_i`` (UCTransNet: 4).
        embedding: ``"conv"`` (UCTransNet) or ``"pool"``; see :class:`ChannelEmbedding`.
        position: ``"conv"``, ``"sine"`` or ``"none"``; see :class:`ChannelEmbedding`.
        dropout: dropout after the attention and in the MLPs (UCTransNet: 0.1 on the embeddings and
            attention; 0 here by default).
        attn_drop: dropout on the attention maps.
        use_checkpoint: recompute each layer in the backward pass instead of storing it.
    """

    def __init__(
        self,
        widths: Sequence[int],
        factors: Sequence[Sequence[int]],
        spatial_dims: int,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        embedding: str = "conv",
        position: str = "conv",
        dropout: float = 0.0,
        attn_drop: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.widths = tuple(int(c) for c in widths)
        self.factors = [tuple(int(f) for f in fs) for fs in factors]
        if len(self.factors) != len(self.widths):
            raise ValueError(f"one patch size per scale: {len(self.widths)} widths, {len(self.factors)} factors.")
        if num_layers < 1 or num_heads < 1:
            raise ValueError(f"num_layers and num_heads must be positive, got {num_layers} and {num_heads}.")
        self.use_checkpoint = use_checkpoint
        self.embeddings = nn.ModuleList(
            ChannelEmbedding(c, f, spatial_dims, embedding, position) for c, f in zip(self.widths, self.factors)
        )
        self.embed_drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            ChannelTransformerLayer(self.widths, num_heads, mlp_ratio, dropout, attn_drop) for _ in range(num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.widths)
        self.reconstructions = nn.ModuleList(nn.Linear(c, c) for c in self.widths)
        self.apply(init_weights)
        self.zero_reconstruction()

    def zero_reconstruction(self) -> None:
        """Set the reconstruction projections to zero: the CCT then returns the skips unchanged."""
        for projection in self.reconstructions:
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def tokens(self, skips: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """The transformer's output tokens ``(B, n, C_i)`` of each scale (after the final norms) and the
        common grid's shape."""
        if len(skips) != len(self.widths):
            raise ValueError(f"expected {len(self.widths)} skips, got {len(skips)}.")
        embedded = [embed(skip) for embed, skip in zip(self.embeddings, skips)]
        grid = tuple(embedded[0].shape[1:-1])
        tokens = [self.embed_drop(e.reshape(e.shape[0], -1, e.shape[-1])) for e in embedded]
        for layer in self.layers:
            tokens = maybe_checkpoint(layer, self.use_checkpoint, *tokens)
        return [norm(t) for norm, t in zip(self.norms, tokens)], grid

    def forward(self, skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """
        Args:
            skips: the encoder features ``(B, *S_i, C_i)`` of each scale, shallow first.

        Returns:
            the fused skips, same shapes.
        """
        tokens, grid = self.tokens(skips)
        fused = []
        for t, project, factors, skip in zip(tokens, self.reconstructions, self.factors, skips):
            update = project(t).reshape(t.shape[0], *grid, t.shape[-1])
            fused.append(skip + _upsample_nearest(update, factors, skip.shape[1:-1]))
        return fused


class ChannelGate(nn.Module):
    """UCTransNet's CCA gate on channels-last tokens: ``g = sigmoid((L_x(GAP(skip)) + L_g(GAP(dec))) / 2)``
    per sample and channel, ``skip' = g * skip`` (``ReLU(g * skip)`` with ``relu=True``), ``GAP`` the
    mean over all spatial positions, ``L_x``, ``L_g`` Linear with bias.

    The ReLU of UCTransNet's code is off by default: there the skip is a sum of post-ReLU CNN maps
    (non-negative) and the gate is positive, so the ReLU never changes anything; on the signed
    features of a Swin encoder it would instead drop every negative value. Neither form can start as
    the identity (the gate is ``sigmoid(0) = 1/2`` at initialisation); a saturated gate (zero weights, a
    large bias) is the identity.

    Args:
        channels: width of the skip.
        decoder_channels: width of the decoder features (default ``channels``, as in QT-UNet after patch
            expansion).
        relu: apply UCTransNet's ReLU to the gated skip.
    """

    def __init__(self, channels: int, decoder_channels: int | None = None, relu: bool = False) -> None:
        super().__init__()
        self.skip_fc = nn.Linear(channels, channels)
        self.decoder_fc = nn.Linear(channels if decoder_channels is None else decoder_channels, channels)
        self.relu = relu
        self.apply(init_weights)

    def gate(self, skip: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        """The gate ``(B, C)`` for a skip ``(B, *S, C)`` and decoder features ``(B, *S', C_d)``."""
        skip_mean = skip.mean(dim=tuple(range(1, skip.ndim - 1)))
        decoder_mean = decoder.mean(dim=tuple(range(1, decoder.ndim - 1)))
        return torch.sigmoid((self.skip_fc(skip_mean) + self.decoder_fc(decoder_mean)) / 2)

    def forward(self, skip: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        gate = self.gate(skip, decoder)
        gated = skip * gate.view(gate.shape[0], *([1] * (skip.ndim - 2)), gate.shape[-1])
        return F.relu(gated) if self.relu else gated
