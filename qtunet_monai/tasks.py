# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Every task of the thesis in one place: the single source of truth the bundles are generated from.

A :class:`Task` holds what differs between the bundles, in three parts: its :class:`DataSource` (channels,
classes, spacing, intensity and where the data comes from: the pipeline of docs/architecture.md section 3), its
:class:`Recipe` (network and training, section 2) and its :class:`TaskDocs` (the thesis' result, citations,
metadata text); everything the bundles share is written once in the repository's ``tools/generate_bundles.py``
from the pipeline pieces of :mod:`qtunet_monai.pipeline`. Change a task here, then run
``python tools/generate_bundles.py`` and commit the regenerated ``bundles/`` folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import __version__
from .data.brats import BRATS_LABEL_VALUES, BRATS_REGIONS
from .data.btcv import BTCV_ORGANS
from .data.cityscapes import CATEGORY_MAP, CATEGORY_NAMES, CLASS_MAP, CLASS_NAMES, MEAN, STD
from .data.msd import MSD_TASKS
from .pipeline import (
    Crop,
    CTWindow,
    Intensity,
    NonzeroNorm,
    PosNegCrop,
    Pretrain,
    RGBNorm,
    SpatialCrop,
    flips,
    rot90,
    scale,
    shift,
)

__all__ = ["Task", "DataSource", "Recipe", "TaskDocs", "TASKS", "get_task"]

THESIS = "QT-UNet: Querying Transformer UNet, master's thesis, Norwegian University of Science and Technology (NTNU)"
MSD_REFERENCE = "Antonelli M. et al. The Medical Segmentation Decathlon. Nature Communications 13, 4128 (2022)"
SWIN_UNETR = ("Tang Y. et al. Self-Supervised Pre-Training of Swin Transformers for 3D Medical Image Analysis. "
              "CVPR 2022")


#: docs/architecture.md section 4: MSD tasks 2/4/5 in-task (350 epochs); CT-SSL (150 epochs)
IN_TASK_PRETRAIN = Pretrain(32, 2, 350, (96, 96, 96))
CT_PRETRAIN = Pretrain(32, 2, 150, (96, 96, 96))


