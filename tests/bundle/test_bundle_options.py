# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The bundles' training and inference options: flip TTA, fold ensembles, cross-validation
folds, baseline architectures, per-case inference time and ONNX export."""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, run
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer
from torch import nn

from qtunet_monai.bundle.architectures import BASELINES, DivisiblePadNet, build_network, nnunet_kernels_strides
from qtunet_monai.bundle.datalist import DataError
from qtunet_monai.bundle.folds import fold_assignment, load_fold, write_folds
from qtunet_monai.bundle.inference import FlipTTAInferer, FoldEnsemble, InferenceTimer, probabilities
from qtunet_monai.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"


class _FlipEquivariant(nn.Module):
    """Convolutions whose kernels are symmetric under every axis flip, zero padding and pointwise
    non-linearities: flipping the input flips the output, by construction."""

    def __init__(self, dims: int = 3, classes: int = 3) -> None:
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.layers = nn.Sequential(conv(1, 4, 3, padding=1), nn.GELU(), conv(4, classes, 3, padding=1))
        with torch.no_grad():
            for layer in self.layers[::2]:
                axes = range(2, 2 + dims)
                flips = [c for n in range(dims + 1) for c in itertools.combinations(axes, n)]
                layer.weight.copy_(sum(torch.flip(layer.weight, list(f)) for f in flips) / len(flips))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_flip_tta_of_a_flip_equivariant_network_equals_the_plain_prediction(sigmoid):
    torch.manual_seed(0)
    net = _FlipEquivariant().eval()
    x = MetaTensor(torch.randn(2, 1, 9, 8, 7), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    with torch.no_grad():
        plain = probabilities(net(x.as_subclass(torch.Tensor)), sigmoid)
        tta = FlipTTAInferer(SimpleInferer(), sigmoid=sigmoid)(x, net)
    torch.testing.assert_close(probabilities(tta, sigmoid).as_subclass(torch.Tensor), plain, atol=1e-5, rtol=1e-5)
    assert isinstance(tta, MetaTensor) and torch.equal(tta.affine, x.affine)  # Invertd still finds the geometry


def test_flip_tta_averages_eight_mirrored_predictions():
    """A network that is not flip-equivariant: TTA is the mean of the 8 flipped-back probabilities."""
    torch.manual_seed(0)
    net = nn.Conv3d(1, 2, 3, padding=1).eval()
    x = torch.randn(1, 1, 6, 5, 4)
    with torch.no_grad():
        expected = sum(torch.flip(torch.softmax(net(torch.flip(x, f)), 1), f)
                       for n in range(4) for f in itertools.combinations((2, 3, 4), n)) / 8
        got = torch.softmax(FlipTTAInferer(SimpleInferer())(x, net), 1)
        plain = torch.softmax(net(x), 1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert (got - plain).abs().max() > 1e-3


def test_fold_ensemble_averages_the_members_probabilities(tmp_path):
    torch.manual_seed(0)
    template = nn.Conv3d(1, 3, 1)
    members = [nn.Conv3d(1, 3, 1) for _ in range(3)]
    paths = []
    for k, m in enumerate(members):
        paths.append(str(tmp_path / f"fold{k}" / "model.pt"))
        (tmp_path / f"fold{k}").mkdir()
        torch.save(m.state_dict(), paths[-1])
    ensemble = FoldEnsemble(template, paths)
    x = torch.randn(2, 1, 4, 4, 4)
    with torch.no_grad():
        expected = sum(torch.softmax(m(x), 1) for m in members) / 3
        torch.testing.assert_close(torch.softmax(ensemble(x), 1), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="fold3"):
        FoldEnsemble(template, paths + [str(tmp_path / "fold3" / "model.pt")])


def _datalist(tmp_path, n=13):
    path = tmp_path / "datalist.json"
    cases = [{"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"} for i in range(n)]
    path.write_text(json.dumps({"training": cases, "validation": cases[:2], "testing": [{"image": "t.nii.gz"}]}))
    return path


def test_folds_are_disjoint_cover_the_training_set_and_are_reproducible(tmp_path):
    path = _datalist(tmp_path)
    folds = [load_fold(str(path), "validation", k, 5, seed=7) for k in range(5)]
    held_out = [c["image"] for fold in folds for c in fold]
    every = [str(tmp_path / c["image"]) for c in json.loads(path.read_text())["training"]]
    assert sorted(held_out) == sorted(every) and len(set(held_out)) == len(every)  # disjoint, covering
    assert sorted(len(f) for f in folds) == [2, 2, 3, 3, 3]
    for k in range(5):  # each fold trains on exactly the others
        train = {c["image"] for c in load_fold(str(path), "training", k, 5, seed=7)}
        assert train == set(every) - {c["image"] for c in folds[k]}
    written = json.loads(path.read_text())
    assert (written["num_folds"], written["fold_seed"]) == (5, 7)
    assert [c["fold"] for c in written["training"]] == fold_assignment(13, 5, 7)  # the seed alone decides
    assert fold_assignment(13, 5, 7) != fold_assignment(13, 5, 8)
    assert load_fold(str(path), "testing", 2, 5, seed=7)[0]["image"].endswith("t.nii.gz")
    assert len(load_fold(str(path), "validation", -1)) == 2  # no fold: the data list's own split
    with pytest.raises(DataError, match="split into 5 folds with seed 7"):
        write_folds(str(path), 5, seed=8)
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        load_fold(str(path), "training", 5, 5, seed=7)


def test_inference_timer_writes_a_time_per_case(tmp_path):
    from monai.handlers import MetricsSaver

    data = [{"image": MetaTensor(torch.randn(1, 1, 8, 8, 8), meta={"filename_or_obj": f"case{i}.nii.gz"})}
            for i in range(3)]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=nn.Conv3d(1, 2, 1),
                                    val_handlers=[InferenceTimer(),
                                                  MetricsSaver(str(tmp_path), metrics="*", metric_details="*",
                                                               batch_transform=lambda batch: [item["image"].meta for item in batch])])
    evaluator.run()
    rows = (tmp_path / "inference_time_raw.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert all(0.0 < float(r.split(",")[1]) < 10.0 for r in rows[1:])
    assert evaluator.state.metrics["inference_time"] > 0


def test_nnunet_kernels_and_strides_follow_the_roi_and_spacing():
    kernels, strides = nnunet_kernels_strides([56, 56, 56], [2.0, 2.0, 2.0])
    assert strides == [[1, 1, 1]] + [[2, 2, 2]] * 3 and kernels == [[3, 3, 3]] * 4  # 56 -> 28 -> 14 -> 7
    kernels, strides = nnunet_kernels_strides([128, 128, 32], [0.5, 0.5, 3.0])  # thick slices: in-plane first
    assert strides[1] == [2, 2, 1] and kernels[0] == [3, 3, 1]


def test_divisible_pad_net_crops_back_to_the_input_size():
    seen = []
    net = DivisiblePadNet(nn.Conv3d(1, 2, 1), 32, min_size=64)
    net.network.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[2:])))
    assert net(torch.randn(1, 1, 56, 33, 96)).shape == (1, 2, 56, 33, 96)
    assert seen == [(64, 64, 96)]


def test_build_network_keeps_the_thesis_architectures_and_refuses_unknown_ones():
    from qtunet_monai import QTUNet

    assert isinstance(build_network("VT-UNet", 1, 4, [32, 32, 32]), QTUNet)
    with pytest.raises(ValueError, match="unknown architecture 'nnFormer'"):
        build_network("nnFormer", 1, 4, [32, 32, 32])
    with pytest.raises(ValueError, match="SegResNet has no deep-supervision heads"):
        build_network("SegResNet", 1, 4, [32, 32, 32], deep_supervision=True)
    net = build_network("DynUNet", 1, 4, [32, 32, 32], deep_supervision=True).train()
    outputs = net(torch.randn(1, 1, 32, 32, 32))
    assert isinstance(outputs, list) and len(outputs) >= 2 and all(o.shape == (1, 4, 32, 32, 32) for o in outputs)


@pytest.mark.slow
def test_onnx_export_with_a_dynamic_spatial_size_equals_pytorch_at_two_sizes(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qtunet_monai.bundle.onnx_export import export_onnx

    torch.manual_seed(0)
    net = build_network("DynUNet", 1, 3, [16, 16, 16])  # 16 -> 8 -> 4: two levels, a quick export
    report = export_onnx(net.network, str(tmp_path / "model.onnx"), [1, 1, 16, 16, 16],
                         check_shapes=[[2, 1, 24, 16, 32]])
    assert report["dynamic_spatial_size"] and len(report["max_abs_difference"]) == 2
    assert max(report["max_abs_difference"].values()) <= 1e-4
    assert json.loads((tmp_path / "model.json").read_text()) == report


def test_qtunet_refuses_a_dynamic_onnx_export_and_further_check_shapes(tmp_path):
    """QT-UNet's window geometry is computed from Python integers, so its graph is valid at one size: a dynamic
    export, or checks at other sizes, are refused before anything is exported (see bundle.onnx_export)."""
    from qtunet_monai import QTUNet
    from qtunet_monai.bundle.onnx_export import export_onnx

    net = QTUNet(1, 3, spatial_dims=2, feature_size=12)
    with pytest.raises(ValueError, match="cannot be exported with a dynamic spatial size"):
        export_onnx(net, str(tmp_path / "dynamic.onnx"), [1, 1, 56, 56], dynamic=True)
    with pytest.raises(ValueError, match="fixed-size ONNX model only takes its example shape"):
        export_onnx(net, str(tmp_path / "model.onnx"), [1, 1, 56, 56], check_shapes=[[1, 1, 28, 28]])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_qtunet_onnx_export_is_fixed_size_and_equals_pytorch(tmp_path):
    """Exported at the ROI, onnxruntime computes what PyTorch does (refusals: the test above)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from qtunet_monai import QTUNet
    from qtunet_monai.bundle.onnx_export import export_onnx

    torch.manual_seed(0)
    net = QTUNet(1, 3, spatial_dims=2, feature_size=12)
    report = export_onnx(net, str(tmp_path / "model.onnx"), [1, 1, 56, 56])  # about a minute: one size only
    assert not report["dynamic_spatial_size"] and max(report["max_abs_difference"].values()) <= 1e-4
    assert {m.attention_backend for m in net.modules() if hasattr(m, "attention_backend")} == {"sdpa"}  # restored


