# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Named training presets: one ``--preset`` switch sets the network options and recipe together.

Every bundle's configs read the keys below through :func:`preset`, so ``--preset accurate`` changes
all of them at once and an explicit override of one key (``--detail_widths "[]"``) still wins. The
task's own settings (spacing, ROI, epochs) are not part of a preset; its learning rate is scaled by the
preset's ``learning_rate_scale``, and a preset with a ``weight_decay`` replaces the task's.
"""

from __future__ import annotations

from typing import Any

from .errors import SettingError

__all__ = ["PRESETS", "NETWORK_KEYS", "preset", "network_options"]

#: the preset keys that are :class:`~qtunet_monai.networks.QTUNet` arguments (the rest are the training recipe's)
NETWORK_KEYS = ("detail_widths", "num_stages", "patch_size", "deep_supervision")

#: preset name -> the config keys it sets. ``thesis`` is the thesis' network and recipe; ``accurate``
#: is the configuration chosen by validation Dice in ``benchmarks/demo_options.py`` (measured on the
#: demo only; see the demo bundle's docs).
_THESIS: dict[str, Any] = {
    "detail_widths": [],
    "num_stages": 3,
    "patch_size": 4,
    "deep_supervision": False,
    "intensity_augmentation": False,
    "spatial_augmentation": False,
    "optimizer_name": "Adam",
    "warmup_epochs": 0,
    "learning_rate_scale": 1.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "thesis": _THESIS,
    # the detail path of widths 12 and 24 with AdamW (decoupled weight decay 0.05), 3 warm-up epochs and
    # twice the task's learning rate: the best validation Dice over 3 seeds within SegResNet's time and
    # half its GFLOPs
    "accurate": {**_THESIS, "detail_widths": [12, 24], "optimizer_name": "AdamW", "weight_decay": 0.05,
                 "warmup_epochs": 3, "learning_rate_scale": 2.0},
}


def preset(name: str, trained: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config values of preset ``name`` (a key of :data:`PRESETS`).

    Args:
        name: the preset.
        trained: the settings a model was trained with (``settings.json``); when they name the same
            preset, their values of its keys win (a key overridden in training travels with the model).
    """
    if name not in PRESETS:
        raise SettingError(f"unknown preset {name!r} (--preset); choose one of {list(PRESETS)}.")
    values = dict(PRESETS[name])
    if trained and trained.get("preset") == name:
        values.update({key: trained[key] for key in values if key in trained})
    return values


def network_options(name: str) -> dict[str, Any]:
    """The :class:`~qtunet_monai.networks.QTUNet` arguments of preset ``name``."""
    return {key: value for key, value in preset(name).items() if key in NETWORK_KEYS}

