# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app's checks, without MONAI Label: names, paths, uploads, binding and retraining rounds.

MONAI Label itself is tested in tests/integrations/test_monailabel.py (real server, skipped where it is not installed);
here the same checks run on real files, real MONAI engines and the demo bundle's own ``train.json``.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.losses import DiceLoss
from monai.transforms import Activationsd, AsDiscreted, Compose

from qtunet_monai.bundle import BestModelSaver, DataError
from qtunet_monai.bundle.presets import network_options
from qtunet_monai.integrations import monailabel_checks as checks

REPO = Path(__file__).resolve().parents[2]
PATTERNS = ["*.nii.gz", "*.nii", "*.png"]


def _nifti(path: Path, array: np.ndarray) -> Path:
    nib.Nifti1Image(array, np.eye(4)).to_filename(str(path))
    return path


def _upload_copy(suffix: str = ".nii.gz") -> str:
    """A file named as MONAI Label's endpoints name their copy of an upload."""
    return tempfile.NamedTemporaryFile(suffix=suffix, delete=False).name


@pytest.mark.parametrize("name", ["../outside/evil", "../../outside", "a/b", "a\\b", "/etc/passwd", "..", ".",
                                  ".datastore_v2", "c:evil", "", "x\x00y", "a" * 256, None, 3])
def test_unsafe_ids_and_tags_are_refused(name):
    with pytest.raises(checks.RequestRefused) as refused:
        checks.check_name(name, "label tag")
    assert refused.value.status == 400 and "label tag" in str(refused.value)


@pytest.mark.parametrize("name", ["case", "brain_000", "final", "1.2.840.113619.2.55", "case (1)"])
def test_plain_names_pass(name):
    assert checks.check_name(name, "image id") == name


