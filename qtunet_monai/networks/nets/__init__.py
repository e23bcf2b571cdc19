# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
from .qtunet import ARCHITECTURES, VARIANTS, QTUNet, build_architecture
