# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""QT-UNet: an all-Swin-Transformer U-Net whose decoder queries the same-stage encoder features
through its own windowed cross-attention (see SPEC.md section 1 and the thesis, chapter 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..blocks.patching import PatchEmbedding, PatchExpanding, PatchMerging
from ..blocks.transformer import DECODERS, DecoderStage, EncoderStage, maybe_checkpoint

__all__ = ["QTUNet", "VARIANTS", "ARCHITECTURES", "build_architecture"]

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
}

_STAGES = 3  # encoder stages before the bottleneck


class QTUNet(nn.Module):
    """QT-UNet for 2D or 3D segmentation; input ``(B, in_channels, *spatial)``, output
    ``(B, out_channels, *spatial)`` of the same spatial size (any size: padded and cropped inside).

    Encoder: patch partition, then three stages of a Swin sub-block pair (plain and shifted windows)
    at widths C, 2C, 4C, each followed by patch merging; a bottleneck of one Swin sub-block at 8C.
    Decoder: patch expansion, a skip (concatenate the same-stage encoder output, Linear 2d -> d) and a
    pair of decoder sub-blocks per stage; the QT decoder sub-block cross-attends to the same-stage
    encoder output through its own key/value projections. Classifier: LayerNorm, a x``patch_size``
    expansion back to the input grid and a pointwise projection to the classes.

    Choices the thesis leaves open (SPEC.md section 1): the shift is ``window_size // 2``; the skip and
    the cross-attention read a stage's *output* (after its sub-blocks, before merging); the
    cross-attention normalises its key/value source with its own LayerNorm; with
    ``merge_depth=False`` the depth axis is MONAI's last spatial axis.

    Args:
        in_channels: input channels.
        out_channels: output channels (classes).
        spatial_dims: 2 or 3.
        feature_size: embedding width C (48 / 72 / 96 for Tiny / Small / Base).
        window_size: attention window per axis.
        patch_size: patch partition edge length.
        merge_depth: merge and expand all three axes (QT-UNet); False keeps the depth axis (QT-UNet-A,
            VT-UNet). Ignored in 2D.
        decoder: ``"qt"`` (QT decoder), ``"vt"`` (VT-UNet decoder) or ``"none"`` (no cross-attention,
            QT-UNet-2D-A).
        drop_path_rate: stochastic depth, linearly spaced over the encoder and bottleneck sub-blocks;
            each decoder stage uses the rates of its encoder stage. The thesis trains with 0.2.
        use_checkpoint: gradient checkpointing of every sub-block (less memory, more compute).
        fused_attention: attention through ``scaled_dot_product_attention``; False computes it with
            explicit matmul and softmax (same result; what fvcore can count).
        variant: ``"tiny"``, ``"small"`` or ``"base"``; sets ``feature_size``.
        num_heads: heads of the three encoder stages and the bottleneck (decoder mirrors them).
        shift_size: cyclic shift of the shifted windows; default ``window_size // 2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 3,
        feature_size: int = 48,
        window_size: int = 7,
        patch_size: int = 4,
        merge_depth: bool = True,
        decoder: str = "qt",
        drop_path_rate: float = 0.0,
        use_checkpoint: bool = False,
        fused_attention: bool = True,
        variant: str | None = None,
        num_heads: Sequence[int] = (3, 6, 12, 24),
        shift_size: int | None = None,
    ) -> None:
        super().__init__()
        feature_size = _resolve_feature_size(feature_size, variant)
        shift_size = window_size // 2 if shift_size is None else shift_size
        _check_arguments(
            in_channels, out_channels, spatial_dims, feature_size, window_size, patch_size, decoder,
            drop_path_rate, num_heads, shift_size,
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        self.feature_size = feature_size
        self.decoder_type = decoder
        self.use_checkpoint = use_checkpoint
        # MONAI's spatial order is (H, W, D): keeping depth means not merging the last axis.
        factors = (2,) * spatial_dims if (merge_depth or spatial_dims == 2) else (2, 2, 1)
        widths = [feature_size * 2**i for i in range(_STAGES + 1)]  # C, 2C, 4C, 8C
        rates = torch.linspace(0, drop_path_rate, 2 * _STAGES + 1).tolist()
        stage_rates = [rates[2 * i : 2 * i + 2] for i in range(_STAGES)]
        common = {"window_size": window_size, "shift_size": shift_size, "spatial_dims": spatial_dims}
        common.update(fused_attention=fused_attention, use_checkpoint=use_checkpoint)

        self.patch_embed = PatchEmbedding(in_channels, feature_size, patch_size, spatial_dims)
        self.encoder_stages = nn.ModuleList(
            EncoderStage(widths[i], num_heads[i], 2, drop_path=stage_rates[i], **common) for i in range(_STAGES)
        )
        self.merges = nn.ModuleList(PatchMerging(widths[i], factors) for i in range(_STAGES))
        self.bottleneck = EncoderStage(widths[-1], num_heads[-1], 1, drop_path=rates[-1:], **common)
        self.bottleneck_norm = nn.LayerNorm(widths[-1])
        # decoder lists run deep to shallow: index 0 is the 4C stage
        self.expansions = nn.ModuleList(
            PatchExpanding(widths[i + 1], factors, widths[i]) for i in reversed(range(_STAGES))
        )
        self.skip_projections = nn.ModuleList(
            nn.Linear(2 * widths[i], widths[i], bias=False) for i in reversed(range(_STAGES))
        )
        self.decoder_stages = nn.ModuleList(
            DecoderStage(widths[i], num_heads[i], 2, drop_path=stage_rates[i], decoder=decoder, **common)
            for i in reversed(range(_STAGES))
        )
        self.head_norm = nn.LayerNorm(feature_size)
        self.head_expand = PatchExpanding(feature_size, (patch_size,) * spatial_dims, feature_size)
        self.classifier = nn.Linear(feature_size, out_channels, bias=False)  # the pointwise (1x1x1) conv
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        tokens = self.patch_embed(x)
        skips, encoder_kvs = [], []
        for stage, merge in zip(self.encoder_stages, self.merges):
            if self.decoder_type == "vt":
                tokens, kv = stage(tokens, return_kv=True)
                encoder_kvs.append(kv)
            else:
                tokens = stage(tokens)
            skips.append(tokens)
            tokens = merge(tokens)
        tokens = self.bottleneck_norm(self.bottleneck(tokens))

        for i, (expand, project, stage) in enumerate(zip(self.expansions, self.skip_projections, self.decoder_stages)):
            level = _STAGES - 1 - i
            skip = skips[level]
            tokens = expand(tokens, skip.shape[1:-1])
            tokens = project(torch.cat([tokens, skip], dim=-1))
            tokens = stage(tokens, skip, encoder_kvs[level] if encoder_kvs else None)

        # the x4 expansion holds the network's largest activations: recompute it too when checkpointing
        logits = maybe_checkpoint(
            self.head_expand, self.use_checkpoint, self.head_norm(tokens), x.shape[2:], self.classifier
        )
        return logits.movedim(-1, 1)

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


def _init_weights(module: nn.Module) -> None:
    """Swin's initialisation, in one place: truncated normal (std 0.02) for linear layers and
    relative-position bias tables, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    if hasattr(module, "relative_position_bias_table"):
        nn.init.trunc_normal_(module.relative_position_bias_table, std=0.02)


