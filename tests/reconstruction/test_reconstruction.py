# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""MRI reconstruction: simulated k-space, fastMRI files through MONAI's reader and ours,
the metrics against direct formulas, bad input, and the bundle end to end on tiny demo data it writes."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qtunet_monai.bundle import DataError
from qtunet_monai.reconstruction import (
    FastMRISSIMMetric,
    NMSEMetric,
    build_recon_network,
    check_kspace_cases,
    nmse,
    psnr,
    simulate_kspace,
    smooth_phase,
    ssim,
    zero_filled,
)

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "qtunet_demo_mri_reconstruction"
GENERATOR = REPO / "tools" / "generate_reconstruction_bundle.py"
_spec = importlib.util.spec_from_file_location("generate_reconstruction_bundle", GENERATOR)
generator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generator)

needs_h5py = pytest.mark.skipif(importlib.util.find_spec("h5py") is None, reason="h5py (the reconstruction extra)")
needs_demo = pytest.mark.skipif(importlib.util.find_spec("h5py") is None or importlib.util.find_spec("nilearn") is None,
                                reason="h5py and nilearn (the reconstruction and demo extras)")
TINY = {"num_train": 2, "num_val": 2, "spacing": 6.0, "size": 32, "max_slices": 4}


def _image(shape=(3, 24, 20), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 1.0, shape).astype(np.float32)


def _write(path, kspace, target=None, target_key="reconstruction_rss", **attrs):
    from qtunet_monai.reconstruction import write_fastmri_h5

    return write_fastmri_h5(path, kspace, target, target_key, attrs or {"max": 1.0})


# ------------------------------------------------------------------------------------------------ k-space
def test_simulated_kspace_inverts_back_with_a_mask_of_ones():
    """MONAI's inverse (ifftn_centered, |.|, root-sum-of-squares over the coil) of the simulated k-space,
    fully sampled, is the image: with and without the phase (the magnitude is the phase's invariant)."""
    from monai.apps.reconstruction.complex_utils import complex_abs
    from monai.apps.reconstruction.mri_utils import root_sum_of_squares
    from monai.data.fft_utils import ifftn_centered

    image = _image()
    rng = np.random.default_rng(1)
    for phase in (None, smooth_phase(image.shape, rng)):
        kspace = simulate_kspace(image, phase)[:, None]  # (slices, coil, rows, columns)
        assert kspace.dtype == np.complex64 and kspace.shape == (3, 1, 24, 20)
        ones = torch.ones(1, 1, 1, 20, 1)
        back = root_sum_of_squares(complex_abs(ifftn_centered(ones * torch.view_as_real(torch.from_numpy(kspace)),
                                                              spatial_dims=2, is_complex=True)), spatial_dim=-3)
        np.testing.assert_allclose(back.numpy(), image, atol=1e-5)
        np.testing.assert_allclose(zero_filled(kspace), image, atol=1e-5)
    # a magnitude image's k-space is Hermitian (k(-x) = conj k(x)); with the phase it is not
    flip = lambda k: np.conj(np.roll(k[..., ::-1, ::-1], (1, 1), axis=(-2, -1)))
    real = simulate_kspace(image)
    assert np.abs(real - flip(real)).max() < 1e-4 * np.abs(real).max()
    assert np.abs(simulate_kspace(image, phase) - flip(simulate_kspace(image, phase))).max() > 0.1 * np.abs(real).max()
    phase = smooth_phase((4, 16, 16), np.random.default_rng(2))
    assert np.abs(phase).max() <= np.pi + 1e-6 and np.abs(phase).max() >= np.pi / 2 - 1e-6
    noisy = simulate_kspace(image, None, noise_std=0.05, rng=np.random.default_rng(3))
    assert 0.04 < np.std((noisy - real).real) < 0.06 and 0.04 < np.std((noisy - real).imag) < 0.06


