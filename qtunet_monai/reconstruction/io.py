# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Reading k-space: a fastMRI reader that keeps the single-coil layout and target, the data list, and the
checks that stop a run with one line naming the file.

MONAI's :class:`~monai.apps.reconstruction.fastmri_reader.FastMRIReader` keeps only ``FastMRIKeys`` in
its meta data, so a fastMRI single-coil knee file loses its target ``reconstruction_esc``; and its k-space
``(slices, rows, columns)`` has no coil axis, so MONAI's mask transforms would take the
root-sum-of-squares over the slices. :class:`FastMRIVolumeReader` keeps every ``reconstruction_*`` target
and adds the singleton coil axis; multi-coil files (and the demo's) read as with MONAI's reader.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.apps.reconstruction.fastmri_reader import FastMRIReader
from monai.utils import FastMRIKeys

from ..bundle.errors import DataError, SettingError

__all__ = ["TARGET_KEYS", "FastMRIVolumeReader", "load_kspace_datalist", "check_kspace_cases", "check_mask_settings",
           "mask_columns"]

logger = logging.getLogger(__name__)

#: fastMRI's targets: root-sum-of-squares (multi-coil, and single-coil files too) and the single-coil ESC
TARGET_KEYS = ("reconstruction_rss", "reconstruction_esc")


def _kspace_problem(path, kspace_shape: tuple[int, ...], dtype) -> str | None:
    if not np.issubdtype(np.dtype(dtype), np.complexfloating):
        return (f"{path}: k-space must be complex (fastMRI stores complex64), found {np.dtype(dtype)} "
                f"of shape {tuple(kspace_shape)}")
    if len(kspace_shape) not in (3, 4) or min(kspace_shape) < 1:
        return (f"{path}: k-space of shape {tuple(kspace_shape)}; expected (slices, coils, rows, columns) or, "
                "single-coil, (slices, rows, columns)")
    return None


class FastMRIVolumeReader(FastMRIReader):
    """MONAI's ``FastMRIReader`` for multi- and single-coil fastMRI files.

    - single-coil k-space ``(slices, rows, columns)`` gets a singleton coil axis: ``(slices, 1, rows,
      columns)``, so that MONAI's mask transforms take the root-sum-of-squares over the coil;
    - every ``reconstruction_*`` dataset (``reconstruction_esc`` of single-coil knee files included) is kept
      in the meta data, beside MONAI's ``FastMRIKeys``;
    - a ``mask`` dataset is passed on only when the file has one (MONAI's reader fills in a float64 array
      of zeros of the k-space's size otherwise);
    - a file that is not HDF5, has no complex ``kspace`` or has one of the wrong shape raises a one-line
      :class:`~qtunet_monai.bundle.DataError` naming the file.
    """

    def read(self, data):
        path = data[0] if isinstance(data, (tuple, list)) else data
        try:
            loaded = super().read(path)
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({' '.join(str(e).split())[:160]})") from e
        loaded["_path"] = str(path)
        return loaded

    def get_data(self, dat: dict):
        path = dat.get("_path", dat.get(FastMRIKeys.FILENAME))
        if FastMRIKeys.KSPACE not in dat:
            raise DataError(f"{path}: no 'kspace' dataset (found {sorted(k for k in dat if not k.startswith('_'))})")
        kspace = np.asarray(dat[FastMRIKeys.KSPACE])
        problem = _kspace_problem(path, kspace.shape, kspace.dtype)
        if problem:
            raise DataError(problem)
        if kspace.ndim == 3:
            kspace = kspace[:, None]
        header = self._get_meta_dict(dat)
        header.update({k: dat[k] for k in dat if isinstance(k, str) and k.startswith("reconstruction_")})
        if FastMRIKeys.MASK in dat:
            header[FastMRIKeys.MASK] = np.asarray(dat[FastMRIKeys.MASK])
        return kspace, header


def load_kspace_datalist(datalist_file: str, split: str) -> list[dict]:
    """The ``split`` of a data list of k-space files (``[{"kspace": "train/file.h5"}, ...]``), paths made
    absolute (relative ones are relative to the list's folder).

    Raises:
        DataError: the list is missing, not JSON, the split is absent or empty, or an entry has no ``kspace``.
    """
    from ..bundle.datalist import load_datalist

    items = load_datalist(datalist_file, split)
    root = Path(datalist_file).parent
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("kspace"), str):
            raise DataError(f"data list {datalist_file}: '{split}' entry {i} has no 'kspace' file: {item!r}")
        path = Path(item["kspace"])
        out.append({**item, "kspace": str(path if path.is_absolute() else (root / path).resolve())})
    return out


