# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Undersampled MRI reconstruction with the QT-UNet family on MONAI's ``monai.apps.reconstruction``:
simulation of demo k-space in fastMRI's layout, a fastMRI reader that keeps the single-coil target, data
checks, the transforms and metrics MONAI lacks, residual image-domain networks, and the pipeline dicts the
bundle ``bundles/qtunet_demo_mri_reconstruction`` is generated from (``tools/generate_reconstruction_bundle.py``).

h5py (fastMRI files are HDF5) is the ``reconstruction`` extra; it is imported only where files are read or
written.
"""

from . import pipeline
from .commands import prepare_recon_data, prepare_recon_demo, recon_report
from .io import TARGET_KEYS, FastMRIVolumeReader, check_kspace_cases, check_mask_settings, load_kspace_datalist
from .metrics import FastMRISSIMMetric, L1SSIMLoss, NMSEMetric, nmse, psnr, ssim
from .networks import BASICUNET_FEATURES, ResidualRefiner, build_recon_network, recon_architectures
from .report import bundle_report, figure, volume_metrics
from .simulate import DEMO_BUNDLE_DATA, prepare_demo, simulate_kspace, smooth_phase, write_fastmri_h5, zero_filled
from .transforms import (
    MASKS,
    CheckUndersampledd,
    PackReconstructiond,
    ReconstructionOutputd,
    SeededKspaceMaskd,
    ZeroFilledd,
    mask_class,
)

__all__ = [
    "pipeline",
    "prepare_demo",
    "prepare_recon_demo",
    "prepare_recon_data",
    "recon_report",
    "DEMO_BUNDLE_DATA",
    "simulate_kspace",
    "smooth_phase",
    "zero_filled",
    "write_fastmri_h5",
    "TARGET_KEYS",
    "FastMRIVolumeReader",
    "load_kspace_datalist",
    "check_kspace_cases",
    "check_mask_settings",
    "MASKS",
    "mask_class",
    "SeededKspaceMaskd",
    "ZeroFilledd",
    "CheckUndersampledd",
    "PackReconstructiond",
    "ReconstructionOutputd",
    "nmse",
    "psnr",
    "ssim",
    "NMSEMetric",
    "FastMRISSIMMetric",
    "L1SSIMLoss",
    "BASICUNET_FEATURES",
    "ResidualRefiner",
    "build_recon_network",
    "recon_architectures",
    "volume_metrics",
    "figure",
    "bundle_report",
]
