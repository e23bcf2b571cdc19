# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""QT-UNet inside MONAI's other tools: what they call, versioned and tested with the package.

- :mod:`.auto3dseg`: what the Auto3DSeg template ``algorithm_templates/qtunet`` runs (configs filled from
  the DataAnalyzer statistics, training, validation, inference) and ``CheckedAutoRunner``.
- :mod:`.auto3dseg_predict`: a finished AutoRunner work folder's ensemble on new images.
- :mod:`.monailabel`: MONAI Label tasks and datastore serving the bundles (the ``label`` extra).
- :mod:`.monailabel_checks`: the checks every MONAI Label request passes (no MONAI Label import needed).

Nothing is imported here, so each tool's optional dependencies are needed only by its own module.
"""
