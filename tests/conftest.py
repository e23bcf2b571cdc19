# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Fixtures shared by the test files: seeded tiny QT-UNets and a task bundle copied with fake data.

Tests that run a subprocess, a bundle end to end, Auto3DSeg, more than one training step, an ONNX export or
``torch.compile``, or that take more than about 2 s, carry ``@pytest.mark.slow`` (registered in
pyproject.toml). The fast loop for contributors is ``python -m pytest -m "not slow" tests``; CI runs all.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qtunet_monai import QTUNet

REPO = Path(__file__).resolve().parents[1]

#: width 12 keeps a network test fast; window 3 makes shifted and padded windows appear on small maps
TINY = {"feature_size": 12, "window_size": 3}


def build_tiny_qtunet(**kwargs) -> QTUNet:
    """A QT-UNet with 2 input channels, 3 classes and the ``TINY`` width and window, built after seeding 0.

    Args:
        kwargs: any QTUNet argument; it overrides the defaults above.
    """
    torch.manual_seed(0)
    return QTUNet(**{"in_channels": 2, "out_channels": 3, **TINY, **kwargs})


@pytest.fixture
def tiny_qtunet() -> Callable[..., QTUNet]:
    """The factory :func:`build_tiny_qtunet`: ``tiny_qtunet(decoder="vt", spatial_dims=2)``."""
    return build_tiny_qtunet


@pytest.fixture
def tiny_eval_qtunet() -> Callable[..., QTUNet]:
    """The explain suites' network: :func:`build_tiny_qtunet` with one input channel, in eval mode;
    ``tiny_eval_qtunet(skip="cct", spatial_dims=2)``."""

    def make(**kwargs) -> QTUNet:
        return build_tiny_qtunet(**{"in_channels": 1, **kwargs}).eval()

    return make


@pytest.fixture
def task_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """A factory of task bundles on fake data: ``task_bundle("msd_spleen")`` copies that task's bundle from
    bundles/ (without data, models or eval) into ``tmp_path``, writes the task's fake data set and the bundle's
    data list from it, makes the copy the working directory and returns its folder.

    Args:
        tmp_path: pytest's folder of the test.
        monkeypatch: pytest's monkeypatch, to change the working directory for the test only.
    """
    from qtunet_monai.cli import fake_data, prepare_data
    from qtunet_monai.tasks import TASKS

    def make(data: str) -> Path:
        task = next(t for t in TASKS.values() if t.data == data)
        bundle = tmp_path / task.bundle
        shutil.copytree(REPO / "bundles" / task.bundle, bundle,
                        ignore=shutil.ignore_patterns("data", "models", "eval"))
        fake_data(task.data, str(tmp_path / "raw"))
        prepare_data(task.data, str(tmp_path / "raw"), str(bundle / "data" / "datalist.json"))
        monkeypatch.chdir(bundle)
        return bundle

    return make


def _compiles_to_one_graph_equal_to_eager(net: torch.nn.Module, x: torch.Tensor) -> None:
    """``torch.compile(dynamic=False)`` captured with ``aot_eager``: forward and backward equal eager, one graph,
    no graph break."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="aot_eager", dynamic=False)
    expected = net(x)
    expected_grads = torch.autograd.grad(expected.square().mean(), list(net.parameters()), allow_unused=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().mean(), list(net.parameters()), allow_unused=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    for grad, expected_grad in zip(grads, expected_grads):
        if expected_grad is not None:
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)
    breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert not breaks, breaks
    assert graphs == 1


@pytest.fixture
def compiles_to_one_graph() -> Callable[[torch.nn.Module, torch.Tensor], None]:
    """Asserts that a network compiles to one graph whose forward and backward equal eager."""
    return _compiles_to_one_graph_equal_to_eager


@pytest.fixture
def auto3dseg_template(tmp_path: Path) -> Path:
    """A writable copy of the Auto3DSeg template ``algorithm_templates/qtunet`` (fill_hyper_parameters edits it)."""
    out = tmp_path / "algo"
    shutil.copytree(REPO / "algorithm_templates" / "qtunet", out)
    return out


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                   if isinstance(lg, logging.Logger))]


@pytest.fixture(autouse=True)
def _drop_handlers_added_by_the_test():
    """Handlers a test attaches (bundles run in-process: ``logging.conf``, ignite's ``StatsHandler``) are bound
    to the stream pytest captured for that test; a later test logging through them writes to a closed file.
    pytest's own capture handlers come and go by themselves and are left alone."""
    before = {lg: set(lg.handlers) for lg in _loggers()}
    yield
    for lg in _loggers():
        for handler in [h for h in lg.handlers if h not in before.get(lg, set())]:
            if not type(handler).__module__.startswith("_pytest"):
                lg.removeHandler(handler)
