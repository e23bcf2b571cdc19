# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Cross-validation folds of a data list's ``training`` cases, written into the data list.

The split is a seeded shuffle dealt round-robin into ``num_folds`` folds (sizes differ by at most
one). It is written once into the data list (a ``fold`` key per training case, ``num_folds`` and
``fold_seed`` at the top), so every fold's training, a later ensemble and a reader of the file see
the same split; a data list split with another seed or fold count is refused, not silently re-split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from monai.auto3dseg.utils import datafold_read

from .datalist import DataError, load_datalist
from .files import atomic_write_text

__all__ = ["fold_assignment", "load_fold", "write_folds"]


def fold_assignment(num_cases: int, num_folds: int, seed: int) -> list[int]:
    """The fold of each of ``num_cases`` cases: a ``seed``-ed permutation dealt round-robin."""
    if num_folds < 2:
        raise ValueError(f"num_folds must be at least 2, got {num_folds}.")
    if num_cases < num_folds:
        raise ValueError(f"{num_cases} training case(s) cannot fill {num_folds} folds.")
    order = np.random.default_rng(seed).permutation(num_cases)
    folds = [0] * num_cases
    for position, case in enumerate(order):
        folds[int(case)] = position % num_folds
    return folds


def write_folds(datalist_file: str, num_folds: int = 5, seed: int = 0) -> dict:
    """Give every ``training`` case of ``datalist_file`` a ``fold`` (unless already split this way);
    returns the data list's content.

    Raises:
        DataError: the data list is unreadable, or already split with another ``num_folds`` or seed.
    """
    load_datalist(datalist_file, "training")  # the file's problems, reported with its name
    path = Path(datalist_file)
    content = json.loads(path.read_text())
    cases = content["training"]
    recorded = (content.get("num_folds"), content.get("fold_seed"))
    if all("fold" in c for c in cases) and recorded != (None, None):
        if recorded != (num_folds, seed):
            raise DataError(f"data list {path} is split into {recorded[0]} folds with seed {recorded[1]}, not "
                            f"{num_folds} with seed {seed}; pass those, or remove its 'fold' keys to split again.")
        return content
    for case, fold in zip(cases, fold_assignment(len(cases), num_folds, seed)):
        case["fold"] = fold
    content["num_folds"], content["fold_seed"] = num_folds, seed
    atomic_write_text(path, json.dumps(content, indent=4))
    return content


def load_fold(datalist_file: str, split: str, fold: int = -1, num_folds: int = 5, seed: int = 0) -> list[dict]:
    """A split of the data list, cross-validated when ``fold >= 0``.

    With ``fold`` k, ``training`` is every training case outside fold k and ``validation`` is fold k
    (the folds are written into the data list first, see :func:`write_folds`); other splits
    (``testing``) and ``fold < 0`` read the data list as it is.

    Args:
        datalist_file: the bundle's data list.
        split: ``training``, ``validation`` or ``testing``.
        fold: the held-out fold, ``0 <= fold < num_folds``; -1 for no cross-validation.
        num_folds: number of folds.
        seed: the seed of the split.
    """
    if fold < 0 or split not in ("training", "validation"):
        return load_datalist(datalist_file, split)
    if fold >= num_folds:
        raise ValueError(f"fold {fold} does not exist with num_folds={num_folds} (folds are 0..{num_folds - 1}).")
    write_folds(datalist_file, num_folds, seed)
    # our reader makes the paths absolute and names the file in its errors; MONAI's (Auto3DSeg's) splits by
    # the "fold" key, with no base folder left to prepend
    cases = load_datalist(datalist_file, "training")
    training, validation = datafold_read({"training": cases}, basedir="", fold=fold, key="training")
    return validation if split == "validation" else training
