# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Generate the MRI reconstruction bundle ``bundles/qtunet_demo_mri_reconstruction`` (repository tooling:
nothing in the installed package imports this file).

The pipeline pieces (transforms, mask, inferer, post-processing, metrics, loss) come from
:mod:`qtunet_monai.reconstruction.pipeline`; the conventions shared with the segmentation bundles
(``imports`` pruning, the torchrun overlay, logging.conf, LICENSE, package versions, the metadata schema)
come from ``tools/generate_bundles.py``, and so do the engines' handlers, schedule and checkpoints the training
configs share. The docs' text is ``tools/templates/reconstruction_README.md``; its results table is rendered from
``benchmarks/results/recon_demo.json`` (``benchmarks/recon_demo.py`` writes it) when it exists, so that the
output is a function of the repository's files alone.

Usage, from the repository root::

    python tools/generate_reconstruction_bundle.py            # (re)write the bundle
    python tools/generate_reconstruction_bundle.py --check    # list drifted files, exit status 1 if any (run by the tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from qtunet_monai.reconstruction import pipeline

__all__ = ["BUNDLE", "render_bundle", "write_bundle", "check_bundle", "main"]

BUNDLE = "qtunet_demo_mri_reconstruction"
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("generate_bundles", HERE / "generate_bundles.py")
_segmentation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_segmentation)
REPO = _segmentation.REPO
RESULTS = REPO / "benchmarks" / "results" / "recon_demo.json"
FIGURE = "docs/recon_demo.png"  # written by benchmarks/recon_demo.py, not generated
VERSIONS = {**_segmentation.VERSIONS, "h5py": "3.16.0"}

IMPORTS = ["$import qtunet_monai.bundle as qtunet_bundle", "$import qtunet_monai.reconstruction as qtunet_recon"]
_ENGINE_COMPILE = _segmentation._ENGINE_COMPILE
PARAM_GROUPS = "$qtunet_bundle.param_groups(@network, @weight_decay)"
#: the demo's slice size and recipe (prepare_recon_demo's defaults)
SIZE = 112
RECIPE = {"max_epochs": 40, "val_interval": 2, "learning_rate": 3e-4, "weight_decay": 1e-4, "warmup_epochs": 0,
          "batch_size": 1, "num_samples": 16}


def _checked(datalist: str, target: bool = True) -> str:
    target_key = "@target_key" if target else "None"
    return (f"$qtunet_recon.check_kspace_cases({datalist}, target_key={target_key}, "
            "center_fractions=@center_fractions, accelerations=@accelerations, check_values=@check_data)")


# ------------------------------------------------------------------------------------------------- configs
def _common() -> dict:
    return {
        "imports": list(IMPORTS),
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "ckpt_file": "$@ckpt_dir + '/model.pt'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist_file": "$@dataset_dir + '/datalist.json'",
        # this process's GPU on its node (torchrun's LOCAL_RANK; 0 for one process); --device cpu forces the CPU
        "gpu_device": "$qtunet_bundle.local_gpu()",
        "device": "$qtunet_bundle.process_device(@gpu_device if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.device(@device).type == 'cuda'",
        # the image-domain network, refining the zero-filled magnitude: x + net(x)
        "architecture": "QT-UNet-2D",
        "variant": "tiny",
        "patch_size": 4,
        "residual": True,
        # fastMRI's target: reconstruction_rss (multi-coil, and the demo), reconstruction_esc (single-coil knee)
        "target_key": "reconstruction_rss",
        # MONAI's undersampling: equispaced (seed 003) or random columns, 4x with 8 % fully sampled centre
        "mask_type": "equispaced",
        "center_fractions": [0.08],
        "accelerations": [4],
        "mask_seed": 0,
        "clip": 6.0,
        "slice_batch_size": 16,
        "check_data": True,
    }


def _network_def(train: bool) -> dict:
    net = {"_target_": "qtunet_monai.reconstruction.build_recon_network", "name": "@architecture",
           "variant": "@variant", "residual": "@residual", "patch_size": "@patch_size"}
    if train:
        net["drop_path_rate"] = "@drop_path_rate"
    return net


def _compiled_network() -> dict:
    return _segmentation._compiled_network()


def _preprocessing(train: bool) -> list[dict]:
    return pipeline.load(True) + pipeline.undersample(random=train) + pipeline.image_transforms(True)


