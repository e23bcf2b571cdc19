# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The full-resolution detail path (``QTUNet(detail_widths=...)``), the training time budget and the
``--preset`` switch of the bundles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, run

from qtunet_monai import QTUNet
from qtunet_monai.bundle import PRESETS, SettingError, build_network
from qtunet_monai.bundle.errors import reported_cause

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"
TINY = {"feature_size": 12, "window_size": 3}


def _pair(seed: int = 0, **kwargs) -> tuple[QTUNet, QTUNet]:
    torch.manual_seed(seed)
    plain = QTUNet(1, 3, **TINY, **kwargs)
    torch.manual_seed(seed)
    off = QTUNet(1, 3, **TINY, detail_widths=(), **kwargs)
    return plain, off


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_detail_path_off_is_the_thesis_network(spatial_dims):
    plain, off = _pair(spatial_dims=spatial_dims)
    assert list(plain.state_dict()) == list(off.state_dict())
    assert not any("detail" in k for k in off.state_dict()) and any(k.startswith("head.") for k in off.state_dict())
    x = torch.randn(1, 1, *([19] * spatial_dims))
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), off.eval()(x))


@pytest.mark.parametrize(
    ("spatial_dims", "shape", "kwargs"),
    [
        (3, (2, 1, 23, 30, 17), {"detail_widths": (8, 16)}),
        (3, (1, 1, 21, 18, 25), {"detail_widths": (8,)}),
        (3, (1, 1, 21, 18, 25), {"detail_widths": (8,), "patch_size": 2, "num_stages": 4,
                                 "num_heads": (3, 6, 12, 24, 48)}),
        (3, (1, 1, 22, 19, 17), {"detail_widths": (8, 16), "merge_depth": False, "decoder": "vt"}),
        (2, (2, 1, 37, 41), {"detail_widths": (8, 16), "decoder": "none"}),
    ],
)
def test_detail_path_gives_the_input_shape_and_trains_every_parameter(spatial_dims, shape, kwargs):
    torch.manual_seed(0)
    net = QTUNet(1, 3, spatial_dims=spatial_dims, **TINY, **kwargs)
    assert not hasattr(net, "head") and len(net.detail_path.encoder) == len(kwargs["detail_widths"])
    x = torch.randn(*shape)
    out = net(x)
    assert out.shape == (shape[0], 3, *shape[2:])
    out.square().mean().backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    # (a bias table can get an exactly zero gradient where a window holds one token: softmax of one score)
    assert all(p.grad.abs().sum() > 0 for p in net.detail_path.parameters())


def test_detail_path_refuses_levels_the_patch_size_cannot_hold():
    with pytest.raises(ValueError, match="patch_size=2"):
        QTUNet(1, 2, **TINY, patch_size=2, detail_widths=(8, 16))
    with pytest.raises(ValueError, match="positive channel counts"):
        QTUNet(1, 2, **TINY, detail_widths=(8, 0))


def test_detail_path_with_deep_supervision_supervises_every_decoder_stage():
    torch.manual_seed(0)
    net = QTUNet(1, 3, **TINY, detail_widths=(8, 16), deep_supervision=True).train()
    outputs = net(torch.randn(1, 1, 32, 32, 32))
    # full-size logits, then every decoder stage finest first: 1/4, 1/8, 1/16
    assert [tuple(o.shape[2:]) for o in outputs] == [(32,) * 3, (8,) * 3, (4,) * 3, (2,) * 3]
    assert net.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_detail_path_checkpointing_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    net = QTUNet(1, 3, **TINY, detail_widths=(8, 16))
    x = torch.randn(1, 1, 20, 24, 16)
    expected = net(x)
    expected_grads = torch.autograd.grad(expected.square().mean(), list(net.parameters()))
    net.set_grad_checkpointing(True)
    assert net.detail_path.use_checkpoint
    out = net(x)
    grads = torch.autograd.grad(out.square().mean(), list(net.parameters()))
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


def test_detail_path_runs_under_bf16_autocast():
    torch.manual_seed(0)
    net = QTUNet(1, 3, **TINY, detail_widths=(8, 16)).eval()
    x = torch.randn(1, 1, 24, 24, 24)
    with torch.no_grad():
        full = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x)
    assert low.shape == full.shape and torch.isfinite(low).all()
    assert (low.float().argmax(1) == full.argmax(1)).float().mean() > 0.9


@pytest.mark.slow
def test_detail_path_traces_at_the_roi():
    """ONNX export and ``torch.compile`` with the detail path on: tests/networks/test_options_together.py."""
    torch.manual_seed(0)
    net = QTUNet(1, 3, spatial_dims=2, **TINY, detail_widths=(8, 16)).eval()
    x = torch.randn(1, 1, 40, 44)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        torch.testing.assert_close(traced(x), net(x))


