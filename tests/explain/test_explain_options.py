# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""qtunet_monai.explain for the network options: a CCT's channel attention and attention mass, ablation
of the CCT and the CCA gate, and a conditional network's router selections and heavy share per class.
Tiny networks (width 12, window 3)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from qtunet_monai import QTUNet
from qtunet_monai.explain import (
    ChannelAttentionRecorder,
    RoutingRecorder,
    ablate,
    ablation_dice,
    attention_mass_table,
    explain_image,
    heavy_share_table,
    level_strides,
    skip_sites,
)
from qtunet_monai.networks.blocks.conditional import LightRouter


def _train_reconstruction(net: QTUNet) -> None:
    """Nonzero CCT reconstructions (as after training; they start at zero)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for projection in net.skip_fusion.reconstructions:
            projection.weight.normal_(0, 0.05)
            projection.bias.normal_(0, 0.05)


def _dice(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    classes = logits.shape[1]
    onehot = torch.nn.functional.one_hot
    metric(y_pred=onehot(logits.argmax(1), classes).movedim(-1, 1), y=onehot(label, classes).movedim(-1, 1))
    return metric.aggregate()


# ---------------------------------------------------------------------------------------------------------
# CCT: channel attention maps and mass


def test_channel_maps_are_head_and_case_means_whose_rows_sum_to_one(tiny_eval_qtunet):
    net = tiny_eval_qtunet(spatial_dims=2, skip="cct", cct_layers=2, cct_heads=2)
    _train_reconstruction(net)
    a, b = torch.randn(1, 1, 48, 40), torch.randn(1, 1, 48, 40)
    with torch.no_grad():
        plain = net(torch.cat([a, b]))
        recorded = {}
        for key, batch in (("a", a), ("b", b), ("ab", torch.cat([a, b]))):
            with ChannelAttentionRecorder(net) as recorder:
                out = net(batch)
            recorded[key] = recorder.maps()
    assert torch.equal(out, plain)  # recording leaves the output alone
    assert recorder.cases == 2 and not net.skip_fusion.layers[0].attn._forward_pre_hooks
    widths = net.skip_fusion.widths
    assert list(recorded["ab"]) == ["layer1", "layer2"]
    for layer, per_scale in recorded["ab"].items():
        assert [tuple(m.shape) for m in per_scale] == [(c, sum(widths)) for c in widths]
        for i, scale_map in enumerate(per_scale):
            assert (scale_map >= 0).all()
            torch.testing.assert_close(scale_map.sum(1), torch.ones(widths[i], dtype=scale_map.dtype))
            # averaged over cases: the batch of two is the mean of the two single cases
            torch.testing.assert_close(scale_map, (recorded["a"][layer][i] + recorded["b"][layer][i]) / 2)
    # the mean over heads: the module's own per-head maps, averaged
    inputs = {}
    attn = net.skip_fusion.layers[1].attn
    handle = attn.register_forward_pre_hook(lambda m, args: inputs.update(args=args))
    with torch.no_grad():
        net(a)
        handle.remove()
        per_head = attn.maps(*inputs["args"])
    for i, scale_map in enumerate(recorded["a"]["layer2"]):
        torch.testing.assert_close(scale_map.float(), per_head[i][0].mean(0))
    assert not ChannelAttentionRecorder(tiny_eval_qtunet(spatial_dims=2)).active
    with pytest.raises(ValueError, match="no channel attention recorded"):
        with ChannelAttentionRecorder(tiny_eval_qtunet(spatial_dims=2)) as empty:
            pass
        empty.maps()


def test_attention_mass_per_scale(tiny_eval_qtunet):
    net = tiny_eval_qtunet(skip="cct", cct_preset="lite", cct_heads=2)
    x = torch.randn(1, 1, 24, 20, 16)
    with torch.no_grad(), ChannelAttentionRecorder(net) as recorder:
        net(x)
    widths = recorder.widths
    rows = attention_mass_table(recorder.maps(), widths)
    stages = [f"stage{i + 1}" for i in range(len(widths))]
    assert [(r["layer"], r["query"]) for r in rows] == [("layer1", s) for s in stages] + [("layer1", "all"),
                                                                                           ("uniform", "all")]
    for row in rows:
        assert abs(sum(row[s] for s in stages) - 1) < 1e-6 and all(0 <= row[s] <= 1 for s in stages)
    # the mass all channels give a scale is the width-weighted mean of the per-scale rows
    for s in stages:
        weighted = sum(c * r[s] for c, r in zip(widths, rows[:len(widths)])) / sum(widths)
        assert abs(rows[len(widths)][s] - weighted) < 1e-6
    # queries of zero give constant scores: the instance norm zeroes them, the softmax is uniform over channels
    with torch.no_grad():
        for projection in net.skip_fusion.layers[0].attn.queries:
            projection.weight.zero_()
        with ChannelAttentionRecorder(net) as uniform:
            net(x)
    flat = attention_mass_table(uniform.maps(), widths)
    for s, c in zip(stages, widths):
        assert abs(flat[-2][s] - c / sum(widths)) < 1e-6 and flat[-1][s] == c / sum(widths)


# ---------------------------------------------------------------------------------------------------------
# CCT and gate ablation


def test_ablating_the_cct_and_the_gate_gives_the_plain_network_and_its_dice(tiny_eval_qtunet):
    cct = tiny_eval_qtunet(skip="cct", cct_preset="lite")
    _train_reconstruction(cct)
    plain = tiny_eval_qtunet()
    state = {k: v for k, v in cct.state_dict().items() if not k.startswith(("skip_fusion.", "skip_gates."))}
    plain.load_state_dict(state)
    gate_only = tiny_eval_qtunet(cca=True)  # plain skips with the gate: what ablating the CCT alone leaves
    gate_only.load_state_dict({k: v for k, v in cct.state_dict().items() if not k.startswith("skip_fusion.")})
    assert list(skip_sites(cct)) == ["skip.cct.stage1", "skip.cct.stage2", "skip.cct.stage3", "skip.gate.stage3",
                                     "skip.gate.stage2", "skip.gate.stage1"]
    x = torch.randn(1, 1, 24, 20, 28)
    label = torch.randint(0, 3, (1, 24, 20, 28))
    with torch.no_grad():
        trained, expected, gated = cct(x), plain(x), gate_only(x)
        with ablate(cct, ["skip.cct", "skip.gate"]) as names:
            ablated = cct(x)
        with ablate(cct, "skip.cct") as cct_names:
            cct_off = cct(x)
        with ablate(cct, ["skip.cct.stage1", "skip.cct.stage2", "skip.cct.stage3"]):
            by_stage = cct(x)
        with ablate(cct, "skip.cct.stage2"):
            one_stage = cct(x)
        assert torch.equal(cct(x), trained)  # hooks removed
    assert names == list(skip_sites(cct)) and cct_names == names[:3]
    assert torch.equal(ablated, expected)
    assert torch.equal(_dice(ablated, label), _dice(expected, label))
    assert torch.equal(cct_off, gated) and torch.equal(by_stage, gated)
    assert not torch.allclose(trained, expected) and not torch.allclose(one_stage, gated)
    assert not torch.allclose(one_stage, trained)
    with pytest.raises(ValueError, match="no attention block or skip module matches 'skip.cct'"), \
            ablate(plain, "skip.cct"):
        pass


def test_ablating_the_gate_is_a_saturated_gate(tiny_eval_qtunet):
    gated = tiny_eval_qtunet(spatial_dims=2, skip="cct", cct_preset="lite")
    _train_reconstruction(gated)
    x = torch.randn(1, 1, 44, 36)
    with torch.no_grad():
        with ablate(gated, "skip.gate.stage1") as names:
            shallow_off = gated(x)
        with ablate(gated, "gate") as all_names:
            ablated = gated(x)
        for gate in gated.skip_gates:  # saturated: zero weights, a large bias, sigmoid = 1 in float32
            gate.skip_fc.weight.zero_()
            gate.decoder_fc.weight.zero_()
            gate.skip_fc.bias.fill_(20.0)
            gate.decoder_fc.bias.fill_(20.0)
        saturated = gated(x)
    assert names == ["skip.gate.stage1"] and all_names == [f"skip.gate.stage{i}" for i in (3, 2, 1)]
    assert torch.equal(ablated, saturated)
    assert not torch.allclose(shallow_off, saturated)


def _bundle(root: Path, network_overrides: dict, state: dict) -> None:
    """The demo bundle's configs with ``network_overrides``, the weights ``state`` and two tiny labelled cases."""
    demo = Path(__file__).resolve().parents[2] / "bundles" / "qtunet_demo_brain_tissue_segmentation"
    shutil.copytree(demo / "configs", root / "configs")
    config = json.loads((root / "configs" / "train.json").read_text())
    config.update(network_overrides)
    (root / "configs" / "train.json").write_text(json.dumps(config))
    (root / "data").mkdir()
    (root / "models").mkdir()
    torch.save(state, root / "models" / "model.pt")
    rng = np.random.default_rng(0)
    cases = []
    for i in range(2):
        label = rng.integers(0, 4, (12, 12, 12)).astype(np.uint8)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image((label * 50 + rng.normal(0, 5, label.shape)).astype(np.float32), affine),
                 root / "data" / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "data" / f"lab{i}.nii.gz")
        cases.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    (root / "data" / "datalist.json").write_text(json.dumps({"training": cases, "validation": cases,
                                                             "testing": cases}))


