# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Generate the MRI reconstruction bundle ``bundles/qtunet_demo_mri_reconstruction`` (repository tooling:
nothing in the installed package imports this file).

The pipeline pieces (transforms, mask, inferer, post-processing, metrics, loss) come from
:mod:`qtunet_monai.reconstruction.pipeline`; the conventions shared with the segmentation bundles
(``imports`` pruning, the torchrun overlay, logging.conf, LICENSE, package versions, the metadata schema)
come from ``tools/generate_bundles.py``. The docs' results table is rendered from
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
    config["lr_scheduler"] = ("$monai.optimizers.WarmupCosineSchedule(@optimizer, warmup_steps=@warmup_epochs, "
                              "t_total=@max_epochs) if @warmup_epochs else torch.optim.lr_scheduler.CosineAnnealingLR("
                              "@optimizer, T_max=@max_epochs)")
    loss_out = "$monai.handlers.from_engine(['loss'], first=True)"
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
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                       "shuffle": True, "num_workers": "@num_workers"},
        "inferer": {"_target_": "SimpleInferer"},
        # multi_gpu_train.json drops the last three (logging) handlers on ranks > 0: keep them last
        "handlers": [
            {"_target_": "qtunet_monai.bundle.StopOnNonFiniteLoss"},
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": "@val_interval"},
            {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
            {"_target_": "qtunet_monai.bundle.TrainingTimeBudget", "minutes": "@time_budget_min",
             "validator": "@validate#evaluator", "path": "$@output_dir + '/training_time.json'"},
            {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": loss_out},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
             "output_transform": loss_out},
            {"_target_": "ignite.handlers.ProgressBar", "persist": False},
        ],
        "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                    "train_data_loader": "@train#dataloader", "network": "@network", **_ENGINE_COMPILE,
                    "loss_function": "@loss", "optimizer": "@optimizer", "inferer": "@train#inferer",
                    "train_handlers": "@train#handlers", "amp": "@amp"},
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
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
            {"_target_": "qtunet_monai.bundle.BestModelSaver", "path": "@ckpt_file", "network": "@network"},
        ],
        "key_metric": dict(list(metrics.items())[:1]),
        "additional_metrics": dict(list(metrics.items())[1:]),
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
                      "network": "@network", **_ENGINE_COMPILE, "inferer": "@validate#inferer",
                      "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
                      "additional_metrics": "@validate#additional_metrics", "val_handlers": "@validate#handlers",
                      "amp": "@amp"},
    }
    config["resume_checkpoint"] = {"_target_": "qtunet_monai.bundle.ResumeCheckpoint", "path": "$@ckpt_dir + '/resume.pt'",
                                   "network": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler",
                                   "resume": "@resume", "evaluator": "@validate#evaluator"}
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
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_file", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            # before the MetricsSaver, which writes its per-volume times (inference_time_raw.csv)
            {"_target_": "qtunet_monai.bundle.InferenceTimer", "name": "inference_time"},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": names, "metric_details": names,
             "batch_transform": "$lambda batch: [item['image'].meta for item in batch]", "summary_ops": "*"},
        ],
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
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_file", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
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
def docs_readme(results: dict | None, has_figure: bool) -> str:
    figure = (f"\n![target, zero-filled, reconstructions and their errors on the test volume]({FIGURE[5:]})\n"
              if has_figure else "")
    table = results_table(results)
    return f"""# QT-UNet demo: undersampled MRI reconstruction

A MONAI bundle that trains **QT-UNet-2D-T** (Querying Transformer UNet, `qtunet_monai`) to reconstruct
4x undersampled MRI, the second task of the Conditional Swin U-Net thesis (seed 003: fastMRI knee,
single coil, 4x equispaced mask), on MONAI's reconstruction transforms (`monai.apps.reconstruction`).
The network refines the zero-filled magnitude residually (output = input + network(input)); MONAI's
`BasicUNet` and the Swin U-Net (QT-UNet-2D-A: no decoder cross-attention) run in the same pipeline.
It runs offline on a CPU on k-space simulated from the MNI template that nilearn ships, and on
fastMRI files. Generated by `tools/generate_reconstruction_bundle.py` in the repository (the pipeline
is `qtunet_monai/reconstruction/pipeline.py`); edit there to change all configs at once.

## Data

**Demo (offline).** The nilearn wheel carries the MNI ICBM152 2009c T1 template. `prepare_recon_demo`
deforms it at random (the segmentation demo's affine, elastic, bias-field and contrast changes; the
undeformed template is the test volume), takes the axial slices that hold brain (2 mm, 77 x 95,
zero-padded to {SIZE} x {SIZE}), gives each volume a smooth random phase (a random quadratic polynomial,
|phase| <= pi) so that its k-space is not Hermitian as a magnitude image's would be, adds complex
Gaussian k-space noise (1 % of the volume's largest magnitude), and writes fastMRI-layout HDF5 files:
`kspace` `(slices, 1, rows, columns)` complex64 with a singleton coil axis, `reconstruction_rss` the
magnitude of the fully sampled noisy k-space (fastMRI's definition of the target), attributes
`acquisition`, `max`, `norm`, `patient_id`. MONAI's `FastMRIReader` reads them unchanged.

```bash
pip install "qtunet_monai[demo,reconstruction]"      # nilearn (template), matplotlib (figure), h5py
python -m qtunet_monai prepare_recon_demo --output_dir data --num_train 12 --num_val 3
```

**fastMRI.** Single-coil knee files hold `kspace` `(slices, rows, columns)` and the target
`reconstruction_esc`, which MONAI's `FastMRIReader` drops; the bundle reads every file with
`qtunet_monai.reconstruction.FastMRIVolumeReader`, which keeps it and adds the coil axis (without
it MONAI's mask transforms would take the root-sum-of-squares over the slices). Multi-coil brain
files read as they are (`reconstruction_rss`). Write a data list of the files, then train with the
target and size of the data set:

```bash
python -m qtunet_monai prepare_recon_data --train_dir /data/knee/singlecoil_train \\
    --val_dir /data/knee/singlecoil_val --output_file data/datalist.json
python -m monai.bundle run --config_file configs/train.json --target_key reconstruction_esc --mask_type random
```

Multi-coil brain files (`/data/brain/multicoil_train`, ...) need no `--target_key`; fastMRI's brain
masks are equispaced, the default here. Training and evaluation crop the zero-filled image to the
target's size (320 x 320 in fastMRI); inference, which needs no target, crops to `--recon_size`.

Every file is checked before a run starts (`--check_data False`: shapes only, no full read): not
HDF5, no `kspace`, k-space that is not complex or not `(slices, coils, rows, columns)` /
`(slices, rows, columns)`, a missing or misshapen target, NaN or infinite values, all-zero k-space,
or a mask that would sample nothing of the file's columns stop the run with one line per problem
naming the file; a mask that samples nothing at run time does too. Set `QTUNET_MONAI_DEBUG=1` for the
traceback behind such a message.

## Pipeline
- MONAI's chain (its `MRI_reconstruction/unet_demo` tutorial): `FastMRIReader` (subclass above) ->
  `ExtractDataKeyFromMetaKeyd` -> `EquispacedKspaceMaskd` (`--mask_type random`: `RandomKspaceMaskd`),
  4x with 8 % fully sampled centre columns (`--accelerations "[4]" --center_fractions "[0.08]"`) ->
  zero-filled magnitude -> `ReferenceBasedSpatialCropd` (to the target's size) ->
  `ReferenceBasedNormalizeIntensityd` (each slice by the zero-filled image's mean and standard deviation)
  -> clipped to +-6.
- Training: each step takes `num_samples` ({RECIPE['num_samples']}) random slices of `batch_size` ({RECIPE['batch_size']}) volume(s), each
  volume under a new random mask offset every time; L1 loss on the normalised images (`--ssim_weight w`
  adds `w (1 - SSIM)`); AdamW (lr {RECIPE['learning_rate']}, weight decay {RECIPE['weight_decay']}, none on norms, biases and
  relative-position bias tables), cosine annealing, {RECIPE['max_epochs']} epochs.
- Validation every {RECIPE['val_interval']} epochs on whole volumes, the mask seeded by the file's name (the same in every
  epoch and run), the network applied slice by slice (MONAI's `SliceInferer`); the outputs are
  de-normalised, then the reconstruction, the zero-filled image and the target are divided by the
  target's maximum, and fastMRI's per-volume metrics computed: SSIM (7 x 7 uniform window, sample
  covariance: scikit-image's, as fastMRI's evaluation; MONAI's `SSIMMetric` uses the population
  covariance), PSNR, NMSE (`||y - x||^2 / ||y||^2`) and MAE, each also for the zero-filled input
  (`zero_filled_*`: the floor). The best validation SSIM is saved as `models/model.pt`.

## Commands
Run from this folder. CPU works; a GPU is used when present (AMP on).

```bash
python -m monai.bundle run --config_file configs/train.json
python -m monai.bundle run --config_file configs/train.json --resume True     # after a kill (models/resume.pt)
# evaluate models/model.pt on the 'testing' split: per-volume metrics (eval/*_raw.csv) and the
# reconstructions and zero-filled images as NIfTI (rows, columns, slices) in eval/
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"
python -m qtunet_monai recon_report --bundle_dir .      # metrics from the NIfTI files and eval/recon_report.png
# reconstruct the 'testing' files (no target needed; --undersampled True for already undersampled
# k-space such as fastMRI's test files; --recon_size "[320, 320]" for fastMRI)
python -m monai.bundle run --config_file configs/inference.json
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run \\
    --config_file "['configs/train.json','configs/multi_gpu_train.json']"
```

| override | effect |
|---|---|
| `--architecture QT-UNet-2D-A` | the Swin U-Net: QT-UNet-2D without decoder cross-attention |
| `--architecture BasicUNet` | MONAI's BasicUNet (features 32, 64, 128, 256, 512, 32, as MONAI's tutorial) in the same pipeline |
| `--architecture Swin-UNet-2D-Cond` (`QT-UNet-2D-Cond`) | seed 003's Conditional Swin U-Net: CoLT5-routed light/heavy blocks (and the QT decoder) |
| `--architecture Swin-UNet-2D-CCT` (`QT-UNet-2D-CCT`) | any other 2D architecture of the family |
| `--variant small` / `base`, `--patch_size 2` | a wider QT-UNet; a 2-pixel patch partition (finer detail, four times the tokens) |
| `--residual False` | the network predicts the image itself |
| `--mask_type random` | fastMRI's random columns (knee) instead of equispaced |
| `--target_key reconstruction_esc` | fastMRI single-coil knee's target |
| `--compile True` | `torch.compile(network, dynamic=False)` |

Give the same network overrides to evaluation and inference. MONAI's e2e-VarNet
(`VariationalNetworkModel`) is not offered: it takes the masked k-space and the mask rather than an
image, which needs its own batch preparation and a complex pipeline; QT-UNet-2D with two channels in
and out can be its `ComplexUnet`'s `conv_net`.

## Results on the demo data
{table}
{figure}
These figures come from one template brain (one averaged, smooth adult T1, deformed; a simulated
phase; one coil; k-space simulated with the same FFT that reconstructs it) and **are not comparable
with fastMRI results**; they show that the pipeline works end to end and whether a network beats zero
filling on this data.

## References
- QT-UNet: Querying Transformer UNet, master's thesis, NTNU.
- Zbontar J. et al. fastMRI: An Open Dataset and Benchmarks for Accelerated MRI. arXiv:1811.08839, 2018.
- MONAI tutorials, `reconstruction/MRI_reconstruction/unet_demo`.
- Fonov V. et al. Unbiased nonlinear average age-appropriate brain templates from birth to adulthood. NeuroImage 47, S102, 2009.
"""


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
