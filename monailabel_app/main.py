# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label app serving qtunet bundles:

    monailabel start_server --app monailabel_app --studies <folder> --conf models qtunet_demo_brain_tissue_segmentation --host 127.0.0.1

``--conf`` keys: ``models`` (bundle names or folders, comma-separated), ``max_upload_mb`` (default
1024), ``min_held_out`` (validation images needed to hold labels out of training, default 2),
``allow_remote_without_auth`` (``true`` to serve beyond loopback without MONAI Label's
authentication, behind your own authenticating proxy).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import qtunet_monai
from qtunet_monai.integrations import monailabel_checks as checks
from qtunet_monai.integrations.monailabel import (
    CheckedDatastore,
    QTUNetInferTask,
    QTUNetTrainTask,
    check_request_images,
    label_values_of,
    resolve_bundles,
)

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
        max_mb = float(self.conf.get("max_upload_mb", checks.DEFAULT_MAX_UPLOAD_MB))
        return CheckedDatastore(self.studies, label_values=label_values_of(self.bundles),
                                max_upload_bytes=int(max_mb * 2**20),
                                extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def server_mode(self, mode: bool):
        if mode:  # the server is starting: refuse to listen beyond this machine without authentication
            try:
                checks.check_bind(checks.host_from_argv(sys.argv), settings.MONAI_LABEL_AUTH_ENABLE,
                                  str(self.conf.get("allow_remote_without_auth", "false")).lower() == "true")
            except checks.RequestRefused as e:
                # uvicorn prints a traceback for any exception raised at start-up: stop with the message alone
                print(f"qtunet MONAI Label app: {e}", file=sys.stderr, flush=True)
                os._exit(2)
        super().server_mode(mode)

    def infer(self, request, datastore=None):
        check_request_images(request, self.datastore(), [self.studies, getattr(self._sessions, "store_path", None)])
        return super().infer(request, datastore)

    def infer_wsi(self, request, datastore=None):
        check_request_images(request, self.datastore(), [self.studies, getattr(self._sessions, "store_path", None)])
        return super().infer_wsi(request, datastore)

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
