# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Generate the MONAI bundles under ``bundles/`` from :data:`qtunet_monai.tasks.TASKS` (repository
tooling: nothing in the installed package imports this file).

What the bundles share (the engines, handlers, checkpointing, resume and fine-tune switches,
distributed training, evaluation and inference) is written once here; the pipeline pieces (transforms,
loss, post-processing, metrics, inferer) come from :mod:`qtunet_monai.pipeline`, which the Auto3DSeg
template instantiates too; what differs comes from the task. The docs' text is in ``tools/templates/``
(``string.Template`` files), filled with sections computed from the task. The generated files are committed,
so every bundle stays a self-contained folder a user can read and edit.

Usage, from the repository root::

    python tools/generate_bundles.py            # (re)write bundles/
    python tools/generate_bundles.py --check    # list drifted files, exit status 1 if any (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import re
import string
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
# pillow 13 need 3.11). tests/bundle/test_settings.py checks this.
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
    source = task.source
    return pipeline.deterministic_transforms(source.intensity, source.spatial_dims, with_label,
                                             resample=source.pixdim is not None, crop_foreground=source.crop_foreground,
                                             regions=source.regions, label_map=source.label_map, pad=pad)


def _saver(task: Task, key: str) -> dict:
    # written to a temporary name and renamed: a killed or concurrent writer never leaves a truncated file
    saver = {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False,
             "writer": "qtunet_monai.bundle.AtomicNibabelWriter"}
    if task.source.spatial_dims == 2:
        saver.update({"output_ext": ".png", "writer": "qtunet_monai.bundle.AtomicPILWriter", "scale": None})
    return saver


def _keep_largest(task: Task) -> dict:
    """Largest connected component per class (``--keep_largest True``; classes ``@keep_largest_labels``):
    on the label map of a softmax task, on each thresholded channel of a sigmoid one."""
    return {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": "@keep_largest_labels",
            "is_onehot": task.source.sigmoid, "independent": True, "_disabled_": "$not @keep_largest"}


def _save_label_map(task: Task, with_label: bool) -> list[dict]:
    """From the (inverted) probabilities: a label map written to disk; with a label, keep one-hot for the metrics."""
    if task.source.sigmoid:
        regions = [list(r) for r in task.source.regions]
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
        if task.source.void:
            steps.append({"_target_": "qtunet_monai.bundle.MaskVoidd", "keys": "pred", "label_key": "label"})
    return steps


def _metrics(task: Task) -> dict:
    return pipeline.metrics(task.source.sigmoid, hd95=task.recipe.hd95, iou=task.recipe.iou)


def _sliding_window(task: Task) -> dict:
    return {**pipeline.sliding_window(4 if task.source.spatial_dims == 3 else 2), "mode": "@sw_mode"}


def _tta(task: Task, inferer: str) -> str:
    """The evaluator's inferer: ``inferer`` itself, or wrapped in flip TTA with ``--tta True``."""
    return f"$qtunet_bundle.FlipTTAInferer({inferer}, sigmoid={task.source.sigmoid}) if @tta else {inferer}"


def _options(task: Task) -> dict:
    """The inference and cross-validation switches of train.json and inference.json (thesis recipe: all off)."""
    source, recipe = task.source, task.recipe
    foreground = list(range(source.num_classes)) if source.sigmoid else list(range(1, source.num_classes))
    return {
        # --preset: the network options and recipe of qtunet_monai.bundle.PRESETS; an explicit override of a key wins
        "preset": recipe.preset,
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
        "in_channels": task.source.in_channels,
        "num_classes": task.source.num_classes,
        "roi_size": list(task.recipe.roi_size),
        "intensity_limit": 1e6,
    }
    if task.source.pixdim:
        config["pixdim"] = list(task.source.pixdim)
    config.update(task.source.intensity.config())
    config.update({"architecture": task.recipe.architecture, "variant": task.recipe.variant})
    return config


