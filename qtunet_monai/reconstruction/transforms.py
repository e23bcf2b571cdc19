# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The few transforms the reconstruction pipeline adds to MONAI's (``monai.apps.reconstruction``):

- :class:`SeededKspaceMaskd`: MONAI's equispaced or random mask with a seed from the file's name, so that
  validation and test volumes always get the same mask (and the transform is cacheable);
- :class:`ZeroFilledd`: the zero-filled image of k-space that is already undersampled (no mask drawn);
- :class:`CheckUndersampledd`: a mask that samples nothing, or NaN k-space, stops the run naming the file;
- :class:`PackReconstructiond`: MONAI's keys to the engines' ``image``/``label`` (a channel axis in front,
  the slices as the first spatial axis), the raw magnitudes kept for the metrics, the k-space dropped;
- :class:`ReconstructionOutputd`: the network's normalised output back to magnitudes (``recon``), and
  prediction, target and zero-filled image scaled by the target's maximum for the metrics.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.apps.reconstruction.transforms.dictionary import EquispacedKspaceMaskd, RandomKspaceMaskd
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from ..bundle.errors import DataError, SettingError

__all__ = ["MASKS", "mask_class", "source_file", "SeededKspaceMaskd", "ZeroFilledd", "CheckUndersampledd",
           "PackReconstructiond", "ReconstructionOutputd"]

#: ``mask_type`` -> MONAI's dictionary mask transform
MASKS = {"equispaced": EquispacedKspaceMaskd, "random": RandomKspaceMaskd}


def mask_class(mask_type: str) -> str:
    """The dotted name of MONAI's mask transform for ``mask_type`` (``equispaced`` or ``random``), for a
    config's ``_target_``."""
    if mask_type not in MASKS:
        raise SettingError(f"mask_type {mask_type!r} is not one of {sorted(MASKS)}.")
    cls = MASKS[mask_type]
    return f"{cls.__module__}.{cls.__name__}"


def source_file(data: Mapping, key: str = "kspace") -> str:
    """The file a loaded item came from: ``<key>_meta_dict`` or the MetaTensor's ``filename_or_obj``."""
    meta = data.get(f"{key}_meta_dict")
    if not isinstance(meta, Mapping):
        meta = getattr(data.get(key), "meta", {}) or {}
    name = meta.get("filename_or_obj") or meta.get("filename") or data.get("filename_or_obj")
    return str(name) if name is not None else "unknown file"


