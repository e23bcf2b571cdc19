# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Generate the MONAI bundles under ``bundles/`` from :data:`qtunet_monai.tasks.TASKS`.

What the bundles share (the engines, handlers, checkpointing, resume and fine-tune switches,
distributed training, evaluation and inference) is written once here; what differs comes from
the task. The generated files are committed, so every bundle stays a self-contained folder a user
can read and edit; ``python -m qtunet_monai generate_bundles --check`` (run by the tests) fails when
a committed bundle and its task have drifted apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..tasks import TASKS, Task

__all__ = ["render_bundle", "write_bundles", "check_bundles"]

# Versions the bundles were tested with (metadata.json); bump together with the package.
VERSIONS = {"monai": "1.6.1", "pytorch": "2.13.0", "numpy": "2.4.6", "qtunet_monai": "0.1.0", "nibabel": "5.4.2",
            "pytorch-ignite": "0.5.5", "tensorboard": "2.21.0", "tqdm": "4.70.1", "pillow": "13.0.0",
            "nilearn": "0.14.1"}
SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
REPO = Path(__file__).resolve().parents[2]
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
def _keys(with_label: bool) -> list[str] | str:
    return ["image", "label"] if with_label else "image"


def _modes(with_label: bool, image_mode: str = "bilinear"):
    return [image_mode, "nearest"] if with_label else image_mode


