# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Command-line entries of the reconstruction bundle (``python -m qtunet_monai <command>`` once registered
in :mod:`qtunet_monai.cli`); each is a plain function too."""

from __future__ import annotations

import json
from pathlib import Path

from .simulate import DEMO_BUNDLE_DATA

__all__ = ["prepare_recon_demo", "prepare_recon_data", "recon_report"]


def prepare_recon_demo(output_dir: str = DEMO_BUNDLE_DATA, num_train: int = 12, num_val: int = 3,
                       spacing: float = 2.0, size: int = 112, noise_std: float = 0.01, max_slices: int | None = None,
                       seed: int = 0) -> None:
    """Write the MRI reconstruction demo (fastMRI-layout k-space simulated from the MNI template in nilearn,
    randomly deformed; needs the demo and reconstruction extras: nilearn, h5py) and its data list.

    Args:
        output_dir: where train/, val/, test/, datalist.json and simulation.json go.
        num_train: deformed training volumes.
        num_val: deformed validation volumes.
        spacing: voxel size in mm.
        size: slices are padded to size x size.
        noise_std: complex k-space noise, relative to each volume's largest magnitude.
        max_slices: at most this many axial slices per volume (default: every slice with brain).
        seed: seed of deformations, phases and noise.
    """
    from .simulate import prepare_demo

    path = prepare_demo(output_dir, num_train, num_val, spacing, size, noise_std, max_slices, seed)
    counts = {k: len(v) for k, v in json.loads(Path(path).read_text()).items()}
    print(f"data list written: {path} {counts}")


def prepare_recon_data(output_file: str, train_dir: str | None = None, val_dir: str | None = None,
                       test_dir: str | None = None) -> None:
    """A data list of fastMRI files (every ``*.h5`` under each folder, sorted): e.g. ``--train_dir
    knee/singlecoil_train --val_dir knee/singlecoil_val --output_file data/datalist.json``. The official
    validation files, which have targets, make a good test split too.

    Args:
        output_file: the data list to write (paths are written absolute).
        train_dir: the ``training`` files.
        val_dir: the ``validation`` files.
        test_dir: the ``testing`` files (default: the validation files).
    """
    from ..bundle.errors import DataError
    from ..bundle.files import atomic_write_text

    datalist = {}
    for split, folder in (("training", train_dir), ("validation", val_dir), ("testing", test_dir or val_dir)):
        if folder is None:
            continue
        files = sorted(Path(folder).resolve().rglob("*.h5"))
        if not files:
            raise DataError(f"{folder}: no .h5 files for the '{split}' split.")
        datalist[split] = [{"kspace": str(f)} for f in files]
    if not datalist:
        raise ValueError("give at least one of --train_dir, --val_dir, --test_dir.")
    Path(output_file).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_file, json.dumps(datalist, indent=1) + "\n")
    print(f"data list written: {output_file} {({k: len(v) for k, v in datalist.items()})}")


def recon_report(bundle_dir: str = "bundles/qtunet_demo_mri_reconstruction", split: str = "testing",
                 target_key: str = "reconstruction_rss", figure_file: str | None = None) -> None:
    """Per-volume SSIM, PSNR, NMSE and MAE of the bundle's saved reconstructions (after evaluate.json) and of
    the zero-filled images, and a PNG figure (eval/recon_report.png).

    Args:
        bundle_dir: the reconstruction bundle, after training and evaluation.
        split: the data-list split that was evaluated.
        target_key: the files' target (reconstruction_esc for fastMRI single-coil knee).
        figure_file: the PNG to write; default <bundle_dir>/eval/recon_report.png.
    """
    from .report import bundle_report

    for name, scores in bundle_report(bundle_dir, split, target_key, figure_file).items():
        print(name + ": " + "; ".join(f"{kind} " + ", ".join(f"{k} {v:.4f}" for k, v in s.items())
                                      for kind, s in scores.items()))
