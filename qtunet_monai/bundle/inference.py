# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Inference options of the bundles: flip test-time augmentation, fold ensembles and per-case timing.

Test-time flips and fold ensembles average *probabilities* (nnU-Net's convention), yet the bundles'
post-processing applies the activation itself. Both therefore return the logits of the averaged
probabilities (``log p`` for softmax, ``logit p`` for sigmoid): the unchanged post-processing turns
them back into exactly the averaged probabilities, so switching an option on changes no other config.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from monai.utils import evenly_divisible_all_gather
from torch import nn

from .checkpoints import read_checkpoint

__all__ = ["FlipTTAInferer", "FoldEnsemble", "InferenceTimer", "probabilities", "probabilities_to_logits"]

_EPS = 1e-7  # keeps log(p) finite where a class has (numerically) zero probability


def probabilities(logits: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """The network's probabilities: softmax over channels, or a sigmoid per channel."""
    return torch.sigmoid(logits) if sigmoid else torch.softmax(logits, dim=1)


def probabilities_to_logits(probs: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """Logits whose softmax (or sigmoid) gives back ``probs``."""
    probs = probs.clamp(_EPS, 1.0 - _EPS) if sigmoid else probs.clamp_min(_EPS)
    return torch.logit(probs) if sigmoid else torch.log(probs)


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor (MetaTensor flips would also record themselves in the image's metadata)."""
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


class FlipTTAInferer(Inferer):
    """Test-time augmentation by mirroring: the mean probability over every combination of flips of
    the spatial axes (``2 ** spatial_dims`` predictions, nnU-Net's mirroring), each run through
    ``inferer`` and flipped back.

    Args:
        inferer: the inferer of one prediction (e.g. MONAI's ``SlidingWindowInferer``).
        spatial_axes: the spatial axes to mirror (0-based, after batch and channel); default all.
        sigmoid: the network's outputs are sigmoid (overlapping regions) rather than softmax logits.

    Returns logits of the averaged probabilities (see the module docstring).
    """

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] | None = None, sigmoid: bool = False) -> None:
        super().__init__()
        self.inferer = inferer
        self.spatial_axes = None if spatial_axes is None else tuple(spatial_axes)
        self.sigmoid = sigmoid

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        axes = self.spatial_axes if self.spatial_axes is not None else tuple(range(inputs.ndim - 2))
        total = None
        flips = [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]
        for flip in flips:
            dims = [a + 2 for a in flip]
            x = torch.flip(_plain(inputs), dims) if dims else inputs
            probs = probabilities(_plain(self.inferer(x, network, *args, **kwargs)), self.sigmoid)
            probs = torch.flip(probs, dims) if dims else probs
            total = probs if total is None else total + probs
        out = probabilities_to_logits(total / len(flips), self.sigmoid)
        if isinstance(inputs, MetaTensor):  # like MONAI's inferers: the prediction keeps the image's metadata
            out = MetaTensor(out)
            out.copy_meta_from(inputs)
        return out


class FoldEnsemble(nn.Module):
    """The mean probability of several trainings of one network (cross-validation folds).

    Args:
        network: the network definition; copied once per checkpoint.
        checkpoints: state-dict files (``models/fold<k>/model.pt``), loaded with ``weights_only=True``.
        sigmoid: the network's outputs are sigmoid (overlapping regions) rather than softmax logits.

    Returns logits of the averaged probabilities (see the module docstring).

    Raises:
        FileNotFoundError: naming every missing checkpoint, before anything is loaded.
    """

    def __init__(self, network: nn.Module, checkpoints: Sequence[str], sigmoid: bool = False) -> None:
        super().__init__()
        from pathlib import Path

        missing = [str(c) for c in checkpoints if not Path(c).is_file()]
        if missing:
            raise FileNotFoundError(f"fold checkpoint(s) missing: {missing}; train every fold first "
                                    "(--fold k --num_folds N for each k).")
        if not checkpoints:
            raise ValueError("FoldEnsemble needs at least one checkpoint.")
        self.members = nn.ModuleList()
        for path in checkpoints:
            member = copy.deepcopy(network)
            member.load_state_dict(read_checkpoint(path))
            self.members.append(member)
        self.sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = sum(probabilities(member(x), self.sigmoid) for member in self.members)
        return probabilities_to_logits(total / len(self.members), self.sigmoid)


class InferenceTimer:
    """Wall-clock time of each case's inference (network and inferer, TTA included; loading and
    post-processing excluded), in seconds, for :class:`monai.handlers.MetricsSaver`: per case in
    ``engine.state.metric_details[name]`` (one column) and their mean in ``engine.state.metrics[name]``.
    Attach it before the ``MetricsSaver`` (handlers run in the order attached).

    Args:
        name: the metric name (``inference_time`` -> ``inference_time_raw.csv``).
    """

    def __init__(self, name: str = "inference_time") -> None:
        self.name = name
        self._times: list[float] = []
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():  # kernels run asynchronously; wait for them before reading the clock
            torch.cuda.synchronize()

    def _reset(self, _engine: Engine) -> None:
        self._times = []

    def _started(self, _engine: Engine) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _completed(self, engine: Engine) -> None:
        self._sync()
        elapsed = time.perf_counter() - self._start
        size = len(engine.state.output[Keys.IMAGE])  # cases in the batch share its time
        self._times += [elapsed / size] * size

    def _report(self, engine: Engine) -> None:
        times = torch.tensor(self._times, dtype=torch.float64).reshape(-1, 1)
        times = evenly_divisible_all_gather(times, concat=True)  # every rank's cases, as MetricsSaver's file names
        if not hasattr(engine.state, "metric_details"):
            engine.state.metric_details = {}
        engine.state.metric_details[self.name] = times
        engine.state.metrics[self.name] = float(times.mean()) if times.numel() else float("nan")
