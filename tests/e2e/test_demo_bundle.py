# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The demo bundle end to end on its real (shipped) data: MONAI's bundle checks, training,
evaluation, inference, torchrun with gloo, and resuming a killed run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qtunet_monai.bundle.presets import network_options

pytest.importorskip("nilearn")
pytestmark = pytest.mark.slow  # the demo bundle end to end, in subprocesses

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"
#: training overrides that keep the default network but cut its cost: one 32^3 crop per case instead of two
#: 56^3 ones (32 is the smallest ROI the network's 4 x 2^3 downsampling takes)
SMALL_CROPS = ("--roi_size", "[32,32,32]", "--num_samples", "1")
#: and 4 mm voxels: the sliding-window validation, evaluation and inference see 1/8 of the voxels
#: (inference's Invertd still writes the prediction on the 2 mm input grid)
SMALL_RUN = (*SMALL_CROPS, "--pixdim", "[4.0,4.0,4.0]")


def _run(args, cwd, timeout=900, check=True, extra_env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and done.returncode != 0:
        # a torchrun child's own fatal lines ("terminate called ...", "what(): ...") sit above torchrun's
        # summary and the other rank's log, often beyond the tail: name them first
        fatal = [line for line in done.stderr.splitlines() if any(k in line for k in ("terminate", "what()", "Error:"))]
        raise AssertionError(f"{' '.join(map(str, args))} failed:\nfatal lines: {fatal[-20:]}\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def _bundle_run(bundle, configs, *overrides, **kwargs):
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    return _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *overrides], bundle, **kwargs)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from qtunet_monai.data.demo import prepare_demo

    folder = tmp_path_factory.mktemp("demo_data")
    prepare_demo(folder, num_train=2, num_val=2)
    return folder


@pytest.fixture
def bundle(tmp_path, demo_data):
    """A fresh copy of the demo bundle with the prepared data in its data/ folder."""
    root = tmp_path / BUNDLE.name
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("data", "models", "eval"))
    shutil.copytree(demo_data, root / "data")
    return root


def test_prepared_data_is_in_decathlon_layout(demo_data):
    dataset = json.loads((demo_data / "dataset.json").read_text())
    assert dataset["labels"] == {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
    assert len(dataset["training"]) == 4
    datalist = json.loads((demo_data / "datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [2, 2, 1]
    image = nib.load(demo_data / datalist["training"][0]["image"])
    label = np.asarray(nib.load(demo_data / datalist["training"][0]["label"]).dataobj)
    assert image.shape == label.shape and np.allclose(image.header.get_zooms(), 2.0)
    assert set(np.unique(label)) == {0, 1, 2, 3}
    # a deformed case differs from the template
    template = np.asarray(nib.load(demo_data / "labelsTs" / "brain_template.nii.gz").dataobj)
    assert (template != label).mean() > 0.01


def test_monai_bundle_checks(bundle):
    _run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
          "configs/metadata.json", "--config_file", "configs/inference.json", "--device", "cpu"], bundle)
    (bundle / "models").mkdir()
    from qtunet_monai import QTUNet

    net = QTUNet(1, 4, **network_options("accurate")).eval()
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    _run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts",
          "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file",
          "configs/inference.json", "--use_trace", "True", "--input_shape", "[1,1,32,32,32]"], bundle)
    x = torch.randn(1, 1, 32, 32, 32)  # the traced size (verify_net_in_out above ran the metadata's 56^3)
    with torch.no_grad():
        exported = torch.jit.load(bundle / "models" / "model.ts")(x)
        assert exported.shape == (1, 4, 32, 32, 32)
        torch.testing.assert_close(exported, net(x))  # the traced graph computes the checkpoint's network


