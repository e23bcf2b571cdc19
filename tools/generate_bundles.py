# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Generate the MONAI bundles under ``bundles/`` from :data:`qtunet_monai.tasks.TASKS` (repository
tooling: nothing in the installed package imports this file).

What the bundles share (the engines, handlers, checkpointing, resume and fine-tune switches,
distributed training, evaluation and inference) is written once here; the pipeline pieces (transforms,
loss, post-processing, metrics, inferer) come from :mod:`qtunet_monai.pipeline`, which the Auto3DSeg
template instantiates too; what differs comes from the task. The generated files are committed, so every
bundle stays a self-contained folder a user can read and edit.

Usage, from the repository root::

    python tools/generate_bundles.py            # (re)write bundles/
    python tools/generate_bundles.py --check    # list drifted files, exit status 1 if any (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import qtunet_monai
from qtunet_monai import pipeline
from qtunet_monai.bundle.presets import NETWORK_KEYS, PRESETS
from qtunet_monai.bundle.settings import MODEL_KEYS, RECIPE_KEYS, TRAINED
from qtunet_monai.tasks import TASKS, Task

__all__ = ["render_bundle", "write_bundles", "check_bundles", "main"]

# Versions the bundles were tested with (metadata.json); the package's own comes from qtunet_monai.__version__.
# Each must install on every Python pyproject.toml supports (>= 3.10, the model zoo's CI): numpy 2.2.6 and
# pillow 12.3.0 are the newest for 3.10 (`pip index versions numpy --python-version 3.10`; numpy 2.3 and
# pillow 13 need 3.11). tests/test_settings.py checks this.
VERSIONS = {"monai": "1.6.1", "pytorch": "2.13.0", "numpy": "2.2.6", "qtunet_monai": qtunet_monai.__version__, "nibabel": "5.4.2",
            "pytorch-ignite": "0.5.5", "tensorboard": "2.21.0", "tqdm": "4.70.1", "pillow": "12.3.0",
            "nilearn": "0.14.1"}
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
REPO = Path(__file__).resolve().parents[1]  # this file is tools/generate_bundles.py
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


# ---------------------------------------------------------------------------------------------- transforms
def deterministic_transforms(task: Task, with_label: bool, pad: bool = True) -> list[dict]:
    """Loading, label conversion, orientation, spacing, intensity and foreground crop (train, validation, inference)."""
    return pipeline.deterministic_transforms(task.intensity, task.spatial_dims, with_label,
                                             resample=task.pixdim is not None, crop_foreground=task.crop_foreground,
                                             regions=task.regions, label_map=task.label_map, pad=pad)


def _saver(task: Task, key: str) -> dict:
    # written to a temporary name and renamed: a killed or concurrent writer never leaves a truncated file
    saver = {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False,
             "writer": "qtunet_monai.bundle.AtomicNibabelWriter"}
    if task.spatial_dims == 2:
        saver.update({"output_ext": ".png", "writer": "qtunet_monai.bundle.AtomicPILWriter", "scale": None})
    return saver


def _keep_largest(task: Task) -> dict:
    """Largest connected component per class (``--keep_largest True``; classes ``@keep_largest_labels``):
    on the label map of a softmax task, on each thresholded channel of a sigmoid one."""
    return {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": "@keep_largest_labels",
            "is_onehot": task.sigmoid, "independent": True, "_disabled_": "$not @keep_largest"}


def _save_label_map(task: Task, with_label: bool) -> list[dict]:
    """From the (inverted) probabilities: a label map written to disk; with a label, keep one-hot for the metrics."""
    if task.sigmoid:
        regions = [list(r) for r in task.regions]
        return [
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            _keep_largest(task),
            {"_target_": "CopyItemsd", "keys": "pred", "names": "seg"},
            {"_target_": "qtunet_monai.bundle.RegionsToLabelsd", "keys": "seg", "regions": regions},
            _saver(task, "seg"),
        ]
    steps = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, _keep_largest(task), _saver(task, "pred")]
    if with_label:
        steps.append({"_target_": "AsDiscreted", "keys": ["pred", "label"], "to_onehot": "@num_classes"})
        if task.void:
            steps.append({"_target_": "qtunet_monai.bundle.MaskVoidd", "keys": "pred", "label_key": "label"})
    return steps


def _metrics(task: Task) -> dict:
    return pipeline.metrics(task.sigmoid, hd95=task.hd95, iou=task.iou)


def _sliding_window(task: Task) -> dict:
    return {**pipeline.sliding_window(4 if task.spatial_dims == 3 else 2), "mode": "@sw_mode"}


def _tta(task: Task, inferer: str) -> str:
    """The evaluator's inferer: ``inferer`` itself, or wrapped in flip TTA with ``--tta True``."""
    return f"$qtunet_bundle.FlipTTAInferer({inferer}, sigmoid={task.sigmoid}) if @tta else {inferer}"


def _options(task: Task) -> dict:
    """The inference and cross-validation switches of train.json and inference.json (thesis recipe: all off)."""
    foreground = list(range(task.num_classes)) if task.sigmoid else list(range(1, task.num_classes))
    return {
        # --preset: the network options and recipe of qtunet_monai.bundle.PRESETS; an explicit override of a key wins
        "preset": task.preset,
        **{key: f"$qtunet_bundle.preset(@preset)[{key!r}]" for key in PRESET_NETWORK_KEYS},
        # UCTransNet's channel-wise skips: --skip cct --cct_preset lite (or full); null: the architecture's
        # own (concat; cct for the -CCT architectures)
        "skip": None,
        "cct_preset": None,
        # conditional light/heavy Swin blocks (CoLT5): --router light (or iterative) --capacity 0.25; the
        # capacity can change at inference (same weights); null: the network's defaults
        "router": None,
        "capacity": None,
        "router_sites": None,
        "tta": False,
        "sw_mode": pipeline.SW_MODE,
        "keep_largest": False,
        "keep_largest_labels": foreground,
        "fold": -1,
        "num_folds": 5,
        "fold_seed": 0,
        "model_dir": "$@ckpt_dir if @fold < 0 else @ckpt_dir + '/fold' + str(@fold)",
        "ckpt_file": "$@model_dir + '/model.pt'",
    }


# ------------------------------------------------------------------------------------------------- configs
# the preset keys every config needs (the network's); the training recipe's are in train.json only
PRESET_NETWORK_KEYS = NETWORK_KEYS
PRESET_RECIPE_KEYS = tuple(k for k in PRESETS["thesis"] if k not in NETWORK_KEYS)