def _network_def(task: Task, train: bool) -> dict:
    net = {"_target_": "qtunet_monai.bundle.build_network", "name": "@architecture",
           "in_channels": "@in_channels", "out_channels": "@num_classes", "roi_size": "@roi_size",
           "variant": "@variant"}
    if task.source.pixdim:
        net["pixdim"] = "@pixdim"
    # the auxiliary heads exist in inference too, so that a deep-supervised checkpoint loads (eval mode
    # returns the main output only)
    net.update({"num_stages": "@num_stages", "patch_size": "@patch_size", "deep_supervision": "@deep_supervision",
                "detail_widths": "@detail_widths", "skip": "@skip", "cct_preset": "@cct_preset",
                "router": "@router", "capacity": "@capacity", "router_sites": "@router_sites"})
    if train:
        net["drop_path_rate"] = task.recipe.drop_path_rate
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
        elif isinstance(value, str) and value.startswith("$"):  # an expression: the stored value, else its value
            config[key] = f"$@trained.get({key!r}, {value[1:]})"
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


# ------------------------------------------------------------------- training machinery shared with tools/
# generate_reconstruction_bundle.py (one definition of the engines' handlers, schedule and checkpoints)
#: cosine annealing per epoch, after a linear warm-up of @warmup_epochs (0: the thesis' plain cosine)
LR_SCHEDULER = "$qtunet_bundle.lr_schedule(@optimizer, @warmup_epochs, @max_epochs)"


def train_section(loss: str) -> dict:
    """The ``train`` section's data loader, inferer, handlers and trainer (the caller adds data and transforms).

    Args:
        loss: the trainer's loss function (a config reference).
    """
    loss_out = "$monai.handlers.from_engine(['loss'], first=True)"
    return {
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
                    "loss_function": loss, "optimizer": "@optimizer", "inferer": "@train#inferer",
                    "train_handlers": "@train#handlers", "amp": "@amp"},
    }


