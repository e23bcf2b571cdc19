# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label app serving qtunet bundles:

    monailabel start_server --app monailabel_app --studies <folder> --conf models qtunet_demo_brain_tissue_segmentation --host 127.0.0.1
"""

from __future__ import annotations

import logging
from pathlib import Path

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import qtunet_monai
from qtunet_monai.label import CheckedDatastore, QTUNetInferTask, QTUNetTrainTask, resolve_bundles

logger = logging.getLogger(__name__)


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        # bundle names are looked up in the repository's bundles/, next to this app
        self.bundles = resolve_bundles(conf.get("models", ""), search=Path(app_dir).resolve().parent / "bundles")
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="QT-UNet bundles",
                         description="QT-UNet (qtunet_monai) bundles for auto-segmentation and retraining",
                         version=qtunet_monai.__version__)

    def init_datastore(self):
        if str(self.studies).startswith(("http://", "https://")):  # DICOMweb and friends as MONAI Label does
            return super().init_datastore()
        return CheckedDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        infers = {}
        for name, path in self.bundles.items():
            task = QTUNetInferTask(path, self.conf)
            if task.is_valid():
                infers[name] = task
        return infers

    def init_trainers(self):
        trainers = {}
        for name, path in self.bundles.items():
            task = QTUNetTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self):
        return {"random": Random(), "first": First()}