# every config may import these; _prune_imports keeps the ones its expressions use
IMPORTS = ["$import qtunet_monai.bundle as qtunet_bundle", "$import qtunet_monai.ssl as qtunet_ssl"]


# weight decay on weight matrices and kernels only: none on relative-position bias tables, norms and biases (Swin)
PARAM_GROUPS = "$qtunet_bundle.param_groups(@network, @weight_decay)"


def _common(task: Task) -> dict:
    config = {
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
        "in_channels": task.in_channels,
        "num_classes": task.num_classes,
        "roi_size": list(task.roi_size),
        "intensity_limit": 1e6,
    }
    if task.pixdim:
        config["pixdim"] = list(task.pixdim)
    config.update(task.intensity.config())
    config.update({"architecture": task.architecture, "variant": task.variant})
    return config


def _network_def(task: Task, train: bool) -> dict:
    net = {"_target_": "qtunet_monai.bundle.build_network", "name": "@architecture",
           "in_channels": "@in_channels", "out_channels": "@num_classes", "roi_size": "@roi_size",
           "variant": "@variant"}
    if task.pixdim:
        net["pixdim"] = "@pixdim"
    # the auxiliary heads exist in inference too, so that a deep-supervised checkpoint loads (eval mode
    # returns the main output only)
    net.update({"num_stages": "@num_stages", "patch_size": "@patch_size", "deep_supervision": "@deep_supervision",
                "detail_widths": "@detail_widths", "skip": "@skip", "cct_preset": "@cct_preset",
                "router": "@router", "capacity": "@capacity", "router_sites": "@router_sites"})
    if train:
        net["drop_path_rate"] = task.drop_path_rate
    net["use_checkpoint"] = False
    return net


def _compiled_network() -> dict:
    """``--compile True``: MONAI's engines compile the network themselves (``compile=``, one static graph per
    input size, :data:`_ENGINE_COMPILE`; see qtunet_monai/networks/blocks/windows.py); checkpoints, optimiser
    and initialisation keep the plain ``network``, so saved keys stay unprefixed."""
    return {"compile": False}


#: what every engine gets: MONAI converts MetaTensors around the compiled forward and back, so TTA and
#: ``Invertd`` see the inputs' metadata as without compilation
_ENGINE_COMPILE = {"compile": "@compile", "compile_kwargs": {"dynamic": False}}


# ------------------------------------------------------------------------------------- stored settings
# qtunet_monai/bundle/settings.py: training writes these keys' values to settings.json beside the model;
# later commands use them unless told otherwise, and stop on a contradiction (--accept_settings True accepts)
CHECK_MODEL_SETTINGS = "$qtunet_bundle.check_settings(@trained, @model_settings, @accept_settings, @settings_file)"


def _travelling(config: dict, trained: str) -> dict:
    """Make ``config``'s settings travel with the model: each setting key takes the stored value
    (``@trained``) when there is one, else the value it had; adds the keys that find, read and list them.

    Args:
        config: a train or inference config (changed in place and returned).
        trained: the expression of the stored settings (``{}`` where none apply, e.g. a fresh training).
    """
    for key in (*MODEL_KEYS, *RECIPE_KEYS):
        value = config.get(key, ...)
        if value is ...:
            continue
        if isinstance(value, str) and value.startswith("$qtunet_bundle.preset(@preset)"):
            config[key] = value.replace("preset(@preset)", "preset(@preset, @trained)")
        else:
            config[key] = f"$@trained.get({key!r}, {value!r})"
    config.update({"settings_file": "$qtunet_bundle.settings_file(@ckpt_file)", "trained": trained,
                   "accept_settings": False, "model_settings": {k: f"@{k}" for k in MODEL_KEYS if k in config}})
    recipe = {k: f"@{k}" for k in RECIPE_KEYS if k in config}
    if recipe:
        config["recipe_settings"] = recipe
    return config


def _lazy(expression: str) -> str:
    """A data-list expression read only when a case is first used, so the config resolves without data."""
    return f"$qtunet_bundle.lazy(lambda: {expression[1:]})"


