# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""``python -m qtunet_monai plan`` (a data set folder in, a configured bundle out) and folder prediction
(``--input_dir`` / ``--output_dir``), on small data sets the tests write."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qtunet_monai.bundle import DataError, folder_datalist
from qtunet_monai.bundle.errors import reported_cause
from qtunet_monai.bundle.plan import plan, read_dataset
from qtunet_monai.cli import main
from qtunet_monai.data.msd import blob_label, write_fake_msd
from qtunet_monai.profiling.memory import ROI_STEP

REPO = Path(__file__).resolve().parents[2]


def _nnunet_v2(root: Path, n: int = 3, shape=(36, 32, 20), spacing=(1.2, 1.2, 2.0)) -> Path:
    """An nnU-Net v2 data set: two MRI channels per case (``_0000``, ``_0001``), labels 0..2, one test case."""
    rng = np.random.default_rng(1)
    folder = root / "Dataset501_Two"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    affine = np.diag([*spacing, 1.0])
    for i in range(n + 1):
        label = blob_label(shape, 2, rng)
        sub = "imagesTr" if i < n else "imagesTs"
        for c in range(2):
            image = np.where(label > 0, 300.0 + 50 * c, 100.0) + 60 * label + rng.normal(0, 5, shape)
            nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(folder / sub / f"case{i}_{c:04d}.nii.gz"))
        if i < n:
            nib.save(nib.Nifti1Image(label, affine), str(folder / "labelsTr" / f"case{i}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "core": 1, "rim": 2},
        "numTraining": n, "file_ending": ".nii.gz"}))
    return folder


def _default(value):
    """A config value as a bundle without a trained model sees it (``$@trained.get('key', default)``: the default;
    qtunet_monai/bundle/settings.py)."""
    found = re.fullmatch(r"\$@trained\.get\('(\w+)', (.*)\)", value) if isinstance(value, str) else None
    return ast.literal_eval(found[2]) if found else value


def test_read_dataset_reads_msd_and_nnunet_v2(tmp_path):
    msd = read_dataset(write_fake_msd(tmp_path, "prostate", num_training=3, num_test=1, shape=(16, 16, 8)))
    assert msd.layout == "MSD" and msd.channels == ("T2", "ADC") and msd.classes == ("background", "PZ", "TZ")
    assert len(msd.training) == 3 and len(msd.test) == 1
    assert all(Path(c["image"]).is_absolute() and Path(c["label"]).is_file() for c in msd.training)

    v2 = read_dataset(_nnunet_v2(tmp_path, shape=(8, 8, 4)))
    assert v2.layout == "nnU-Net v2" and v2.channels == ("T1", "T2") and v2.classes == ("background", "core", "rim")
    first = v2.training[0]
    assert [Path(f).name for f in first["image"]] == ["case0_0000.nii.gz", "case0_0001.nii.gz"]
    assert Path(first["label"]).name == "case0.nii.gz" and len(v2.test) == 1


