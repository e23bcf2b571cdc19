# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Before/after timings of QT-UNet's hot path, several versions of the code in one process.

Each version is a directory holding a ``qtunet_monai`` package (a ``git worktree`` of a commit, or
``.`` for the working tree). All versions are loaded side by side under distinct module names and
timed alternately (v1, v2, v3, then v1, v2, v3 again ...), so a noisy machine slows them alike; peak
memory is measured per version in a fresh process. Example:

    git worktree add /tmp/before <commit>
    python benchmarks/hotpath.py before=/tmp/before after=. after-explicit=.:explicit

A version may end in ``:explicit`` (``attention_backend="explicit"``) or ``:nocache`` (window
geometry rebuilt before every pass). Prints a Markdown table of median inference and training-step
times (forward, backward, Adam) of QT-UNet on a ``4 x roi^3`` input, with peak RSS increase.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _load(label: str, root: str):
    """Import ``<root>/qtunet_monai`` under a unique name (its imports are all relative)."""
    name = "qtunet_v_" + "".join(c if c.isalnum() else "_" for c in label)
    holder = Path(tempfile.mkdtemp(prefix="hotpath_"))
    shutil.copytree(Path(root) / "qtunet_monai", holder / name, ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(holder))
    return importlib.import_module(name)


class _Version:
    def __init__(self, spec: str, variant: str, roi: int, device: torch.device):
        self.label, rest = spec.split("=", 1)
        root, _, self.option = rest.partition(":")
        package = _load(self.label, root)
        torch.manual_seed(0)
        backend = {"attention_backend": "explicit"} if self.option == "explicit" else {}
        self.net = package.QTUNet(4, 3, variant=variant, **backend).to(device)
        windows = importlib.import_module(package.__name__ + ".networks.blocks.windows")
        if self.option == "nocache":
            self.net.register_forward_pre_hook(lambda *_: windows._cached_geometry.cache_clear())
        self.device = device
        self.x = torch.randn(1, 4, roi, roi, roi, device=device)
        self.target = torch.rand(1, 3, roi, roi, roi, device=device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), 1e-4)

    def infer(self) -> None:
        self.net.eval()
        with torch.inference_mode():
            self.net(self.x)
        self._sync()

    def train(self) -> None:
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(self.net(self.x), self.target).backward()
        self.optimizer.step()
        self._sync()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _memory_child(spec: str, variant: str, roi: int, queue) -> None:
    baseline = _status_mb("VmRSS")
    version = _Version(spec, variant, roi, torch.device("cpu"))
    version.infer()
    infer_peak = _status_mb("VmHWM") - baseline
    version.train()
    queue.put((infer_peak, _status_mb("VmHWM") - baseline))


def _peak_memory(spec: str, variant: str, roi: int) -> tuple[float, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(spec, variant, roi, queue))
    proc.start()
    proc.join()
    return queue.get() if proc.exitcode == 0 else (float("nan"), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("versions", nargs="+", help="label=path[:explicit|:nocache]")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--roi", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no_memory", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    versions = [_Version(spec, args.variant, args.roi, device) for spec in args.versions]
    for v in versions:  # warm-up: caches, allocator, optimiser state
        v.infer()
        v.train()
    times: dict[str, dict[str, list[float]]] = {v.label: {"infer": [], "train": []} for v in versions}
    for r in range(args.repeats):
        for v in versions:
            for kind in ("infer", "train"):
                start = time.perf_counter()
                getattr(v, kind)()
                times[v.label][kind].append(time.perf_counter() - start)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    first = versions[0].label
    base = {k: statistics.median(times[first][k]) for k in ("infer", "train")}
    print(f"QT-UNet-{args.variant[0].upper()}, 1 x 4 x {args.roi}^3, {args.device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} alternating repeats\n")
    print("| version | inference (s) | vs first | training step (s) | vs first | peak RSS infer / train (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for v, spec in zip(versions, args.versions):
        med = {k: statistics.median(times[v.label][k]) for k in ("infer", "train")}
        memory = "-" if args.no_memory or device.type != "cpu" else "{:.0f} / {:.0f}".format(
            *_peak_memory(spec, args.variant, args.roi)
        )
        print(f"| {v.label} | {med['infer']:.3f} | {base['infer'] / med['infer']:.2f}x | {med['train']:.3f} "
              f"| {base['train'] / med['train']:.2f}x | {memory} |", flush=True)


if __name__ == "__main__":
    main()
