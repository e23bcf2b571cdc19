# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Parameters and FLOPs counted the way the thesis counted them, and the thesis' target table.

FLOPs are fvcore's: one multiply-accumulate is one FLOP; softmax, GELU, roll and element-wise ops
are not counted; one forward pass of batch 1 in training mode with explicit (countable) attention.
fvcore is an optional dependency (``pip install qtunet_monai[flops]``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..networks import ARCHITECTURES, QTUNet, build_architecture, use_attention_backend

__all__ = ["ComplexityTarget", "THESIS_TARGETS", "OPTION_ROWS", "count_parameters", "count_flops", "complexity_table",
           "option_table"]


@dataclass(frozen=True)
class ComplexityTarget:
    """One row of the target table of docs/architecture.md section 1: an architecture on a task's input."""

    architecture: str
    task: str
    in_channels: int
    out_channels: int
    roi: int
    params_m: tuple[float, float, float]  # Tiny, Small, Base
    gflops: tuple[float, float, float]

    @property
    def spatial_dims(self) -> int:
        return ARCHITECTURES[self.architecture]["spatial_dims"]


# 6.65 M stands for QT-UNet-T's printed 6.4 M (a misprint, docs/architecture.md section 1).
THESIS_TARGETS: tuple[ComplexityTarget, ...] = (
    ComplexityTarget("QT-UNet", "BraTS", 4, 3, 128, (6.65, 14.5, 25.5), (32.5, 61.3, 98.5)),
    ComplexityTarget("QT-UNet", "BTCV", 1, 14, 96, (6.65, 14.5, 25.5), (12.7, 23.6, 37.7)),
    ComplexityTarget("QT-UNet-A", "BraTS", 4, 3, 128, (5.9, 12.8, 22.4), (47.7, 91.2, 147.8)),
    ComplexityTarget("VT-UNet", "BraTS", 4, 3, 128, (5.4, 11.8, 20.8), (52.0, 100.8, 165.0)),
    ComplexityTarget("VT-UNet-A", "BraTS", 4, 3, 128, (6.2, 13.5, 23.9), (35.0, 67.0, 108.7)),
    ComplexityTarget("QT-UNet-2D", "CityScapes", 3, 20, 1024, (5.4, 12.2, 21.6), (38.8, 83.3, 144.6)),
    ComplexityTarget("QT-UNet-2D-A", "CityScapes", 3, 20, 1024, (5.0, 11.3, 20.1), (33.6, 72.5, 126.3)),
)

VARIANT_ORDER = ("tiny", "small", "base")

#: the network options beyond the thesis on the thesis' inputs: (label, architecture, in, out, roi, QTUNet arguments)
OPTION_ROWS: tuple[tuple[str, str, int, int, int, dict], ...] = (
    ("detail path 16-32", "QT-UNet", 4, 3, 128, {"detail_widths": (16, 32)}),
    ("detail path 12-24", "QT-UNet", 4, 3, 128, {"detail_widths": (12, 24)}),
    ("CCT full", "QT-UNet", 4, 3, 128, {"skip": "cct", "cct_preset": "full"}),
    ("CCT lite", "QT-UNet", 4, 3, 128, {"skip": "cct", "cct_preset": "lite"}),
    ("CCT full", "QT-UNet-2D", 3, 20, 1024, {"skip": "cct", "cct_preset": "full"}),
    ("CCT lite", "QT-UNet-2D", 3, 20, 1024, {"skip": "cct", "cct_preset": "lite"}),
    # conditional light/heavy blocks: FLOPs of the routed share, the routers' top-k and gathers uncounted
    ("light router, capacity 0.25", "QT-UNet", 4, 3, 128, {"router": "light", "capacity": 0.25}),
    ("light router, capacity 0.5", "QT-UNet", 4, 3, 128, {"router": "light", "capacity": 0.5}),
    ("light router, capacity 0.25", "QT-UNet-2D", 3, 20, 1024, {"router": "light", "capacity": 0.25}),
    ("light router, capacity 0.5", "QT-UNet-2D", 3, 20, 1024, {"router": "light", "capacity": 0.5}),
)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _matmul_flops(inputs: list, outputs: list) -> int:
    """fvcore's count of ``aten::matmul``, also where an operand is a vector (a router's scores ``x . u``),
    which fvcore's own handle refuses: the output's elements times the contracted length."""
    from fvcore.nn.jit_handles import get_shape, matmul_flop_jit

    a, b = (get_shape(v) for v in inputs[:2])
    if len(a) >= 2 and len(b) >= 2:
        return matmul_flop_jit(inputs, outputs)
    return math.prod(get_shape(outputs[0])) * a[-1]


def count_flops(model: QTUNet, input_shape: Sequence[int], training: bool = True) -> int:
    """fvcore FLOPs of one forward pass on a zero tensor of ``input_shape`` (batch included).

    The model's attention is switched to the explicit matmul path for counting (fused kernels are
    invisible to fvcore) and restored afterwards; no gradients are computed.
    """
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("FLOP counting needs fvcore: pip install 'qtunet_monai[flops]'") from e

    was_training = model.training
    try:
        model.train(training)
        x = torch.zeros(*input_shape, device=next(model.parameters()).device)
        with use_attention_backend(model, "explicit"), torch.no_grad():
            analysis = FlopCountAnalysis(model, x).set_op_handle("aten::matmul", _matmul_flops)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            return int(analysis.total())
    finally:
        model.train(was_training)


def complexity_table(
    variants: Sequence[str] = VARIANT_ORDER,
    flops: bool = True,
    targets: Sequence[ComplexityTarget] = THESIS_TARGETS,
) -> list[dict]:
    """Measure every target row: parameters (M) and, with ``flops``, GFLOPs, each next to the thesis.

    Returns a list of dicts with keys ``architecture, task, input, variant, params_m,
    target_params_m, gflops, target_gflops``.
    """
    rows = []
    for target in targets:
        for variant in variants:
            index = VARIANT_ORDER.index(variant)
            model = build_architecture(target.architecture, target.in_channels, target.out_channels, variant)
            shape = (1, target.in_channels) + (target.roi,) * target.spatial_dims
            row = {
                "architecture": target.architecture,
                "task": target.task,
                "input": f"{target.in_channels} x {target.roi}^{target.spatial_dims} -> {target.out_channels}",
                "variant": variant,
                "params_m": count_parameters(model) / 1e6,
                "target_params_m": target.params_m[index],
                "gflops": count_flops(model, shape) / 1e9 if flops else None,
                "target_gflops": target.gflops[index],
            }
            rows.append(row)
            del model
    return rows


def option_table(variants: Sequence[str] = ("tiny", "base"), flops: bool = True,
                 rows: Sequence[tuple] = OPTION_ROWS) -> list[dict]:
    """Parameters and GFLOPs of the options beyond the thesis (:data:`OPTION_ROWS`), each next to the plain
    network of the same variant on the same input (no thesis figure exists for them)."""
    def counted(architecture, in_channels, out_channels, shape, variant, **kwargs) -> tuple[float, float | None]:
        model = build_architecture(architecture, in_channels, out_channels, variant, **kwargs)
        return count_parameters(model) / 1e6, count_flops(model, shape) / 1e9 if flops else None

    measured, plain = [], {}
    for label, architecture, in_channels, out_channels, roi, options in rows:
        for variant in variants:
            spatial_dims = ARCHITECTURES[architecture]["spatial_dims"]
            shape = (1, in_channels) + (roi,) * spatial_dims
            key = (architecture, in_channels, out_channels, roi, variant)
            if key not in plain:
                plain[key] = counted(architecture, in_channels, out_channels, shape, variant)
            params, gflops = counted(architecture, in_channels, out_channels, shape, variant, **options)
            measured.append({"option": label, "architecture": architecture, "variant": variant,
                             "input": f"{in_channels} x {roi}^{spatial_dims} -> {out_channels}",
                             "params_m": params, "plain_params_m": plain[key][0],
                             "gflops": gflops, "plain_gflops": plain[key][1]})
    return measured