def test_inference_paths_outside_the_datastore_are_refused(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    inside = _nifti(studies / "case.nii.gz", np.zeros((4, 4, 4), np.float32))
    outside = _nifti(tmp_path / "secret.nii.gz", np.zeros((4, 4, 4), np.float32))
    assert checks.check_image_path(str(inside), "image", [studies]) == str(inside)
    for path in [str(outside), f"{studies}/../secret.nii.gz", "/etc/passwd", "../secret.nii.gz", "case.nii.gz"]:
        with pytest.raises(checks.RequestRefused, match="not an image id of the datastore"):
            checks.check_image_path(path, "image", [studies])
    upload = _upload_copy()
    try:  # the server's own copy of the client's upload may be read
        assert checks.check_image_path(upload, "image", [studies]) == upload
    finally:
        os.unlink(upload)
    with pytest.raises(checks.RequestRefused):  # another file in the temp folder may not
        checks.check_image_path(os.path.join(tempfile.gettempdir(), "notes.nii.gz"), "image", [studies])


def test_refused_uploads_are_deleted_and_good_ones_kept(tmp_path):
    good = _upload_copy()
    _nifti(Path(good), np.random.default_rng(0).random((6, 6, 6), dtype=np.float32))
    try:
        assert checks.check_image_upload("case", good, PATTERNS, 2**20) == "case"
        assert os.path.exists(good)
    finally:
        os.unlink(good)

    whole = _nifti(tmp_path / "whole.nii.gz", np.random.default_rng(0).random((32, 32, 32), dtype=np.float32))
    raw = gzip.decompress(whole.read_bytes())
    header_only, truncated, notes = _upload_copy(), _upload_copy(), _upload_copy()
    Path(header_only).write_bytes(gzip.compress(raw[:352]))  # a NIfTI-1 header, no voxels
    Path(truncated).write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    Path(notes).write_text("not an image")
    for upload in (header_only, truncated, notes):
        with pytest.raises(checks.RequestRefused, match="image 'case' is refused") as refused:
            checks.check_image_upload("case", upload, PATTERNS, 2**30)
        assert refused.value.status == 400
        assert not os.path.exists(upload), "a refused upload was left in the temp folder"

    big = _upload_copy()
    shutil.copy(whole, big)
    with pytest.raises(checks.RequestRefused, match="over the upload limit") as refused:
        checks.check_image_upload("case", big, PATTERNS, max_bytes=1000)
    assert refused.value.status == 413 and not os.path.exists(big)

    script = _upload_copy(".py")
    with pytest.raises(checks.RequestRefused, match="file type"):
        checks.check_image_upload("case", script, PATTERNS, 2**20)
    assert not os.path.exists(script)
    unsafe = _upload_copy()
    shutil.copy(whole, unsafe)
    with pytest.raises(checks.RequestRefused, match="path separator"):
        checks.check_image_upload("../outside/evil", unsafe, PATTERNS, 2**30)
    assert not os.path.exists(unsafe)


def test_files_that_are_not_upload_copies_are_never_deleted(tmp_path):
    mine = tmp_path / "tmpabcdefgh.nii.gz"  # the right name, but not in the temp folder
    mine.write_text("not an image")
    with pytest.raises(checks.RequestRefused):
        checks.check_image_upload("case", str(mine), PATTERNS, 2**20)
    assert mine.exists()


def test_labels_are_checked_against_their_image(tmp_path):
    image = _nifti(tmp_path / "case.nii.gz", np.random.default_rng(0).random((8, 8, 8), dtype=np.float32))

    def label(array) -> str:
        path = _upload_copy()
        _nifti(Path(path), array)
        return path

    good = label(np.full((8, 8, 8), 3, np.uint8))
    checks.check_label_upload("case", "final", good, str(image), PATTERNS, 2**20, [0, 1, 2, 3])
    os.unlink(good)
    cases = {"does not match image shape": label(np.zeros((8, 8, 6), np.uint8)),
             r"label values \[7\] are outside": label(np.full((8, 8, 8), 7, np.uint8))}
    for problem, upload in cases.items():
        with pytest.raises(checks.RequestRefused, match=problem):
            checks.check_label_upload("case", "final", upload, str(image), PATTERNS, 2**20, [0, 1, 2, 3])
        assert not os.path.exists(upload)
    tagged = label(np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(checks.RequestRefused, match="label tag '../../outside'"):
        checks.check_label_upload("case", "../../outside", tagged, str(image), PATTERNS, 2**20, [0, 1])
    assert not os.path.exists(tagged)


@pytest.mark.parametrize("affine, difference", [
    (np.diag([-1.0, -1.0, 1.0, 1.0]), "orientation LPS vs RAS"),
    (np.diag([1.5, 1.5, 1.5, 1.0]), "spacing (1.5, 1.5, 1.5) vs (1.0, 1.0, 1.0) mm"),
])
def test_a_label_upload_off_its_image_grid_is_refused(tmp_path, affine, difference):
    image = _nifti(tmp_path / "case.nii.gz", np.random.default_rng(0).random((8, 8, 8), dtype=np.float32))
    upload = _upload_copy()
    nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), affine).to_filename(upload)
    with pytest.raises(checks.RequestRefused) as refused:
        checks.check_label_upload("case", "final", upload, str(image), PATTERNS, 2**20, [0, 1])
    assert refused.value.status == 400 and str(refused.value) == (
        f"label for 'case' is refused: the upload: label does not match its image {image} (label vs image): "
        f"{difference}")
    assert not os.path.exists(upload)


@pytest.mark.parametrize(("argv", "host"), [
    (["monailabel", "start_server", "--app", "a", "--studies", "s"], "0.0.0.0"),  # MONAI Label's default
    (["monailabel", "start_server", "--host", "127.0.0.1"], "127.0.0.1"),
    (["monailabel", "start_server", "-i", "::1"], "::1"),
    (["monailabel", "start_server", "--host=10.1.2.3", "--port", "8000"], "10.1.2.3"),
])
def test_the_listening_address_is_read_from_the_command(argv, host):
    assert checks.host_from_argv(argv) == host


def test_serving_beyond_loopback_needs_authentication():
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        checks.check_bind(host, auth_enabled=False)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        with pytest.raises(checks.RequestRefused, match="--host 127.0.0.1") as refused:
            checks.check_bind(host, auth_enabled=False)
        assert "MONAI_LABEL_AUTH_ENABLE=true" in str(refused.value)
        assert "--conf allow_remote_without_auth true" in str(refused.value)
        checks.check_bind(host, auth_enabled=True)
        checks.check_bind(host, auth_enabled=False, allow_without_auth=True)


