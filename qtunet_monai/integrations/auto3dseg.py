# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""What the Auto3DSeg template ``algorithm_templates/qtunet`` runs: filling its configs from the
DataAnalyzer statistics, training on MONAI's Ignite engines, validation and inference.

The template's scripts are thin wrappers around these functions, so the logic is tested and
versioned with the package. The deterministic transforms, loss, post-processing, metric and
sliding-window inferer are the bundles' own (:mod:`qtunet_monai.pipeline`), instantiated from the
filled hyper-parameters; the template's YAML holds the values and the training augmentations.
Everything runs on CPU when there is no GPU.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from monai.apps.auto3dseg import AutoRunner

from .. import pipeline
from ..networks.utils import unwrap_module

__all__ = ["TemplateError", "CheckedAutoRunner", "refuse_gpu_customization", "check_data_source", "fill_hyper_parameters", "load_config",
           "build_transforms", "train", "validate", "InferClass"]

logger = logging.getLogger(__name__)
CONFIG_FILES = ("hyper_parameters.yaml", "network.yaml", "transforms.yaml")


class TemplateError(ValueError):
    """The data cannot be handled by the qtunet template; the message says why."""


def _gpu_memory_gb() -> float:
    """The smallest visible GPU's memory (every process of a multi-GPU run gets one), 0 without a GPU."""
    sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]
    return min(sizes) / 2**30 if sizes else 0.0


def fill_hyper_parameters(data_stats_file: str, data_src_cfg_file: str, output_path: str, fold: int = 0,
                          gpu_memory_gb: float | None = None) -> dict[str, Any]:
    """Fill ``<output_path>/configs/hyper_parameters.yaml`` by key from the DataAnalyzer statistics and the
    data source config; returns the values written.

    - channels and classes from the statistics; overlapping regions (``class_names`` with ``index``
      lists in the data source config, e.g. BraTS) mean sigmoid outputs;
    - spacing: the median voxel size;
    - intensity: CT clipped to the foreground's 0.5-99.5 percentiles and scaled to 0..1, MRI
      normalised channel-wise over non-zero voxels;
    - variant, ROI and batch from the GPU's memory (:func:`_size_for_memory`; tiny, 56^3 crops and batch 1
      without a GPU), written with the memory they were chosen for (``gpu_memory_gb``).

    Raises:
        TemplateError: no labels, a single class, or files the data list names are missing.
    """
    source = yaml.safe_load(Path(data_src_cfg_file).read_text())
    _check_datalist(source)
    stats = yaml.safe_load(Path(data_stats_file).read_text())["stats_summary"]
    labels = [int(v) for v in stats.get("label_stats", {}).get("labels", [])]
    regions = None
    class_names = source.get("class_names")
    if class_names and all(isinstance(c, dict) and "index" in c for c in class_names):
        regions = [[int(i) for i in c["index"]] for c in class_names]
    if regions is None and len(labels) < 2:
        raise TemplateError(f"the labels hold {labels or 'no'} value(s): segmentation needs a background and at "
                            "least one class (check the label files of the data list).")
    if regions is None and labels != list(range(len(labels))):
        raise TemplateError(f"label values {labels} are not 0..N-1: the qtunet template needs contiguous class "
                            "indices (remap the labels, or give overlapping regions as class_names with index lists).")
    modality = str(source.get("modality", "mri")).lower()
    spacing = [float(s) for s in stats["image_stats"]["spacing"]["median"]]
    median_shape = [int(s) for s in stats["image_stats"]["shape"]["median"]]
    memory = _gpu_memory_gb() if gpu_memory_gb is None else gpu_memory_gb
    variant, roi, batch = _size_for_memory(memory, median_shape)
    fg = stats.get("image_foreground_stats", {}).get("intensity", {})
    values = {
        "fold": int(fold),
        "modality": "ct" if modality == "ct" else "mri",
        "input_channels": int(stats["image_stats"]["channels"]["max"]),
        "output_classes": len(regions) if regions else len(labels),
        "sigmoid": regions is not None,
        "regions": regions,
        "resample_resolution": spacing,
        "roi_size": roi,
        "intensity_bounds": [float(fg.get("percentile_00_5", -1000.0)), float(fg.get("percentile_99_5", 1000.0))],
        "variant": variant,
        "num_images_per_batch": batch,
        "amp": memory > 0,
        "gpu_memory_gb": round(float(memory), 1),
    }
    path = Path(output_path) / "configs" / "hyper_parameters.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(values)
    config["bundle_root"] = str(Path(output_path).resolve())
    config["data_file_base_dir"] = str(source["dataroot"])
    config["data_list_file_path"] = str(source["datalist"])
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"hyper_parameters.yaml": values}


