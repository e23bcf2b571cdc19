# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The reconstruction pipeline, defined once: the MONAI config dicts that the bundle
``bundles/qtunet_demo_mri_reconstruction`` is written from (``tools/generate_reconstruction_bundle.py``)
and that :func:`qtunet_monai.pipeline.instantiate` builds in Python.

MONAI's reconstruction recipe (its tutorial ``MRI_reconstruction/unet_demo``): ``FastMRIReader`` ->
``ExtractDataKeyFromMetaKeyd`` -> ``EquispacedKspaceMaskd``/``RandomKspaceMaskd`` (zero-filled image
``kspace_masked_ifft``) -> ``ReferenceBasedSpatialCropd`` (to the target's size) ->
``ReferenceBasedNormalizeIntensityd`` (each slice by the zero-filled image's mean and standard deviation)
-> clip at +-6; L1 loss; SSIM on de-normalised volumes. Here each item is a whole volume, its slices the
first spatial axis: training draws ``@num_samples`` random slices per volume (a new mask every time),
validation and evaluation run the 2D network slice by slice (MONAI's ``SliceInferer``) and score whole
volumes, fastMRI's way, against the zero-filled floor.

The dicts refer to the config's keys: ``@target_key``, ``@mask_type``, ``@center_fractions``,
``@accelerations``, ``@mask_seed``, ``@clip``, ``@num_samples``, ``@slice_batch_size``, ``@recon_size``,
``@ssim_weight``, ``@output_dir``.
"""

from __future__ import annotations

__all__ = ["MONAI_RECON", "load", "undersample", "image_transforms", "train_sampling", "slice_inferer",
           "postprocessing", "metrics", "loss", "METRIC_NAMES"]

MONAI_RECON = "monai.apps.reconstruction.transforms.dictionary."
ZERO_FILLED = "kspace_masked_ifft"  # what MONAI's mask transforms call the zero-filled image

#: the validation metrics, the key metric first; each also for the zero-filled input (``zero_filled_*``)
METRIC_NAMES = ("ssim", "psnr", "nmse", "mae")


def load(with_target: bool) -> list[dict]:
    """Read a fastMRI file (any layout, :class:`~.io.FastMRIVolumeReader`) and take out its target."""
    steps = [{"_target_": "LoadImaged", "keys": "kspace", "reader": {"_target_": "qtunet_monai.reconstruction.FastMRIVolumeReader"},
              "image_only": False, "dtype": "$numpy.complex64"}]
    if with_target:
        steps.append({"_target_": MONAI_RECON + "ExtractDataKeyFromMetaKeyd", "keys": "@target_key",
                      "meta_key": "kspace_meta_dict"})
    return steps


def undersample(random: bool, undersampled_input: str | None = None) -> list[dict]:
    """The mask: MONAI's, drawn anew for every item (``random``, training), or seeded by the file name
    (validation, evaluation, inference); then the check that it sampled something.

    ``undersampled_input``: a config key (e.g. ``"@undersampled"``) that, when true, skips the mask and
    takes the file's k-space as already undersampled (:class:`~.transforms.ZeroFilledd`)."""
    options = {"keys": "kspace", "center_fractions": "@center_fractions", "accelerations": "@accelerations"}
    if random:
        mask = {"_target_": "$qtunet_recon.mask_class(@mask_type)", **options, "spatial_dims": 2, "is_complex": True}
    else:
        mask = {"_target_": "qtunet_monai.reconstruction.SeededKspaceMaskd", **options, "mask_type": "@mask_type",
                "seed": "@mask_seed"}
    steps = [mask]
    if undersampled_input:
        mask["_disabled_"] = f"${undersampled_input}"
        steps.append({"_target_": "qtunet_monai.reconstruction.ZeroFilledd", "keys": "kspace",
                      "_disabled_": f"$not {undersampled_input}"})
    return steps + [{"_target_": "qtunet_monai.reconstruction.CheckUndersampledd", "keys": "kspace"}]


def image_transforms(with_target: bool) -> list[dict]:
    """Crop (to the target, or without one to ``@recon_size``), keep the raw magnitudes, normalise each
    slice by the zero-filled image, clip at ``+-@clip``, and pack the engines' ``image``/``label``."""
    if with_target:
        crop = {"_target_": MONAI_RECON + "ReferenceBasedSpatialCropd", "keys": ZERO_FILLED, "ref_key": "@target_key"}
        keys, raw = [ZERO_FILLED, "@target_key"], ["zero_filled", "target"]
    else:
        crop = {"_target_": "ResizeWithPadOrCropd", "keys": ZERO_FILLED, "spatial_size": "@recon_size"}
        keys, raw = [ZERO_FILLED], ["zero_filled"]
    return [
        crop,
        {"_target_": "CopyItemsd", "keys": keys, "names": raw},
        {"_target_": MONAI_RECON + "ReferenceBasedNormalizeIntensityd", "keys": keys, "ref_key": ZERO_FILLED,
         "channel_wise": True},
        {"_target_": "ThresholdIntensityd", "keys": keys, "threshold": "@clip", "above": False, "cval": "@clip"},
        {"_target_": "ThresholdIntensityd", "keys": keys, "threshold": "$-@clip", "above": True, "cval": "$-@clip"},
        {"_target_": "qtunet_monai.reconstruction.PackReconstructiond", "keys": "kspace", "image_key": ZERO_FILLED,
         "label_key": "@target_key" if with_target else None},
    ]


def train_sampling() -> list[dict]:
    """``@num_samples`` random slices of each volume, as ``(1, rows, columns)`` image/label pairs."""
    return [
        {"_target_": "DeleteItemsd", "keys": ["zero_filled", "target", "mean", "std"]},
        {"_target_": "RandSpatialCropSamplesd", "keys": ["image", "label"], "roi_size": [1, -1, -1],
         "num_samples": "@num_samples", "random_size": False},
        {"_target_": "SqueezeDimd", "keys": ["image", "label"], "dim": 1},
    ]


def slice_inferer() -> dict:
    """The 2D network over every slice of a ``(1, slices, rows, columns)`` volume, ``@slice_batch_size`` at a time."""
    return {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": 0, "sw_batch_size": "@slice_batch_size",
            "progress": False}


def _saver(key: str, postfix: str) -> dict:
    # written to a temporary name and renamed: a killed or concurrent writer never leaves a truncated file
    return {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_postfix": postfix,
            "output_dtype": "$numpy.float32", "separate_folder": False, "resample": False,
            "writer": "qtunet_monai.bundle.AtomicNibabelWriter"}


def postprocessing(with_target: bool, save: bool) -> list[dict]:
    """De-normalise (``recon``), scale by the target's maximum for the metrics (with a target), and save
    the reconstruction and the zero-filled image as NIfTI ``(rows, columns, slices)`` in ``@output_dir``."""
    steps = [{"_target_": "qtunet_monai.reconstruction.ReconstructionOutputd", "keys": "pred",
              "target_key": "target" if with_target else None, "zero_filled_key": "zero_filled"}]
    if save:
        steps += [
            {"_target_": "Transposed", "keys": ["recon", "zero_filled_recon"], "indices": [0, 2, 3, 1]},
            _saver("recon", "recon"),
            _saver("zero_filled_recon", "zero_filled"),
        ]
    return steps


def metrics(prefix: str = "val") -> dict[str, dict]:
    """Per-volume metric handlers on the scaled magnitudes, the key metric (SSIM) first; the same four for the
    zero-filled input (``zero_filled_*``), the floor every network must beat."""
    found = {}
    for name, source in ((prefix, "pred"), ("zero_filled", "zf")):
        out = f"$monai.handlers.from_engine(['{source}', 'label'])"
        found.update({
            f"{name}_ssim": {"_target_": "IgniteMetricHandler",
                             "metric_fn": {"_target_": "qtunet_monai.reconstruction.FastMRISSIMMetric"},
                             "output_transform": out},
            f"{name}_psnr": {"_target_": "PeakSignalToNoiseRatio", "max_val": 1.0, "output_transform": out},
            f"{name}_nmse": {"_target_": "IgniteMetricHandler",
                             "metric_fn": {"_target_": "qtunet_monai.reconstruction.NMSEMetric"},
                             "output_transform": out},
            f"{name}_mae": {"_target_": "MeanAbsoluteError", "output_transform": out},
        })
    return found


def loss() -> dict:
    """L1 on the normalised images (MONAI's and fastMRI's U-Net recipe), plus ``@ssim_weight * (1 - SSIM)``."""
    return {"_target_": "qtunet_monai.reconstruction.L1SSIMLoss", "ssim_weight": "@ssim_weight"}
