# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""``torch.compile`` with default arguments against eager on a 3D QT-UNet, over a sequence of input sizes.

    python benchmarks/compile_check.py                                   # small 3D net, CPU, default arguments
    python benchmarks/compile_check.py --dynamic False                   # as the bundles' --compile True
    python benchmarks/compile_check.py --device cuda --variant tiny --sizes 128x128x128,96x96x96,128x128x128

For every size: forward and backward eager and compiled, the largest output and gradient differences,
the compiled graphs so far (one per new size, none for a size seen before), graph breaks and the
wall time of the compiled call (compilation included on a new size). The test suite runs the same
check in 2D with the ``aot_eager`` backend (``tests/networks/test_compile.py``); inductor's code generation for the 3D
graph takes minutes on a CPU. With default arguments (``dynamic=None``) the second size is traced with
symbolic sizes, which is correct but much slower to compile; ``--dynamic False`` compiles each size
statically.
"""

from __future__ import annotations

import json
import time

import fire
import torch
from torch._dynamo.utils import counters

from qtunet_monai.networks import QTUNet


def main(sizes: str = "20x24x16,24x12x28,20x24x16", variant: str | None = None, device: str = "cpu",
         decoder: str = "qt", dynamic: bool | None = None) -> list[dict]:
    """Compare compiled and eager at each size of ``sizes`` (comma-separated, ``HxWxD``).

    Without ``variant`` a small network (feature size 6, window 3) keeps the CPU compilation short.
    """
    torch.manual_seed(0)
    dev = torch.device(device)
    if variant:
        net = QTUNet(1, 3, variant=variant, decoder=decoder)
    else:
        net = QTUNet(1, 2, feature_size=6, window_size=3, num_heads=(1, 2, 2, 2), decoder=decoder)
    net = net.to(dev)
    compiled = torch.compile(net, dynamic=dynamic)
    counters.clear()
    rows = []
    for size in sizes.split(","):
        shape = tuple(int(s) for s in size.split("x"))
        x = torch.randn(1, 1, *shape, device=dev)
        expected = net(x)
        expected_grads = torch.autograd.grad(expected.square().mean(), list(net.parameters()))
        start = time.perf_counter()
        out = compiled(x)
        grads = torch.autograd.grad(out.square().mean(), list(net.parameters()))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rows.append({
            "size": list(shape),
            "compiled_call_s": round(time.perf_counter() - start, 1),
            "max_output_difference": (out - expected).abs().max().item(),
            "max_gradient_difference": max((g - e).abs().max().item() for g, e in zip(grads, expected_grads)),
            "graphs_so_far": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    fire.Fire(main)