def deterministic_transforms(task: Task, with_label: bool, pad: bool = True) -> list[dict]:
    """Loading, label conversion, orientation, spacing, intensity and foreground crop (train, validation, inference)."""
    keys = _keys(with_label)
    steps: list[dict] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
    ]
    if with_label and task.regions:
        steps.append({"_target_": "qtunet_monai.bundle.LabelsToRegionsd", "keys": "label",
                      "regions": [list(r) for r in task.regions]})
    if with_label and task.label_map:
        steps.append({"_target_": "MapLabelValued", "keys": "label", "orig_labels": list(range(len(task.label_map))),
                      "target_labels": list(task.label_map)})
    if task.spatial_dims == 3:
        steps.append({"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"})
    if task.pixdim:
        steps.append({"_target_": "Spacingd", "keys": keys, "pixdim": "@pixdim", "mode": _modes(with_label)})
    crop = {"_target_": "CropForegroundd", "keys": keys, "source_key": "image"}
    kind = task.intensity[0]
    if kind == "nonzero":  # crop on the raw (positive) MRI before normalisation makes it signed
        steps += [crop] if task.crop_foreground else []
        steps.append({"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True})
    elif kind == "ct":  # clip Hounsfield units and scale to 0..1; air is then 0 for the foreground crop
        steps.append({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": task.intensity[1],
                      "a_max": task.intensity[2], "b_min": 0.0, "b_max": 1.0, "clip": True})
        steps += [crop] if task.crop_foreground else []
    elif kind == "rgb":  # 0..255 RGB normalised with the data set's mean and standard deviation
        steps.append({"_target_": "NormalizeIntensityd", "keys": "image",
                      "subtrahend": "$[255.0 * m for m in @intensity_mean]",
                      "divisor": "$[255.0 * s for s in @intensity_std]", "channel_wise": True})
    else:
        raise ValueError(f"unknown intensity kind {kind!r}")
    if pad:
        steps.append({"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@roi_size"})
    steps.append({"_target_": "EnsureTyped", "keys": keys})
    return steps


def random_transforms(task: Task) -> list[dict]:
    """The training crop and the task's augmentations."""
    if task.crop[0] == "posneg":
        crop = {"_target_": "RandCropByPosNegLabeld", "keys": ["image", "label"], "label_key": "label",
                "spatial_size": "@roi_size", "pos": task.crop[1], "neg": task.crop[2],
                "num_samples": "@num_samples", "image_key": "image", "image_threshold": 0}
    else:
        crop = {"_target_": "RandSpatialCropd", "keys": ["image", "label"], "roi_size": "@roi_size",
                "random_size": False}
    return [crop, *[dict(t) for t in task.augment]]


def _activation(task: Task) -> dict:
    return {"_target_": "Activationsd", "keys": "pred", "sigmoid": True} if task.sigmoid else \
        {"_target_": "Activationsd", "keys": "pred", "softmax": True}


def _metrics(task: Task) -> dict:
    """Validation metrics; the key metric (mean Dice, background excluded) comes first."""
    out = "$monai.handlers.from_engine(['pred', 'label'])"
    metrics = {"val_mean_dice": {"_target_": "MeanDice", "include_background": task.sigmoid, "output_transform": out}}
    if task.hd95:
        metrics["val_hd95"] = {"_target_": "HausdorffDistance", "include_background": task.sigmoid, "percentile": 95,
                               "output_transform": out}
    if task.iou:
        metrics["val_mean_iou"] = {"_target_": "MeanIoUHandler", "include_background": False, "output_transform": out}
    return metrics


def _discretise(task: Task) -> list[dict]:
    """Binary one-hot prediction and label, ready for the metrics."""
    if task.sigmoid:
        return [{"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5}]
    steps = [{"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
              "to_onehot": "@num_classes"}]
    if task.void:
        steps.append({"_target_": "qtunet_monai.bundle.MaskVoidd", "keys": "pred", "label_key": "label"})
    return steps


def _saver(task: Task, key: str) -> dict:
    saver = {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "separate_folder": False, "resample": False}
    if task.spatial_dims == 2:
        saver.update({"output_ext": ".png", "writer": "PILWriter", "scale": None})
    return saver


def _save_label_map(task: Task, with_label: bool) -> list[dict]:
    """From the (inverted) probabilities: a label map written to disk; with a label, keep one-hot for the metrics."""
    if task.sigmoid:
        regions = [list(r) for r in task.regions]
        return [
            {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
            {"_target_": "CopyItemsd", "keys": "pred", "names": "seg"},
            {"_target_": "qtunet_monai.bundle.RegionsToLabelsd", "keys": "seg", "regions": regions},
            _saver(task, "seg"),
        ]
    steps = [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}, _saver(task, "pred")]
    if with_label:
        steps.append({"_target_": "AsDiscreted", "keys": ["pred", "label"], "to_onehot": "@num_classes"})
        if task.void:
            steps.append({"_target_": "qtunet_monai.bundle.MaskVoidd", "keys": "pred", "label_key": "label"})
    return steps


# ------------------------------------------------------------------------------------------------- configs
def _common(task: Task) -> dict:
    config = {
        "imports": ["$import glob", "$import os", "$import ignite", "$import qtunet_monai.bundle as qtunet_bundle"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "datalist_file": "$@dataset_dir + '/datalist.json'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": "$torch.cuda.is_available()",
        "in_channels": task.in_channels,
        "num_classes": task.num_classes,
        "roi_size": list(task.roi_size),
    }
    if task.pixdim:
        config["pixdim"] = list(task.pixdim)
    if task.intensity[0] == "rgb":
        from ..data.cityscapes import MEAN, STD

        config["intensity_mean"], config["intensity_std"] = list(MEAN), list(STD)
    config.update({"architecture": task.architecture, "variant": task.variant})
    return config


def _network_def(task: Task, train: bool) -> dict:
    net = {"_target_": "qtunet_monai.networks.build_architecture", "name": "@architecture",
           "in_channels": "@in_channels", "out_channels": "@num_classes", "variant": "@variant"}
    if train:
        net["drop_path_rate"] = task.drop_path_rate
    net["use_checkpoint"] = False
    return net


def _sliding_window(task: Task) -> dict:
    return {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": 4 if task.spatial_dims == 3 else 2,
            "overlap": 0.5, "mode": "constant"}


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
    })
    if task.void:
        config["loss"] = {"_target_": "qtunet_monai.bundle.VoidMaskedDiceLoss", "void_value": 0}
    elif task.sigmoid:
        config["loss"] = {"_target_": "DiceLoss", "sigmoid": True}
    else:
        config["loss"] = {"_target_": "DiceLoss", "to_onehot_y": True, "softmax": True}
    config["optimizer"] = {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate",
                           "weight_decay": "@weight_decay"}
    config["lr_scheduler"] = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "optimizer": "@optimizer",
                              "T_max": "@max_epochs"}
    checked = ("$qtunet_bundle.check_cases(@{split}#datalist, @in_channels, label_values=@label_values, "
               "check_values=@check_data, spatial_dims={dims})")
    loss_out = "$monai.handlers.from_engine(['loss'], first=True)"
    config["train"] = {
        "datalist": "$qtunet_bundle.load_datalist(@datalist_file, 'training')",
        "deterministic_transforms": deterministic_transforms(task, with_label=True),
        "random_transforms": random_transforms(task),
        "preprocessing": {"_target_": "Compose",
                          "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": checked.format(split="train", dims=task.spatial_dims),
                    "transform": "@train#preprocessing", "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                       "shuffle": True, "num_workers": "@num_workers"},
        "inferer": {"_target_": "SimpleInferer"},
        # multi_gpu_train.json drops the last three (logging) handlers on ranks > 0: keep them last
        "handlers": [
            {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
             "interval": "@val_interval"},
            {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": True},
            {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": loss_out},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
             "output_transform": loss_out},
            {"_target_": "ignite.handlers.ProgressBar", "persist": False},
        ],
        "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                    "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                    "optimizer": "@optimizer", "inferer": "@train#inferer", "train_handlers": "@train#handlers",
                    "amp": "@amp"},
    }
    config["validate"] = {
        "split": "validation",
        "datalist": "$qtunet_bundle.load_datalist(@datalist_file, @validate#split)",
        "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
        "dataset": {"_target_": "CacheDataset", "data": checked.format(split="validate", dims=task.spatial_dims),
                    "transform": "@validate#preprocessing", "cache_rate": "@cache_rate",
                    "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": "@num_workers"},
        "inferer": _sliding_window(task),
        "postprocessing": {"_target_": "Compose", "transforms": [_activation(task), *_discretise(task)]},
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
            {"_target_": "qtunet_monai.bundle.BestModelSaver", "path": "$@ckpt_dir + '/model.pt'",
             "network": "@network"},
        ],
        "key_metric": dict(list(_metrics(task).items())[:1]),
        "additional_metrics": dict(list(_metrics(task).items())[1:]),
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
                      "network": "@network", "inferer": "@validate#inferer",
                      "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
                      "additional_metrics": "@validate#additional_metrics", "val_handlers": "@validate#handlers",
                      "amp": "@amp"},
    }
    config["resume_checkpoint"] = {"_target_": "qtunet_monai.bundle.ResumeCheckpoint",
                                   "path": "$@ckpt_dir + '/resume.pt'", "network": "@network",
                                   "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "resume": "@resume"}
    config["initialize"] = [
        "$monai.utils.set_determinism(seed=123)",
        "$qtunet_bundle.load_imagenet_swin(@network, @imagenet_checkpoint) if @imagenet_init else None",
        "$qtunet_bundle.load_pretrained(@network, @finetune_checkpoint) if @finetune else None",
        "$@resume_checkpoint.attach(@train#trainer)",
    ]
    config["run"] = ["$@train#trainer.run()"]
    return config


def evaluate_config(task: Task) -> dict:
    invert = {"_target_": "Invertd", "keys": ["pred", "label"], "transform": "@validate#preprocessing",
              "orig_keys": "image", "nearest_interp": [False, True], "to_tensor": True}
    metric_names = list(_metrics(task))
    return {
        "validate#split": task.eval_split,
        "validate#postprocessing": {"_target_": "Compose",
                                    "transforms": [_activation(task), invert, *_save_label_map(task, True)]},
        "validate#handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@ckpt_dir + '/model.pt'", "load_dict": {"model": "@network"},
             "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": metric_names,
             "metric_details": metric_names, "batch_transform": "$lambda batch: [item['image'].meta for item in batch]",
             "summary_ops": "*"},
        ],
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)"],
        "run": ["$@validate#evaluator.run()"],
    }