def _size_for_memory(memory_gb: float, image_shape) -> tuple[str, list[int], int]:
    """(variant, ROI, batch) for a GPU with ``memory_gb`` GiB (0: CPU): the variant by memory (base from 70 GB,
    small from 40 GB, else tiny), then the crop and batch from QT-UNet's memory model
    (:func:`qtunet_monai.profiling.memory.choose_batch_and_roi`)."""
    from ..profiling.memory import choose_batch_and_roi

    variant = "base" if memory_gb >= 70 else "small" if memory_gb >= 40 else "tiny"
    roi, batch = choose_batch_and_roi(memory_gb, variant, image_shape)
    return variant, roi, batch


def _config_files(config_file) -> list[str]:
    """Auto3DSeg passes one comma-separated string; fire may pass a list or tuple."""
    if isinstance(config_file, (str, os.PathLike)):
        return [f.strip() for f in str(config_file).split(",") if f.strip()]
    return [str(f) for f in config_file]


def _read_source(data_src_cfg) -> dict:
    if isinstance(data_src_cfg, dict):
        return data_src_cfg
    return yaml.safe_load(Path(data_src_cfg).read_text())  # YAML reads JSON too


def _declared_label_values(source: dict, content: dict) -> set[int] | None:
    """The label values the data set declares: overlapping regions' indices (``class_names`` with ``index``
    lists) and background, or the data list's ``labels`` (MSD ``{"0": "background", ...}``, nnU-Net v2
    ``{"background": 0, "tumour": [1, 2]}``); None when nothing is declared."""
    class_names = source.get("class_names")
    if class_names and all(isinstance(c, dict) and "index" in c for c in class_names):
        return {0} | {int(i) for c in class_names for i in c["index"]}
    labels = content.get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    if all(str(key).strip().isdigit() for key in labels):
        return {int(key) for key in labels}
    values: set[int] = set()
    for value in labels.values():
        values |= {int(v) for v in value} if isinstance(value, list) else {int(value)}
    return values


def _declared_channels(content: dict) -> int | None:
    """Image channels the data list declares (MSD ``modality``, nnU-Net v2 ``channel_names``), or None."""
    for key in ("modality", "channel_names"):
        value = content.get(key)
        if isinstance(value, dict) and value:
            return len(value)
    return None


def _usual_channels(items: list[dict]) -> int | None:
    """The channel count most cases' headers have (unreadable files are left to :func:`check_cases`)."""
    from collections import Counter

    from ..bundle.datalist import image_shape

    counts: Counter[int] = Counter()
    for item in items:
        files = item["image"] if isinstance(item["image"], list) else [item["image"]]
        try:
            shapes = [image_shape(str(f)) for f in files]
        except OSError:
            continue
        counts[sum(shape[3] if len(shape) > 3 else 1 for shape in shapes)] += 1
    return counts.most_common(1)[0][0] if counts else None


