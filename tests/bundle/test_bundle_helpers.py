# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Checkpoint helpers of the bundles: atomic writes and fine-tune initialisation."""

from __future__ import annotations

import os

import pytest
import torch

from qtunet_monai import QTUNet
from qtunet_monai.bundle import atomic_save, load_pretrained


def test_atomic_save_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "models" / "model.pt"
    atomic_save({"a": torch.ones(3)}, target)
    atomic_save({"a": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.zeros(3))
    assert [p.name for p in target.parent.iterdir()] == ["model.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "model.pt"
    atomic_save({"a": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": Unpicklable()}, target)
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_finetune_initialisation_copies_the_encoder_and_reports_keys(tmp_path):
    torch.manual_seed(1)
    pretrained = QTUNet(1, 4, feature_size=12)
    atomic_save({"model": pretrained.state_dict()}, tmp_path / "pre.pt")
    torch.manual_seed(2)
    target = QTUNet(1, 7, feature_size=12)  # another task: a different classifier
    report = load_pretrained(target, str(tmp_path / "pre.pt"), prefix="encoder_stages.")
    for key, value in target.state_dict().items():
        if key.startswith("encoder_stages."):
            assert torch.equal(value, pretrained.state_dict()[key]), key
    assert report["loaded"] and all(k.startswith("encoder_stages.") for k in report["loaded"])
    assert not report["missing"]


def test_finetune_refuses_mismatched_shapes_with_their_names(tmp_path):
    atomic_save(QTUNet(1, 4, feature_size=12).state_dict(), tmp_path / "pre.pt")
    with pytest.raises(ValueError, match=r"head.classifier.weight: checkpoint \(4, 12\) vs network \(7, 12\)"):
        load_pretrained(QTUNet(1, 7, feature_size=12), str(tmp_path / "pre.pt"))
    report = load_pretrained(QTUNet(1, 7, feature_size=12), str(tmp_path / "pre.pt"), strict_shapes=False)
    assert report["missing"] == ["head.classifier.weight"]


def test_finetune_names_an_unreadable_checkpoint(tmp_path):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read the checkpoint .*broken.pt"):
        load_pretrained(QTUNet(1, 2, feature_size=12), str(tmp_path / "broken.pt"))


def test_read_checkpoint_unwraps_and_names_the_file_it_refuses(tmp_path):
    from qtunet_monai.bundle.checkpoints import read_checkpoint
    from qtunet_monai.bundle.errors import CheckpointError

    weights = {"a": torch.ones(2)}
    torch.save({"state_dict": {"module.a": torch.ones(2)}}, tmp_path / "wrapped.pt")
    assert torch.equal(read_checkpoint(tmp_path / "wrapped.pt")["a"], weights["a"])
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt holds a list, not a state dict"):
        read_checkpoint(tmp_path / "list.pt")
    (tmp_path / "truncated.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=r"cannot read the checkpoint .*truncated\.pt"):
        read_checkpoint(tmp_path / "truncated.pt")


def test_resolve_inside_keeps_names_inside_their_folder(tmp_path):
    from qtunet_monai.bundle.errors import SettingError
    from qtunet_monai.bundle.files import resolve_inside

    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (tmp_path / "secret.pt").write_bytes(b"x")
    (root / "models" / "link.pt").symlink_to(tmp_path / "secret.pt")
    assert resolve_inside(root, "models/model.pt") == (root / "models" / "model.pt").resolve()
    for escape in ("../secret.pt", str(tmp_path / "secret.pt"), "models/../../secret.pt", "models/link.pt"):
        with pytest.raises(SettingError, match="points outside"):
            resolve_inside(root, escape)


def test_find_cause_walks_causes_and_contexts_once():
    from qtunet_monai.bundle.errors import DataError, find_cause

    try:
        try:
            raise DataError("case_1.nii.gz: bad")
        except DataError as inner:
            raise RuntimeError("applying transform") from inner
    except RuntimeError as wrapped:
        outer = wrapped
    assert str(find_cause(outer, DataError)) == "case_1.nii.gz: bad"
    assert find_cause(outer, KeyError) is None
    looped = ValueError("a")
    looped.__context__ = looped  # a cycle ends the walk instead of hanging it
    assert find_cause(looped, KeyError) is None
