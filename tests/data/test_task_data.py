# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Data preparation of BraTS 2021, BTCV and CityScapes from their official layouts, and the
transforms and loss the task bundles add to MONAI's."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import MapLabelValued

from qtunet_monai.bundle import (
    DataError,
    LabelsToRegionsd,
    MaskVoidd,
    RegionsToLabelsd,
    VoidMaskedDiceLoss,
    check_cases,
)
from qtunet_monai.data.brats import BRATS_REGIONS, brats_datalist, split_sizes, write_fake_brats
from qtunet_monai.data.btcv import btcv_datalist, write_fake_btcv
from qtunet_monai.data.cityscapes import (
    CATEGORY_MAP,
    CATEGORY_NAMES,
    CLASS_MAP,
    CLASS_NAMES,
    cityscapes_datalist,
    write_fake_cityscapes,
)


def test_brats_split_is_the_thesis_split_for_the_full_data_set():
    assert split_sizes(1251) == (834, 208, 209)
    assert sum(split_sizes(10)) == 10 and min(split_sizes(10)) >= 1
    with pytest.raises(ValueError, match="at least 3"):
        split_sizes(2)


def test_brats_fake_cases_and_data_list(tmp_path):
    write_fake_brats(tmp_path, num_cases=6, shape=(24, 24, 20))
    out = brats_datalist(tmp_path, tmp_path / "datalist.json")
    datalist = json.loads(out.read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [4, 1, 1]
    case = datalist["training"][0]
    assert [f.rsplit("_", 1)[1] for f in case["image"]] == ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    label = np.asarray(nib.load(case["label"]).dataobj)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 4}
    all_cases = [c["label"] for k in ("training", "validation", "testing") for c in datalist[k]]
    assert len(set(all_cases)) == 6  # a partition
    check_cases(datalist["training"], in_channels=4, label_values=(0, 1, 2, 4))
    with pytest.raises(FileNotFoundError, match="BraTS2021_NNNNN"):
        brats_datalist(tmp_path / "nothing", tmp_path / "x.json")


def test_btcv_raw_data_pairs_and_split(tmp_path):
    write_fake_btcv(tmp_path, num_training=8, num_test=2, shape=(16, 16, 8))
    datalist = json.loads(btcv_datalist(tmp_path, tmp_path / "d.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing", "inference")] == [3, 5, 5, 2]
    assert datalist["validation"][-1]["image"].endswith("img0008.nii.gz")
    assert datalist["validation"][-1]["label"].endswith("label0008.nii.gz")
    labels = np.concatenate([np.asarray(nib.load(c["label"]).dataobj).ravel() for c in datalist["training"]])
    assert set(np.unique(labels).tolist()) == set(range(14))  # all 13 organs and background


def test_cityscapes_table_b1_mapping():
    assert len(CLASS_MAP) == len(CATEGORY_MAP) == 34 and len(CLASS_NAMES) == 20 and len(CATEGORY_NAMES) == 8
    named = {i: CLASS_NAMES[c] for i, c in enumerate(CLASS_MAP) if c}
    assert named[7] == "road" and named[26] == "car" and named[33] == "bicycle" and len(named) == 19
    assert CATEGORY_NAMES[CATEGORY_MAP[26]] == "vehicle" and CATEGORY_NAMES[CATEGORY_MAP[24]] == "human"
    assert all(CATEGORY_MAP[i] == 0 for i in range(7))  # unlabeled ... ground are void


def test_cityscapes_layout_and_data_list(tmp_path):
    from PIL import Image

    write_fake_cityscapes(tmp_path, num_train=2, num_val=1, num_test=1, size=(64, 32))
    datalist = json.loads(cityscapes_datalist(tmp_path, tmp_path / "d.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [2, 1, 1]
    case = datalist["training"][0]
    assert "/leftImg8bit/train/aachen/" in case["image"] and case["label"].endswith("_gtFine_labelIds.png")
    image, ids = np.asarray(Image.open(case["image"])), np.asarray(Image.open(case["label"]))
    assert image.shape == (32, 64, 3) and ids.shape == (32, 64)
    mapped = MapLabelValued("label", list(range(34)), list(CLASS_MAP))({"label": ids[None]})["label"]
    assert {CLASS_NAMES[int(v)] for v in np.unique(mapped)} >= {"road", "car", "sky", "void"}
    check_cases(datalist["training"], in_channels=3, label_values=range(34), spatial_dims=2)
    with pytest.raises(DataError, match="3 image channel"):
        check_cases(datalist["training"], in_channels=1, label_values=range(34), spatial_dims=2)


def test_regions_round_trip_for_brats_and_msd_labels():
    for regions, values in ((BRATS_REGIONS, [0, 1, 2, 4]), (((2, 3), (1, 2, 3), (3,)), [0, 1, 2, 3])):
        label = MetaTensor(torch.tensor(values, dtype=torch.float32).reshape(1, 1, 2, 2), affine=torch.eye(4) * 2)
        onehot = LabelsToRegionsd("label", regions)({"label": label})["label"]
        assert onehot.shape == (3, 1, 2, 2) and torch.equal(onehot.affine, label.affine)
        back = RegionsToLabelsd("pred", regions)({"pred": onehot})["pred"]
        assert torch.equal(back, label.as_tensor())
    tc, wt, et = LabelsToRegionsd("l", BRATS_REGIONS)({"l": torch.tensor([[0, 1, 2, 4]])})["l"]
    assert tc.tolist() == [0, 1, 0, 1] and wt.tolist() == [0, 1, 1, 1] and et.tolist() == [0, 0, 0, 1]


def test_void_is_ignored_by_loss_and_metric_masking():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 8, 8)
    target = torch.randint(1, 4, (1, 1, 8, 8))
    loss = VoidMaskedDiceLoss()
    base = loss(logits, target)
    # changing the prediction where the label is void changes nothing
    voided = target.clone()
    voided[..., :4, :] = 0
    other = logits.clone()
    other[..., :4, :] = torch.randn(1, 4, 4, 8) * 10
    assert torch.allclose(loss(logits, voided), loss(other, voided))
    assert not torch.allclose(base, loss(logits, voided))
    pred = torch.ones(4, 2, 2)
    label = torch.zeros(4, 2, 2)
    label[0, 0, 0] = 1  # void pixel
    label[2, 1, 1] = 1
    out = MaskVoidd("pred")({"pred": pred, "label": label})["pred"]
    assert out[:, 0, 0].sum() == 0 and out[:, 1, 1].sum() == 4
