# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""QT-UNet against MONAI's networks, measured side by side in one run.

Timings alternate between models inside each repeat (model A, B, C, then A, B, C again ...), so a
noisy machine slows all of them alike and the ratios survive. With ``compile`` every model is
measured eager and under ``torch.compile`` (default arguments), alternating too, and compared in its
faster mode. Peak memory is measured per model and scenario in a fresh child process on CPU (process
RSS is monotonic, so it cannot be isolated in one process) and with ``torch.cuda.max_memory_allocated``
on GPU. One further step per model and mode runs under ``torch.profiler`` to count what a step
launches: GPU kernels on CUDA, leaf ``aten`` operator calls on CPU (an inductor-compiled CPU kernel
is not an ``aten`` call, so the CPU count of a compiled model covers only what stayed eager).

Run ``python -m qtunet_monai bench --help`` for the options; results go to JSON and Markdown.
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from ..bundle.distributed import process_device
from ..bundle.presets import network_options
from ..networks import QTUNet

__all__ = ["MODELS", "DEFAULT_MODELS", "SCENARIOS", "build_model", "run_benchmark", "bench"]

IN_CHANNELS, OUT_CHANNELS = 4, 3  # BraTS: 4 MRI channels -> TC, WT, ET
REFERENCE = "swinunetr"
BRATS_VOLUME = (240, 240, 155)

#: peak dense bf16 tensor-core rates (TFLOP/s) for model FLOPs utilisation, by device-name substring
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "4090": 165.2}


def _swinunetr(roi: int) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(IN_CHANNELS, OUT_CHANNELS, feature_size=48, spatial_dims=3)


def _unetr(roi: int) -> nn.Module:
    from monai.networks.nets import UNETR

    return UNETR(IN_CHANNELS, OUT_CHANNELS, img_size=roi, feature_size=16, spatial_dims=3)


def _segresnet(roi: int) -> nn.Module:
    from monai.networks.nets import SegResNet

    # MONAI's BraTS tutorial configuration
    return SegResNet(3, init_filters=16, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, blocks_down=(1, 2, 2, 4))


def _unet(roi: int) -> nn.Module:
    from monai.networks.nets import UNet

    # MONAI's spleen tutorial configuration
    return UNet(3, IN_CHANNELS, OUT_CHANNELS, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def _conditional(variant: str, capacity: float) -> Callable[[int], nn.Module]:
    """QT-UNet with conditional light/heavy blocks (light router) at ``capacity``, the bundles' ``--router light``."""
    return lambda roi: QTUNet(IN_CHANNELS, OUT_CHANNELS, variant=variant, router="light", capacity=capacity)


#: model name -> builder(roi); UNETR needs the input size at construction.
MODELS: dict[str, Callable[[int], nn.Module]] = {
    "qtunet-tiny": lambda roi: QTUNet(IN_CHANNELS, OUT_CHANNELS, variant="tiny"),
    "qtunet-small": lambda roi: QTUNet(IN_CHANNELS, OUT_CHANNELS, variant="small"),
    "qtunet-base": lambda roi: QTUNet(IN_CHANNELS, OUT_CHANNELS, variant="base"),
    # QT-UNet-T with the network options of the bundles' ``--preset accurate``
    "qtunet-tiny-accurate": lambda roi: QTUNet(IN_CHANNELS, OUT_CHANNELS, variant="tiny", **network_options("accurate")),
    # dense vs conditional in one run: --models qtunet-tiny,qtunet-tiny-cond0.25,qtunet-tiny-cond0.5,...
    **{f"qtunet-{v}-cond{c}": _conditional(v, c) for v in ("tiny", "base") for c in (0.25, 0.5)},
    "swinunetr": _swinunetr,
    "unetr": _unetr,
    "segresnet": _segresnet,
    "unet": _unet,
}

#: what ``bench`` measures unless told: every model but the conditional ones (``--models`` names those)
DEFAULT_MODELS = tuple(name for name in MODELS if "-cond" not in name)

#: scenario -> (kind, roi). ``sliding`` runs a whole BraTS-sized volume through MONAI's sliding window.
SCENARIOS = {
    "infer96": ("infer", 96),
    "infer128": ("infer", 128),
    "train64": ("train", 64),
    "train96": ("train", 96),
    "train128": ("train", 128),
    "sliding128": ("sliding", 128),
}


def build_model(name: str, roi: int, device: torch.device) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {list(MODELS)}.")
    torch.manual_seed(0)
    return MODELS[name](roi).to(device)


class _Runner:
    """One model in one scenario and mode: a callable that performs the measured work once."""

    def __init__(self, name: str, kind: str, roi: int, device: torch.device, amp: str | None, compile: bool,
                 batch: int, overlap: float):
        self.kind, self.roi, self.device, self.batch = kind, roi, device, batch
        self.model = build_model(name, roi, device)
        self.step_model = torch.compile(self.model) if compile else self.model
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[amp]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.overlap = overlap
        if kind == "train":
            self.model.train()
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
            self.x = torch.randn(batch, IN_CHANNELS, roi, roi, roi, device=device)
            self.target = torch.rand(batch, OUT_CHANNELS, roi, roi, roi, device=device)
        elif kind == "infer":
            self.model.eval()
            self.x = torch.randn(batch, IN_CHANNELS, roi, roi, roi, device=device)
        else:
            self.model.eval()
            self.x = torch.randn(1, IN_CHANNELS, *BRATS_VOLUME, device=device)

    def __call__(self) -> None:
        if self.kind == "train":
            self.optimizer.zero_grad(set_to_none=True)
            with self.autocast():
                loss = nn.functional.mse_loss(self.step_model(self.x).float(), self.target)
            loss.backward()
            self.optimizer.step()
        elif self.kind == "infer":
            with torch.inference_mode(), self.autocast():
                self.step_model(self.x)
        else:
            from monai.inferers import sliding_window_inference

            with torch.inference_mode(), self.autocast():
                sliding_window_inference(self.x, (self.roi,) * 3, 1, self.step_model, overlap=self.overlap)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS now, VmHWM peak) in MB.

    VmHWM belongs to the process' own address space; ``getrusage``'s ru_maxrss would not do in a
    child, since Linux carries the parent's peak over fork and exec into it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _peak_rss_child(args: tuple, queue) -> None:
    name, kind, roi, overlap = args
    baseline = _status_mb("VmRSS")
    runner = _Runner(name, kind, roi, torch.device("cpu"), None, False, 1, overlap)
    runner()
    queue.put(_status_mb("VmHWM") - baseline)


