# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The Auto3DSeg template ``algorithm_templates/qtunet``: AutoRunner end to end offline on CPU, filling
by key from the DataAnalyzer statistics, and bad data stopping generation."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from qtunet_monai.bundle import DataError
from qtunet_monai.data.msd import blob_label
from qtunet_monai.integrations.auto3dseg import TemplateError, fill_hyper_parameters
from qtunet_monai.profiling.memory import ACTIVATION_GB, MAX_BATCH, RESERVE_GB, choose_batch_and_roi, parameter_state_gb

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "algorithm_templates"


def _dataset(root: Path, num_classes: int = 3, shape=(64, 64, 64), n: int = 5) -> Path:
    """n volumes with nested-blob labels; the last is the test case; training folds 0 / 1."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = blob_label(shape, num_classes - 1, rng)
        image = (np.where(label > 0, 200.0, 100.0) + 40 * label + rng.normal(0, 10, shape)).astype(np.float32)
        affine = np.diag([1.2, 1.2, 1.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), str(root / f"img{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(root / f"lab{i}.nii.gz"))
    datalist = {"training": [{"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz", "fold": i % 2}
                             for i in range(n - 1)],
                "testing": [{"image": f"img{n - 1}.nii.gz"}]}
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root / "datalist.json"


def _stats(root: Path, datalist: Path) -> Path:
    from monai.apps.auto3dseg import DataAnalyzer

    out = root / "datastats.yaml"
    DataAnalyzer(str(datalist), str(root), output_path=str(out), device="cpu", worker=0).get_all_case_stats()
    return out


def _source(root: Path, datalist: Path, modality: str = "mri", **extra) -> Path:
    path = root / "input.yaml"
    path.write_text(yaml.safe_dump({"modality": modality, "datalist": str(datalist), "dataroot": str(root), **extra}))
    return path


@pytest.mark.slow
def test_autorunner_end_to_end_offline_on_cpu(tmp_path, monkeypatch):
    from monai.apps.auto3dseg import AutoRunner

    # 40^3 volumes: the CPU crop becomes 28^3 (no larger than the image) instead of 56^3, and validation and the
    # ensemble slide over a quarter of 64^3's voxels
    datalist = _dataset(tmp_path / "data", shape=(40, 40, 40))
    # Auto3DSeg launches training as the bare word `python`: make it this interpreter's
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    work = tmp_path / "work"
    runner = AutoRunner(work_dir=str(work), algos=["qtunet"], templates_path_or_url=str(TEMPLATES),
                        input={"modality": "MRI", "datalist": str(datalist), "dataroot": str(tmp_path / "data")})
    runner.set_num_fold(2)
    # budget and an architecture override: inference must rebuild QT-UNet-A from the saved configs
    runner.set_training_params({"num_epochs": 2, "num_epochs_per_validation": 1, "num_images_per_batch": 1,
                                "architecture": "QT-UNet-A"})
    runner.set_device_info(cuda_visible_devices=[])
    runner.run()

    for fold in (0, 1):
        algo = work / f"qtunet_{fold}"
        progress = yaml.safe_load((algo / "model" / "progress.yaml").read_text())
        assert 0.0 <= progress[-1]["best_avg_dice_score"] <= 1.0
        hyper = yaml.safe_load((algo / "configs" / "hyper_parameters.yaml").read_text())
        assert hyper["fold"] == fold and hyper["input_channels"] == 1 and hyper["output_classes"] == 3
        assert hyper["resample_resolution"] == pytest.approx([1.2, 1.2, 1.5]) and hyper["modality"] == "mri"
        assert hyper["architecture"] == "QT-UNet-A" and hyper["num_epochs"] == 2
    prediction = nib.load(work / "ensemble_output" / "img4_ensemble.nii.gz")
    source = nib.load(tmp_path / "data" / "img4.nii.gz")
    assert prediction.shape[:3] == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= {0, 1, 2}

    # new cases afterwards, on the CPU: a folder in, the same ensemble's predictions in the output folder
    from qtunet_monai.integrations.auto3dseg_predict import predict_ensemble

    new = tmp_path / "new"
    new.mkdir()
    (new / "case_a.nii.gz").write_bytes((tmp_path / "data" / "img4.nii.gz").read_bytes())
    written = predict_ensemble(work, new, tmp_path / "pred")
    assert written == [tmp_path / "pred" / "case_a_ensemble.nii.gz"]
    again = nib.load(written[0])
    np.testing.assert_allclose(again.affine, source.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(prediction.dataobj))
    (new / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="broken.nii.gz"):  # named before the ensemble starts
        predict_ensemble(work, new, tmp_path / "pred2")


def test_fill_by_key_ct_regions_and_gpu_memory(tmp_path, auto3dseg_template):
    datalist = _dataset(tmp_path / "data", shape=(40, 40, 32))
    stats = _stats(tmp_path / "data", datalist)
    algo = auto3dseg_template
    filled = fill_hyper_parameters(str(stats), str(_source(tmp_path / "data", datalist, "ct")),
                                   str(algo))["hyper_parameters.yaml"]
    summary = yaml.safe_load(stats.read_text())["stats_summary"]["image_foreground_stats"]["intensity"]
    assert filled["modality"] == "ct" and not filled["sigmoid"]
    bounds = [summary["percentile_00_5"], summary["percentile_99_5"]]
    assert filled["intensity_bounds"] == pytest.approx(bounds)
    assert filled["roi_size"] == [28, 28, 28]  # no larger than the data, a multiple of the 7-token window x 4
    regions = [{"name": "core", "index": [2]}, {"name": "whole", "index": [1, 2]}]
    on_gpu = fill_hyper_parameters(str(stats), str(_source(tmp_path / "data", datalist, "mri", class_names=regions)),
                                   str(algo), gpu_memory_gb=80)["hyper_parameters.yaml"]
    assert on_gpu["sigmoid"] and on_gpu["regions"] == [[2], [1, 2]] and on_gpu["output_classes"] == 2
    assert on_gpu["variant"] == "base" and on_gpu["amp"] and on_gpu["gpu_memory_gb"] == 80
    assert on_gpu["roi_size"] == [28, 28, 28] and on_gpu["num_images_per_batch"] == MAX_BATCH  # small data, big card
    written = yaml.safe_load((algo / "configs" / "hyper_parameters.yaml").read_text())
    assert written["num_images_per_batch"] == MAX_BATCH and written["gpu_memory_gb"] == 80
    cpu = fill_hyper_parameters(str(stats), str(_source(tmp_path / "data", datalist)), str(algo), gpu_memory_gb=0)
    assert cpu["hyper_parameters.yaml"]["variant"] == "tiny" and not cpu["hyper_parameters.yaml"]["amp"]


def test_batch_and_crop_scale_with_gpu_memory():
    """160 x 160 x 128 volumes (the issue's H100 run): the batch grows with the card, the crop is the
    thesis' 128^3 where a batch of 2 fits, and the chosen batch fits the memory model."""
    from qtunet_monai.integrations.auto3dseg import _size_for_memory

    shape = (160, 160, 128)
    chosen = {gb: _size_for_memory(gb, shape) for gb in (0, 6, 16, 24, 80)}
    assert chosen[0] == ("tiny", [56, 56, 56], 1)  # CPU
    assert [chosen[gb][0] for gb in (6, 16, 24, 80)] == ["tiny", "tiny", "tiny", "base"]
    assert chosen[6][1] == [96, 96, 96] and chosen[6][2] >= 2  # 128^3 does not take 2 on a 6 GB card
    assert all(chosen[gb][1] == [128, 128, 128] for gb in (16, 24, 80))
    batches = [chosen[gb][2] for gb in (16, 24, 80)]
    assert batches == sorted(batches) and batches[0] >= 2 and batches[-1] == MAX_BATCH
    for gb in (6, 16, 24):
        variant, roi, batch = chosen[gb]
        edge = roi[0]
        need = RESERVE_GB + parameter_state_gb(variant) + batch * ACTIVATION_GB[(variant, edge)]
        assert need <= gb < need + ACTIVATION_GB[(variant, edge)] or batch == MAX_BATCH
    # an image smaller than the crop on one axis: that axis shrinks to a multiple of the 28-voxel window step
    roi, batch = choose_batch_and_roi(16, "tiny", (200, 200, 60))
    assert roi == [128, 128, 56] and batch > chosen[16][2]


def test_pretrained_path_initialises_like_the_bundles_finetune(tmp_path, auto3dseg_template, caplog):
    """An SSL encoder file or another task's model.pt, loaded and reported by load_pretrained."""
    import torch

    from qtunet_monai import QTUNet
    from qtunet_monai.integrations.auto3dseg import _load_pretrained, _optimizer_and_schedule, load_config
    from qtunet_monai.ssl import QTUNetSSL

    algo = auto3dseg_template
    configs = [str(algo / "configs" / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")]
    encoder = QTUNetSSL(1, (32, 32, 32), hidden_dim=16, projection_dim=8).encoder_state_dict()
    torch.save(encoder, tmp_path / "pretrained.pt")
    parser = load_config(configs, input_channels=1, output_classes=3, pretrained_path=str(tmp_path / "pretrained.pt"))
    network = parser.get_parsed_content("network")
    with caplog.at_level("INFO"):
        report = _load_pretrained(parser, network)
    assert set(report["loaded"]) == set(encoder) and not report["unexpected"]
    assert any(k.startswith("decoder") for k in report["missing"]) and "initialised from" in caplog.text
    own = network.state_dict()
    assert all(torch.equal(own[k], v) for k, v in encoder.items())

    other_task = QTUNet(1, 5).state_dict()  # a bundle's model.pt trained on 5 classes
    torch.save(other_task, tmp_path / "model.pt")
    parser = load_config(configs, input_channels=1, output_classes=3, pretrained_path=str(tmp_path / "model.pt"))
    with pytest.raises(ValueError, match="classifier"):
        _load_pretrained(parser, parser.get_parsed_content("network"))
    parser = load_config(configs, input_channels=1, output_classes=3, pretrained_path=str(tmp_path / "model.pt"),
                         pretrained_exclude=["head.classifier."])
    report = _load_pretrained(parser, parser.get_parsed_content("network"))
    assert set(report["loaded"]) == {k for k in other_task if not k.startswith("head.classifier.")}
    parser = load_config(configs, pretrained_path=str(tmp_path / "absent.pt"))
    with pytest.raises(TemplateError, match="absent.pt is not a file"):
        _load_pretrained(parser, network)
    # the optimiser's groups: weight_decay on matrices, none on bias tables, norms and biases
    optimizer, _ = _optimizer_and_schedule(load_config(configs, weight_decay=1e-3), network, 10)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-3, 0.0]


@pytest.mark.parametrize("damage, error, message", [
    ("empty", TemplateError, "has no 'training' cases"),
    ("missing_label", DataError, "file not found"),
    ("one_class", TemplateError, "needs a background and at least one class"),
])
def test_bad_data_stops_generation_with_a_clear_message(tmp_path, damage, error, message):
    from monai.apps.auto3dseg import BundleGen

    data = tmp_path / "data"
    datalist = _dataset(data, num_classes=1 if damage == "one_class" else 3, shape=(24, 24, 16), n=3)
    stats = _stats(data, datalist)
    content = json.loads(datalist.read_text())
    if damage == "empty":
        content["training"] = []
    elif damage == "missing_label":
        (data / "lab1.nii.gz").unlink()
    datalist.write_text(json.dumps(content))
    generator = BundleGen(algo_path=str(tmp_path / "templates"), algos={"qtunet": {
        "_target_": "qtunet.scripts.algo.QtunetAlgo", "template_path": str(TEMPLATES)}},
        data_stats_filename=str(stats), data_src_cfg_name=str(_source(data, datalist)))
    with pytest.raises(error, match=message) as raised:
        generator.generate(str(tmp_path / "out"), num_fold=1)
    if damage == "missing_label":
        assert str(data / "lab1.nii.gz") in str(raised.value)


def _msd_style(data: Path, n: int = 4) -> Path:
    """The test data set with what an MSD dataset.json declares: one channel, classes 0..2."""
    datalist = _dataset(data, shape=(24, 24, 16), n=n)
    content = json.loads(datalist.read_text())
    content.update(modality={"0": "MRI"}, labels={"0": "background", "1": "outer", "2": "inner"})
    datalist.write_text(json.dumps(content))
    return datalist


def _damage(data: Path, damage: str) -> None:
    """Damage case 1 of :func:`_dataset`: its label's header or voxels, or its image."""
    image, label = nib.load(data / "img1.nii.gz"), nib.load(data / "lab1.nii.gz")
    voxels = np.asarray(label.dataobj)
    if damage == "flipped_label":  # same voxels, LPS header on the RAS image
        nib.save(nib.Nifti1Image(voxels, np.diag([-1.2, -1.2, 1.5, 1.0])), data / "lab1.nii.gz")
    elif damage == "label_spacing":
        nib.save(nib.Nifti1Image(voxels, np.eye(4)), data / "lab1.nii.gz")
    elif damage == "label_shape":
        nib.save(nib.Nifti1Image(voxels[:, :, :12], label.affine), data / "lab1.nii.gz")
    elif damage == "stray_label_value":
        voxels = voxels.copy()
        voxels[0, 0, 0] = 5
        nib.save(nib.Nifti1Image(voxels, label.affine), data / "lab1.nii.gz")
    elif damage == "two_channels":
        voxels = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.stack([voxels, voxels], -1), image.affine), data / "img1.nii.gz")
    elif damage == "missing_image":
        (data / "img1.nii.gz").unlink()


