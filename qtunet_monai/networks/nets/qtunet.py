# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""QT-UNet: an all-Swin-Transformer U-Net whose decoder queries the same-stage encoder features
through its own windowed cross-attention (see docs/architecture.md section 1 and the thesis, chapter 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..blocks.attention_backends import AttentionBackend, resolve_attention_backend
from ..blocks.channel_transformer import ChannelGate
from ..blocks.conditional import attach_routers, resolve_routing
from ..blocks.conditional import set_capacity as _set_capacity
from ..blocks.decoder import DECODERS, DecoderStage
from ..blocks.detail import DetailPath
from ..blocks.encoder import EncoderStage
from ..blocks.head import SegmentationHead
from ..blocks.init import init_weights
from ..blocks.patching import PatchEmbedding, PatchExpanding, PatchMerging
from ..blocks.skips import SKIPS, SkipGeometry, build_skip, resolve_skip

__all__ = ["ARCHITECTURES", "VARIANTS", "EncoderFeatures", "QTUNet", "QTUNetEncoder", "build_architecture"]

#: embedding width ``C`` of the Tiny / Small / Base variants.
VARIANTS = {"tiny": 48, "small": 72, "base": 96}

#: the thesis' architectures (Tables 3.9 and 4.10) as constructor arguments of :class:`QTUNet`.
ARCHITECTURES: dict[str, dict] = {
    "QT-UNet": {"spatial_dims": 3, "merge_depth": True, "decoder": "qt"},
    "QT-UNet-A": {"spatial_dims": 3, "merge_depth": False, "decoder": "qt"},
    "VT-UNet": {"spatial_dims": 3, "merge_depth": False, "decoder": "vt"},
    "VT-UNet-A": {"spatial_dims": 3, "merge_depth": True, "decoder": "vt"},
    "QT-UNet-2D": {"spatial_dims": 2, "merge_depth": True, "decoder": "qt"},
    "QT-UNet-2D-A": {"spatial_dims": 2, "merge_depth": True, "decoder": "none"},
    # UCTransNet's channel-wise skips (CCT and CCA gates, ``skip="cct"``) on the QT-UNet family; the 2D
    # Swin U-Net without decoder cross-attention is the closest analogue of UCTransNet itself
    "QT-UNet-CCT": {"spatial_dims": 3, "merge_depth": True, "decoder": "qt", "skip": "cct"},
    "QT-UNet-2D-CCT": {"spatial_dims": 2, "merge_depth": True, "decoder": "qt", "skip": "cct"},
    "Swin-UNet-2D-CCT": {"spatial_dims": 2, "merge_depth": True, "decoder": "none", "skip": "cct"},
    # conditional light/heavy Swin blocks (CoLT5; seed 003's Conditional Swin U-Net, ``router=``); the 2D
    # Swin U-Net without decoder cross-attention is the seed's own layout within the family
    "QT-UNet-Cond": {"spatial_dims": 3, "merge_depth": True, "decoder": "qt", "router": "light", "capacity": 0.25},
    "QT-UNet-2D-Cond": {"spatial_dims": 2, "merge_depth": True, "decoder": "qt", "router": "light", "capacity": 0.25},
    "Swin-UNet-2D-Cond": {"spatial_dims": 2, "merge_depth": True, "decoder": "none", "router": "light",
                          "capacity": 0.25},
}


@dataclass
class EncoderFeatures:
    """What the encoder hands to the decoder and to the pre-training heads; channels-last tokens.

    Attributes:
        skips: the output of each encoder stage (after its sub-blocks, before merging), shallow to
            deep: ``(B, *spatial / (patch * 2^i), C * 2^i)``.
        bottleneck: the bottleneck's normalised output ``(B, *spatial / (patch * 2^stages), C * 2^stages)``.
        keys_values: per stage, the ``(keys, values)`` of each of its sub-blocks; only when the decoder
            reads them (VT-UNet), otherwise None.
    """

    skips: list[torch.Tensor]
    bottleneck: torch.Tensor
    keys_values: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None


class _Encoder(nn.Module):
    """QT-UNet's encoder: patch partition, ``num_stages`` stages of a Swin sub-block pair (plain and
    shifted windows) at widths C, 2C, 4C, ..., each followed by patch merging, and a bottleneck of one
    Swin sub-block. :class:`QTUNetEncoder` (self-supervised pre-training) and :class:`QTUNet` (which
    adds the decoder) both extend it, so their parameter names agree and an encoder's state dict loads
    into QTUNet directly. ``forward`` is theirs to define.

    Args:
        in_channels: input channels.
        spatial_dims: 2 or 3.
        feature_size: embedding width C; default 48, or the width of ``variant``. Giving both with
            different widths is an error.
        window_size: attention window per axis.
        patch_size: patch partition edge length (4 in the thesis; 2 doubles every feature map).
        merge_depth: merge all three axes (QT-UNet); False keeps the depth axis (QT-UNet-A,
            VT-UNet). Ignored in 2D.
        num_stages: encoder stages before the bottleneck (3 in the thesis; 4 adds one at 8C).
        num_heads: heads of each encoder stage and of the bottleneck (``num_stages + 1`` entries; the
            decoder mirrors them); default 3, 6, 12, ... doubling with the width.
        drop_path_rate: stochastic depth, linearly spaced over the encoder and bottleneck
            sub-blocks. The thesis trains with 0.2.
        use_checkpoint: gradient checkpointing of every sub-block (less memory, more compute).
        attention_backend: how window attention is computed: ``"sdpa"`` (default,
            ``scaled_dot_product_attention``), ``"flex"`` (FlexAttention) or ``"explicit"`` (matmul and
            softmax: the same result, what fvcore counts); see
            :mod:`~qtunet_monai.networks.blocks.attention_backends`.
        variant: ``"tiny"``, ``"small"`` or ``"base"``: C = 48, 72 or 96.
        shift_size: cyclic shift of the shifted windows; default ``window_size // 2``.
        fused_attention: deprecated alias of ``attention_backend`` (True: ``"sdpa"``, False: ``"explicit"``).
    """

    def __init__(
        self,
        in_channels: int,
        spatial_dims: int = 3,
        feature_size: int | None = None,
        window_size: int = 7,
        patch_size: int = 4,
        merge_depth: bool = True,
        num_stages: int = 3,
        num_heads: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        attention_backend: AttentionBackend = "sdpa",
        variant: str | None = None,
        shift_size: int | None = None,
        fused_attention: bool | str | None = None,
    ) -> None:
        super().__init__()
        attention_backend = resolve_attention_backend(attention_backend, fused_attention)
        feature_size = _resolve_feature_size(feature_size, variant)
        shift_size = window_size // 2 if shift_size is None else shift_size
        num_heads = tuple(3 * 2**i for i in range(num_stages + 1)) if num_heads is None else tuple(num_heads)
        _check_arguments(
            in_channels, spatial_dims, feature_size, window_size, patch_size, num_stages, drop_path_rate,
            num_heads, shift_size,
        )
        self.in_channels = in_channels
        self.spatial_dims = spatial_dims
        self.feature_size = feature_size
        self.patch_size = patch_size
        self.num_stages = num_stages
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        #: set by a decoder that reads the encoder's keys/values (VT-UNet)
        self.needs_encoder_kv = False
        # MONAI's spatial order is (H, W, D): keeping depth means not merging the last axis.
        self.merge_factors = (2,) * spatial_dims if (merge_depth or spatial_dims == 2) else (2, 2, 1)
        self.widths = [feature_size * 2**i for i in range(num_stages + 1)]  # C, 2C, ..., bottleneck
        rates = torch.linspace(0, drop_path_rate, 2 * num_stages + 1).tolist()
        #: drop-path rates of each stage's sub-block pair (the decoder reuses them) and of the bottleneck
        self.stage_drop_path = [rates[2 * i : 2 * i + 2] for i in range(num_stages)]
        self.stage_options = {"window_size": window_size, "shift_size": shift_size, "spatial_dims": spatial_dims,
                              "attention_backend": attention_backend, "use_checkpoint": use_checkpoint}

        self.patch_embed = PatchEmbedding(in_channels, feature_size, patch_size, spatial_dims)
        self.encoder_stages = nn.ModuleList(
            EncoderStage(self.widths[i], num_heads[i], 2, drop_path=self.stage_drop_path[i], **self.stage_options)
            for i in range(num_stages)
        )
        self.merges = nn.ModuleList(PatchMerging(self.widths[i], self.merge_factors) for i in range(num_stages))
        self.bottleneck = EncoderStage(self.widths[-1], num_heads[-1], 1, drop_path=rates[-1:], **self.stage_options)
        self.bottleneck_norm = nn.LayerNorm(self.widths[-1])
        self.apply(init_weights)

    @property
    def width(self) -> int:
        """Channels of the bottleneck features."""
        return self.widths[-1]

    @property
    def bottleneck_stride(self) -> tuple[int, ...]:
        """Input voxels per bottleneck token along each spatial axis."""
        return tuple(self.patch_size * f**self.num_stages for f in self.merge_factors)

    def forward_features(self, x: torch.Tensor) -> EncoderFeatures:
        """Encode ``x`` ``(B, in_channels, *spatial)``: every stage's output (the decoder's skips and
        cross-attention sources), the normalised bottleneck output and, when the decoder needs them,
        the encoder's keys/values. All channels-last."""
        tokens = self.patch_embed(x)
        skips, keys_values = [], []
        for stage, merge in zip(self.encoder_stages, self.merges):
            if self.needs_encoder_kv:
                tokens, kv = stage(tokens, return_kv=True)
                keys_values.append(kv)
            else:
                tokens = stage(tokens)
            skips.append(tokens)
            tokens = merge(tokens)
        bottleneck = self.bottleneck_norm(self.bottleneck(tokens))
        return EncoderFeatures(skips, bottleneck, keys_values if self.needs_encoder_kv else None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every sub-block (and the segmentation head) in the backward pass instead of
        storing its activations: less memory, the same result, more compute."""
        for module in self.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enable

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that must not get weight decay: the relative-position bias tables
        (Swin's ``no_weight_decay_keywords``). Norms and biases are the optimiser's rule to add."""
        return {name for name, _ in self.named_parameters() if name.endswith("relative_position_bias_table")}


class QTUNetEncoder(_Encoder):
    """QT-UNet's encoder alone (no decoder is built), with QT-UNet's parameter names: what
    self-supervised pre-training trains and a task network is initialised from.

    Args: the encoder arguments of :class:`QTUNet` (see :class:`_Encoder`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-first bottleneck features ``(B, width, *spatial / bottleneck_stride)``."""
        return self.forward_features(x).bottleneck.movedim(-1, 1)


class QTUNet(_Encoder):
    """QT-UNet for 2D or 3D segmentation; input ``(B, in_channels, *spatial)``, output
    ``(B, out_channels, *spatial)`` of the same spatial size (any size: padded and cropped inside).

    Encoder (as :class:`QTUNetEncoder`): patch partition, then ``num_stages`` stages of a Swin sub-block
    pair (plain and shifted windows) at widths C, 2C, 4C, ..., each followed by patch merging; a
    bottleneck of one Swin sub-block. Decoder: per stage, deep to shallow, patch expansion, a skip
    (concatenate the same-stage encoder output, Linear 2d -> d) and a pair of decoder sub-blocks; the
    QT decoder sub-block cross-attends to the same-stage encoder output through its own key/value
    projections. Head (:class:`SegmentationHead`): LayerNorm, a x``patch_size`` expansion back to the
    input grid and a pointwise projection to the classes.

    Choices the thesis leaves open (docs/architecture.md section 1): the shift is ``window_size // 2``; the skip and
    the cross-attention read a stage's *output* (after its sub-blocks, before merging); the
    cross-attention normalises its key/value source with its own LayerNorm; with
    ``merge_depth=False`` the depth axis is MONAI's last spatial axis.

    Detail path (``detail_widths``, e.g. ``(16, 32)``; :class:`~qtunet_monai.networks.blocks.detail.DetailPath`):
    residual conv blocks on the input at full (and 1/2, ...) resolution replace the head's linear
    expansion: the last decoder stage is upsampled through them to the input grid, so thin structures
    are decided on full-resolution features (SwinUNETR's ``encoder1``/``decoder1`` role).

    Deep supervision (``deep_supervision=True``) adds an auxiliary head (LayerNorm and pointwise
    classifier) on each decoder stage but the last (with the detail path, on every decoder stage). In
    training the network then returns a list: the full-size logits first, then the auxiliary logits
    from the finest to the coarsest decoder stage, each on its stage's token grid
    (``ceil(spatial / (patch_size * 2^i))``), which is what ``monai.losses.DeepSupervisionLoss`` takes
    (it resizes the label to each). In eval mode, and while traced for export, it returns the plain logits.

    UCTransNet's channel-wise skips (``skip="cct"``; :mod:`~qtunet_monai.networks.blocks.channel_transformer`):
    a channel-wise cross fusion transformer (CCT) over all encoder skips adds, to each skip, what its
    channels gather from the channels of every scale on a common token grid; a channel-wise cross
    attention gate (CCA, ``cca``) in each decoder step scales the skip per channel from the global
    averages of the skip and the expanded decoder tokens. The gated skip feeds the concat projection
    and (``cca_for_cross_attention``) the QT cross-attention's keys/values; the VT decoder attends to the
    encoder's own keys/values, so there only the concat path changes. The CCT's last projection starts
    at zero: ``QTUNet(skip="cct", cca=False)`` loaded with a plain network's weights computes the plain
    network's output until it trains. The new parameters live under ``skip_fusion.`` and ``skip_gates.``
    only; ``skip="concat"`` builds neither.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes).
        spatial_dims: 2 or 3.
        feature_size: embedding width C; default 48, or the width of ``variant`` (48 / 72 / 96 for
            Tiny / Small / Base). Giving both with different widths is an error.
        window_size: attention window per axis.
        patch_size: patch partition edge length (4 in the thesis; 2 doubles every feature map).
        merge_depth: merge and expand all three axes (QT-UNet); False keeps the depth axis (QT-UNet-A,
            VT-UNet). Ignored in 2D.
        decoder: ``"qt"`` (QT decoder), ``"vt"`` (VT-UNet decoder) or ``"none"`` (no cross-attention,
            QT-UNet-2D-A).
        drop_path_rate: stochastic depth, linearly spaced over the encoder and bottleneck sub-blocks;
            each decoder stage uses the rates of its encoder stage. The thesis trains with 0.2.
        use_checkpoint: gradient checkpointing of every sub-block and the head (less memory, more
            compute); also :meth:`set_grad_checkpointing`.
        attention_backend: how window attention is computed: ``"sdpa"`` (default,
            ``scaled_dot_product_attention``), ``"flex"`` (FlexAttention) or ``"explicit"`` (matmul and
            softmax: the same result, what fvcore counts); see
            :mod:`~qtunet_monai.networks.blocks.attention_backends`.
        variant: ``"tiny"``, ``"small"`` or ``"base"``; sets ``feature_size``.
        num_heads: heads of each encoder stage and the bottleneck (decoder mirrors them); default 3, 6,
            12, ... doubling with the width (3-6-12-24 for the thesis' three stages).
        shift_size: cyclic shift of the shifted windows; default ``window_size // 2``.
        num_stages: encoder (and decoder) stages around the bottleneck: 3 in the thesis, 4 adds one.
        deep_supervision: auxiliary heads on the decoder stages (see above).
        detail_widths: channels of the detail path's conv levels, finest first (``(16,)``: full
            resolution; ``(16, 32)``: full and 1/2); empty (default): no detail path, the thesis' head.
        skip: a key of :data:`~qtunet_monai.networks.blocks.skips.SKIPS`: ``"concat"`` (the thesis' skips)
            or ``"cct"`` (UCTransNet's CCT on the skips). The ``cct_*`` arguments apply only with ``"cct"``
            and must be left unset otherwise.
        cct_preset: ``"full"`` (default; UCTransNet: 4 layers, 4 heads, convolutional embedding, MLP
            ratio 4) or ``"lite"`` (1 layer, 1 head, average-pooled embedding).
        cct_layers: CCT layers, overriding the preset's.
        cct_heads: channel-attention heads (each of full width), overriding the preset's.
        cct_embedding: ``"conv"`` (kernel = stride = patch, ``prod(patch) C_i^2`` weights per scale) or
            ``"pool"`` (average pooling and ``Linear(C_i, C_i)``), overriding the preset's.
        cct_grid: the common token grid: ``"bottleneck"`` (default, UCTransNet's rule) or
            ``"deepest_skip"`` (8x the tokens in 3D; for small ROIs).
        cct_position: position information on the grid: ``"conv"`` (default; a zero-initialised
            depthwise convolution), ``"sine"`` (fixed sinusoidal) or ``"none"``.
        cca: the CCA gate in each decoder step; default: the skip kind's (on with ``skip="cct"``, off with ``"concat"``)
            (``cca=True`` with ``"concat"`` is UCTransNet's gate-only ablation).
        cca_for_cross_attention: the QT cross-attention reads the gated skip (default); False: the
            skip before the gate (the CCT's output with ``"cct"``). Only with ``cca``.
        router: None (dense, default), ``"light"`` or ``"iterative"``: conditional sub-blocks (CoLT5, seed
            003; :mod:`~qtunet_monai.networks.blocks.conditional`): a light attention / MLP over all tokens
            plus the block's own attention / MLP (same names, so dense weights load: "upcycling") over the
            tokens the router picks per window (attention) and per volume or window (MLP). The light
            outputs start at zero, so at capacity 1 a conditional network computes its dense weights'
            network. The ``router_*`` arguments and ``capacity`` apply only with a router. ``decoder="vt"``
            refuses one.
        capacity: routed fraction (default 0.25), or ``{"q": .., "kv": .., "ff": ..}``; changeable after
            training by :meth:`set_capacity`.
        router_sites: parts made conditional, default ``("encoder", "bottleneck", "decoder")`` (self-attention
            and MLP of each); ``"encoder.attn"``, ``"decoder.mlp"``, ... name one sub-layer, and
            ``"decoder.cross"`` routes the QT cross-attention too (dense unless named).
        router_weighting: ``"st"`` (straight-through, default), ``"soft"`` or ``"softmax"`` (the seed's).
        router_options: ``ff_group``, ``light_heads_ratio``, ``light_mlp_ratio``, ``null_kv`` and the iterative
            router's ``n_iters``, ``eps``, ``eps_init``, ``eps_decay``, ``fetch_k_ratio``
            (see :func:`~qtunet_monai.networks.blocks.conditional.resolve_routing`).
        fused_attention: deprecated alias of ``attention_backend`` (True: ``"sdpa"``, False: ``"explicit"``),
            with a FutureWarning.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        feature_size: int | None = None,
        window_size: int = 7,
        patch_size: int = 4,
        merge_depth: bool = True,
        decoder: str = "qt",
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        attention_backend: AttentionBackend = "sdpa",
        variant: str | None = None,
        num_heads: Sequence[int] | None = None,
        shift_size: int | None = None,
        num_stages: int = 3,
        deep_supervision: bool = False,
        detail_widths: Sequence[int] = (),
        skip: str = "concat",
        cct_preset: str | None = None,
        cct_layers: int | None = None,
        cct_heads: int | None = None,
        cct_embedding: str | None = None,
        cct_grid: str | None = None,
        cct_position: str | None = None,
        cca: bool | None = None,
        cca_for_cross_attention: bool = True,
        router: str | None = None,
        capacity: float | dict | None = None,
        router_sites: Sequence[str] | str | None = None,
        router_weighting: str | None = None,
        router_options: dict | None = None,
        fused_attention: bool | str | None = None,
    ) -> None:
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive integer, got {out_channels!r}.")
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)}.")
        skip_options = resolve_skip(skip, {"cct_preset": cct_preset, "cct_layers": cct_layers, "cct_heads": cct_heads,
                                           "cct_embedding": cct_embedding, "cct_grid": cct_grid,
                                           "cct_position": cct_position})
        routing = resolve_routing(router, capacity, router_sites, router_weighting, router_options, decoder)
        super().__init__(
            in_channels, spatial_dims, feature_size, window_size, patch_size, merge_depth, num_stages, num_heads,
            drop_path_rate, use_checkpoint, attention_backend, variant, shift_size, fused_attention,
        )
        self.out_channels = out_channels
        self.decoder_type = decoder
        self.needs_encoder_kv = DECODERS[decoder].needs_encoder_kv
        self.deep_supervision = deep_supervision
        widths, levels = self.widths, list(reversed(range(num_stages)))  # decoder lists run deep to shallow
        self.expansions = nn.ModuleList(PatchExpanding(widths[i + 1], self.merge_factors, widths[i]) for i in levels)
        self.skip_projections = nn.ModuleList(nn.Linear(2 * widths[i], widths[i], bias=False) for i in levels)
        self.decoder_stages = nn.ModuleList(
            DecoderStage(
                widths[i], self.num_heads[i], 2, drop_path=self.stage_drop_path[i], decoder=decoder,
                **self.stage_options,
            )
            for i in levels
        )
        self.detail_widths = tuple(detail_widths)
        if self.detail_widths:
            self.detail_path = DetailPath(in_channels, widths[0], out_channels, spatial_dims, patch_size,
                                          self.detail_widths, use_checkpoint=use_checkpoint)
        else:
            self.head = SegmentationHead(widths[0], out_channels, spatial_dims, patch_size, use_checkpoint)
        # auxiliary heads, finest first: on every decoder stage but the one feeding the head (from 2C), or on
        # every stage (from C) when the detail path takes the output to full resolution; none without deep supervision
        first_aux = 0 if self.detail_widths else 1
        self.aux_heads = nn.ModuleList(
            SegmentationHead(widths[i], out_channels, spatial_dims) for i in range(first_aux, num_stages)
            if deep_supervision
        )
        output = self.detail_path if self.detail_widths else self.head
        for part in (self.expansions, self.skip_projections, self.decoder_stages, output, self.aux_heads):
            part.apply(init_weights)  # the encoder's parts were initialised by _Encoder
        # UCTransNet's skips, built last and under new names: the plain network's parameters, their names and
        # their random initialisation stay those of skip="concat", and its state dict loads with only these missing
        self.skip_type = skip
        self.skip_options = skip_options  # the kind's resolved options (the CCT's for "cct")
        self.cca = SKIPS[skip].gated if cca is None else bool(cca)
        self.cca_for_cross_attention = bool(cca_for_cross_attention)
        geometry = SkipGeometry(tuple(widths[:num_stages]), tuple(self.merge_factors), spatial_dims, use_checkpoint)
        self.skip_fusion: nn.Module | None = build_skip(skip, geometry, skip_options)  # None: skips unchanged
        self.skip_gates: nn.ModuleList | None = None
        if self.cca:
            self.skip_gates = nn.ModuleList(ChannelGate(widths[i]) for i in levels)  # deep to shallow
        # conditional blocks, attached last: the dense parameters keep their names and initialisation
        self.router_type = router
        self.routing = routing
        if routing is not None:
            attach_routers({
                "encoder": [block for stage in self.encoder_stages for block in stage.blocks],
                "bottleneck": list(self.bottleneck.blocks),
                "decoder": [block for stage in self.decoder_stages for block in stage.blocks],
            }, routing)

    def set_capacity(self, capacity: float | dict) -> None:
        """Set the routed fraction of every conditional sub-block (e.g. at inference; CoLT5's
        ``num_heavy_tokens``): a fraction in [0, 1] or a dict of some of ``"q"``, ``"kv"``, ``"ff"``."""
        if self.routing is None:
            raise ValueError("set_capacity needs a conditional network (QTUNet(router='light' or 'iterative')).")
        _set_capacity(self, capacity)

    def forward_decoder(self, features: EncoderFeatures) -> list[torch.Tensor]:
        """The output tokens of every decoder stage, deep to shallow (the last one feeds the head)."""
        tokens, outputs = features.bottleneck, []
        skips = features.skips if self.skip_fusion is None else self.skip_fusion(features.skips)
        for step, (level, expand, project, stage) in enumerate(zip(
            reversed(range(self.num_stages)), self.expansions, self.skip_projections, self.decoder_stages
        )):
            skip = skips[level]
            tokens = expand(tokens, skip.shape[1:-1])
            context = skip  # what the QT cross-attention reads
            if self.skip_gates is not None:
                skip = self.skip_gates[step](skip, tokens)
                context = skip if self.cca_for_cross_attention else context
            tokens = project(torch.cat([tokens, skip], dim=-1))
            tokens = stage(tokens, context, features.keys_values[level] if features.keys_values is not None else None)
            outputs.append(tokens)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        features = self.forward_features(x)  # encoder stages, then the bottleneck
        decoded = self.forward_decoder(features)
        logits = self.forward_head(x, decoded[-1])
        if not self._returns_deep_supervision():
            return logits
        # finest first, as DeepSupervisionLoss weights them 1, 1/2, 1/4, ...
        supervised = reversed(decoded if self.detail_widths else decoded[:-1])
        return [logits] + [head(tokens) for head, tokens in zip(self.aux_heads, supervised)]

    def forward_head(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Logits on the input grid from the last decoder stage's ``tokens``: through the detail path (which
        reads the input ``x``) when there is one, otherwise the head's expansion to ``x``'s spatial size."""
        if self.detail_widths:
            return self.detail_path(x, tokens)
        return self.head(tokens, x.shape[2:])

    def _returns_deep_supervision(self) -> bool:
        exporting = torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_exporting()
        return self.deep_supervision and self.training and not exporting

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            axes = "H, W" if self.spatial_dims == 2 else "H, W, D"
            raise ValueError(
                f"QTUNet(spatial_dims={self.spatial_dims}) expects input of shape (batch, channels, {axes}), "
                f"got a {x.ndim}-d tensor of shape {tuple(x.shape)}."
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"QTUNet was built for {self.in_channels} input channel(s) but the input has {x.shape[1]} "
                f"(shape {tuple(x.shape)})."
            )


def _resolve_feature_size(feature_size: int | None, variant: str | None) -> int:
    if variant is None:
        return 48 if feature_size is None else feature_size
    key = str(variant).lower()
    key = {"t": "tiny", "s": "small", "b": "base"}.get(key, key)
    if key not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    if feature_size is not None and feature_size != VARIANTS[key]:
        raise ValueError(
            f"variant={variant!r} means feature_size={VARIANTS[key]}, but feature_size={feature_size} was given; "
            "give one of them."
        )
    return VARIANTS[key]


def _check_arguments(
    in_channels, spatial_dims, feature_size, window_size, patch_size, num_stages, drop_path_rate, num_heads,
    shift_size,
) -> None:
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive integer, got {window_size!r}.")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size!r}.")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer (3 in the thesis), got {num_stages!r}.")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
    if len(num_heads) != num_stages + 1:
        raise ValueError(
            f"num_heads needs {num_stages + 1} entries ({num_stages} stages and the bottleneck), got {num_heads!r}."
        )
    if not isinstance(feature_size, int) or feature_size < 1:
        raise ValueError(f"feature_size must be a positive integer, got {feature_size!r}.")
    for stage, heads in enumerate(num_heads):
        width = feature_size * 2**stage
        if width % heads:
            raise ValueError(
                f"feature_size={feature_size} cannot work: stage {stage + 1} has width {width}, "
                f"which {heads} attention heads do not divide (feature_size must be a multiple of 3 "
                "with the default heads 3, 6, 12, ...)."
            )


def build_architecture(name: str, in_channels: int, out_channels: int, variant: str = "tiny", **kwargs) -> QTUNet:
    """Build one of the thesis' :data:`ARCHITECTURES` (e.g. ``"VT-UNet"``) in a variant.

    Args:
        name: a key of :data:`ARCHITECTURES` (case-insensitive).
        in_channels: input channels.
        out_channels: classes.
        variant: ``"tiny"``, ``"small"`` or ``"base"``.
        kwargs: further :class:`QTUNet` arguments.
    """
    by_lower = {k.lower(): v for k, v in ARCHITECTURES.items()}
    if name.lower() not in by_lower:
        raise ValueError(f"unknown architecture {name!r}; choose one of {list(ARCHITECTURES)}.")
    return QTUNet(in_channels, out_channels, variant=variant, **{**by_lower[name.lower()], **kwargs})