@pytest.mark.slow
def test_bundle_ablation_of_cct_and_gate_scores_the_plain_networks_dice(tmp_path):
    from monai.bundle import ConfigParser

    from qtunet_monai.cli import main

    demo = Path(__file__).resolve().parents[2] / "bundles" / "qtunet_demo_brain_tissue_segmentation"
    parser = ConfigParser()
    parser.read_config(str(demo / "configs" / "train.json"))
    parser.update({"skip": "cct", "cct_preset": "lite"})
    torch.manual_seed(0)
    cct = parser.get_parsed_content("network_def")
    _train_reconstruction(cct)
    plain_state = {k: v for k, v in cct.state_dict().items() if not k.startswith(("skip_fusion.", "skip_gates."))}
    _bundle(tmp_path / "cct", {"skip": "cct", "cct_preset": "lite"}, cct.state_dict())
    _bundle(tmp_path / "plain", {}, plain_state)
    rows = ablation_dice(str(tmp_path / "cct"), ["skip.cct+skip.gate"], split="testing")
    plain = ablation_dice(str(tmp_path / "plain"), [], split="testing")[0]
    assert rows[1]["blocks"] == list(skip_sites(cct))
    dice = [k for k in plain if k.startswith("dice ")]
    assert rows[1]["mean_dice"] == plain["mean_dice"] and all(rows[1][k] == plain[k] for k in dice)
    main(["explain", str(tmp_path / "cct"), "--ablate", "skip.gate", "--out_dir", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert [r["ablation"] for r in written] == ["none", "skip.gate"] and written[0]["mean_dice"] == rows[0]["mean_dice"]


# ---------------------------------------------------------------------------------------------------------
# routers: selections and heavy share per class


def test_heavy_share_lies_in_0_1_and_averages_to_the_capacity(tiny_eval_qtunet):
    """2D, 96 x 96 with patch 4 and window 3: every level's grid (24, 12, 6, 3) is a multiple of the window,
    so no window is padded, and capacity 1/3 routes exactly 3 of each window's 9 tokens."""
    net = tiny_eval_qtunet(spatial_dims=2, router="light", capacity=1 / 3)
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        plain = net(x)
        with RoutingRecorder(net) as recorder:
            logits = net(x)
    assert torch.equal(logits, plain)
    assert all("select" not in m.__dict__ for m in net.modules() if isinstance(m, LightRouter))  # unwrapped
    names = list(recorder.captures)
    assert "encoder.stage1.block1.attn.q" in names and "bottleneck.block1.mlp" in names
    assert "decoder.stage1.block2.attn.kv" in names and not any(".cross." in n for n in names)  # dense cross
    labels = torch.zeros(2, 96, 96, dtype=torch.long)
    labels[:, 30:70, 20:60] = 1
    labels[1, 60:90, 50:96] = 2
    rows = heavy_share_table(recorder.captures, labels, level_strides(net))
    counts = torch.bincount(labels.flatten()).double()
    for row in rows:
        shares = torch.tensor([row[f"share class {c}"] for c in range(3)], dtype=torch.float64)
        assert ((shares >= 0) & (shares <= 1)).all(), row
        assert abs(float((shares * counts).sum() / counts.sum()) - row["all"]) < 1e-5
        if row["router"].endswith(".attn.q"):
            assert row["group"] == "window" and abs(row["all"] - 1 / 3) < 1e-6, row
    for capture in recorder.captures.values():  # the selection is each group's top-k of the scores
        if capture.group == "volume":
            for scores, chosen in zip(capture.scores.flatten(1), capture.selected.flatten(1)):
                assert int(chosen.sum()) == capture.k and scores[chosen].min() >= scores[~chosen].max()


@pytest.mark.slow
def test_explain_image_writes_channel_maps_routing_and_heavy_share(tmp_path, tiny_eval_qtunet):
    shape = (24, 20, 16)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    rng = np.random.default_rng(0)
    image, label = tmp_path / "case.nii.gz", tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), affine), str(image))
    truth = np.zeros(shape, dtype=np.uint8)
    truth[6:18, 4:14, 3:12] = 1
    truth[10:14, 8:12, 5:9] = 2
    nib.save(nib.Nifti1Image(truth, affine), str(label))
    net = tiny_eval_qtunet(skip="cct", cct_preset="lite", router="light", capacity=0.5)
    summary = explain_image(net, str(image), "12,10,8", str(tmp_path / "out"), label_file=str(label),
                            class_names=["background", "outer", "inner"])
    out = tmp_path / "out"
    assert summary["rollout"] is None  # routed encoder blocks: no rollout
    assert summary["maps"] and all(".cross" in name for name in summary["maps"])  # the dense cross-attention
    maps = np.load(summary["channel_attention"])
    assert [k for k in maps.files if k != "widths"] == ["layer1.stage1", "layer1.stage2", "layer1.stage3"]
    for key in ("layer1.stage1", "layer1.stage3"):
        np.testing.assert_allclose(maps[key].sum(1), 1.0, atol=1e-5)
    for name in ("channel_attention.png", "channel_attention_mass.png", "heavy_share.png", "channel_attention_mass.csv"):
        assert (out / name).stat().st_size > 0
    with open(summary["heavy_share"]) as f:
        rows = list(csv.DictReader(f))
    assert rows and set(rows[0]) >= {"router", "all", "share background", "share outer", "share inner", "labels"}
    assert all(0 <= float(r[f"share {c}"]) <= 1 for r in rows for c in ("background", "outer", "inner"))
    assert rows[0]["labels"] == str(label)
    routed = nib.load(summary["routing"]["encoder.stage1.block1.attn.q"])
    assert routed.shape == (*shape, 2)
    np.testing.assert_allclose(routed.affine, affine, atol=1e-5)
    assert set(np.unique(routed.get_fdata()[..., 1])) == {0.0, 1.0}
    assert (out / "routing" / "encoder.stage1.block1.png").stat().st_size > 0
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(truth[:-1], affine), str(bad))
    with pytest.raises(ValueError, match="does not share the grid"):
        explain_image(net, str(image), "12,10,8", str(tmp_path / "bad"), label_file=str(bad), figures=False)
