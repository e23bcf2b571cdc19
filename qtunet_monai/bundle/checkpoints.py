# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Checkpoints that survive a killed run: atomic writes, resumable training, fine-tune loading.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed while saving can
leave a truncated file. These handlers write to a temporary file in the same folder and rename it
over the target, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from ..networks.utils import unwrap_module as _unwrap
from ..networks.utils import unwrap_state_dict
from .errors import CheckpointError, NonFiniteError, OutputError
from .files import check_writable, clean_stale_temporaries, replace_atomically, temporary_path

__all__ = ["read_checkpoint", "atomic_save", "ResumeCheckpoint", "BestModelSaver", "StopOnNonFiniteLoss", "load_pretrained",
           "non_finite_tensors", "prepare_folder", "load_failure"]

logger = logging.getLogger(__name__)
_ZIP_WRITE_FAILURES = re.compile(r"inline_container|PytorchStreamWriter|file write failed")


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path`` (named after this host and process, see
    :func:`~qtunet_monai.bundle.files.clean_stale_temporaries`), flushed to disk, then renamed over it.

    Raises:
        OutputError: the file cannot be written (read-only folder, full disk); the previous file is kept.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror or e}).") from e
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
        replace_atomically(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: could not be written ({e.strerror or e}); the previous file is kept.") from e
    except RuntimeError as e:
        if not _ZIP_WRITE_FAILURES.search(str(e)):
            raise
        # torch's zip writer reports a short write (a full disk) as "enforce fail at inline_container.cc"
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise OutputError(f"{path}: could not be written ({free / 2**20:.1f} MiB free on its disk; "
                          f"torch: {' '.join(str(e).split())[:120]}); the previous file is kept.") from e
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike, unwrap: bool = True, what: str = "checkpoint") -> Mapping:
    """The state dict in ``path``, read with the weights-only loader; a dict holding one under
    ``model``/``state_dict`` (or with DDP/compile prefixes) is unwrapped.

    Args:
        path: the file.
        unwrap: unwrap the model's state dict; False returns the file's mapping as it is (a resume state).
        what: what the file is, for the error message.

    Raises:
        CheckpointError: naming the file and, in one line, why it cannot be read (missing, truncated,
            or holding code or objects the weights-only loader refuses).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read the {what} {path}: {load_failure(e)}") from e
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return unwrap_state_dict(state) if unwrap else state


def load_failure(error: Exception) -> str:
    """One line saying why ``torch.load`` failed; for a refused pickle, the global it refused (torch's own
    message starts by explaining how to load the file unsafely, which is not what to do with an untrusted file)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refused = [line for line in lines if "unsupported global" in line.lower() or "unsupported operand" in line.lower()]
    if refused:
        return f"refused by the weights-only loader, the file holds code or objects ({refused[0]})"
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def non_finite_tensors(state: Mapping) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or infinite values."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def _finite_state(network, path: Path, when: str) -> dict:
    state = _unwrap(network).state_dict()
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteError(f"{path}: not written, the network's weights are not finite {when} "
                             f"({len(bad)} tensor(s), e.g. {bad[0]}); the previous file is kept.")
    return state


def prepare_folder(folder: str | os.PathLike) -> None:
    """At start-up: the folder must be writable, and temporaries of killed runs are removed from it."""
    check_writable(folder)
    clean_stale_temporaries(folder)


class ResumeCheckpoint:
    """Save everything training needs after every epoch, and optionally resume from it.

    The checkpoint holds the model, optimiser and scheduler state dicts, the engine's epoch and
    iteration and the evaluator's best metric and its epoch; a killed run loses at most the epoch in
    progress, and a worse epoch after resuming does not replace the best model. With ``resume=True``
    the file is loaded when the engine starts (``weights_only=True``) and training continues from the
    saved epoch. At start-up the folder must be writable and temporaries of killed writes are removed.

    Args:
        path: checkpoint file, e.g. ``models/resume.pt``.
        network: the model (DistributedDataParallel is unwrapped).
        optimizer: its optimiser.
        lr_scheduler: its scheduler, or None.
        resume: load ``path`` at start if it exists (a missing file starts from scratch, with a warning).
        save: write ``path`` after every epoch (switch off on ranks > 0).
        evaluator: the validation engine whose ``best_metric`` and ``best_metric_epoch`` are kept, or None.
    """

    def __init__(self, path: str, network, optimizer, lr_scheduler=None, resume: bool = False, save: bool = True,
                 evaluator: Engine | None = None):
        self.path = Path(path)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.resume, self.save, self.evaluator = resume, save, evaluator

    def attach(self, engine: Engine) -> None:
        if self.save:
            prepare_folder(self.path.parent)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def state_dict(self, engine: Engine) -> dict:
        state = {
            "model": _finite_state(self.network, self.path, f"after epoch {engine.state.epoch}"),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
        }
        if self.evaluator is not None:
            state["best_metric"] = float(getattr(self.evaluator.state, "best_metric", -1))
            state["best_metric_epoch"] = int(getattr(self.evaluator.state, "best_metric_epoch", -1))
        return state

    def write(self, engine: Engine) -> None:
        atomic_save(self.state_dict(engine), self.path)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.warning(f"resume requested but {self.path} does not exist: training starts from scratch.")
            return
        state = read_checkpoint(self.path, unwrap=False, what="resume checkpoint")
        _unwrap(self.network).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"]:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        engine.state.epoch = int(state["epoch"])
        engine.state.iteration = int(state["iteration"])
        best = ""
        if self.evaluator is not None and state.get("best_metric_epoch", -1) != -1:
            self.evaluator.state.best_metric = float(state["best_metric"])
            self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
            best = f"; best metric {state['best_metric']:.4f} at epoch {state['best_metric_epoch']}"
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch} "
                    f"(iteration {engine.state.iteration}){best}.")


