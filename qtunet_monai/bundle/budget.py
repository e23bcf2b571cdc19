# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""A wall-time budget for training: configurations and baselines compared at equal time."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from .files import atomic_write_text

__all__ = ["TrainingTimeBudget"]

logger = logging.getLogger(__name__)


class TrainingTimeBudget:
    """End training cleanly within ``minutes`` of wall time, and keep a record of it.

    After each epoch the handler predicts the next epoch's time (the mean so far, validation
    included) and stops the trainer at this epoch's end if the next one would overrun the budget,
    so every epoch trained is whole: the resume checkpoint of that epoch is written as usual and,
    if the epoch was not a validation epoch, the validator runs once more so that the model trained
    last competes for the best checkpoint. With ``minutes`` 0 (default in the bundles) there is no
    budget, and the record is still written.

    The record (``path``, JSON, written atomically at the end and after every validation) holds the
    budget, the wall time, the epochs trained, whether the budget stopped the run, and every
    validation's ``(epoch, seconds, metric)``: what a curve of validation Dice against training time
    is drawn from. The clock counts this process's training; a resumed run has its own budget.

    Args:
        minutes: the budget; 0 or None for none.
        validator: the validation engine (its key metric is recorded; it runs at a budget stop).
        path: where the record goes (e.g. ``eval/training_time.json``); None: not written.
        save: switch the record off on ranks > 0.
    """

    def __init__(self, minutes: float | None = 0, validator: Engine | None = None, path: str | None = None,
                 save: bool = True) -> None:
        if minutes is not None and minutes < 0:
            raise ValueError(f"time_budget_min must be >= 0 (0: no budget), got {minutes!r}.")
        self.seconds = float(minutes or 0) * 60.0
        self.validator = validator
        self.path = Path(path) if path and save else None
        self.start = 0.0
        self.first_epoch = 0
        self.record: dict = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def started(self, engine: Engine) -> None:
        self.start = time.perf_counter()
        self.first_epoch = engine.state.epoch  # > 0 when resumed
        self.record = {"time_budget_min": self.seconds / 60.0, "stopped_by_budget": False, "validations": []}

    def epoch_completed(self, engine: Engine) -> None:
        elapsed = self.elapsed()
        self._record_validation(engine, elapsed)
        if not self.seconds or engine.state.epoch >= engine.state.max_epochs:
            return
        per_epoch = elapsed / (engine.state.epoch - self.first_epoch)
        stop = elapsed + per_epoch > self.seconds
        if dist.is_available() and dist.is_initialized():  # every rank stops at the same epoch
            flag = torch.tensor(float(stop), device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if not stop:
            return
        logger.info(f"time budget: {elapsed / 60:.1f} of {self.seconds / 60:.1f} min used after epoch "
                    f"{engine.state.epoch}, another epoch (~{per_epoch / 60:.1f} min) would overrun it: stopping.")
        self.record["stopped_by_budget"] = True
        if self.validator is not None and getattr(self.validator.state, "epoch", None) != engine.state.epoch:
            self.validator.run(engine.state.epoch)
            self._record_validation(engine, self.elapsed())
        engine.terminate()

    def completed(self, engine: Engine) -> None:
        self.record.update({"epochs": engine.state.epoch, "max_epochs": engine.state.max_epochs,
                            "wall_s": round(self.elapsed(), 1)})
        if self.validator is not None:
            self.record["best_metric"] = float(getattr(self.validator.state, "best_metric", -1))
            self.record["best_metric_epoch"] = int(getattr(self.validator.state, "best_metric_epoch", -1))
        self._write()
        logger.info(f"training took {self.record['wall_s'] / 60:.1f} min for {engine.state.epoch} epoch(s)"
                    + (f" (budget {self.seconds / 60:.1f} min)" if self.seconds else ""))

    def _record_validation(self, engine: Engine, elapsed: float) -> None:
        state = getattr(self.validator, "state", None)
        if state is None or getattr(state, "epoch", None) != engine.state.epoch:
            return
        name = getattr(state, "key_metric_name", None)
        metric = state.metrics.get(name) if name else None
        history = self.record["validations"]
        if metric is None or (history and history[-1]["epoch"] == engine.state.epoch):
            return
        history.append({"epoch": engine.state.epoch, "seconds": round(elapsed, 1), "metric": float(metric)})
        self._write()

    def _write(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.record, indent=1) + os.linesep)