def train_config(task: Task) -> dict:
    config = _common(task)
    config.update({
        "label_values": list(task.label_values),
        "max_epochs": task.max_epochs,
        "val_interval": task.val_interval,
        "learning_rate": task.learning_rate,
        "weight_decay": task.weight_decay,
        "batch_size": task.batch_size,
        "num_samples": task.num_samples,
        "num_workers": task.num_workers,
        "cache_rate": task.cache_rate,
        "check_data": True,
        "resume": False,
        "finetune": False,
        "finetune_checkpoint": "$@ckpt_dir + '/pretrained.pt'",
        "imagenet_init": False,
        "imagenet_checkpoint": "$@ckpt_dir + '/swin_tiny_patch4_window7_224.pth'",
        "network_def": _network_def(task, train=True),
        "network": "$@network_def.to(@device)",
        **_compiled_network(),
        **_options(task),
        **{key: f"$qtunet_bundle.preset(@preset)[{key!r}]" for key in PRESET_RECIPE_KEYS},
        "seed": 123,
        # wall-time budget in minutes (0: none): the run stops at the epoch end before it would overrun
        "time_budget_min": 0,
    })
    config["loss"] = pipeline.loss(task.sigmoid, task.void)
    # nnU-Net's weights 1, 1/2, 1/4, ... over the outputs, finest first; MONAI shrinks the labels to each
    # output's size (nearest-exact, so label values and regions stay labels)
    config["training_loss"] = "$monai.losses.DeepSupervisionLoss(@loss, weight_mode='exp') if @deep_supervision else @loss"
    config["optimizer"] = {"_target_": "$'torch.optim.' + @optimizer_name", "params": PARAM_GROUPS,
                           "lr": "@learning_rate", "weight_decay": "@weight_decay"}
    # cosine annealing per epoch, after a linear warm-up of @warmup_epochs (0: the thesis' plain cosine)
    config["lr_scheduler"] = ("$monai.optimizers.WarmupCosineSchedule(@optimizer, warmup_steps=@warmup_epochs, "
                              "t_total=@max_epochs) if @warmup_epochs else torch.optim.lr_scheduler.CosineAnnealingLR("
                              "@optimizer, T_max=@max_epochs)")
    checked = ("$qtunet_bundle.check_cases(@{split}#datalist, @in_channels, label_values=@label_values, "
               "check_values=@check_data, spatial_dims={dims}, intensity_limit=@intensity_limit)")
    loss_out = "$monai.handlers.from_engine(['loss'], first=True)"
    config["train"] = {
        "datalist": "$qtunet_bundle.load_fold(@datalist_file, 'training', @fold, @num_folds, @fold_seed)",
        "deterministic_transforms": deterministic_transforms(task, with_label=True),
        "random_transforms": pipeline.random_transforms(task.crop, task.augment)
        + pipeline.extra_augmentation(task.spatial_dims, task.modality),
        "preprocessing": {"_target_": "Compose",
                          "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": checked.format(split="train", dims=task.spatial_dims),
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
                    "loss_function": "@training_loss",
                    "optimizer": "@optimizer", "inferer": "@train#inferer", "train_handlers": "@train#handlers",
                    "amp": "@amp"},
    }
    config["validate"] = {
        "split": "validation",
        "datalist": "$qtunet_bundle.load_fold(@datalist_file, @validate#split, @fold, @num_folds, @fold_seed)",
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": checked.format(split="validate", dims=task.spatial_dims),
                    "transform": "@validate#preprocessing", "cache_rate": "@cache_rate",
                    "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": _sliding_window(task),
        "postprocessing": {"_target_": "Compose", "transforms": [pipeline.activation(task.sigmoid),
                                                                  *pipeline.discretise(task.sigmoid, task.void)]},
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
            {"_target_": "qtunet_monai.bundle.BestModelSaver", "path": "@ckpt_file", "network": "@network"},
        ],
        "key_metric": dict(list(_metrics(task).items())[:1]),
        "additional_metrics": dict(list(_metrics(task).items())[1:]),
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
                      "network": "@network", **_ENGINE_COMPILE, "inferer": _tta(task, "@validate#inferer"),
                      "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
                      "additional_metrics": "@validate#additional_metrics", "val_handlers": "@validate#handlers",
                      "amp": "@amp"},
    }
    config["resume_checkpoint"] = {"_target_": "qtunet_monai.bundle.ResumeCheckpoint",
                                   "path": "$@model_dir + '/resume.pt'", "network": "@network",
                                   "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "resume": "@resume",
                                   "evaluator": "@validate#evaluator"}
    config["initialize"] = [
        "$monai.utils.set_determinism(seed=@seed)",
        "$qtunet_bundle.check_writable(@output_dir)",
        "$qtunet_bundle.load_imagenet_swin(@network, @imagenet_checkpoint) if @imagenet_init else None",
        "$qtunet_bundle.load_pretrained(@network, @finetune_checkpoint) if @finetune else None",
        "$@resume_checkpoint.attach(@train#trainer)",
    ]
    config["run"] = ["$@train#trainer.run()"]
    # a fresh training writes its own settings; --resume True continues with (and checks) the stored ones
    _travelling(config, f"{TRAINED} if @resume else {{}}")
    config["initialize"] = [
        ("$qtunet_bundle.check_settings(@trained, {**@model_settings, **@recipe_settings}, @accept_settings, "
         "@settings_file)"),
        *config["initialize"],
        # last: after the data checks, so a refused run leaves the stored settings alone
        "$qtunet_bundle.write_settings(@settings_file, @model_settings, @recipe_settings)",
    ]
    return config


def evaluate_config(task: Task) -> dict:
    invert = {"_target_": "Invertd", "keys": ["pred", "label"], "transform": "@validate#preprocessing",
              "orig_keys": "image", "nearest_interp": [False, True], "to_tensor": True}
    metric_names = [*_metrics(task), "inference_time"]
    return {
        "validate#split": task.eval_split,
        "validate#postprocessing": {"_target_": "Compose",
                                    "transforms": [pipeline.activation(task.sigmoid), invert,
                                                   *_save_label_map(task, True)]},
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_file", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            # before the MetricsSaver, which writes its per-case times (inference_time_raw.csv)
            {"_target_": "qtunet_monai.bundle.InferenceTimer", "name": "inference_time"},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": metric_names,
             "metric_details": metric_names, "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
             "summary_ops": "*"},
        ],
        "validate#dataset#data": checked_for_prediction(task, "@validate#datalist", with_label=True),
        "trained": TRAINED,
        "initialize": [CHECK_MODEL_SETTINGS, "$setattr(torch.backends.cudnn, 'benchmark', True)",
                       "$qtunet_bundle.check_writable(@output_dir)"],
        "run": ["$@validate#evaluator.run()"],
    }


def checked_for_prediction(task: Task, datalist: str, with_label: bool) -> str:
    """The cases to predict, checked as training cases are (files, dimensions, channels, NaN/inf and extreme
    intensities, truncated files) and refused when two would write the same prediction file; bad cases
    stop the run, or with ``--skip_bad_cases True`` (inference) are left out and listed."""
    labels = ", label_values=@label_values" if with_label else ""
    skip = "" if with_label else ", skip_bad=@skip_bad_cases"
    return (f"$qtunet_bundle.check_cases({datalist}, @in_channels{labels}, check_values=@check_data, "
            f"spatial_dims={task.spatial_dims}, intensity_limit=@intensity_limit, unique_names=True{skip})")


