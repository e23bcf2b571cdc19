# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Measuring the networks rather than training them.

- :mod:`.complexity`: parameters and FLOPs counted the way the thesis counted them (``info``, ``table``).
- :mod:`.benchmark`: speed and peak memory of QT-UNet against MONAI's networks, side by side (``bench``).
- :mod:`.memory`: the training memory model that picks batch size and crop from a GPU's memory.

Nothing is imported here: fvcore and the benchmark's references are optional dependencies.
"""
