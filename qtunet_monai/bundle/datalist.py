# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Data lists for the bundles, checked before any training starts.

Every problem is reported with the file it is in and what is wrong (an empty list, a missing or
unreadable file, a wrong channel count or number of dimensions, image and label of different shapes,
NaN, infinite or absurdly large intensities, label values outside the task's classes, two inputs whose
predictions would get the same name), as one :class:`DataError` listing all of them, one line each.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["DataError", "load_datalist", "check_cases", "image_shape", "output_stem", "INTENSITY_LIMIT"]

logger = logging.getLogger(__name__)


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
        raise OSError(_unreadable(e)) from e


# Larger magnitudes are not intensities of any scanner or camera; float32 statistics over such
# values (NormalizeIntensity's standard deviation) overflow to inf and the loss becomes NaN.
INTENSITY_LIMIT = 1e6


def _unreadable(error: Exception) -> str:
    """One line (nibabel's messages may span several), so that each problem stays one line naming its file."""
    return f"unreadable ({type(error).__name__}: {' '.join(str(error).split())})"


def check_cases(
    items: Sequence[dict],
    in_channels: int | None,
    num_classes: int | None = None,
    label_values: Sequence[int] | None = None,
    check_values: bool = True,
    spatial_dims: int = 3,
    intensity_limit: float | None = INTENSITY_LIMIT,
    unique_names: bool = False,
    skip_bad: bool = False,
) -> list[dict]:
    """Check every case of a data list before training or inference; returns the (good) cases.

    Args:
        items: cases with ``image`` (a file or a list of per-channel files) and optionally ``label``.
        in_channels: channels the network expects (a 4-d image's last axis, or the number of files);
            None skips the channel check.
        num_classes: labels must lie in ``[0, num_classes)``; ignored when ``label_values`` is given.
        label_values: the exact label values allowed (e.g. BraTS' 0, 1, 2, 4).
        check_values: also read the voxels (NaN/inf and extreme intensities, label values, truncated
            files); headers only if False.
        spatial_dims: 3 for volumes (NIfTI), 2 for images (PNG; an RGB image has 3 channels).
        intensity_limit: largest intensity magnitude accepted; None accepts any finite value.
        unique_names: inference: refuse two images whose predictions would be written to the same
            file name (``a/case.nii.gz`` and ``b/case.nii.gz``).
        skip_bad: leave bad cases out (each listed in a warning) instead of raising; raises only
            when no case is left.

    Raises:
        DataError: listing each bad file and its problem, one per line.
    """
    if not items:
        raise DataError("the data list is empty: no cases to train or evaluate on.")
    allowed = set(label_values) if label_values is not None else (set(range(num_classes)) if num_classes else None)
    problems: list[list[str]] = []
    for item in items:
        problems.append(_case_problems(item, in_channels, allowed, check_values, spatial_dims, intensity_limit))
    if unique_names:
        _check_names(items, problems)
    found = [p for case in problems for p in case]
    if found and skip_bad:
        good = [item for item, case in zip(items, problems) if not case]
        logger.warning(f"skipping {len(items) - len(good)} of {len(items)} case(s):\n  " + "\n  ".join(found))
        if not good:
            raise DataError(_summary(found))
        return good
    if found:
        raise DataError(_summary(found))
    checked = ", intensities and labels" if check_values else ""
    logger.info(f"checked {len(items)} case(s): channels, dimensions, shapes{checked} ok.")
    return list(items)


def _summary(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems in the data:\n  " + "\n  ".join(problems)


def _case_problems(item: dict, in_channels, allowed, check_values: bool, spatial_dims: int,
                   intensity_limit: float | None) -> list[str]:
    problems: list[str] = []
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    spatial, channels = None, 0
    for file in images:
        opened = _open(file, check_values, problems)
        if opened is None:
            continue
        shape, data = opened
        if not spatial_dims <= len(shape) <= spatial_dims + 1:
            kind = "volumes" if spatial_dims == 3 else "images"
            problems.append(f"{file}: a {len(shape)}-d image of shape {tuple(shape)}, but this bundle expects "
                            f"{spatial_dims}-d {kind} (optionally with channels last)")
            continue
        spatial = spatial or shape[:spatial_dims]
        if shape[:spatial_dims] != spatial:
            problems.append(
                f"{file}: spatial shape {shape[:spatial_dims]} differs from the case's other channels {spatial}"
            )
        channels += shape[spatial_dims] if len(shape) > spatial_dims else 1
        if data is not None:
            problems += _intensity_problems(file, data, intensity_limit)
    if in_channels is not None and channels and channels != in_channels:
        problems.append(f"{images[0]}: {channels} image channel(s), but the network expects {in_channels}")
    label = item.get("label")
    if label is None:
        return problems
    opened = _open(label, check_values, problems)
    if opened is None:
        return problems
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
    return problems


def _intensity_problems(file: str, data: np.ndarray, limit: float | None) -> list[str]:
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        return [f"{file}: voxels of type {data.dtype} are not numbers"]
    if not np.isfinite(data).all():
        return [f"{file}: image contains NaN or infinite intensities"]
    largest = float(np.abs(data).max()) if data.size else 0.0
    if limit is not None and largest > limit:
        return [(f"{file}: intensities up to {largest:.3g} exceed the limit of {limit:.3g} (intensity_limit); "
                 "the file is probably corrupt or wrongly scaled")]
    return []


def output_stem(path: str) -> str:
    """The name MONAI's ``SaveImage`` gives a prediction of ``path``, before its postfix: the file name
    without ``.gz`` and one more extension."""
    name = Path(path).name
    return Path(name.removesuffix(".gz")).stem


def _check_names(items: Sequence[dict], problems: list[list[str]]) -> None:
    first: dict[str, str] = {}
    for item, case in zip(items, problems):
        file = item["image"][0] if isinstance(item["image"], list) else item["image"]
        stem = output_stem(str(file))
        if stem in first:
            case.append(f"{file}: its prediction would overwrite that of {first[stem]} (both are named "
                        f"'{stem}'); rename one of them or predict the two folders separately")
        else:
            first[stem] = file


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
        raise OSError(_unreadable(e)) from e