def test_train_evaluate_infer_end_to_end(bundle, demo_data):
    _bundle_run(bundle, ["train.json"], "--max_epochs", "2", "--val_interval", "1", *SMALL_RUN)
    model = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert "detail_path.classifier.conv.conv.weight" in model  # a plain state dict (the accurate preset's network)
    resume = torch.load(bundle / "models" / "resume.pt", weights_only=True)
    assert resume["epoch"] == 2 and {"model", "optimizer", "lr_scheduler"} <= set(resume)
    assert resume["best_metric_epoch"] in (1, 2) and 0.0 <= resume["best_metric"] <= 1.0  # kept across a resume
    assert list((bundle / "eval").glob("events.out.tfevents.*")), "no TensorBoard log"

    _bundle_run(bundle, ["train.json", "evaluate.json"])  # the ROI and spacing come from the stored settings
    summary = (bundle / "eval" / "val_mean_dice_raw.csv").read_text()
    assert "brain_template" in summary

    (bundle / "eval" / "brain_template_seg.nii.gz").unlink()
    _bundle_run(bundle, ["inference.json"])
    prediction = nib.load(bundle / "eval" / "brain_template_seg.nii.gz")
    source = nib.load(demo_data / "imagesTs" / "brain_template.nii.gz")
    assert prediction.shape == source.shape
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-4)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2, 3}

    from qtunet_monai.cli import demo_report

    demo_report(str(bundle))
    scores = json.loads((bundle / "eval" / "demo_report.json").read_text())
    assert set(scores) == {"CSF", "grey matter", "white matter", "mean"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert (bundle / "eval" / "demo_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --device cpu: gloo on the CPU, so that two processes also run on a machine with one GPU
def test_multi_gpu_config_runs_under_torchrun_with_gloo(bundle):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
          "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
          "--max_epochs", "1", "--val_interval", "1", *SMALL_RUN, "--device", "cpu"], bundle)
    assert torch.load(bundle / "models" / "resume.pt", weights_only=True)["epoch"] == 1
    assert (bundle / "models" / "model.pt").is_file()


def test_pretrain_config_runs_under_torchrun_with_gloo(bundle):
    done = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                 "-m", "monai.bundle", "run", "--config_file",
                 "['configs/pretrain.json','configs/multi_gpu_pretrain.json']", "--max_epochs", "1",
                 "--roi_size", "[32,32,32]", "--batch_size", "1", "--accumulation_steps", "1", "--device", "cpu"],
                bundle)
    assert torch.load(bundle / "models" / "pretrain_resume.pt", weights_only=True)["epoch"] == 1
    encoder = torch.load(bundle / "models" / "pretrained.pt", weights_only=True)
    assert "bottleneck_norm.weight" in encoder
    # one of the two training images is held out: its losses are logged (rank 0)
    log = done.stdout + done.stderr
    assert "val_loss_reconstruction" in log and "val_loss_byol" in log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_pick_their_gpu_by_local_rank(bundle, tmp_path):
    """Two torchrun agents, --nnodes 2 with node ranks 0 and 1 and one process each, on 127.0.0.1 with gloo
    on the CPU: both ranks train one epoch, and each resolves its GPU as cuda:<LOCAL_RANK> = cuda:0 (by the
    global rank, the second node would ask for cuda:1)."""
    probe = tmp_path / "probe.json"
    # after training, each process prints its global and local rank, its resolved GPU and device, its epochs
    report = ("$print('PROBE', dist.get_rank(), qtunet_bundle.local_rank(), @gpu_device, @device, "
              "@train#trainer.state.epoch, flush=True)")
    probe.write_text(json.dumps({"run": ["$@train#trainer.run()", report]}))
    configs = f"['configs/train.json','configs/multi_gpu_train.json','{probe}']"
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "monai.bundle", "run", "--config_file", configs,
         "--max_epochs", "1", "--val_interval", "2", *SMALL_CROPS, "--device", "cpu"],  # validation: the test above
        cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for node in (0, 1)]
    outputs = [agent.communicate(timeout=900)[0] for agent in agents]
    for node, (agent, out) in enumerate(zip(agents, outputs)):
        assert agent.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
        assert f"PROBE {node} 0 cuda:0 cpu 1" in out, out[-2000:]  # rank, local rank, GPU, device, epochs
    assert torch.load(bundle / "models" / "resume.pt", weights_only=True)["epoch"] == 1


