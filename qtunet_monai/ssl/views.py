# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Two augmented views of one crop for self-supervised pre-training (docs/architecture.md section 4).

Each view is an independent draw of a rotation by 0/90/180/270 degrees in the axial plane (its
class is the rotation label) followed by random cut-out boxes. The reconstruction target of a view
is the crop in the view's rotation *without* the boxes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["TwoViewsd", "rotate_axial"]


def rotate_axial(image: torch.Tensor, k: int) -> torch.Tensor:
    """Rotate a channel-first image by ``k`` x 90 degrees in the plane of its first two spatial axes
    (the axial plane of MONAI's (H, W, D) volumes; the image plane in 2D)."""
    return torch.rot90(image, k, dims=(1, 2))


class TwoViewsd(Randomizable, MapTransform):
    """``image`` -> ``view1``, ``view2`` (masked, rotated), ``target1``, ``target2`` (rotated, not
    masked) and ``rotation1``, ``rotation2`` (0-3).

    Args:
        keys: the image key (one).
        num_boxes: cut-out boxes per view, each drawn independently.
        max_box_fraction: a box edge is up to this fraction of the crop's edge.
        fill: value of the cut-out voxels (0: the normalised mean).
    """

    def __init__(self, keys: KeysCollection = "image", num_boxes: int = 8, max_box_fraction: float = 0.25,
                 fill: float = 0.0) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError(f"TwoViewsd makes views of one image key, got {self.keys}.")
        if not 0 < max_box_fraction <= 1:
            raise ValueError(f"max_box_fraction must be in (0, 1], got {max_box_fraction}.")
        self.num_boxes, self.max_box_fraction, self.fill = num_boxes, max_box_fraction, fill

    def randomize(self, data=None) -> None:  # draws happen per view in __call__
        pass

    def _view(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if image.shape[1] != image.shape[2]:
            raise ValueError(f"axial rotations need a square axial plane, got spatial shape {tuple(image.shape[1:])}.")
        k = int(self.R.randint(4))
        target = rotate_axial(image, k)
        view = target.clone()
        spatial = np.array(target.shape[1:])
        for _ in range(self.num_boxes):
            size = np.maximum(1, (self.R.uniform(0.05, self.max_box_fraction, len(spatial)) * spatial).astype(int))
            start = (self.R.uniform(0, 1, len(spatial)) * (spatial - size + 1)).astype(int)
            view[(slice(None), *[slice(s, s + z) for s, z in zip(start, size)])] = self.fill
        return view, target, k

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        key = self.keys[0]
        image = torch.as_tensor(d.pop(key))
        for i in (1, 2):
            view, target, k = self._view(image)
            d[f"view{i}"], d[f"target{i}"], d[f"rotation{i}"] = view, target, torch.tensor(k)
        return d
