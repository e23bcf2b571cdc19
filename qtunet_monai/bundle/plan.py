# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""``python -m qtunet_monai plan``: a data set folder in, a configured bundle out (nnU-Net's planning step).

1. :func:`read_dataset` reads an MSD (``modality``, ``labels``, ``training``, ``test``) or nnU-Net v2
   (``channel_names``, ``labels``, ``file_ending``; cases found in ``imagesTr``/``labelsTr``) ``dataset.json``.
2. Every training case goes through :func:`qtunet_monai.bundle.check_cases` (files, channels, label values,
   NaN, and each label's shape, orientation, spacing and origin against its image): one ``DataError`` with a
   line per bad file, naming both files.
3. :func:`fingerprint` runs MONAI's Auto3DSeg ``DataAnalyzer`` and condenses its per-case statistics: median
   spacing, median shape before and after resampling, per-channel foreground intensities, class frequencies.
4. :func:`choose_settings` turns the fingerprint into a :class:`~qtunet_monai.tasks.Task`: spacing, intensity
   normalisation (CT: nnU-Net's clip to the foreground's 0.5/99.5 percentiles and z-score; MRI: per-channel
   z-score), ROI (a multiple of the 28-voxel window tile, sized to the memory at hand and to the resampled
   median shape), variant, batch and classes.
5. :func:`plan` renders the bundle from that task with the repository's bundle generator
   (``tools/generate_bundles.py``, the same code that writes the thesis' bundles), adds a data list split
   into folds, the bundle's docs and ``plan.json`` (the fingerprint and why each setting was chosen).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..profiling.memory import ROI_STEP  # a crop axis is a multiple of this: the 4-voxel patch times the 7-token window
from .errors import DataError, SettingError

__all__ = ["DatasetSpec", "read_dataset", "check_dataset", "fingerprint", "choose_settings", "plan"]

#: above this much resampled float32 image data, the training set is not cached in memory (cache_rate 0)
CACHE_LIMIT_GB = 8.0
#: folds of the data list (fewer when there are fewer cases)
NUM_FOLDS = 5


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set's ``dataset.json`` declares, with absolute paths.

    Args:
        folder: the data set folder.
        layout: ``MSD`` or ``nnU-Net v2``.
        name: the data set's name.
        description: its description (may be empty).
        channels: input channel names, in channel order.
        classes: class names, index = label value (0 background).
        training: labelled cases, ``{"image": file or [file per channel], "label": file}``.
        test: unlabelled cases, ``{"image": ...}``.
        licence: the licence / reference the ``dataset.json`` states (may be empty).
    """

    folder: Path
    layout: str
    name: str
    description: str
    channels: tuple[str, ...]
    classes: tuple[str, ...]
    training: tuple[dict, ...]
    test: tuple[dict, ...]
    licence: str = ""


def _names_by_index(mapping: dict, what: str, source: Path) -> tuple[str, ...]:
    """``{"0": "a", "1": "b"}`` -> ``("a", "b")``; the indices must be 0..N-1."""
    try:
        indexed = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError) as e:
        raise DataError(f"{source}: '{what}' keys must be integers 0..N-1, got {list(mapping)}.") from e
    if sorted(indexed) != list(range(len(indexed))):
        raise DataError(f"{source}: '{what}' values {sorted(indexed)} are not 0..{len(indexed) - 1}; remap the "
                        "labels to contiguous values first.")
    return tuple(indexed[i] for i in range(len(indexed)))


def _nnunet_cases(folder: Path, images: str, labels: str | None, ending: str, channels: int) -> list[dict]:
    """nnU-Net v2 cases: ``<images>/<case>_0000<ending>`` ... (one file per channel) and ``<labels>/<case><ending>``."""
    image_dir = folder / images
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{4}}){re.escape(ending)}$")
    found: dict[str, dict[int, str]] = {}
    for path in sorted(image_dir.glob(f"*{ending}")) if image_dir.is_dir() else []:
        match = pattern.match(path.name)
        if match:
            found.setdefault(match["case"], {})[int(match["channel"])] = str(path.resolve())
    cases = []
    for case, files in sorted(found.items()):
        expected = [image_dir / f"{case}_{c:04d}{ending}" for c in range(channels)]
        missing = [str(p) for c, p in enumerate(expected) if c not in files]
        if missing:
            raise DataError(f"{missing[0]}: channel file of case '{case}' not found ({channels} channel(s) declared "
                            "in channel_names).")
        image: str | list[str] = files[0] if channels == 1 else [files[c] for c in range(channels)]
        item: dict[str, Any] = {"image": image}
        if labels is not None:
            item["label"] = str((folder / labels / f"{case}{ending}").resolve())
        cases.append(item)
    return cases


def read_dataset(folder: str | Path) -> DatasetSpec:
    """Read an MSD or nnU-Net v2 data set folder's ``dataset.json``.

    MSD: ``modality`` (channels), ``labels`` (``{"0": "background", ...}``), ``training`` (image/label pairs,
    relative to the folder) and ``test`` (image paths). nnU-Net v2: ``channel_names``, ``labels``
    (``{"background": 0, ...}``), ``file_ending``; cases are ``imagesTr/<case>_0000<ending>`` (one file per
    channel) with ``labelsTr/<case><ending>``, test cases in ``imagesTs``.

    Raises:
        DataError: no ``dataset.json``, not JSON, neither layout, labels not 0..N-1, region-based labels,
            no labelled case.
    """
    folder = Path(folder).resolve()
    source = folder / "dataset.json"
    if not source.is_file():
        raise DataError(f"{source} not found: plan needs an MSD or nnU-Net v2 data set folder (dataset.json, "
                        "imagesTr/, labelsTr/).")
    try:
        content = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{source} is not readable JSON: {' '.join(str(e).split())}") from e
    if not isinstance(content, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(content).__name__}.")
    labels = content.get("labels")
    if "channel_names" in content and isinstance(labels, dict):
        layout = "nnU-Net v2"
        channels = _names_by_index(content["channel_names"], "channel_names", source)
        if any(isinstance(v, (list, tuple)) for v in labels.values()):
            raise DataError(f"{source}: region-based labels (lists of values) are not supported by plan; copy "
                            "qtunet_msd_brain_segmentation for overlapping regions.")
        try:
            classes = _names_by_index({v: k for k, v in labels.items()}, "labels", source)
        except TypeError as e:
            raise DataError(f"{source}: 'labels' must map names to integer values.") from e
        ending = str(content.get("file_ending", ".nii.gz"))
        training = _nnunet_cases(folder, "imagesTr", "labelsTr", ending, len(channels))
        test = _nnunet_cases(folder, "imagesTs", None, ending, len(channels))
    elif "modality" in content and isinstance(labels, dict):
        layout = "MSD"
        channels = _names_by_index(content["modality"], "modality", source)
        classes = _names_by_index(labels, "labels", source)

        def resolve(path: str) -> str:
            return str((folder / path).resolve())

        try:
            training = [{"image": resolve(c["image"]), "label": resolve(c["label"])} for c in content.get("training", [])]
            test = [{"image": resolve(t if isinstance(t, str) else t["image"])} for t in content.get("test", [])]
        except (KeyError, TypeError) as e:
            raise DataError(f"{source}: 'training' must list {{\"image\": ..., \"label\": ...}} pairs and 'test' "
                            "image paths.") from e
    else:
        raise DataError(f"{source}: neither an MSD dataset.json ('modality', 'labels', 'training') nor an nnU-Net "
                        "v2 one ('channel_names', 'labels', 'file_ending').")
    if len(classes) < 2:
        raise DataError(f"{source}: 'labels' declares {len(classes)} class(es); segmentation needs a background "
                        "and at least one class.")
    if len(training) < 2:
        raise DataError(f"{source}: {len(training)} labelled training case(s) found; plan needs at least 2 (one to "
                        "validate on).")
    licence = "; ".join(str(content[k]) for k in ("reference", "licence", "license") if content.get(k))
    return DatasetSpec(folder, layout, str(content.get("name") or folder.name), str(content.get("description") or ""),
                       channels, classes, tuple(training), tuple(test), licence)


def check_dataset(spec: DatasetSpec) -> None:
    """Every training case through :func:`qtunet_monai.bundle.check_cases` (voxels read) and every test case's
    headers, before anything else reads them.

    Raises:
        DataError: one line per bad file (a label that does not sit on its image names both files).
    """
    from .datalist import check_cases

    check_cases(list(spec.training), len(spec.channels), label_values=list(range(len(spec.classes))))
    if spec.test:
        check_cases(list(spec.test), len(spec.channels), check_values=False)


def _analyse(spec: DatasetSpec, work: Path) -> list[dict]:
    """MONAI's DataAnalyzer (CPU, per channel) on the training cases; returns its per-case statistics."""
    import yaml
    from monai.apps.auto3dseg import DataAnalyzer

    datalist = work / "datalist_for_analysis.json"
    datalist.write_text(json.dumps({"training": list(spec.training)}))
    output = work / "datastats.yaml"
    DataAnalyzer(str(datalist), "", output_path=str(output), average=False, device="cpu",
                 worker=0).get_all_case_stats()
    return yaml.safe_load((work / "datastats_by_case.yaml").read_text())["stats_by_cases"]


def fingerprint(spec: DatasetSpec, work: str | Path | None = None) -> dict[str, Any]:
    """The data set's fingerprint from MONAI's Auto3DSeg ``DataAnalyzer`` (run on the CPU, channels apart).

    Per-case statistics are combined as follows: spacing and shape, the median over cases per axis (after
    reorientation to RAS, as the bundles load them); per channel, the foreground (label > 0) intensity's 0.5
    and 99.5 percentiles as the median over cases, its mean as the mean over cases and its standard deviation
    pooled over cases; per class, the mean share of the voxels and the number of cases holding it.

    Args:
        spec: the data set (:func:`read_dataset`).
        work: where DataAnalyzer writes ``datastats.yaml`` and ``datastats_by_case.yaml`` (default a
            temporary folder).
    """
    if work is None:
        with tempfile.TemporaryDirectory() as tmp:
            return fingerprint(spec, tmp)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cases = _analyse(spec, work)
    spacings = np.array([c["image_stats"]["spacing"] for c in cases], dtype=float)
    shapes = np.array([c["image_stats"]["shape"][0] for c in cases], dtype=float)
    channels = []
    for channel, name in enumerate(spec.channels):
        stats = [c["image_foreground_stats"]["intensity"][channel] for c in cases]
        means = np.array([s["mean"] for s in stats])
        pooled = math.sqrt(float(np.mean([s["stdev"] ** 2 for s in stats]) + np.var(means)))
        channels.append({"name": name,
                         "percentile_00_5": float(np.median([s["percentile_00_5"] for s in stats])),
                         "percentile_99_5": float(np.median([s["percentile_99_5"] for s in stats])),
                         "mean": float(np.mean(means)), "std": pooled})
    classes = []
    for value, name in enumerate(spec.classes):
        present = [c for c in cases if value in c["label_stats"]["labels"]]
        shares = [c["label_stats"]["label"][c["label_stats"]["labels"].index(value)]["foreground_percentage"]
                  for c in present]
        classes.append({"value": value, "name": name, "cases": len(present),
                        "mean_voxel_share": float(np.sum(shares) / len(cases))})
    return {"num_cases": len(cases), "median_spacing_mm": [float(v) for v in np.median(spacings, axis=0)],
            "median_shape": [float(v) for v in np.median(shapes, axis=0)],
            "spacing_mm_range": [spacings.min(axis=0).tolist(), spacings.max(axis=0).tolist()],
            "shapes": shapes.astype(int).tolist(), "spacings_mm": spacings.tolist(), "channels": channels,
            "classes": classes}


def _load_generator():
    """The repository's bundle generator (``tools/generate_bundles.py``): the one place bundle configs are written."""
    # this file is <repository>/qtunet_monai/bundle/plan.py
    path = Path(__file__).resolve().parents[2] / "tools" / "generate_bundles.py"
    if not path.is_file():
        raise SettingError(f"plan renders bundles with the repository's {path.relative_to(path.parents[1])}, which "
                           f"is not at {path}: install qtunet_monai from a clone (pip install -e .).")
    spec = importlib.util.spec_from_file_location("_qtunet_generate_bundles", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _modality(spec: DatasetSpec, modality: str | None) -> str:
    """``CT`` or ``MR``: the ``--modality`` given, else CT when every channel is named CT (MSD and nnU-Net's use)."""
    if modality is not None:
        key = str(modality).strip().upper()
        if key not in ("CT", "MR", "MRI"):
            raise SettingError(f"--modality {modality!r}: choose CT or MRI.")
        return "CT" if key == "CT" else "MR"
    return "CT" if all(c.strip().upper() == "CT" for c in spec.channels) else "MR"


def choose_settings(spec: DatasetSpec, found: dict[str, Any], modality: str | None = None,
                    recipe_from: str | None = None, gpu_memory_gb: float | None = None,
                    max_epochs: int | None = None, bundle: str = "my_task") -> tuple[Any, dict[str, Any]]:
    """The bundle's :class:`~qtunet_monai.tasks.Task` from the fingerprint, and why each value was chosen.

    - spacing (``pixdim``): the median spacing (nnU-Net's and the Auto3DSeg template's choice);
    - intensity: CT, the foreground's 0.5/99.5 percentiles as the window, then its mean and standard
      deviation as the z-score (:class:`~qtunet_monai.pipeline.CTZScore`, nnU-Net's CT scheme); MRI, a
      z-score per channel over the non-zero voxels, with a crop to them (:class:`~qtunet_monai.pipeline.NonzeroNorm`);
    - variant, ROI and batch: from the memory at hand (:func:`qtunet_monai.profiling.memory.choose_batch_and_roi`: 56 per
      axis without a GPU, 128 or 96 on one), each axis no larger than the resampled median shape and rounded
      down to a multiple of 28 (the 4-voxel patch times the 7-token window: no padded tokens);
    - classes and channels: the ``dataset.json``'s names;
    - recipe (crop ratio, augmentation, learning rate, epochs, preset): ``recipe_from``'s task, else label-balanced
      crops, flips and intensity jitter, Adam 2e-4 (the Auto3DSeg template's rate for runs shorter than the
      thesis' 350 epochs), 300 epochs.

    Args:
        spec: the data set.
        found: its :func:`fingerprint`.
        modality: ``CT`` or ``MRI``; default from the channel names (``recipe_from``'s when given).
        recipe_from: a bundle name or data key of :data:`qtunet_monai.tasks.TASKS` to take the recipe from.
        gpu_memory_gb: the training GPU's memory (0: CPU); default the first visible GPU's, 0 without one.
        max_epochs: epochs (default the recipe's).
        bundle: the bundle's folder name.
    """
    from ..integrations.auto3dseg import _gpu_memory_gb, _size_for_memory
    from ..pipeline import CTZScore, NonzeroNorm, PosNegCrop, flips, scale, shift
    from ..tasks import THESIS, DataSource, Recipe, Task, TaskDocs, get_task

    base = get_task(recipe_from) if recipe_from else None
    if base is not None and (base.pretraining_only or base.source.spatial_dims != 3 or base.source.sigmoid):
        raise SettingError(f"--from {recipe_from}: take the recipe of a 3D label-map segmentation bundle "
                           "(not pre-training, 2D or overlapping regions).")
    kind = _modality(spec, modality if modality is not None or base is None else base.source.modality)
    why: dict[str, str] = {}
    pixdim = tuple(round(v, 4) for v in found["median_spacing_mm"])
    why["pixdim"] = "median spacing of the training cases"
    resampled = np.median(np.array(found["shapes"]) * np.array(found["spacings_mm"]) / np.array(pixdim), axis=0)
    resampled = [float(v) for v in resampled]
    memory = _gpu_memory_gb() if gpu_memory_gb is None else float(gpu_memory_gb)
    variant, roi, batch = _size_for_memory(memory, [round(s) for s in resampled])
    roi = [max(ROI_STEP, ROI_STEP * (int(r) // ROI_STEP)) for r in roi]
    why["roi_size"] = (f"{'no GPU' if memory <= 0 else f'{memory:.0f} GiB of GPU memory'}: crop edge of "
                       f"qtunet_monai.profiling.memory.choose_batch_and_roi, each axis at most the resampled median shape "
                       f"{[round(s) for s in resampled]}, rounded down to a multiple of {ROI_STEP} (the window tile)")
    why["variant"] = why["batch_size"] = f"chosen for {memory:.0f} GiB of GPU memory (0: CPU), as the Auto3DSeg template"
    if kind == "CT":
        if len(spec.channels) != 1:
            raise SettingError(f"{spec.folder}: CT normalisation takes one channel, the data set has "
                               f"{len(spec.channels)}; give --modality MRI for a per-channel z-score.")
        ch = found["channels"][0]
        intensity = CTZScore(round(ch["percentile_00_5"], 2), round(ch["percentile_99_5"], 2), round(ch["mean"], 3),
                             round(max(ch["std"], 1e-3), 3))
        crop_foreground = False
        threshold = round(intensity.b_min, 4)
        why["intensity"] = "CT: nnU-Net's scheme, foreground 0.5/99.5 percentiles clipped, then foreground z-score"
    else:
        intensity, crop_foreground, threshold = NonzeroNorm(), True, 0
        why["intensity"] = "MRI: z-score per channel over the non-zero voxels (no absolute scale to keep)"
    voxels = sum(math.prod(resampled) for _ in range(found["num_cases"])) * len(spec.channels)
    cache_rate = 1.0 if voxels * 4 / 2**30 <= CACHE_LIMIT_GB else 0.0
    why["cache_rate"] = (f"the resampled training images take about {voxels * 4 / 2**30:.2f} GB in float32 "
                         f"({'cached' if cache_rate else 'read from disk each epoch'}; limit {CACHE_LIMIT_GB} GB)")
    if base is not None:
        taken = base.recipe
        crop = (PosNegCrop(taken.crop.pos, taken.crop.neg, threshold) if isinstance(taken.crop, PosNegCrop)
                else taken.crop)
        recipe = {key: getattr(taken, key) for key in ("augment", "learning_rate", "max_epochs", "val_interval",
                                                        "weight_decay", "drop_path_rate", "preset", "num_samples")}
        why["recipe"] = f"crop, augmentation, learning rate, epochs and preset of {base.bundle} (--from)"
    else:
        crop = PosNegCrop(1, 1, threshold)
        recipe = {"augment": tuple(flips(0.5) + scale(0.1) + shift(0.1)), "learning_rate": 2e-4, "max_epochs": 300,
                  "val_interval": 10}
        why["recipe"] = ("label-balanced crops, flips and intensity jitter; Adam 2e-4, the Auto3DSeg template's rate "
                         "for runs shorter than the thesis' 350 epochs at 4e-5")
    if max_epochs is not None:
        recipe["max_epochs"] = int(max_epochs)
        recipe["val_interval"] = max(1, min(int(recipe["val_interval"]), int(max_epochs)))
    why["num_workers"] = "0 without a GPU (worker processes only add overhead on a CPU run), else 4"
    task = Task(
        bundle=bundle,
        data="plan",
        title=f"QT-UNet: {spec.name} (planned)",
        description=spec.description or f"{spec.name}: segmentation of " + ", ".join(spec.classes[1:]),
        source=DataSource(
            spatial_dims=3,
            modality=kind,
            channels=spec.channels,
            classes=spec.classes,
            label_values=tuple(range(len(spec.classes))),
            intensity=intensity,
            pixdim=pixdim,
            crop_foreground=crop_foreground,
            origin=f"{spec.name} ({spec.layout} data set folder {spec.folder})" + (
                f"; {spec.licence}" if spec.licence else ""),
        ),
        recipe=Recipe(roi_size=tuple(roi), crop=crop, variant=variant, batch_size=batch, cache_rate=cache_rate,
                      num_workers=4 if memory > 0 else 0, **recipe),
        docs=TaskDocs(
            references=(THESIS,),
            generated=False,
            changelog=f"planned by python -m qtunet_monai plan from {spec.folder}",
            summary=(f"QT-UNet-{variant[0].upper()} (Querying Transformer UNet) configured by python -m qtunet_monai "
                     f"plan from the fingerprint of {spec.name}"),
        ),
    )
    return task, why


def _datalist(spec: DatasetSpec, num_folds: int, seed: int = 0) -> dict:
    """``training`` with a ``fold`` per case (the bundles' own :func:`~qtunet_monai.bundle.folds.fold_assignment`)
    and ``testing``."""
    from .folds import fold_assignment

    folds = fold_assignment(len(spec.training), num_folds, seed)
    return {"num_folds": num_folds, "fold_seed": seed,
            "training": [{**case, "fold": fold} for case, fold in zip(spec.training, folds)],
            "testing": list(spec.test)}


def _default_fold(text: str, num_folds: int) -> str:
    """A rendered config with fold 0 (of ``num_folds``) as its default, as nnU-Net's first fold: the data list has
    no separate validation list, every labelled case is in one of the folds."""
    config = json.loads(text)
    if "fold" not in config:
        return text
    config.update({"fold": 0, "num_folds": num_folds})
    return json.dumps(config, indent=4) + "\n"


def _optimiser(recipe) -> str:
    """The optimiser and learning rate a planned recipe trains with under its preset (``--preset``)."""
    from .presets import preset

    chosen = preset(recipe.preset)
    learning_rate = recipe.learning_rate * chosen["learning_rate_scale"]
    decay = chosen.get("weight_decay", recipe.weight_decay)
    warmup = f", {chosen['warmup_epochs']} warm-up epochs" if chosen["warmup_epochs"] else ""
    return (f"{chosen['optimizer_name']} lr {learning_rate:g}{warmup}"
            + (f", weight decay {decay:g}" if decay else "") + f" (preset `{recipe.preset}`)")


def _readme(task: Any, spec: DatasetSpec, found: dict, why: dict, num_folds: int) -> str:
    source, recipe = task.source, task.recipe
    roi = " x ".join(map(str, recipe.roi_size))
    counts = f"{len(spec.training)} labelled and {len(spec.test)} test case(s)"
    classes = ", ".join(f"{c['value']} {c['name']} ({100 * c['mean_voxel_share']:.2f} % of voxels, {c['cases']} "
                        "cases)" for c in found["classes"])
    fold_models = "models/fold0/model.pt"
    return f"""# {task.title}

Configured by `python -m qtunet_monai plan` from the {spec.layout} data set `{spec.folder}` ({counts});
`plan.json` holds the fingerprint (MONAI's Auto3DSeg `DataAnalyzer`) and why each setting was chosen.
The configs are written by the repository's bundle generator, as the thesis' bundles are: every switch
of the repository's `docs/bundles.md` applies here too (`--preset`, `--time_budget_min`, `--tta`, ...).

## Settings from the fingerprint
- Input: {source.in_channels} channel(s) ({", ".join(source.channels)}), {source.modality}; resampled to
  {" x ".join(map(str, source.pixdim))} mm ({why["pixdim"]}); {source.intensity.describe()}.
- Classes: {classes}.
- Network: QT-UNet-{recipe.variant[0].upper()}, ROI {roi} ({why["roi_size"]}), batch {recipe.batch_size}.
- Training: {recipe.crop.describe()}, {recipe.max_epochs} epochs, {_optimiser(recipe)}, validation every
  {recipe.val_interval} epochs on the held-out fold; {num_folds} folds in `data/datalist.json`.

## Commands
Run from this folder. Every case is checked before each run (files, channels, label values, NaN, and each
label's shape, orientation, spacing and origin against its image).

```bash
# train fold 0 (the default; models/fold0/), or another fold: --fold 1 ... --fold {num_folds - 1}
python -m monai.bundle run --config_file configs/train.json
python -m monai.bundle run --config_file configs/train.json --resume True                      # after a kill
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"     # Dice of the held-out fold
# predict a folder of images (every NIfTI in it; outputs <name>_seg.nii.gz in the input's grid and affine)
python -m monai.bundle run --config_file configs/inference.json --input_dir /path/to/images --output_dir /path/to/predictions
# or the data list's 'testing' cases (the data set's test images) into eval/
python -m monai.bundle run --config_file configs/inference.json
# after training every fold: the mean probability of the fold models
python -m monai.bundle run --config_file "['configs/inference.json','configs/inference_ensemble.json']" --input_dir /path/to/images --output_dir /path/to/predictions
```

Models: `{fold_models}` (`models/fold<k>/` for `--fold k`). The spacing, ROI and intensity values are
written into the configs: to change one, edit it in both `configs/train.json` and `configs/inference.json`,
or re-run `plan` with other options.
"""


def plan(dataset: str | Path, output: str | Path, modality: str | None = None, recipe_from: str | None = None,
         gpu_memory_gb: float | None = None, max_epochs: int | None = None, overwrite: bool = False) -> Path:
    """Plan a bundle for a data set folder; returns the bundle folder.

    Args:
        dataset: the MSD / nnU-Net v2 data set folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        output: the bundle folder to write (its name is the bundle's).
        modality: ``CT`` or ``MRI`` (default: from the channel names).
        recipe_from: an existing bundle (or data key) whose training recipe to take.
        gpu_memory_gb: memory of the GPU training will run on (default the visible GPU's; 0: CPU).
        max_epochs: training epochs (default 300, or ``recipe_from``'s).
        overwrite: replace the configs of an existing bundle folder (models and eval are kept).

    Raises:
        DataError: the data set cannot be read, or a case fails the checks (one line per bad file).
        SettingError: bad options, or the output folder holds a bundle already (without ``overwrite``).
    """
    out = Path(output)
    if (out / "configs").exists() and not overwrite:
        raise SettingError(f"{out} already holds a bundle (configs/); choose another --output or pass "
                           "--overwrite True.")
    spec = read_dataset(dataset)
    check_dataset(spec)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    found = fingerprint(spec, data_dir)
    task, why = choose_settings(spec, found, modality, recipe_from, gpu_memory_gb, max_epochs, bundle=out.name)
    num_folds = min(NUM_FOLDS, len(spec.training))
    generator = _load_generator()
    files = generator.render_bundle(task)
    for rel, text in files.items():
        if rel.startswith("configs/") and rel.endswith(".json"):
            text = _default_fold(text, num_folds)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (out / "docs").mkdir(exist_ok=True)
    (out / "docs" / "README.md").write_text(_readme(task, spec, found, why, num_folds))
    (data_dir / "datalist.json").write_text(json.dumps(_datalist(spec, num_folds), indent=1))
    chosen = {**{k: getattr(task.source, k) for k in ("modality", "channels", "classes", "pixdim", "crop_foreground")},
              **{k: getattr(task.recipe, k) for k in ("roi_size", "variant", "preset", "batch_size", "max_epochs",
                                                      "val_interval", "learning_rate", "cache_rate", "num_workers")}}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in chosen.items()}
    settings["intensity"] = {"kind": type(task.source.intensity).__name__, **dataclasses.asdict(task.source.intensity)}
    settings["crop"] = {"kind": type(task.recipe.crop).__name__, **dataclasses.asdict(task.recipe.crop)}
    record = {"dataset": str(spec.folder), "layout": spec.layout, "training_cases": len(spec.training),
              "test_cases": len(spec.test), "num_folds": num_folds,
              "fingerprint": {k: v for k, v in found.items() if k not in ("shapes", "spacings_mm")},
              "settings": settings, "why": why,
              "analysis": "MONAI Auto3DSeg DataAnalyzer: data/datastats.yaml, data/datastats_by_case.yaml"}
    (out / "plan.json").write_text(json.dumps(record, indent=1) + "\n")
    return out
