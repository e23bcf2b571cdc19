# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""QT-UNet (Querying Transformer UNet) for MONAI."""

__version__ = "0.1.0"  # the only place the version is written (pyproject.toml reads it)

from .networks import ARCHITECTURES, VARIANTS, QTUNet, build_architecture

__all__ = ["QTUNet", "ARCHITECTURES", "VARIANTS", "build_architecture", "__version__"]