def inference_config(task: Task) -> dict:
    config = _common(task)
    config.update({
        # --input_dir some/folder: every image of the folder instead of the data list's 'testing' cases
        "input_dir": None,
        "datalist": (f"$qtunet_bundle.folder_datalist(@input_dir, @in_channels, {task.spatial_dims}) if @input_dir "
                     "else qtunet_bundle.load_datalist(@datalist_file, 'testing')"),
        "network_def": _network_def(task, train=False),
        "network": "$@network_def.to(@device)",
        **_compiled_network(),
        **_options(task),
        "preprocessing": {"_target_": "Compose",
                          "transforms": deterministic_transforms(task, with_label=False, pad=False)},
        "check_data": True,
        "skip_bad_cases": False,
        "dataset": {"_target_": "Dataset", "data": checked_for_prediction(task, "@datalist", with_label=False),
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": _sliding_window(task),
        "postprocessing": {"_target_": "Compose", "transforms": [
            pipeline.activation(task.sigmoid),
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            *_save_label_map(task, False),
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "@ckpt_file", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", **_ENGINE_COMPILE, "inferer": _tta(task, "@inferer"),
                      "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": "@amp"},
        "initialize": [CHECK_MODEL_SETTINGS, "$monai.utils.set_determinism(seed=123)",
                       "$qtunet_bundle.check_writable(@output_dir)"],
        "run": ["$@evaluator.run()"],
    })
    config["datalist"] = _lazy(config["datalist"])
    config["dataset"]["data"] = _lazy(config["dataset"]["data"])
    return _travelling(config, TRAINED)


def ensemble_config(task: Task) -> dict:
    """Overlay of inference.json: predict with the mean probability of the ``@num_folds`` fold models
    (``models/fold<k>/model.pt``, trained with ``--fold k``)."""
    checkpoints = "[@ckpt_dir + f'/fold{k}/model.pt' for k in range(@num_folds)]"
    return {
        "network": f"$qtunet_bundle.FoldEnsemble(@network_def, {checkpoints}, sigmoid={task.sigmoid}).to(@device)",
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],  # the members load their own weights
        # the folds share one set of settings: the first fold's
        "settings_file": "$@ckpt_dir + '/fold0/settings.json'",
    }


def export_onnx_config(task: Task) -> dict:
    """Overlay of inference.json: ``models/model.onnx`` from ``models/model.pt``, checked with onnxruntime."""
    return {
        "onnx_file": "$@model_dir + '/model.onnx'",
        "run": [("$qtunet_bundle.export_onnx(@network_def, @onnx_file, [1, @in_channels, *@roi_size], "
                 "ckpt_file=@ckpt_file)")],
    }


def _distributed_overlay(config: dict, section: str, rank0_saves: list[str], even_validation: bool = False) -> dict:
    """The torchrun overlay for a single-process ``config`` whose trainer is ``<section>#trainer``:
    DDP, distributed samplers, logging and checkpoint writing on rank 0 only, and the config's own
    ``initialize`` after joining the process group (NCCL on GPU, gloo on CPU). Each process keeps the
    common config's device, ``cuda:<LOCAL_RANK>``, so that every node uses its own GPUs.
    ``even_validation`` pads the validation shards to equal size (for metrics every rank must compute)."""
    overlay = {
        "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": "$@network_def.to(@device)",
                    "device_ids": "$[@device] if torch.device(@device).type == 'cuda' else None"},
        f"{section}#sampler": {"_target_": "DistributedSampler", "dataset": f"@{section}#dataset",
                               "even_divisible": True, "shuffle": True},
        f"{section}#dataloader#sampler": f"@{section}#sampler",
        f"{section}#dataloader#shuffle": False,
        # the section's handlers end with the three logging ones
        f"{section}#trainer#train_handlers": f"$@{section}#handlers[: -3 if dist.get_rank() > 0 else None]",
    }
    if "validate" in config:
        overlay.update({
            "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset",
                                 "even_divisible": even_validation, "shuffle": False},
            "validate#dataloader#sampler": "@validate#sampler",
            "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
        })
    overlay.update({f"{key}#save": "$dist.get_rank() == 0" for key in rank0_saves})
    overlay["initialize"] = [
        "$import torch.distributed as dist",
        # NCCL for a GPU, gloo for the CPU (--device cpu); the GPU is cuda:<LOCAL_RANK> (common config)
        "$qtunet_bundle.init_distributed(@device)",
        *config["initialize"],
    ]
    overlay["run"] = config["run"]
    # every rank waits for the others before the group goes (a rank leaving early can abort a peer, gloo)
    overlay["finalize"] = ["$qtunet_bundle.finish_distributed()"]
    return overlay


def multi_gpu_config(task: Task) -> dict:
    config = train_config(task)
    budget = next(i for i, h in enumerate(config["train"]["handlers"]) if h["_target_"].endswith("TrainingTimeBudget"))
    return _distributed_overlay(config, "train", ["resume_checkpoint", f"train#handlers#{budget}"])


