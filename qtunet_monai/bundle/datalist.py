# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Data lists for the bundles, checked before any training starts.

Every problem is reported with the file it is in and what is wrong (an empty list, a missing or
unreadable file, a wrong channel count or number of dimensions, image and label of different shapes,
a label whose header places it elsewhere than its image (orientation, spacing, origin), NaN, infinite
or absurdly large intensities, label values outside the task's classes, two inputs whose predictions
would get the same name), as one :class:`DataError` listing all of them, one line each.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import DataError

__all__ = ["DataError", "load_datalist", "folder_datalist", "check_cases", "geometry_differences", "image_shape", "output_stem",
           "INTENSITY_LIMIT", "GEOMETRY_TOLERANCE_MM", "DIRECTION_TOLERANCE"]

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
_VOLUME_SUFFIXES = (".nii.gz", ".nii")
# nnU-Net's channel files: <case>_0000.nii.gz, <case>_0001.nii.gz, ...
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


def folder_datalist(folder: str, in_channels: int | None = None, spatial_dims: int = 3) -> list[dict]:
    """Every image of ``folder`` as cases to predict (the inference configs' ``--input_dir``), sorted by name:
    NIfTI volumes (``.nii.gz``, ``.nii``) for 3D bundles, image files (PNG, ...) for 2D ones; sub-folders and
    other files are ignored. With ``in_channels`` > 1, nnU-Net's per-channel files (``case_0000.nii.gz``,
    ``case_0001.nii.gz``, ...) become one case whose image is the list of its channel files.

    Args:
        folder: the folder of images to predict.
        in_channels: the network's input channels (None or 1: one file per case).
        spatial_dims: 3 (NIfTI volumes) or 2 (image files).

    Raises:
        DataError: ``folder`` is not a folder or holds no image of the expected kind.
    """
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"input folder {path} does not exist or is not a folder (--input_dir).")
    suffixes = _VOLUME_SUFFIXES if spatial_dims == 3 else _IMAGE_SUFFIXES
    files = sorted(str(f.resolve()) for f in path.iterdir() if f.is_file() and f.name.lower().endswith(suffixes))
    if not files:
        kinds = "NIfTI volumes (.nii.gz, .nii)" if spatial_dims == 3 else f"images ({', '.join(_IMAGE_SUFFIXES)})"
        raise DataError(f"input folder {path} holds no {kinds} to predict (--input_dir).")
    matches = [_CHANNEL_FILE.match(Path(f).name) for f in files]
    if spatial_dims != 3 or not in_channels or in_channels < 2 or not all(matches):
        return [{"image": f} for f in files]
    cases: dict[str, list[tuple[int, str]]] = {}
    for file, match in zip(files, matches):
        cases.setdefault(match["case"], []).append((int(match["channel"]), file))
    return [{"image": [f for _, f in sorted(channels)]} for _, channels in sorted(cases.items())]


class _Opened(NamedTuple):
    shape: tuple[int, ...]
    data: np.ndarray | None  # None: header only
    affine: np.ndarray | None  # None: a 2D image file (PNG, ...), which has no geometry