def train_config() -> dict:
    config = _common()
    config.update({
        **RECIPE,
        "drop_path_rate": 0.0,
        "ssim_weight": 0.0,
        "num_workers": 0,
        "cache_rate": 1.0,
        "resume": False,
        "finetune": False,
        "finetune_checkpoint": "$@ckpt_dir + '/pretrained.pt'",
        "network_def": _network_def(train=True),
        "network": "$@network_def.to(@device)",
        **_compiled_network(),
        "seed": 123,
        # wall-time budget in minutes (0: none): the run stops at the epoch end before it would overrun
        "time_budget_min": 0,
    })
    config["loss"] = pipeline.loss()
    config["optimizer"] = {"_target_": "torch.optim.AdamW", "params": PARAM_GROUPS, "lr": "@learning_rate",
                           "weight_decay": "@weight_decay"}
    config["lr_scheduler"] = _segmentation.LR_SCHEDULER
    metrics = pipeline.metrics()
    config["train"] = {
        "datalist": "$qtunet_recon.load_kspace_datalist(@datalist_file, 'training')",
        # cached: the k-space as read; every epoch draws a new mask and new slices
        "deterministic_transforms": pipeline.load(True),
        "random_transforms": pipeline.undersample(random=True) + pipeline.image_transforms(True)
        + pipeline.train_sampling(),
        "preprocessing": {"_target_": "Compose",
                          "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": _checked("@train#datalist"),
                    "transform": "@train#preprocessing", "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
        **_segmentation.train_section("@loss"),
    }
    config["validate"] = {
        "split": "validation",
        "datalist": "$qtunet_recon.load_kspace_datalist(@datalist_file, @validate#split)",
        # the mask is seeded by the file name: the same for a volume in every epoch and run
        "preprocessing": {"_target_": "Compose", "transforms": _preprocessing(train=False)},
        "dataset": {"_target_": "CacheDataset", "data": _checked("@validate#datalist"),
                    "transform": "@validate#preprocessing", "cache_rate": "@cache_rate",
                    "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": pipeline.slice_inferer(),
        "postprocessing": {"_target_": "Compose", "transforms": pipeline.postprocessing(True, save=False)},
        "handlers": _segmentation.validation_handlers(),
        "key_metric": dict(list(metrics.items())[:1]),
        "additional_metrics": dict(list(metrics.items())[1:]),
        "evaluator": _segmentation.validation_evaluator("@validate#inferer"),
    }
    config["resume_checkpoint"] = _segmentation.resume_checkpoint("$@ckpt_dir + '/resume.pt'")
    config["initialize"] = [
        "$monai.utils.set_determinism(seed=@seed)",
        "$qtunet_bundle.check_writable(@output_dir)",
        "$qtunet_bundle.load_pretrained(@network, @finetune_checkpoint) if @finetune else None",
        "$@resume_checkpoint.attach(@train#trainer)",
    ]
    config["run"] = ["$@train#trainer.run()"]
    return config


def evaluate_config() -> dict:
    names = [*pipeline.metrics(), "inference_time"]
    return {
        "validate#split": "testing",
        "validate#postprocessing": {"_target_": "Compose", "transforms": pipeline.postprocessing(True, save=True)},
        "validate#handlers": _segmentation.evaluation_handlers(names),
        "initialize": ["$qtunet_bundle.check_writable(@output_dir)"],
        "run": ["$@validate#evaluator.run()"],
    }


def inference_config() -> dict:
    config = _common()
    config.update({
        "datalist": "$qtunet_recon.load_kspace_datalist(@datalist_file, 'testing')",
        # the zero-filled image is cropped (or padded) to this size: fastMRI's targets are 320 x 320
        "recon_size": [SIZE, SIZE],
        # True: the files' k-space is already undersampled (fastMRI's test files): no mask is drawn
        "undersampled": False,
        "network_def": _network_def(train=False),
        "network": "$@network_def.to(@device)",
        **_compiled_network(),
        "preprocessing": {"_target_": "Compose", "transforms": pipeline.load(False)
                          + pipeline.undersample(random=False, undersampled_input="@undersampled")
                          + pipeline.image_transforms(False)},
        "dataset": {"_target_": "Dataset", "data": _checked("@datalist", target=False),
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": pipeline.slice_inferer(),
        "postprocessing": {"_target_": "Compose", "transforms": pipeline.postprocessing(False, save=True)},
        "handlers": [_segmentation.checkpoint_loader(), {"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", **_ENGINE_COMPILE, "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": "@amp"},
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$qtunet_bundle.check_writable(@output_dir)"],
        "run": ["$@evaluator.run()"],
    })
    return config


def multi_gpu_config() -> dict:
    config = train_config()
    budget = next(i for i, h in enumerate(config["train"]["handlers"]) if h["_target_"].endswith("TrainingTimeBudget"))
    return _segmentation._distributed_overlay(config, "train", ["resume_checkpoint", f"train#handlers#{budget}"])


# ------------------------------------------------------------------------------------------------ results
def load_results(path: Path = RESULTS) -> dict | None:
    """``benchmarks/recon_demo.py``'s results, or None before it has run."""
    return json.loads(path.read_text()) if path.is_file() else None


def results_table(results: dict | None) -> str:
    if not results:
        return ("Not measured yet: `python benchmarks/recon_demo.py` (from the repository root) trains every network "
                "on the demo data, one after another, and writes the table here (regenerate the bundle) and the "
                f"figure `{FIGURE}`.")
    rows = ["| method | SSIM | PSNR (dB) | NMSE | MAE | parameters (M) | training (min) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for arm in results["arms"]:
        m = arm["metrics"]
        params = f"{arm['params_m']:.2f}" if arm.get("params_m") is not None else "-"
        minutes = f"{arm['train_min']:.1f}" if arm.get("train_min") is not None else "-"
        rows.append(f"| {arm['label']} | {m['ssim']:.4f} | {m['psnr']:.2f} | {m['nmse']:.4f} | {m['mae']:.4f} "
                    f"| {params} | {minutes} |")
    notes = [results.get("setting", "")]
    beats = results.get("beats_zero_filled")
    if beats:
        losers = [a["label"] for a in results["arms"] if a["arm"] in beats and not beats[a["arm"]]]
        notes.append("Every network beats zero filling on both PSNR and SSIM." if not losers else
                     "Not better than zero filling on both PSNR and SSIM: " + ", ".join(losers) + ".")
    return "\n".join(rows) + "".join(f"\n\n{n}" for n in notes if n)


# --------------------------------------------------------------------------------------------------- meta
def metadata(results: dict | None) -> dict:
    packages = {k: VERSIONS[k] for k in ("qtunet_monai", "nibabel", "pytorch-ignite", "tensorboard", "tqdm", "h5py",
                                         "nilearn")}
    meta = {
        "schema": _segmentation.SCHEMA_URL,
        "version": "0.1.0",
        "changelog": {"0.1.0": "first release: undersampled MRI reconstruction (4x equispaced) with QT-UNet-2D-T "
                               "as a residual image-domain network, on k-space simulated from the MNI template"},
        "monai_version": VERSIONS["monai"],
        "pytorch_version": VERSIONS["pytorch"],
        "numpy_version": VERSIONS["numpy"],
        "required_packages_version": packages,
        "supported_apps": {},
        "name": "QT-UNet demo: undersampled MRI reconstruction",
        "task": "Reconstruction of 4x undersampled single-coil MRI (image-domain refinement of the zero-filled "
                "magnitude)",
        "description": "QT-UNet-2D-T (Querying Transformer UNet) refines the zero-filled magnitude of undersampled "
                       "k-space residually, on MONAI's reconstruction transforms (FastMRIReader, equispaced or "
                       "random masks, reference-based normalisation); trained on k-space simulated from random "
                       "deformations of the MNI ICBM152 template that nilearn ships, a demonstration that runs "
                       "offline on a CPU, not a clinical model; the same bundle reads fastMRI files",
        "authors": "qtunet_monai contributors",
        "copyright": "Copyright (c) qtunet_monai contributors",
        "data_source": "MNI ICBM152 2009c nonlinear symmetric T1 template inside the nilearn wheel, randomly "
                       "deformed, with a smooth random phase and complex Gaussian k-space noise, written in fastMRI's "
                       "HDF5 layout (python -m qtunet_monai prepare_recon_demo); or fastMRI knee (single-coil) and "
                       "brain (multi-coil) files",
        "data_type": "hdf5",
        "image_classes": "1 channel: zero-filled magnitude of the undersampled k-space, normalised per slice by "
                         "its mean and standard deviation, clipped to +-6",
        "label_classes": "1 channel: the fully sampled magnitude (fastMRI's reconstruction_rss or "
                         "reconstruction_esc), normalised alike",
        "pred_classes": "1 channel: the reconstructed magnitude, normalised alike (de-normalised for saving and metrics)",
        "intended_use": "Demonstration and testing only; not for diagnostic use",
        "references": [
            "QT-UNet: Querying Transformer UNet, master's thesis, Norwegian University of Science and Technology (NTNU)",
            "Zbontar J. et al. fastMRI: An Open Dataset and Benchmarks for Accelerated MRI. arXiv:1811.08839, 2018",
            "Cao H. et al. Swin-Unet: Unet-like Pure Transformer for Medical Image Segmentation. ECCV Workshops 2022",
            ("Fonov V., Evans A.C., McKinstry R.C., Almli C.R., Collins D.L. Unbiased nonlinear average "
             "age-appropriate brain templates from birth to adulthood. NeuroImage 47, S102, 2009"),
        ],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                "spatial_shape": [SIZE, SIZE], "dtype": "float32", "value_range": [-6, 6], "is_patch_data": False,
                "channel_def": {"0": "zero-filled magnitude (normalised)"}}},
            "outputs": {"pred": {
                "type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                "spatial_shape": [SIZE, SIZE], "dtype": "float32", "value_range": [], "is_patch_data": False,
                "channel_def": {"0": "reconstructed magnitude (normalised)"}}},
        },
    }
    arm = next((a for a in (results or {}).get("arms", []) if a["arm"] == "qtunet2d"), None)
    if arm:  # only a result measured with this bundle (the demo data, test volume)
        meta["eval_metrics"] = {f"test_{k}": round(v, 4) for k, v in arm["metrics"].items()}
    return meta


# --------------------------------------------------------------------------------------------------- docs
def readme_sections(results: dict | None, has_figure: bool) -> dict[str, object]:
    """The placeholders of ``tools/templates/reconstruction_README.md``: the recipe, results table and figure.

    Args:
        results: :func:`load_results`' record, or None before the demo has run.
        has_figure: the bundle holds :data:`FIGURE`.
    """
    figure = (f"\n![target, zero-filled, reconstructions and their errors on the test volume]({FIGURE[5:]})\n"
              if has_figure else "")
    return {"size": SIZE, **{k: RECIPE[k] for k in ("num_samples", "batch_size", "learning_rate", "weight_decay",
                                                    "max_epochs", "val_interval")},
            "table": results_table(results), "figure": figure}


def docs_readme(results: dict | None, has_figure: bool) -> str:
    """``docs/README.md`` (arguments as :func:`readme_sections`)."""
    return _segmentation.render_template("reconstruction_README.md", readme_sections(results, has_figure))


# --------------------------------------------------------------------------------------------- writing
def render_bundle(results: dict | None = None, has_figure: bool | None = None) -> dict[str, str]:
    """The bundle's generated files: relative path -> text (``results``/``has_figure`` default: the repository's)."""
    results = load_results() if results is None else results
    if has_figure is None:
        has_figure = (REPO / "bundles" / BUNDLE / FIGURE).is_file()
    train, evaluate, multi_gpu = train_config(), evaluate_config(), multi_gpu_config()
    files = {
        "configs/metadata.json": metadata(results),
        "configs/train.json": _segmentation._prune_imports(train, evaluate, multi_gpu),
        "configs/evaluate.json": evaluate,
        "configs/inference.json": _segmentation._prune_imports(inference_config()),
        "configs/multi_gpu_train.json": multi_gpu,
    }
    out = {path: _segmentation._dumps(content) for path, content in files.items()}
    out["configs/logging.conf"] = _segmentation.LOGGING_CONF
    out[".gitignore"] = "# written by the commands in docs/README.md\ndata/\nmodels/\neval/\n"
    out["LICENSE"] = (REPO / "LICENSE").read_text() if (REPO / "LICENSE").is_file() else ""
    out["docs/README.md"] = docs_readme(results, has_figure)
    return out


def write_bundle(root: str | Path = REPO / "bundles") -> list[Path]:
    """Write (overwrite) the bundle's generated files under ``root``; returns the files written."""
    written = []
    for rel, text in render_bundle().items():
        path = Path(root) / BUNDLE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def check_bundle(root: str | Path = REPO / "bundles") -> list[str]:
    """Generated files that are missing from ``root`` or differ from what this script generates."""
    return [str(Path(root) / BUNDLE / rel) for rel, text in render_bundle().items()
            if not (Path(root) / BUNDLE / rel).is_file() or (Path(root) / BUNDLE / rel).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    """Command line: write the bundle, or with ``--check`` list the generated files that drifted."""
    parser = argparse.ArgumentParser(description=f"(Re)write bundles/{BUNDLE} from qtunet_monai/reconstruction.")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit status 1 on drift")
    parser.add_argument("--root", default=str(REPO / "bundles"), help="the bundles folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        stale = check_bundle(args.root)
        if stale:
            print("out of date (run python tools/generate_reconstruction_bundle.py):\n  " + "\n  ".join(stale))
            return 1
        print(f"{BUNDLE} matches qtunet_monai/reconstruction")
        return 0
    print(f"{len(write_bundle(args.root))} files written under {Path(args.root) / BUNDLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