def inference_config(task: Task) -> dict:
    config = _common(task)
    config["imports"] = config["imports"][:2] + config["imports"][3:]
    config.update({
        "datalist": "$qtunet_bundle.load_datalist(@datalist_file, 'testing')",
        "network_def": _network_def(task, train=False),
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose",
                          "transforms": deterministic_transforms(task, with_label=False, pad=False)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": _sliding_window(task),
        "postprocessing": {"_target_": "Compose", "transforms": [
            _activation(task),
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True},
            *_save_label_map(task, False),
        ]},
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": "@amp"},
        "initialize": ["$monai.utils.set_determinism(seed=123)"],
        "run": ["$@evaluator.run()"],
    })
    return config


def _distributed_overlay(config: dict, section: str, rank0_saves: list[str]) -> dict:
    """The torchrun overlay for a single-process ``config`` whose trainer is ``<section>#trainer``:
    DDP, distributed samplers, logging and checkpoint writing on rank 0 only, and the config's own
    ``initialize`` after joining the process group (NCCL on GPU, gloo on CPU)."""
    overlay = {
        "device": "$torch.device(f'cuda:{dist.get_rank()}') if torch.cuda.is_available() else torch.device('cpu')",
        "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": "$@network_def.to(@device)",
                    "device_ids": "$[@device] if torch.cuda.is_available() else None"},
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
                                 "even_divisible": False, "shuffle": False},
            "validate#dataloader#sampler": "@validate#sampler",
            "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
        })
    overlay.update({f"{key}#save": "$dist.get_rank() == 0" for key in rank0_saves})
    overlay["initialize"] = [
        "$import torch.distributed as dist",
        "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')",
        "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
        *config["initialize"],
    ]
    overlay["run"] = config["run"]
    overlay["finalize"] = ["$dist.is_initialized() and dist.destroy_process_group()"]
    return overlay


