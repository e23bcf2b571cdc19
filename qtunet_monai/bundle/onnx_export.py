# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""ONNX export of a bundle's network (``torch.onnx.export`` with ``dynamo=True``), checked against
PyTorch with onnxruntime. Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime).

Spatial size: networks without size-dependent Python logic (the CNN baselines) are exported with a
dynamic spatial size. QT-UNet is not: its window attention computes the padding, the cyclic-shift
mask and the cut into windows in Python from the feature map's integer size (and
shrinks the window on maps smaller than it), so ``torch.export`` specialises all of them to the
example size and the graph is only valid there (with the earlier gather-index cut, onnxruntime failed with out-of-range
gather indices). QT-UNet (and the padded baselines, whose padding is size-dependent too) is therefore
exported at one fixed size, the ROI: the bundles' sliding-window inferer only ever feeds ROI-sized
patches, so that model serves images of any size through the same sliding window.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..networks import use_attention_backend
from .checkpoints import read_checkpoint

__all__ = ["check_onnx", "export_onnx", "supports_dynamic_spatial_size"]


def supports_dynamic_spatial_size(network: nn.Module) -> bool:
    """False for networks whose graph depends on the input's size through Python integers (QT-UNet's
    window geometry, :class:`DivisiblePadNet`'s padding); see the module docstring."""
    from ..networks import QTUNet
    from .architectures import DivisiblePadNet

    for module in network.modules():
        if isinstance(module, QTUNet):
            return False
        if isinstance(module, DivisiblePadNet) and module.k > 1:
            return False
    return True


def _clear_window_cache() -> None:
    from ..networks.blocks.windows import _cached_geometry

    _cached_geometry.cache_clear()


def check_onnx(onnx_file: str, network: nn.Module, shapes: Sequence[Sequence[int]], seed: int = 0) -> dict[str, float]:
    """Largest absolute difference between onnxruntime's and PyTorch's output at each input shape."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    generator = torch.Generator().manual_seed(seed)
    network = network.eval()
    diffs = {}
    for shape in shapes:
        x = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = network(x).as_subclass(torch.Tensor).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != expected.shape:
            raise AssertionError(f"{onnx_file}: output shape {got.shape} at input {tuple(shape)}, PyTorch gives "
                                 f"{expected.shape}.")
        diffs["x".join(map(str, shape))] = float(np.abs(got - expected).max())
    return diffs


def export_onnx(
    network: nn.Module,
    filepath: str,
    input_shape: Sequence[int],
    ckpt_file: str | None = None,
    dynamic: bool | None = None,
    check_shapes: Sequence[Sequence[int]] = (),
    atol: float = 1e-4,
) -> dict:
    """Export ``network`` to ONNX and check it against PyTorch with onnxruntime.

    Args:
        network: the network (e.g. the bundle's ``network_def``).
        filepath: the ``.onnx`` file to write; a ``.json`` report is written beside it.
        input_shape: the example input ``(batch, channels, *spatial)``, e.g. ``[1, 1, 56, 56, 56]``.
        ckpt_file: a state dict to load first (``models/model.pt``), or None.
        dynamic: export with a dynamic spatial size; None: whenever the network supports it
            (:func:`supports_dynamic_spatial_size`). True for a network that does not is refused.
        check_shapes: further input shapes to compare at (dynamic export only; the example shape is
            always compared).
        atol: the largest absolute difference accepted.

    Returns the report: file, whether dynamic, and the largest difference per checked shape.

    Raises:
        ValueError: a dynamic export asked of a network that cannot have one, or further check shapes
            for a fixed-size export.
        AssertionError: onnxruntime disagrees with PyTorch by more than ``atol``.
    """
    if ckpt_file:
        network.load_state_dict(read_checkpoint(ckpt_file))
    network = network.cpu().eval()
    supported = supports_dynamic_spatial_size(network)
    if dynamic is None:
        dynamic = supported
    if dynamic and not supported:
        raise ValueError(f"{type(network).__name__} cannot be exported with a dynamic spatial size (its window "
                         "geometry or padding is computed from Python integers); export it at the ROI size.")
    if check_shapes and not dynamic:
        raise ValueError("a fixed-size ONNX model only takes its example shape; export one per size instead.")
    example = torch.randn(*input_shape)
    spatial = {axis: torch.export.Dim.DYNAMIC for axis in range(2, len(input_shape))}
    # explicit attention whatever the network's backend: the exporter's decomposition of
    # scaled_dot_product_attention yields strides its own ``view`` then rejects, and flex does not export
    with use_attention_backend(network, "explicit"), torch.no_grad():
        _clear_window_cache()
        network(example)  # QT-UNet: window geometry cached as real tensors, which the export keeps as constants
        program = torch.onnx.export(network, (example,), dynamo=True, input_names=["image"], output_names=["pred"],
                                    dynamic_shapes=({0: torch.export.Dim.DYNAMIC, **spatial},) if dynamic else None,
                                    verbose=False)
    _clear_window_cache()  # the export's fake tensors must not stay in the cache
    path = Path(filepath)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    diffs = check_onnx(str(path), network, [list(input_shape), *map(list, check_shapes)])
    report = {"onnx_file": str(path), "dynamic_spatial_size": dynamic, "max_abs_difference": diffs, "atol": atol}
    path.with_suffix(".json").write_text(json.dumps(report, indent=1))
    worst = max(diffs.values())
    if not worst <= atol:
        raise AssertionError(f"{path}: onnxruntime differs from PyTorch by {worst:.3g} > {atol} ({diffs}).")
    return report