def test_killed_training_resumes_from_the_saved_epoch(bundle):
    files = "['configs/train.json']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--max_epochs", "4",
           "--val_interval", "10", *SMALL_CROPS]
    proc = subprocess.Popen(cmd, cwd=bundle, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = bundle / "models" / "resume.pt"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # killed without warning, mid-run
    proc.wait()
    saved = torch.load(checkpoint, weights_only=True)
    assert 1 <= saved["epoch"] < 4, "the run finished before it could be killed"

    done = _bundle_run(bundle, ["train.json"], "--max_epochs", "4", "--val_interval", "10", "--resume", "True",
                       *SMALL_CROPS)
    log = done.stdout + done.stderr
    assert "resumed from" in log
    epochs = sorted({int(line.split("Epoch: ")[1].split("/")[0]) for line in log.splitlines() if "Epoch: " in line})
    assert epochs[0] == saved["epoch"] + 1 and epochs[-1] == 4, epochs
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 4


#: damage -> the message that names it. Three of them run `monai.bundle run` (a file-level error, a voxel-level
#: one, and inf with the check off, which only the loss guard inside training can stop); the rest check the
#: same train.json expression in-process (test_train_json_data_check_names_each_bad_file), since the
#: subprocess adds nothing to what the check says about them.
BAD_DATA = {
    "empty": "has no 'training' cases",
    "missing_label": "file not found",
    "label_out_of_range": "label values [7] are outside the task's classes [0, 1, 2, 3]",
    "nan_image": "image contains NaN or infinite intensities",
    "two_channels": "2 image channel(s), but the network expects 1",
    "shape_mismatch": "does not match image shape",
    "not_nifti": "unreadable",
    "two_d_image": "a 2-d image of shape",
    "extreme_intensity": "intensities up to 3e+38 exceed the limit of 1e+06",
    "inf_unchecked": "the loss became nan at iteration",  # headers only: the loss guard stops it
}
BAD_DATA_IN_SUBPROCESS = ("missing_label", "nan_image", "inf_unchecked")


def _damage(bundle: Path, damage: str) -> Path:
    """Damage the first training case of ``bundle``'s data list as ``damage`` says; returns the bad file."""
    datalist_file = bundle / "data" / "datalist.json"
    datalist = json.loads(datalist_file.read_text())
    case = datalist["training"][0]
    image_path, label_path = bundle / "data" / case["image"], bundle / "data" / case["label"]
    image = nib.load(image_path)
    bad = label_path if damage in ("missing_label", "label_out_of_range", "shape_mismatch") else image_path
    if damage == "empty":
        datalist["training"] = []
        datalist_file.write_text(json.dumps(datalist))
    elif damage == "missing_label":
        label_path.unlink()
    elif damage == "label_out_of_range":
        label = np.asarray(nib.load(label_path).dataobj).copy()
        label[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(label, image.affine), label_path)
    elif damage == "nan_image":
        data = np.asarray(image.dataobj).copy()
        data[5, 5, 5] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), image_path)
    elif damage == "two_channels":
        data = np.asarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.stack([data, data], -1), image.affine), image_path)
    elif damage == "shape_mismatch":
        label = np.asarray(nib.load(label_path).dataobj)[:-3]
        nib.save(nib.Nifti1Image(label, image.affine), label_path)
    elif damage == "not_nifti":
        image_path.write_bytes(b"this is not an image")
    elif damage == "two_d_image":
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, :, 20], image.affine), image_path)
    elif damage in ("extreme_intensity", "inf_unchecked"):  # 3e38 is finite, but float32 statistics overflow
        data = np.asarray(image.dataobj).astype(np.float32)
        data[30, 30, 30] = 3e38 if damage == "extreme_intensity" else np.inf
        nib.save(nib.Nifti1Image(data, image.affine), image_path)
    return bad


@pytest.mark.parametrize("damage", BAD_DATA_IN_SUBPROCESS)
def test_bad_data_stops_before_training_and_names_the_file(bundle, damage):
    message = BAD_DATA[damage]
    bad = _damage(bundle, damage)
    overrides = ["--check_data", "False"] if damage == "inf_unchecked" else []
    done = _bundle_run(bundle, ["train.json"], "--max_epochs", "1", *overrides, check=False)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]  # the project's own message, not MONAI's wrapper
    assert message in last and "Failed to evaluate" not in last, done.stderr[-3000:]
    if damage != "empty":
        assert str(bad.resolve()) in last
    assert "Traceback" not in done.stderr and "QTUNET_MONAI_DEBUG=1" in done.stderr
    assert not (bundle / "models" / "resume.pt").exists(), "a checkpoint was written despite bad data"
    assert not (bundle / "models" / "model.pt").exists()


@pytest.mark.parametrize("damage", [d for d in BAD_DATA if d not in BAD_DATA_IN_SUBPROCESS])
def test_train_json_data_check_names_each_bad_file(bundle, damage):
    """train.json's own data check (the expression `monai.bundle run` evaluates before training) raises the
    project's DataError naming the bad file; the subprocess cases above show that this error ends the run."""
    from monai.bundle import ConfigParser

    from qtunet_monai.bundle.errors import DataError, find_cause

    bad = _damage(bundle, damage)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle)})
    with pytest.raises(Exception) as error:  # MONAI wraps it ("Failed to evaluate ...")
        parser.get_parsed_content("train#dataset#data")
    cause = find_cause(error.value, DataError)
    assert cause is not None, error.value
    assert BAD_DATA[damage] in str(cause)
    if damage != "empty":
        assert str(bad.resolve()) in str(cause)