def pretrain_config(task: Task) -> dict:
    """Self-supervised pre-training of the encoder on the task's images (labels ignored), docs/architecture.md section 4."""
    recipe = task.pretrain
    config = _common(task)
    for key in ("num_classes", "architecture", "ckpt_file"):
        config.pop(key)
    config.update({
        "roi_size": list(recipe.roi_size),
        "max_epochs": recipe.max_epochs,
        "warmup_epochs": recipe.warmup_epochs,
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "batch_size": recipe.batch_size,
        "accumulation_steps": recipe.accumulation_steps,
        "base_momentum": 0.996,
        "collapse_threshold": 0.1,
        # held-out cases for validation losses: this fraction of the training images, at most this many
        # (the thesis kept 100 of its 3,597 CT-SSL scans)
        "val_fraction": 0.1,
        "val_max_cases": 100,
        "val_interval": 1,
        "num_workers": task.num_workers,
        "cache_rate": task.cache_rate,
        "check_data": True,
        "resume": False,
        "encoder_file": "$@ckpt_dir + '/pretrained.pt'",
        "network_def": {"_target_": "qtunet_monai.ssl.QTUNetSSL", "in_channels": "@in_channels",
                        "roi_size": "@roi_size", "spatial_dims": task.spatial_dims, "variant": "@variant",
                        "merge_depth": True},
        "network": "$@network_def.to(@device)",
        "optimizer": {"_target_": "torch.optim.Adam", "params": PARAM_GROUPS, "lr": "@learning_rate",
                      "weight_decay": "@weight_decay"},
        "lr_scheduler": {"_target_": "monai.optimizers.WarmupCosineSchedule", "optimizer": "@optimizer",
                         "warmup_steps": "@warmup_epochs", "t_total": "@max_epochs"},
    })
    losses = "$lambda out: {k: out[k] for k in ('loss', 'loss_reconstruction', 'loss_rotation', 'loss_byol', 'collapse')}"
    config["pretrain"] = {
        # labels ignored; only the training cases' images, so the task's validation images stay unseen; of
        # those, a fixed subset is held out for the pre-training validation losses
        "cases": "$qtunet_ssl.split_validation([{'image': c['image']} for c in "
                 "qtunet_bundle.load_datalist(@datalist_file, 'training')], @val_max_cases, @val_fraction)",
        "datalist": "$@pretrain#cases[0]",
        "transforms": [
            *deterministic_transforms(task, with_label=False),
            {"_target_": "RandSpatialCropd", "keys": "image", "roi_size": "@roi_size", "random_size": False},
            {"_target_": "qtunet_monai.ssl.TwoViewsd", "keys": "image"},
        ],
        "dataset": {"_target_": "CacheDataset",
                    "data": f"$qtunet_bundle.check_cases(@pretrain#datalist, @in_channels, check_values=@check_data, "
                            f"spatial_dims={task.spatial_dims}, intensity_limit=@intensity_limit)",
                    "transform": {"_target_": "Compose", "transforms": "@pretrain#transforms"},
                    "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@pretrain#dataset", "batch_size": "@batch_size",
                       "shuffle": True, "num_workers": "@num_workers", "drop_last": False},
        # multi_gpu_pretrain.json drops the last three (logging) handlers on ranks > 0: keep them last
        "handlers": [
            {"_target_": "qtunet_monai.bundle.StopOnNonFiniteLoss"},
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": "@val_interval"},
            {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
            {"_target_": "StatsHandler", "tag_name": "ssl", "output_transform": losses},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "ssl",
             "output_transform": losses},
            {"_target_": "ignite.handlers.ProgressBar", "persist": False},
        ],
        "trainer": {"_target_": "qtunet_monai.ssl.SSLTrainer", "max_epochs": "@max_epochs", "device": "@device",
                    "train_data_loader": "@pretrain#dataloader", "network": "@network", "optimizer": "@optimizer",
                    "accumulation_steps": "@accumulation_steps", "base_momentum": "@base_momentum",
                    "train_handlers": "@pretrain#handlers", "amp": "@amp"},
    }
    config["validate"] = {
        "datalist": "$@pretrain#cases[1]",
        "dataset": {"_target_": "CacheDataset",
                    # a one-case pre-training list holds nothing out: no validation (check_cases refuses empty lists)
                    "data": f"$qtunet_bundle.check_cases(@validate#datalist, @in_channels, check_values=@check_data, "
                            f"spatial_dims={task.spatial_dims}) if @validate#datalist else []",
                    "transform": {"_target_": "Compose", "transforms": "@pretrain#transforms"},
                    "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": "@batch_size",
                       "shuffle": False, "num_workers": "@num_workers"},
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
        ],
        # val_loss (the best is the lowest) and each head's loss, averaged over the held-out cases
        "evaluator": {"_target_": "qtunet_monai.ssl.SSLEvaluator", "device": "@device",
                      "val_data_loader": "@validate#dataloader", "network": "@network",
                      "val_handlers": "@validate#handlers", "amp": "@amp"},
    }
    config["collapse_monitor"] = {"_target_": "qtunet_monai.ssl.CollapseMonitor", "threshold": "@collapse_threshold"}
    config["encoder_saver"] = {"_target_": "qtunet_monai.ssl.EncoderSaver", "path": "@encoder_file",
                               "network": "@network"}
    config["resume_checkpoint"] = {"_target_": "qtunet_monai.bundle.ResumeCheckpoint",
                                   "path": "$@ckpt_dir + '/pretrain_resume.pt'", "network": "@network",
                                   "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "resume": "@resume"}
    config["initialize"] = [
        "$monai.utils.set_determinism(seed=123)",
        "$qtunet_bundle.check_writable(@output_dir)",
        "$@resume_checkpoint.attach(@pretrain#trainer)",
        "$@collapse_monitor.attach(@pretrain#trainer)",
        "$@encoder_saver.attach(@pretrain#trainer)",
    ]
    config["run"] = ["$@pretrain#trainer.run()"]
    return config


def multi_gpu_pretrain_config(task: Task) -> dict:
    # every rank validates at least one case: the mean losses are all-reduced, a rank without cases would hang
    return _distributed_overlay(pretrain_config(task), "pretrain", ["resume_checkpoint", "encoder_saver"],
                                even_validation=True)


def metadata(task: Task) -> dict:
    packages = {k: VERSIONS[k] for k in ("qtunet_monai", "nibabel", "pytorch-ignite", "tensorboard", "tqdm")}
    if task.spatial_dims == 2:
        packages["pillow"] = VERSIONS["pillow"]
    packages.update({name: VERSIONS[name] for name in task.extra_packages})
    channel_names = {str(i): c for i, c in enumerate(task.channels)}
    classes = {str(i): c for i, c in enumerate(task.classes)}
    activation = "sigmoid, one channel per overlapping region" if task.sigmoid else "softmax"
    label = "" if task.pretraining_only else (f"single channel, label values {list(task.label_values)}; converted to the regions "
             + ", ".join(f"{c} = {list(r)}" for c, r in zip(task.classes, task.regions))) if task.sigmoid else (
        f"single channel, label ids mapped to {task.num_classes} classes (0 void, ignored)" if task.label_map else
        "single channel: " + ", ".join(f"{i} {c}" for i, c in enumerate(task.classes)))
    image_format = {"MR": "magnitude", "CT": "hounsfield", "RGB": "RGB"}[task.modality]
    meta = {
        "schema": SCHEMA_URL,
        "version": task.version,
        "changelog": {task.version: task.changelog},
        "monai_version": VERSIONS["monai"],
        "pytorch_version": VERSIONS["pytorch"],
        "numpy_version": VERSIONS["numpy"],
        "required_packages_version": packages,
        "supported_apps": {},
        "name": task.title,
        "task": task.description,
        "description": task.description_text,
        "authors": "qtunet_monai contributors",
        "copyright": "Copyright (c) qtunet_monai contributors",
        "data_source": task.data_source,
        "data_type": "png" if task.spatial_dims == 2 else "nibabel",
        "image_classes": f"{task.in_channels} channel(s): " + ", ".join(task.channels),
        "label_classes": label,
        "pred_classes": f"{task.num_classes} channels ({activation}): " + ", ".join(
            f"{i} {c}" for i, c in enumerate(task.classes)),
        # only a result measured with this package (the demo); the thesis' figures are in docs/README.md
        "eval_metrics": dict(task.eval_metrics),
        "intended_use": task.intended_use,
        "references": list(task.references),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": image_format, "modality": task.modality, "num_channels": task.in_channels,
                "spatial_shape": list(task.roi_size), "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": channel_names}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": task.num_classes,
                "spatial_shape": list(task.roi_size), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": classes}},
        },
    }
    if task.pretraining_only:  # the product is an encoder; the network's output is the reconstruction
        meta["network_data_format"]["outputs"]["pred"].update(
            {"format": image_format, "num_channels": task.in_channels, "value_range": [], "channel_def": channel_names})
        meta.update({"label_classes": "none: self-supervised",
                     "pred_classes": "reconstruction of the input (pre-training head); the product is the encoder "
                                     "in models/pretrained.pt"})
    if not meta["eval_metrics"]:  # nothing measured yet: no number that reads like a result
        del meta["eval_metrics"]
    return meta


