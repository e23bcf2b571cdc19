# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""MONAI Label tasks serving the qtunet bundles (needs the ``label`` extra: MONAI Label).

- Bundles are found locally (a path, or a folder name under ``search``, by default ``bundles/`` in the
  working directory; the repository's app passes its own ``bundles/``): no model-zoo query and no
  download at start-up.
- MONAI Label puts a string ``image_path`` into the data dictionary; MONAI 1.6's ``Spacingd`` treats
  every ``image_*`` key as image metadata and fails on it, so inference sets it aside while the
  bundle's pre-processing runs and puts it back afterwards.
- Every image id, label tag and path a client sends is checked (:mod:`qtunet_monai.integrations.monailabel_checks`):
  ids and tags are plain names (400 otherwise), inference reads only images of the datastore (or
  the client's own upload), uploads are read in full and checked (a label against its image) before
  they are stored, and a refused upload's temporary copy is deleted.
- Interactive training sends the saved labels through the bundle's data check, validates on
  held-out labels when there are enough, starts from the previous model's score, replaces
  ``models/model.pt`` only with a better model, and answers ``/train`` with the round's metrics.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from fastapi import HTTPException
from monai.transforms import CopyItemsd, DeleteItemsd
from monailabel.datastore.local import LocalDatastore
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask

from ..bundle.datalist import DataError
from . import monailabel_checks as checks

__all__ = [
    "CheckedDatastore",
    "QTUNetInferTask",
    "QTUNetTrainTask",
    "check_request_images",
    "label_values_of",
    "resolve_bundles",
]

logger = logging.getLogger(__name__)
_STASH = "qtunet_stashed_image_path"  # not an image_* key


def resolve_bundles(models: str, search: str | Path = "bundles") -> dict[str, str]:
    """``"a,b"`` (bundle folders, or names under ``bundles/``) -> ``{name: folder}``; unknown names raise."""
    found: dict[str, str] = {}
    search = Path(search)
    for entry in [m.strip() for m in (models or "").split(",") if m.strip()]:
        path = Path(entry) if Path(entry).is_dir() else search / entry
        if not (path / "configs" / "inference.json").is_file():
            choices = sorted(p.name for p in search.iterdir() if (p / "configs" / "inference.json").is_file()) \
                if search.is_dir() else []
            raise ValueError(f"no bundle {entry!r} (looked for {path}/configs/inference.json); choose a bundle "
                             f"folder or one of {choices}.")
        if not (path / "models" / "model.pt").is_file():
            logger.warning(f"{path} has no models/model.pt yet: train it first (the bundle's docs say how).")
        found[path.name] = str(path.resolve())
    if not found:
        raise ValueError("no bundle given: start the server with --conf models <bundle name or folder>.")
    return found


def _move(source: str, target: str) -> list:
    """MONAI transforms moving ``source`` to ``target`` in the data dictionary (nothing if absent)."""
    return [CopyItemsd(source, names=target, allow_missing_keys=True), DeleteItemsd(source)]


class QTUNetInferTask(BundleInferTask):
    """A bundle's ``inference.json`` served by MONAI Label, with ``image_path`` kept away from ``Spacingd``."""

    def pre_transforms(self, data=None):
        return [*_move("image_path", _STASH), *super().pre_transforms(data), *_move(_STASH, "image_path")]


class QTUNetTrainTask(BundleTrainTask):
    """A bundle's ``train.json`` retrained by MONAI Label on the saved labels.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` settings; ``min_held_out`` (default 2) is the least number of
            validation images for which labelled images are held out of training.
    """

    def __init__(self, path: str, conf: dict, **kwargs):
        super().__init__(path, conf, **kwargs)
        self.min_held_out = int(conf.get("min_held_out", 2))
        self._round: dict = {}

    def __call__(self, request, datastore):
        with _http():
            checks.check_train_request(request, Path(self.bundle_path) / "models")
        handle, report = tempfile.mkstemp(prefix="qtunet_round_", suffix=".json")
        os.close(handle)
        self._round = {"report": report}
        try:
            super().__call__(request, datastore)
            summary = json.loads(Path(report).read_text() or "{}")
        except Exception as e:
            bad_data = checks.find_cause(e, DataError)
            if bad_data is not None:
                raise HTTPException(status_code=400, detail=f"the saved labels cannot be trained on: {bad_data}") from e
            raise
        finally:
            Path(report).unlink(missing_ok=True)
        summary.update({"train_images": self._round.get("train_images"),
                        "validation_images": self._round.get("validation_images")})
        return summary

    def _partition_datalist(self, datalist, request, shuffle=False):
        train, val = super()._partition_datalist(datalist, request, shuffle=shuffle)
        train, val, which = checks.choose_validation(train, val, self.min_held_out)
        self._round.update(train_images=len(train), validation_images=len(val), validation=which)
        logger.info(f"validating on {which}.")
        return train, val

    def _update_overrides(self, overrides: dict) -> None:
        from ..bundle.settings import TRAINED_MODEL

        # retraining continues the served model: its stored network and data settings apply, the recipe is the round's
        overrides["trained"] = TRAINED_MODEL
        checks.retraining_overrides(overrides, self.bundle_path, self._round.get("report"),
                                    self._round.get("validation", ""), self.const.key_train_dataset_data(),
                                    self.const.key_validate_dataset_data(), self.const.key_train_handlers())


@contextlib.contextmanager
def _http():
    """Answer a :class:`~qtunet_monai.integrations.monailabel_checks.RequestRefused` with its HTTP status and message."""
    try:
        yield
    except checks.RequestRefused as e:
        raise HTTPException(status_code=e.status, detail=str(e)) from e


def label_values_of(bundles: dict[str, str]) -> list[int] | None:
    """The label values any of the served bundles trains on (``label_values`` or ``range(num_classes)``)."""
    from monai.bundle import ConfigParser

    from ..bundle.settings import TRAINED

    values: set[int] = set()
    for path in bundles.values():
        # resolved, with the settings stored beside the bundle's model (a training's --label_values travels)
        parser = ConfigParser()
        parser.read_config(str(Path(path) / "configs" / "train.json"))
        parser.update({"bundle_root": str(path), "trained": TRAINED})
        given = parser.get_parsed_content("label_values") if "label_values" in parser else None
        classes = parser.get_parsed_content("num_classes") if "num_classes" in parser else None
        if given is None and not isinstance(classes, int):
            return None
        values |= set(given or range(classes))
    return sorted(values)


class CheckedDatastore(LocalDatastore):
    """MONAI Label's local datastore, refusing what a client must not do (see the module's docstring).

    Args:
        datastore_path: the studies folder.
        label_values: values a saved label may hold (None: any).
        max_upload_bytes: larger uploads are refused.
        kwargs: passed to ``LocalDatastore``.
    """

    def __init__(self, datastore_path: str, label_values=None,
                 max_upload_bytes: int = checks.DEFAULT_MAX_UPLOAD_MB * 2**20, **kwargs):
        super().__init__(datastore_path, **kwargs)
        self.label_values, self.max_upload_bytes = label_values, max_upload_bytes

    def add_image(self, image_id, image_filename, image_info):
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
        with _http():
            checks.check_image_upload(image_id, image_filename, self._extensions, self.max_upload_bytes)
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id, label_filename, label_tag, label_info):
        with _http(), checks.discarding_refused(label_filename):
            image = self._image_file(checks.check_name(image_id, "image id"))
            checks.check_label_upload(image_id, label_tag, label_filename, image, self._extensions,
                                      self.max_upload_bytes, self.label_values)
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def _image_file(self, image_id: str) -> str:
        image = super().get_image_uri(image_id)
        if not image:
            raise checks.RequestRefused(f"image {image_id!r} is not in the datastore.", status=404)
        return image

    def get_image_path(self, image_id: str) -> str:
        """The studies-folder file of ``image_id``; refuses (400/404) unsafe or unknown ids."""
        with _http():
            checks.check_name(image_id, "image id")
            return self._image_file(image_id)


def _checked_ids(*names: str):
    """Datastore methods whose arguments ``names`` (image/label ids, label tags) must be plain names."""

    def wrap(method):
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            with _http():
                for name, value in values.items():
                    checks.check_name(value, name.replace("_", " "))
            return method(self, *args, **kwargs)

        return checked

    return wrap


for _method, _names in {
    "remove_image": ("image_id",), "get_image": ("image_id",), "get_image_uri": ("image_id",),
    "get_image_info": ("image_id",), "update_image_info": ("image_id",), "get_labels_by_image_id": ("image_id",),
    "get_label_by_image_id": ("image_id", "tag"), "remove_label": ("label_id", "label_tag"),
    "get_label": ("label_id", "label_tag"), "get_label_uri": ("label_id", "label_tag"),
    "get_label_info": ("label_id", "label_tag"), "update_label_info": ("label_id", "label_tag"),
}.items():
    setattr(CheckedDatastore, _method, _checked_ids(*_names)(getattr(LocalDatastore, _method)))


def check_request_images(request: dict, datastore, folders: list) -> None:
    """Refuse (400/404) an inference request's ``image`` unless it is an image id of ``datastore`` or a file in
    ``folders`` (studies, sessions) or the server's copy of the client's upload; the same for a ``label`` file."""
    with _http():
        image = request.get("image")
        if isinstance(image, str):
            if os.path.isabs(image) or "/" in image or "\\" in image:
                checks.check_image_path(image, "image", folders)
            elif isinstance(datastore, CheckedDatastore):
                datastore.get_image_path(image)
            else:  # DICOMweb and other remote datastores: their ids are not file names here
                checks.check_name(image, "image id")
        if isinstance(request.get("label"), str):
            checks.check_image_path(request["label"], "label", folders)
