# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""What the bundles need beyond MONAI: checked data lists, checkpoints that survive a killed run, region
and void-class transforms and the void-masked loss. (The bundles themselves are written by the repository's
``tools/generate_bundles.py``.)"""

from .checkpoints import BestModelSaver, ResumeCheckpoint, atomic_save, load_pretrained
from .datalist import DataError, check_cases, load_datalist
from .distributed import DeviceError, init_distributed, local_gpu, local_rank, process_device
from ..networks.imagenet import load_imagenet_swin
from .optim import no_weight_decay_names, param_groups
from .transforms import LabelsToRegionsd, MaskVoidd, RegionsToLabelsd, VoidMaskedDiceLoss

__all__ = [
    "BestModelSaver",
    "ResumeCheckpoint",
    "atomic_save",
    "load_pretrained",
    "load_imagenet_swin",
    "no_weight_decay_names",
    "param_groups",
    "DataError",
    "check_cases",
    "load_datalist",
    "DeviceError",
    "init_distributed",
    "local_gpu",
    "local_rank",
    "process_device",
    "LabelsToRegionsd",
    "RegionsToLabelsd",
    "MaskVoidd",
    "VoidMaskedDiceLoss",
]
