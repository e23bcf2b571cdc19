# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The supervised pipeline, defined once: typed pre-processing specs and the MONAI config dicts of the
deterministic and random transforms, loss, activation, post-processing, metrics and sliding-window
inferer (docs/architecture.md, sections 2 and 3).

Both consumers take their pieces from here, so they cannot drift apart:

- the bundle generator (``tools/generate_bundles.py``) writes these dicts into the bundles' JSON;
- the Auto3DSeg template (:mod:`qtunet_monai.integrations.auto3dseg`) instantiates the same dicts with
  MONAI's :class:`~monai.bundle.ConfigParser` (:func:`instantiate`).

The dicts refer to the config's own keys where a bundle lets the user override a value
(``@roi_size``, ``@pixdim``, ``@num_classes``, ``@num_samples``, ``@intensity_mean``/``@intensity_std``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NonzeroNorm",
    "CTWindow",
    "CTZScore",
    "RGBNorm",
    "Intensity",
    "SpatialCrop",
    "PosNegCrop",
    "Crop",
    "Pretrain",
    "flips",
    "rot90",
    "scale",
    "shift",
    "deterministic_transforms",
    "random_transforms",
    "extra_augmentation",
    "loss",
    "activation",
    "discretise",
    "metrics",
    "sliding_window",
    "SW_OVERLAP",
    "SW_MODE",
    "instantiate",
]

#: sliding-window inference over whole volumes/images (docs/architecture.md section 2)
SW_OVERLAP = 0.5
SW_MODE = "constant"


def _keys(with_label: bool) -> list[str] | str:
    return ["image", "label"] if with_label else "image"


def _modes(with_label: bool, image_mode: str = "bilinear") -> list[str] | str:
    return [image_mode, "nearest"] if with_label else image_mode


# ------------------------------------------------------------------------------------------ intensity
@dataclass(frozen=True)
class NonzeroNorm:
    """Channel-wise z-score over the non-zero voxels (MRI)."""

    def config(self) -> dict[str, Any]:
        """Top-level config entries the transforms refer to (none)."""
        return {}

    def transforms(self, foreground_crop: dict | None) -> list[dict]:
        # crop on the raw (positive) MRI: after normalisation the background is no longer zero
        crop = [foreground_crop] if foreground_crop else []
        return crop + [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}]

    def describe(self) -> str:
        return "non-zero voxels normalised per channel"


@dataclass(frozen=True)
class CTWindow:
    """Clip Hounsfield units to ``[a_min, a_max]`` and scale to 0..1 (CT)."""

    a_min: float
    a_max: float

    def config(self) -> dict[str, Any]:
        return {}

    def transforms(self, foreground_crop: dict | None) -> list[dict]:
        # air is 0 after scaling, so the foreground crop follows the window
        crop = [foreground_crop] if foreground_crop else []
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": self.a_min, "a_max": self.a_max,
                 "b_min": 0.0, "b_max": 1.0, "clip": True}] + crop

    def describe(self) -> str:
        return f"Hounsfield units clipped to {[self.a_min, self.a_max]} and scaled to 0..1"


