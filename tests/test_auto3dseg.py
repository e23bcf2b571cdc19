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
import yaml

from qtunet_monai.auto3dseg import TemplateError, fill_hyper_parameters
from qtunet_monai.bundle import DataError
from qtunet_monai.data.msd import blob_label

REPO = Path(__file__).resolve().parents[1]
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


def test_autorunner_end_to_end_offline_on_cpu(tmp_path, monkeypatch):
    from monai.apps.auto3dseg import AutoRunner

    datalist = _dataset(tmp_path / "data")
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


def _template_copy(tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "algo"
    shutil.copytree(TEMPLATES / "qtunet", out)
    return out


def test_fill_by_key_ct_regions_and_gpu_memory(tmp_path):
    datalist = _dataset(tmp_path / "data", shape=(40, 40, 32))
    stats = _stats(tmp_path / "data", datalist)
    algo = _template_copy(tmp_path)
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
    assert on_gpu["variant"] == "base" and on_gpu["num_images_per_batch"] == 2 and on_gpu["amp"]
    cpu = fill_hyper_parameters(str(stats), str(_source(tmp_path / "data", datalist)), str(algo), gpu_memory_gb=0)
    assert cpu["hyper_parameters.yaml"]["variant"] == "tiny" and not cpu["hyper_parameters.yaml"]["amp"]


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
    generator = BundleGen(algo_path=str(tmp_path / "templates"), algos={"qtunet": dict(
        _target_="qtunet.scripts.algo.QtunetAlgo", template_path=str(TEMPLATES))},
        data_stats_filename=str(stats), data_src_cfg_name=str(_source(data, datalist)))
    with pytest.raises(error, match=message) as raised:
        generator.generate(str(tmp_path / "out"), num_fold=1)
    if damage == "missing_label":
        assert str(data / "lab1.nii.gz") in str(raised.value)


def test_template_training_under_torchrun_with_gloo(tmp_path):
    """Auto3DSeg's multi-GPU mode launches scripts/train.py with torchrun; on CPU the ranks use gloo."""
    import subprocess

    from monai.apps.auto3dseg import BundleGen

    data = tmp_path / "data"
    datalist = _dataset(data, shape=(32, 32, 32))
    stats = _stats(data, datalist)
    BundleGen(algo_path=str(tmp_path / "templates"), algos={"qtunet": dict(
        _target_="qtunet.scripts.algo.QtunetAlgo", template_path=str(TEMPLATES))},
        data_stats_filename=str(stats), data_src_cfg_name=str(_source(data, datalist))).generate(
        str(tmp_path / "out"), num_fold=1)
    algo = tmp_path / "out" / "qtunet_0"
    configs = ",".join(str(algo / "configs" / f) for f in ("hyper_parameters.yaml", "network.yaml", "transforms.yaml"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2", str(algo / "scripts" / "train.py"), "run", f"--config_file={configs}",
                           "--num_epochs=1", "--num_epochs_per_validation=1"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    progress = yaml.safe_load((algo / "model" / "progress.yaml").read_text())
    assert len(progress) == 1 and 0.0 <= progress[0]["best_avg_dice_score"] <= 1.0
    assert (algo / "model" / "model.pt").is_file()