def _load(path: str) -> _Opened:
    """Shape, voxels and affine; 2D image files (PNG, ...) through Pillow, everything else through nibabel.

    A 2D file's shape is ``(height, width[, channels])``, a NIfTI's ``(x, y, z[, channels])``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    try:
        if path.lower().endswith(_IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as image:
                data = np.asarray(image)
            return _Opened(data.shape, data, None)
        import nibabel as nib

        image = nib.load(path)
        return _Opened(tuple(image.shape), np.asanyarray(image.dataobj), _affine(image))
    except Exception as e:  # nibabel and Pillow raise several types for bad files
        raise OSError(_unreadable(e)) from e


def _affine(image) -> np.ndarray | None:
    affine = getattr(image, "affine", None)
    return None if affine is None else np.asarray(affine, dtype=np.float64)


# Larger magnitudes are not intensities of any scanner or camera; float32 statistics over such
# values (NormalizeIntensity's standard deviation) overflow to inf and the loss becomes NaN.
INTENSITY_LIMIT = 1e6


# Headers of the same grid written by different tools (nibabel, ITK, MONAI's writers; float32 fields,
# qform quaternions) agree to about 1e-5 mm; a label that does not sit on its image differs by a flip,
# another voxel size or a shift far beyond these.
GEOMETRY_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-3  # direction cosines, about 0.06 degrees


def geometry_differences(affine: np.ndarray, reference: np.ndarray) -> list[str]:
    """What differs between two voxel-to-world affines, ``affine``'s value first: ``orientation LPS vs RAS``,
    ``direction ...``, ``spacing (1.0, 1.0, 1.0) vs (1.5, 1.5, 1.5) mm``, ``origin (...) vs (...) mm``;
    empty when they agree within :data:`GEOMETRY_TOLERANCE_MM` and :data:`DIRECTION_TOLERANCE`."""
    import nibabel as nib

    affine, reference = np.asarray(affine, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    dims = min(affine.shape[0], reference.shape[0]) - 1
    matrix, ref_matrix = affine[:dims, :dims], reference[:dims, :dims]
    spacing, ref_spacing = np.linalg.norm(matrix, axis=0), np.linalg.norm(ref_matrix, axis=0)
    differences = []
    codes, ref_codes = "".join(map(str, nib.aff2axcodes(affine))), "".join(map(str, nib.aff2axcodes(reference)))
    if codes != ref_codes:
        differences.append(f"orientation {codes} vs {ref_codes}")
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            cosines = np.sum(matrix * ref_matrix, axis=0) / (spacing * ref_spacing)
        if not np.allclose(cosines, 1.0, rtol=0.0, atol=DIRECTION_TOLERANCE, equal_nan=True):
            angle = float(np.degrees(np.nanmax(np.arccos(np.clip(cosines, -1.0, 1.0)))))
            differences.append(f"direction of the axes differs by up to {angle:.2g} degrees")
    if not np.allclose(spacing, ref_spacing, rtol=0.0, atol=GEOMETRY_TOLERANCE_MM):
        differences.append(f"spacing {_mm(spacing)} vs {_mm(ref_spacing)} mm")
    origin, ref_origin = affine[:dims, -1], reference[:dims, -1]
    if not np.allclose(origin, ref_origin, rtol=0.0, atol=GEOMETRY_TOLERANCE_MM):
        differences.append(f"origin {_mm(origin)} vs {_mm(ref_origin)} mm")
    return differences


def _mm(values: np.ndarray) -> tuple[float, ...]:
    return tuple(round(float(v), 4) for v in values)


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

    An image's channel files and its label must share the spatial shape and, for NIfTI and other files
    with a header affine, the orientation, spacing and origin (:func:`geometry_differences`; read from
    the headers); 2D image files (PNG, ...) have no geometry and are compared by shape only.

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
    logger.info(f"checked {len(items)} case(s): channels, dimensions, shapes, geometry{checked} ok.")
    return list(items)


def _summary(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems in the data:\n  " + "\n  ".join(problems)


def _case_problems(item: dict, in_channels, allowed, check_values: bool, spatial_dims: int,
                   intensity_limit: float | None) -> list[str]:
    problems: list[str] = []
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    spatial, channels, first, first_affine = None, 0, None, None
    for file in images:
        opened = _open(file, check_values, problems)
        if opened is None:
            continue
        shape = opened.shape
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
        if first_affine is None:
            first, first_affine = file, opened.affine
        elif opened.affine is not None:
            differences = geometry_differences(opened.affine, first_affine)
            if differences:
                problems.append(f"{file}: geometry differs from the case's other channel {first} (this vs that): "
                                + "; ".join(differences))
        channels += shape[spatial_dims] if len(shape) > spatial_dims else 1
        if opened.data is not None:
            problems += _intensity_problems(file, opened.data, intensity_limit)
    if in_channels is not None and channels and channels != in_channels:
        problems.append(f"{images[0]}: {channels} image channel(s), but the network expects {in_channels}")
    label = item.get("label")
    if label is None:
        return problems
    opened = _open(label, check_values, problems)
    if opened is None:
        return problems
    shape = opened.shape
    label_channels = int(np.prod(shape[spatial_dims:])) if len(shape) > spatial_dims else 1
    if spatial is not None and shape[:spatial_dims] != spatial:
        problems.append(f"{label}: label shape {shape[:spatial_dims]} does not match image shape {spatial} "
                        f"of {images[0]}")
    elif label_channels != 1:
        problems.append(f"{label}: label has {label_channels} channels; expected one label map")
    if first_affine is not None and opened.affine is not None:
        differences = geometry_differences(opened.affine, first_affine)
        if differences:
            problems.append(f"{label}: label does not match its image {first} (label vs image): "
                            + "; ".join(differences))
    if opened.data is not None and allowed is not None:
        values = set(np.unique(opened.data).tolist())
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


def _open(path: str, check_values: bool, problems: list[str]) -> _Opened | None:
    """The file's shape, voxels (None: ``check_values`` off) and affine, or None after noting why ``path``
    cannot be opened."""
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
    return _header(path).shape


def _header(path: str) -> _Opened:
    """Shape and affine read from the file's header only (no voxels)."""
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    try:
        if path.lower().endswith(_IMAGE_SUFFIXES):
            from PIL import Image

            with Image.open(path) as image:
                bands = len(image.getbands())
                return _Opened((image.height, image.width) + ((bands,) if bands > 1 else ()), None, None)
        import nibabel as nib

        image = nib.load(path)
        return _Opened(tuple(image.shape), None, _affine(image))
    except Exception as e:
        raise OSError(_unreadable(e)) from e
