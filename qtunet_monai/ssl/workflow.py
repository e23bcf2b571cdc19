# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Pre-training on MONAI's Ignite engines: a ``SupervisedTrainer`` whose iteration runs the two
views through :class:`~qtunet_monai.ssl.model.QTUNetSSL`, with gradient accumulation that updates
the BYOL target once per optimiser step, and handlers that watch for collapse and save the encoder.
"""

from __future__ import annotations

import logging
import math

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer

from ..bundle.checkpoints import _unwrap, atomic_save
from .model import QTUNetSSL, byol_momentum, collapse_signal, ssl_loss

__all__ = ["SSLTrainer", "CollapseMonitor", "EncoderSaver"]

logger = logging.getLogger(__name__)
BATCH_KEYS = ("view1", "view2", "target1", "target2", "rotation1", "rotation2")


class SSLTrainer(SupervisedTrainer):
    """MONAI ``SupervisedTrainer`` for :class:`QTUNetSSL` (``network``, possibly DDP-wrapped).

    Every ``accumulation_steps`` iterations (and at the end of an epoch) the optimiser steps once and
    then the BYOL target moves once, with momentum following BYOL's cosine schedule from
    ``base_momentum`` to 1 over all optimiser steps of the run. ``engine.state.output`` holds the
    three losses, their sum and the collapse signal as floats; ``optimizer_steps`` counts this run's steps.

    Args:
        accumulation_steps: micro-batches per optimiser step.
        base_momentum: BYOL's starting EMA momentum (0.996 in BYOL).
        kwargs: ``SupervisedTrainer`` arguments (``loss_function`` is not needed).
    """

    def __init__(self, *args, accumulation_steps: int = 1, base_momentum: float = 0.996, **kwargs) -> None:
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}.")
        kwargs.setdefault("loss_function", ssl_loss)
        super().__init__(*args, **kwargs)
        self.accumulation_steps = accumulation_steps
        self.base_momentum = base_momentum
        self.optimizer_steps = 0

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:  # noqa: D401 (ignite's hook)
        missing = [k for k in BATCH_KEYS if k not in batchdata]
        if missing:
            raise ValueError(f"a pre-training batch needs {BATCH_KEYS} (made by qtunet_monai.ssl.TwoViewsd); "
                             f"missing {missing}.")
        batch = {k: batchdata[k].to(engine.state.device, non_blocking=engine.non_blocking) for k in BATCH_KEYS}
        # micro-batch i of the epoch belongs to optimiser step i // k; the epoch's last step may be short
        k, length = self.accumulation_steps, engine.state.epoch_length
        i = (engine.state.iteration - 1) % length
        group_start = i - i % k
        group = min(k, length - group_start)
        first_of_step, last_of_step = i == group_start, i == group_start + group - 1
        engine.network.train()
        if first_of_step:
            engine.optimizer.zero_grad(set_to_none=True)
        device_type = torch.device(engine.state.device).type
        with torch.autocast(device_type, enabled=bool(engine.amp)):
            outputs = engine.network(batch["view1"], batch["view2"])
            losses = engine.loss_function(outputs, batch)
        scaled = losses["loss"] / group
        if engine.amp and engine.scaler is not None:
            engine.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        if last_of_step:
            if engine.amp and engine.scaler is not None:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()
            # step number from the engine's state, so a resumed run continues BYOL's momentum schedule
            # (from base towards 1, never exactly 1 while training)
            per_epoch = math.ceil(length / k)
            step = (engine.state.epoch - 1) * per_epoch + i // k
            model: QTUNetSSL = _unwrap(engine.network)
            model.update_target(byol_momentum(self.base_momentum, step, per_epoch * engine.state.max_epochs))
            self.optimizer_steps += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["collapse"] = float(collapse_signal(outputs["projection"]))
        return out


class CollapseMonitor:
    """Average the collapse signal over each epoch into ``engine.state.metrics["collapse"]`` and warn,
    naming the epoch, when it falls below ``threshold`` (about 1 when healthy, 0 when collapsed).

    Args:
        threshold: the warning level.
    """

    def __init__(self, threshold: float = 0.1) -> None:
        self.threshold = threshold
        self.values: list[float] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: self.values.append(e.state.output["collapse"]))
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_completed(self, engine: Engine) -> None:
        value = sum(self.values) / max(len(self.values), 1)
        self.values.clear()
        engine.state.metrics["collapse"] = value
        if value < self.threshold:
            logger.warning(f"epoch {engine.state.epoch}: representation collapse suspected: the spread of the "
                           f"online projections is {value:.3f} (< {self.threshold}; about 1 is healthy).")
        else:
            logger.info(f"epoch {engine.state.epoch}: projection spread {value:.3f} (collapse below {self.threshold}).")


class EncoderSaver:
    """Write the online encoder's weights (QT-UNet's parameter names) atomically after every epoch,
    for ``--finetune True --finetune_checkpoint <path>`` in any task bundle.

    Args:
        path: the file to write.
        network: the (possibly DDP-wrapped) :class:`QTUNetSSL`.
        save: False on ranks other than 0.
    """

    def __init__(self, path: str, network, save: bool = True) -> None:
        self.path, self.network, self.save = path, network, save

    def attach(self, engine: Engine) -> None:
        if self.save:
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: atomic_save(
                _unwrap(self.network).encoder_state_dict(), self.path))