@needs_h5py
def test_fastmri_layout_round_trips_through_monai_reader(tmp_path):
    """A file written in fastMRI's layout reads back unchanged through MONAI's FastMRIReader, and MONAI's
    4x equispaced mask (centre fraction 0.08) samples its columns over the singleton coil axis."""
    from monai.apps.reconstruction.fastmri_reader import FastMRIReader
    from monai.apps.reconstruction.transforms.dictionary import EquispacedKspaceMaskd, ExtractDataKeyFromMetaKeyd
    from monai.transforms import LoadImaged

    image = _image((3, 24, 40))
    kspace = simulate_kspace(image, smooth_phase(image.shape, np.random.default_rng(0)))[:, None]
    path = _write(tmp_path / "vol.h5", kspace, image, max=float(image.max()), norm=float(np.linalg.norm(image)),
                  acquisition="AXT1", patient_id="p1")
    assert not list(tmp_path.glob(".*tmp*")), "a temporary file was left behind"
    item = LoadImaged("kspace", reader=FastMRIReader, image_only=False, dtype=np.complex64)({"kspace": str(path)})
    item = ExtractDataKeyFromMetaKeyd("reconstruction_rss", meta_key="kspace_meta_dict")(item)
    np.testing.assert_array_equal(np.asarray(item["kspace"]), kspace)
    np.testing.assert_array_equal(item["reconstruction_rss"], image)
    meta = item["kspace_meta_dict"]
    assert meta["acquisition"] == "AXT1" and meta["patient_id"] == "p1" and meta["max"] == pytest.approx(image.max())
    masked = EquispacedKspaceMaskd("kspace", center_fractions=[0.08], accelerations=[4])(item)
    assert masked["kspace_masked_ifft"].shape == (3, 24, 40)  # the RSS went over the coil, not the slices
    assert float(masked["mask"].sum()) == pytest.approx(40 / 4, abs=1)


@needs_h5py
def test_single_coil_reader_keeps_the_target_and_adds_the_coil_axis(tmp_path):
    """fastMRI single-coil knee: k-space (slices, rows, columns), target reconstruction_esc cropped. MONAI's
    reader drops the target; ours keeps it, adds the coil axis, and the bundle's chain packs a volume."""
    from monai.apps.reconstruction.fastmri_reader import FastMRIReader
    from monai.transforms import LoadImaged

    from qtunet_monai.pipeline import instantiate
    from qtunet_monai.reconstruction import FastMRIVolumeReader, pipeline

    image = _image((2, 32, 24))
    kspace = simulate_kspace(image)  # no coil axis
    target = image[:, 8:24, 4:20]  # the knee's centre crop (640 x 368 k-space, 320 x 320 target)
    path = _write(tmp_path / "knee.h5", kspace, target, "reconstruction_esc")
    monai_item = LoadImaged("kspace", reader=FastMRIReader, image_only=False, dtype=np.complex64)({"kspace": str(path)})
    assert "reconstruction_esc" not in monai_item["kspace_meta_dict"]  # why the subclass exists
    data, meta = FastMRIVolumeReader().get_data(FastMRIVolumeReader().read(str(path)))
    assert data.shape == (2, 1, 32, 24) and meta["reconstruction_esc"].shape == (2, 16, 16)
    assert "mask" not in meta

    chain = {"_target_": "Compose", "transforms": pipeline.load(True) + pipeline.undersample(random=False)
             + pipeline.image_transforms(True)}
    transform = instantiate(chain, target_key="reconstruction_esc", mask_type="random", center_fractions=[0.08],
                            accelerations=[4], mask_seed=0, clip=6.0)
    item = transform({"kspace": str(path)})
    assert set(item) == {"image", "label", "zero_filled", "target", "mean", "std"}
    assert item["image"].shape == item["label"].shape == (1, 2, 16, 16) and item["mean"].shape == (2,)
    np.testing.assert_allclose(item["target"][0].numpy(), target)
    assert item["image"].meta["filename_or_obj"] == str(path)
    again = transform({"kspace": str(path)})  # the mask is seeded by the file name
    torch.testing.assert_close(again["image"], item["image"])
    # the normalised target comes back to magnitudes (ReconstructionOutputd, the evaluator's post-processing)
    from qtunet_monai.reconstruction import ReconstructionOutputd

    out = ReconstructionOutputd()({**item, "pred": item["label"].clone()})
    np.testing.assert_allclose(out["recon"][0].numpy(), target, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["pred"].numpy(), (target / target.max()), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_agree_with_direct_formulas():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 2, (2, 3, 16, 12)).astype(np.float32)
    pred = (target + rng.normal(0, 0.2, target.shape)).astype(np.float32)
    x, y = torch.from_numpy(pred), torch.from_numpy(target)
    for b in range(2):
        t, p = target[b].astype(np.float64), pred[b].astype(np.float64)
        assert float(nmse(x, y)[b]) == pytest.approx(np.sum((t - p) ** 2) / np.sum(t**2), rel=1e-5)
        assert float(psnr(x, y)[b]) == pytest.approx(10 * np.log10(t.max() ** 2 / np.mean((t - p) ** 2)), rel=1e-5)
        # SSIM by its definition: 7 x 7 windows, sample (co)variances, constants (0.01 L)^2 and (0.03 L)^2, L the
        # volume's target maximum; the mean over every window inside each slice, then over the slices
        L, values = t.max(), []
        for s in range(3):
            for i in range(16 - 6):
                for j in range(12 - 6):
                    a, c = p[s, i:i + 7, j:j + 7].ravel(), t[s, i:i + 7, j:j + 7].ravel()
                    cov = np.cov(a, c)  # sample covariance (N - 1)
                    values.append((2 * a.mean() * c.mean() + (0.01 * L) ** 2) * (2 * cov[0, 1] + (0.03 * L) ** 2)
                                  / ((a.mean() ** 2 + c.mean() ** 2 + (0.01 * L) ** 2)
                                     * (cov[0, 0] + cov[1, 1] + (0.03 * L) ** 2)))
        assert float(ssim(x, y)[b]) == pytest.approx(np.mean(values), rel=1e-4)
    # fastMRI's evaluation (scikit-image per slice, data range the volume's maximum) where it is installed
    skimage_metrics = pytest.importorskip("skimage.metrics")
    t, p = target[0], pred[0]
    reference = np.mean([skimage_metrics.structural_similarity(t[s], p[s], data_range=t.max()) for s in range(3)])
    assert float(ssim(x[:1], y[:1])) == pytest.approx(reference, rel=1e-4)
    # the metric classes MONAI's IgniteMetricHandler calls: one value per volume, on lists of (slices, H, W)
    scaled = [v / v.max() for v in y]
    metric = FastMRISSIMMetric(data_range=1.0)
    metric([v / t_.max() for v, t_ in zip(x, y)], scaled)
    assert float(metric.aggregate()) == pytest.approx(float(ssim(x, y).mean()), rel=1e-4)
    metric = NMSEMetric()
    metric(list(x), list(y))
    assert float(metric.aggregate()) == pytest.approx(float(nmse(x, y).mean()), rel=1e-6)
    assert float(ssim(y, y).min()) == pytest.approx(1.0)


