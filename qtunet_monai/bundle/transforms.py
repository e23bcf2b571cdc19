# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The few transforms and the loss the task bundles need beyond MONAI's.

- overlapping tumour regions (BraTS' TC / WT / ET) from a label map and back, for any label values
  (MONAI's ``ConvertToMultiChannelBasedOnBratsClassesd`` knows only BraTS' 1 / 2 / 4);
- a void class ignored in the loss and the metrics (CityScapes).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.losses import MaskedDiceLoss
from monai.transforms import MapTransform

__all__ = ["LabelsToRegionsd", "RegionsToLabelsd", "MaskVoidd", "VoidMaskedDiceLoss"]


def _check_regions(regions: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    regions = tuple(tuple(int(v) for v in r) for r in regions)
    if not regions or any(not r for r in regions):
        raise ValueError(f"regions must be non-empty lists of label values, got {regions!r}.")
    return regions


class LabelsToRegionsd(MapTransform):
    """A one-channel label map -> one binary channel per region (a region is a set of label values).

    Args:
        keys: label keys.
        regions: e.g. BraTS ``[[1, 4], [1, 2, 4], [4]]`` for tumour core, whole tumour, enhancing tumour.
    """

    def __init__(self, keys: KeysCollection, regions: Sequence[Sequence[int]], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.regions = _check_regions(regions)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            if label.shape[0] != 1:
                raise ValueError(f"{key}: expected a one-channel label map, got shape {tuple(label.shape)}.")
            channels = [torch.isin(label[0], torch.as_tensor(r, device=label.device)) for r in self.regions]
            d[key] = _like(label, torch.stack(channels))
        return d


def _like(reference, tensor: torch.Tensor):
    """``tensor`` as float32 keeping ``reference``'s MetaTensor metadata (affine, applied operations)."""
    out = torch.as_tensor(tensor, dtype=torch.float32)
    if hasattr(reference, "copy_meta_from"):
        from monai.data import MetaTensor

        out = MetaTensor(out)
        out.copy_meta_from(reference, copy_attr=False)
    return out


class RegionsToLabelsd(MapTransform):
    """Binary region channels -> a one-channel label map with the task's own label values.

    Regions are painted from the largest to the smallest; each paints the label value that belongs
    to it but to none of the regions nested inside it (BraTS: WT -> 2, TC -> 1, ET -> 4).

    Args:
        keys: prediction keys (binary channels in the order of ``regions``).
        regions: as for :class:`LabelsToRegionsd`.
    """

    def __init__(self, keys: KeysCollection, regions: Sequence[Sequence[int]], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.regions = _check_regions(regions)
        self.paint = []  # (channel, value), largest region first
        for index in sorted(range(len(self.regions)), key=lambda i: -len(self.regions[i])):
            region = set(self.regions[index])
            inner = set().union(*[set(r) for r in self.regions if set(r) < region])
            own = sorted(region - inner)
            if not own:
                raise ValueError(f"region {sorted(region)} has no label value of its own: {self.regions!r}.")
            self.paint.append((index, own[0]))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] != len(self.regions):
                raise ValueError(f"{key}: {pred.shape[0]} channels, but {len(self.regions)} regions.")
            label = torch.zeros_like(pred[:1])
            for channel, value in self.paint:
                label[0][pred[channel] > 0.5] = value
            d[key] = label
        return d


class MaskVoidd(MapTransform):
    """Zero the one-hot prediction wherever the one-hot label is void, so void pixels count neither as
    false positives nor (their label channel being excluded) as false negatives.

    Args:
        keys: one-hot prediction keys.
        label_key: the one-hot label.
        void_channel: the void class' channel.
    """

    def __init__(self, keys: KeysCollection, label_key: str = "label", void_channel: int = 0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.void_channel = void_channel

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        keep = 1 - d[self.label_key][self.void_channel : self.void_channel + 1]
        for key in self.key_iterator(d):
            d[key] = d[key] * keep.to(d[key].dtype)
        return d


class VoidMaskedDiceLoss(MaskedDiceLoss):
    """Softmax Dice loss over the classes other than void, computed only where the label is not void.

    Args:
        void_value: the label value of the void class (also its channel, which the loss leaves out).
        kwargs: further :class:`monai.losses.DiceLoss` arguments.
    """

    def __init__(self, void_value: int = 0, **kwargs):
        if void_value != 0:
            raise ValueError("void must be class 0: it is left out of the loss as MONAI's 'background' channel.")
        super().__init__(include_background=False, to_onehot_y=True, softmax=True, **kwargs)
        self.void_value = void_value

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = (target != self.void_value).to(input.dtype)
        return super().forward(input, target, mask=mask)
