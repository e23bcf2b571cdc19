# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The demo data set: brain tissue segmentation from the MNI ICBM152 2009 template that nilearn ships.

nilearn's wheel contains the template's T1 image (skull-stripped, 1 mm) with grey- and white-matter
probability maps. They are one real volume, so the demo makes its cases by random deformation:
each case is the template under a random affine and elastic deformation with a random bias field,
contrast change and noise; the label follows the same deformation. The undeformed template is the
test case. Labels: 0 background, 1 CSF (brain that is neither grey nor white matter), 2 grey
matter, 3 white matter, each voxel taking the most probable tissue.

The files are written in the Medical Segmentation Decathlon layout (``imagesTr``, ``labelsTr``,
``imagesTs``, ``dataset.json``), plus ``labelsTs`` and the bundle's ``datalist.json``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

__all__ = ["LABELS", "template_files", "reference_volume", "prepare_demo"]

LABELS = {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
_STEM = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def template_files() -> dict[str, Path]:
    """Paths of the T1, grey- and white-matter files inside the installed nilearn package.

    nilearn is located, not imported (importing it pulls in scikit-learn and pandas).
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise ImportError("the demo data come from the nilearn package: pip install 'qtunet_monai[demo]'")
    folder = Path(spec.origin).parent / "datasets" / "data"
    files = {kind: folder / _STEM.format(kind) for kind in ("t1", "gm", "wm")}
    for path in files.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the nilearn installation; reinstall nilearn.")
    return files


def reference_volume(spacing: float = 2.0, margin: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template's T1 (scaled to [0, 1]) and tissue labels, cropped to the brain and resampled.

    Args:
        spacing: isotropic voxel size in mm of the result (the template is 1 mm).
        margin: voxels kept around the brain's bounding box (at 1 mm).

    Returns:
        ``(image, label, affine)``: image ``(X, Y, Z)`` float32, label ``(X, Y, Z)`` uint8, 4x4 affine.
    """
    files = template_files()
    loaded = {k: nib.load(str(p)) for k, p in files.items()}
    t1 = np.asarray(loaded["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(loaded["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(loaded["wm"].dataobj, dtype=np.float32) / 255.0
    brain = t1 > 0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    label = np.where(brain, np.argmax(np.stack([csf, gm, wm]), axis=0) + 1, 0).astype(np.uint8)

    voxels = np.argwhere(brain)
    lo = np.maximum(voxels.min(0) - margin, 0)
    hi = np.minimum(voxels.max(0) + margin + 1, brain.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = loaded["t1"].affine.copy()
    affine[:3, 3] += affine[:3, :3] @ lo
    image = t1[box] / 255.0
    label = label[box]

    resample_image = Spacing(pixdim=(spacing,) * 3, mode="bilinear")
    resample_label = Spacing(pixdim=(spacing,) * 3, mode="nearest")
    image_t = resample_image(MetaTensor(torch.from_numpy(image)[None], affine=torch.from_numpy(affine)))
    label_t = resample_label(MetaTensor(torch.from_numpy(label.astype(np.float32))[None], affine=torch.from_numpy(affine)))
    label_out = label_t[0].numpy().round().astype(np.uint8)
    # bilinear resampling blurs the brain's edge into the background: keep background exactly 0
    image_out = image_t[0].numpy().astype(np.float32) * (label_out > 0)
    return image_out, label_out, image_t.affine.numpy()


def _deformation(seed: int):
    from monai.transforms import (
        Compose,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandGaussianNoised,
        ScaleIntensityd,
    )

    keys = ["image", "label"]
    transform = Compose(
        [
            RandAffined(keys, prob=1.0, rotate_range=(0.15, 0.15, 0.15), scale_range=(0.1, 0.1, 0.1),
                        translate_range=(4, 4, 4), mode=("bilinear", "nearest"), padding_mode="zeros"),
            Rand3DElasticd(keys, sigma_range=(4, 6), magnitude_range=(20, 60), prob=1.0,
                           mode=("bilinear", "nearest"), padding_mode="zeros"),
            RandBiasFieldd("image", coeff_range=(0.1, 0.3), prob=1.0),
            RandAdjustContrastd("image", gamma=(0.7, 1.4), prob=1.0),
            RandGaussianNoised("image", std=0.03, prob=1.0),
            ScaleIntensityd("image", minv=0.0, maxv=1.0),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def _save(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), affine), str(path))


def prepare_demo(output_dir: str | Path, num_train: int = 12, num_val: int = 3, spacing: float = 2.0,
                 seed: int = 0) -> Path:
    """Write the demo data set; returns the path of its ``datalist.json``.

    Args:
        output_dir: folder to write into (created).
        num_train: deformed training cases.
        num_val: deformed validation cases.
        spacing: voxel size in mm.
        seed: random seed of the deformations.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"need at least one training and one validation case, got {num_train} and {num_val}.")
    out = Path(output_dir)
    image, label, affine = reference_volume(spacing)
    names = [f"brain_{i:03d}" for i in range(num_train + num_val)]
    for i, name in enumerate(names):
        case = _deformation(seed + i)({"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)[None]})
        case_label = np.asarray(case["label"][0]).round()
        # skull-stripped like the template: noise and bias only inside the brain, background exactly 0
        # (the bundles' non-zero normalisation relies on it)
        case_image = np.asarray(case["image"][0]) * (case_label > 0)
        _save(case_image, affine, out / "imagesTr" / f"{name}.nii.gz", np.float32)
        _save(case_label, affine, out / "labelsTr" / f"{name}.nii.gz", np.uint8)
    _save(image, affine, out / "imagesTs" / "brain_template.nii.gz", np.float32)
    _save(label, affine, out / "labelsTs" / "brain_template.nii.gz", np.uint8)

    pairs = [{"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz"} for n in names]
    test = {"image": "imagesTs/brain_template.nii.gz", "label": "labelsTs/brain_template.nii.gz"}
    dataset = {
        "name": "BrainTissueDemo",
        "description": "MNI ICBM152 2009c template (from nilearn) under random deformations; tissue labels "
        "from its probability maps",
        "reference": "Fonov et al., NeuroImage 2011; Fonov et al., NeuroImage 2009",
        "licence": "see the ICBM152 2009 licence shipped with nilearn",
        "tensorImageSize": "3D",
        "modality": {"0": "T1"},
        "labels": LABELS,
        "numTraining": len(pairs),
        "numTest": 1,
        "training": [{k: "./" + v for k, v in p.items()} for p in pairs],
        "test": ["./" + test["image"]],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1))
    datalist = {"training": pairs[:num_train], "validation": pairs[num_train:], "testing": [test]}
    (out / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return out / "datalist.json"


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, labels: dict[str, str] = LABELS) -> dict[str, float]:
    """Dice of each foreground class between two label maps (NaN where a class is in neither)."""
    from monai.metrics import compute_dice

    num_classes = len(labels)
    onehot = [torch.nn.functional.one_hot(torch.as_tensor(a, dtype=torch.long), num_classes).movedim(-1, 0)[None]
              for a in (prediction, reference)]
    scores = compute_dice(onehot[0], onehot[1], include_background=False, ignore_empty=True)[0]
    return {labels[str(i + 1)]: float(s) for i, s in enumerate(scores)}


def report(prediction_file: str, reference_file: str, image_file: str, figure_file: str) -> dict[str, float]:
    """Dice per class of a prediction and a PNG figure overlaying reference and prediction on slices.

    Returns the Dice scores (with their mean under ``"mean"``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    loaded = {}
    for name, path in (("prediction", prediction_file), ("reference", reference_file), ("image", image_file)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{name} file {path} does not exist.")
        loaded[name] = np.squeeze(np.asanyarray(nib.load(path).dataobj))
    pred, ref, image = loaded["prediction"], loaded["reference"], loaded["image"]
    if pred.shape != ref.shape or image.shape != ref.shape:
        raise ValueError(f"shapes differ: prediction {pred.shape}, reference {ref.shape}, image {image.shape}.")
    scores = dice_per_class(pred.astype(np.int64), ref.astype(np.int64))
    scores["mean"] = float(np.nanmean(list(scores.values())))

    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.6, 1.0, 0.55), (1.0, 0.4, 0.2, 0.55), (1.0, 1.0, 0.3, 0.55)])
    centre = [s // 2 for s in ref.shape]
    views = [("axial", lambda a: a[:, :, centre[2]]), ("coronal", lambda a: a[:, centre[1], :]),
             ("sagittal", lambda a: a[centre[0], :, :])]
    fig, axes = plt.subplots(2, 3, figsize=(11, 7.5))
    for col, (view, cut) in enumerate(views):
        for row, (title, labels) in enumerate((("reference", ref), ("prediction", pred))):
            ax = axes[row, col]
            ax.imshow(np.rot90(cut(image)), cmap="gray")
            ax.imshow(np.rot90(cut(labels)), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
            ax.set_title(f"{title}, {view}")
            ax.axis("off")
    legend = ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    fig.suptitle(f"QT-UNet demo, Dice: {legend}\nblue CSF, orange grey matter, yellow white matter", fontsize=10)
    fig.tight_layout()
    Path(figure_file).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure_file, dpi=90)
    plt.close(fig)
    return scores