class BestModelSaver:
    """Write the network's state dict to ``path`` atomically whenever the evaluator's key metric
    improves (MONAI evaluators track ``state.best_metric`` and ``state.best_metric_epoch``).

    The file is a plain state dict, as MONAI's bundle tools and MONAI Label expect of ``model.pt``.
    It is written only in the epoch that set the best metric (a best metric restored by
    :class:`ResumeCheckpoint` belongs to an earlier epoch), and never with non-finite weights.

    Args:
        path: e.g. ``models/model.pt``.
        network: the model (DistributedDataParallel is unwrapped).
        save: switch off on ranks > 0.
    """

    def __init__(self, path: str, network, save: bool = True):
        self.path, self.network, self.save = Path(path), network, save

    def attach(self, engine: Engine) -> None:
        if self.save:
            prepare_folder(self.path.parent)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        # the evaluator runs as epoch <trainer's epoch> (ValidationHandler), so a new best has the current epoch
        if getattr(engine.state, "best_metric_epoch", -1) == engine.state.epoch:
            metric = getattr(engine.state, "best_metric", None)
            atomic_save(_finite_state(self.network, self.path, f"at epoch {engine.state.epoch} (metric {metric})"),
                        self.path)


def _batch_files(batch) -> list[str]:
    """The image files of a (collated or decollated) batch, from the MetaTensors' ``filename_or_obj``."""
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    files: list[str] = []
    for item in items:
        image = item.get("image") if isinstance(item, Mapping) else None
        name = getattr(image, "meta", {}).get("filename_or_obj") if image is not None else None
        files += [str(n) for n in name] if isinstance(name, (list, tuple)) else [str(name)] if name else []
    return files


class StopOnNonFiniteLoss:
    """Stop training at the first NaN or infinite loss, naming the iteration and the batch's files.

    Ignite's ``TerminateOnNan`` ends the run quietly (exit status 0); this raises a
    :class:`NonFiniteError` instead, before the epoch ends, so no checkpoint of the broken weights is written.

    Args:
        loss_key: the loss' key in the engine's output (MONAI's trainers: ``loss``).
    """

    def __init__(self, loss_key: str = "loss"):
        self.loss_key = loss_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        output = output[0] if isinstance(output, (list, tuple)) and output else output
        loss = output.get(self.loss_key) if isinstance(output, Mapping) else output
        value = float(loss.detach().float().mean()) if torch.is_tensor(loss) else float(loss)
        if not math.isfinite(value):
            files = _batch_files(engine.state.batch)
            raise NonFiniteError(f"{', '.join(files) or 'unknown files'}: the loss became {value} at iteration "
                                 f"{engine.state.iteration} (epoch {engine.state.epoch}); training stopped, "
                                 "nothing saved. Check these images' intensities.")


def load_pretrained(network, path: str, prefix: str = "", exclude: tuple[str, ...] = (), strict_shapes: bool = True
                    ) -> dict[str, list[str]]:
    """Initialise ``network`` (or the part of it whose keys start with ``prefix``) from a checkpoint.

    Accepts a plain state dict or a dict holding one under ``model``/``state_dict``. Reports, and
    returns, the loaded, missing and unexpected keys; keys whose shapes differ raise a ``ValueError``
    naming them (``strict_shapes``) instead of failing deep inside ``load_state_dict``.

    Args:
        network: the model to initialise.
        path: the checkpoint file.
        prefix: only load the network's keys under this prefix (e.g. ``"encoder_stages."``).
        exclude: key prefixes never loaded (e.g. the classifier of another task).
        strict_shapes: raise on shape mismatches; otherwise skip those keys.
    """
    state = read_checkpoint(path)
    target = _unwrap(network)
    own = target.state_dict()
    wanted = {k: v for k, v in own.items() if k.startswith(prefix) and not k.startswith(tuple(exclude))}
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
                  for k, v in wanted.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if mismatched and strict_shapes:
        raise CheckpointError(f"{path} does not fit this network; mismatched shapes:\n  " + "\n  ".join(mismatched))
    loadable = {k: state[k] for k in wanted if k in state and tuple(state[k].shape) == tuple(own[k].shape)}
    target.load_state_dict(loadable, strict=False)
    report = {
        "loaded": sorted(loadable),
        "missing": sorted(k for k in wanted if k not in loadable),
        "unexpected": sorted(k for k in state if k not in own),
    }
    logger.info(
        f"initialised from {path}: {len(report['loaded'])} tensors loaded, {len(report['missing'])} missing, "
        f"{len(report['unexpected'])} unexpected."
    )
    for kind in ("missing", "unexpected"):
        if report[kind]:
            logger.info(f"{kind} keys: {report[kind][:20]}{' ...' if len(report[kind]) > 20 else ''}")
    return report