def _cpu_peak_memory_mb(name: str, kind: str, roi: int, overlap: float) -> float:
    """Peak RSS increase (weights, activations, optimiser state) in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_rss_child, args=((name, kind, roi, overlap), queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        return float("nan")
    return queue.get()


def _count_launches(run: Callable[[], None], device: torch.device) -> dict[str, int]:
    """What one call of ``run`` launches, from ``torch.profiler``: ``kernels`` (GPU kernels on
    CUDA, leaf ``aten`` operator calls on CPU) and ``copies`` (``aten::copy_`` calls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    events = prof.events()
    if device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        aten = [e for e in events if e.name.startswith("aten::")]
        kernels = sum(1 for e in aten if not any(c.name.startswith("aten::") for c in e.cpu_children))
    copies = sum(1 for e in events if e.name == "aten::copy_")
    return {"kernels": kernels, "copies": copies}


def _forward_gflops(name: str, roi: int) -> float | None:
    try:
        from .complexity import count_flops
    except ImportError:
        return None
    try:
        return count_flops(build_model(name, roi, torch.device("cpu")), (1, IN_CHANNELS, roi, roi, roi)) / 1e9
    except Exception as e:  # noqa: BLE001 - fvcore cannot trace every network; FLOPs are then left out
        print(f"FLOPs of {name} not counted: {e}")
        return None


def run_benchmark(
    models: Sequence[str],
    scenarios: Sequence[str],
    repeats: int = 3,
    device: str = "cpu",
    amp: str | None = None,
    compile: bool = False,
    batch: int = 1,
    overlap: float = 0.5,
    memory: bool = True,
    flops: bool = True,
    peak_tflops: float | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure ``models`` in ``scenarios``; see :func:`bench` for the arguments.

    Returns a dict with the environment and, per scenario and model, the median time (s), all
    timings, peak memory (MB), the speed and memory ratios against SwinUNETR, and on training
    scenarios throughput and model FLOPs utilisation.
    """
    for s in scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario {s!r}; choose from {list(SCENARIOS)}.")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no GPU.")
    dev = process_device(device)  # plain "cuda" is this process's GPU, cuda:<LOCAL_RANK>
    if peak_tflops is None and dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), None)
    result: dict = {
        "environment": {
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "device_type": dev.type,
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "amp": amp,
            "compile": compile,
            "batch": batch,
            "repeats": repeats,
            "sliding_overlap": overlap,
            "peak_tflops": peak_tflops,
        },
        "scenarios": {},
    }
    modes = ("eager", "compiled") if compile else ("eager",)
    for scenario in scenarios:
        kind, roi = SCENARIOS[scenario]
        log(f"[{scenario}] building {len(models)} models")
        runners: dict[tuple[str, str], _Runner] = {}
        compile_seconds: dict[str, float] = {}
        # A whole-volume sliding window is many ROI passes already: warm up with one ROI pass and
        # time it once, or the scenario alone would take an hour on a CPU.
        scenario_repeats = 1 if kind == "sliding" else repeats
        for name in models:
            for mode in modes:
                try:
                    runner = _Runner(name, kind, roi, dev, amp, mode == "compiled", batch, overlap)
                    start = time.perf_counter()
                    if kind == "sliding":
                        with torch.inference_mode(), runner.autocast():
                            runner.step_model(runner.x[..., :roi, :roi, :roi])
                    else:
                        runner()  # warm-up (and compilation)
                    if mode == "compiled":
                        compile_seconds[name] = time.perf_counter() - start
                    runners[name, mode] = runner
                except torch.OutOfMemoryError:
                    log(f"[{scenario}] {name} ({mode}): out of memory")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
        timings: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
        for r in range(scenario_repeats):
            for (name, mode), run in runners.items():  # alternate between models within each repeat
                start = time.perf_counter()
                run()
                timings[name, mode].append(time.perf_counter() - start)
                label = name if len(modes) == 1 else f"{name} ({mode})"
                log(f"[{scenario}] repeat {r + 1}/{scenario_repeats} {label}: {timings[name, mode][-1]:.3f} s")
        rows = {}
        for name in models:
            measured = {mode: statistics.median(timings[name, mode]) for mode in modes if (name, mode) in runners}
            if not measured:
                continue
            best = min(measured, key=measured.get)
            run = runners[name, best]
            row = rows[name] = {"seconds": measured[best], "mode": best, "all_seconds": timings[name, best]}
            for mode, seconds in measured.items():
                row[f"{mode}_seconds"] = seconds
            if name in compile_seconds:
                row["compile_seconds"] = compile_seconds[name]
            row["params_m"] = sum(p.numel() for p in run.model.parameters()) / 1e6
            if kind != "sliding":
                launches = {mode: _count_launches(runners[name, mode], dev) for mode in measured}
                row["kernels_per_step"] = launches[best]["kernels"]
                row["copies_per_step"] = launches[best]["copies"]
                row["launches"] = launches
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
                run()
                row["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
        del runners
        gc.collect()
        if dev.type == "cpu" and memory and kind != "sliding":  # sliding: about inference at the ROI
            for name, row in rows.items():
                log(f"[{scenario}] peak memory of {name} (fresh process)")
                row["peak_memory_mb"] = _cpu_peak_memory_mb(name, kind, roi, overlap)
        if kind != "sliding" and flops:
            for name, row in rows.items():
                row["forward_gflops"] = _forward_gflops(name, roi)
        for row in rows.values():
            if kind == "train":
                row["volumes_per_second"] = batch / row["seconds"]
            if kind != "sliding" and row.get("forward_gflops"):
                # fvcore counts multiply-accumulates (2 FLOPs each); a training step is ~3 forward passes
                row["gflop_per_step"] = (3 if kind == "train" else 1) * 2 * row["forward_gflops"] * batch
                if peak_tflops:
                    row["mfu"] = row["gflop_per_step"] / row["seconds"] / 1e3 / peak_tflops
        reference = rows.get(REFERENCE)
        for row in rows.values():
            if reference:
                row["speedup_vs_swinunetr"] = reference["seconds"] / row["seconds"]
                if "peak_memory_mb" in row and "peak_memory_mb" in reference:
                    row["memory_vs_swinunetr"] = row["peak_memory_mb"] / reference["peak_memory_mb"]
        result["scenarios"][scenario] = rows
    return result


def to_markdown(result: dict) -> str:
    """Markdown tables (one per scenario) of a :func:`run_benchmark` result."""
    env = result["environment"]
    compiled = bool(env["compile"])
    kernels = "GPU kernels" if env.get("device_type") == "cuda" else "aten ops"
    lines = [
        (f"Device: {env['device']} ({env['cpu_threads']} CPU threads), torch {env['torch']}, "
        f"amp {env['amp'] or 'off'}, compile {env['compile']}, batch {env['batch']}, "
        f"median of {env['repeats']} alternating repeats."),
        "",
    ]
    if compiled:
        lines += ["Each model eager and under torch.compile (default arguments); time is its faster mode.", ""]
    lines += [
        (f"{kernels}/step and copy_/step: one step under torch.profiler. GFLOP/step: the count MFU divides "
         "by, 2 x fvcore's multiply-accumulates per forward pass (x3 for a training step) x batch."),
        "",
    ]
    for scenario, rows in result["scenarios"].items():
        kind, roi = SCENARIOS[scenario]
        title = {
            "infer": f"Inference, {env['batch']} x {IN_CHANNELS} x {roi}^3",
            "train": f"Training step (forward, backward, Adam), {env['batch']} x {IN_CHANNELS} x {roi}^3",
            "sliding": f"Sliding-window inference of a {IN_CHANNELS} x {' x '.join(map(str, BRATS_VOLUME))} "
            f"volume, ROI {roi}^3, overlap {env['sliding_overlap']} (timed once)",
        }[kind]
        # (header, row key, format)
        columns = [("params (M)", "params_m", ".1f"), ("GFLOPs", "forward_gflops", ".1f")]
        columns += [("time (s)", "seconds", ".3f")]
        if compiled:
            columns += [("mode", "mode", "s"), ("eager (s)", "eager_seconds", ".3f")]
            columns += [("compiled (s)", "compiled_seconds", ".3f"), ("compile (s)", "compile_seconds", ".0f")]
        columns += [("speed-up vs SwinUNETR", "speedup_vs_swinunetr", ".2f")]
        columns += [("peak memory (MB)", "peak_memory_mb", ".0f")]
        columns += [("memory vs SwinUNETR", "memory_vs_swinunetr", ".2f")]
        if kind != "sliding":
            columns += [(f"{kernels}/step", "kernels_per_step", "d"), ("copy_/step", "copies_per_step", "d")]
        if kind == "train":
            columns += [("volumes/s", "volumes_per_second", ".3f")]
        if kind != "sliding":
            columns += [("GFLOP/step", "gflop_per_step", ".1f"), ("MFU", "mfu", ".1%")]
        lines += [f"**{title}**", "", "| model | " + " | ".join(c[0] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        for name, row in rows.items():
            cells = []
            for _, key, spec in columns:
                value = row.get(key)
                ok = isinstance(value, str) or (isinstance(value, (int, float)) and not math.isnan(value))
                cells.append(format(value, spec) + ("x" if key == "speedup_vs_swinunetr" else "") if ok else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def bench(
    models: str | Sequence[str] = ",".join(DEFAULT_MODELS),
    scenarios: str | Sequence[str] = "infer96,infer128,train96,sliding128",
    repeats: int = 3,
    device: str = "cpu",
    amp: str | None = None,
    compile: bool = False,
    batch: int = 1,
    overlap: float = 0.5,
    memory: bool = True,
    flops: bool = True,
    peak_tflops: float | None = None,
    out_dir: str = "benchmarks/results",
    tag: str | None = None,
) -> None:
    """Benchmark QT-UNet T/S/B against MONAI's SwinUNETR (feature size 48), UNETR, SegResNet and UNet.

    Args:
        models: comma-separated names from qtunet-tiny, qtunet-small, qtunet-base, qtunet-tiny-accurate
            (``--preset accurate``'s network), swinunetr, unetr, segresnet, unet (the default: all of
            these), and qtunet-tiny-cond0.25, qtunet-tiny-cond0.5, qtunet-base-cond0.25, qtunet-base-cond0.5
            (conditional blocks with the light router at that capacity; ``--router light --capacity``).
        scenarios: comma-separated from infer96, infer128, train64, train96, train128, sliding128.
        repeats: timed repeats per model (after one warm-up), alternating between models; the
            whole-volume sliding window is timed once.
        device: cpu or cuda.
        amp: None, bf16 or fp16 (torch.autocast).
        compile: measure each model eager and wrapped in torch.compile (default arguments), alternating,
            and compare it in its faster mode.
        batch: batch size of the inference and training scenarios.
        overlap: sliding-window overlap.
        memory: measure peak memory (CPU: one fresh process per model and scenario).
        flops: count forward GFLOPs with fvcore (for the table and MFU).
        peak_tflops: the device's peak bf16 rate for MFU; detected for common GPUs.
        out_dir: where ``<tag>.json`` and ``<tag>.md`` are written.
        tag: file name stem; default ``bench-<device>``.
    """
    split = lambda v: [s.strip() for s in v.split(",")] if isinstance(v, str) else list(v)
    result = run_benchmark(
        split(models), split(scenarios), repeats, device, amp, compile, batch, overlap, memory, flops, peak_tflops
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = tag or f"bench-{torch.device(device).type}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    markdown = to_markdown(result)
    (out / f"{stem}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"written: {out / f'{stem}.json'}, {out / f'{stem}.md'}")
