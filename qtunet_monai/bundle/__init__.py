# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""What the bundles need beyond MONAI: checked data lists and checkpoints that survive a killed run."""

from .checkpoints import BestModelSaver, ResumeCheckpoint, atomic_save, load_pretrained
from .datalist import DataError, check_cases, load_datalist

__all__ = [
    "BestModelSaver",
    "ResumeCheckpoint",
    "atomic_save",
    "load_pretrained",
    "DataError",
    "check_cases",
    "load_datalist",
]