def check_data_source(data_src_cfg, check_values: bool = True) -> list[dict]:
    """The package's data checks on an Auto3DSeg input, meant to run before MONAI's ``DataAnalyzer`` reads
    it (:class:`CheckedAutoRunner` does), so that bad data stops with our one-line messages instead of
    MONAI's tracebacks.

    Every ``training`` and ``validation`` case of the data list goes through
    :func:`qtunet_monai.bundle.check_cases`: files exist and are readable, each image has the declared
    channels (the data list's ``modality`` / ``channel_names``, else the count most cases have), its label
    shares its shape, orientation, spacing and origin, and (``check_values``) intensities are finite and
    label values lie in the classes the data set declares (``class_names`` regions of the data source
    config, or the data list's ``labels`` as in an MSD / nnU-Net ``dataset.json``).

    Args:
        data_src_cfg: the data source config (AutoRunner's ``input``): a dict, or a YAML / JSON file, with
            ``datalist`` and ``dataroot``.
        check_values: also read the voxels; headers only if False.

    Returns:
        the checked cases.

    Raises:
        TemplateError: no training cases, or training cases without a label.
        DataError: each bad file and its problem, one per line.
    """
    from ..bundle import DataError, check_cases, load_datalist

    source = _read_source(data_src_cfg)
    datalist, root = str(source["datalist"]), source.get("dataroot")
    try:
        items = load_datalist(datalist, "training", base_dir=root)
    except DataError as e:
        raise TemplateError(f"{e} Nothing to train the qtunet algorithm on.") from e
    missing = [i["image"] for i in items if "label" not in i]
    if missing:
        raise TemplateError(f"training cases without a label in {datalist}: {missing[:5]}")
    content = json.loads(Path(datalist).read_text())
    if content.get("validation"):  # AutoRunner trains on these too
        items += load_datalist(datalist, "validation", base_dir=root)
    channels = _declared_channels(content) or _usual_channels(items)
    return check_cases(items, channels, label_values=_declared_label_values(source, content),
                       check_values=check_values)


def _check_datalist(source: dict) -> None:
    """Stop generation with a clear message on bad data; headers only (the analysis has read the voxels)."""
    check_data_source(source, check_values=False)


#: why the template refuses MONAI's gpu_customization rather than ignoring it
GPU_CUSTOMIZATION_REFUSED = (
    "gpu_customization: the qtunet template does not run MONAI's dummy-training search; it sizes the variant, "
    "ROI and batch from the GPU's memory itself (gpu_memory_gb in hyper_parameters.yaml). Call "
    "set_gpu_customization(False); to choose the batches yourself, runner.set_training_params("
    "{'num_images_per_batch': N, 'num_sw_batch_size': M}).")


def refuse_gpu_customization(requested: bool) -> None:
    """Raise :class:`TemplateError` when MONAI's ``gpu_customization`` is asked of the qtunet template.

    Args:
        requested: the ``gpu_customization`` switch (AutoRunner, BundleGen or the algo's template filling).
    """
    if requested:
        raise TemplateError(GPU_CUSTOMIZATION_REFUSED)


class CheckedAutoRunner(AutoRunner):
    """MONAI's ``AutoRunner`` that runs :func:`check_data_source` before its data analysis, and refuses
    ``gpu_customization`` for the qtunet template at once (the template would otherwise stop at generation)."""

    def set_gpu_customization(self, gpu_customization: bool = False, gpu_customization_specs=None):
        names = self.algos if isinstance(self.algos, (list, tuple, dict)) else [self.algos]
        if self.algos is None or "qtunet" in names:  # None: every template found, ours included
            refuse_gpu_customization(gpu_customization)
        return super().set_gpu_customization(gpu_customization, gpu_customization_specs)

    def run(self):
        if self.analyze:
            check_data_source(self.data_src_cfg)
        return super().run()


def load_config(config_file, **override):
    """A MONAI ConfigParser over the template's configs with ``override`` applied (``#`` ids allowed)."""
    from monai.bundle import ConfigParser

    files = _config_files(config_file)
    parser = ConfigParser()
    parser.read_config([f for f in files if str(f).endswith((".yaml", ".json"))])
    parser.update(override)
    # the preset's network options and recipe, where the hyper-parameters leave them unset (null), as the
    # bundles' --preset
    from ..bundle.presets import preset

    for key, value in preset(str(parser.get("preset") or "thesis")).items():
        if key in parser.get() and parser.get(key) is None:
            parser[key] = value
    return parser


def _save_overrides(config_file, override: dict) -> None:
    """Write training-time overrides into hyper_parameters.yaml so that inference rebuilds the same network."""
    files = _config_files(config_file)
    target = next(Path(f) for f in files if str(f).endswith("hyper_parameters.yaml"))
    config = yaml.safe_load(target.read_text())
    for key, value in override.items():
        if "#" not in key:
            config[key] = value
    target.write_text(yaml.safe_dump(config, sort_keys=False))


