# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, abdomen): the ``RawData`` layout, the
thesis' 35 / 5 split, and fake data.

The Synapse download ``RawData.zip`` extracts to ``RawData/Training/img/img0001.nii.gz`` with
``RawData/Training/label/label0001.nii.gz`` and unlabelled ``RawData/Testing/img/img0061.nii.gz``.
Labels 0-13: background and 13 organs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .msd import blob_label

__all__ = ["BTCV_ORGANS", "write_fake_btcv", "btcv_datalist"]

BTCV_ORGANS = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland", "left adrenal gland",
)


def write_fake_btcv(root: str | Path, num_training: int = 6, num_test: int = 1,
                    shape: tuple[int, int, int] = (48, 48, 32), seed: int = 0) -> Path:
    """Write tiny fake CT volumes (Hounsfield units, all 13 organ labels) in the ``RawData`` layout;
    returns the ``RawData`` folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "RawData"
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for i in range(num_training + num_test):
        label = blob_label(shape, len(BTCV_ORGANS), rng)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
        body = (grid**2).sum(0) < 0.9
        image = (np.where(body, 40.0, -1000.0) + 15.0 * label + rng.normal(0, 10, shape)).astype(np.float32)
        split = "Training" if i < num_training else "Testing"
        (folder / split / "img").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), str(folder / split / "img" / f"img{i + 1:04d}.nii.gz"))
        if split == "Training":
            (folder / split / "label").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), str(folder / split / "label" / f"label{i + 1:04d}.nii.gz"))
    return folder


def btcv_datalist(root: str | Path, output_file: str | Path, num_validation: int = 5) -> Path:
    """Pair ``RawData/Training`` images with their labels and write the bundle data list.

    The thesis used 35 labelled scans for training and the remaining 5 for validation and testing;
    here the last ``num_validation`` scans in file-name order form ``validation`` (also listed as
    ``testing``, as in the thesis), the rest ``training``; ``RawData/Testing`` images, which have no
    public labels, go to ``inference``. Paths are absolute.
    """
    base = Path(root)
    raw = base if (base / "Training").is_dir() else base / "RawData"
    images = sorted((raw / "Training" / "img").glob("img*.nii.gz"))
    if not images:
        raise FileNotFoundError(f"no RawData/Training/img/img*.nii.gz under {root}: download BTCV's RawData.zip "
                                "(Synapse, Multi-Atlas Labeling Beyond the Cranial Vault) and extract it there.")
    items = []
    for image in images:
        label = raw / "Training" / "label" / image.name.replace("img", "label", 1)
        if not label.is_file():
            raise FileNotFoundError(f"{image} has no label: expected {label}")
        items.append({"image": str(image.resolve()), "label": str(label.resolve())})
    if len(items) <= num_validation:
        raise ValueError(f"{len(items)} labelled scans cannot give {num_validation} for validation and some for training.")
    validation = items[-num_validation:]
    datalist = {
        "training": items[:-num_validation],
        "validation": validation,
        "testing": validation,
        "inference": [{"image": str(p.resolve())} for p in sorted((raw / "Testing" / "img").glob("img*.nii.gz"))],
    }
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=1))
    return out
