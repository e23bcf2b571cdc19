# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""``torch.compile`` as the bundles run it equals eager over a sequence of input sizes, compiling once per
new size; and the ``compile`` switch of the bundles and the Auto3DSeg template."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from qtunet_monai.networks import QTUNet

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_compiled_graph_equals_eager_over_two_sizes_one_graph_per_size():
    """What the bundles' ``--compile True`` runs, ``torch.compile(network, dynamic=False)``: forward and
    backward equal eager for padded and shifted windows, a second size compiles one more graph, the first
    size again none, and nothing breaks the graph. The test captures the graphs with AOTAutograd
    (``aot_eager``: dynamo, functionalisation, the backward graph) without inductor's C++ code generation,
    which takes several minutes on a CPU; ``python benchmarks/compile_check.py`` runs inductor in 3D."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = QTUNet(1, 2, spatial_dims=2, feature_size=6, window_size=3, num_stages=2, num_heads=(1, 2, 2))
    compiled = torch.compile(net, backend="aot_eager", dynamic=False)
    graphs = []
    # (20, 24): first-stage map 5 x 6, padded to 6 x 6 and shifted; (28, 12): both sizes change
    for shape in [(20, 24), (28, 12), (20, 24)]:
        x = torch.randn(2, 1, *shape)
        expected = net(x)
        expected_grads = torch.autograd.grad(expected.square().mean(), list(net.parameters()))
        out = compiled(x)
        grads = torch.autograd.grad(out.square().mean(), list(net.parameters()))
        assert out.shape == (2, 2, *shape)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    breaks = dict(counters["graph_break"])
    torch._dynamo.reset()
    assert not breaks, breaks
    assert graphs == [1, 2, 2], graphs  # one graph per size, none for a size seen before


def test_bundle_compile_switch_goes_to_the_engines_and_leaves_the_network_plain():
    from monai.bundle import ConfigParser

    configs = REPO / "bundles" / "qtunet_brats21_segmentation" / "configs"
    for name, engines in (("train.json", ("train#trainer", "validate#evaluator")), ("inference.json", ("evaluator",))):
        config = json.loads((configs / name).read_text())
        assert config["compile"] is False
        parser = ConfigParser(config)
        parser.update({"compile": True, "device": "$torch.device('cpu')", "variant": "tiny"})
        network = parser.get_parsed_content("network")
        assert not isinstance(network, torch._dynamo.eval_frame.OptimizedModule)  # what checkpoints save
        for engine in engines:
            assert parser[engine]["network"] == "@network"
            assert parser.get_parsed_content(f"{engine}#compile") is True
            assert parser[engine]["compile_kwargs"] == {"dynamic": False}


@pytest.mark.slow
def test_compiled_inference_keeps_tta_and_invertd(tmp_path):
    """``--compile True`` through MONAI's evaluator: flip TTA and ``Invertd`` still give the eager
    predictions, in the input's geometry. The bundle's default network at a 32^3 ROI: the resampled case
    (about 24 x 23 x 21 at 2 mm) is one padded window instead of one 56^3 window, for each of the 8 flips.
    The evaluator compiles with ``aot_eager``, as the test above: inductor's C++ code generation depends on its
    on-disk cache (this test took 78 s in a whole-suite run, 39 s in a rerun); ``benchmarks/compile_check.py``
    runs inductor."""
    import nibabel as nib
    import numpy as np

    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation", bundle,
                    ignore=shutil.ignore_patterns("data", "models", "eval"))
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    from qtunet_monai.bundle.presets import network_options

    torch.save(QTUNet(1, 4, variant="tiny", **network_options("accurate")).state_dict(), bundle / "models" / "model.pt")
    image = tmp_path / "case.nii.gz"
    affine = np.diag([1.3, 1.1, 1.2, 1.0])
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((37, 41, 35)).astype(np.float32), affine), image)
    outputs = {}
    for flag in (False, True):
        out = tmp_path / f"out_{flag}"
        done = subprocess.run(
            [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
             "--datalist", f"$[{{'image': '{image}'}}]", "--output_dir", str(out), "--tta", "True", "--roi_size",
             "[32, 32, 32]",
             "--compile", str(flag), "--evaluator#compile_kwargs", "{'dynamic': False, 'backend': 'aot_eager'}",
             "--device", "$torch.device('cpu')"],
            cwd=bundle, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        (written,) = out.rglob("*.nii.gz")
        saved = nib.load(written)
        assert saved.shape[:3] == (37, 41, 35)
        np.testing.assert_allclose(saved.affine, affine, atol=1e-4)
        outputs[flag] = np.asarray(saved.dataobj)
    assert (outputs[True] == outputs[False]).mean() > 0.999


@pytest.mark.parametrize("compile_flag", [False, True])
def test_auto3dseg_compile_hyper_parameter(compile_flag):
    from qtunet_monai.integrations.auto3dseg import _maybe_compiled, load_config

    configs = REPO / "algorithm_templates" / "qtunet" / "configs"
    files = [str(configs / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")]
    parser = load_config(files, input_channels=1, output_classes=3, bundle_root="/tmp", compile=compile_flag)
    network = parser.get_parsed_content("network")
    engine_network = _maybe_compiled(parser, network)
    assert (engine_network is network) != compile_flag
    assert getattr(engine_network, "_orig_mod", network) is network