def _resolve_feature_size(feature_size: int, variant: str | None) -> int:
    if variant is None:
        return feature_size
    key = str(variant).lower()
    key = {"t": "tiny", "s": "small", "b": "base"}.get(key, key)
    if key not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}.")
    if feature_size not in (48, VARIANTS[key]):  # 48 is the default, i.e. not given
        raise ValueError(f"variant={variant!r} means feature_size={VARIANTS[key]}, but feature_size={feature_size}.")
    return VARIANTS[key]


def _check_arguments(
    in_channels, out_channels, spatial_dims, feature_size, window_size, patch_size, decoder,
    drop_path_rate, num_heads, shift_size,
) -> None:
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {list(DECODERS)}.")
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be a positive integer, got {window_size!r}.")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size!r}.")
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
    if len(num_heads) != _STAGES + 1:
        raise ValueError(f"num_heads needs {_STAGES + 1} entries (3 stages and the bottleneck), got {num_heads!r}.")
    if not isinstance(feature_size, int) or feature_size < 1:
        raise ValueError(f"feature_size must be a positive integer, got {feature_size!r}.")
    for stage, heads in enumerate(num_heads):
        width = feature_size * 2**stage
        if width % heads:
            raise ValueError(
                f"feature_size={feature_size} cannot work: stage {stage + 1} has width {width}, "
                f"which {heads} attention heads do not divide (feature_size must be a multiple of 3 "
                "with the default heads 3-6-12-24)."
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