def test_networks_refine_residually():
    from qtunet_monai.reconstruction import recon_architectures

    x = torch.randn(2, 1, 32, 32)
    conditional = [n for n in recon_architectures() if n.endswith("-Cond")]  # the routers issue's 2D variants
    for name in ("QT-UNet-2D", "QT-UNet-2D-A", "BasicUNet", *conditional):
        net = build_recon_network(name).eval()
        with torch.no_grad():
            assert net(x).shape == x.shape
            for p in net.net.parameters():
                p.zero_()
            torch.testing.assert_close(net(x), x)  # output = input + net(input)
    with pytest.raises(ValueError, match="not 2D"):
        build_recon_network("QT-UNet")
    assert "net.relative_position_bias_table" not in build_recon_network("QT-UNet-2D").no_weight_decay()


# ---------------------------------------------------------------------------------------------- bad input
@needs_h5py
@pytest.mark.parametrize("damage, message", [
    ("float_kspace", "k-space must be complex"),
    ("kspace_2d", "expected (slices, coils, rows, columns)"),
    ("no_target", "no 'reconstruction_rss' target"),
    ("target_too_large", "does not fit the k-space"),
    ("samples_nothing", "samples nothing"),
    ("nan", "NaN or infinite"),
    ("all_zero", "all zero"),
    ("not_hdf5", "not a readable HDF5 file"),
    ("no_kspace", "no 'kspace' dataset"),
])
def test_bad_input_is_one_line_naming_the_file(tmp_path, damage, message):
    import h5py

    image = _image((2, 16, 16))
    kspace = simulate_kspace(image)[:, None]
    target, accelerations, path = image, [4], tmp_path / f"{damage}.h5"
    if damage == "float_kspace":
        kspace = kspace.real.astype(np.float32)
    elif damage == "kspace_2d":
        kspace = kspace[0, 0]
    elif damage == "no_target":
        target = None
    elif damage == "target_too_large":
        target = np.zeros((2, 20, 16), np.float32)
    elif damage == "samples_nothing":
        accelerations = [64]  # centre fraction 0 below: no centre column, less than one column expected
    elif damage == "nan":
        kspace[1, 0, 3, 4] = np.nan
    elif damage == "all_zero":
        kspace = np.zeros_like(kspace)
    if damage == "not_hdf5":
        path.write_text("not an HDF5 file")
    elif damage == "no_kspace":
        with h5py.File(path, "w") as f:
            f.create_dataset("reconstruction_rss", data=image)
    else:
        _write(path, kspace, target)
    with pytest.raises(DataError) as error:
        check_kspace_cases([{"kspace": str(path)}], center_fractions=[0.0 if damage == "samples_nothing" else 0.08],
                           accelerations=accelerations)
    text = str(error.value)
    assert message in text and str(path) in text and "\n" not in text, text


