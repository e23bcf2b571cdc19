# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The ten Medical Segmentation Decathlon tasks: their official layout, data lists with MONAI's
Decathlon splits, and fake data in that layout so every MSD bundle runs end to end anywhere.

The official download of task ``TaskNN_Name`` is a folder with ``dataset.json``, ``imagesTr``,
``labelsTr`` and ``imagesTs``; multi-modal tasks (brain tumour, prostate) store the modalities as
the fourth axis of one NIfTI file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["MSDTask", "MSD_TASKS", "blob_label", "write_fake_msd", "msd_datalist"]


@dataclass(frozen=True)
class MSDTask:
    """Facts of one MSD task, as its ``dataset.json`` states them."""

    folder: str
    name: str
    prefix: str  # case file names: <prefix>_<number>.nii.gz
    modality: tuple[str, ...]
    labels: tuple[str, ...]  # index = label value
    ct: bool
    spacing: tuple[float, float, float]  # typical voxel size of the fake data (mm)

    @property
    def in_channels(self) -> int:
        return len(self.modality)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


MSD_TASKS: dict[str, MSDTask] = {
    "brain": MSDTask("Task01_BrainTumour", "BRATS", "BRATS", ("FLAIR", "T1w", "t1gd", "T2w"),
                     ("background", "edema", "non-enhancing tumor", "enhancing tumour"), False, (1.0, 1.0, 1.0)),
    "heart": MSDTask("Task02_Heart", "LeftAtrium", "la", ("MRI",), ("background", "left atrium"), False,
                     (1.25, 1.25, 1.37)),
    "liver": MSDTask("Task03_Liver", "LiverTumour", "liver", ("CT",), ("background", "liver", "cancer"), True,
                     (0.8, 0.8, 1.5)),
    "hippocampus": MSDTask("Task04_Hippocampus", "Hippocampus", "hippocampus", ("MRI",),
                           ("background", "Anterior", "Posterior"), False, (1.0, 1.0, 1.0)),
    "prostate": MSDTask("Task05_Prostate", "Prostate", "prostate", ("T2", "ADC"),
                        ("background", "PZ", "TZ"), False, (0.6, 0.6, 3.6)),
    "lung": MSDTask("Task06_Lung", "Lung", "lung", ("CT",), ("background", "cancer"), True, (0.8, 0.8, 2.5)),
    "pancreas": MSDTask("Task07_Pancreas", "Pancreas", "pancreas", ("CT",), ("background", "pancreas", "cancer"),
                        True, (0.8, 0.8, 2.5)),
    "hepaticvessel": MSDTask("Task08_HepaticVessel", "HepaticVessel", "hepaticvessel", ("CT",),
                             ("background", "Vessel", "Tumour"), True, (0.8, 0.8, 5.0)),
    "spleen": MSDTask("Task09_Spleen", "Spleen", "spleen", ("CT",), ("background", "spleen"), True, (0.8, 0.8, 5.0)),
    "colon": MSDTask("Task10_Colon", "Colon", "colon", ("CT",), ("background", "colon cancer primaries"), True,
                     (0.8, 0.8, 5.0)),
}


def _task(key: str) -> MSDTask:
    if key not in MSD_TASKS:
        raise ValueError(f"unknown MSD task {key!r}; choose one of {list(MSD_TASKS)}.")
    return MSD_TASKS[key]


def blob_label(shape: tuple[int, ...], num_labels: int, rng: np.random.Generator) -> np.ndarray:
    """A label map of nested blobs: value 1 the largest, each next value a smaller blob inside it."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    centre = np.array(shape) / 2 + rng.uniform(-0.1, 0.1, len(shape)) * np.array(shape)
    radius = min(shape) * rng.uniform(0.25, 0.35)
    for value in range(1, num_labels + 1):
        r = radius * (1 - 0.8 * (value - 1) / max(num_labels, 1))
        label[np.linalg.norm(grid - centre, axis=-1) < r] = value
    return label


def _fake_case(task: MSDTask, shape: tuple[int, int, int], rng: np.random.Generator):
    """An image with the task's channels and value ranges, and nested blobs carrying every label."""
    label = blob_label(shape, task.num_classes - 1, rng)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float32)
    body = np.linalg.norm(grid - np.array(shape) / 2, axis=-1) < min(shape) * 0.48
    channels = []
    for c in range(task.in_channels):
        if task.ct:  # Hounsfield units: air outside the body, soft tissue inside, contrast per class
            image = np.where(body, 40.0, -1000.0) + 30.0 * label + rng.normal(0, 10, shape)
        else:  # MRI: positive intensities, zero outside the head/body
            image = np.where(body, 200.0 + 80.0 * label * (1 + 0.3 * c) + rng.normal(0, 20, shape), 0.0)
        channels.append(image.astype(np.float32))
    image = channels[0] if task.in_channels == 1 else np.stack(channels, -1)
    return image, label