def test_an_ssl_or_plain_checkpoint_loads_with_only_the_detail_keys_missing():
    torch.manual_seed(0)
    plain = QTUNet(1, 3, **TINY)
    detail = QTUNet(1, 3, **TINY, detail_widths=(8, 16))
    encoder = {k: v for k, v in plain.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = detail.load_state_dict(encoder, strict=False)
    assert unexpected == [] and missing and all(k.startswith("detail_path.") for k in missing)


def test_baselines_refuse_the_detail_path_by_name():
    with pytest.raises(ValueError, match=r"SegResNet has no QT-UNet \['detail_widths'\]"):
        build_network("SegResNet", 1, 4, [56, 56, 56], detail_widths=[16, 32])
    assert build_network("SegResNet", 1, 4, [56, 56, 56], detail_widths=[]) is not None


def _parsed(config: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(DEMO / "configs" / config))
    parser.update({"bundle_root": str(DEMO), **overrides})
    return parser


def test_preset_sets_the_network_and_recipe_and_an_explicit_key_wins():
    thesis = _parsed("train.json", preset="thesis")
    assert thesis.get_parsed_content("network_def").detail_widths == ()
    optimizer = thesis.get_parsed_content("optimizer")
    assert type(optimizer).__name__ == "Adam" and thesis.get_parsed_content("warmup_epochs") == 0
    assert {g["lr"] for g in optimizer.param_groups} == {1e-3}  # the demo task's own
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0}
    recipe = _parsed("train.json", preset="accurate")
    optimizer = recipe.get_parsed_content("optimizer")
    assert type(optimizer).__name__ == "AdamW" and recipe.get_parsed_content("warmup_epochs") == 3
    assert {g["lr"] for g in optimizer.param_groups} == {2e-3}  # twice the task's
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.05, 0.0}  # none on norms, biases, tables
    schedules = {name: type(parser.get_parsed_content("lr_scheduler")).__name__ for name, parser in
                 (("thesis", thesis), ("accurate", recipe))}
    assert schedules == {"thesis": "CosineAnnealingLR", "accurate": "WarmupCosineSchedule"}
    explicit = _parsed("train.json", preset="accurate", learning_rate=5e-4, weight_decay=0.01)
    optimizer = explicit.get_parsed_content("optimizer")
    assert {g["lr"] for g in optimizer.param_groups} == {5e-4}
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.01, 0.0}
    accurate = _parsed("inference.json", preset="accurate")
    assert list(accurate.get_parsed_content("network_def").detail_widths) == PRESETS["accurate"]["detail_widths"]
    overridden = _parsed("inference.json", preset="accurate", detail_widths=[])
    assert overridden.get_parsed_content("network_def").detail_widths == ()
    with pytest.raises(RuntimeError) as error:  # MONAI's "Failed to evaluate", caused by ours
        _parsed("train.json", preset="fastest").get_parsed_content("network_def")
    assert isinstance(reported_cause(error.value), SettingError)


@pytest.mark.slow
def test_unknown_preset_is_a_one_line_error(tmp_path):
    bundle = tmp_path / "demo"
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("data", "models", "eval", "docs"))
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--preset", "fastest", "--run", "$print(@network_def)"], check=False, cwd=bundle,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "unknown preset 'fastest'" in last and "Traceback" not in done.stderr


def test_time_budget_stops_at_the_last_whole_epoch_that_fits(tmp_path):
    """The budget handler alone on an ignite engine whose epochs take 0.2 s: with 0.5 s, after epoch 2 another
    epoch would end at about 0.6 s, so the run stops there; the record says so and says how long it took."""
    import time

    from ignite.engine import Engine

    from qtunet_monai.bundle.budget import TrainingTimeBudget

    with pytest.raises(ValueError, match="time_budget_min must be >= 0"):
        TrainingTimeBudget(-1)
    engine = Engine(lambda engine, batch: time.sleep(0.2))
    TrainingTimeBudget(0.5 / 60, path=str(tmp_path / "training_time.json")).attach(engine)
    engine.run([0], max_epochs=10)
    record = json.loads((tmp_path / "training_time.json").read_text())
    assert engine.state.epoch == 2 and record["stopped_by_budget"]
    assert (record["epochs"], record["max_epochs"], record["validations"]) == (2, 10, [])
    assert 0.4 <= record["wall_s"] < 1.0
    unlimited = Engine(lambda engine, batch: None)
    TrainingTimeBudget(0, path=str(tmp_path / "unlimited.json")).attach(unlimited)
    unlimited.run([0], max_epochs=3)
    assert json.loads((tmp_path / "unlimited.json").read_text())["stopped_by_budget"] is False
    assert unlimited.state.epoch == 3


@pytest.mark.slow
def test_time_budget_stops_training_and_keeps_a_loadable_best_model(task_bundle):
    """--time_budget_min: the run ends at the first epoch end after which another would overrun, validates
    that epoch, keeps the best model and records the budget; the detail path trains through the bundle."""
    bundle = task_bundle("msd_spleen")
    over = {"roi_size": [32, 32, 32], "num_workers": 0, "detail_widths": [8, 16]}
    run(config_file="configs/train.json", max_epochs=4, val_interval=3, time_budget_min=0.001, **over)
    record = json.loads((bundle / "eval" / "training_time.json").read_text())
    assert record["stopped_by_budget"] and record["epochs"] == 1 and record["max_epochs"] == 4
    assert [v["epoch"] for v in record["validations"]] == [1]  # validated at the stop, not at interval 3
    assert record["best_metric_epoch"] == 1 and record["time_budget_min"] == 0.001
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("detail_path.") for k in state)
    resume = torch.load(bundle / "models" / "resume.pt", weights_only=True)
    assert resume["epoch"] == 1
    shutil.rmtree(bundle / "eval")
    run(config_file="configs/inference.json", roi_size=[32, 32, 32], detail_widths=[8, 16])
    assert len(list((bundle / "eval").glob("*_seg.nii.gz"))) == 1
    # without a budget the record is still written, and the run is not stopped
    run(config_file="configs/train.json", max_epochs=1, val_interval=1, **over)
    record = json.loads((bundle / "eval" / "training_time.json").read_text())
    assert not record["stopped_by_budget"] and record["epochs"] == 1 and record["time_budget_min"] == 0
