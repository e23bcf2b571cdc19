# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label tasks serving the qtunet bundles (needs the ``label`` extra: MONAI Label).

- Bundles are found locally (a path, or a folder name under ``search``, by default ``bundles/`` in the
  working directory; the repository's app passes its own ``bundles/``): no model-zoo query and no
  download at start-up.
- MONAI Label puts a string ``image_path`` into the data dictionary; MONAI 1.6's ``Spacingd`` treats
  every ``image_*`` key as image metadata and fails on it, so inference sets it aside while the
  bundle's pre-processing runs and puts it back afterwards.
- Uploaded images and labels are opened before they are stored: a file that is not an image gets
  a 400 response naming it, and the server keeps serving.
- Interactive training validates every epoch (on the training labels when there are too few for a
  split), so the best model, ``models/model.pt``, is rewritten after each round of labels.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import HTTPException
from monai.transforms import CopyItemsd, DeleteItemsd
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["resolve_bundles", "QTUNetInferTask", "QTUNetTrainTask", "CheckedDatastore"]

logger = logging.getLogger(__name__)
_STASH = "qtunet_stashed_image_path"  # not an image_* key


def resolve_bundles(models: str, search: str | Path = "bundles") -> dict[str, str]:
    """``"a,b"`` (bundle folders, or names under ``bundles/``) -> ``{name: folder}``; unknown names raise."""
    found: dict[str, str] = {}
    search = Path(search)
    for entry in [m.strip() for m in (models or "").split(",") if m.strip()]:
        path = Path(entry) if Path(entry).is_dir() else search / entry
        if not (path / "configs" / "inference.json").is_file():
            choices = sorted(p.name for p in search.iterdir() if (p / "configs" / "inference.json").is_file()) \
                if search.is_dir() else []
            raise ValueError(f"no bundle {entry!r} (looked for {path}/configs/inference.json); choose a bundle "
                             f"folder or one of {choices}.")
        if not (path / "models" / "model.pt").is_file():
            logger.warning(f"{path} has no models/model.pt yet: train it first (the bundle's docs say how).")
        found[path.name] = str(path.resolve())
    if not found:
        raise ValueError("no bundle given: start the server with --conf models <bundle name or folder>.")
    return found


def _move(source: str, target: str) -> list:
    """MONAI transforms moving ``source`` to ``target`` in the data dictionary (nothing if absent)."""
    return [CopyItemsd(source, names=target, allow_missing_keys=True), DeleteItemsd(source)]


class QTUNetInferTask(BundleInferTask):
    """A bundle's ``inference.json`` served by MONAI Label, with ``image_path`` kept away from ``Spacingd``."""

    def pre_transforms(self, data=None):
        return [*_move("image_path", _STASH), *super().pre_transforms(data), *_move(_STASH, "image_path")]


class QTUNetTrainTask(BundleTrainTask):
    """A bundle's ``train.json`` retrained by MONAI Label on the saved labels."""

    def _update_overrides(self, overrides: dict) -> None:
        overrides["val_interval"] = 1
        overrides["num_workers"] = 0
        if not overrides.get(self.const.key_validate_dataset_data()):
            overrides[self.const.key_validate_dataset_data()] = overrides[self.const.key_train_dataset_data()]


def _readable(path: str, name: str) -> None:
    """Raise HTTP 400 unless ``path`` opens as an image (NIfTI through nibabel, 2D through Pillow)."""
    from .bundle.datalist import image_shape

    try:
        shape = image_shape(path)
    except (OSError, FileNotFoundError) as e:
        raise HTTPException(status_code=400, detail=f"{name}: not a readable image ({e}).") from e
    if len(shape) < 2 or min(shape) < 1:
        raise HTTPException(status_code=400, detail=f"{name}: image of shape {shape} cannot be segmented.")


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore that refuses unreadable uploads instead of storing them."""

    def add_image(self, image_id, image_filename, image_info):
        _readable(image_filename, f"image {image_id!r}")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        _readable(label_filename, f"label for {image_id!r}")
        return super().save_label(image_id, label_filename, label_tag, label_info)