# --------------------------------------------------------------------------------------------------- docs
def docs_readme(task: Task) -> str:
    roi = " x ".join(map(str, task.roi_size))
    spacing = f"resampled to {' x '.join(map(str, task.pixdim))} mm, " if task.pixdim else ""
    intensity = task.intensity.describe()
    crop = task.crop.describe()
    outputs = ("sigmoid outputs, one per overlapping region: " + ", ".join(
        f"{c} = labels {list(r)}" for c, r in zip(task.classes, task.regions)) if task.sigmoid
        else "softmax over " + ", ".join(f"{i} {c}" for i, c in enumerate(task.classes)))
    metrics = "mean Dice (background excluded)" + (", HD95 in mm (voxels are 1 mm)" if task.hd95 else "") + (
        ", mean IoU (MONAI's MeanIoU: per image over the classes present, then averaged)" if task.iou else "")
    fake_dir = "fake_data"
    prediction = "PNG label images of class ids" if task.spatial_dims == 2 else "NIfTI label maps with the input's geometry"
    if task.sigmoid:
        prediction += " (regions painted back to the data set's label values)"
    note = f"\n{task.docs_note}\n" if task.docs_note else ""
    void = ("\nVoid pixels (class 0) are left out of the loss (`VoidMaskedDiceLoss`) and of the metrics "
            "(`MaskVoidd`); the thesis trained on them and regretted it (its section 6.2.2).\n" if task.void else "")
    arch_2d = task.spatial_dims == 2
    ablation = "QT-UNet-2D-A" if arch_2d else "QT-UNet-A`, `VT-UNet` or `VT-UNet-A"
    return f"""# {task.title}

{task.description}, with {task.architecture} (Querying Transformer UNet, `qtunet_monai`), following the
recipe of the QT-UNet thesis. This bundle was generated from `qtunet_monai/tasks.py`
(`python tools/generate_bundles.py` in the repository); edit the task there to change all of its configs at once,
or edit the files here for a local experiment.

## Data
{task.data_docs}

Then write the bundle's data list (absolute paths):

```bash
python -m qtunet_monai prepare_data {task.data} /path/to/download --output_file data/datalist.json
```

No data set at hand? Write a tiny fake one in the official layout and use it the same way (only for
checking that everything runs; it has the right channels, label values and file names, nothing else):

```bash
python -m qtunet_monai fake_data {task.data} /tmp/{fake_dir}
python -m qtunet_monai prepare_data {task.data} /tmp/{fake_dir} --output_file data/datalist.json
```

Every case is checked before training, evaluation and inference start (`--check_data False` reads
headers only): missing, unreadable or truncated files, wrong channel counts or dimensions, image/label
shape mismatches, a label whose orientation, spacing or origin differs from its image's (headers compared), NaN, infinite or extreme intensities (beyond `--intensity_limit`, 1e6), label values
outside {list(task.label_values)} and two inputs whose predictions would get the same name stop the run
with one line per problem naming the file; `--skip_bad_cases True` (inference) leaves bad cases out and
lists them instead. A NaN or infinite loss stops training naming the iteration and the batch's files,
and no checkpoint with non-finite weights is ever written. Set `QTUNET_MONAI_DEBUG=1` to see the full
traceback behind such a message.

## Pipeline
- Input: {task.in_channels} channel(s) ({", ".join(task.channels)}); {spacing}{intensity}.
- Training: {crop} of {roi}, batch {task.batch_size}, {task.max_epochs} epochs, Adam (lr {task.learning_rate},
  weight decay {task.weight_decay}, not on relative-position bias tables, norms and biases), cosine annealing,
  drop path {task.drop_path_rate}, Dice loss.
- Output: {outputs}.
- Validation every {task.val_interval} epochs: sliding window {roi}, overlap {pipeline.SW_OVERLAP}, {pipeline.SW_MODE} blending;
  {metrics}; the best model is saved as `models/model.pt`.
{note}{void}
## Commands
Run from this folder. CPU works (slowly); a GPU is used when present (AMP on).

```bash
# train (validation every {task.val_interval} epochs, TensorBoard logs in eval/)
python -m monai.bundle run --config_file configs/train.json
# resume a killed or stopped run from models/resume.pt (written atomically every epoch)
python -m monai.bundle run --config_file configs/train.json --resume True
# initialise from a (pre-training) checkpoint; loaded, missing and unexpected keys are reported
python -m monai.bundle run --config_file configs/train.json --finetune True --finetune_checkpoint /path/to/checkpoint.pt
# several GPUs (NCCL; gloo on CPU); each process uses cuda:<LOCAL_RANK> of its node, so the same command
# runs on every node of a multi-node job (--nnodes N --node_rank i --master_addr ...); --device cpu: gloo on CPU
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run \\
    --config_file "['configs/train.json','configs/multi_gpu_train.json']"
# evaluate models/model.pt on the '{task.eval_split}' split: per-case metrics and predictions in eval/
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"
# predict the 'testing' split ({prediction}, in eval/)
python -m monai.bundle run --config_file configs/inference.json
# TorchScript (traced at the metadata's spatial_shape)
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --use_trace True \\
    --input_shape "[1, {task.in_channels}, {", ".join(map(str, task.roi_size))}]"
```

Predict other files: `--datalist "[{{'image': '/path/to/case{'.png' if arch_2d else '.nii.gz'}'}}]"`.
Another model: `--ckpt_dir /path/to/models` (its `model.pt`) or `--ckpt_file /path/to/model.pt`, for
training (where the best model is written), evaluation and inference alike.

## Self-supervised pre-training (labels ignored)
```bash
python -m monai.bundle run --config_file configs/pretrain.json     # writes models/pretrained.pt (the encoder)
python -m monai.bundle run --config_file configs/train.json --finetune True --finetune_checkpoint models/pretrained.pt
```
`configs/pretrain.json` pre-trains the encoder on this task's images (reconstruction of cut-out
views, rotation classes, BYOL; {task.pretrain.describe()}). The BYOL target moves
once per optimiser step. A fixed tenth of the training images (at most 100, `val_fraction`,
`val_max_cases`) is held out: their losses are logged every `val_interval` epochs as `val_loss*`.
Each loss and a collapse signal go to TensorBoard, and a warning names the epoch if the projections
collapse or if the reconstruction and rotation losses jump while the BYOL loss stays low (the collapse
the thesis saw). Several GPUs: `torchrun ... --config_file
"['configs/pretrain.json','configs/multi_gpu_pretrain.json']"`. Out-of-task pre-training:
`bundles/qtunet_ctssl_pretraining` (CT) and `bundles/qtunet_mrissl_pretraining` (MRI).

## Variants and the thesis' ablations
`--variant small` or `--variant base` (default `{task.variant}`); `--architecture {ablation}`
for the ablations of the thesis. Give the same overrides to every command of a run. Memory:
`--network_def#use_checkpoint True` trades compute for activation memory. `--compile True` runs
training, validation and inference through `torch.compile(network, dynamic=False)`: the first steps
compile, then one static recompilation per new input size (training and sliding-window inference see
one size); checkpoints are unchanged. ImageNet initialisation of
the encoder, as the thesis did for Base: `--variant base --imagenet_init True --imagenet_checkpoint
/path/to/swin_tiny_patch4_window7_224.pth` (a Swin-T file you supply, timm or official names;
inflated to 3D, nothing is downloaded).

## Presets: the thesis' recipe or the accurate one
`--preset {"accurate" if task.preset == "thesis" else "thesis"}` (default `{task.preset}`), given to every command of a run, sets the network
options and training recipe of `qtunet_monai.bundle.PRESETS` at once; an explicit override of one of
its keys still wins. `thesis` is the thesis' network and recipe. `accurate` adds the full-resolution
detail path (`--detail_widths "{PRESETS["accurate"]["detail_widths"]}"`: residual conv blocks at full and 1/2
resolution, a conv decoder step from the last transformer stage to the input grid, SwinUNETR's
`encoder1`/`decoder1` role). It was chosen by validation Dice in an accuracy campaign on the demo
bundle only (`benchmarks/demo_options.py`, table in the demo bundle's docs), not on this task: the
task's spacing, ROI, learning rate and epochs stay as above. `--time_budget_min M` ends training
at the last epoch end within M minutes of wall time (validated, best model kept; the record with every
validation's time and Dice goes to `eval/training_time.json`); `--seed N` changes the random seed.

## Baselines, inference options and cross-validation
Off by default (the thesis' recipe); each is one switch, given to every command of a run.

| override | effect |
|---|---|
| `--architecture SwinUNETR` (`UNETR`, `SegResNet`, `DynUNet`) | MONAI's network in this same pipeline (data, loss, schedule, metrics unchanged): SwinUNETR feature size 48, UNETR feature size 16, SegResNet 16 filters, DynUNet with nnU-Net's kernels and strides for the ROI and spacing; inputs zero-padded inside the network to the size it needs (SwinUNETR and UNETR need `pip install "qtunet_monai[baselines]"`) |
| `--tta True` | mean probability over all {2 ** task.spatial_dims} flips of the {task.spatial_dims} spatial axes (validation, evaluation, inference) |
| `--keep_largest True` | keep the largest connected component of each {"region channel" if task.sigmoid else "class"} in `--keep_largest_labels "{_options(task)["keep_largest_labels"]}"` in the saved prediction, scored so by evaluation (MONAI's `KeepLargestConnectedComponentd`; on CPU it needs `pip install "qtunet_monai[postprocessing]"`) |
| `--deep_supervision True` | auxiliary heads on the decoder stages (QT-UNet family, DynUNet), trained with MONAI's `DeepSupervisionLoss` (weights 1, 1/2, 1/4, ... finest first, labels shrunk nearest-exact); inference output and `ckpt_export` unchanged |
| `--num_stages 4`, `--patch_size 2` | a fourth encoder/decoder stage, a 2-voxel patch partition (QT-UNet family; the thesis' section 6.2.1) |
| `--detail_widths "[12, 24]"` | the full-resolution detail path (QT-UNet family; `[16]`: full resolution only; `"[]"`: none) |
| `--skip cct --cct_preset lite` | UCTransNet's channel-wise skips: a channel transformer over all encoder skips (`full`: 4 layers and heads; `lite`: 1) and a channel gate in each decoder step (QT-UNet family) |
| `--router light --capacity 0.25` | conditional Swin blocks (CoLT5): a light attention/MLP over all tokens plus the dense one over the quarter of each window's tokens (of the volume's, for the MLP) a learned router picks (`iterative`: CoLT5's soft top-k router; `--router_sites "['encoder','bottleneck']"`: where). Train with it; `--capacity 0.5` at inference changes the routed share of the same weights (QT-UNet family) |
| `--intensity_augmentation True`, `--spatial_augmentation True` | nnU-Net-style gamma, noise{" and bias field" if task.modality == "MR" else ""}; a random rotation (15 degrees) and scaling (15 %) of the crops |
| `--optimizer_name AdamW --warmup_epochs 3` | another `torch.optim` optimiser; a linear learning-rate warm-up before the cosine |
| `--sw_mode gaussian` | Gaussian instead of constant blending of the sliding windows |
| `--fold k --num_folds 5 --fold_seed 0` | train on the other folds of the data list's `training` cases and validate on fold k; the split is written into `data/datalist.json` (a `fold` per case), models go to `models/fold<k>/` |

```bash
# after training every fold: predict with the mean probability of the fold models
python -m monai.bundle run --config_file "['configs/inference.json','configs/inference_ensemble.json']" --num_folds 5
# ONNX (pip install "qtunet_monai[onnx]"): models/model.onnx, checked against PyTorch with onnxruntime
python -m monai.bundle run --config_file "['configs/inference.json','configs/export_onnx.json']"
```
The ONNX model of QT-UNet has the fixed ROI size (its window geometry is computed from the feature
map's integer size, which the exporter freezes); the sliding window feeds it ROI-sized patches, so it
still predicts images of any size. `configs/evaluate.json` also writes each case's inference time
(`eval/inference_time_raw.csv`).

## GPU memory and time
Not measured by us: no GPU was available where this bundle was written. The thesis trained on NVIDIA
A100 GPUs. `python -m qtunet_monai bench --device cuda` measures speed and memory of the variants
at this ROI against MONAI's SwinUNETR on your GPU.

## Result to compare with
{task.thesis_result}

## References
""" + "\n".join(f"- {r}" for r in task.references) + "\n"