def test_training_requests_naming_files_are_refused(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    checks.check_train_request({"model": "m", "max_epochs": 2, "val_split": 0.2}, tmp_path)
    for request, problem in [({"model_filename": "../../../etc/passwd"}, "path separator"),
                             ({"model_filename": "other.pt"}, "not in"), ({"run_id": "initialize"}, "run_id"),
                             ({"tracking_uri": "file:///tmp/x"}, "tracking_uri"), ({"max_epochs": -1}, "max_epochs"),
                             ({"val_split": 1.5}, "val_split")]:
        with pytest.raises(checks.RequestRefused, match=problem):
            checks.check_train_request(request, tmp_path)


def test_validation_is_held_out_only_when_there_are_enough_labels():
    cases = [{"image": f"i{i}", "label": f"l{i}"} for i in range(10)]
    train, val, which = checks.choose_validation(cases[:8], cases[8:], min_held_out=2)
    assert (train, val) == (cases[:8], cases[8:]) and "2 held-out" in which
    train, val, which = checks.choose_validation(cases[:2], cases[2:3], min_held_out=2)
    assert train == val == cases[:3] and "too few" in which
    train, val, _ = checks.choose_validation(cases[:1], [], min_held_out=2)
    assert train == val == cases[:1]


def test_git_ignores_what_the_monailabel_app_writes():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["monailabel_app/logs/app.log", "monailabel_app/bin/x", "monailabel_app/lib/x", "monailabel_app/model/x"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True,
                             check=False).stdout.split()  # exit 1 when nothing is ignored
    assert ignored == paths


# --- retraining rounds on real MONAI engines: a 1x1x1 convolution segmenting "intensity > 0.5" ---------------


def _threshold_model(sign: float) -> torch.nn.Conv3d:
    """sign 1: labels voxels brighter than 0.5 as foreground (Dice 1); sign -1: the opposite (Dice 0)."""
    net = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([-20.0, 20.0]).view(2, 1, 1, 1, 1) * sign)
        net.bias.copy_(torch.tensor([10.0, -10.0]) * sign)
    return net


def _engines(net, tmp_path, invert_training_labels: bool, epochs: int = 3):
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 1, 8, 8, 8, generator=generator) for _ in range(4)]
    truth = [{"image": x, "label": (x > 0.5).float()} for x in images]
    train = [{"image": x, "label": (x <= 0.5).float() if invert_training_labels else (x > 0.5).float()}
             for x in images]
    post = Compose([Activationsd("pred", softmax=True), AsDiscreted(["pred", "label"], argmax=[True, False],
                                                                    to_onehot=2)])
    evaluator = SupervisedEvaluator(device="cpu", val_data_loader=truth, network=net, postprocessing=post,
                                    key_val_metric={"val_mean_dice": MeanDice(
                                        include_background=False, output_transform=from_engine(["pred", "label"]))})
    BestModelSaver(str(tmp_path / "model.pt"), net).attach(evaluator)
    trainer = SupervisedTrainer(device="cpu", max_epochs=epochs, train_data_loader=train, network=net,
                                optimizer=torch.optim.Adam(net.parameters(), 0.5),
                                loss_function=DiceLoss(to_onehot_y=True, softmax=True))
    ValidationHandler(interval=1, validator=evaluator).attach(trainer)
    return trainer, evaluator


def test_a_worse_round_keeps_the_previous_model(tmp_path):
    previous = _threshold_model(1.0).state_dict()
    torch.save(previous, tmp_path / "model.pt")
    net = _threshold_model(1.0)  # MONAI Label starts training from the model in use
    trainer, evaluator = _engines(net, tmp_path, invert_training_labels=True)
    round_ = checks.RetrainingRound(evaluator, net, str(tmp_path / "model.pt"), str(tmp_path / "round.json"),
                                    validation="4 images")
    round_.attach(trainer)
    trainer.run()
    report = json.loads((tmp_path / "round.json").read_text())
    assert report["previous_metric"] == pytest.approx(1.0)
    assert [e["epoch"] for e in report["epochs"]] == [1, 2, 3] and report["epochs"][-1]["metric"] < 0.5
    assert report["best_epoch"] == 0 and report["model_replaced"] is False
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], previous[k]) for k in previous)
    assert not torch.equal(net.weight, previous["weight"])  # training did change the network