BAD_DATA = [
    ("flipped_label", "{label}: label does not match its image {image} (label vs image): orientation LPS vs RAS"),
    ("label_spacing", ("{label}: label does not match its image {image} (label vs image): "
                       "spacing (1.0, 1.0, 1.0) vs (1.2, 1.2, 1.5) mm")),
    ("label_shape", "{label}: label shape (24, 24, 12) does not match image shape (24, 24, 16) of {image}"),
    ("stray_label_value", "{label}: label values [5] are outside the task's classes [0, 1, 2]"),
    ("two_channels", "{image}: 2 image channel(s), but the network expects 1"),
    ("missing_image", "{image}: file not found"),
]


@pytest.mark.parametrize("damage, message", BAD_DATA, ids=[d for d, _ in BAD_DATA])
def test_bad_data_is_refused_before_the_analysis_naming_the_files(tmp_path, damage, message):
    from qtunet_monai.integrations.auto3dseg import check_data_source

    data = tmp_path / "data"
    datalist = _msd_style(data)
    source = {"modality": "mri", "datalist": str(datalist), "dataroot": str(data)}
    assert len(check_data_source(source)) == 3  # the good data set passes
    _damage(data, damage)
    with pytest.raises(DataError) as refused:
        check_data_source(source)
    assert str(refused.value) == message.format(image=data / "img1.nii.gz", label=data / "lab1.nii.gz")


