# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The MRI reconstruction bundle's demo table: zero filling and each network, trained one after another
on the demo data through the bundle's own configs, scored on the test volume (the undeformed template).

    python -m qtunet_monai prepare_recon_demo --output_dir runs/recon_demo/data    # or: --prepare True below
    python benchmarks/recon_demo.py                                   # every arm, then the docs table and figure
    python benchmarks/recon_demo.py --arms basicunet,qtunet2d         # some arms (the others' results are kept)
    python benchmarks/recon_demo.py --max_epochs 1 --num_train 2 --num_val 1 --size 32 --spacing 6 \\
        --max_slices 4 --prepare True --work_dir /tmp/recon --results /tmp/recon/r.json --figure /tmp/recon/f.png \\
        --regenerate False                                            # a smoke run in a minute

Arms: ``zero_filled`` (the input, no network; always scored), ``basicunet`` (MONAI's BasicUNet), ``qtunet2d``
(QT-UNet-2D-T), ``swinunet`` (QT-UNet-2D-A-T: no decoder cross-attention), ``qtunet2d_cond`` and
``swinunet_cond`` (seed 003's conditional, CoLT5-routed variants: QT-UNet-2D-Cond, Swin-UNet-2D-Cond), all
residual. Each network
trains with ``configs/train.json`` (best validation SSIM kept), then ``configs/evaluate.json`` scores it
on the ``testing`` split; zero filling is scored on the same volume through the same transforms. Results go to
``--results`` after every arm (a killed campaign keeps the finished arms), with the wall time of training
and the parameter count; ``--figure`` gets target, zero-filled image, each network's output and their
errors; with ``--regenerate`` the bundle's docs/README.md and metadata.json are rewritten from them.

Run nothing else on the machine meanwhile: the training times are part of the table.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "qtunet_demo_mri_reconstruction"
RESULTS = REPO / "benchmarks" / "results" / "recon_demo.json"
FIGURE = BUNDLE / "docs" / "recon_demo.png"
#: arm -> (architecture or None for zero filling, label)
ARMS = {
    "zero_filled": (None, "zero filling (the input)"),
    "basicunet": ("BasicUNet", "BasicUNet (MONAI), residual"),
    "qtunet2d": ("QT-UNet-2D", "QT-UNet-2D-T, residual"),
    "swinunet": ("QT-UNet-2D-A", "Swin U-Net (QT-UNet-2D-A-T), residual"),
    # seed 003's conditional (CoLT5-routed) variants
    "qtunet2d_cond": ("QT-UNet-2D-Cond", "QT-UNet-2D-Cond-T (conditional), residual"),
    "swinunet_cond": ("Swin-UNet-2D-Cond", "Conditional Swin U-Net (Swin-UNet-2D-Cond-T), residual"),
}
METRICS = ("ssim", "psnr", "nmse", "mae")


def _read_metrics(eval_dir: Path, prefix: str) -> dict[str, float]:
    """Mean over the evaluated volumes of MetricsSaver's ``<prefix>_<metric>_raw.csv``."""
    out = {}
    for name in METRICS:
        with open(eval_dir / f"{prefix}_{name}_raw.csv") as f:
            values = [float(row["mean"]) for row in csv.DictReader(f)]
        out[name] = sum(values) / len(values)
    return out


def _bundle_run(workdir: Path, configs: list[str], overrides: dict, log: Path) -> float:
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        args += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    start = time.perf_counter()
    with open(log, "a") as f:
        done = subprocess.run(args, cwd=workdir, stdout=f, stderr=subprocess.STDOUT, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {workdir} (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _parameters(architecture: str) -> float:
    from qtunet_monai.reconstruction import build_recon_network

    return sum(p.numel() for p in build_recon_network(architecture).parameters()) / 1e6


def _regenerate() -> None:
    spec = importlib.util.spec_from_file_location("generate_reconstruction_bundle",
                                                  REPO / "tools" / "generate_reconstruction_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_bundle()


def run(arms: str | tuple = "zero_filled,basicunet,qtunet2d,swinunet,qtunet2d_cond,swinunet_cond", work_dir: str = "runs/recon_demo",
        prepare: bool = False, num_train: int = 12, num_val: int = 3, spacing: float = 2.0, size: int = 112,
        max_slices: int | None = None, seed: int = 0, max_epochs: int | None = None, num_samples: int | None = None,
        val_interval: int | None = None, device: str | None = None, results: str = str(RESULTS),
        figure: str = str(FIGURE), regenerate: bool = True) -> dict:
    """Train and evaluate the arms one after another; write the results JSON and the figure.

    Args:
        arms: comma-separated subset of zero_filled, basicunet, qtunet2d, swinunet, qtunet2d_cond, swinunet_cond.
        work_dir: one bundle copy per arm (``<work_dir>/<arm>``) and the data (``<work_dir>/data``).
        prepare: (re)write the demo data first (otherwise only when ``<work_dir>/data`` has no data list).
        num_train: demo training volumes (with ``prepare``).
        num_val: demo validation volumes.
        spacing: demo voxel size in mm.
        size: demo slice size.
        max_slices: demo slices per volume (None: all with brain).
        seed: demo data seed.
        max_epochs: training epochs (default: the bundle's).
        num_samples: slices per volume per step (default: the bundle's).
        val_interval: validation interval (default: the bundle's).
        device: e.g. ``cpu`` (default: the bundle's choice).
        results: the results JSON (existing arms not run now are kept).
        figure: the PNG (target, zero-filled, outputs, errors) of the test volume's middle slice.
        regenerate: rewrite the bundle's docs and metadata from the results (only with the default ``results``).
    """
    from qtunet_monai.reconstruction import prepare_demo
    from qtunet_monai.reconstruction.report import figure as draw
    from qtunet_monai.reconstruction.report import read_volume, volume_metrics, zero_filled_baseline

    chosen = [a.strip() for a in arms.split(",")] if isinstance(arms, str) else list(arms)
    unknown = [a for a in chosen if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {list(ARMS)}.")
    work = Path(work_dir).resolve()
    data = work / "data"
    if prepare or not (data / "datalist.json").is_file():
        prepare_demo(data, num_train, num_val, spacing, size, max_slices=max_slices, seed=seed)
    simulation = json.loads((data / "simulation.json").read_text())
    overrides = {k: v for k, v in {"max_epochs": max_epochs, "num_samples": num_samples, "val_interval": val_interval,
                                   "device": device}.items() if v is not None}
    overrides["dataset_dir"] = str(data)
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    epochs = overrides.get("max_epochs", train["max_epochs"])
    samples = overrides.get("num_samples", train["num_samples"])

    results_path = Path(results)
    saved = json.loads(results_path.read_text()) if results_path.is_file() else {"arms": []}
    by_arm = {a["arm"]: a for a in saved.get("arms", [])}
    test_file = data / "test" / "brain_template.h5"
    # zero filling: the evaluation's own transforms (mask seeded by the file name), no network
    zero_filled, target = zero_filled_baseline(test_file)
    by_arm["zero_filled"] = {"arm": "zero_filled", "label": ARMS["zero_filled"][1], "architecture": None,
                             "metrics": volume_metrics(zero_filled, target), "params_m": None, "train_min": None}
    _write(results_path, by_arm, simulation, epochs, samples)
    for arm in (a for a in chosen if ARMS[a][0] is not None):
        architecture, label = ARMS[arm]
        workdir = work / arm
        if workdir.exists():
            shutil.rmtree(workdir)
        shutil.copytree(BUNDLE, workdir, ignore=shutil.ignore_patterns("data", "models", "eval"))
        log = workdir / "run.log"
        arm_overrides = {**overrides, "architecture": architecture}
        seconds = _bundle_run(workdir, ["train.json"], arm_overrides, log)
        _bundle_run(workdir, ["train.json", "evaluate.json"], arm_overrides, log)
        by_arm[arm] = {"arm": arm, "label": label, "architecture": architecture,
                       "metrics": _read_metrics(workdir / "eval", "val"), "params_m": round(_parameters(architecture), 3),
                       "train_min": round(seconds / 60, 2)}
        _write(results_path, by_arm, simulation, epochs, samples)
    # the figure: every network of the results whose test reconstruction is in work_dir (this run's and earlier)
    images = {"zero-filled": zero_filled}
    for arm, (architecture, label) in ARMS.items():
        saved_recon = work / arm / "eval" / "brain_template_recon.nii.gz"
        if architecture is not None and arm in by_arm and saved_recon.is_file():
            images[label] = read_volume(saved_recon)
    draw(target, images, figure, title="test volume (undeformed template), 4x equispaced, middle slice")
    summary = json.loads(results_path.read_text())
    if regenerate and results_path.resolve() == RESULTS.resolve():
        _regenerate()
    return summary


def _write(path: Path, by_arm: dict, simulation: dict, epochs: int, samples: int) -> None:
    order = [a for a in ARMS if a in by_arm]
    floor = by_arm.get("zero_filled", {}).get("metrics")
    slices = sorted({v["slices"] for v in simulation["volumes"].values()})
    volumes = simulation["volumes"]
    n_train = sum(1 for k in volumes if k.startswith("train/"))
    n_val = sum(1 for k in volumes if k.startswith("val/"))
    setting = (f"Demo data: {n_train} training and {n_val} validation volumes (random deformations of the MNI "
               f"template, {simulation['spacing_mm']} mm, {'/'.join(map(str, slices))} slices of {simulation['size']}^2), "
               f"test: the undeformed template; 4x equispaced mask, 8 % centre; {epochs} epochs of "
               f"{samples} random slices per volume, best validation SSIM; metrics on the test volume, "
               f"scaled by its target's maximum; training wall time on {platform.machine()} "
               f"({os.cpu_count()} CPUs, torch threads {_threads()}), one run each.")
    content = {"setting": setting, "arms": [by_arm[a] for a in order]}
    if floor:
        content["beats_zero_filled"] = {a: by_arm[a]["metrics"]["psnr"] > floor["psnr"]
                                        and by_arm[a]["metrics"]["ssim"] > floor["ssim"]
                                        for a in order if a != "zero_filled"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1) + "\n")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    fire.Fire(run)
