# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Checkpoints that survive a killed run: atomic writes, resumable training, fine-tune loading.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``), so a run killed while saving can
leave a truncated file. These handlers write to a temporary file in the same folder and rename it
over the target, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from ignite.engine import Engine, Events

__all__ = ["atomic_save", "ResumeCheckpoint", "BestModelSaver", "load_pretrained"]

logger = logging.getLogger(__name__)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unwrap(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


class ResumeCheckpoint:
    """Save everything training needs after every epoch, and optionally resume from it.

    The checkpoint holds the model, optimiser and scheduler state dicts and the engine's epoch and
    iteration; a killed run loses at most the epoch in progress. With ``resume=True`` the file is
    loaded when the engine starts (``weights_only=True``) and training continues from the saved epoch.

    Args:
        path: checkpoint file, e.g. ``models/resume.pt``.
        network: the model (DistributedDataParallel is unwrapped).
        optimizer: its optimiser.
        lr_scheduler: its scheduler, or None.
        resume: load ``path`` at start if it exists (a missing file starts from scratch, with a warning).
        save: write ``path`` after every epoch (switch off on ranks > 0).
    """

    def __init__(self, path: str, network, optimizer, lr_scheduler=None, resume: bool = False, save: bool = True):
        self.path = Path(path)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.resume, self.save = resume, save

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load)
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def state_dict(self, engine: Engine) -> dict:
        return {
            "model": _unwrap(self.network).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else {},
            "epoch": engine.state.epoch,
            "iteration": engine.state.iteration,
        }

    def write(self, engine: Engine) -> None:
        atomic_save(self.state_dict(engine), self.path)

    def load(self, engine: Engine) -> None:
        if not self.path.is_file():
            logger.warning(f"resume requested but {self.path} does not exist: training starts from scratch.")
            return
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"cannot read the resume checkpoint {self.path}: {e}") from e
        _unwrap(self.network).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"]:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        engine.state.epoch = int(state["epoch"])
        engine.state.iteration = int(state["iteration"])
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch} (iteration {engine.state.iteration}).")


class BestModelSaver:
    """Write the network's state dict to ``path`` atomically whenever the evaluator's key metric
    improves (MONAI evaluators track ``state.best_metric`` and ``state.best_metric_epoch``).

    The file is a plain state dict, as MONAI's bundle tools and MONAI Label expect of ``model.pt``.

    Args:
        path: e.g. ``models/model.pt``.
        network: the model (DistributedDataParallel is unwrapped).
        save: switch off on ranks > 0.
    """

    def __init__(self, path: str, network, save: bool = True):
        self.path, self.network, self.save = Path(path), network, save
        self._saved_for: tuple | None = None

    def attach(self, engine: Engine) -> None:
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        best = (getattr(engine.state, "best_metric_epoch", -1), getattr(engine.state, "best_metric", None))
        # the evaluator's own epoch is always 1: best_metric_epoch is the trainer's epoch of the best
        if best[0] != -1 and best != self._saved_for:
            atomic_save(_unwrap(self.network).state_dict(), self.path)
            self._saved_for = best


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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read the checkpoint {path}: {e}") from e
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "network"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    target = _unwrap(network)
    own = target.state_dict()
    wanted = {k: v for k, v in own.items() if k.startswith(prefix) and not k.startswith(tuple(exclude))}
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs network {tuple(v.shape)}"
                  for k, v in wanted.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if mismatched and strict_shapes:
        raise ValueError(f"{path} does not fit this network; mismatched shapes:\n  " + "\n  ".join(mismatched))
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