def _values(parser) -> dict[str, Any]:
    """What the pipeline's ``@`` references name, from the filled hyper-parameters."""
    return {"roi_size": parser.get_parsed_content("roi_size"),
            "pixdim": parser.get_parsed_content("resample_resolution"),
            "num_classes": parser.get_parsed_content("output_classes"),
            "num_sw_batch_size": parser.get_parsed_content("num_sw_batch_size")}


def _intensity(parser) -> pipeline.Intensity:
    """CT: clip to the foreground's 0.5-99.5 percentiles (``intensity_bounds``) and scale; MRI: non-zero z-score."""
    if parser.get_parsed_content("modality") == "ct":
        return pipeline.CTWindow(*(float(b) for b in parser.get_parsed_content("intensity_bounds")))
    return pipeline.NonzeroNorm()


def build_transforms(parser, stage: str) -> list:
    """``train``, ``validate`` or ``infer`` transforms: the bundles' deterministic transforms (load, regions,
    RAS, resample, intensity, pad), then for training the template's ``augment``."""
    with_label = stage != "infer"
    regions = parser.get_parsed_content("regions") if parser.get_parsed_content("sigmoid") else None
    steps = pipeline.instantiate(
        pipeline.deterministic_transforms(_intensity(parser), 3, with_label, regions=regions, pad=with_label),
        **_values(parser))
    if stage == "train":
        steps += parser.get_parsed_content("augment")
    return steps


def _fold_lists(parser) -> tuple[list[dict], list[dict]]:
    from monai.auto3dseg.utils import datafold_read

    from ..bundle import check_cases

    datalist = parser.get_parsed_content("data_list_file_path")
    base = parser.get_parsed_content("data_file_base_dir")
    train_files, val_files = datafold_read(datalist, basedir=base, fold=parser.get_parsed_content("fold"))
    if not train_files or not val_files:
        raise TemplateError(f"fold {parser.get_parsed_content('fold')} of {datalist} leaves {len(train_files)} "
                            f"training and {len(val_files)} validation cases; both must be non-empty.")
    channels = parser.get_parsed_content("input_channels")
    sigmoid = parser.get_parsed_content("sigmoid")
    classes = None if sigmoid else parser.get_parsed_content("output_classes")
    for items in (train_files, val_files):
        check_cases(items, channels, num_classes=classes, check_values=False)
    return train_files, val_files