def test_undeclared_channels_and_classes_come_from_the_data(tmp_path):
    """Without ``modality`` / ``labels`` in the data list the usual channel count is expected and label values
    are left to the analysis; ``class_names`` regions of the data source config declare the classes."""
    from qtunet_monai.integrations.auto3dseg import check_data_source

    data = tmp_path / "data"
    datalist = _dataset(data, shape=(24, 24, 16), n=4)
    _damage(data, "stray_label_value")
    source = {"modality": "mri", "datalist": str(datalist), "dataroot": str(data)}
    assert len(check_data_source(source)) == 3
    regions = [{"name": "core", "index": [2]}, {"name": "whole", "index": [1, 2]}]
    with pytest.raises(DataError, match=r"label values \[5\] are outside the task's classes \[0, 1, 2\]"):
        check_data_source({**source, "class_names": regions})
    _damage(data, "two_channels")
    with pytest.raises(DataError, match="img1.nii.gz: 2 image channel"):
        check_data_source(source)


def test_the_checked_autorunner_stops_before_monai_analyses_the_data(tmp_path):
    from qtunet_monai.integrations.auto3dseg import CheckedAutoRunner

    data = tmp_path / "data"
    datalist = _msd_style(data)
    _damage(data, "flipped_label")
    work = tmp_path / "work"
    runner = CheckedAutoRunner(work_dir=str(work), algos=["qtunet"], templates_path_or_url=str(TEMPLATES),
                               input={"modality": "MRI", "datalist": str(datalist), "dataroot": str(data)})
    with pytest.raises(DataError, match="orientation LPS vs RAS"):
        runner.run()
    assert not (work / "datastats.yaml").exists()