def write_fake_msd(root: str | Path, task: str, num_training: int = 5, num_test: int = 1,
                   shape: tuple[int, int, int] = (48, 48, 32), seed: int = 0) -> Path:
    """Write a tiny fake data set in the official layout of an MSD task; returns the task folder.

    Right channel count (as the 4th axis for multi-modal tasks), value ranges (Hounsfield units
    for CT), label values and file names; the content is blobs, only for running pipelines.

    Args:
        root: where the task folder (e.g. ``Task09_Spleen``) is created.
        task: a key of :data:`MSD_TASKS`.
        num_training: labelled cases.
        num_test: unlabelled test cases.
        shape: spatial shape of every case.
        seed: random seed.
    """
    spec = _task(task)
    folder = Path(root) / spec.folder
    rng = np.random.default_rng(seed)
    affine = np.diag([*spec.spacing, 1.0])
    training, test = [], []
    for i in range(num_training + num_test):
        image, label = _fake_case(spec, tuple(shape), rng)
        name = f"{spec.prefix}_{i + 1:03d}.nii.gz"
        if i < num_training:
            (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
            (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTr" / name))
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            (folder / "imagesTs").mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(image, affine), str(folder / "imagesTs" / name))
            test.append(f"./imagesTs/{name}")
    dataset = {
        "name": spec.name,
        "description": f"FAKE data in the layout of {spec.folder} (qtunet_monai.data.msd.write_fake_msd)",
        "reference": "fake data; the real task: Antonelli et al., The Medical Segmentation Decathlon, Nat Commun 2022",
        "licence": "CC-BY-SA 4.0 (the real data set)",
        "release": "fake",
        "tensorImageSize": "4D" if spec.in_channels > 1 else "3D",
        "modality": {str(i): m for i, m in enumerate(spec.modality)},
        "labels": {str(i): n for i, n in enumerate(spec.labels)},
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    return folder


def msd_datalist(root: str | Path, task: str, output_file: str | Path, val_frac: float = 0.2,
                 seed: int = 0) -> Path:
    """Turn an official MSD task folder into a bundle data list with MONAI's Decathlon splits.

    ``training`` and ``validation`` are exactly the cases ``monai.apps.DecathlonDataset`` gives for
    its ``training`` and ``validation`` sections (same ``val_frac`` and ``seed``); ``testing`` is
    the unlabelled ``test`` list. Paths are absolute.

    Args:
        root: the folder holding ``TaskNN_Name`` (as for ``DecathlonDataset(root_dir=...)``).
        task: a key of :data:`MSD_TASKS`.
        output_file: the JSON data list to write.
        val_frac: validation fraction (MONAI's default 0.2).
        seed: split seed (MONAI's default 0).
    """
    from monai.apps import DecathlonDataset

    spec = _task(task)
    folder = Path(root) / spec.folder
    if not (folder / "dataset.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'dataset.json'} not found: download {spec.folder}.tar from the Medical Segmentation "
            f"Decathlon and extract it into {root}."
        )
    splits = {}
    for section in ("training", "validation"):
        dataset = DecathlonDataset(root, spec.folder, section, transform=lambda x: x, download=False,
                                   seed=seed, val_frac=val_frac, cache_rate=0.0, progress=False)
        splits[section] = [{"image": d["image"], "label": d["label"]} for d in dataset.data]
    listed = json.loads((folder / "dataset.json").read_text())
    splits["testing"] = [{"image": str((folder / t).resolve())} for t in listed.get("test", [])]
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(splits, indent=1))
    return out