def test_a_better_round_replaces_the_previous_model(tmp_path):
    torch.save(_threshold_model(-1.0).state_dict(), tmp_path / "model.pt")
    net = torch.nn.Conv3d(1, 2, 1)  # pretrained=False: the round starts elsewhere, still judged against the file
    trainer, evaluator = _engines(net, tmp_path, invert_training_labels=False, epochs=6)
    checks.RetrainingRound(evaluator, net, str(tmp_path / "model.pt"), str(tmp_path / "round.json")).attach(trainer)
    trainer.run()
    report = json.loads((tmp_path / "round.json").read_text())
    assert report["previous_metric"] == pytest.approx(0.0, abs=1e-6)
    assert report["model_replaced"] is True and report["best_metric"] > 0.5
    best_epoch_metric = report["epochs"][report["best_epoch"] - 1]["metric"]
    assert best_epoch_metric == pytest.approx(report["best_metric"])
    saved = torch.nn.Conv3d(1, 2, 1)
    saved.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    evaluator.network = saved
    evaluator.state.best_metric_epoch = -1
    evaluator.run(1)
    assert evaluator.state.metrics["val_mean_dice"] == pytest.approx(report["best_metric"])


# --- the demo bundle's train.json with the overrides MONAI Label sends -----------------------------------------

BUNDLE = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"


def _case(folder: Path, name: str, label_value_max: int = 3) -> dict:
    rng = np.random.default_rng(len(name))
    image = rng.random((32, 32, 32), dtype=np.float32)
    label = np.clip((image * 4).astype(np.uint8), 0, label_value_max)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.Nifti1Image(image, affine).to_filename(str(folder / f"{name}.nii.gz"))
    nib.Nifti1Image(label, affine).to_filename(str(folder / f"{name}_label.nii.gz"))
    return {"image": str(folder / f"{name}.nii.gz"), "label": str(folder / f"{name}_label.nii.gz")}


def _monailabel_overrides(bundle: Path, train: list, val: list) -> dict:
    """What MONAI Label's BundleTrainTask passes to ``monai.bundle.run`` (CheckpointLoader of the model in use)."""
    handlers = ConfigParser.load_config_file(str(bundle / "configs" / "train.json"))["train"]["handlers"]
    loader = {"_target_": "CheckpointLoader", "load_path": str(bundle / "models" / "model.pt"),
              "load_dict": {"model": "$@network"}, "strict": False}
    return {"bundle_root": str(bundle), "train#trainer#max_epochs": 1, "train#dataset#data": train,
            "device": torch.device("cpu"), "train#handlers": [loader, *handlers], "validate#dataset#data": val}


def test_monailabel_training_lists_go_through_the_bundle_data_check(tmp_path):
    good, bad = _case(tmp_path, "good"), _case(tmp_path, "bad", label_value_max=9)
    bad_label = np.asarray(nib.load(bad["label"]).dataobj).copy()
    bad_label[0, 0, 0] = 9
    nib.Nifti1Image(bad_label, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(bad["label"])
    overrides = checks.retraining_overrides(_monailabel_overrides(BUNDLE, [good, bad], [good]), BUNDLE, None)
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update(overrides)
    with pytest.raises(Exception) as failed:
        parser.get_parsed_content("train#dataset#data")
    found = checks.find_cause(failed.value, DataError)
    assert found is not None and f"{bad['label']}: label values [9]" in str(found)
    assert parser.get_parsed_content("validate#dataset#data") == [good]


@pytest.mark.slow
def test_a_monailabel_round_of_the_demo_bundle_reports_and_keeps_the_better_model(tmp_path):
    from monai.bundle import run

    from qtunet_monai import QTUNet

    bundle = tmp_path / BUNDLE.name
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("data", "models", "eval"))
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    previous = QTUNet(1, 4, **network_options("accurate")).state_dict()  # the demo's preset
    torch.save(previous, bundle / "models" / "model.pt")
    case = _case(tmp_path, "case")
    report = tmp_path / "round.json"
    overrides = checks.retraining_overrides(_monailabel_overrides(bundle, [case], [case]), bundle, str(report),
                                            "1 labelled training image")
    run(run_id="run", meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "train.json"), logging_file=str(bundle / "configs" / "logging.conf"),
        **overrides)
    summary = json.loads(report.read_text())
    assert summary["validation"] == "1 labelled training image" and summary["metric_name"] == "val_mean_dice"
    assert summary["previous_metric"] is not None and len(summary["epochs"]) == 1
    assert summary["epochs"][0]["loss"] > 0 and summary["epochs"][0]["metric"] is not None
    saved = torch.load(bundle / "models" / "model.pt", weights_only=True)
    unchanged = all(torch.equal(saved[k], previous[k]) for k in previous)
    if summary["model_replaced"]:
        assert summary["epochs"][0]["metric"] > summary["previous_metric"] and not unchanged
    else:
        assert summary["epochs"][0]["metric"] <= summary["previous_metric"] and unchanged
