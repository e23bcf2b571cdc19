# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Unlabelled pre-training corpora: any folder tree of NIfTI volumes -> a data list, and fake trees."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["volume_tree_datalist", "write_fake_volume_tree"]


def volume_tree_datalist(root: str | Path, output_file: str | Path, num_validation: int = 0) -> Path:
    """Every ``*.nii`` / ``*.nii.gz`` under ``root`` (any depth), sorted, as ``training`` cases
    (images only); the last ``num_validation`` files form ``validation``. Paths are absolute."""
    files = sorted({p.resolve() for pattern in ("*.nii.gz", "*.nii") for p in Path(root).rglob(pattern)})
    if not files:
        raise FileNotFoundError(f"no NIfTI files (*.nii, *.nii.gz) under {root}.")
    items = [{"image": str(f)} for f in files]
    split = len(items) - num_validation
    datalist = {"training": items[:split], "validation": items[split:]}
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=1))
    return out


def write_fake_volume_tree(root: str | Path, modality: str = "CT", num_volumes: int = 4,
                           shape: tuple[int, int, int] = (48, 48, 40), seed: int = 0) -> Path:
    """Fake volumes in a collection/patient/scan tree, like a converted TCIA download; returns ``root``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for i in range(num_volumes):
        folder = root / f"collection_{i % 2}" / f"patient_{i:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        body = (grid**2).sum(0) < rng.uniform(0.6, 0.9)
        organ = ((grid - rng.uniform(-0.3, 0.3, (3, 1, 1, 1))) ** 2).sum(0) < 0.1
        if modality == "CT":
            image = np.where(body, 40.0, -1000.0) + 60.0 * organ + rng.normal(0, 10, shape)
        else:
            image = np.where(body, 300.0 + 200.0 * organ + rng.normal(0, 20, shape), 0.0)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(folder / "scan.nii.gz"))
    return root
