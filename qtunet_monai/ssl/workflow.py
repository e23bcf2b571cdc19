# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Pre-training on MONAI's Ignite engines: a ``SupervisedTrainer`` whose iteration runs the two
views through :class:`~qtunet_monai.ssl.model.QTUNetSSL`, with gradient accumulation that updates
the BYOL target once per optimiser step, and handlers that watch for collapse and save the encoder.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Mapping, Sequence

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer

from ..bundle.checkpoints import atomic_save
from ..networks.utils import unwrap_module as _unwrap
from .model import QTUNetSSL, byol_momentum, collapse_signal, ssl_loss

__all__ = ["SSLTrainer", "SSLEvaluator", "CollapseMonitor", "EncoderSaver", "split_validation", "loss_jump",
           "LOSS_KEYS"]

logger = logging.getLogger(__name__)
BATCH_KEYS = ("view1", "view2", "target1", "target2", "rotation1", "rotation2")
#: the losses :func:`~qtunet_monai.ssl.model.ssl_loss` returns: their sum first, then the three heads'
LOSS_KEYS = ("loss", "loss_reconstruction", "loss_rotation", "loss_byol")


def _batch(engine: Engine, batchdata: dict) -> dict:
    missing = [k for k in BATCH_KEYS if k not in batchdata]
    if missing:
        raise ValueError(f"a pre-training batch needs {BATCH_KEYS} (made by qtunet_monai.ssl.TwoViewsd); "
                         f"missing {missing}.")
    return {k: batchdata[k].to(engine.state.device, non_blocking=engine.non_blocking) for k in BATCH_KEYS}


def split_validation(items: Sequence, max_cases: int = 100, fraction: float = 0.1, seed: int = 0) -> tuple[list, list]:
    """Hold out validation cases from a pre-training list, the same ones on every run and rank: ``fraction``
    of the cases, at least 1 and at most ``max_cases`` (the thesis kept 100 of its 3,597 CT-SSL scans); none
    from a single case.

    Returns:
        (training cases, validation cases), each in the input's order.
    """
    items = list(items)
    count = 0 if len(items) < 2 else min(max_cases, max(1, int(len(items) * fraction)))
    held = set(random.Random(seed).sample(range(len(items)), count))
    return [c for i, c in enumerate(items) if i not in held], [c for i, c in enumerate(items) if i in held]


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

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        batch = _batch(engine, batchdata)
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


class SSLEvaluator(SupervisedEvaluator):
    """The pre-training losses on held-out cases (no gradient, no target update), averaged over the epoch
    into ``engine.state.metrics`` as ``val_loss`` (the key metric: lower is better, so ``best_metric`` is
    the lowest) and ``val_loss_reconstruction``, ``val_loss_rotation``, ``val_loss_byol``. Each view is
    a fresh random draw, as in training.

    Args:
        kwargs: ``SupervisedEvaluator`` arguments; ``key_val_metric`` and ``loss_function`` are set here.
    """

    def __init__(self, *args, **kwargs) -> None:
        metrics = {f"val_{k}": Average(output_transform=lambda out, k=k: out[k]) for k in LOSS_KEYS}
        kwargs.update(key_val_metric={"val_loss": metrics.pop("val_loss")}, metric_cmp_fn=lambda new, best: new < best)
        kwargs["additional_metrics"] = {**metrics, **(kwargs.get("additional_metrics") or {})}
        loss_function = kwargs.pop("loss_function", ssl_loss)
        super().__init__(*args, **kwargs)
        self.loss_function = loss_function

    def run(self, global_epoch: int = 1) -> None:
        """Validate, unless there are no held-out cases (a data list of one case keeps it for training)."""
        if len(self.data_loader) == 0:
            logger.info("no held-out pre-training cases: validation skipped.")
            return
        super().run(global_epoch)

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        batch = _batch(engine, batchdata)
        engine.network.eval()
        with torch.no_grad(), torch.autocast(torch.device(engine.state.device).type, enabled=bool(engine.amp)):
            outputs = engine.network(batch["view1"], batch["view2"])
            losses = self.loss_function(outputs, batch)
        return {k: float(v) for k, v in losses.items()}


def loss_jump(history: Mapping[str, Sequence[float]], factor: float = 2.0, min_rise: float = 0.05) -> bool:
    """The collapse the thesis saw in its Base model's CT-SSL and CityScapes pre-training: the latest epoch's
    reconstruction and rotation losses both jumped while the BYOL loss stayed low.

    A loss has jumped when its latest value is at least ``factor`` times and ``min_rise`` above its lowest
    earlier value; BYOL stays low when its own latest value has not jumped by that rule.

    Args:
        history: per-epoch mean losses under ``loss_reconstruction``, ``loss_rotation``, ``loss_byol``.
        factor: the relative rise that counts as a jump.
        min_rise: the absolute rise that counts as a jump (so noise on a loss near 0 does not).
    """
    def jumped(values: Sequence[float]) -> bool:
        if len(values) < 2:
            return False
        best = min(values[:-1])
        return values[-1] >= factor * best and values[-1] - best >= min_rise

    return (jumped(history["loss_reconstruction"]) and jumped(history["loss_rotation"])
            and not jumped(history["loss_byol"]))


class CollapseMonitor:
    """Watch pre-training for collapse, with two signals, and warn naming the epoch:

    - projection spread: the collapse signal averaged over the epoch into ``engine.state.metrics["collapse"]``
      (about 1 when healthy, 0 when every input maps to the same projection); warns below ``threshold``;
    - loss jump: the epoch's mean reconstruction and rotation losses jumped while the BYOL loss stayed low
      (:func:`loss_jump`), what the thesis' Base model did; ``engine.state.metrics["loss_jump"]`` is 1 then.

    Args:
        threshold: the projection-spread warning level.
        jump_factor / min_rise: what counts as a jump (:func:`loss_jump`).
    """

    def __init__(self, threshold: float = 0.1, jump_factor: float = 2.0, min_rise: float = 0.05) -> None:
        self.threshold, self.jump_factor, self.min_rise = threshold, jump_factor, min_rise
        self.values: list[float] = []
        self.epoch_losses: dict[str, list[float]] = {k: [] for k in LOSS_KEYS[1:]}
        self.history: dict[str, list[float]] = {k: [] for k in LOSS_KEYS[1:]}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        self.values.append(output["collapse"])
        for key, values in self.epoch_losses.items():
            if key in output:
                values.append(output[key])

    def epoch_completed(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        value = sum(self.values) / max(len(self.values), 1)
        self.values.clear()
        engine.state.metrics["collapse"] = value
        if value < self.threshold:
            logger.warning(f"epoch {epoch}: representation collapse suspected: the spread of the "
                           f"online projections is {value:.3f} (< {self.threshold}; about 1 is healthy).")
        else:
            logger.info(f"epoch {epoch}: projection spread {value:.3f} (collapse below {self.threshold}).")
        if not all(self.epoch_losses.values()):  # outputs without the head losses: spread only
            return
        for key, values in self.epoch_losses.items():
            self.history[key].append(sum(values) / len(values))
            values.clear()
        jumped = loss_jump(self.history, self.jump_factor, self.min_rise)
        engine.state.metrics["loss_jump"] = float(jumped)
        if jumped:
            now = {k.removeprefix("loss_"): round(v[-1], 4) for k, v in self.history.items()}
            best = {k.removeprefix("loss_"): round(min(v[:-1]), 4) for k, v in self.history.items()}
            logger.warning(f"epoch {epoch}: collapse suspected: the reconstruction and rotation losses jumped while "
                           f"the BYOL loss stayed low (epoch means {now}; lowest before {best}).")


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
