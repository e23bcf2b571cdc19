# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""What the MONAI Label app checks before it acts on a client's request; no MONAI Label needed.

MONAI Label is installed in its own environment (see the README), so everything a client can get
wrong or abuse is checked here, where the package's tests reach it, and ``qtunet_monai.integrations.monailabel``
only turns :class:`RequestRefused` into HTTP responses:

- image ids, label tags and file names are plain names, never paths (:func:`check_name`); a path
  given for inference must lie in the studies folder, the sessions folder or be the server's own
  temporary copy of an upload (:func:`check_image_path`);
- uploads are refused, and their temporary copy deleted, when larger than a cap, not fully
  readable (truncated or header-only NIfTI), or, for a label, not matching its image in shape
  or holding values outside the served bundles' classes (:func:`check_upload`);
- the server refuses to listen beyond this machine without authentication (:func:`check_bind`);
- a retraining round starts from the previous model's score on the round's validation images and
  replaces ``models/model.pt`` only with a better model (:class:`RetrainingRound`); its data list
  goes through the bundle's own data check (:func:`retraining_overrides`).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import ipaddress
import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import from_engine

from ..bundle.checkpoints import read_checkpoint
from ..bundle.datalist import _IMAGE_SUFFIXES, DataError, check_cases
from ..bundle.errors import find_cause
from ..networks.utils import unwrap_module

