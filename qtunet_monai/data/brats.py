# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""BraTS 2021: the official case folders, the thesis' 834 / 208 / 209 split, and fake data.

The official training download (``RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021``) holds one
folder per case, ``BraTS2021_NNNNN``, with ``BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz``
(240 x 240 x 155 at 1 mm). Labels: 0 background, 1 necrotic tumour core, 2 peritumoral edema,
4 GD-enhancing tumour; the bundle turns them into the overlapping regions TC, WT and ET.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from .msd import blob_label

__all__ = ["BRATS_MODALITIES", "BRATS_LABEL_VALUES", "BRATS_REGIONS", "write_fake_brats", "brats_datalist"]

#: file suffixes in the order of the network's input channels (T1, T1Gd, T2, FLAIR).
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
BRATS_LABEL_VALUES = (0, 1, 2, 4)
#: tumour core, whole tumour, enhancing tumour as sets of label values.
BRATS_REGIONS = ((1, 4), (1, 2, 4), (4,))
#: the thesis' split of the 1,251 training cases.
THESIS_SPLIT = (834, 208, 209)


def write_fake_brats(root: str | Path, num_cases: int = 6, shape: tuple[int, int, int] = (48, 48, 40),
                     seed: int = 0) -> Path:
    """Write tiny fake cases in the official BraTS 2021 layout; returns the folder holding the cases.

    Every case has the four modalities (positive intensities inside the head, zero outside) and a
    segmentation with the labels 1, 2 and 4 nested like a real tumour (enhancing rim inside the core
    inside the edema).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021"
    for i in range(num_cases):
        case = f"BraTS2021_{i:05d}"
        (folder / case).mkdir(parents=True, exist_ok=True)
        nested = blob_label(shape, 3, rng)  # 1 outermost ... 3 innermost
        label = np.choose(nested, [0, 2, 1, 4]).astype(np.uint8)  # edema, necrotic core, enhancing
        head = _ellipsoid(shape, 0.47)
        for c, modality in enumerate(BRATS_MODALITIES):
            image = np.where(head, 300.0 + 60.0 * nested * (1 + 0.4 * c) + rng.normal(0, 20, shape), 0.0)
            nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), str(folder / case / f"{case}_{modality}.nii.gz"))
        nib.save(nib.Nifti1Image(label, np.eye(4)), str(folder / case / f"{case}_seg.nii.gz"))
    return folder


def _ellipsoid(shape, radius_frac: float) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return (grid**2).sum(0) < (2 * radius_frac) ** 2


def split_sizes(n: int, split: tuple[int, int, int] = THESIS_SPLIT) -> tuple[int, int, int]:
    """``n`` cases divided in the proportions of ``split`` (exactly ``split`` for the full 1,251)."""
    if n < 3:
        raise ValueError(f"{n} case(s) cannot be split into training, validation and testing; need at least 3.")
    val = max(1, round(n * split[1] / sum(split)))
    test = max(1, round(n * split[2] / sum(split)))
    return n - val - test, val, test


def brats_datalist(root: str | Path, output_file: str | Path, seed: int = 0) -> Path:
    """Find every ``BraTS2021_*`` case folder under ``root`` and write the bundle data list.

    The sorted cases are shuffled with ``seed`` and split 834 / 208 / 209 (training, validation,
    testing) for the full data set, in the same proportions otherwise. ``image`` is the list of the
    four modality files (T1, T1Gd, T2, FLAIR), ``label`` the ``_seg`` file; paths are absolute.
    """
    cases = sorted(p for p in Path(root).rglob("BraTS2021_*") if p.is_dir())
    if not cases:
        raise FileNotFoundError(
            f"no BraTS2021_NNNNN case folders under {root}: download the BraTS 2021 training data "
            "(RSNA-ASNR-MICCAI BraTS 2021, task 1) and extract it there."
        )
    items = []
    for case in cases:
        files = [case / f"{case.name}_{m}.nii.gz" for m in BRATS_MODALITIES]
        seg = case / f"{case.name}_seg.nii.gz"
        missing = [str(f) for f in [*files, seg] if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"case {case} is incomplete: missing {missing}")
        items.append({"image": [str(f.resolve()) for f in files], "label": str(seg.resolve())})
    order = np.random.default_rng(seed).permutation(len(items))
    items = [items[i] for i in order]
    n_train, n_val, _ = split_sizes(len(items))
    datalist = {
        "training": items[:n_train],
        "validation": items[n_train:n_train + n_val],
        "testing": items[n_train + n_val:],
    }
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=1))
    return out
