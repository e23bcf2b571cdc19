# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Auto3DSeg's inference contract: ``InferClass(configs, **override).infer(image_file)``."""

from __future__ import annotations

from qtunet_monai.integrations.auto3dseg import InferClass  # noqa: F401 (Auto3DSeg imports it from this file)