def pretraining_readme(task: Task) -> str:
    roi = " x ".join(map(str, task.pretrain.roi_size))
    intensity = task.intensity.describe()
    return f"""# {task.title}

{task.description}. Out-of-task pre-training as in the QT-UNet thesis (section 4 of the repository's
docs/architecture.md): the encoder
learns from unlabelled volumes, then initialises any task bundle. Generated from
`qtunet_monai/tasks.py` (`python tools/generate_bundles.py` in the repository).

## Data
{task.data_docs}

```bash
python -m qtunet_monai prepare_data {task.data} /path/to/volume/tree --output_file data/datalist.json
# or, to try it: python -m qtunet_monai fake_data {task.data} /tmp/fake && python -m qtunet_monai prepare_data {task.data} /tmp/fake --output_file data/datalist.json
```

## Pipeline
{task.pixdim[0]} mm isotropic spacing, {intensity}, foreground crop, random {roi} crops; two views per
crop, each an independent draw of a 0/90/180/270 degree rotation in the axial plane and random
cut-out boxes. Heads: reconstruction (transposed convolution, L1 against the un-masked view),
rotation (MLP with BatchNorm and ReLU, cross-entropy), BYOL (projector, predictor, EMA target,
symmetrised cosine loss); the loss is their unweighted sum. {task.pretrain.describe()} (per GPU; the
thesis used 2). A fixed tenth of the volumes, at most 100 (`val_fraction`, `val_max_cases`; the thesis
held out 100 of its 3,597 CT-SSL scans), is held out; their losses are logged every `val_interval`
epochs (`val_loss`, `val_loss_reconstruction`, `val_loss_rotation`, `val_loss_byol`).

## Commands
```bash
python -m monai.bundle run --config_file configs/pretrain.json                 # --variant small / base
python -m monai.bundle run --config_file configs/pretrain.json --resume True   # after a kill
torchrun --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run \\
    --config_file "['configs/pretrain.json','configs/multi_gpu_pretrain.json']"
# then, in a task bundle with the same variant and a CT (or MRI) input:
python -m monai.bundle run --config_file configs/train.json --finetune True --finetune_checkpoint /path/to/models/pretrained.pt
```

`models/pretrained.pt` holds the online encoder under QT-UNet's parameter names and is rewritten
atomically after every epoch; fine-tuning reports loaded, missing (the decoder) and unexpected keys
and refuses mismatched shapes. TensorBoard (`eval/`) gets each loss and the collapse signal (the
spread of the normalised projections, about 1 when healthy). A warning names the epoch when the
spread falls below `collapse_threshold`, and when the epoch's reconstruction and rotation losses
jump (twice their lowest earlier value) while the BYOL loss stays low: what the thesis' Base model
did on CT-SSL, unnoticed until later. Several nodes: every process uses `cuda:<LOCAL_RANK>` of its
own node; `--device cpu` runs the processes on the CPU with gloo.

## Result to compare with
{task.thesis_result}

## References
""" + "\n".join(f"- {r}" for r in task.references) + "\n"