def multi_gpu_config(task: Task) -> dict:
    return _distributed_overlay(train_config(task), "train", ["resume_checkpoint"])


def pretrain_config(task: Task) -> dict:
    """Self-supervised pre-training of the encoder on the task's images (labels ignored), SPEC.md section 4."""
    batch, accumulation, epochs, roi = task.pretrain
    config = _common(task)
    config["imports"].append("$import qtunet_monai.ssl as qtunet_ssl")
    for key in ("num_classes", "architecture"):
        config.pop(key)
    config.update({
        "roi_size": list(roi),
        "max_epochs": epochs,
        "warmup_epochs": task.pretrain_warmup_epochs,
        "learning_rate": task.pretrain_learning_rate,
        "weight_decay": 1.5e-6,
        "batch_size": batch,
        "accumulation_steps": accumulation,
        "base_momentum": 0.996,
        "collapse_threshold": 0.1,
        "num_workers": task.num_workers,
        "cache_rate": task.cache_rate,
        "check_data": True,
        "resume": False,
        "encoder_file": "$@ckpt_dir + '/pretrained.pt'",
        "network_def": {"_target_": "qtunet_monai.ssl.QTUNetSSL", "in_channels": "@in_channels",
                        "roi_size": "@roi_size", "spatial_dims": task.spatial_dims, "variant": "@variant",
                        "merge_depth": True},
        "network": "$@network_def.to(@device)",
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "weight_decay": "@weight_decay"},
        "lr_scheduler": {"_target_": "monai.optimizers.WarmupCosineSchedule", "optimizer": "@optimizer",
                         "warmup_steps": "@warmup_epochs", "t_total": "@max_epochs"},
    })
    losses = "$lambda out: {k: out[k] for k in ('loss', 'loss_reconstruction', 'loss_rotation', 'loss_byol', 'collapse')}"
    config["pretrain"] = {
        # labels ignored; only the training cases' images, so validation images stay unseen
        "datalist": "$[{'image': c['image']} for c in qtunet_bundle.load_datalist(@datalist_file, 'training')]",
        "transforms": [
            *deterministic_transforms(task, with_label=False),
            {"_target_": "RandSpatialCropd", "keys": "image", "roi_size": "@roi_size", "random_size": False},
            {"_target_": "qtunet_monai.ssl.TwoViewsd", "keys": "image"},
        ],
        "dataset": {"_target_": "CacheDataset",
                    "data": f"$qtunet_bundle.check_cases(@pretrain#datalist, @in_channels, check_values=@check_data, "
                            f"spatial_dims={task.spatial_dims})",
                    "transform": {"_target_": "Compose", "transforms": "@pretrain#transforms"},
                    "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@pretrain#dataset", "batch_size": "@batch_size",
                       "shuffle": True, "num_workers": "@num_workers", "drop_last": False},
        # multi_gpu_pretrain.json drops the last three (logging) handlers on ranks > 0: keep them last
        "handlers": [
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
    config["collapse_monitor"] = {"_target_": "qtunet_monai.ssl.CollapseMonitor", "threshold": "@collapse_threshold"}
    config["encoder_saver"] = {"_target_": "qtunet_monai.ssl.EncoderSaver", "path": "@encoder_file",
                               "network": "@network"}
    config["resume_checkpoint"] = {"_target_": "qtunet_monai.bundle.ResumeCheckpoint",
                                   "path": "$@ckpt_dir + '/pretrain_resume.pt'", "network": "@network",
                                   "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "resume": "@resume"}
    config["initialize"] = [
        "$monai.utils.set_determinism(seed=123)",
        "$@resume_checkpoint.attach(@pretrain#trainer)",
        "$@collapse_monitor.attach(@pretrain#trainer)",
        "$@encoder_saver.attach(@pretrain#trainer)",
    ]
    config["run"] = ["$@pretrain#trainer.run()"]
    return config


def multi_gpu_pretrain_config(task: Task) -> dict:
    return _distributed_overlay(pretrain_config(task), "pretrain", ["resume_checkpoint", "encoder_saver"])


def metadata(task: Task) -> dict:
    packages = {k: VERSIONS[k] for k in ("qtunet_monai", "nibabel", "pytorch-ignite", "tensorboard", "tqdm")}
    if task.spatial_dims == 2:
        packages["pillow"] = VERSIONS["pillow"]
    if task.data == "demo":
        packages["nilearn"] = VERSIONS["nilearn"]
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
        "description": (f"{task.architecture}-{task.variant[0].upper()} (Querying Transformer UNet) trained with the "
                        "recipe of the QT-UNet thesis" if task.data != "demo" else
                        "QT-UNet-T (Querying Transformer UNet) trained on random deformations of the MNI ICBM152 "
                        "2009c template that the nilearn package ships; a demonstration that runs end to end on a "
                        "CPU in minutes, not a clinical model"),
        "authors": "qtunet_monai contributors",
        "copyright": "Copyright (c) qtunet_monai contributors",
        "data_source": task.data_source,
        "data_type": "png" if task.spatial_dims == 2 else "nibabel",
        "image_classes": f"{task.in_channels} channel(s): " + ", ".join(task.channels),
        "label_classes": label,
        "pred_classes": f"{task.num_classes} channels ({activation}): " + ", ".join(
            f"{i} {c}" for i, c in enumerate(task.classes)),
        "eval_metrics": task.eval_metrics or {"mean_dice": 0.0},
        "intended_use": "Research only; not for diagnostic use" if task.data != "demo" else
                        "Demonstration and testing only; not for diagnostic use",
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
        meta.update({"label_classes": "none: self-supervised", "eval_metrics": {"loss": 0.0},
                     "pred_classes": "reconstruction of the input (pre-training head); the product is the encoder "
                                     "in models/pretrained.pt"})
    return meta


# --------------------------------------------------------------------------------------------------- docs
def docs_readme(task: Task) -> str:
    roi = " x ".join(map(str, task.roi_size))
    spacing = f"resampled to {' x '.join(map(str, task.pixdim))} mm, " if task.pixdim else ""
    intensity = {"nonzero": "non-zero voxels normalised per channel",
                 "ct": f"Hounsfield units clipped to {task.intensity[1:] and list(task.intensity[1:])} and scaled to 0..1",
                 "rgb": "RGB normalised with CityScapes' mean and standard deviation"}[task.intensity[0]]
    crop = (f"label-balanced crops (positive:negative {task.crop[1]}:{task.crop[2]})" if task.crop[0] == "posneg"
            else "random crops")
    outputs = ("sigmoid outputs, one per overlapping region: " + ", ".join(
        f"{c} = labels {list(r)}" for c, r in zip(task.classes, task.regions)) if task.sigmoid
        else "softmax over " + ", ".join(f"{i} {c}" for i, c in enumerate(task.classes)))
    metrics = "mean Dice (background excluded)" + (", HD95 in mm (voxels are 1 mm)" if task.hd95 else "") + (
        ", mean IoU (MONAI's MeanIoU: per image over the classes present, then averaged)" if task.iou else "")
    fake_dir = "fake_data"
    prediction = "PNG label images of class ids" if task.spatial_dims == 2 else "NIfTI label maps with the input's geometry"
    if task.sigmoid:
        prediction += " (regions painted back to the data set's label values)"
    hippocampus = ("\nNote: the thesis states 0.2 mm spacing for Hippocampus (native about 1 mm); this bundle keeps it. "
                   "Override `--pixdim \"[1.0,1.0,1.0]\"` in all commands to train at the native resolution.\n"
                   if task.data == "msd_hippocampus" else "")
    void = ("\nVoid pixels (class 0) are left out of the loss (`VoidMaskedDiceLoss`) and of the metrics "
            "(`MaskVoidd`); the thesis trained on them and regretted it (its section 6.2.2).\n" if task.void else "")
    arch_2d = task.spatial_dims == 2
    batch, accumulation, epochs, ssl_roi = task.pretrain
    ssl_roi = " x ".join(map(str, ssl_roi))
    ablation = "QT-UNet-2D-A" if arch_2d else "QT-UNet-A`, `VT-UNet` or `VT-UNet-A"
    return f"""# {task.title}

{task.description}, with {task.architecture} (Querying Transformer UNet, `qtunet_monai`), following the
recipe of the QT-UNet thesis. This bundle was generated from `qtunet_monai/tasks.py`
(`python -m qtunet_monai generate_bundles`); edit the task there to change all of its configs at once,
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

Every case is checked before training starts (`--check_data False` reads headers only): missing or
unreadable files, wrong channel counts, image/label shape mismatches, NaN intensities and label values
outside {list(task.label_values)} stop the run with a message naming the file.

## Pipeline
- Input: {task.in_channels} channel(s) ({", ".join(task.channels)}); {spacing}{intensity}.
- Training: {crop} of {roi}, batch {task.batch_size}, {task.max_epochs} epochs, Adam (lr {task.learning_rate},
  weight decay {task.weight_decay}), cosine annealing, drop path {task.drop_path_rate}, Dice loss.
- Output: {outputs}.
- Validation every {task.val_interval} epochs: sliding window {roi}, overlap 0.5, constant blending;
  {metrics}; the best model is saved as `models/model.pt`.
{hippocampus}{void}
## Commands
Run from this folder. CPU works (slowly); a GPU is used when present (AMP on).

```bash
# train (validation every {task.val_interval} epochs, TensorBoard logs in eval/)
python -m monai.bundle run --config_file configs/train.json
# resume a killed or stopped run from models/resume.pt (written atomically every epoch)
python -m monai.bundle run --config_file configs/train.json --resume True
# initialise from a (pre-training) checkpoint; loaded, missing and unexpected keys are reported
python -m monai.bundle run --config_file configs/train.json --finetune True --finetune_checkpoint /path/to/checkpoint.pt
# several GPUs (NCCL; gloo on CPU)
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

## Self-supervised pre-training (labels ignored)
```bash
python -m monai.bundle run --config_file configs/pretrain.json     # writes models/pretrained.pt (the encoder)
python -m monai.bundle run --config_file configs/train.json --finetune True --finetune_checkpoint models/pretrained.pt
```
`configs/pretrain.json` pre-trains the encoder on this task's images (reconstruction of cut-out
views, rotation classes, BYOL; Adam 4e-5, weight decay 1.5e-6, 10 warm-up epochs then cosine;
batch {batch}, gradient accumulation {accumulation}, {epochs} epochs, crops {ssl_roi}). The BYOL target moves
once per optimiser step; each loss and a collapse signal go to TensorBoard, and a warning names the
epoch if the projections collapse. Several GPUs: `torchrun ... --config_file
"['configs/pretrain.json','configs/multi_gpu_pretrain.json']"`. Out-of-task pre-training:
`bundles/qtunet_ctssl_pretraining` (CT) and `bundles/qtunet_mrissl_pretraining` (MRI).

## Variants and the thesis' ablations
`--variant small` or `--variant base` (default `{task.variant}`); `--architecture {ablation}`
for the ablations of the thesis. Give the same overrides to every command of a run. Memory:
`--network_def#use_checkpoint True` trades compute for activation memory. ImageNet initialisation of
the encoder, as the thesis did for Base: `--variant base --imagenet_init True --imagenet_checkpoint
/path/to/swin_tiny_patch4_window7_224.pth` (a Swin-T file you supply, timm or official names;
inflated to 3D, nothing is downloaded).

## GPU memory and time
Not measured by us: no GPU was available where this bundle was written. The thesis trained on NVIDIA
A100 GPUs. `python -m qtunet_monai bench --device cuda` measures speed and memory of the variants
at this ROI against MONAI's SwinUNETR on your GPU.

## Result to compare with
{task.thesis_result}

## References
""" + "\n".join(f"- {r}" for r in task.references) + "\n"


def pretraining_readme(task: Task) -> str:
    batch, accumulation, epochs, roi = task.pretrain
    roi = " x ".join(map(str, roi))
    intensity = ("Hounsfield units clipped to " + str(list(task.intensity[1:])) + " and scaled to 0..1"
                 if task.intensity[0] == "ct" else "non-zero voxels normalised")
    return f"""# {task.title}

{task.description}. Out-of-task pre-training as in the QT-UNet thesis (SPEC.md section 4): the encoder
learns from unlabelled volumes, then initialises any task bundle. Generated from
`qtunet_monai/tasks.py` (`python -m qtunet_monai generate_bundles`).

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
symmetrised cosine loss); the loss is their unweighted sum. Adam 4e-5, weight decay 1.5e-6, 10
warm-up epochs then cosine; batch {batch} x {accumulation} accumulation, {epochs} epochs (per GPU; the thesis used 2).

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
spread of the normalised projections, about 1 when healthy); below `collapse_threshold` a warning
names the epoch. The thesis' Base model collapsed on CT-SSL unnoticed; this is what catches it.

## Result to compare with
{task.thesis_result}

## References
""" + "\n".join(f"- {r}" for r in task.references) + "\n"


# --------------------------------------------------------------------------------------------- writing
def _holds_objects(value) -> bool:
    """A non-empty list or dict whose first element is itself an object (a transform list, a sub-config)."""
    if not isinstance(value, (dict, list)) or not value:
        return False
    first = value[0] if isinstance(value, list) else next(iter(value.values()))
    return isinstance(first, dict)


def _dumps(value, indent: int = 0, width: int = 118) -> str:
    """JSON with one short object or list per line, so transform lists read like pipelines: a value
    stays on one line when it fits and is not an object holding lists of objects."""
    flat = json.dumps(value)
    nested = isinstance(value, dict) and any(_holds_objects(v) for v in value.values())
    if not isinstance(value, (dict, list)) or (len(flat) + indent <= width and not nested):
        return flat
    pad, inner = " " * indent, " " * (indent + 4)
    if isinstance(value, list):
        items = [inner + _dumps(v, indent + 4, width) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    items = [f"{inner}{json.dumps(k)}: {_dumps(v, indent + 4, width - len(json.dumps(k)) - 2)}"
             for k, v in value.items()]
    return "{\n" + ",\n".join(items) + "\n" + pad + "}"


def render_bundle(task: Task) -> dict[str, str]:
    """The bundle's generated files: relative path -> text."""
    files = {"configs/metadata.json": metadata(task)}
    if not task.pretraining_only:
        files.update({
            "configs/train.json": train_config(task),
            "configs/evaluate.json": evaluate_config(task),
            "configs/inference.json": inference_config(task),
            "configs/multi_gpu_train.json": multi_gpu_config(task),
        })
    files["configs/pretrain.json"] = pretrain_config(task)
    files["configs/multi_gpu_pretrain.json"] = multi_gpu_pretrain_config(task)
    out = {path: _dumps(content) + "\n" for path, content in files.items()}
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
