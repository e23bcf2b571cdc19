# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""qtunet_monai.explain on small networks: recomputed attention, rollout, attention distance,
maps written in the input's space, ablation."""

from __future__ import annotations

import itertools
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from qtunet_monai import QTUNet
from qtunet_monai.bundle.presets import network_options
from qtunet_monai.explain import (
    AttentionRecorder,
    ablate,
    attention_rollout,
    attention_sites,
    explain_image,
    explicit_attention_output,
    mean_attention_distance,
    select_sites,
)
from qtunet_monai.networks.blocks.windows import relative_position_index

# tiny_eval_qtunet (tests/conftest.py), window 3, on a 24 x 20 x 16 input: stage-1 tokens 6 x 5 x 4, so windows
# are padded and shifted


def _force_attention(net: QTUNet, diagonal: float) -> None:
    """Queries and keys to zero and the relative-position bias to ``diagonal`` on the zero offset:
    every window's attention becomes the identity (large ``diagonal``) or uniform (0)."""
    with torch.no_grad():
        for site in attention_sites(net).values():
            module = site.module
            for layer in [getattr(module, n) for n in ("qkv", "q", "kv") if hasattr(module, n)]:
                layer.weight.zero_()
                layer.bias.zero_()
            module.relative_position_bias_table.zero_()
            centre = relative_position_index([net_window(net)] * net.spatial_dims, net_window(net))[0, 0]
            module.relative_position_bias_table[centre] = diagonal


def net_window(net: QTUNet) -> int:
    return net.encoder_stages[0].window_size


def test_recorded_weights_reproduce_the_fused_blocks_and_leave_the_output_alone(tiny_eval_qtunet):
    net = tiny_eval_qtunet()
    x = torch.randn(1, 1, 24, 20, 16)
    with torch.no_grad():
        plain = net(x)
        with AttentionRecorder(net, list(attention_sites(net)), keep_outputs=True) as recorder:
            recorded = net(x)
    assert torch.equal(plain, recorded)
    assert set(recorder.captures) == set(attention_sites(net))
    assert any(c.geometry.attn_mask is not None for c in recorder.captures.values())  # shifted blocks covered
    assert any(c.geometry.is_padded for c in recorder.captures.values())  # padded windows covered
    for name, capture in recorder.captures.items():
        explicit = explicit_attention_output(capture.site, capture.queries, capture.geometry, capture.keys)
        torch.testing.assert_close(explicit, capture.output, atol=1e-5, rtol=1e-4, msg=name)
    # hooks are gone afterwards
    assert all(not site.module._forward_pre_hooks for site in attention_sites(net).values())


def test_weights_sum_to_one_over_unmasked_keys(tiny_eval_qtunet):
    net = tiny_eval_qtunet()
    with torch.no_grad(), AttentionRecorder(net, ["encoder.stage1.block2", "decoder.stage1.block2.cross"]) as rec:
        net(torch.randn(2, 1, 24, 20, 16))
    for capture in rec.captures.values():
        weights = capture.probabilities()  # (B * nW, heads, N, N)
        mask = capture.geometry.attn_mask
        assert mask is not None
        unmasked = (mask == 0).repeat(capture.batch, 1, 1)[:, None].to(weights.dtype)
        torch.testing.assert_close(
            (weights * unmasked).sum(-1), torch.ones(weights.shape[:-1]), atol=1e-5, rtol=0
        )
        assert (weights * (1 - unmasked)).max() < 1e-6


def test_rollout_of_identity_attention_is_identity(tiny_eval_qtunet):
    net = tiny_eval_qtunet()
    _force_attention(net, diagonal=1e4)
    with torch.no_grad(), AttentionRecorder(net, ["encoder", "bottleneck"]) as rec:
        net(torch.randn(1, 1, 48, 48, 48))  # 12^3 stage-1 tokens: every level tiles its merges
    tokens = math.prod(rec["encoder.stage1.block1.attn"].geometry.spatial_shape)
    stage1 = attention_rollout(net, rec.captures, torch.eye(tokens), from_level=0)
    torch.testing.assert_close(stage1.reshape(tokens, tokens), torch.eye(tokens))
    # through the whole encoder only the merges remain: a bottleneck token spreads evenly over its 8^3 patches
    full = attention_rollout(net, rec.captures, torch.tensor([0]))[0]
    expected = torch.zeros(12, 12, 12)
    expected[:8, :8, :8] = 1 / 8**3
    torch.testing.assert_close(full, expected)


def test_mean_attention_distance_of_uniform_attention_is_the_window_mean_distance(tiny_eval_qtunet):
    net = tiny_eval_qtunet()
    _force_attention(net, diagonal=0.0)
    with torch.no_grad(), AttentionRecorder(net, "encoder.stage1.block1") as rec:
        net(torch.randn(1, 1, 24, 24, 24))  # 6^3 tokens: 2^3 unshifted windows of 3^3, no padding
    spacing = (4.0, 6.0, 8.0)  # token size in mm (voxels of 1, 1.5, 2 mm, patch 4)
    measured = mean_attention_distance(rec["encoder.stage1.block1.attn"], spacing)
    cells = np.array(list(itertools.product(range(3), repeat=3))) * np.array(spacing)
    analytic = np.mean([np.linalg.norm(a - b) for a in cells for b in cells])
    assert measured.shape == (net.encoder_stages[0].blocks[0].attn.num_heads,)
    np.testing.assert_allclose(measured.numpy(), analytic, rtol=1e-5)