def validation_handlers() -> list[dict]:
    """The validator's handlers: logs and the best model written to ``@ckpt_file``."""
    return [
        {"_target_": "StatsHandler", "iteration_log": False},
        {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
        {"_target_": "qtunet_monai.bundle.BestModelSaver", "path": "@ckpt_file", "network": "@network"},
    ]


def validation_evaluator(inferer: str) -> dict:
    """The ``validate`` section's ``SupervisedEvaluator``.

    Args:
        inferer: its inferer (a config reference or expression).
    """
    return {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
            "network": "@network", **_ENGINE_COMPILE, "inferer": inferer,
            "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
            "additional_metrics": "@validate#additional_metrics", "val_handlers": "@validate#handlers",
            "amp": "@amp"}


def resume_checkpoint(path: str) -> dict:
    """``--resume True``: network, optimiser, schedule and validation state, written atomically every epoch.

    Args:
        path: the checkpoint's path expression.
    """
    return {"_target_": "qtunet_monai.bundle.ResumeCheckpoint", "path": path, "network": "@network",
            "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "resume": "@resume",
            "evaluator": "@validate#evaluator"}


def checkpoint_loader() -> dict:
    """Evaluation and inference load ``@ckpt_file`` into the network."""
    return {"_target_": "CheckpointLoader", "load_path": "@ckpt_file", "load_dict": {"model": "@network"},
            "map_location": "@device"}


def evaluation_handlers(metric_names: list[str]) -> list[dict]:
    """evaluate.json's handlers: the model, logs, per-case inference times and metrics (``eval/*_raw.csv``).

    Args:
        metric_names: the metrics ``MetricsSaver`` writes (``inference_time`` last).
    """
    return [
        checkpoint_loader(),
        {"_target_": "StatsHandler", "iteration_log": False},
        # before the MetricsSaver, which writes its per-case times (inference_time_raw.csv)
        {"_target_": "qtunet_monai.bundle.InferenceTimer", "name": "inference_time"},
        {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": metric_names,
         "metric_details": metric_names, "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
         "summary_ops": "*"},
    ]


def train_config(task: Task) -> dict:
    source, recipe = task.source, task.recipe
    config = _common(task)
    config.update({
        "label_values": list(source.label_values),
        "max_epochs": recipe.max_epochs,
        "val_interval": recipe.val_interval,
        # the task's learning rate times the preset's scale; the preset's weight decay where it has one
        "learning_rate": f"${recipe.learning_rate!r} * @learning_rate_scale",
        "weight_decay": f"$qtunet_bundle.preset(@preset, @trained).get('weight_decay', {recipe.weight_decay!r})",
        "batch_size": recipe.batch_size,
        "num_samples": recipe.num_samples,
        "num_workers": recipe.num_workers,
        "cache_rate": recipe.cache_rate,
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
    config["loss"] = pipeline.loss(source.sigmoid, source.void)
    # nnU-Net's weights 1, 1/2, 1/4, ... over the outputs, finest first; MONAI shrinks the labels to each
    # output's size (nearest-exact, so label values and regions stay labels)
    config["training_loss"] = "$monai.losses.DeepSupervisionLoss(@loss, weight_mode='exp') if @deep_supervision else @loss"
    config["optimizer"] = {"_target_": "$'torch.optim.' + @optimizer_name", "params": PARAM_GROUPS,
                           "lr": "@learning_rate", "weight_decay": "@weight_decay"}
    config["lr_scheduler"] = LR_SCHEDULER
    checked = ("$qtunet_bundle.check_cases(@{split}#datalist, @in_channels, label_values=@label_values, "
               "check_values=@check_data, spatial_dims={dims}, intensity_limit=@intensity_limit)")
    config["train"] = {
        "datalist": "$qtunet_bundle.load_fold(@datalist_file, 'training', @fold, @num_folds, @fold_seed)",
        "deterministic_transforms": deterministic_transforms(task, with_label=True),
        "random_transforms": pipeline.random_transforms(recipe.crop, recipe.augment)
        + pipeline.extra_augmentation(source.spatial_dims, source.modality),
        "preprocessing": {"_target_": "Compose",
                          "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": checked.format(split="train", dims=source.spatial_dims),
                    "transform": "@train#preprocessing", "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
        **train_section("@training_loss"),
    }
    config["validate"] = {
        "split": "validation",
        "datalist": "$qtunet_bundle.load_fold(@datalist_file, @validate#split, @fold, @num_folds, @fold_seed)",
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": checked.format(split="validate", dims=source.spatial_dims),
                    "transform": "@validate#preprocessing", "cache_rate": "@cache_rate",
                    "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": _sliding_window(task),
        "postprocessing": {"_target_": "Compose", "transforms": [pipeline.activation(source.sigmoid),
                                                                  *pipeline.discretise(source.sigmoid, source.void)]},
        "handlers": validation_handlers(),
        "key_metric": dict(list(_metrics(task).items())[:1]),
        "additional_metrics": dict(list(_metrics(task).items())[1:]),
        "evaluator": validation_evaluator(_tta(task, "@validate#inferer")),
    }
    config["resume_checkpoint"] = resume_checkpoint("$@model_dir + '/resume.pt'")
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
        "validate#split": task.source.eval_split,
        "validate#postprocessing": {"_target_": "Compose",
                                    "transforms": [pipeline.activation(task.source.sigmoid), invert,
                                                   *_save_label_map(task, True)]},
        "validate#handlers": evaluation_handlers(metric_names),
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
            f"spatial_dims={task.source.spatial_dims}, intensity_limit=@intensity_limit, unique_names=True{skip})")


def inference_config(task: Task) -> dict:
    source = task.source
    config = _common(task)
    config.update({
        # --input_dir some/folder: every image of the folder instead of the data list's 'testing' cases
        "input_dir": None,
        "datalist": (f"$qtunet_bundle.folder_datalist(@input_dir, @in_channels, {source.spatial_dims}) if @input_dir "
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
            pipeline.activation(source.sigmoid),
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            *_save_label_map(task, False),
        ]},
        "handlers": [checkpoint_loader(), {"_target_": "StatsHandler", "iteration_log": False}],
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
    source = task.source
    checkpoints = "[@ckpt_dir + f'/fold{k}/model.pt' for k in range(@num_folds)]"
    return {
        "network": f"$qtunet_bundle.FoldEnsemble(@network_def, {checkpoints}, sigmoid={source.sigmoid}).to(@device)",
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
    recipe = task.recipe.pretrain
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
        "num_workers": task.recipe.num_workers,
        "cache_rate": task.recipe.cache_rate,
        "check_data": True,
        "resume": False,
        "encoder_file": "$@ckpt_dir + '/pretrained.pt'",
        "network_def": {"_target_": "qtunet_monai.ssl.QTUNetSSL", "in_channels": "@in_channels",
                        "roi_size": "@roi_size", "spatial_dims": task.source.spatial_dims, "variant": "@variant",
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
                            f"spatial_dims={task.source.spatial_dims}, intensity_limit=@intensity_limit)",
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
                            f"spatial_dims={task.source.spatial_dims}) if @validate#datalist else []",
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
    source, recipe = task.source, task.recipe
    packages = {k: VERSIONS[k] for k in ("qtunet_monai", "nibabel", "pytorch-ignite", "tensorboard", "tqdm")}
    if source.spatial_dims == 2:
        packages["pillow"] = VERSIONS["pillow"]
    packages.update({name: VERSIONS[name] for name in task.docs.extra_packages})
    channel_names = {str(i): c for i, c in enumerate(source.channels)}
    classes = {str(i): c for i, c in enumerate(source.classes)}
    activation = "sigmoid, one channel per overlapping region" if source.sigmoid else "softmax"
    label = "" if task.pretraining_only else (f"single channel, label values {list(source.label_values)}; converted to the regions "
             + ", ".join(f"{c} = {list(r)}" for c, r in zip(source.classes, source.regions))) if source.sigmoid else (
        f"single channel, label ids mapped to {source.num_classes} classes (0 void, ignored)" if source.label_map else
        "single channel: " + ", ".join(f"{i} {c}" for i, c in enumerate(source.classes)))
    image_format = {"MR": "magnitude", "CT": "hounsfield", "RGB": "RGB"}[source.modality]
    meta = {
        "schema": SCHEMA_URL,
        "version": task.docs.version,
        "changelog": {task.docs.version: task.docs.changelog},
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
        "data_source": source.origin,
        "data_type": "png" if source.spatial_dims == 2 else "nibabel",
        "image_classes": f"{source.in_channels} channel(s): " + ", ".join(source.channels),
        "label_classes": label,
        "pred_classes": f"{source.num_classes} channels ({activation}): " + ", ".join(
            f"{i} {c}" for i, c in enumerate(source.classes)),
        # only a result measured with this package (the demo); the thesis' figures are in docs/README.md
        "eval_metrics": dict(task.docs.eval_metrics),
        "intended_use": task.docs.intended_use,
        "references": list(task.docs.references),
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": image_format, "modality": source.modality, "num_channels": source.in_channels,
                "spatial_shape": list(recipe.roi_size), "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": channel_names}},
            "outputs": {"pred": {
                "type": "image", "format": "segmentation", "num_channels": source.num_classes,
                "spatial_shape": list(recipe.roi_size), "dtype": "float32", "value_range": [0, 1],
                "is_patch_data": True, "channel_def": classes}},
        },
    }
    if task.pretraining_only:  # the product is an encoder; the network's output is the reconstruction
        meta["network_data_format"]["outputs"]["pred"].update(
            {"format": image_format, "num_channels": source.in_channels, "value_range": [], "channel_def": channel_names})
        meta.update({"label_classes": "none: self-supervised",
                     "pred_classes": "reconstruction of the input (pre-training head); the product is the encoder "
                                     "in models/pretrained.pt"})
    if not meta["eval_metrics"]:  # nothing measured yet: no number that reads like a result
        del meta["eval_metrics"]
    return meta


# --------------------------------------------------------------------------------------------------- docs
#: the README templates (``string.Template``: ``${name}`` placeholders, ``$$`` for a literal dollar sign)
TEMPLATES = Path(__file__).resolve().parent / "templates"


def render_template(name: str, sections: dict[str, object]) -> str:
    """``tools/templates/<name>`` with every ``${placeholder}`` filled from ``sections``.

    Args:
        name: the template file under ``tools/templates``.
        sections: placeholder -> value (``str()`` of it is inserted).

    Raises:
        KeyError: a placeholder of the template has no value in ``sections``.
    """
    return string.Template((TEMPLATES / name).read_text()).substitute(sections)


def _shared_sections(task: Task) -> dict[str, object]:
    """The placeholders both README templates have: names, data, intensity, pre-training, result, references."""
    return {
        "title": task.title,
        "description": task.description,
        "data": task.data,
        "download": task.source.download,
        "intensity": task.source.intensity.describe(),
        "pretrain": task.recipe.pretrain.describe(),
        "thesis_result": task.docs.thesis_result,
        "references": "\n".join(f"- {r}" for r in task.docs.references),
    }


def readme_sections(task: Task) -> dict[str, object]:
    """The placeholders of ``tools/templates/bundle_README.md`` for a segmentation task."""
    source, recipe = task.source, task.recipe
    outputs = ("sigmoid outputs, one per overlapping region: " + ", ".join(
        f"{c} = labels {list(r)}" for c, r in zip(source.classes, source.regions)) if source.sigmoid
        else "softmax over " + ", ".join(f"{i} {c}" for i, c in enumerate(source.classes)))
    metrics = "mean Dice (background excluded)" + (", HD95 in mm (voxels are 1 mm)" if recipe.hd95 else "") + (
        ", mean IoU (MONAI's MeanIoU: per image over the classes present, then averaged)" if recipe.iou else "")
    prediction = ("PNG label images of class ids" if source.spatial_dims == 2
                  else "NIfTI label maps with the input's geometry")
    if source.sigmoid:
        prediction += " (regions painted back to the data set's label values)"
    void = ("\nVoid pixels (class 0) are left out of the loss (`VoidMaskedDiceLoss`) and of the metrics "
            "(`MaskVoidd`); the thesis trained on them and regretted it (its section 6.2.2).\n" if source.void else "")
    arch_2d = source.spatial_dims == 2
    return {
        **_shared_sections(task),
        "architecture": recipe.architecture,
        "label_values": list(source.label_values),
        "in_channels": source.in_channels,
        "channels": ", ".join(source.channels),
        "spacing": f"resampled to {' x '.join(map(str, source.pixdim))} mm, " if source.pixdim else "",
        "crop": recipe.crop.describe(),
        "roi": " x ".join(map(str, recipe.roi_size)),
        "roi_list": ", ".join(map(str, recipe.roi_size)),
        "batch_size": recipe.batch_size,
        "max_epochs": recipe.max_epochs,
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "drop_path_rate": recipe.drop_path_rate,
        "outputs": outputs,
        "val_interval": recipe.val_interval,
        "sw_overlap": pipeline.SW_OVERLAP,
        "sw_mode": pipeline.SW_MODE,
        "metrics": metrics,
        "note": f"\n{task.docs.note}\n" if task.docs.note else "",
        "void": void,
        "eval_split": source.eval_split,
        "prediction": prediction,
        "image_ext": ".png" if arch_2d else ".nii.gz",
        "variant": recipe.variant,
        "ablation": "QT-UNet-2D-A" if arch_2d else "QT-UNet-A`, `VT-UNet` or `VT-UNet-A",
        "preset": recipe.preset,
        "other_preset": "accurate" if recipe.preset == "thesis" else "thesis",
        "detail_widths": PRESETS["accurate"]["detail_widths"],
        "spatial_dims": source.spatial_dims,
        "num_flips": 2 ** source.spatial_dims,
        "keep_largest_unit": "region channel" if source.sigmoid else "class",
        "keep_largest_labels": _options(task)["keep_largest_labels"],
        "bias_field": " and bias field" if source.modality == "MR" else "",
    }


def pretraining_sections(task: Task) -> dict[str, object]:
    """The placeholders of ``tools/templates/pretraining_README.md`` for a pre-training-only task."""
    return {**_shared_sections(task), "spacing": task.source.pixdim[0],
            "roi": " x ".join(map(str, task.recipe.pretrain.roi_size))}


def docs_readme(task: Task) -> str:
    """A segmentation bundle's ``docs/README.md`` (the model zoo's headings)."""
    return render_template("bundle_README.md", readme_sections(task))


def pretraining_readme(task: Task) -> str:
    """A pre-training-only bundle's ``docs/README.md``."""
    return render_template("pretraining_README.md", pretraining_sections(task))


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
    if task.docs.generated:
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
