# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The ``compile`` switch of the bundles and the Auto3DSeg template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_bundle_compile_switch_wraps_only_the_engines_network():
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / "qtunet_brats21_segmentation" / "configs"
    for name, engines in (("train.json", ("train#trainer", "validate#evaluator")), ("inference.json", ("evaluator",))):
        config = json.loads((configs / name).read_text())
        assert config["compile"] is False
        parser = ConfigParser(config)
        parser.update({"compile": True, "device": "$torch.device('cpu')", "variant": "tiny"})
        network, engine_network = parser.get_parsed_content("network"), parser.get_parsed_content("engine_network")
        assert isinstance(engine_network, torch._dynamo.eval_frame.OptimizedModule)
        assert engine_network._orig_mod is network  # checkpoints and the optimiser keep the plain network
        for engine in engines:
            assert parser[engine]["network"] == "@engine_network"
        parser.update({"compile": False})
        parser.parse()
        assert parser.get_parsed_content("engine_network") is parser.get_parsed_content("network")


@pytest.mark.parametrize("compile_flag", [False, True])
def test_auto3dseg_compile_hyper_parameter(compile_flag):
    from qtunet_monai.auto3dseg import _maybe_compiled, load_config

    configs = REPO / "algorithm_templates" / "qtunet" / "configs"
    files = [str(configs / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")]
    parser = load_config(files, input_channels=1, output_classes=3, bundle_root="/tmp", compile=compile_flag)
    network = parser.get_parsed_content("network")
    engine_network = _maybe_compiled(parser, network)
    assert (engine_network is network) != compile_flag
    assert getattr(engine_network, "_orig_mod", network) is network