__all__ = [
    "RequestRefused",
    "RetrainingRound",
    "check_bind",
    "check_extension",
    "check_image_path",
    "check_image_upload",
    "check_label_upload",
    "check_name",
    "check_train_request",
    "check_upload",
    "choose_validation",
    "discard_upload",
    "discarding_refused",
    "find_cause",
    "host_from_argv",
    "inside",
    "retraining_overrides",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 1024
# tempfile.NamedTemporaryFile's names: how MONAI Label's endpoints store an upload before handing it on
_UPLOAD_NAME = re.compile(r"^tmp[a-z0-9_]{8}(\.[A-Za-z0-9]+)*$")


class RequestRefused(ValueError):
    """A client request the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_name(value, what: str) -> str:
    """``value`` if it is a plain file name (an image id, a label tag, a model file name).

    Refused: anything but a non-empty string, path separators, ``..``, absolute or drive paths, a leading
    ``.`` (hidden files such as the datastore's own ``.datastore_v2.json``), control characters, more than
    255 characters.

    Raises:
        RequestRefused: (400) naming ``what`` and the reason.
    """
    if not isinstance(value, str) or not value:
        raise RequestRefused(f"{what} must be a non-empty name, got {value!r}.")
    reasons = [
        ("/" in value or "\\" in value, "contains a path separator"),
        (".." in value, "contains '..'"),
        (value.startswith("."), "starts with '.'"),
        (":" in value or os.path.isabs(value), "is an absolute or drive path"),
        (any(ord(c) < 32 or ord(c) == 127 for c in value), "contains control characters"),
        (len(value) > 255, "is longer than 255 characters"),
    ]
    for refused, reason in reasons:
        if refused:
            raise RequestRefused(f"{what} {value!r} {reason}: give a plain name, not a path.")
    return value


def check_extension(filename: str, patterns: Sequence[str], what: str) -> None:
    """Refuse (400) a file whose name matches none of the datastore's patterns (e.g. ``*.nii.gz``)."""
    if not any(fnmatch.fnmatch(os.path.basename(filename), p) for p in patterns):
        raise RequestRefused(f"{what}: file type of {os.path.basename(filename)!r} is not one of {list(patterns)}.")


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` (made absolute, ``..`` collapsed) lies in ``folder``."""
    path, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([path, folder]) == folder


def check_image_path(path: str, what: str, folders: Sequence[str | os.PathLike]) -> str:
    """``path`` if a client may have the server read it: it lies in one of ``folders`` (the studies, the
    sessions), or it is the server's temporary copy of an upload (a ``tmpXXXXXXXX`` name in the temp folder).

    Raises:
        RequestRefused: (400) otherwise; the file is not opened.
    """
    allowed = [f for f in folders if f]
    if os.path.isabs(path) and ".." not in Path(path).parts and (
            any(inside(path, f) for f in allowed) or _is_upload_copy(path)):
        return path
    raise RequestRefused(f"{what} {path!r} is not an image id of the datastore: give the id of an image in the "
                         "studies folder (see /datastore/), or upload the file.")


def discard_upload(path: str) -> None:
    """Delete a refused upload if it is the server's temporary copy (a ``tmpXXXXXXXX`` name in the temp folder);
    files anywhere else are never touched."""
    if _is_upload_copy(path):
        Path(path).unlink(missing_ok=True)


def _is_upload_copy(path: str) -> bool:
    folder = os.path.normpath(os.path.dirname(os.path.abspath(path)))
    return folder == os.path.normpath(tempfile.gettempdir()) and bool(_UPLOAD_NAME.match(os.path.basename(path)))


def _spatial_dims(image: str, ndim: int) -> int:
    return 2 if image.lower().endswith(_IMAGE_SUFFIXES) else min(3, ndim)


def check_upload(
    path: str,
    what: str,
    max_bytes: int,
    image: str | None = None,
    label_values: Sequence[int] | None = None,
) -> None:
    """Check an uploaded image (``image`` None) or label (of ``image``) before it enters the datastore.

    The whole file is read (a truncated or header-only NIfTI fails here, not in training), intensities must
    be finite, a label must have its image's spatial shape and values in ``label_values``.

    Args:
        path: the uploaded file.
        what: how to name it in messages, e.g. ``"image 'case_7'"``.
        max_bytes: larger files are refused (413).
        image: for a label, the datastore's file of its image.
        label_values: the values a label may hold (None: any).

    Raises:
        RequestRefused: naming ``what`` and every problem found.
    """
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RequestRefused(f"{what}: {size / 2**20:.1f} MB is over the upload limit of {max_bytes / 2**20:.0f} MB "
                             "(the server's --conf max_upload_mb).", status=413)
    try:
        if image is None:
            check_cases([{"image": path}], in_channels=None)
        else:
            from ..bundle.datalist import image_shape

            dims = _spatial_dims(image, len(image_shape(image)))
            check_cases([{"image": image, "label": path}], in_channels=None, label_values=label_values,
                        spatial_dims=dims)
    except (DataError, OSError) as e:
        raise RequestRefused(f"{what} is refused: {str(e).replace(path, 'the upload')}") from e


@contextlib.contextmanager
def discarding_refused(upload: str):
    """Delete the server's temporary copy of an upload if the block refuses it (MONAI Label removes the copy
    only after a successful request)."""
    try:
        yield
    except Exception:
        discard_upload(upload)
        raise


def check_image_upload(image_id: str, upload: str, patterns: Sequence[str], max_bytes: int) -> str:
    """The checks of ``PUT /datastore/image`` before the upload is stored: a plain id, a datastore file type,
    a complete, finite image within the size cap; a refused upload's temporary copy is deleted.

    Returns:
        the image id.
    """
    with discarding_refused(upload):
        check_name(image_id, "image id")
        check_extension(upload, patterns, f"image {image_id!r}")
        check_upload(upload, f"image {image_id!r}", max_bytes)
    return image_id


def check_label_upload(image_id: str, tag: str, upload: str, image: str, patterns: Sequence[str], max_bytes: int,
                       label_values: Sequence[int] | None) -> None:
    """The checks of ``PUT /datastore/label``: plain id and tag, a datastore file type, a complete label within
    the size cap, of ``image``'s shape, with values in ``label_values``; a refused upload is deleted."""
    with discarding_refused(upload):
        check_name(image_id, "image id")
        check_name(tag, "label tag")
        check_extension(upload, patterns, f"label for {image_id!r}")
        check_upload(upload, f"label for {image_id!r}", max_bytes, image=image, label_values=label_values)


def host_from_argv(argv: Sequence[str]) -> str:
    """The address ``monailabel start_server`` was told to listen on (its default is ``0.0.0.0``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-i", "--host", default="0.0.0.0" if "start_server" in argv else "127.0.0.1")
    return parser.parse_known_args(list(argv))[0].host


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_bind(host: str, auth_enabled: bool, allow_without_auth: bool = False) -> None:
    """Refuse to serve on an address other machines can reach while MONAI Label's authentication is off.

    Raises:
        RequestRefused: (500) saying what to pass instead.
    """
    if _loopback(host) or auth_enabled:
        return
    if allow_without_auth:
        logger.warning(f"serving on {host} without authentication (allow_remote_without_auth): anyone who reaches "
                       "this port can read, write and delete images and labels and start training.")
        return
    raise RequestRefused(
        f"refusing to serve on {host!r} without authentication: anyone reaching this port could read, write and "
        "delete images and labels. Pass --host 127.0.0.1 (this machine only; for a team, put a reverse proxy with "
        "TLS and authentication in front), or enable MONAI Label's authentication (environment "
        "MONAI_LABEL_AUTH_ENABLE=true and MONAI_LABEL_AUTH_REALM_URI=<your Keycloak realm>), or, if an "
        "authenticating proxy or firewall already guards this address, --conf allow_remote_without_auth true.",
        status=500,
    )


def check_train_request(request: dict, models_dir: str | os.PathLike) -> None:
    """Refuse (400) training requests that name files outside the bundle or values training cannot use.

    ``model_filename`` must be a ``.pt`` file in the bundle's ``models/`` folder, ``run_id`` the bundle's
    ``run``, no tracking URI other than the server's, ``max_epochs`` a positive integer and ``val_split``
    a fraction below 1 (or -1: the bundle's own validation list).
    """
    names = request.get("model_filename", "model.pt")
    for name in [names] if isinstance(names, str) else list(names)[:1]:
        check_name(name, "model_filename")
        if not name.endswith(".pt"):
            raise RequestRefused(f"model_filename {name!r} is not a .pt file.")
        if name != "model.pt" and not (Path(models_dir) / name).is_file():
            raise RequestRefused(f"model_filename {name!r} is not in {models_dir}.")
    if request.get("run_id", "run") != "run":
        raise RequestRefused(f"run_id {request.get('run_id')!r}: the bundles run 'run' only.")
    if request.get("tracking_uri"):
        raise RequestRefused("tracking_uri: set the server's MONAI_LABEL_TRACKING_URI instead of sending one.")
    epochs = request.get("max_epochs", 1)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise RequestRefused(f"max_epochs must be a positive integer, got {epochs!r}.")
    split = request.get("val_split", 0.2)
    if isinstance(split, bool) or not isinstance(split, (int, float)) or not (split == -1 or 0 <= split < 1):
        raise RequestRefused(f"val_split must be in [0, 1) (or -1), got {split!r}.")


def choose_validation(train: list[dict], val: list[dict] | None, min_held_out: int) -> tuple[list, list, str]:
    """``(train, validation, which)``: the held-out split when it has ``min_held_out`` images and leaves
    training images, otherwise every labelled image for both (``which`` says which was chosen)."""
    val = list(val or [])
    if len(val) >= max(min_held_out, 1) and train:
        return list(train), val, f"{len(val)} held-out labelled image(s)"
    everything = list(train) + val
    return everything, everything, f"the {len(everything)} labelled training image(s) (too few to hold any out)"


def retraining_overrides(
    overrides: dict,
    bundle_path: str | os.PathLike,
    report: str | None,
    validation: str = "",
    train_data_key: str = "train#dataset#data",
    validate_data_key: str = "validate#dataset#data",
    handlers_key: str = "train#handlers",
) -> dict:
    """Adapt MONAI Label's overrides of a bundle's ``train.json`` (keys as MONAI Label's ``BundleConstants``
    name them) for one round of interactive retraining, in place:

    - its data lists move from the dataset keys (``train#dataset#data``), which bypass the bundle's data
      check, to the lists that check reads (``train#datalist``, ``validate#datalist``);
    - a :class:`RetrainingRound` is added to the training handlers (previous ``models/model.pt`` to beat,
      metrics to ``report``); validation runs every epoch, data loading in the server's process.
    """
    for data_key in (train_data_key, validate_data_key):
        if data_key in overrides:
            overrides[f"{data_key.split('#')[0]}#datalist"] = overrides.pop(data_key)
    overrides["val_interval"] = 1
    overrides["num_workers"] = 0
    round_handler = {
        "_target_": f"{__name__}.RetrainingRound",
        "validator": "@validate#evaluator",
        "network": "@network",
        "previous": str(Path(bundle_path) / "models" / "model.pt"),
        "report": report,
        "validation": validation,
    }
    overrides[handlers_key] = [*overrides.get(handlers_key, []), round_handler]
    return overrides


class RetrainingRound:
    """One round of MONAI Label retraining: the previous model is the score to beat, and the round's
    metrics are written to ``report``.

    When training starts, the previous ``models/model.pt`` is validated on the round's validation images:
    the evaluator's best metric starts at its score (epoch 0), so the bundle's best-model saver replaces the
    file (atomically) only with a model that does strictly better; otherwise the previous model stays.

    Args:
        validator: the bundle's evaluator (``@validate#evaluator``).
        network: the trained network.
        previous: the model file in use, e.g. ``models/model.pt`` (absent: nothing to beat).
        report: a JSON file for the round's metrics (None: none written).
        validation: a description of the validation images, copied into the report.
    """

    def __init__(self, validator, network: torch.nn.Module, previous: str, report: str | None = None,
                 validation: str = ""):
        self.validator, self.network, self.previous, self.report = validator, network, previous, report
        self.summary: dict = {"validation": validation, "previous_metric": None, "epochs": []}

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self.validate_previous)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.record_epoch)
        trainer.add_event_handler(Events.COMPLETED, self.write)

    def validate_previous(self, trainer: Engine) -> None:
        if not Path(self.previous).is_file():
            return
        network = unwrap_module(self.network)
        start = {k: v.detach().clone() for k, v in network.state_dict().items()}
        network.load_state_dict(read_checkpoint(self.previous))
        self.validator.run(0)
        network.load_state_dict(start)
        self.summary["previous_metric"] = _number(self.validator.state.best_metric)
        logger.info(f"previous model {self.previous}: {self.summary['previous_metric']} on the validation images.")

    def record_epoch(self, trainer: Engine) -> None:
        state = self.validator.state
        validated = getattr(state, "epoch", None) == trainer.state.epoch
        self.summary["epochs"].append({
            "epoch": trainer.state.epoch,
            "loss": _number(from_engine(["loss"], first=True)(trainer.state.output)),
            "metric": _number(state.metrics.get(self.validator.state.key_metric_name)) if validated else None,
        })

    def write(self, trainer: Engine) -> None:
        state = self.validator.state
        self.summary.update({
            "metric_name": getattr(state, "key_metric_name", None),
            "best_metric": _number(state.best_metric),
            "best_epoch": int(state.best_metric_epoch),
            "model_replaced": bool(state.best_metric_epoch > 0),
        })
        if self.report:
            Path(self.report).write_text(json.dumps(self.summary, indent=1))


def _number(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    return None if value is None else float(value)