@needs_h5py
def test_bad_input_at_run_time_is_one_line_naming_the_file(tmp_path):
    """Without the up-front check: the reader refuses a wrong layout, and a mask that samples nothing or NaN
    k-space stops the transforms, each naming the file."""
    from qtunet_monai.reconstruction import CheckUndersampledd, FastMRIVolumeReader, ZeroFilledd

    path = _write(tmp_path / "flat.h5", np.ones((2, 16, 16), np.float32), _image((2, 16, 16)))
    with pytest.raises(DataError, match="k-space must be complex") as error:
        reader = FastMRIVolumeReader()
        reader.get_data(reader.read(str(path)))
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    kspace = torch.from_numpy(simulate_kspace(_image((2, 16, 16)))[:, None])
    meta = {"filename_or_obj": str(path)}
    item = ZeroFilledd("kspace")({"kspace": kspace * 0, "kspace_meta_dict": meta})
    with pytest.raises(DataError, match="samples nothing") as error:
        CheckUndersampledd()(item)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    kspace[0, 0, 2, 2] = float("nan")
    with pytest.raises(DataError, match="NaN or infinite"):
        CheckUndersampledd()(ZeroFilledd("kspace")({"kspace": kspace, "kspace_meta_dict": meta}))


# ------------------------------------------------------------------------------------------------- bundle
def _run(args, cwd, check=True, timeout=900):
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def _bundle_run(bundle, configs, *overrides, **kwargs):
    files = "[" + ",".join(f"'configs/{c}'" for c in configs) + "]"
    return _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *overrides], bundle, **kwargs)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    if importlib.util.find_spec("h5py") is None or importlib.util.find_spec("nilearn") is None:
        pytest.skip("h5py and nilearn (the reconstruction and demo extras)")
    from qtunet_monai.reconstruction import prepare_demo

    folder = tmp_path_factory.mktemp("recon_data")
    prepare_demo(folder, **TINY)
    return folder


@pytest.fixture
def bundle(tmp_path, demo_data):
    """The generated bundle, written to tmp, with the tiny demo data in its data/ folder."""
    generator.write_bundle(tmp_path)
    root = tmp_path / generator.BUNDLE
    shutil.copytree(demo_data, root / "data")
    return root


