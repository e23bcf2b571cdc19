# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
from .qtunet import ARCHITECTURES, VARIANTS, EncoderFeatures, QTUNet, QTUNetEncoder, build_architecture

__all__ = ["ARCHITECTURES", "VARIANTS", "EncoderFeatures", "QTUNet", "QTUNetEncoder", "build_architecture"]
