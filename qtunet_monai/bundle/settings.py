# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Settings that travel with the model, and data lists that resolve without data.

Training writes the effective settings it ran with (spacing, ROI, channels, classes, network options,
preset, recipe) to ``settings.json`` beside the checkpoint (:func:`write_settings`, atomically). Every
later command reads them back through the config key ``trained`` (:data:`TRAINED`): each setting key of
a generated config is an expression ``@trained.get('pixdim', <default>)``, so a command given no
override uses the trained value, and :func:`check_settings` (in the configs' ``initialize``) stops a
command whose explicit overrides contradict them with one line listing the differences, unless
``--accept_settings True``.

:func:`lazy` defers a data list until a case is asked for, so that a config resolves (MONAI's
``check_properties``, MONAI Label, the model zoo's checks) before any data exists.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from .errors import DataError, SettingError
from .files import atomic_write_text
from .presets import NETWORK_KEYS, PRESETS

__all__ = ["SETTINGS_NAME", "MODEL_KEYS", "RECIPE_KEYS", "ADJUSTABLE_KEYS", "TRAINED", "TRAINED_MODEL", "settings_file",
           "load_settings", "write_settings", "settings_differences", "check_settings", "LazyCases", "lazy"]

logger = logging.getLogger(__name__)

SETTINGS_NAME = "settings.json"
#: what the network and its data handling depend on: checked by every command that uses a trained model
MODEL_KEYS = ("in_channels", "num_classes", "pixdim", "roi_size", "intensity_mean", "intensity_std",
              "architecture", "variant", "preset", *NETWORK_KEYS, "skip", "cct_preset", "router", "capacity",
              "router_sites")
#: the training recipe: checked when training resumes
RECIPE_KEYS = ("label_values", "max_epochs", "val_interval", "learning_rate", "weight_decay", "batch_size",
               "num_samples", *(k for k in PRESETS["thesis"] if k not in NETWORK_KEYS), "seed")
#: stored and used by default, but another value may be given without --accept_settings (same weights)
ADJUSTABLE_KEYS = ("capacity",)
#: the config expression of the stored settings of the checkpoint's folder
TRAINED = "$qtunet_bundle.load_settings(@settings_file)"
#: the same, the model's keys only (MONAI Label's retraining: its own epochs and validation interval)
TRAINED_MODEL = "$qtunet_bundle.load_settings(@settings_file, model_only=True)"


def settings_file(ckpt_file: str | os.PathLike) -> str:
    """``settings.json`` beside the checkpoint ``ckpt_file`` (``models/model.pt`` -> ``models/settings.json``).

    Args:
        ckpt_file: the model's checkpoint file.
    """
    return str(Path(ckpt_file).parent / SETTINGS_NAME)


def load_settings(path: str | os.PathLike, model_only: bool = False) -> dict[str, Any]:
    """The settings stored in ``path``; ``{}`` when there is none (no training yet, or a model trained
    before settings were stored).

    Args:
        path: a ``settings.json`` written by :func:`write_settings`.
        model_only: only the network's and data handling's (:data:`MODEL_KEYS`), e.g. for a retraining
            that keeps the model but chooses its own recipe.

    Raises:
        SettingError: the file exists but is not a settings file.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SettingError(f"{path}: not readable as the model's settings ({e}); delete it or train again.") from e
    settings = content.get("settings") if isinstance(content, dict) else None
    if not isinstance(settings, dict):
        raise SettingError(f"{path}: holds no 'settings' object; delete it or train again.")
    return {k: v for k, v in settings.items() if k in MODEL_KEYS} if model_only else settings


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists), so that stored and given values compare alike."""
    return json.loads(json.dumps(value, default=str))


def write_settings(path: str | os.PathLike, *parts: dict[str, Any]) -> None:
    """Store the effective settings of a training beside its checkpoint (atomically; rank 0 only under torchrun).

    Args:
        path: the ``settings.json`` to write.
        parts: the settings, merged in order (e.g. the model's and the recipe's).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    settings = {k: _plain(v) for part in parts for k, v in part.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"qtunet_monai_version": __version__, "settings": settings}, indent=1) + "\n")
    logger.info(f"settings of this training written to {path}")


def settings_differences(trained: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key stored (given value)`` for every key of ``current`` that ``trained`` holds with another value.

    Args:
        trained: the stored settings.
        current: the settings a command is about to use.
    """
    return [f"{key} {json.dumps(_plain(trained[key]))} (given {json.dumps(_plain(value))})"
            for key, value in current.items() if key in trained and _plain(trained[key]) != _plain(value)]


def check_settings(trained: dict[str, Any], current: dict[str, Any], accept: bool = False,
                   path: str | os.PathLike = SETTINGS_NAME) -> None:
    """Stop when the settings a command uses contradict those the model was trained with.

    Args:
        trained: the stored settings (``{}``: nothing to check).
        current: the settings the command uses (given overrides and the config's values).
        accept: use ``current`` anyway (``--accept_settings True``), with a warning.
        path: the settings file, named in the message.

    Raises:
        SettingError: one line: the file and each differing key with its trained and given value.
    """
    differences = settings_differences(trained, {k: v for k, v in current.items() if k not in ADJUSTABLE_KEYS})
    adjusted = settings_differences(trained, {k: v for k, v in current.items() if k in ADJUSTABLE_KEYS})
    if adjusted:
        logger.info(f"using other values than the model's ({path}): {'; '.join(adjusted)}")
    if not differences:
        return
    listed = "; ".join(differences)
    if accept:
        logger.warning(f"--accept_settings: using settings that differ from the model's ({path}): {listed}")
        return
    raise SettingError(f"the model was trained with other settings ({path}): {listed}. Give none of these "
                       "overrides to use the trained values, or add --accept_settings True to use yours.")


class _UnavailableData(DataError, TypeError):
    """A data error raised by ``len()``: MONAI's engines ask for the length when they are built and take a
    ``TypeError`` as "unknown", so building a workflow needs no data; iterating raises it as a DataError."""


_UnavailableData.__name__ = "DataError"  # what the one-line report names


class LazyCases(Sequence):
    """A data list read on first use: ``len``, indexing and iteration call ``load`` once and keep its cases.

    Args:
        load: returns the cases (e.g. reads and checks a data list).
    """

    def __init__(self, load: Callable[[], Sequence[dict]]) -> None:
        self._load = load
        self._cases: list[dict] | None = None

    def _get(self) -> list[dict]:
        if self._cases is None:
            self._cases = list(self._load())
        return self._cases

    def __len__(self) -> int:
        try:
            return len(self._get())
        except DataError as e:
            raise _UnavailableData(str(e)) from e

    def __getitem__(self, index):
        return self._get()[index]

    def __iter__(self) -> Iterator[dict]:
        return iter(self._get())

    def __bool__(self) -> bool:
        return bool(self._get())

    def __reduce__(self):  # copies and pickles (data-loader workers) hold the loaded cases
        return list, (self._get(),)

    def __repr__(self) -> str:
        return f"LazyCases({'not loaded' if self._cases is None else len(self._cases)})"


def lazy(load: Callable[[], Sequence[dict]]) -> LazyCases:
    """``load``'s cases, read when first used (configs: ``$qtunet_bundle.lazy(lambda: ...)``).

    Args:
        load: returns the cases.
    """
    return LazyCases(load)