@dataclass(frozen=True)
class RGBNorm:
    """0..255 RGB normalised channel-wise with a data set's mean and standard deviation (given on 0..1)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "the data set"

    def config(self) -> dict[str, Any]:
        return {"intensity_mean": list(self.mean), "intensity_std": list(self.std)}

    def transforms(self, foreground_crop: dict | None) -> list[dict]:
        crop = [foreground_crop] if foreground_crop else []
        return crop + [{"_target_": "NormalizeIntensityd", "keys": "image",
                        "subtrahend": "$[255.0 * m for m in @intensity_mean]",
                        "divisor": "$[255.0 * s for s in @intensity_std]", "channel_wise": True}]

    def describe(self) -> str:
        return f"RGB normalised with {self.source}' mean and standard deviation"


@dataclass(frozen=True)
class CTZScore:
    """nnU-Net's CT normalisation: clip Hounsfield units to ``[a_min, a_max]`` (the foreground's 0.5 and 99.5
    percentiles), then z-score with the foreground's ``mean`` and ``std``; one ``ScaleIntensityRanged`` maps the
    window linearly onto the z-scores of its ends. Air is not zero afterwards, so no foreground crop follows."""

    a_min: float
    a_max: float
    mean: float
    std: float

    @property
    def b_min(self) -> float:
        """The z-score of ``a_min``: the lowest value after normalisation."""
        return (self.a_min - self.mean) / self.std

    def config(self) -> dict[str, Any]:
        return {}

    def transforms(self, foreground_crop: dict | None) -> list[dict]:
        if foreground_crop:
            raise ValueError("CTZScore leaves no zero background to crop to; use crop_foreground=False.")
        return [{"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": self.a_min, "a_max": self.a_max,
                 "b_min": self.b_min, "b_max": (self.a_max - self.mean) / self.std, "clip": True}]

    def describe(self) -> str:
        return (f"Hounsfield units clipped to {[self.a_min, self.a_max]} (foreground 0.5/99.5 percentiles) and "
                f"z-scored with the foreground's mean {self.mean:g} and standard deviation {self.std:g}")


Intensity = NonzeroNorm | CTWindow | CTZScore | RGBNorm


# ----------------------------------------------------------------------------------------------- crops
@dataclass(frozen=True)
class SpatialCrop:
    """Random crops of ``@roi_size``."""

    def transform(self) -> dict:
        return {"_target_": "RandSpatialCropd", "keys": ["image", "label"], "roi_size": "@roi_size",
                "random_size": False}

    def describe(self) -> str:
        return "random crops"


@dataclass(frozen=True)
class PosNegCrop:
    """Label-balanced crops of ``@roi_size``, ``@num_samples`` per case, centred on foreground with
    probability ``pos / (pos + neg)``."""

    pos: int
    neg: int
    # negative crops are centred where the normalised image exceeds this (0: above air in a 0..1 CT window);
    # z-scored CT needs its lowest value, CTZScore.b_min
    image_threshold: float = 0

    def transform(self) -> dict:
        return {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
                "spatial_size": "@roi_size", "pos": self.pos, "neg": self.neg, "num_samples": "@num_samples",
                "image_key": "image", "image_threshold": self.image_threshold}

    def describe(self) -> str:
        return f"label-balanced crops (positive:negative {self.pos}:{self.neg})"


Crop = SpatialCrop | PosNegCrop


@dataclass(frozen=True)
class Pretrain:
    """Self-supervised pre-training recipe (docs/architecture.md section 4)."""

    batch_size: int
    accumulation_steps: int
    max_epochs: int
    roi_size: tuple[int, ...]
    learning_rate: float = 4e-5
    warmup_epochs: int = 10
    weight_decay: float = 1.5e-6

    def describe(self) -> str:
        return (f"Adam {self.learning_rate}, weight decay {self.weight_decay}, {self.warmup_epochs} warm-up epochs "
                f"then cosine; batch {self.batch_size} x {self.accumulation_steps} gradient accumulation, "
                f"{self.max_epochs} epochs, crops {' x '.join(map(str, self.roi_size))}")


# ------------------------------------------------------------------------------ random augmentations
def flips(prob: float, dims: int = 3) -> list[dict]:
    """A flip along each of the first ``dims`` spatial axes, each with probability ``prob``."""
    return [{"_target_": "RandFlipd", "keys": ["image", "label"], "prob": prob, "spatial_axis": a} for a in range(dims)]


def rot90(prob: float) -> list[dict]:
    return [{"_target_": "RandRotate90d", "keys": ["image", "label"], "prob": prob, "max_k": 3}]


def scale(prob: float, factors: float = 0.1) -> list[dict]:
    return [{"_target_": "RandScaleIntensityd", "keys": "image", "factors": factors, "prob": prob}]


def shift(prob: float, offsets: float = 0.1) -> list[dict]:
    return [{"_target_": "RandShiftIntensityd", "keys": "image", "offsets": offsets, "prob": prob}]


# ---------------------------------------------------------------------------------------- transforms
def deterministic_transforms(
    intensity: Intensity,
    spatial_dims: int,
    with_label: bool,
    *,
    resample: bool = True,
    crop_foreground: bool = False,
    regions: Sequence[Sequence[int]] | None = None,
    label_map: Sequence[int] | None = None,
    pad: bool = True,
) -> list[dict]:
    """Loading, label conversion, orientation, spacing, intensity, foreground crop and padding
    (training, validation and inference).

    Args:
        intensity: the intensity normalisation.
        spatial_dims: 3 (volumes, reoriented to RAS) or 2.
        with_label: also load and convert ``label``.
        resample: resample to ``@pixdim``.
        crop_foreground: crop to the image's foreground.
        regions: overlapping target regions as sets of label values (sigmoid outputs), or None.
        label_map: label file value -> class, or None.
        pad: pad to at least ``@roi_size`` (training and validation; inference pads in the inferer).
    """
    keys = _keys(with_label)
    steps: list[dict] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
    ]
    if with_label and regions:
        steps.append({"_target_": "qtunet_monai.bundle.LabelsToRegionsd", "keys": "label",
                      "regions": [list(r) for r in regions]})
    if with_label and label_map:
        steps.append({"_target_": "MapLabelValued", "keys": "label", "orig_labels": list(range(len(label_map))),
                      "target_labels": list(label_map)})
    if spatial_dims == 3:
        steps.append({"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"})
    if resample:
        steps.append({"_target_": "Spacingd", "keys": keys, "pixdim": "@pixdim", "mode": _modes(with_label)})
    crop = {"_target_": "CropForegroundd", "keys": keys, "source_key": "image"} if crop_foreground else None
    steps += intensity.transforms(crop)
    if pad:
        steps.append({"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@roi_size"})
    steps.append({"_target_": "EnsureTyped", "keys": keys})
    return steps


def random_transforms(crop: Crop, augment: Sequence[dict]) -> list[dict]:
    """The training crop, then the augmentations."""
    return [crop.transform(), *[dict(t) for t in augment]]


def extra_augmentation(spatial_dims: int, modality: str) -> list[dict]:
    """Augmentations beyond a task's own, each switched by a config flag (``@intensity_augmentation``,
    ``@spatial_augmentation``; off in the thesis' recipe), after the crop: nnU-Net-style intensity
    changes (gamma, noise and, for MRI, a bias field) and a small random rotation and scaling."""
    intensity_off, spatial_off = "$not @intensity_augmentation", "$not @spatial_augmentation"
    steps = [{"_target_": "RandAdjustContrastd", "keys": "image", "prob": 0.3, "gamma": [0.7, 1.5],
              "_disabled_": intensity_off},
             {"_target_": "RandGaussianNoised", "keys": "image", "prob": 0.15, "std": 0.1, "_disabled_": intensity_off}]
    if modality == "MR":
        steps.insert(0, {"_target_": "RandBiasFieldd", "keys": "image", "prob": 0.3, "coeff_range": [0.0, 0.3],
                         "_disabled_": intensity_off})
    rotate = [0.26] * (3 if spatial_dims == 3 else 1)  # 15 degrees about each axis
    steps.append({"_target_": "RandAffined", "keys": ["image", "label"], "prob": 0.3, "rotate_range": rotate,
                  "scale_range": [0.15] * spatial_dims, "mode": ["bilinear", "nearest"], "padding_mode": "zeros",
                  "_disabled_": spatial_off})
    return steps


# ------------------------------------------------------------------------ loss, outputs and metrics
def loss(sigmoid: bool, void: bool = False) -> dict:
    """Dice loss: sigmoid per channel for overlapping regions, softmax otherwise; void pixels masked."""
    if void:
        return {"_target_": "qtunet_monai.bundle.VoidMaskedDiceLoss", "void_value": 0}
    if sigmoid:
        return {"_target_": "DiceLoss", "sigmoid": True}
    return {"_target_": "DiceLoss", "to_onehot_y": True, "softmax": True}


def activation(sigmoid: bool) -> dict:
    """Logits -> probabilities under ``pred``."""
    return {"_target_": "Activationsd", "keys": "pred", "sigmoid": True} if sigmoid else \
        {"_target_": "Activationsd", "keys": "pred", "softmax": True}


def discretise(sigmoid: bool, void: bool = False) -> list[dict]:
    """Binary one-hot prediction and label from the probabilities, ready for the metrics."""
    if sigmoid:
        return [{"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]
    steps = [{"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
              "to_onehot": "@num_classes"}]
    if void:
        steps.append({"_target_": "qtunet_monai.bundle.MaskVoidd", "keys": "pred", "label_key": "label"})
    return steps


def metrics(sigmoid: bool, hd95: bool = False, iou: bool = False) -> dict[str, dict]:
    """Validation metric handlers by name; the key metric (mean Dice, background excluded) comes first."""
    out = "$monai.handlers.from_engine(['pred', 'label'])"
    found = {"val_mean_dice": {"_target_": "MeanDice", "include_background": sigmoid, "output_transform": out}}
    if hd95:
        found["val_hd95"] = {"_target_": "HausdorffDistance", "include_background": sigmoid, "percentile": 95,
                             "output_transform": out}
    if iou:
        found["val_mean_iou"] = {"_target_": "MeanIoUHandler", "include_background": False, "output_transform": out}
    return found


def sliding_window(sw_batch_size: int | str) -> dict:
    """Sliding-window inference at ``@roi_size``."""
    return {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": sw_batch_size,
            "overlap": SW_OVERLAP, "mode": SW_MODE}


def instantiate(item: Any, **values: Any) -> Any:
    """Instantiate a config dict (or a list of them) from this module with MONAI's ConfigParser,
    ``values`` giving what its ``@`` references name (e.g. ``roi_size``, ``pixdim``, ``num_classes``)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({**values, "_item": item})
    return parser.get_parsed_content("_item")
