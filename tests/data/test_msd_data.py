# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""MSD layout: fake data per task, and data lists with MONAI's Decathlon splits."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.apps import DecathlonDataset

from qtunet_monai.bundle import check_cases
from qtunet_monai.data.msd import MSD_TASKS, msd_datalist, write_fake_msd


@pytest.mark.parametrize("key", list(MSD_TASKS))
def test_fake_task_has_the_official_layout_and_checks_clean(tmp_path, key):
    task = MSD_TASKS[key]
    folder = write_fake_msd(tmp_path, key, num_training=5, num_test=1, shape=(20, 18, 12))
    assert folder.name == task.folder
    dataset = json.loads((folder / "dataset.json").read_text())
    assert dataset["modality"] == {str(i): m for i, m in enumerate(task.modality)}
    assert dataset["numTraining"] == 5 and len(dataset["test"]) == 1
    first = folder / dataset["training"][0]["image"]
    assert first.name == f"{task.prefix}_001.nii.gz"
    image = nib.load(first)
    assert image.shape == ((20, 18, 12, task.in_channels) if task.in_channels > 1 else (20, 18, 12))
    if task.ct:
        assert np.asarray(image.dataobj).min() < -900  # Hounsfield units: air around the body

    datalist_file = msd_datalist(tmp_path, key, tmp_path / "datalist.json")
    datalist = json.loads(datalist_file.read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [4, 1, 1]
    check_cases(datalist["training"] + datalist["validation"], task.in_channels, task.num_classes)
    labels = np.asarray(nib.load(datalist["training"][0]["label"]).dataobj)
    assert set(np.unique(labels)) == set(range(task.num_classes))


def test_splits_are_monai_decathlon_splits(tmp_path):
    write_fake_msd(tmp_path, "spleen", num_training=10, num_test=0, shape=(8, 8, 8))
    datalist = json.loads(msd_datalist(tmp_path, "spleen", tmp_path / "d.json", seed=3).read_text())
    monai_val = DecathlonDataset(tmp_path, "Task09_Spleen", "validation", transform=lambda x: x, seed=3,
                                 cache_rate=0.0, progress=False).data
    assert [d["image"] for d in datalist["validation"]] == [d["image"] for d in monai_val]
    assert len(datalist["validation"]) == 2
    assert not {d["image"] for d in datalist["training"]} & {d["image"] for d in datalist["validation"]}


def test_missing_download_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="Task03_Liver/dataset.json not found: download Task03_Liver.tar"):
        msd_datalist(tmp_path, "liver", tmp_path / "d.json")
    with pytest.raises(ValueError, match="unknown MSD task 'kidney'"):
        write_fake_msd(tmp_path, "kidney")


@pytest.mark.slow
def test_cli_writes_fake_data_and_the_data_list(tmp_path, capsys):
    """The command line writes the official layout (5 labelled + 1 test case, 2-channel prostate MRI) and a
    data list with MONAI's 4 / 1 split of absolute paths to those files, which checks clean."""
    from qtunet_monai.cli import main

    # in-process: the commands, not the interpreter start-up, are under test
    main(["fake_data", "msd_prostate", str(tmp_path)])
    folder = tmp_path / "Task05_Prostate"
    assert f"fake data written: {folder}" in capsys.readouterr().out
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [f"prostate_{i:03d}.nii.gz" for i in range(1, 6)]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"prostate_{i:03d}.nii.gz" for i in range(1, 6)]
    assert [p.name for p in (folder / "imagesTs").iterdir()] == ["prostate_006.nii.gz"]
    assert json.loads((folder / "dataset.json").read_text())["modality"] == {"0": "T2", "1": "ADC"}
    image = nib.load(folder / "imagesTr" / "prostate_001.nii.gz")
    assert image.shape[-1] == 2 and len(image.shape) == 4

    main(["prepare_data", "msd_prostate", str(tmp_path), "--output_file", str(tmp_path / "datalist.json")])
    assert "{'training': 4, 'validation': 1, 'testing': 1}" in capsys.readouterr().out
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [4, 1, 1]
    cases = datalist["training"] + datalist["validation"]
    assert sorted(Path(c["image"]).name for c in cases) == [f"prostate_{i:03d}.nii.gz" for i in range(1, 6)]
    assert all(Path(c["image"]).is_absolute() and Path(c["image"]).parent == (folder / "imagesTr").resolve()
               and Path(c["label"]) == (folder / "labelsTr" / Path(c["image"]).name).resolve() for c in cases)
    assert datalist["testing"] == [{"image": str((folder / "imagesTs" / "prostate_006.nii.gz").resolve())}]
    check_cases(datalist["training"], in_channels=2, num_classes=3)


@pytest.mark.parametrize("task, folder, message", [
    ("msd_nosuch", "data", "error: unknown task 'msd_nosuch'; choose one of ["),
    ("msd_hippocampus", "my_folder", ("error: {root}/my_folder/Task04_Hippocampus/dataset.json not found: download "
                                      "Task04_Hippocampus.tar from the Medical Segmentation Decathlon")),
])
def test_cli_data_errors_are_one_line_with_status_2(tmp_path, capsys, task, folder, message):
    from qtunet_monai.cli import main

    (tmp_path / folder).mkdir()
    with pytest.raises(SystemExit) as stopped:
        main(["prepare_data", task, str(tmp_path / folder), str(tmp_path / "datalist.json")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and error.startswith(message.format(root=tmp_path))
    assert not (tmp_path / "datalist.json").exists()
