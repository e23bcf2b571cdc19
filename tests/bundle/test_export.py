# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Export: TorchScript through MONAI's converter (its `ckpt_export` command runs on the demo bundle in
tests/e2e/test_demo_bundle.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.networks.utils import convert_to_torchscript


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["qt", "vt", "none"])
def test_torchscript_round_trip_gives_the_same_output(tmp_path, decoder, tiny_qtunet):
    net = tiny_qtunet(decoder=decoder).eval()
    x = torch.randn(1, 2, 24, 28, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the trace is specialised to this size, by design
        convert_to_torchscript(net, filename_or_obj=tmp_path / "net.ts", use_trace=True, inputs=[x], verify=True)
    loaded = torch.jit.load(tmp_path / "net.ts")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
