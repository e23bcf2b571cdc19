# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""``python scripts/validate.py run --config_file "[...]"``: mean Dice of model/model.pt on the fold's validation cases."""

from __future__ import annotations

import fire

from qtunet_monai.integrations.auto3dseg import validate


def run(config_file, **override) -> float:
    return validate(config_file, **override)


if __name__ == "__main__":
    fire.Fire()