def test_ablation_changes_the_output_and_restores_it(tiny_eval_qtunet):
    net = tiny_eval_qtunet()
    x = torch.randn(1, 1, 24, 20, 16)
    with torch.no_grad():
        before = net(x)
        with ablate(net, "decoder.stage2.cross") as names:
            ablated = net(x)
        after = net(x)
    assert names == ["decoder.stage2.block1.cross", "decoder.stage2.block2.cross"]
    assert (ablated - before).abs().max() > 1e-4
    assert torch.equal(before, after)
    with pytest.raises(ValueError, match="no attention block matches 'decoder.stage9'"):
        select_sites(net, "decoder.stage9")


def test_maps_are_written_in_the_input_space(tmp_path, tiny_eval_qtunet):
    # an oblique, anisotropic, non-RAS input, resampled by the preprocessing to 2 mm RAS
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    affine = np.array([[-1.5, 0.1, 0.0, 20.0], [0.0, 1.5, 0.0, -10.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1]])
    shape = (30, 26, 12)
    rng = np.random.default_rng(0)
    image = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), affine), str(image))
    preprocessing = Compose([
        LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=(2.0, 2.0, 2.0)),
    ])
    net = tiny_eval_qtunet()
    summary = explain_image(net, str(image), "15,13,6", str(tmp_path / "out"), preprocessing, figures=False)
    cross = nib.load(summary["maps"]["decoder.stage1.block1.cross"])
    heads = net.decoder_stages[-1].blocks[0].cross_attn.num_heads
    assert cross.shape == (*shape, heads)
    np.testing.assert_allclose(cross.affine, affine, atol=1e-5)
    weights = cross.get_fdata()
    assert weights.max() > 0 and weights.min() >= 0
    rollout = nib.load(summary["rollout"])
    assert rollout.shape == shape
    np.testing.assert_allclose(rollout.affine, affine, atol=1e-5)
    lines = (tmp_path / "out" / "attention_distance.csv").read_text().splitlines()
    heads_total = sum(site.module.num_heads for site in attention_sites(net).values())
    assert len(lines) == 1 + heads_total
    with pytest.raises(ValueError, match="VT-UNet"):
        explain_image(tiny_eval_qtunet(decoder="vt"), str(image), "15,13,6", str(tmp_path / "vt"), preprocessing)
    with pytest.raises(ValueError, match="outside the image"):
        explain_image(net, str(image), "15,13,600", str(tmp_path / "far"), preprocessing, figures=False)


def _demo_bundle_with_splits(root) -> dict[str, list[str]]:
    """The demo bundle's configs, random weights and three tiny cases: one validation, two testing;
    returns each split's image files."""
    import json
    import shutil
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "bundles" / "qtunet_demo_brain_tissue_segmentation"
    shutil.copytree(demo / "configs", root / "configs")
    (root / "data").mkdir()
    (root / "models").mkdir()
    torch.manual_seed(0)
    torch.save(QTUNet(1, 4, **network_options("accurate")).state_dict(), root / "models" / "model.pt")
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    cases = []
    for i in range(3):
        label = rng.integers(0, 4, (12, 12, 12)).astype(np.uint8)
        nib.save(nib.Nifti1Image((label * 50 + rng.normal(0, 5, label.shape)).astype(np.float32), affine),
                 root / "data" / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "data" / f"lab{i}.nii.gz")
        cases.append({"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"})
    splits = {"training": cases[:1], "validation": cases[:1], "testing": cases[1:]}
    (root / "data" / "datalist.json").write_text(json.dumps(splits))
    return {k: [str((root / "data" / c["image"]).resolve()) for c in v] for k, v in splits.items()}


@pytest.mark.slow
def test_ablation_scores_the_requested_split(tmp_path, capsys):
    import json

    from qtunet_monai.bundle import DataError
    from qtunet_monai.cli import main
    from qtunet_monai.explain import ablation_dice

    bundle = tmp_path / "bundle"
    images = _demo_bundle_with_splits(bundle)
    main(["explain", str(bundle), "--ablate", "decoder.stage2.cross", "--split", "testing",
          "--out_dir", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert [row["ablation"] for row in rows] == ["none", "decoder.stage2.cross"]
    assert all(row["split"] == "testing" and row["cases"] == images["testing"] for row in rows)
    assert "Dice on the 2 'testing' case(s)" in capsys.readouterr().out
    assert ablation_dice(str(bundle), [], split="validation")[0]["cases"] == images["validation"]
    with pytest.raises(DataError, match="has no 'no_such_split' cases"):
        ablation_dice(str(bundle), [], split="no_such_split")
    with pytest.raises(SystemExit) as stopped:
        main(["explain", str(bundle), "--ablate", "decoder.stage2.cross", "--split", "no_such_split"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"error: data list {bundle}/data/datalist.json has no 'no_such_split' cases "
                     "(found keys: ['training', 'validation', 'testing']).")