# --------------------------------------------------------------------------------------------- writing
def _expressions(value) -> list[str]:
    """Every ``$`` expression string inside a config."""
    if isinstance(value, str):
        return [value] if value.startswith("$") else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [e for v in items for e in _expressions(v)]


def _prune_imports(config: dict, *merged_with: dict) -> dict:
    """Drop the ``imports`` that no expression of ``config`` (or of the overlays it is merged with) uses."""
    if "imports" not in config:
        return config
    used = " ".join(e for c in (config, *merged_with) for e in _expressions(c) if not e.startswith("$import"))
    keep = [i for i in config["imports"] if re.search(rf"\b{re.escape(i.split()[-1])}\b", used)]
    return {**config, "imports": keep} if keep else {k: v for k, v in config.items() if k != "imports"}


def _dumps(value) -> str:
    """The model zoo's layout (``json.dumps(indent=4)``) with a trailing newline."""
    return json.dumps(value, indent=4) + "\n"


def render_bundle(task: Task) -> dict[str, str]:
    """The bundle's generated files: relative path -> text."""
    files = {"configs/metadata.json": metadata(task)}
    if not task.pretraining_only:
        train, evaluate, multi_gpu = train_config(task), evaluate_config(task), multi_gpu_config(task)
        files.update({
            "configs/train.json": _prune_imports(train, evaluate, multi_gpu),
            "configs/evaluate.json": evaluate,
            "configs/inference.json": _prune_imports(inference_config(task)),
            "configs/inference_ensemble.json": ensemble_config(task),
            "configs/export_onnx.json": export_onnx_config(task),
            "configs/multi_gpu_train.json": multi_gpu,
        })
    pretrain, multi_gpu_pretrain = pretrain_config(task), multi_gpu_pretrain_config(task)
    files["configs/pretrain.json"] = _prune_imports(pretrain, multi_gpu_pretrain)
    files["configs/multi_gpu_pretrain.json"] = multi_gpu_pretrain
    out = {path: _dumps(content) for path, content in files.items()}
    out["configs/logging.conf"] = LOGGING_CONF
    out[".gitignore"] = "# written by the commands in docs/README.md\ndata/\nmodels/\neval/\n"
    out["LICENSE"] = (REPO / "LICENSE").read_text() if (REPO / "LICENSE").is_file() else ""
    if task.generated_docs:
        out["docs/README.md"] = pretraining_readme(task) if task.pretraining_only else docs_readme(task)
    return out


def write_bundles(root: str | Path = REPO / "bundles", names: list[str] | None = None) -> list[Path]:
    """Write (overwrite) the generated files of the named bundles (default all); returns the files written."""
    written = []
    for name, task in TASKS.items():
        if names and name not in names and task.data not in names:
            continue
        for rel, text in render_bundle(task).items():
            path = Path(root) / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written


def check_bundles(root: str | Path = REPO / "bundles") -> list[str]:
    """Generated files that are missing from ``root`` or differ from what the tasks generate."""
    stale = []
    for name, task in TASKS.items():
        for rel, text in render_bundle(task).items():
            path = Path(root) / name / rel
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
    return stale


def main(argv: list[str] | None = None) -> int:
    """Command line: write the bundles, or with ``--check`` list the generated files that drifted."""
    parser = argparse.ArgumentParser(description="(Re)write bundles/ from qtunet_monai/tasks.py.")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit status 1 on drift")
    parser.add_argument("--root", default=str(REPO / "bundles"), help="the bundles folder (default: %(default)s)")
    parser.add_argument("names", nargs="*", help="bundle folders or data keys to write (default: all)")
    args = parser.parse_args(argv)
    if args.check:
        stale = check_bundles(args.root)
        if stale:
            print("out of date (run python tools/generate_bundles.py):\n  " + "\n  ".join(stale))
            return 1
        print("all bundles match qtunet_monai/tasks.py")
        return 0
    print(f"{len(write_bundles(args.root, args.names or None))} files written under {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
