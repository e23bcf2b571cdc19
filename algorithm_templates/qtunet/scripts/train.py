# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""``python scripts/train.py run --config_file "['configs/hyper_parameters.yaml', ...]" --num_epochs=2``"""

from __future__ import annotations

import logging

import fire

from qtunet_monai.integrations.auto3dseg import train


def run(config_file, **override) -> float:
    logging.basicConfig(level=logging.INFO)
    return train(config_file, **override)


if __name__ == "__main__":
    fire.Fire()
