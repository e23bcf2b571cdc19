# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Self-supervised pre-training: views, heads, BYOL target, accumulation, collapse signal, the
Ignite workflow, and fine-tuning from its encoder."""

from __future__ import annotations

import logging

import pytest
import torch
from monai.data import DataLoader, Dataset

from qtunet_monai import QTUNet
from qtunet_monai.bundle import atomic_save, load_pretrained
from qtunet_monai.ssl import (
    CollapseMonitor,
    QTUNetSSL,
    SSLEvaluator,
    SSLTrainer,
    TwoViewsd,
    byol_momentum,
    collapse_signal,
    loss_jump,
    rotate_axial,
    split_validation,
)
from qtunet_monai.ssl.model import ENCODER_KEYS

SMALL_HEADS = {"hidden_dim": 64, "projection_dim": 32}


def test_views_rotation_label_and_unmasked_target():
    image = torch.arange(2 * 8 * 8 * 4, dtype=torch.float32).reshape(2, 8, 8, 4) + 1  # no zeros, asymmetric
    views = TwoViewsd("image", num_boxes=3, max_box_fraction=0.5)
    views.set_random_state(seed=1)
    seen = set()
    for _ in range(20):
        out = views({"image": image})
        for i in (1, 2):
            k = int(out[f"rotation{i}"])
            seen.add(k)
            # the target is the crop in the view's rotation, un-masked
            assert torch.equal(out[f"target{i}"], torch.rot90(image, k, dims=(1, 2)))
            masked = out[f"view{i}"] != out[f"target{i}"]
            assert masked.any() and (out[f"view{i}"][masked] == 0).all()
    assert seen == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="square axial plane"):
        views({"image": torch.ones(1, 8, 6, 4)})


def test_rotation_is_in_the_axial_plane():
    x = torch.zeros(1, 4, 4, 3)
    x[0, 0, 1, 2] = 1
    y = rotate_axial(x, 1)
    assert y[0, :, :, 2].sum() == 1 and y[0, :, :, :2].sum() == 0  # depth index untouched


@pytest.mark.parametrize("spatial_dims, roi, encoder", [
    (3, (32, 32, 32), {}),
    (2, (64, 64), {}),
    # the same bottleneck stride, 32; width 48 with patch 2 at 32^3 is the slow case
    pytest.param(3, (32, 32, 32), {"num_stages": 4, "patch_size": 2}, marks=pytest.mark.slow),
])
def test_heads_shapes_and_target_gets_no_gradient(spatial_dims, roi, encoder):
    model = QTUNetSSL(2, roi, spatial_dims=spatial_dims, **SMALL_HEADS, **encoder)
    x1, x2 = torch.randn(2, 2, *roi), torch.randn(2, 2, *roi)
    out = model(x1, x2)
    assert out["reconstruction"].shape == (4, 2, *roi)
    assert out["rotation_logits"].shape == (4, 4) and out["projection"].shape == (4, 32)
    from qtunet_monai.ssl import ssl_loss

    losses = ssl_loss(out, {"target1": x1, "target2": x2, "rotation1": torch.tensor([0, 1]),
                            "rotation2": torch.tensor([2, 3])})
    assert torch.allclose(losses["loss"], losses["loss_reconstruction"] + losses["loss_rotation"] + losses["loss_byol"])
    losses["loss"].backward()
    assert all(p.grad is None for p in model.target_parameters())
    assert all(not p.requires_grad for p in model.target_parameters())
    assert model.encoder.patch_embed.proj.weight.grad is not None
    assert model.predictor[0].weight.grad is not None


def test_encoder_keys_are_qtunet_keys():
    model = QTUNetSSL(1, (32, 32, 32), **SMALL_HEADS)
    keys = set(model.encoder_state_dict())
    net_keys = set(QTUNet(1, 3).state_dict())
    assert keys <= net_keys and all(k.startswith(ENCODER_KEYS) for k in keys)
    assert {k for k in net_keys if k.startswith(ENCODER_KEYS)} == keys


def test_byol_momentum_schedule():
    assert byol_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert byol_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert 0.99 < byol_momentum(0.99, 50, 100) < 1.0


def test_collapse_signal():
    torch.manual_seed(0)
    spread = collapse_signal(torch.randn(64, 32))
    collapsed = collapse_signal(torch.ones(64, 32) + 1e-4 * torch.randn(64, 32))
    assert spread > 0.8 and collapsed < 0.01


def _trainer(accumulation: int, epochs: int = 1, lr: float = 1e-3, cases: int = 6, batch: int = 1):
    torch.manual_seed(0)
    model = QTUNetSSL(1, (32, 32, 32), **SMALL_HEADS)
    images = [{"image": torch.randn(1, 32, 32, 32) + (i % 2)} for i in range(cases)]
    views = TwoViewsd("image")
    views.set_random_state(0)
    loader = DataLoader(Dataset(images, views), batch_size=batch, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trainer = SSLTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=model,
                         optimizer=optimizer, accumulation_steps=accumulation, base_momentum=0.9)
    return trainer, model


@pytest.mark.slow
def test_target_moves_once_per_optimiser_step_with_accumulation():
    from ignite.engine import Events

    trainer, model = _trainer(accumulation=3, cases=7)  # 7 micro-batches: steps after 3, 6 and 7 (epoch end)
    target = next(model.target_encoder.parameters())
    moved = []
    last = {"value": target.detach().clone()}

    def record(engine):
        moved.append(not torch.equal(target, last["value"]))
        last["value"] = target.detach().clone()

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    assert moved == [False, False, True, False, False, True, True]
    assert trainer.optimizer_steps == 3


@pytest.mark.slow
def test_a_few_iterations_reduce_the_loss():
    trainer, _ = _trainer(accumulation=1, epochs=15, lr=3e-4, cases=2, batch=2)  # the same two cases, 15 times
    from ignite.engine import Events

    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
    trainer.run()
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_collapse_monitor_warns_naming_the_epoch(caplog):
    from ignite.engine import Engine

    engine = Engine(lambda e, b: {"collapse": 0.01})
    CollapseMonitor(threshold=0.1).attach(engine)
    with caplog.at_level(logging.WARNING, logger="qtunet_monai.ssl.workflow"):
        engine.run([0, 1], max_epochs=2)
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any("epoch 1:" in w for w in warnings) and any("epoch 2:" in w for w in warnings)
    assert engine.state.metrics["collapse"] == pytest.approx(0.01)


def _run_curve(curve: list[dict], caplog, iterations: int = 2) -> tuple[list[str], list[dict]]:
    """A real Ignite engine whose iterations output the constructed per-epoch values, watched by the monitor;
    returns the warnings and the monitor's metrics per epoch."""
    from ignite.engine import Engine, Events

    engine = Engine(lambda e, b: {"collapse": 1.0, **curve[e.state.epoch - 1]})
    CollapseMonitor(threshold=0.1).attach(engine)
    metrics = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: metrics.append(dict(e.state.metrics)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qtunet_monai.ssl.workflow"):
        engine.run(list(range(iterations)), max_epochs=len(curve))
    return [r.message for r in caplog.records if r.levelno == logging.WARNING], metrics


def _curve(reconstruction, rotation, byol, spread=None):
    spread = spread or [1.0] * len(reconstruction)
    return [{"loss_reconstruction": a, "loss_rotation": b, "loss_byol": c, "collapse": d}
            for a, b, c, d in zip(reconstruction, rotation, byol, spread)]


def test_collapse_monitor_catches_the_thesis_loss_jump(caplog):
    """Figure 5.1a of the thesis: every loss spikes mid-run; BYOL returns to its low level, the
    reconstruction and rotation losses never recover. The monitor warns once BYOL is low again."""
    recon = [0.50, 0.30, 0.20, 0.18, 0.90, 0.85, 0.80]
    rot = [1.38, 0.90, 0.40, 0.30, 1.40, 1.39, 1.38]
    byol = [3.00, 1.00, 0.50, 0.40, 2.50, 0.45, 0.40]
    warnings, metrics = _run_curve(_curve(recon, rot, byol), caplog)
    assert [m["loss_jump"] for m in metrics] == [0, 0, 0, 0, 0, 1, 1]
    assert [w.split(":")[0] for w in warnings] == ["epoch 6", "epoch 7"]
    assert "reconstruction and rotation losses jumped while the BYOL loss stayed low" in warnings[0]
    assert all(m["collapse"] == 1.0 for m in metrics)  # the projections stayed spread: only the losses tell

    healthy = _curve([0.5, 0.3, 0.32, 0.2], [1.38, 0.9, 0.95, 0.5], [3.0, 1.0, 1.1, 0.5])
    warnings, metrics = _run_curve(healthy, caplog)
    assert not warnings and not any(m["loss_jump"] for m in metrics)
    # only one head's loss rising is not this collapse
    assert not loss_jump({"loss_reconstruction": [0.2, 0.9], "loss_rotation": [0.3, 0.31], "loss_byol": [0.4, 0.4]})
    # a loss near zero rising by noise is not a jump
    assert not loss_jump({"loss_reconstruction": [0.01, 0.03], "loss_rotation": [0.01, 0.04], "loss_byol": [0.4, 0.4]})


def test_collapse_monitor_catches_the_projection_spread_falling(caplog):
    spread = [1.0, 0.9, 0.05, 0.02]
    steady = [0.5, 0.4, 0.35, 0.3]
    warnings, metrics = _run_curve(_curve(steady, steady, steady, spread), caplog)
    assert [w.split(":")[0] for w in warnings] == ["epoch 3", "epoch 4"] and "spread" in warnings[0]
    assert [m["collapse"] for m in metrics] == pytest.approx(spread)
    assert not any(m["loss_jump"] for m in metrics)


def test_validation_cases_are_held_out():
    cases = [{"image": f"scan{i}.nii.gz"} for i in range(3597)]
    train, val = split_validation(cases)
    assert len(val) == 100 and len(train) == 3497  # the thesis' CT-SSL hold-out
    assert not {c["image"] for c in train} & {c["image"] for c in val}
    assert split_validation(cases) == (train, val)  # the same cases on every run and rank
    assert [len(x) for x in split_validation(cases[:30])] == [27, 3]
    assert [len(x) for x in split_validation(cases[:2])] == [1, 1]
    assert [len(x) for x in split_validation(cases[:1])] == [1, 0]


def test_validation_losses_on_held_out_cases_change_nothing():
    from ignite.engine import Events

    torch.manual_seed(0)
    _, model = _trainer(accumulation=1, cases=2)
    images = [{"image": torch.randn(1, 32, 32, 32)} for _ in range(3)]
    loader = DataLoader(Dataset(images, TwoViewsd("image")), batch_size=1)
    evaluator = SSLEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=model)
    seen = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluator.run()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step, no target move
    metrics = evaluator.state.metrics
    assert len(seen) == 3 and set(metrics) == {"val_loss", "val_loss_reconstruction", "val_loss_rotation",
                                               "val_loss_byol"}
    for key in metrics:
        assert metrics[key] == pytest.approx(sum(o[key.removeprefix("val_")] for o in seen) / 3)
    assert metrics["val_loss"] == pytest.approx(sum(metrics[k] for k in metrics if k != "val_loss"))
    assert evaluator.state.best_metric == pytest.approx(metrics["val_loss"])  # the lowest is the best
    empty = SSLEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(Dataset([], None)), network=model)
    empty.run()  # nothing held out: skipped, no error
    assert "val_loss" not in empty.state.metrics


def test_finetune_initialisation_equals_the_pretrained_encoder(tmp_path):
    ssl = QTUNetSSL(1, (32, 32, 32), **SMALL_HEADS)
    with torch.no_grad():
        for p in ssl.encoder.parameters():
            p.add_(torch.randn_like(p))
    atomic_save(ssl.encoder_state_dict(), tmp_path / "pretrained.pt")
    net = QTUNet(1, 4)
    report = load_pretrained(net, str(tmp_path / "pretrained.pt"))
    own = net.state_dict()
    for key, value in ssl.encoder_state_dict().items():
        assert torch.equal(own[key], value), key
    assert report["unexpected"] == [] and any(k.startswith("decoder_stages.") for k in report["missing"])
    with pytest.raises(ValueError, match="mismatched shapes"):
        load_pretrained(QTUNet(2, 4), str(tmp_path / "pretrained.pt"))
