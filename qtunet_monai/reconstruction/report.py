# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""After evaluation: per-volume metrics from the saved reconstructions and a figure (target, zero-filled,
reconstruction(s), error maps)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..bundle.errors import DataError
from .metrics import nmse, psnr, ssim

__all__ = ["read_target", "read_volume", "volume_metrics", "zero_filled_baseline", "figure", "bundle_report"]


def read_target(path: str | Path, target_key: str = "reconstruction_rss") -> np.ndarray:
    """The ``(slices, rows, columns)`` target of a fastMRI file."""
    import h5py

    with h5py.File(path, "r") as f:
        if target_key not in f:
            raise DataError(f"{path}: no '{target_key}' target (found {sorted(f)})")
        return np.asarray(f[target_key][()], dtype=np.float32)


def read_volume(path: str | Path) -> np.ndarray:
    """A reconstruction the bundle saved (NIfTI ``(rows, columns, slices)``) as ``(slices, rows, columns)``."""
    import nibabel as nib

    if not Path(path).is_file():
        raise DataError(f"{path}: no such reconstruction; run the evaluation first.")
    return np.transpose(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), (2, 0, 1))


def volume_metrics(output: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """fastMRI's per-volume metrics of ``(slices, rows, columns)`` magnitudes, both divided by the target's
    maximum: SSIM, PSNR (dB), NMSE, MAE."""
    if output.shape != target.shape:
        raise ValueError(f"output {output.shape} and target {target.shape} differ in shape.")
    scale = float(target.max()) or 1.0
    x, y = (torch.from_numpy(np.asarray(a, dtype=np.float32) / scale)[None] for a in (output, target))
    return {"ssim": float(ssim(x, y, 1.0)), "psnr": float(psnr(x, y, 1.0)), "nmse": float(nmse(x, y)),
            "mae": float((x - y).abs().mean())}


def zero_filled_baseline(kspace_file: str | Path, target_key: str = "reconstruction_rss",
                         mask_type: str = "equispaced", center_fractions: tuple = (0.08,), accelerations: tuple = (4,),
                         mask_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The zero-filled image and the target of a file, ``(slices, rows, columns)`` each, as the bundle's
    validation and evaluation see them (the same transforms: the mask seeded by the file name, the crop)."""
    from ..pipeline import instantiate
    from . import pipeline

    chain = {"_target_": "Compose", "transforms": pipeline.load(True) + pipeline.undersample(random=False)
             + pipeline.image_transforms(True)}
    transform = instantiate(chain, target_key=target_key, mask_type=mask_type, center_fractions=list(center_fractions),
                            accelerations=list(accelerations), mask_seed=mask_seed, clip=6.0)
    item = transform({"kspace": str(kspace_file)})
    return item["zero_filled"][0].numpy(), item["target"][0].numpy()


def figure(target: np.ndarray, images: Mapping[str, np.ndarray], path: str | Path, slice_index: int | None = None,
           title: str = "") -> Path:
    """A PNG: the target, then each image (zero-filled, reconstructions) of one slice, and below each its
    absolute error (the same colour scale for all, a fifth of the target's maximum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = target.shape[0] // 2 if slice_index is None else slice_index
    peak = float(target[k].max()) or 1.0
    cols = 1 + len(images)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.6), squeeze=False)
    axes[0, 0].imshow(target[k], cmap="gray", vmin=0, vmax=peak)
    axes[0, 0].set_title("target", fontsize=9)
    axes[1, 0].axis("off")
    for i, (name, image) in enumerate(images.items(), start=1):
        x, y = (torch.from_numpy(a[k] / peak)[None, None] for a in (image, target))
        axes[0, i].imshow(image[k], cmap="gray", vmin=0, vmax=peak)
        axes[0, i].set_title(f"{name}\nslice SSIM {float(ssim(x, y, 1.0)):.3f}", fontsize=9)
        axes[1, i].imshow(np.abs(image[k] - target[k]), cmap="magma", vmin=0, vmax=0.2 * peak)
        axes[1, i].set_title("|error|", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bundle_report(bundle_dir: str | Path = "bundles/qtunet_demo_mri_reconstruction", split: str = "testing",
                  target_key: str = "reconstruction_rss", figure_file: str | Path | None = None,
                  output_dir: str | Path | None = None) -> dict:
    """Metrics of the reconstruction bundle's saved outputs (``eval/<name>_recon.nii.gz`` and
    ``<name>_zero_filled.nii.gz``) of the ``split`` files against their targets, and a PNG figure of the
    first file; writes ``recon_report.json`` and ``recon_report.png`` in ``eval/``. Returns
    ``{file name: {"network": metrics, "zero_filled": metrics}}``."""
    from .io import load_kspace_datalist

    root = Path(bundle_dir)
    out_dir = Path(output_dir) if output_dir else root / "eval"
    cases = load_kspace_datalist(str(root / "data" / "datalist.json"), split)
    results, first = {}, None
    for case in cases:
        name = Path(case["kspace"]).stem
        target = read_target(case["kspace"], target_key)
        recon = read_volume(out_dir / f"{name}_recon.nii.gz")
        zero_filled = read_volume(out_dir / f"{name}_zero_filled.nii.gz")
        results[name] = {"network": volume_metrics(recon, target), "zero_filled": volume_metrics(zero_filled, target)}
        first = first or (name, target, zero_filled, recon)
    name, target, zero_filled, recon = first
    scores = results[name]["network"]
    figure(target, {"zero-filled": zero_filled, "network": recon}, figure_file or out_dir / "recon_report.png",
           title=f"{name}: SSIM {scores['ssim']:.3f}, PSNR {scores['psnr']:.2f} dB (zero-filled "
                 f"{results[name]['zero_filled']['ssim']:.3f}, {results[name]['zero_filled']['psnr']:.2f} dB)")
    (out_dir / "recon_report.json").write_text(json.dumps(results, indent=1) + "\n")
    return results