def mask_columns(columns: int, center_fraction: float, acceleration: float) -> tuple[int, float]:
    """MONAI's mask rule for ``columns`` k-space columns: ``(centre columns, expected columns in all)``."""
    return round(columns * center_fraction), columns / acceleration


def check_mask_settings(center_fractions: Sequence[float], accelerations: Sequence[float]) -> None:
    """Centre fractions in [0, 1), accelerations >= 1, one per centre fraction.

    Raises:
        SettingError: naming the bad value.
    """
    if len(center_fractions) != len(accelerations) or not center_fractions:
        raise SettingError(f"center_fractions {list(center_fractions)} and accelerations {list(accelerations)} "
                           "need one acceleration per centre fraction.")
    for cf, acc in zip(center_fractions, accelerations):
        if not 0 <= cf < 1 or not acc >= 1:
            raise SettingError(f"centre fraction {cf} must be in [0, 1) and acceleration {acc} at least 1.")


def _summary(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems in the data:\n  " + "\n  ".join(problems)


def _case_problems(path: str, target_key: str | None, center_fractions, accelerations, check_values: bool) -> list[str]:
    import h5py

    if not Path(path).is_file():
        return [f"{path}: file does not exist"]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        return [f"{path}: not a readable HDF5 file ({' '.join(str(e).split())[:160]})"]
    with f:
        if "kspace" not in f:
            return [f"{path}: no 'kspace' dataset (found {sorted(f)})"]
        kspace = f["kspace"]
        problem = _kspace_problem(path, kspace.shape, kspace.dtype)
        if problem:
            return [problem]
        slices, rows, columns = kspace.shape[0], kspace.shape[-2], kspace.shape[-1]
        problems = []
        if target_key is not None:
            if target_key not in f:
                others = [k for k in f if k.startswith("reconstruction_")]
                hint = f"; it has {others}: --target_key {others[0]}" if others else " (a test file? it has no target)"
                problems.append(f"{path}: no '{target_key}' target{hint}")
            else:
                target = f[target_key]
                if (target.ndim != 3 or target.shape[0] != slices or target.shape[1] > rows
                        or target.shape[2] > columns):
                    problems.append(f"{path}: target '{target_key}' of shape {tuple(target.shape)} does not fit the "
                                    f"k-space {tuple(kspace.shape)} (expected ({slices}, <= {rows}, <= {columns}))")
                elif check_values and not np.isfinite(target[()]).all():
                    problems.append(f"{path}: target '{target_key}' holds NaN or infinite values")
        for cf, acc in zip(center_fractions, accelerations):
            centre, expected = mask_columns(columns, cf, acc)
            if centre == 0 and expected < 1:
                problems.append(f"{path}: the mask (centre fraction {cf}, acceleration {acc}) samples nothing of "
                                f"its {columns} k-space columns")
        if check_values:
            data = kspace[()]
            bad = int(data.size - np.isfinite(data).sum())
            if bad:
                problems.append(f"{path}: k-space holds {bad} NaN or infinite value(s)")
            elif not np.any(data):
                problems.append(f"{path}: the k-space is all zero")
    return problems


def check_kspace_cases(cases: list[dict], target_key: str | None = "reconstruction_rss",
                       center_fractions: Sequence[float] = (0.08,), accelerations: Sequence[float] = (4,),
                       check_values: bool = True) -> list[dict]:
    """Check every k-space file of a data list before a run starts; returns ``cases`` unchanged.

    Each file must be readable HDF5 with a complex ``kspace`` of shape ``(slices, coils, rows, columns)``
    or ``(slices, rows, columns)``; with ``target_key``, a ``(slices, rows', columns')`` target no larger
    than the k-space image; the mask settings must sample something of its columns; with
    ``check_values``, no NaN or infinite value and not all zero (reads the whole file).

    Raises:
        DataError: one line per problem, each naming the file (one problem: one line).
        SettingError: inconsistent mask settings.
    """
    check_mask_settings(center_fractions, accelerations)
    if not cases:
        raise DataError("the data list is empty: no k-space files to train or evaluate on.")
    try:
        import h5py  # noqa: F401
    except ImportError as e:
        raise ImportError("fastMRI files are HDF5: pip install 'qtunet_monai[reconstruction]' (h5py)") from e
    problems = [p for case in cases for p in _case_problems(case["kspace"], target_key, center_fractions,
                                                            accelerations, check_values)]
    if problems:
        raise DataError(_summary(problems))
    return cases