@pytest.mark.slow
@needs_demo
def test_demo_data_in_fastmri_layout(demo_data):
    import h5py

    from qtunet_monai.reconstruction import prepare_demo

    datalist = json.loads((demo_data / "datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "testing")] == [2, 2, 1]
    assert datalist["testing"] == [{"kspace": "test/brain_template.h5"}]
    volumes = {}
    for item in [i for split in datalist.values() for i in split]:
        with h5py.File(demo_data / item["kspace"], "r") as f:
            kspace, target = f["kspace"][()], f["reconstruction_rss"][()]
            assert kspace.dtype == np.complex64 and kspace.shape == (4, 1, 32, 32)
            assert {"acquisition", "max", "norm", "patient_id"} <= set(f.attrs)
            assert f.attrs["max"] == pytest.approx(target.max())
        np.testing.assert_allclose(zero_filled(kspace), target, atol=1e-5)  # the target: RSS of full k-space
        volumes[item["kspace"]] = target
    template = volumes["test/brain_template.h5"]
    assert all(np.abs(v - template).mean() > 0.01 * template.max() for k, v in volumes.items() if k != "test/brain_template.h5")
    check_kspace_cases([{"kspace": str(demo_data / k)} for k in volumes])
    again = prepare_demo(demo_data.parent / "again", **TINY).parent  # deterministic for a seed
    with h5py.File(again / "train" / "brain_000.h5", "r") as f, h5py.File(demo_data / "train" / "brain_000.h5", "r") as g:
        np.testing.assert_array_equal(f["kspace"][()], g["kspace"][()])


@pytest.mark.slow
@needs_demo
def test_bundle_trains_evaluates_and_writes_reconstructions(bundle, demo_data):
    import nibabel as nib

    _bundle_run(bundle, ["train.json"], "--max_epochs", "1", "--val_interval", "1", "--num_samples", "2")
    model = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("net.") for k in model)  # the residual refiner's plain state dict
    resume = torch.load(bundle / "models" / "resume.pt", weights_only=True)
    assert resume["epoch"] == 1 and 0 < resume["best_metric"] <= 1  # the best validation SSIM

    _bundle_run(bundle, ["train.json", "evaluate.json"])
    metrics = {}
    for name in ("val_ssim", "val_psnr", "val_nmse", "val_mae", "zero_filled_ssim", "zero_filled_psnr"):
        with open(bundle / "eval" / f"{name}_raw.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and "brain_template" in rows[0]["filename"]
        metrics[name] = float(rows[0]["mean"])
    assert all(np.isfinite(v) for v in metrics.values())
    recon = nib.load(bundle / "eval" / "brain_template_recon.nii.gz")
    assert recon.shape == (32, 32, 4) and (bundle / "eval" / "brain_template_zero_filled.nii.gz").is_file()

    from qtunet_monai.reconstruction import recon_report
    from qtunet_monai.reconstruction.report import volume_metrics, zero_filled_baseline

    recon_report(str(bundle))
    report = json.loads((bundle / "eval" / "recon_report.json").read_text())["brain_template"]
    assert report["network"]["ssim"] == pytest.approx(metrics["val_ssim"], abs=1e-4)
    assert report["network"]["psnr"] == pytest.approx(metrics["val_psnr"], abs=1e-3)
    assert report["zero_filled"]["ssim"] == pytest.approx(metrics["zero_filled_ssim"], abs=1e-4)
    assert (bundle / "eval" / "recon_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    floor = volume_metrics(*zero_filled_baseline(demo_data / "test" / "brain_template.h5"))
    assert floor["psnr"] == pytest.approx(metrics["zero_filled_psnr"], abs=1e-3)  # the benchmark's zero filling

    evaluated = np.asarray(recon.dataobj)
    (bundle / "eval" / "brain_template_recon.nii.gz").unlink()
    _bundle_run(bundle, ["inference.json"], "--recon_size", "[32, 32]")  # no target needed
    inferred = np.asarray(nib.load(bundle / "eval" / "brain_template_recon.nii.gz").dataobj)
    np.testing.assert_allclose(inferred, evaluated, rtol=1e-5, atol=1e-6)  # same seeded mask, same network


@pytest.mark.slow
@needs_demo
def test_bundle_checks_and_bad_data_stop_the_run(bundle):
    _run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
          "configs/metadata.json", "--config_file", "configs/inference.json", "--device", "cpu"], bundle)
    bad = bundle / "data" / "train" / "brain_001.h5"
    import h5py

    with h5py.File(bad, "r+") as f:
        data = f["kspace"][()]
        data[0, 0, 0, 0] = np.nan
        f["kspace"][...] = data
    done = _bundle_run(bundle, ["train.json"], "--max_epochs", "1", check=False)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0 and last.startswith("DataError:") and str(bad) in last and "NaN" in last, done.stderr[-2000:]


@pytest.mark.slow
@needs_demo
def test_multi_gpu_config_runs_under_torchrun_with_gloo(bundle):
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
          "-m", "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']",
          "--max_epochs", "1", "--val_interval", "1", "--num_samples", "2", "--device", "cpu"], bundle)
    assert torch.load(bundle / "models" / "resume.pt", weights_only=True)["epoch"] == 1
    assert (bundle / "models" / "model.pt").is_file()