def test_folder_datalist_lists_every_volume_and_groups_channel_files(tmp_path):
    for name in ("b.nii.gz", "a.nii", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.nii.gz").write_bytes(b"")
    assert [Path(c["image"]).name for c in folder_datalist(str(tmp_path))] == ["a.nii", "b.nii.gz"]

    v2 = _nnunet_v2(tmp_path / "v2", shape=(8, 8, 4))
    grouped = folder_datalist(str(v2 / "imagesTr"), in_channels=2)
    assert [[Path(f).name for f in c["image"]] for c in grouped] == [
        [f"case{i}_0000.nii.gz", f"case{i}_0001.nii.gz"] for i in range(3)]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(DataError, match="holds no NIfTI volumes"):
        folder_datalist(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="holds no images"):  # a 2D bundle wants PNG and the like
        folder_datalist(str(tmp_path), spatial_dims=2)
    with pytest.raises(DataError, match="does not exist"):
        folder_datalist(str(tmp_path / "missing"))


def test_plan_refuses_a_label_off_its_image_naming_both_files(tmp_path, capsys):
    folder = write_fake_msd(tmp_path, "spleen", num_training=3, num_test=0, shape=(16, 16, 8))
    label = folder / "labelsTr" / "spleen_002.nii.gz"
    image = nib.load(label)
    flipped = image.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])  # same voxels, LAS instead of RAS
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), flipped), str(label))
    with pytest.raises(DataError) as error:
        plan(folder, tmp_path / "bundle")
    message = str(error.value)
    assert str(label) in message and str(folder / "imagesTr" / "spleen_002.nii.gz") in message
    assert "orientation" in message and not (tmp_path / "bundle" / "configs").exists()

    with pytest.raises(SystemExit) as exit_status:  # the command line: one line, exit status 2
        main(["plan", "--dataset", str(folder), "--output", str(tmp_path / "bundle")])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(label) in err


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny CT data set in the MSD layout and the bundle plan wrote for it (no GPU assumed)."""
    root = tmp_path_factory.mktemp("plan")
    folder = write_fake_msd(root, "spleen", num_training=4, num_test=2, shape=(40, 36, 24))
    main(["plan", "--dataset", str(folder), "--output", str(root / "my_task"), "--gpu_memory_gb", "0",
          "--max_epochs", "1"])
    return folder, root / "my_task"


def test_plan_writes_a_bundle_from_the_fingerprint(planned):
    bundle = planned[1]
    record = json.loads((bundle / "plan.json").read_text())
    fingerprint, settings = record["fingerprint"], record["settings"]
    # the fake spleen volumes: 0.8 x 0.8 x 5.0 mm, CT
    assert fingerprint["median_spacing_mm"] == pytest.approx([0.8, 0.8, 5.0], abs=1e-4)
    assert settings["pixdim"] == pytest.approx([0.8, 0.8, 5.0]) and settings["modality"] == "CT"
    # CPU: 56 at most, capped by the median shape (36, 24 voxels) and rounded down to the window tile
    assert settings["roi_size"] == [28, 28, 28] and all(r % ROI_STEP == 0 for r in settings["roi_size"])
    channel = fingerprint["channels"][0]
    assert settings["intensity"] == {"kind": "CTZScore", "a_min": round(channel["percentile_00_5"], 2),
                                     "a_max": round(channel["percentile_99_5"], 2), "mean": round(channel["mean"], 3),
                                     "std": round(channel["std"], 3)}
    train = json.loads((bundle / "configs" / "train.json").read_text())
    window = next(t for t in train["train"]["deterministic_transforms"] if t["_target_"] == "ScaleIntensityRanged")
    intensity = settings["intensity"]
    assert window["b_min"] == pytest.approx((intensity["a_min"] - intensity["mean"]) / intensity["std"])
    assert train["fold"] == 0 and train["num_folds"] == 4 and _default(train["max_epochs"]) == 1
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "spleen"}
    datalist = json.loads((bundle / "data" / "datalist.json").read_text())
    assert sorted(c["fold"] for c in datalist["training"]) == [0, 1, 2, 3] and len(datalist["testing"]) == 2
    readme = (bundle / "docs" / "README.md").read_text()
    assert "plan.json" in readme and "Adam lr 0.0002 (preset `thesis`)" in readme


def test_planned_docs_name_the_optimiser_of_the_preset():
    """A recipe taken from the demo (``plan --from``) trains with its preset's optimiser and scaled rate."""
    from qtunet_monai.bundle.plan import _optimiser
    from qtunet_monai.tasks import TASKS

    demo = next(t for t in TASKS.values() if t.data == "demo").recipe
    assert demo.preset == "accurate" and demo.learning_rate == 1e-3
    assert _optimiser(demo) == "AdamW lr 0.002, 3 warm-up epochs, weight decay 0.05 (preset `accurate`)"


def test_planned_metadata_follows_the_monai_schema(planned, tmp_path):
    from monai.bundle import verify_metadata

    meta_file = planned[1] / "configs" / "metadata.json"
    name = json.loads(meta_file.read_text())["schema"].rsplit("/", 1)[-1]
    candidates = [os.environ.get("QTUNET_METADATA_SCHEMA"), REPO.parent / "shared" / "monai" / name]
    local = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if local is None:
        pytest.skip(f"MONAI's metadata schema {name} is not at hand (see tests/bundle/test_metadata.py)")
    shutil.copy(local, tmp_path / name)
    verify_metadata(meta_file=str(meta_file), filepath=str(tmp_path / name))


@pytest.mark.slow
def test_planned_bundle_trains_and_predicts_a_folder_in_the_inputs_geometry(planned, tmp_path, monkeypatch):
    from monai.bundle import run

    folder, bundle = planned
    monkeypatch.chdir(bundle)
    run(config_file="configs/train.json", val_interval=1)  # plan set one epoch
    assert torch.load("models/fold0/model.pt", weights_only=True)["head.classifier.weight"].shape[0] == 2

    new = tmp_path / "new"
    new.mkdir()
    for source in sorted((folder / "imagesTs").glob("*.nii.gz")):
        shutil.copy(source, new / source.name)
    run(config_file="configs/inference.json", input_dir=str(new), output_dir=str(tmp_path / "out"))
    for source in sorted(new.glob("*.nii.gz")):
        prediction = nib.load(tmp_path / "out" / source.name.replace(".nii.gz", "_seg.nii.gz"))
        image = nib.load(source)
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= {0, 1}

    # a bad case in the folder is named, and nothing is predicted
    (new / "broken.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(Exception) as error:
        run(config_file="configs/inference.json", input_dir=str(new), output_dir=str(tmp_path / "out2"))
    assert str(new / "broken.nii.gz") in str(reported_cause(error.value) or error.value)
    assert not list((tmp_path / "out2").glob("*_seg.nii.gz"))


def test_plan_of_an_nnunet_v2_mri_data_set_normalises_each_channel(tmp_path):
    bundle = plan(_nnunet_v2(tmp_path), tmp_path / "two", gpu_memory_gb=0)
    record = json.loads((bundle / "plan.json").read_text())
    assert record["layout"] == "nnU-Net v2" and record["settings"]["modality"] == "MR"
    assert [c["name"] for c in record["fingerprint"]["channels"]] == ["T1", "T2"]
    assert record["fingerprint"]["channels"][1]["mean"] > record["fingerprint"]["channels"][0]["mean"]
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    steps = inference["preprocessing"]["transforms"]
    assert any(t["_target_"] == "NormalizeIntensityd" and t["channel_wise"] for t in steps)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["channel_def"] == {"0": "T1", "1": "T2"}
