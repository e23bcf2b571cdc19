# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Export: TorchScript through MONAI's converter and MONAI's own `ckpt_export` command."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from monai.networks.utils import convert_to_torchscript

from qtunet_monai import QTUNet


@pytest.mark.parametrize("decoder", ["qt", "vt", "none"])
def test_torchscript_round_trip_gives_the_same_output(tmp_path, decoder):
    net = QTUNet(2, 3, feature_size=12, window_size=3, decoder=decoder).eval()
    x = torch.randn(1, 2, 24, 28, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the trace is specialised to this size, by design
        convert_to_torchscript(net, filename_or_obj=tmp_path / "net.ts", use_trace=True, inputs=[x], verify=True)
    loaded = torch.jit.load(tmp_path / "net.ts")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_monai_bundle_ckpt_export(tmp_path):
    """`python -m monai.bundle ckpt_export --use_trace True` on a bundle that builds QTUNet."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "models").mkdir()
    network = {"_target_": "qtunet_monai.networks.QTUNet", "in_channels": 1, "out_channels": 2,
               "feature_size": 12, "window_size": 3}
    (tmp_path / "configs" / "inference.json").write_text(json.dumps({"network_def": network}))
    meta = {"network_data_format": {
        "inputs": {"image": {"type": "image", "format": "magnitude", "num_channels": 1,
                             "spatial_shape": [32, 32, 32], "dtype": "float32"}},
        "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                             "spatial_shape": [32, 32, 32], "dtype": "float32"}}}}
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(meta))
    net = QTUNet(**{k: v for k, v in network.items() if k != "_target_"}).eval()
    torch.save(net.state_dict(), tmp_path / "models" / "model.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
           "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
           "--use_trace", "True"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = torch.jit.load(tmp_path / "models" / "model.ts")
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), net(x))