@pytest.mark.slow
@needs_demo
def test_benchmark_command_runs_on_tiny_settings(tmp_path, demo_data):
    spec = importlib.util.spec_from_file_location("recon_demo", REPO / "benchmarks" / "recon_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.copytree(demo_data, tmp_path / "data")
    results = module.run(arms="zero_filled,basicunet", work_dir=str(tmp_path), max_epochs=1, num_samples=2,
                         val_interval=1, device="cpu", results=str(tmp_path / "r.json"), figure=str(tmp_path / "f.png"),
                         regenerate=False)
    assert [a["arm"] for a in results["arms"]] == ["zero_filled", "basicunet"]
    assert results["arms"][1]["params_m"] > 1 and results["arms"][1]["train_min"] > 0
    assert set(results["beats_zero_filled"]) == {"basicunet"}
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = generator.results_table(results)
    assert "| zero filling (the input) |" in table and "BasicUNet" in table


# ---------------------------------------------------------------------------------------------- generator
@pytest.mark.slow
def test_committed_bundle_matches_the_generator(tmp_path):
    """``tools/generate_reconstruction_bundle.py --check`` passes on the repository, fails on a hand edit."""
    assert generator.check_bundle(REPO / "bundles") == []
    assert generator.main(["--check"]) == 0
    root = tmp_path / "bundles"
    assert generator.main(["--check", "--root", str(root)]) == 1  # nothing written there yet
    generator.write_bundle(root)
    assert generator.main(["--check", "--root", str(root)]) == 0
    train = root / generator.BUNDLE / "configs" / "train.json"
    epochs = generator.RECIPE["max_epochs"]
    train.write_text(train.read_text().replace(f'"max_epochs": {epochs}', f'"max_epochs": {epochs + 1}'))
    done = _run([sys.executable, str(GENERATOR), "--check", "--root", str(root)], REPO, check=False)
    assert done.returncode == 1 and str(train) in done.stdout and done.stdout.count(".json") == 1


def test_readme_template_fills_every_placeholder():
    """The README's sections fill exactly the template's placeholders, with and without results and figure;
    rendering raises on a missing one."""
    template = string.Template((generator._segmentation.TEMPLATES / "reconstruction_README.md").read_text())
    results = {"arms": [{"arm": "qtunet2d", "label": "QT-UNet-2D-T", "params_m": 1.5, "train_min": 2.0,
                         "metrics": {"ssim": 0.9, "psnr": 30.0, "nmse": 0.01, "mae": 0.02}}]}
    for found, has_figure in ((None, False), (results, True)):
        sections = generator.readme_sections(found, has_figure)
        assert set(template.get_identifiers()) == set(sections)
        text = generator.docs_readme(found, has_figure)
        assert f"zero-padded to {generator.SIZE} x {generator.SIZE}" in text and "$" not in text
        assert generator.results_table(found) in text and (f"]({generator.FIGURE[5:]})" in text) == has_figure
    del sections["table"]
    with pytest.raises(KeyError, match="table"):
        generator._segmentation.render_template("reconstruction_README.md", sections)


def test_generated_configs_use_monai_reconstruction_pieces():
    files = generator.render_bundle()
    train = json.loads(files["configs/train.json"])
    for rel, text in files.items():
        if rel.endswith(".json"):
            config = json.loads(text)
            assert text == json.dumps(config, indent=4) + "\n", rel
            used = " ".join(e for e in generator._segmentation._expressions(config) if not e.startswith("$import"))
            for statement in config.get("imports", []):
                assert statement.split()[-1] + "." in used, (rel, statement)
    targets = [t["_target_"] for t in train["train"]["deterministic_transforms"] + train["train"]["random_transforms"]]
    assert "monai.apps.reconstruction.transforms.dictionary.ReferenceBasedNormalizeIntensityd" in targets
    assert train["center_fractions"] == [0.08] and train["accelerations"] == [4] and train["mask_type"] == "equispaced"
    assert list(train["validate"]["key_metric"]) == ["val_ssim"]
    assert {"zero_filled_ssim", "zero_filled_psnr", "val_nmse", "val_mae"} <= set(train["validate"]["additional_metrics"])
    assert train["validate"]["inferer"]["_target_"] == "SliceInferer"
    multi = json.loads(files["configs/multi_gpu_train.json"])
    assert multi["network"]["_target_"] == "torch.nn.parallel.DistributedDataParallel"
