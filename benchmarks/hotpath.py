# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Time QT-UNet's hot path (inference and a training step) for before/after comparisons.

It imports whichever ``qtunet_monai`` is first on ``PYTHONPATH``, so one copy of this script
measures any commit:

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before python benchmarks/hotpath.py --label before
    PYTHONPATH=. python benchmarks/hotpath.py --label after

Prints one JSON line: median seconds of inference and of a training step (forward, backward, Adam)
and, on CPU, the peak RSS increase of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import qtunet_monai
    from qtunet_monai import QTUNet

    device = torch.device(args.device)
    baseline = _status_mb("VmRSS")
    torch.manual_seed(0)
    net = QTUNet(4, 3, variant=args.variant).to(device)
    x = torch.randn(1, 4, *(args.roi,) * 3, device=device)
    target = torch.rand(1, 3, *(args.roi,) * 3, device=device)
    optimizer = torch.optim.Adam(net.parameters(), 1e-4)

    def infer():
        net.eval()
        with torch.inference_mode():
            net(x)

    def train():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), target).backward()
        optimizer.step()

    timings = {"infer": [], "train": []}
    for fn in (infer, train):  # warm-up: caches, allocator, optimiser state
        fn()
    for _ in range(args.repeats):
        for name, fn in (("infer", infer), ("train", train)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[name].append(time.perf_counter() - start)
    result = {
        "label": args.label,
        "source": os.path.dirname(qtunet_monai.__file__),
        "variant": args.variant,
        "roi": args.roi,
        "infer_s": round(statistics.median(timings["infer"]), 3),
        "train_s": round(statistics.median(timings["train"]), 3),
        "peak_rss_mb": round(_status_mb("VmHWM") - baseline),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