@pytest.mark.slow
def test_template_training_under_torchrun_with_gloo(tmp_path):
    """Auto3DSeg's multi-GPU mode launches scripts/train.py with torchrun; on CPU the ranks use gloo."""
    import subprocess

    from monai.apps.auto3dseg import BundleGen

    data = tmp_path / "data"
    datalist = _dataset(data, shape=(32, 32, 32))
    stats = _stats(data, datalist)
    BundleGen(algo_path=str(tmp_path / "templates"), algos={"qtunet": {
        "_target_": "qtunet.scripts.algo.QtunetAlgo", "template_path": str(TEMPLATES)}},
        data_stats_filename=str(stats), data_src_cfg_name=str(_source(data, datalist))).generate(
        str(tmp_path / "out"), num_fold=1)
    algo = tmp_path / "out" / "qtunet_0"
    configs = ",".join(str(algo / "configs" / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml"))
    import torch

    from qtunet_monai.ssl import QTUNetSSL

    encoder = tmp_path / "pretrained.pt"
    torch.save(QTUNetSSL(1, (32, 32, 32), hidden_dim=16, projection_dim=8).encoder_state_dict(), encoder)
    # --device=cpu: gloo on the CPU even where GPUs are (two processes on a one-GPU machine would fail)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2", str(algo / "scripts" / "train.py"), "run", f"--config_file={configs}",
                           "--num_epochs=1", "--num_epochs_per_validation=1", "--device=cpu",
                           f"--pretrained_path={encoder}"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"initialised from {encoder}") == 2  # every rank starts from the encoder
    progress = yaml.safe_load((algo / "model" / "progress.yaml").read_text())
    assert len(progress) == 1 and 0.0 <= progress[0]["best_avg_dice_score"] <= 1.0
    assert (algo / "model" / "model.pt").is_file()


def test_template_presets_and_network_options_reach_the_network(tmp_path, auto3dseg_template):
    """The bundles' --preset, --detail_widths and --skip are hyper-parameters of the template too."""
    from qtunet_monai.bundle import PRESETS
    from qtunet_monai.integrations.auto3dseg import load_config

    algo = auto3dseg_template
    configs = [str(algo / "configs" / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")]
    thesis = load_config(configs, input_channels=1, output_classes=3).get_parsed_content("network")
    assert thesis.detail_widths == () and thesis.skip_type == "concat"
    accurate = load_config(configs, input_channels=1, output_classes=3, preset="accurate").get_parsed_content("network")
    assert list(accurate.detail_widths) == PRESETS["accurate"]["detail_widths"]
    cct = load_config(configs, input_channels=1, output_classes=3, skip="cct", cct_preset="lite",
                      detail_widths=[8]).get_parsed_content("network")
    assert cct.skip_type == "cct" and cct.detail_widths == (8,) and cct.skip_fusion is not None


def test_template_preset_sets_the_training_recipe(auto3dseg_template):
    """``preset: accurate`` trains as the bundles' preset does (AdamW, decoupled weight decay, warm-up, twice the
    learning rate); ``thesis`` with Adam and cosine annealing; an explicit hyper-parameter wins."""
    from monai.optimizers import WarmupCosineSchedule

    from qtunet_monai.integrations.auto3dseg import _optimizer_and_schedule, load_config

    configs = [str(auto3dseg_template / "configs" / f)
               for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")]
    cases = {"thesis": ({}, "Adam", 2e-4, {0.0}, torch.optim.lr_scheduler.CosineAnnealingLR),
             "accurate": ({}, "AdamW", 4e-4, {0.05, 0.0}, WarmupCosineSchedule),
             "accurate, explicit": ({"weight_decay": 0.01, "warmup_epochs": 0}, "AdamW", 4e-4, {0.01, 0.0},
                                    torch.optim.lr_scheduler.CosineAnnealingLR)}
    for name, (override, optimizer_name, lr, decays, schedule) in cases.items():
        parser = load_config(configs, input_channels=1, output_classes=3, preset=name.split(",")[0], **override)
        optimizer, scheduler = _optimizer_and_schedule(parser, parser.get_parsed_content("network"), 10)
        assert type(optimizer).__name__ == optimizer_name, name
        assert {g["weight_decay"] for g in optimizer.param_groups} == decays, name
        assert isinstance(scheduler, schedule), name
        assert scheduler.base_lrs and all(b == pytest.approx(lr) for b in scheduler.base_lrs), name