def _testing_list(bundle, images) -> str:
    return "[" + ",".join(f"{{'image': '{image}'}}" for image in images) + "]"


def _random_model(bundle, folder="models"):
    from qtunet_monai import QTUNet

    (bundle / folder).mkdir(exist_ok=True)
    torch.manual_seed(0)
    torch.save(QTUNet(1, 4, **network_options("accurate")).state_dict(), bundle / folder / "model.pt")


def test_bad_inference_inputs_stop_before_inference_naming_each_file(bundle):
    """NaN, a 2-D image, a truncated file and two inputs that would write one prediction name, at once."""
    _random_model(bundle)
    source = bundle / "data" / json.loads((bundle / "data" / "datalist.json").read_text())["testing"][0]["image"]
    image = nib.load(source)
    data = np.asarray(image.dataobj).astype(np.float32)
    bad = bundle / "bad"
    (bad / "a").mkdir(parents=True)
    (bad / "b").mkdir()
    nan = data.copy()
    nan[30, 30, 30] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), bad / "nan.nii.gz")
    nib.save(nib.Nifti1Image(data[:, :, 20], image.affine), bad / "slice.nii.gz")
    shutil.copy(source, bad / "truncated.nii.gz")
    (bad / "truncated.nii.gz").write_bytes((bad / "truncated.nii.gz").read_bytes()[:5000])
    shutil.copy(source, bad / "a" / "case.nii.gz")
    shutil.copy(source, bad / "b" / "case.nii.gz")
    files = [bad / n for n in ("nan.nii.gz", "slice.nii.gz", "truncated.nii.gz", "a/case.nii.gz", "b/case.nii.gz")]
    done = _bundle_run(bundle, ["inference.json"], "--datalist", _testing_list(bundle, files), check=False)
    assert done.returncode != 0
    problems = [line.strip() for line in done.stderr.splitlines()[-4:]]
    assert problems[0].startswith(f"{files[0]}: image contains NaN"), done.stderr[-3000:]
    assert problems[1].startswith(f"{files[1]}: a 2-d image")
    assert problems[2].startswith(f"{files[2]}: unreadable")
    assert problems[3].startswith(f"{files[4]}: its prediction would overwrite that of {files[3]}")
    assert not list((bundle / "eval").glob("*_seg.nii.gz")) if (bundle / "eval").exists() else True


def test_inference_can_skip_bad_cases_and_honours_ckpt_dir(bundle):
    _random_model(bundle, "elsewhere")  # not models/: inference must load --ckpt_dir's model.pt
    source = bundle / "data" / json.loads((bundle / "data" / "datalist.json").read_text())["testing"][0]["image"]
    image = nib.load(source)
    nan = np.asarray(image.dataobj).astype(np.float32)
    nan[30, 30, 30] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), bundle / "nan.nii.gz")
    done = _bundle_run(bundle, ["inference.json"], "--datalist", _testing_list(bundle, [source, bundle / "nan.nii.gz"]),
                       "--ckpt_dir", str(bundle / "elsewhere"), "--skip_bad_cases", "True")
    assert f"{bundle / 'nan.nii.gz'}: image contains NaN" in done.stdout + done.stderr
    written = sorted(p.name for p in (bundle / "eval").iterdir() if not p.name.startswith("events"))
    assert written == [source.name.replace(".nii.gz", "_seg.nii.gz")]  # atomic writes leave no temporaries
    assert nib.load(bundle / "eval" / written[0]).shape == image.shape


@pytest.mark.parametrize("configs", [["inference.json"], ["train.json", "evaluate.json"]])
def test_a_pickled_payload_in_model_pt_is_refused(bundle, tmp_path, configs):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (bundle / "models").mkdir()
    torch.save({"model": Payload()}, bundle / "models" / "model.pt")
    done = _bundle_run(bundle, configs, check=False)
    assert done.returncode != 0
    assert "Weights only load failed" in done.stderr or "weights-only" in done.stderr, done.stderr[-3000:]
    assert not marker.exists(), "the checkpoint's code ran"


def test_training_cases_are_skull_stripped_like_the_test_case(demo_data):
    """Background exactly 0 in every case, as in the template: non-zero normalisation then treats
    training and test images alike."""
    datalist = json.loads((demo_data / "datalist.json").read_text())
    for case in datalist["training"] + datalist["testing"]:
        image = np.asarray(nib.load(demo_data / case["image"]).dataobj)
        label = np.asarray(nib.load(demo_data / case["label"]).dataobj)
        assert (image[label == 0] == 0).all()
        assert (image[label > 0] > 0).mean() > 0.95
