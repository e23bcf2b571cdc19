# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Data lists for the bundles, checked before any training starts.

Every problem is reported with the file it is in and what is wrong (an empty list, a missing or
unreadable file, a wrong channel count, image and label of different shapes, NaN intensities,
label values outside the task's classes), as one :class:`DataError` listing all of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DataError", "load_datalist", "check_cases", "image_shape"]

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names each file and what is wrong with it."""


def load_datalist(datalist_file: str, key: str, base_dir: str | None = None) -> list[dict]:
    """Read the ``key`` split (``training``, ``validation``, ``testing``) of a JSON data list and
    make its file paths absolute (relative paths are relative to ``base_dir``, default the list's
    folder). Image entries may be a list of files (one per channel).

    Raises:
        DataError: the file is missing or not JSON, the split is absent or empty.
    """
    path = Path(datalist_file)
    if not path.is_file():
        raise DataError(f"data list {path} does not exist; prepare the data first (see the bundle's docs/README.md).")
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"data list {path} is not readable JSON: {e}") from e
    items = content.get(key) if isinstance(content, dict) else None
    if not items:
        raise DataError(f"data list {path} has no '{key}' cases (found keys: {list(content) if isinstance(content, dict) else type(content).__name__}).")
    root = Path(base_dir) if base_dir else path.parent

    def resolve(value):
        if isinstance(value, str):
            return str(value if Path(value).is_absolute() else (root / value).resolve())
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return [{k: resolve(v) if k in ("image", "label") else v for k, v in item.items()} for item in items]


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _load(path: str) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, voxels)``; 2D image files (PNG, ...) through Pillow, everything else through nibabel.

    A 2D file's shape is ``(height, width[, channels])``, a NIfTI's ``(x, y, z[, channels])``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    try:
        if path.lower().endswith(_IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as image:
                data = np.asarray(image)
            return data.shape, data
        import nibabel as nib

        image = nib.load(path)
        return tuple(image.shape), np.asanyarray(image.dataobj)
    except Exception as e:  # nibabel and Pillow raise several types for bad files
        raise OSError(f"unreadable ({type(e).__name__}: {e})") from e


def check_cases(
    items: Sequence[dict],
    in_channels: int | None,
    num_classes: int | None = None,
    label_values: Sequence[int] | None = None,
    check_values: bool = True,
    spatial_dims: int = 3,
) -> list[dict]:
    """Check every case of a data list before training; returns ``items`` unchanged when all is well.

    Args:
        items: cases with ``image`` (a file or a list of per-channel files) and optionally ``label``.
        in_channels: channels the network expects (a 4-d image's last axis, or the number of files);
            None skips the channel check.
        num_classes: labels must lie in ``[0, num_classes)``; ignored when ``label_values`` is given.
        label_values: the exact label values allowed (e.g. BraTS' 0, 1, 2, 4).
        check_values: also read the voxels (NaN/inf intensities, label values); headers only if False.
        spatial_dims: 3 for volumes (NIfTI), 2 for images (PNG; an RGB image has 3 channels).

    Raises:
        DataError: listing each bad file and its problem.
    """
    if not items:
        raise DataError("the data list is empty: no cases to train or evaluate on.")
    allowed = set(label_values) if label_values is not None else (set(range(num_classes)) if num_classes else None)
    problems: list[str] = []
    for item in items:
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        spatial, channels = None, 0
        for file in images:
            opened = _open(file, check_values, problems)
            if opened is None:
                continue
            shape, data = opened
            spatial = spatial or shape[:spatial_dims]
            if shape[:spatial_dims] != spatial:
                problems.append(
                    f"{file}: spatial shape {shape[:spatial_dims]} differs from the case's other channels {spatial}"
                )
            channels += shape[spatial_dims] if len(shape) > spatial_dims else 1
            if data is not None and not np.isfinite(data).all():
                problems.append(f"{file}: image contains NaN or infinite intensities")
        if in_channels is not None and channels and channels != in_channels:
            problems.append(f"{images[0]}: {channels} image channel(s), but the network expects {in_channels}")
        label = item.get("label")
        if label is None:
            continue
        opened = _open(label, check_values, problems)
        if opened is None:
            continue
        shape, data = opened
        if spatial is not None and shape[:spatial_dims] != spatial:
            problems.append(f"{label}: label shape {shape[:spatial_dims]} does not match image shape {spatial}")
        elif len(shape) > spatial_dims and shape[spatial_dims] != 1:
            problems.append(f"{label}: label has {shape[spatial_dims]} channels; expected one label map")
        if data is not None and allowed is not None:
            values = set(np.unique(data).tolist())
            if not values <= allowed:
                problems.append(
                    f"{label}: label values {sorted(values - allowed)} are outside the task's classes {sorted(allowed)}"
                )
    if problems:
        raise DataError(f"{len(problems)} problem(s) in the data:\n  " + "\n  ".join(problems))
    logger.info(f"checked {len(items)} case(s): channels, shapes{', intensities and labels' if check_values else ''} ok.")
    return list(items)


def _open(path: str, check_values: bool, problems: list[str]):
    """``(shape, voxels or None)``, or None after noting why ``path`` cannot be opened."""
    try:
        return _load(path) if check_values else _header(path)
    except FileNotFoundError:
        problems.append(f"{path}: file not found")
    except OSError as e:
        problems.append(f"{path}: {e}")
    return None


def image_shape(path: str) -> tuple[int, ...]:
    """An image file's shape from its header: ``(x, y, z[, c])`` for NIfTI, ``(h, w[, c])`` for 2D files.

    Raises:
        FileNotFoundError: no such file.
        OSError: the file is not a readable image (the message says why).
    """
    return _header(path)[0]


def _header(path: str) -> tuple[tuple[int, ...], None]:
    """``(shape, None)`` read from the file's header only."""
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    try:
        if path.lower().endswith(_IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as image:
                bands = len(image.getbands())
                return (image.height, image.width) + ((bands,) if bands > 1 else ()), None
        import nibabel as nib

        return tuple(nib.load(path).shape), None
    except Exception as e:
        raise OSError(f"unreadable ({type(e).__name__}: {e})") from e