def _device(parser) -> torch.device:
    """This process's device from the ``device`` hyper-parameter (``auto``, ``cpu``, ``cuda``): on a GPU
    machine ``cuda:<LOCAL_RANK>``, so that every node of a multi-node run uses its own GPUs."""
    from ..bundle import process_device

    return process_device(parser.get("device", "auto"))


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun (Auto3DSeg's multi-GPU mode),
    NCCL on a GPU, gloo on the CPU (``device=cpu``)."""
    from ..bundle import init_distributed

    return init_distributed(device)


def _optimizer_and_schedule(parser, network, epochs: int):
    """The bundles' optimiser and schedule: ``optimizer_name`` from ``torch.optim`` at ``learning_rate`` times
    ``learning_rate_scale``, ``weight_decay`` on weight matrices and kernels only (not on bias tables, norms,
    biases), cosine annealing over ``epochs`` after ``warmup_epochs`` of linear warm-up."""
    from ..bundle import lr_schedule, param_groups

    learning_rate = float(parser.get_parsed_content("learning_rate")) * float(parser.get("learning_rate_scale") or 1.0)
    optimizer = getattr(torch.optim, str(parser.get("optimizer_name") or "Adam"))(
        param_groups(network, float(parser.get("weight_decay") or 0.0)), lr=learning_rate)
    return optimizer, lr_schedule(optimizer, int(parser.get("warmup_epochs") or 0), epochs)


def _load_pretrained(parser, network) -> dict | None:
    """Initialise from ``pretrained_path`` (an SSL encoder file or a bundle's ``model.pt``) as the bundles'
    ``--finetune`` does: loaded, missing and unexpected keys reported, mismatched shapes an error naming them;
    ``pretrained_exclude`` key prefixes (e.g. ``head.classifier.`` of another task's model) are not loaded."""
    from ..bundle import load_pretrained

    path = parser.get("pretrained_path")
    if not path:
        return None
    if not Path(path).is_file():
        raise TemplateError(f"pretrained_path {path} is not a file.")
    return load_pretrained(network, str(path), exclude=tuple(parser.get("pretrained_exclude") or ()))


def _maybe_compiled(parser, network: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(network, dynamic=False)`` for the predictor (not an engine) when the ``compile``
    hyper-parameter is set; the plain ``network`` stays what checkpoints save and load."""
    return torch.compile(network, dynamic=False) if parser.get("compile", False) else network


def _engines(parser, train_files, val_files):
    from monai.data import CacheDataset, DataLoader, DistributedSampler
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import LrScheduleHandler, StatsHandler, ValidationHandler, from_engine
    from monai.inferers import SimpleInferer
    from monai.transforms import Compose

    device = _device(parser)
    _, world = _distributed(device)
    network = parser.get_parsed_content("network").to(device)
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        network = torch.nn.parallel.DistributedDataParallel(network, device_ids=ids)
    sigmoid = parser.get_parsed_content("sigmoid")
    workers = parser.get_parsed_content("num_workers")
    cache = parser.get_parsed_content("cache_rate")
    train_ds = CacheDataset(train_files, Compose(build_transforms(parser, "train")), cache_rate=cache,
                            num_workers=workers)
    val_ds = CacheDataset(val_files, Compose(build_transforms(parser, "validate")), cache_rate=cache,
                          num_workers=workers)
    train_sampler = DistributedSampler(train_ds, shuffle=True) if world > 1 else None
    val_sampler = DistributedSampler(val_ds, shuffle=False, even_divisible=False) if world > 1 else None
    train_loader = DataLoader(train_ds, batch_size=parser.get_parsed_content("num_images_per_batch"),
                              shuffle=train_sampler is None, sampler=train_sampler, num_workers=workers)
    val_loader = DataLoader(val_ds, batch_size=1, sampler=val_sampler, num_workers=workers)
    epochs = parser.get_parsed_content("num_epochs")
    optimizer, scheduler = _optimizer_and_schedule(parser, network, epochs)
    values = _values(parser)
    post = pipeline.instantiate([pipeline.activation(sigmoid), *pipeline.discretise(sigmoid)], **values)
    amp = bool(parser.get_parsed_content("amp")) and device.type == "cuda"
    # MONAI's engines compile the network themselves; checkpoints keep the plain one
    compiled = {"compile": bool(parser.get("compile", False)), "compile_kwargs": {"dynamic": False}}
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=val_loader, network=network, amp=amp, **compiled,
        inferer=pipeline.instantiate(pipeline.sliding_window("@num_sw_batch_size"), **values),
        postprocessing=Compose(post),
        key_val_metric=pipeline.instantiate(pipeline.metrics(sigmoid), **values),
        val_handlers=[StatsHandler(iteration_log=False)],
    )
    loss = pipeline.instantiate(pipeline.loss(sigmoid), **values)
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=train_loader, network=network, optimizer=optimizer,
        loss_function=loss, inferer=SimpleInferer(), amp=amp, **compiled,
        train_handlers=[
            ValidationHandler(validator=evaluator, interval=parser.get_parsed_content("num_epochs_per_validation"),
                              epoch_level=True),
            StatsHandler(tag_name="train_loss", output_transform=from_engine(["loss"], first=True)),
        ],
    )
    LrScheduleHandler(scheduler, print_lr=False).attach(trainer)
    return network, trainer, evaluator


def train(config_file, **override) -> float:
    """Train on the fold's training cases, validate on its validation cases; writes ``model.pt``
    (best mean Dice, atomically), ``resume.pt`` and ``progress.yaml`` (``best_avg_dice_score``, what
    Auto3DSeg ranks with) under ``ckpt_path``. Returns the best validation mean Dice."""
    from ignite.engine import Events

    from ..bundle import BestModelSaver, ResumeCheckpoint, StopOnNonFiniteLoss, TrainingTimeBudget

    if override:
        _save_overrides(config_file, override)
    parser = load_config(config_file, **override)
    train_files, val_files = _fold_lists(parser)
    network, trainer, evaluator = _engines(parser, train_files, val_files)
    _load_pretrained(parser, network)
    ckpt = Path(parser.get_parsed_content("ckpt_path"))
    ckpt.mkdir(parents=True, exist_ok=True)
    rank, _ = _distributed(_device(parser))
    BestModelSaver(str(ckpt / "model.pt"), network, save=rank == 0).attach(evaluator)
    ResumeCheckpoint(str(ckpt / "resume.pt"), network, trainer.optimizer,
                     resume=bool(parser.get_parsed_content("resume")), save=rank == 0,
                     evaluator=evaluator).attach(trainer)
    StopOnNonFiniteLoss().attach(trainer)
    TrainingTimeBudget(float(parser.get("time_budget_min", 0) or 0), evaluator, str(ckpt / "training_time.json"),
                       save=rank == 0).attach(trainer)
    progress: list[dict] = []

    validations: list[int] = []  # on every rank; progress only on rank 0

    @evaluator.on(Events.EPOCH_COMPLETED)
    def record(engine) -> None:
        validations.append(trainer.state.epoch)
        if rank != 0:
            return
        progress.append({"epoch": trainer.state.epoch, "best_avg_dice_score": float(engine.state.best_metric),
                         "best_epoch": int(engine.state.best_metric_epoch)})
        (ckpt / "progress.yaml").write_text(yaml.safe_dump(progress))

    trainer.run()
    if not validations:  # validation never ran (interval beyond the budget): validate once now, on every rank
        evaluator.run()
    best = float(evaluator.state.best_metric)
    logger.info(f"best validation mean Dice {best:.4f}; model in {ckpt / 'model.pt'}")
    from ..bundle import finish_distributed

    finish_distributed()  # leave together: a rank exiting mid-collective aborts the others (gloo)
    return best


def validate(config_file, **override) -> float:
    """Mean Dice of ``ckpt_path/model.pt`` on the fold's validation cases."""
    parser = load_config(config_file, **override)
    train_files, val_files = _fold_lists(parser)
    network, _, evaluator = _engines(parser, train_files, val_files)
    from ..bundle.checkpoints import read_checkpoint

    state = read_checkpoint(Path(parser.get_parsed_content("ckpt_path")) / "model.pt")
    unwrap_module(network).load_state_dict(state)
    evaluator.run()
    score = float(evaluator.state.metrics["val_mean_dice"])
    print(json.dumps({"val_mean_dice": score}))
    return score


class InferClass:
    """Auto3DSeg's inference contract: ``InferClass(configs, **override).infer(image_file)`` returns the
    channel-first probability map in the image's original space (a MetaTensor)."""

    def __init__(self, config_file, **override) -> None:
        from monai.transforms import Compose

        override = {k: v for k, v in override.items() if k not in ("mode", "fold")}
        self.parser = load_config(config_file, **override)
        self.device = _device(self.parser)
        self.network = self.parser.get_parsed_content("network").to(self.device).eval()
        weights = Path(self.parser.get_parsed_content("ckpt_path")) / "model.pt"
        from ..bundle.checkpoints import read_checkpoint

        self.network.load_state_dict(read_checkpoint(weights))
        self.engine_network = _maybe_compiled(self.parser, self.network)
        self.transforms = Compose(build_transforms(self.parser, "infer"))
        values = _values(self.parser)
        self.activation = pipeline.instantiate(pipeline.activation(self.parser.get_parsed_content("sigmoid")), **values)
        self.inferer = pipeline.instantiate(pipeline.sliding_window("@num_sw_batch_size"), **values)

    @torch.no_grad()
    def infer(self, image_file) -> torch.Tensor:
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        # the ensemble passes data-list items ({"image": path}); users may pass a path
        path = image_file["image"] if isinstance(image_file, dict) else image_file
        data = self.transforms({"image": path})
        image = data["image"]
        logits = self.inferer(image.unsqueeze(0).to(self.device), self.engine_network)
        data["pred"] = MetaTensor(logits[0].cpu(), affine=image.affine, meta=image.meta)
        data = self.activation(data)
        return Invertd("pred", transform=self.transforms, orig_keys="image", nearest_interp=False)(data)["pred"]