@dataclass(frozen=True)
class DataSource:
    """What a data set is and how its images are read into the network's grid and range.

    Args:
        spatial_dims: 3 (NIfTI volumes) or 2 (PNG images).
        modality: ``MR``, ``CT`` or ``RGB``.
        channels: input channel names.
        classes: output channel names (index = channel); empty for unlabelled data.
        label_values: the values allowed in the label files.
        intensity: :class:`~qtunet_monai.pipeline.NonzeroNorm` (MRI), :class:`~qtunet_monai.pipeline.CTWindow`
            or :class:`~qtunet_monai.pipeline.RGBNorm`.
        pixdim: resampled voxel size in mm, or None to keep the data's.
        crop_foreground: crop to the image's foreground.
        regions: overlapping target regions as sets of label values (sigmoid outputs), or None (softmax).
        label_map: label file value -> class (CityScapes' ids), or None.
        void: class 0 is void, ignored in the loss and the metrics.
        labelled: False for unlabelled volumes: a pre-training-only bundle (no train/evaluate/inference configs).
        eval_split: the data list section evaluate.json scores.
        origin: where the data comes from (metadata ``data_source``).
        download: Markdown: how to get the data set.
    """

    spatial_dims: int
    modality: str
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    label_values: tuple[int, ...]
    intensity: Intensity
    pixdim: tuple[float, ...] | None
    crop_foreground: bool
    regions: tuple[tuple[int, ...], ...] | None = None
    label_map: tuple[int, ...] | None = None
    void: bool = False
    labelled: bool = True
    eval_split: str = "validation"
    origin: str = ""
    download: str = ""

    @property
    def in_channels(self) -> int:
        return len(self.channels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sigmoid(self) -> bool:
        return self.regions is not None


@dataclass(frozen=True)
class Recipe:
    """The network and how it is trained and validated (docs/architecture.md sections 2 and 4).

    Args:
        roi_size: training crop and sliding-window size.
        crop: :class:`~qtunet_monai.pipeline.SpatialCrop` or :class:`~qtunet_monai.pipeline.PosNegCrop`.
        augment: the task's random transforms after cropping.
        architecture / variant: the network (``qtunet_monai.networks.build_architecture``).
        preset: the default ``--preset`` (:data:`qtunet_monai.bundle.PRESETS`): the thesis' recipe, or ``accurate``.
        batch_size / num_samples / max_epochs / val_interval / learning_rate / weight_decay / drop_path_rate:
            the training recipe (``num_samples`` crops per case).
        cache_rate / num_workers: MONAI's ``CacheDataset`` and ``DataLoader`` settings.
        hd95: also report the 95th-percentile Hausdorff distance (mm at 1 mm spacing).
        iou: also report mean IoU.
        pretrain: the in-task self-supervised pre-training recipe (docs/architecture.md section 4).
    """

    roi_size: tuple[int, ...]
    crop: Crop
    augment: tuple[dict, ...] = ()
    architecture: str = "QT-UNet"
    variant: str = "tiny"
    preset: str = "thesis"
    batch_size: int = 1
    num_samples: int = 1
    max_epochs: int = 350
    val_interval: int = 10
    learning_rate: float = 4e-5
    weight_decay: float = 0.0
    drop_path_rate: float = 0.2
    cache_rate: float = 1.0
    num_workers: int = 4
    hd95: bool = False
    iou: bool = False
    pretrain: Pretrain = IN_TASK_PRETRAIN


@dataclass(frozen=True)
class TaskDocs:
    """What the bundle says about itself: metadata text and its docs' README.

    Args:
        thesis_result: Markdown lines with the thesis' result for this task.
        note: Markdown: a note for the pipeline section of the docs.
        references: citations (metadata and docs).
        generated: write ``docs/README.md`` (the demo has hand-written docs).
        summary: metadata ``description`` (default: the network and recipe).
        intended_use: metadata ``intended_use``.
        version / changelog: metadata ``version`` and its ``changelog`` entry.
        eval_metrics: metadata ``eval_metrics``: a result measured with this package, left out while empty (the
            thesis' figures are :attr:`thesis_result`, in the docs).
        extra_packages: required packages beyond the common ones (metadata).
    """

    thesis_result: str = ""
    note: str = ""
    references: tuple[str, ...] = (THESIS,)
    generated: bool = True
    summary: str = ""
    intended_use: str = "Research only; not for diagnostic use"
    version: str = __version__
    changelog: str = "first release"
    eval_metrics: dict = field(default_factory=dict)
    extra_packages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """One bundle: its names, its data, its recipe and its docs.

    Args:
        bundle: the folder under ``bundles/``.
        data: the key of ``python -m qtunet_monai fake_data / prepare_data``.
        title: the bundle's ``name`` in metadata.json.
        description: what is segmented (metadata ``task``).
        source: the data set (:class:`DataSource`).
        recipe: the network and training (:class:`Recipe`).
        docs: metadata and README text (:class:`TaskDocs`).
    """

    bundle: str
    data: str
    title: str
    description: str
    source: DataSource
    recipe: Recipe
    docs: TaskDocs = field(default_factory=TaskDocs)

    @property
    def pretraining_only(self) -> bool:
        """Unlabelled data: the bundle pre-trains an encoder only."""
        return not self.source.labelled

    @property
    def description_text(self) -> str:
        """Metadata ``description``: the docs' summary, or the network and recipe."""
        return self.docs.summary or (f"{self.recipe.architecture}-{self.recipe.variant[0].upper()} (Querying "
                                     "Transformer UNet) trained with the recipe of the QT-UNet thesis")


def _msd(key: str, number: int, *, intensity: Intensity, pixdim: tuple[float, ...] | None, crop_foreground: bool,
         crop: Crop, augment: list[dict], scores: tuple[float, ...], regions: tuple[tuple[int, ...], ...] | None = None,
         hd95: bool = False, cache_rate: float = 1.0, pretrain: Pretrain = CT_PRETRAIN,
         roi_size: tuple[int, ...] = (96, 96, 96), note: str = "") -> Task:
    """An MSD task's bundle from the facts in :data:`qtunet_monai.data.msd.MSD_TASKS`.

    Args:
        key / number: the task's key (``msd_<key>``) and MSD task number.
        scores: the thesis' mean Dice for T/S/B from scratch, then pre-trained (Table 4.4).
        the others: as :class:`DataSource`, :class:`Recipe` and :class:`TaskDocs`.
    """
    msd = MSD_TASKS[key]
    classes = ("tumour core", "whole tumour", "enhancing tumour") if regions else msd.labels
    return Task(
        bundle=f"qtunet_msd_{key}_segmentation",
        data=f"msd_{key}",
        title=f"QT-UNet: MSD Task{number:02d} {msd.name}",
        description=f"Medical Segmentation Decathlon {msd.folder}: " + ", ".join(msd.labels[1:]),
        source=DataSource(
            spatial_dims=3,
            modality="CT" if msd.ct else "MR",
            channels=msd.modality,
            classes=classes,
            label_values=tuple(range(msd.num_classes)),
            intensity=intensity,
            pixdim=pixdim,
            crop_foreground=crop_foreground,
            regions=regions,
            origin=f"Medical Segmentation Decathlon {msd.folder} (http://medicaldecathlon.com), CC-BY-SA 4.0",
            download=(
                f"Download `{msd.folder}.tar` from the Medical Segmentation Decathlon (http://medicaldecathlon.com or "
                f"`monai.apps.DecathlonDataset(..., download=True)`) and extract it into one folder "
                f"(`/path/to/download` below), so that `/path/to/download/{msd.folder}/dataset.json` exists."
            ),
        ),
        recipe=Recipe(roi_size=roi_size, crop=crop, augment=tuple(augment), hd95=hd95, cache_rate=cache_rate,
                      pretrain=pretrain),
        docs=TaskDocs(
            note=note,
            references=(THESIS, MSD_REFERENCE, SWIN_UNETR),
            thesis_result=(
                f"Thesis Table 4.4, MSD Task {number}, mean Dice on MONAI's Decathlon validation fold: "
                f"QT-UNet-T/S/B from scratch {scores[0]} / {scores[1]} / {scores[2]}; "
                f"pre-trained {scores[3]} / {scores[4]} / {scores[5]}."
            ),
        ),
    )


_MSD_BRAIN_REGIONS = ((2, 3), (1, 2, 3), (3,))  # dataset.json: 1 edema, 2 non-enhancing, 3 enhancing tumour

TASKS: dict[str, Task] = {}
for _task in [
    Task(
        bundle="qtunet_brats21_segmentation",
        data="brats21",
        title="QT-UNet: BraTS 2021 brain tumour segmentation",
        description="Brain tumour sub-region segmentation (tumour core, whole tumour, enhancing tumour) of multi-parametric MRI",
        source=DataSource(
            spatial_dims=3,
            modality="MR",
            channels=("T1", "T1Gd", "T2", "FLAIR"),
            classes=("tumour core", "whole tumour", "enhancing tumour"),
            label_values=BRATS_LABEL_VALUES,
            intensity=NonzeroNorm(),
            pixdim=(1.0, 1.0, 1.0),
            crop_foreground=True,
            regions=BRATS_REGIONS,
            eval_split="testing",
            origin=("RSNA-ASNR-MICCAI Brain Tumor Segmentation (BraTS) Challenge 2021, task 1 training data "
                    "(1,251 cases)"),
            download=(
                "Register for the RSNA-ASNR-MICCAI BraTS 2021 challenge (Synapse) and download the task 1 training "
                "data (`RSNA_ASNR_MICCAI_BraTS2021_TrainingData_16July2021`, 1,251 case folders `BraTS2021_NNNNN` "
                "with `_t1`, `_t1ce`, `_t2`, `_flair` and `_seg` NIfTI files)."
            ),
        ),
        recipe=Recipe(
            roi_size=(128, 128, 128),
            crop=SpatialCrop(),
            hd95=True,
            cache_rate=0.0,
            # in-task pre-training on the regular training crops (thesis 3.5.1: "identical to those used for
            # regular training")
            pretrain=Pretrain(8, 4, 350, (128, 128, 128)),
        ),
        docs=TaskDocs(
            references=(THESIS, ("Baid U. et al. The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor "
                        "Segmentation and Radiogenomic Classification. arXiv:2107.02314"),
                        ("Peiris H. et al. A Robust Volumetric Transformer for Accurate 3D Tumor Segmentation. "
                         "MICCAI 2022")),
            thesis_result=(
                "Thesis Table 4.1 (own 834/208/209 split, test set): mean Dice over ET, TC, WT for QT-UNet-T/S/B from "
                "scratch 88.15 / 88.56 / 88.69 and HD95 5.79 / 5.39 / 4.92 mm; pre-trained on BraTS 88.03 / 88.50 / "
                "88.61 and 5.31 / 5.18 / 4.85 mm."
            ),
        ),
    ),
    Task(
        bundle="qtunet_btcv_segmentation",
        data="btcv",
        title="QT-UNet: BTCV multi-organ segmentation",
        description="Abdominal multi-organ segmentation (13 organs) of portal venous phase CT",
        source=DataSource(
            spatial_dims=3,
            modality="CT",
            channels=("CT",),
            classes=("background",) + BTCV_ORGANS,
            label_values=tuple(range(14)),
            intensity=CTWindow(-175.0, 250.0),
            pixdim=(1.5, 1.5, 2.0),
            crop_foreground=True,
            origin="Multi-Atlas Labeling Beyond the Cranial Vault (BTCV) abdomen challenge, RawData (Synapse)",
            download=(
                "Register on Synapse for \"Multi-Atlas Labeling Beyond the Cranial Vault\" and download `RawData.zip` "
                "(abdomen); extract it so that `RawData/Training/img` and `RawData/Training/label` exist."
            ),
        ),
        recipe=Recipe(
            roi_size=(96, 96, 96),
            crop=PosNegCrop(1, 1),
            augment=tuple(flips(0.1) + rot90(0.1) + shift(0.5)),
            pretrain=Pretrain(32, 2, 150, (96, 96, 96)),
        ),
        docs=TaskDocs(
            references=(THESIS, ("Landman B. et al. MICCAI Multi-Atlas Labeling Beyond the Cranial Vault - Workshop "
                        "and Challenge, 2015"), SWIN_UNETR),
            thesis_result=(
                "Thesis Table 4.3 (35 training scans, 5 for validation and testing): mean Dice for QT-UNet-T/S/B from "
                "scratch 38.51 / 50.33 / 52.58; pre-trained on CT-SSL 53.50 / 50.27 / 54.96."
            ),
        ),
    ),
    # Task 1 crops 128^3 "identical to BraTS" (thesis 3.2.1 and the footnote of 5.2.1) and is pre-trained as BraTS
    _msd("brain", 1, intensity=NonzeroNorm(), pixdim=(1.0, 1.0, 1.0), crop_foreground=True, crop=SpatialCrop(),
         augment=flips(0.5) + scale(0.1) + shift(0.1), regions=_MSD_BRAIN_REGIONS, hd95=True, roi_size=(128, 128, 128),
         scores=(77.37, 77.79, 77.81, 77.41, 77.68, 77.86), cache_rate=0.0,
         pretrain=Pretrain(8, 4, 350, (128, 128, 128))),
    _msd("heart", 2, intensity=NonzeroNorm(), pixdim=(1.0, 1.0, 1.0), crop_foreground=True, crop=PosNegCrop(2, 1),
         augment=flips(0.5) + rot90(0.1) + scale(0.2) + shift(0.5), scores=(85.57, 85.81, 86.52, 85.02, 85.40, 86.70),
         pretrain=Pretrain(32, 2, 350, (96, 96, 96))),
    _msd("liver", 3, intensity=CTWindow(-21.0, 189.0), pixdim=(1.0, 1.0, 1.0), crop_foreground=True,
         crop=PosNegCrop(1, 1), augment=flips(0.2) + rot90(0.2) + scale(0.1) + shift(0.1),
         scores=(36.00, 46.09, 39.31, 51.65, 37.14, 38.56), cache_rate=0.0),
    _msd("hippocampus", 4, intensity=NonzeroNorm(), pixdim=(0.2, 0.2, 0.2), crop_foreground=True, crop=SpatialCrop(),
         augment=flips(0.1) + rot90(0.1) + scale(0.1) + shift(0.1), scores=(85.45, 82.37, 82.92, 85.23, 82.19, 83.77),
         cache_rate=0.0, pretrain=Pretrain(32, 2, 350, (96, 96, 96)),
         # the thesis' stated spacing (native ~1 mm): kept, flagged in the docs
         note=("Note: the thesis states 0.2 mm spacing for Hippocampus (native about 1 mm); this bundle keeps "
               "it. Override `--pixdim \"[1.0,1.0,1.0]\"` in all commands to train at the native resolution.")),
    _msd("prostate", 5, intensity=NonzeroNorm(), pixdim=(0.5, 0.5, 0.5), crop_foreground=True, crop=SpatialCrop(),
         augment=flips(0.5) + scale(0.5) + shift(0.5)
         + [{"_target_": "RandAffined", "keys": ["image", "label"], "prob": 0.5, "scale_range": [0.3, 0.3, 0.0],
             "rotate_range": [0.0, 0.0, math.pi], "mode": ["bilinear", "nearest"], "padding_mode": "zeros"}],
         scores=(30.62, 30.90, 32.26, 27.79, 31.07, 34.08), pretrain=Pretrain(32, 2, 350, (96, 96, 96))),
    _msd("lung", 6, intensity=CTWindow(-1000.0, 1000.0), pixdim=(1.0, 1.0, 1.0), crop_foreground=False,
         crop=PosNegCrop(2, 1), augment=flips(0.5) + rot90(0.3) + scale(0.1) + shift(0.1),
         scores=(26.02, 19.55, 23.21, 27.23, 19.91, 23.85), cache_rate=0.0),
    _msd("pancreas", 7, intensity=CTWindow(-87.0, 199.0), pixdim=None, crop_foreground=False, crop=PosNegCrop(1, 1),
         augment=flips(0.5) + rot90(0.25) + scale(0.5), scores=(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), cache_rate=0.0),
    _msd("hepaticvessel", 8, intensity=CTWindow(0.0, 230.0), pixdim=None, crop_foreground=False,
         crop=PosNegCrop(1, 1), augment=flips(0.5) + rot90(0.25) + scale(0.5),
         scores=(42.41, 37.07, 33.77, 45.01, 36.98, 38.01), cache_rate=0.0),
    _msd("spleen", 9, intensity=CTWindow(-125.0, 275.0), pixdim=(1.0, 1.0, 1.0), crop_foreground=False,
         crop=PosNegCrop(1, 1), augment=flips(0.15) + scale(0.1) + shift(0.1),
         scores=(49.30, 51.94, 48.10, 49.86, 53.31, 56.45)),
    _msd("colon", 10, intensity=CTWindow(-57.0, 175.0), pixdim=None, crop_foreground=False, crop=PosNegCrop(1, 1),
         augment=flips(0.5) + rot90(0.25) + scale(0.5), scores=(14.11, 13.02, 15.76, 14.04, 13.52, 12.87),
         cache_rate=0.0),
    *[
        Task(
            bundle=f"qtunet2d_{key}_segmentation",
            data=key,
            title=f"QT-UNet-2D: {name} semantic segmentation",
            description=f"Urban street scene semantic segmentation ({len(classes) - 1} {unit}, void ignored)",
            source=DataSource(
                spatial_dims=2,
                modality="RGB",
                channels=("R", "G", "B"),
                classes=classes,
                label_values=tuple(range(34)),
                label_map=mapping,
                void=True,
                intensity=RGBNorm(MEAN, STD, source="CityScapes"),
                pixdim=None,
                crop_foreground=False,
                origin="Cityscapes fine annotations (leftImg8bit, gtFine), https://www.cityscapes-dataset.com",
                download=(
                    "Register at https://www.cityscapes-dataset.com and download `leftImg8bit_trainvaltest.zip` and "
                    "`gtFine_trainvaltest.zip`; extract both into one folder `cityscapes` (it then holds "
                    "`leftImg8bit/` and `gtFine/`)."
                ),
            ),
            recipe=Recipe(
                roi_size=(1024, 1024),
                crop=SpatialCrop(),
                architecture="QT-UNet-2D",
                batch_size=4,
                max_epochs=150,
                val_interval=5,
                weight_decay=0.001,
                cache_rate=0.0,
                iou=True,
                pretrain=Pretrain(16, 2, 150, (1024, 1024)),
            ),
            docs=TaskDocs(
                references=(THESIS, ("Cordts M. et al. The Cityscapes Dataset for Semantic Urban Scene "
                            "Understanding. CVPR 2016")),
                thesis_result=result,
            ),
        )
        for key, name, classes, mapping, unit, result in [
            ("cityscapes", "CityScapes", CLASS_NAMES, CLASS_MAP, "classes",
             ("Thesis Table 4.6 (val): mean Dice / mean IoU for QT-UNet-2D-T/S/B from scratch 39.12 / 20.74, "
             "39.35 / 21.04, 39.50 / 21.15; pre-trained on CityScapes coarse 41.53 / 25.86, 41.97 / 25.97, "
             "39.03 / 21.00 (the thesis trained and scored the void class, this bundle ignores it).")),
            ("cityscapescat", "CityScapesCat", CATEGORY_NAMES, CATEGORY_MAP, "categories",
             ("Thesis Table 4.7 (val): mean Dice / mean IoU for QT-UNet-2D-T/S/B from scratch 55.46 / 50.91, "
             "56.40 / 51.17, 57.45 / 52.45; pre-trained 63.23 / 60.37, 64.21 / 61.55, 58.45 / 54.26.")),
        ]
    ],
    *[
        Task(
            bundle=f"qtunet_{key}_pretraining",
            data=key,
            title=f"QT-UNet: out-of-task self-supervised pre-training on {modality} volumes",
            description=(f"Self-supervised pre-training (reconstruction, rotation, BYOL) of the QT-UNet encoder on "
                         f"any folder tree of {modality} NIfTI volumes"),
            source=DataSource(
                spatial_dims=3,
                modality=modality,
                channels=(modality,),
                classes=(),
                label_values=(),
                intensity=intensity,
                pixdim=(1.0, 1.0, 1.0),
                crop_foreground=True,
                labelled=False,
                origin=source,
                download=docs,
            ),
            recipe=Recipe(roi_size=(96, 96, 96), crop=SpatialCrop(), cache_rate=0.0,
                          pretrain=Pretrain(32, 2, 150, (96, 96, 96))),
            docs=TaskDocs(
                references=(THESIS, SWIN_UNETR, ("Grill J.-B. et al. Bootstrap Your Own Latent: A New Approach to "
                            "Self-Supervised Learning. NeurIPS 2020")),
                thesis_result=result,
            ),
        )
        for key, modality, intensity, source, result, docs in [
            ("ctssl", "CT", CTWindow(-1000.0, 1000.0),
             ("Any folder tree of CT NIfTI volumes; the thesis' CT-SSL corpus: 3,597 CT scans from public TCIA "
             "collections"),
             ("Thesis: QT-UNet-T pre-trained on CT-SSL gained 15 Dice points on BTCV (38.51 -> 53.50) and improved "
             "several MSD CT tasks; its Base model collapsed mid-training unnoticed (this workflow warns)."),
             ("Gather CT scans as NIfTI in one folder tree (any depth). The thesis' CT-SSL (3,597 scans) drew on "
             "public TCIA collections as Swin-UNETR's pre-training did: LUNA16 / LIDC-IDRI, TCIA COVID-19, "
             "HNSCC, TCIA Colonography, and the unlabelled CT tasks of the Medical Segmentation Decathlon and "
             "LiTS, converted from DICOM to NIfTI (e.g. with dcm2niix).")),
            ("mrissl", "MR", NonzeroNorm(),
             "Any folder tree of (single-channel) MRI NIfTI volumes",
             "Thesis: in-task MRI pre-training (BraTS) lowered HD95 on BraTS 2021 (QT-UNet-T 5.79 -> 5.31 mm).",
             ("Gather MRI volumes as NIfTI in one folder tree (any depth), e.g. the modalities of BraTS, IXI or "
             "OASIS; every file is one channel.")),
        ]
    ],
    Task(
        bundle="qtunet_demo_brain_tissue_segmentation",
        data="demo",
        title="QT-UNet demo: brain tissue segmentation",
        description="Brain tissue segmentation (CSF, grey matter, white matter) of T1-weighted MRI",
        source=DataSource(
            spatial_dims=3,
            modality="MR",
            channels=("T1",),
            classes=("background", "CSF", "grey matter", "white matter"),
            label_values=(0, 1, 2, 3),
            intensity=NonzeroNorm(),
            pixdim=(2.0, 2.0, 2.0),
            crop_foreground=False,
            eval_split="testing",
            origin=(
                "MNI ICBM152 2009c nonlinear symmetric template (T1, grey- and white-matter probability maps) inside "
                "the nilearn wheel (nilearn/datasets/data); cases made by random affine and elastic deformation "
                "(python -m qtunet_monai prepare_demo)"
            ),
        ),
        recipe=Recipe(
            # 56 = 14 tokens per axis after the 4x patch embedding, a multiple of the 7-token window
            roi_size=(56, 56, 56),
            crop=PosNegCrop(1, 1),
            augment=tuple(flips(0.5, dims=1) + scale(0.5) + shift(0.5)),
            preset="accurate",
            num_samples=2,
            # the accurate preset's epochs that fit SegResNet's 30-epoch time (benchmarks/demo_options.py)
            max_epochs=25,
            val_interval=5,
            learning_rate=1e-3,  # the demo trains for minutes, not 350 epochs
            num_workers=0,
            # like the demo's training: minutes, not hundreds of epochs
            pretrain=Pretrain(2, 2, 10, (56, 56, 56), learning_rate=1e-3, warmup_epochs=1),
        ),
        docs=TaskDocs(
            generated=False,
            changelog="first release: QT-UNet-T demo on the MNI ICBM152 template shipped with nilearn",
            eval_metrics={"mean_dice": 0.88},  # --preset accurate, 3 seeds (benchmarks/demo_options.py)
            summary=("QT-UNet-T (Querying Transformer UNet) trained on random deformations of the MNI ICBM152 2009c "
                     "template that the nilearn package ships; a demonstration that runs end to end on a CPU in "
                     "minutes, not a clinical model"),
            intended_use="Demonstration and testing only; not for diagnostic use",
            extra_packages=("nilearn",),
            references=(
                THESIS,
                ("Peiris H., Hayat M., Chen Z., Egan G., Harandi M. A Robust Volumetric Transformer for Accurate 3D "
                 "Tumor Segmentation. MICCAI 2022"),
                ("Fonov V., Evans A.C., Botteron K., Almli C.R., McKinstry R.C., Collins D.L. Unbiased average "
                 "age-appropriate atlases for pediatric studies. NeuroImage 54(1), 2011"),
                ("Fonov V., Evans A.C., McKinstry R.C., Almli C.R., Collins D.L. Unbiased nonlinear average "
                 "age-appropriate brain templates from birth to adulthood. NeuroImage 47, S102, 2009"),
            ),
        ),
    ),
]:
    TASKS[_task.bundle] = _task


def get_task(name: str) -> Task:
    """A task by its bundle folder name or its data key (``brats21``, ``msd_spleen``, ``cityscapes``, ...)."""
    for task in TASKS.values():
        if name in (task.bundle, task.data):
            return task
    raise ValueError(f"unknown task {name!r}; choose one of {[t.data for t in TASKS.values()]}.")
