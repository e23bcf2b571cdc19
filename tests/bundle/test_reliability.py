# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Nothing silent, nothing lost: checkpoints, predictions and data checks under killed runs, bad
folders and bad inputs, on MONAI's own engines with tiny networks and volumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tomllib
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MeanDice, ValidationHandler, from_engine
from monai.losses import DiceLoss
from monai.transforms import AsDiscreted, Compose

from qtunet_monai.bundle import (
    AtomicNibabelWriter,
    BestModelSaver,
    CheckpointError,
    DataError,
    NonFiniteError,
    OutputError,
    ResumeCheckpoint,
    StopOnNonFiniteLoss,
    atomic_save,
    check_cases,
    check_writable,
    clean_stale_temporaries,
    load_pretrained,
)
from qtunet_monai.bundle.files import temporary_path

REPO = Path(__file__).resolve().parents[2]
AFFINE = np.eye(4)


def _nifti(path: Path, data: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(data, AFFINE), path)
    return str(path)


def _volume(seed: int = 0, shape=(8, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


# -------------------------------------------------------------------------------- resume and the best model
def _batch(image: torch.Tensor, label: torch.Tensor) -> dict:
    from monai.data import MetaTensor

    return {"image": MetaTensor(image, meta={"filename_or_obj": ["case.nii.gz"]}), "label": label}


def _engines(network, path: Path, resume: bool, data: list[dict], max_epochs: int):
    """A trainer (learning rate 0: the weights only change where the test sets them) validating every epoch
    with mean Dice, the best model in ``path/model.pt`` and the resume state in ``path/resume.pt``."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
    post = Compose([AsDiscreted(keys=["pred", "label"], argmax=[True, False], to_onehot=2)])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=network, postprocessing=post,
        key_val_metric={"dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
        val_handlers=[BestModelSaver(str(path / "model.pt"), network)], decollate=True)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=network, optimizer=optimizer,
        loss_function=DiceLoss(to_onehot_y=True, softmax=True), decollate=False,
        train_handlers=[ValidationHandler(validator=evaluator, interval=1, epoch_level=True)])
    ResumeCheckpoint(str(path / "resume.pt"), network, optimizer, resume=resume, evaluator=evaluator).attach(trainer)
    return trainer, evaluator


def test_a_worse_epoch_after_resume_keeps_the_best_model(tmp_path):
    label = torch.zeros(1, 1, 4, 4, 4)
    label[..., :2] = 1
    image = label.clone()  # the image is the label: a 1x1 convolution can segment it perfectly
    data = [_batch(image, label)]
    network = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1, 1))
        network.bias.copy_(torch.tensor([0.5, -0.5]))
    trainer, evaluator = _engines(network, tmp_path, resume=False, data=data, max_epochs=1)
    trainer.run()  # "killed" after the first epoch: resume.pt and model.pt written
    assert evaluator.state.best_metric == pytest.approx(1.0)
    best = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["best_metric"] == pytest.approx(1.0)

    # a new process resumes; the next epoch is worse (the network now predicts background everywhere)
    network = torch.nn.Conv3d(1, 2, 1)
    trainer, evaluator = _engines(network, tmp_path, resume=True, data=data, max_epochs=2)

    @trainer.on(Events.EPOCH_STARTED)
    def spoil(engine):
        with torch.no_grad():
            network.weight.zero_()
            network.bias.copy_(torch.tensor([1.0, -1.0]))

    trainer.run()
    assert trainer.state.epoch == 2
    assert evaluator.state.best_metric == pytest.approx(1.0) and evaluator.state.best_metric_epoch == 1
    kept = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(kept[k], best[k]) for k in best), "the worse epoch replaced the best model"
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["best_metric_epoch"] == 1


# ------------------------------------------------------------------------------------- non-finite training
def test_a_nan_loss_stops_training_naming_the_files_and_saves_nothing(tmp_path):
    from monai.data import MetaTensor

    image = torch.ones(1, 1, 4, 4, 4)
    image[0, 0, 0, 0, 0] = 3e38  # finite, but the network's output overflows
    batch = {"image": MetaTensor(image, meta={"filename_or_obj": ["/data/extreme.nii.gz"]}),
             "label": torch.zeros(1, 4, 4, 4, dtype=torch.long)}
    network = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        network.weight.fill_(2.0)  # 6e38 overflows float32: infinite logits, NaN loss
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=2, train_data_loader=[batch], network=network,
                                optimizer=optimizer, loss_function=torch.nn.CrossEntropyLoss(), decollate=False,
                                train_handlers=[StopOnNonFiniteLoss()])
    ResumeCheckpoint(str(tmp_path / "resume.pt"), network, optimizer).attach(trainer)
    with pytest.raises(NonFiniteError, match=r"/data/extreme.nii.gz: the loss became nan at iteration 1 \(epoch 1\)"):
        trainer.run()
    assert not (tmp_path / "resume.pt").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    network = torch.nn.Conv3d(1, 2, 1)
    saver = BestModelSaver(str(tmp_path / "model.pt"), network)
    atomic_save(network.state_dict(), tmp_path / "model.pt")
    good = torch.load(tmp_path / "model.pt", weights_only=True)
    with torch.no_grad():
        network.weight[0] = float("nan")

    class State:
        epoch, best_metric, best_metric_epoch = 3, 0.0, 3

    class Evaluator:
        state = State()

    with pytest.raises(NonFiniteError, match=r"model.pt: not written, the network's weights are not finite"):
        saver(Evaluator())
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], good["weight"])


# ------------------------------------------------------------------------------------- files of killed runs
def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=False)
    return int(done.stdout)


@pytest.mark.slow
def test_killed_checkpoint_write_leaves_the_old_file_and_a_temporary_removed_at_start_up(tmp_path):
    target = tmp_path / "resume.pt"
    atomic_save({"epoch": torch.tensor(1)}, target)
    # a run killed with SIGKILL in the middle of writing its next checkpoint
    script = textwrap.dedent(f"""
        import os, signal, torch
        from qtunet_monai.bundle.files import temporary_path
        tmp = temporary_path({str(target)!r})
        with open(tmp, "wb") as f:
            torch.save({{"epoch": torch.tensor(2), "big": torch.zeros(10**6)}}, f)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".resume.pt.")
    assert torch.load(target, weights_only=True)["epoch"] == 1  # the old checkpoint is intact

    live = temporary_path(target)  # this (live) process is writing one too: it must stay
    other_live = tmp_path / f".model.pt.{live.name.split('.')[3]}.{os.getppid()}.abcd1234.tmp"
    other_live.write_bytes(b"x")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_bytes(b"x")
    network = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    ResumeCheckpoint(str(target), network, optimizer).attach(SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=[], network=network, optimizer=optimizer,
        loss_function=torch.nn.MSELoss()))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other_live.name,
                                                                 unrelated.name])