class SeededKspaceMaskd(MapTransform):
    """MONAI's ``EquispacedKspaceMaskd`` / ``RandomKspaceMaskd`` with its random state seeded from the file's
    name (and ``seed``): a volume gets the same mask in every epoch and every run, as fastMRI's validation
    masks do. Not a randomisable transform, so a ``CacheDataset`` caches its result.

    Args:
        keys: the k-space key(s) (writes ``<key>_masked``, ``<key>_masked_ifft`` and ``mask``, as MONAI's).
        mask_type: ``equispaced`` or ``random``.
        center_fractions: centre fractions, as MONAI's.
        accelerations: accelerations, as MONAI's.
        seed: added to the name's CRC-32.
        spatial_dims: as MONAI's (2: the last axis is sampled).
        is_complex: as MONAI's.
    """

    def __init__(self, keys: KeysCollection, mask_type: str = "equispaced", center_fractions: Sequence[float] = (0.08,),
                 accelerations: Sequence[float] = (4,), seed: int = 0, spatial_dims: int = 2, is_complex: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        mask_class(mask_type)
        self.maskers = {key: MASKS[mask_type](key, list(center_fractions), list(accelerations), spatial_dims,
                                              is_complex) for key in self.keys}
        self.seed = int(seed)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            name = Path(source_file(d, str(key))).name
            masker = self.maskers[key]
            masker.set_random_state(seed=(zlib.crc32(name.encode()) + self.seed) % 2**32)
            d = masker(d)
        return d


class ZeroFilledd(MapTransform):
    """The zero-filled image of k-space that is already undersampled (fastMRI's test files): ``<key>_masked``
    (real/imaginary last), ``<key>_masked_ifft`` (root-sum-of-squares over the coils of ``|ifft|``) and
    ``mask`` (the columns holding any non-zero sample), the keys MONAI's mask transforms write."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from monai.apps.reconstruction.complex_utils import complex_abs, convert_to_tensor_complex
        from monai.apps.reconstruction.mri_utils import root_sum_of_squares
        from monai.data.fft_utils import ifftn_centered

        d = dict(data)
        for key in self.key_iterator(d):
            kspace = convert_to_tensor_complex(d[key])
            d[f"{key}_masked"] = kspace
            image = complex_abs(ifftn_centered(kspace, spatial_dims=2, is_complex=True))
            d[f"{key}_masked_ifft"] = root_sum_of_squares(image, spatial_dim=-3)
            columns = kspace.abs().sum(-1).reshape(-1, kspace.shape[-2]).sum(0) > 0
            d["mask"] = columns.float()
        return d


class CheckUndersampledd(MapTransform):
    """After masking: a mask that samples nothing, or a zero-filled image that is all zero or not finite,
    raises a one-line :class:`~qtunet_monai.bundle.DataError` naming the file (so does a run with
    ``--check_data False`` that meets NaN k-space)."""

    def __init__(self, keys: KeysCollection = "kspace", mask_key: str = "mask", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            path = source_file(d, str(key))
            mask = d.get(self.mask_key)
            if mask is not None and not torch.as_tensor(mask).any():
                raise DataError(f"{path}: the undersampling mask samples nothing (no k-space column kept); "
                                "check center_fractions and accelerations")
            image = torch.as_tensor(d[f"{key}_masked_ifft"])
            if not torch.isfinite(image).all():
                raise DataError(f"{path}: the k-space holds NaN or infinite values")
            if not image.any():
                raise DataError(f"{path}: the undersampled k-space is all zero (nothing sampled where the mask looks)")
        return d


class PackReconstructiond(MapTransform):
    """From MONAI's reconstruction keys to what the engines read; every other key (the k-space) is dropped.

    ``image`` is the normalised zero-filled magnitude, ``label`` the normalised target, both MetaTensors
    ``(1, slices, rows, columns)`` naming the source file; the raw (cropped, un-normalised) magnitudes are
    kept as ``zero_filled`` and ``target``, MONAI's per-slice ``mean`` and ``std`` as ``(slices,)`` tensors.

    Args:
        keys: the k-space key (for the file name).
        image_key: the normalised zero-filled image (MONAI's ``<key>_masked_ifft``).
        label_key: the normalised target (``reconstruction_rss`` / ``reconstruction_esc``), or None.
        keep: further keys to keep as they are.
    """

    def __init__(self, keys: KeysCollection = "kspace", image_key: str = "kspace_masked_ifft",
                 label_key: str | None = "reconstruction_rss", keep: Sequence[str] = ("zero_filled", "target")):
        super().__init__(keys, allow_missing_keys=False)
        self.image_key, self.label_key, self.keep = image_key, label_key, tuple(keep)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        key = self.first_key(d)
        meta = {"filename_or_obj": source_file(d, str(key))}
        out = {"image": MetaTensor(torch.as_tensor(d[self.image_key]).float()[None], meta=copy.deepcopy(meta))}
        if self.label_key is not None:
            out["label"] = MetaTensor(torch.as_tensor(d[self.label_key]).float()[None], meta=copy.deepcopy(meta))
        for name in self.keep:
            if name in d:
                out[name] = torch.as_tensor(d[name]).float()[None]
        for name in ("mean", "std"):
            if name in d:
                out[name] = torch.as_tensor(np.asarray(d[name], dtype=np.float32)).reshape(-1)
        return out


class ReconstructionOutputd(MapTransform):
    """The network's output back to magnitudes, and what the metrics compare.

    ``recon`` (and ``zero_filled_recon``): ``(1, slices, rows, columns)`` MetaTensors in the data's own
    magnitude units (``pred * std + mean`` per slice; a zero ``std`` counts as 1, as MONAI's normalisation
    does), for saving. With a target: ``pred``, ``label`` and ``zf`` become the reconstruction, the target
    and the zero-filled image divided by the target's maximum, ``(slices, rows, columns)``: one volume per
    item, the slices as channels, so MONAI's regression metrics give one value per volume (fastMRI's
    per-volume PSNR and SSIM with the data range the target's maximum).

    Args:
        keys: the prediction key (``pred``).
        image_key: the input, whose meta data (file name) the outputs take.
        target_key: the raw target, or None (inference without one).
        zero_filled_key: the raw zero-filled image, or None.
    """

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image", target_key: str | None = "target",
                 zero_filled_key: str | None = "zero_filled") -> None:
        super().__init__(keys, allow_missing_keys=False)
        self.image_key, self.target_key, self.zero_filled_key = image_key, target_key, zero_filled_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        key = self.first_key(d)
        pred = torch.as_tensor(d[key]).float()
        mean = torch.as_tensor(d["mean"], device=pred.device).float().reshape(1, -1, 1, 1)
        std = torch.as_tensor(d["std"], device=pred.device).float().reshape(1, -1, 1, 1)
        std = torch.where(std == 0, torch.ones_like(std), std)
        recon = pred.as_tensor() * std + mean if isinstance(pred, MetaTensor) else pred * std + mean
        meta = copy.deepcopy(getattr(d.get(self.image_key), "meta", {}))
        d["recon"] = MetaTensor(recon, meta=meta)
        zero_filled = None
        if self.zero_filled_key and self.zero_filled_key in d:
            zero_filled = torch.as_tensor(d[self.zero_filled_key], device=pred.device).float()
            d["zero_filled_recon"] = MetaTensor(zero_filled, meta=copy.deepcopy(meta))
        if self.target_key and self.target_key in d:
            target = torch.as_tensor(d[self.target_key], device=pred.device).float()
            scale = target.max()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            d[key] = (recon / scale)[0]
            d["label"] = (target / scale)[0]
            if zero_filled is not None:
                d["zf"] = (zero_filled / scale)[0]
        return d
