# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""What the bundles need beyond MONAI: checked data lists, checkpoints and predictions that survive a
killed run, region and void-class transforms and the void-masked loss. (The bundles themselves are written
by the repository's ``tools/generate_bundles.py``.)

Importing this package (every bundle config does) installs :func:`~.errors.install_excepthook`, so
that a data or checkpoint error ends the run with its own one-line message rather than MONAI's
``Failed to evaluate ConfigExpression`` traceback; ``QTUNET_MONAI_DEBUG=1`` shows the traceback too.
"""

from ..networks.imagenet import load_imagenet_swin
from .architectures import BASELINES, build_network
from .budget import TrainingTimeBudget
from .checkpoints import (
    BestModelSaver,
    ResumeCheckpoint,
    StopOnNonFiniteLoss,
    atomic_save,
    load_pretrained,
    prepare_folder,
)
from .datalist import check_cases, folder_datalist, load_datalist
from .distributed import DeviceError, finish_distributed, init_distributed, local_gpu, local_rank, process_device
from .errors import (
    CheckpointError,
    DataError,
    NonFiniteError,
    OutputError,
    ReportedError,
    SettingError,
    install_excepthook,
)
from .files import AtomicNibabelWriter, AtomicPILWriter, check_writable, clean_stale_temporaries
from .folds import load_fold, write_folds
from .inference import FlipTTAInferer, FoldEnsemble, InferenceTimer
from .onnx_export import export_onnx
from .optim import lr_schedule, no_weight_decay_names, param_groups
from .presets import PRESETS, network_options, preset
from .settings import (
    LazyCases,
    check_settings,
    lazy,
    load_settings,
    settings_file,
    write_settings,
)
from .transforms import LabelsToRegionsd, MaskVoidd, RegionsToLabelsd, VoidMaskedDiceLoss

__all__ = [
    "BASELINES",
    "build_network",
    "load_fold",
    "write_folds",
    "FlipTTAInferer",
    "FoldEnsemble",
    "InferenceTimer",
    "export_onnx",
    "BestModelSaver",
    "ResumeCheckpoint",
    "StopOnNonFiniteLoss",
    "TrainingTimeBudget",
    "prepare_folder",
    "ReportedError",
    "CheckpointError",
    "OutputError",
    "NonFiniteError",
    "SettingError",
    "install_excepthook",
    "check_writable",
    "clean_stale_temporaries",
    "AtomicNibabelWriter",
    "AtomicPILWriter",
    "atomic_save",
    "load_pretrained",
    "load_imagenet_swin",
    "no_weight_decay_names",
    "param_groups",
    "PRESETS",
    "preset",
    "network_options",
    "settings_file",
    "load_settings",
    "write_settings",
    "check_settings",
    "LazyCases",
    "lazy",
    "DataError",
    "check_cases",
    "load_datalist",
    "folder_datalist",
    "DeviceError",
    "init_distributed",
    "finish_distributed",
    "local_gpu",
    "local_rank",
    "process_device",
    "LabelsToRegionsd",
    "RegionsToLabelsd",
    "MaskVoidd",
    "VoidMaskedDiceLoss",
]

install_excepthook()