def test_stale_temporaries_only_of_dead_writers_on_this_host(tmp_path):
    (tmp_path / "probe").mkdir()
    host = temporary_path(tmp_path / "probe" / "x.pt").name.split(".")[3]
    dead = tmp_path / f".model.pt.{host}.{_dead_pid()}.abc_1234.tmp"
    dead_prediction = tmp_path / f".case_seg.nii.gz.{host}.{_dead_pid()}.q1w2e3r4.tmp.nii.gz"
    other_host = tmp_path / f".model.pt.elsewhere.{_dead_pid()}.abc_1234.tmp"
    unknown = tmp_path / ".model.pt.k2j3h4g5.tmp"  # not a name this package writes
    for p in (dead, dead_prediction, other_host, unknown):
        p.write_bytes(b"partial")
    removed = clean_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, dead_prediction.name])
    assert other_host.exists() and unknown.exists()


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write to: mode 0555, or for root (who ignores modes) a read-only tmpfs."""
    folder = tmp_path / "models"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"root, and mounting a read-only tmpfs is not permitted: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_read_only_folder_is_refused_at_start_up(read_only_folder):
    network = torch.nn.Linear(1, 1)
    with pytest.raises(OutputError, match="models: cannot write to this folder"):
        BestModelSaver(str(read_only_folder / "model.pt"), network).attach(None)
    with pytest.raises(OutputError, match="models: cannot write to this folder"):
        check_writable(read_only_folder)


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                             check=False)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a 1 MiB tmpfs is not permitted here: {mounted.stderr.decode().strip()}")
    try:
        atomic_save({"a": torch.ones(10)}, folder / "resume.pt")
        with pytest.raises(OutputError, match=r"resume.pt: could not be written \(.* MiB free on its disk"):
            atomic_save({"a": torch.zeros(10**6)}, folder / "resume.pt")  # 4 MB
        assert torch.equal(torch.load(folder / "resume.pt", weights_only=True)["a"], torch.ones(10))
        assert [p.name for p in folder.iterdir()] == ["resume.pt"]
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_unusable_checkpoint_folder_is_refused_before_training(tmp_path):
    (tmp_path / "models").write_text("a file where the folder should be")
    network = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    with pytest.raises(OutputError, match="models: cannot write to this folder"):
        ResumeCheckpoint(str(tmp_path / "models" / "resume.pt"), network, optimizer).attach(None)
    with pytest.raises(OutputError, match="models: cannot write to this folder"):
        BestModelSaver(str(tmp_path / "models" / "model.pt"), network).attach(None)


@pytest.mark.slow
def test_a_killed_prediction_write_never_leaves_a_truncated_file(tmp_path):
    """A writer killed at a random moment while rewriting a prediction: the file is always readable whole."""
    target = tmp_path / "case_seg.nii.gz"
    script = textwrap.dedent(f"""
        import numpy as np
        from qtunet_monai.bundle import AtomicNibabelWriter
        data = np.random.default_rng(0).integers(0, 4, (1, 96, 96, 96)).astype(np.uint8)
        while True:
            writer = AtomicNibabelWriter(output_dtype=np.uint8)
            writer.set_data_array(data, channel_dim=0)
            writer.set_metadata({{"affine": np.eye(4), "original_affine": np.eye(4)}}, resample=False)
            writer.write({str(target)!r})
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while not target.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # several rewrites later; most of a rewrite's time is spent writing
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert np.asarray(nib.load(target).dataobj).shape == (96, 96, 96)
    clean_stale_temporaries(tmp_path)  # the killed writers' temporaries
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_atomic_writer_writes_what_monai_would(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(1, 2, 3, 4)
    writer = AtomicNibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(data, channel_dim=0)
    writer.set_metadata({"affine": np.diag([2.0, 2.0, 2.0, 1.0])}, resample=False)
    writer.write(str(tmp_path / "out" / "case_seg.nii.gz"))
    written = nib.load(tmp_path / "out" / "case_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), data[0])
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["case_seg.nii.gz"]


# ------------------------------------------------------------------------------------------ input checks
def _bad_inputs(folder: Path) -> dict[str, tuple[str, str]]:
    """kind -> (file, expected message) for inference inputs."""
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    nan = _volume(1)
    nan[2, 2, 2] = np.nan
    inf = _volume(2)
    inf[1, 1, 1] = np.inf
    extreme = _volume(3)
    extreme[0, 0, 0] = 3e38
    truncated = folder / "truncated.nii.gz"
    _nifti(truncated, _volume(4, (32, 32, 32)))
    truncated.write_bytes(truncated.read_bytes()[:2000])
    header_only = folder / "header_only.nii"
    _nifti(header_only, _volume(5))
    header_only.write_bytes(header_only.read_bytes()[:352])
    return {
        "nan": (_nifti(folder / "nan.nii.gz", nan), "image contains NaN or infinite intensities"),
        "inf": (_nifti(folder / "inf.nii.gz", inf), "image contains NaN or infinite intensities"),
        "extreme": (_nifti(folder / "extreme.nii.gz", extreme), "intensities up to 3e+38 exceed the limit of 1e+06"),
        "2d": (_nifti(folder / "slice.nii.gz", _volume(6, (8, 8))), ("a 2-d image of shape (8, 8), but this bundle "
                                                                    "expects 3-d volumes")),
        "5d": (_nifti(folder / "series.nii.gz", _volume(7, (8, 8, 8, 2, 2))), "a 5-d image"),
        "channels": (_nifti(folder / "two.nii.gz", _volume(8, (8, 8, 8, 2))), ("2 image channel(s), but the network "
                                                                              "expects 1")),
        "truncated": (str(truncated), "unreadable"),
        "header_only": (str(header_only), "unreadable"),
        "not_an_image": (str((folder / "notes.nii.gz").write_text("text") and folder / "notes.nii.gz"), "unreadable"),
        "missing": (str(folder / "gone.nii.gz"), "file not found"),
        "duplicate": (_nifti(folder / "b" / "case.nii.gz", _volume(9)), "its prediction would overwrite that of"),
    }


def test_inference_inputs_are_checked_like_training_inputs(tmp_path):
    bad = _bad_inputs(tmp_path)
    good = _nifti(tmp_path / "a" / "case.nii.gz", _volume(10))
    items = [{"image": good}] + [{"image": file} for file, _ in bad.values()]
    with pytest.raises(DataError) as error:
        check_cases(items, in_channels=1, unique_names=True)
    lines = str(error.value).splitlines()
    assert lines[0] == f"{len(bad)} problems in the data:"
    for kind, (file, message) in bad.items():
        assert any(line.strip().startswith(f"{file}: ") and message in line for line in lines), (kind, lines)
    assert not any(good + ":" in line for line in lines)


def test_bad_inference_inputs_can_be_skipped_and_listed(tmp_path, caplog):
    bad = _bad_inputs(tmp_path)
    good = _nifti(tmp_path / "a" / "case.nii.gz", _volume(10))
    items = [{"image": good}] + [{"image": file} for file, _ in bad.values()]
    with caplog.at_level("WARNING"):
        kept = check_cases(items, in_channels=1, unique_names=True, skip_bad=True)
    assert kept == [{"image": good}]
    assert f"skipping {len(bad)} of {len(items)} case(s)" in caplog.text
    assert all(file in caplog.text for file, _ in bad.values())
    with pytest.raises(DataError, match="nan.nii.gz: image contains NaN"):
        check_cases([{"image": bad["nan"][0]}], in_channels=1, skip_bad=True)


def test_one_problem_is_one_line(tmp_path):
    file = _nifti(tmp_path / "slice.nii.gz", _volume(0, (8, 8)))
    with pytest.raises(DataError) as error:
        check_cases([{"image": file}], in_channels=1)
    assert str(error.value) == f"{file}: a 2-d image of shape (8, 8), but this bundle expects 3-d volumes " \
                               "(optionally with channels last)"


# ------------------------------------------------------------------------------ a label on its image's grid
RAS_15 = np.diag([1.5, 1.5, 1.5, 1.0])


def _image_and_label(folder: Path, label_affine: np.ndarray, label_shape=(8, 8, 8)) -> tuple[str, str]:
    """A 1.5 mm RAS image and a label of the same voxels (cropped to ``label_shape``) under ``label_affine``."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    image = folder / "imagesTr" / "x.nii.gz"
    nib.save(nib.Nifti1Image(_volume(0), RAS_15), image)
    label = (np.indices((8, 8, 8)).sum(0) % 2).astype(np.uint8)[: label_shape[0], : label_shape[1], : label_shape[2]]
    if len(label_shape) > 3:
        label = np.repeat(label[..., None], label_shape[3], axis=-1)
    nib.save(nib.Nifti1Image(label, label_affine), folder / "labelsTr" / "x.nii.gz")
    return str(image), str(folder / "labelsTr" / "x.nii.gz")


def _shifted(affine: np.ndarray, origin) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] = origin
    return moved


@pytest.mark.parametrize("label_affine, label_shape, difference", [
    pytest.param(np.diag([-1.5, -1.5, 1.5, 1.0]), (8, 8, 8), "orientation LPS vs RAS", id="flipped"),
    pytest.param(np.eye(4), (8, 8, 8), "spacing (1.0, 1.0, 1.0) vs (1.5, 1.5, 1.5) mm", id="spacing"),
    pytest.param(_shifted(RAS_15, (3.0, 0.0, -1.5)), (8, 8, 8), "origin (3.0, 0.0, -1.5) vs (0.0, 0.0, 0.0) mm",
                 id="origin"),
    pytest.param(_shifted(np.diag([-1.0, 1.0, 1.0, 1.0]), (10.5, 0.0, 0.0)), (8, 8, 8),
                 "orientation LAS vs RAS; spacing (1.0, 1.0, 1.0) vs (1.5, 1.5, 1.5) mm; origin (10.5, 0.0, 0.0) "
                 "vs (0.0, 0.0, 0.0) mm", id="all-three"),
])
def test_a_label_off_its_image_is_refused_naming_both_files(tmp_path, label_affine, label_shape, difference):
    image, label = _image_and_label(tmp_path, label_affine, label_shape)
    for check_values in (True, False):  # headers only too
        with pytest.raises(DataError) as error:
            check_cases([{"image": image, "label": label}], in_channels=1, num_classes=2, check_values=check_values)
        assert str(error.value) == f"{label}: label does not match its image {image} (label vs image): {difference}"


@pytest.mark.parametrize("label_shape, problem", [
    pytest.param((8, 8, 6), "label shape (8, 8, 6) does not match image shape (8, 8, 8) of {image}", id="shape"),
    pytest.param((8, 8, 8, 2), "label has 2 channels; expected one label map", id="channels"),
])
def test_a_label_of_another_shape_or_channel_layout_is_refused(tmp_path, label_shape, problem):
    image, label = _image_and_label(tmp_path, RAS_15, label_shape)
    with pytest.raises(DataError) as error:
        check_cases([{"image": image, "label": label}], in_channels=1, num_classes=2, check_values=False)
    assert str(error.value) == f"{label}: {problem.format(image=image)}"


def test_header_rounding_passes_and_channel_files_share_one_grid(tmp_path):
    rounded = RAS_15 + np.full((4, 4), 2e-5) * np.array([1, 1, 1, 0])[:, None]  # float32 / qform round-off
    image, label = _image_and_label(tmp_path, rounded)
    assert check_cases([{"image": image, "label": label}], in_channels=1, num_classes=2) != []
    second = tmp_path / "imagesTr" / "x_0001.nii.gz"
    nib.save(nib.Nifti1Image(_volume(1), np.diag([1.5, 1.5, 3.0, 1.0])), second)
    with pytest.raises(DataError) as error:
        check_cases([{"image": [image, str(second)], "label": label}], in_channels=2, check_values=False)
    assert str(error.value) == (f"{second}: geometry differs from the case's other channel {image} (this vs that): "
                                "spacing (1.5, 1.5, 3.0) vs (1.5, 1.5, 1.5) mm")


def test_two_dimensional_images_have_no_geometry_and_are_compared_by_shape(tmp_path):
    from PIL import Image

    image, label, small = tmp_path / "x.png", tmp_path / "x_label.png", tmp_path / "small_label.png"
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(image)
    Image.fromarray(np.ones((6, 5), np.uint8)).save(label)
    Image.fromarray(np.ones((6, 4), np.uint8)).save(small)
    assert check_cases([{"image": str(image), "label": str(label)}], 3, num_classes=2, spatial_dims=2) != []
    with pytest.raises(DataError, match=r"label shape \(6, 4\) does not match image shape \(6, 5\) of .*x.png"):
        check_cases([{"image": str(image), "label": str(small)}], 3, num_classes=2, spatial_dims=2)


# ---------------------------------------------------------------------------------- errors people can read
@pytest.mark.slow
def test_a_data_error_wrapped_by_monai_ends_in_its_own_message(tmp_path):
    file = _nifti(tmp_path / "slice.nii.gz", _volume(0, (8, 8)))
    script = textwrap.dedent(f"""
        from monai.bundle import ConfigParser
        parser = ConfigParser({{"imports": ["$import qtunet_monai.bundle as qtunet_bundle"],
                               "data": "$qtunet_bundle.check_cases([{{'image': {file!r}}}], 1)"}})
        parser.get_parsed_content("data")
        """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("QTUNET_MONAI_DEBUG", None)
    # the two processes (brief and debug) run side by side: each is mostly one core's interpreter start-up
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=e) for e in (env, {**env, "QTUNET_MONAI_DEBUG": "1"})]
    outputs = [p.communicate(timeout=300) for p in procs]
    brief, full = [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]
    assert brief.returncode == 1
    assert brief.stderr.strip().splitlines()[-1] == f"DataError: {file}: a 2-d image of shape (8, 8), but this " \
                                                    "bundle expects 3-d volumes (optionally with channels last)"
    assert "Traceback" not in brief.stderr and "QTUNET_MONAI_DEBUG=1" in brief.stderr
    assert full.returncode == 1
    assert "Traceback" in full.stderr and "Failed to evaluate" in full.stderr
    assert full.stderr.strip().splitlines()[-1] == brief.stderr.strip().splitlines()[-1]


# -------------------------------------------------------------------------------------- malicious checkpoints
def _malicious(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"weight": Payload()}, path)


def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    _malicious(tmp_path / "model.pt", marker)
    with pytest.raises(CheckpointError, match="refused by the weights-only loader.*system"):
        load_pretrained(torch.nn.Linear(1, 1), str(tmp_path / "model.pt"))
    network = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="cannot read the resume checkpoint .*model.pt: refused"):
        ResumeCheckpoint(str(tmp_path / "model.pt"), network, optimizer, resume=True).load(None)
    assert not marker.exists()


def test_monai_requirement_loads_bundle_checkpoints_weights_only():
    """MONAI 1.5.0's CheckpointLoader (evaluate.json, inference.json) used torch.load(weights_only=False);
    1.5.1 is the first release loading weights only."""
    requirements = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    monai = [r.replace(" ", "") for r in requirements if r.replace(" ", "").startswith("monai")]
    assert monai and monai[0].startswith("monai>=")
    minimum = tuple(int(p) for p in monai[0].split(">=")[1].split(",")[0].split("."))
    assert minimum >= (1, 5, 1), monai