def _parsed(config_file: Path, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update({"bundle_root": str(config_file.parents[1]), **overrides})
    return parser


def test_generated_options_default_to_the_thesis_recipe():
    for task in TASKS.values():
        if task.pretraining_only:
            continue
        configs = REPO / "bundles" / task.bundle / "configs"
        for name in ("train.json", "inference.json"):
            config = json.loads((configs / name).read_text())
            assert (config["tta"], config["keep_largest"], config["sw_mode"], config["fold"]) == (
                False, False, "constant", -1), (task.bundle, name)
            assert config["network_def"]["_target_"] == "qtunet_monai.bundle.build_network"
        assert (configs / "inference_ensemble.json").is_file() and (configs / "export_onnx.json").is_file()


def test_keep_largest_removes_a_planted_island():
    """--keep_largest True adds MONAI's KeepLargestConnectedComponentd to the saved label map, per class."""
    def keep_largest_steps(**overrides):
        post = _parsed(DEMO / "configs" / "inference.json", **overrides).get_parsed_content("postprocessing")
        return [t for t in post.transforms if type(t).__name__ == "KeepLargestConnectedComponentd"]

    assert keep_largest_steps() == []  # off by default: the thesis' pipeline
    (step,) = keep_largest_steps(keep_largest=True)
    label = torch.zeros(1, 12, 12, 12)
    label[0, 1:6, 1:6, 1:6] = 2  # grey matter
    label[0, 9:11, 9:11, 9:11] = 2  # a planted grey-matter island
    label[0, 7:9, 1:4, 1:4] = 3  # white matter: one component, kept
    out = step({"pred": label.clone()})["pred"]
    assert (out[0, 9:11, 9:11, 9:11] == 0).all() and (out[0, 1:6, 1:6, 1:6] == 2).all()
    assert (out[0, 7:9, 1:4, 1:4] == 3).all()
    (only_csf,) = keep_largest_steps(keep_largest=True, keep_largest_labels=[1])  # classes configurable
    assert torch.equal(only_csf({"pred": label.clone()})["pred"], label)


@pytest.fixture
def spleen_bundle(task_bundle):
    """The MSD spleen bundle with 4 fake training cases and 1 validation case."""
    return task_bundle("msd_spleen")


# SwinUNETR (padded to 64^3 at least) and UNETR (ViT-B) are heavy on a CPU in 3D: they run on the 2D CityScapes
# bundle (void class, 2D transforms), the CNN baselines on a 3D one.
BASELINE_TASKS = {"SwinUNETR": "cityscapes", "UNETR": "cityscapes", "SegResNet": "msd_spleen",
                  "DynUNet": "msd_spleen"}


@pytest.mark.slow
@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_trains_and_infers_through_the_bundle_configs(name, task_bundle):
    """--architecture X changes the network only: train one epoch, evaluate and infer with the same configs,
    at an ROI that SwinUNETR and UNETR (and SegResNet in 3D) only take padded."""
    bundle = task_bundle(BASELINE_TASKS[name])
    dims = 2 if BASELINE_TASKS[name] == "cityscapes" else 3
    over = {"roi_size": [48] * dims if dims == 2 else [20] * dims, "num_workers": 0, "architecture": name}
    run(config_file="configs/train.json", max_epochs=1, val_interval=1, **over)
    state = torch.load("models/model.pt", weights_only=True)
    assert all(k.startswith("network.") for k in state)  # the MONAI network inside its padding wrapper
    run(config_file=["configs/train.json", "configs/evaluate.json"], **over)
    times = (bundle / "eval" / "inference_time_raw.csv").read_text().splitlines()
    assert len(times) == 1 + len(json.loads((bundle / "data" / "datalist.json").read_text())["validation"])
    shutil.rmtree("eval")
    run(config_file="configs/inference.json", **{k: v for k, v in over.items() if k != "num_workers"})
    assert len(list((bundle / "eval").glob("*_seg.*"))) == 1
    if name == "DynUNet" and importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        # the bundle's ONNX command on the trained checkpoint (a quick export: DynUNet at 20^3)
        run(config_file=["configs/inference.json", "configs/export_onnx.json"],
            **{k: v for k, v in over.items() if k != "num_workers"})
        report = json.loads((bundle / "models" / "model.json").read_text())
        assert (bundle / "models" / "model.onnx").stat().st_size > 0
        assert max(report["max_abs_difference"].values()) <= 1e-4


@pytest.mark.slow
def test_folds_tta_keep_largest_and_the_fold_ensemble_through_the_bundle_configs(spleen_bundle):
    # 2 mm voxels (the bundle's 1 mm resamples the fake 5 mm slices into a long volume): the TTA evaluation's
    # 8 flips and the ensemble slide over 1/8 of the voxels
    over = {"roi_size": [32, 32, 32], "pixdim": [2.0, 2.0, 2.0], "num_workers": 0, "num_folds": 2}
    for fold in (0, 1):
        run(config_file="configs/train.json", max_epochs=1, val_interval=1, fold=fold, **over)
        assert (spleen_bundle / "models" / f"fold{fold}" / "model.pt").is_file()
    datalist = json.loads((spleen_bundle / "data" / "datalist.json").read_text())
    assert sorted(c["fold"] for c in datalist["training"]) == [0, 0, 1, 1] and datalist["num_folds"] == 2
    run(config_file=["configs/train.json", "configs/evaluate.json"], fold=0, tta=True, keep_largest=True,
        sw_mode="gaussian", **over)
    scored = (spleen_bundle / "eval" / "val_mean_dice_raw.csv").read_text().splitlines()[1:]
    assert len(scored) == 2  # fold 0's held-out cases: cross-validation
    shutil.rmtree("eval")
    inference = {k: v for k, v in over.items() if k != "num_workers"}
    run(config_file=["configs/inference.json", "configs/inference_ensemble.json"], keep_largest=True, **inference)
    assert len(list((spleen_bundle / "eval").glob("*_seg.nii.gz"))) == 1


def test_deep_supervision_loss_equals_the_plain_loss_when_the_auxiliary_weights_are_zero():
    """--deep_supervision True: MONAI's DeepSupervisionLoss over QT-UNet's outputs, weights halving, labels
    shrunk nearest-exact; with the auxiliary weights at zero it is the plain loss of the main output."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    parser = _parsed(DEMO / "configs" / "train.json", preset="thesis", deep_supervision=True)
    net, loss, plain = (parser.get_parsed_content(k) for k in ("network_def", "training_loss", "loss"))
    x = torch.randn(1, 1, 56, 56, 56)
    label = torch.randint(0, 4, (1, 1, 56, 56, 56)).float()
    outputs = net.train()(x)
    assert isinstance(outputs, list) and len(outputs) == 3 and outputs[0].shape == (1, 4, 56, 56, 56)
    assert loss.get_weights(len(outputs)) == [1.0, 0.5, 0.25]
    with torch.no_grad():
        loss.weights = [1.0, 0.0, 0.0]
        torch.testing.assert_close(loss(outputs, label), plain(outputs[0], label))
        loss.weights = None
        expected = sum(w * plain(o, F.interpolate(label, size=o.shape[2:], mode="nearest-exact"))
                       for w, o in zip([1.0, 0.5, 0.25], outputs))
        torch.testing.assert_close(loss(outputs, label), expected)
        assert net.eval()(x).shape == (1, 4, 56, 56, 56)  # inference: the main output only
    default = _parsed(DEMO / "configs" / "train.json")
    assert default.get_parsed_content("training_loss") is default.get_parsed_content("loss")  # the presets' loss


def test_num_stages_and_patch_size_are_bundle_overrides():
    parser = _parsed(DEMO / "configs" / "inference.json", preset="thesis", num_stages=4, patch_size=2)
    net = parser.get_parsed_content("network_def")
    assert (net.num_stages, net.patch_size) == (4, 2)
    with pytest.raises(ValueError, match="SegResNet has no QT-UNet"):
        build_network("SegResNet", 1, 4, [56, 56, 56], num_stages=4, patch_size=4)
