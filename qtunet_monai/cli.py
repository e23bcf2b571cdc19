# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Command line: ``python -m qtunet_monai <command> [--flag value ...]`` (fire).

Commands:
    info   parameters and fvcore GFLOPs of one configuration.
    table  the whole family against the thesis' parameter and FLOP tables.
    bench  speed and memory against MONAI's SwinUNETR, UNETR, SegResNet and UNet.
    prepare_demo  write the demo data set (needs the demo extra: nilearn).
    demo_report   Dice per class and a PNG figure of the demo bundle's test prediction.
    fake_data     a tiny fake data set in a task's official layout (BraTS, BTCV, MSD, CityScapes).
    prepare_data  a task's official download -> the bundle's data list.
    explain  attention maps, rollout and attention distance of a trained bundle; Dice change of ablated blocks.
    plan   your own data set folder (MSD / nnU-Net v2 dataset.json) -> a configured bundle.
    auto3dseg_predict  a folder of new cases -> predictions of an Auto3DSeg-trained ensemble (CPU or GPU).
    prepare_recon_demo  the MRI reconstruction demo: fastMRI-layout k-space simulated from the MNI template.
    prepare_recon_data  a data list of fastMRI files (single-coil knee, multi-coil brain).
    recon_report  SSIM, PSNR, NMSE and MAE per volume of the reconstruction bundle's outputs, and a figure.

The bundles under the repository's ``bundles/`` are written by ``tools/generate_bundles.py``
(repository tooling, not part of the installed package).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import fire

from .networks import QTUNet, build_architecture
from .profiling.benchmark import bench
from .profiling.complexity import (
    THESIS_TARGETS,
    VARIANT_ORDER,
    complexity_table,
    count_flops,
    count_parameters,
    option_table,
)
from .reconstruction.commands import prepare_recon_data, prepare_recon_demo, recon_report


def info(
    variant: str = "tiny",
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    roi: int | str | tuple = 96,
    architecture: str | None = None,
    merge_depth: bool = True,
    decoder: str = "qt",
    num_stages: int = 3,
    patch_size: int = 4,
    deep_supervision: bool = False,
    detail_widths: str | tuple | int = (),
    skip: str = "concat",
    cct_preset: str | None = None,
    router: str | None = None,
    capacity: float | None = None,
    router_sites: str | tuple | None = None,
    flops: bool = True,
) -> None:
    """Print parameters and fvcore GFLOPs as one JSON line (batch 1, training mode, attention matmuls included).

    Args:
        variant: tiny, small or base.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output classes.
        roi: the input's size: one edge length (a cube / square, e.g. ``96``) or one per spatial axis
            (``50,61,37``); any size, the network pads inside.
        architecture: one of the thesis' architectures (QT-UNet, QT-UNet-A, VT-UNet, VT-UNet-A,
            QT-UNet-2D, QT-UNet-2D-A); overrides spatial_dims, merge_depth and decoder.
        merge_depth: merge the depth axis too (QT-UNet) or not (QT-UNet-A).
        decoder: qt, vt or none.
        num_stages: encoder/decoder stages around the bottleneck (3 in the thesis, or 4).
        patch_size: patch partition edge length (4 in the thesis, or 2).
        deep_supervision: with the auxiliary heads (their parameters count; FLOPs are those of the
            plain logits, what the network computes outside training).
        detail_widths: the full-resolution detail path's widths, e.g. ``16,32`` (none by default).
        skip: concat (the thesis) or cct (UCTransNet's channel-wise skips).
        cct_preset: full or lite, with ``--skip cct``.
        router: light or iterative: conditional light/heavy Swin blocks (dense by default).
        capacity: with ``--router``, the routed fraction of each window's (and volume's) tokens (default 0.25).
        router_sites: with ``--router``, the conditional parts, e.g. ``encoder,bottleneck`` (default all three).
        flops: also count FLOPs (needs fvcore).
    """
    widths = detail_widths.split(",") if isinstance(detail_widths, str) else (
        list(detail_widths) if isinstance(detail_widths, (list, tuple)) else [detail_widths])
    options = {"num_stages": num_stages, "patch_size": patch_size, "deep_supervision": deep_supervision,
               "detail_widths": [int(w) for w in widths if str(w).strip()], "skip": skip, "cct_preset": cct_preset}
    sites = [v.strip() for v in router_sites.split(",")] if isinstance(router_sites, str) else router_sites
    # only what was given: a named architecture keeps its own router otherwise (QT-UNet-Cond)
    options.update({k: v for k, v in (("router", router), ("capacity", capacity), ("router_sites", sites))
                    if v is not None})
    if architecture is not None:
        model = build_architecture(architecture, in_channels, out_channels, variant, **options)
        spatial_dims = model.spatial_dims
    else:
        model = QTUNet(
            in_channels, out_channels, spatial_dims=spatial_dims, variant=variant,
            merge_depth=merge_depth, decoder=decoder, **options,
        )
    shape = (1, in_channels) + _roi_size(roi, spatial_dims)
    result = {
        "architecture": architecture or "QTUNet",
        "variant": variant,
        "feature_size": model.feature_size,
        **options,
        # what the network resolved (a named architecture's router included)
        "router": model.router_type,
        "capacity": dict(model.routing.capacity) if model.routing is not None else None,
        "input": list(shape),
        "params_m": round(count_parameters(model) / 1e6, 3),
    }
    if flops:
        result["gflops"] = round(count_flops(model, shape) / 1e9, 2)
    print(json.dumps(result))


def _roi_size(roi, spatial_dims: int) -> tuple[int, ...]:
    """``--roi`` as one size per spatial axis; fire passes ``96`` as an int and ``50,61,37`` as a tuple."""
    values = [v for v in roi.replace("x", ",").split(",") if v.strip()] if isinstance(roi, str) else (
        list(roi) if isinstance(roi, (list, tuple)) else [roi])
    try:
        sizes = [int(str(v).strip()) for v in values]
    except ValueError:
        sizes = []
    if len(sizes) == 1:
        sizes *= spatial_dims
    if len(sizes) != spatial_dims or min(sizes) < 1:
        raise ValueError(f"--roi {roi!r}: give one positive integer edge length or {spatial_dims} of them "
                         f"separated by commas (e.g. {','.join(['50', '61', '37'][:spatial_dims])}).")
    return tuple(sizes)


def table(variants: str | list = "tiny,small,base", flops: bool = True, json_file: str | None = None,
          options: bool = False) -> None:
    """Print the family's parameters and GFLOPs next to the thesis' figures as a Markdown table.

    Args:
        variants: comma-separated subset of tiny, small, base.
        flops: count FLOPs too (about a minute per variant on a laptop CPU).
        json_file: also write the rows to this JSON file.
        options: then a second table: the options beyond the thesis (detail path, CCT, routers) for the
            chosen variants among tiny and base, each next to the plain network.
    """
    chosen = [v.strip() for v in variants.split(",")] if isinstance(variants, str) else list(variants)
    unknown = [v for v in chosen if v not in VARIANT_ORDER]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANT_ORDER)}.")
    print("| architecture | input | variant | params (M) | thesis | GFLOPs | thesis |")
    print("|---|---|---|---:|---:|---:|---:|")
    rows = []
    for target in THESIS_TARGETS:  # one target at a time, so progress shows as rows are measured
        for row in complexity_table(chosen, flops, targets=[target]):
            rows.append(row)
            gflops = f"{row['gflops']:.1f}" if row["gflops"] is not None else "-"
            print(
                f"| {row['architecture']} | {row['input']} | {row['variant']} | {row['params_m']:.2f} "
                f"| {row['target_params_m']} | {gflops} | {row['target_gflops']} |",
                flush=True,
            )
    print("\nThesis figures as docs/architecture.md section 1 gives them; QT-UNet-T's printed 6.4 M parameters is a misprint for 6.65 M.")
    if options:
        print("\n| option | architecture | input | variant | params (M) | plain | GFLOPs | plain |")
        print("|---|---|---|---|---:|---:|---:|---:|")
        for row in option_table([v for v in chosen if v in ("tiny", "base")], flops):
            rows.append(row)
            gflops = [f"{row[k]:.1f}" if row[k] is not None else "-" for k in ("gflops", "plain_gflops")]
            print(f"| {row['option']} | {row['architecture']} | {row['input']} | {row['variant']} | "
                  f"{row['params_m']:.2f} | {row['plain_params_m']:.2f} | {gflops[0]} | {gflops[1]} |", flush=True)
    if json_file:
        with open(json_file, "w") as f:
            json.dump(rows, f, indent=1)


def prepare_demo(output_dir: str = "bundles/qtunet_demo_brain_tissue_segmentation/data", num_train: int = 12,
                 num_val: int = 3, spacing: float = 2.0, seed: int = 0) -> None:
    """Write the demo data set (MNI ICBM152 template from nilearn, randomly deformed) and its data list.

    Args:
        output_dir: where imagesTr, labelsTr, imagesTs, labelsTs, dataset.json and datalist.json go.
        num_train: training cases.
        num_val: validation cases.
        spacing: voxel size in mm.
        seed: seed of the random deformations.
    """
    from .data.demo import prepare_demo as run

    print(f"data list written: {run(output_dir, num_train, num_val, spacing, seed)}")


def demo_report(bundle_dir: str = "bundles/qtunet_demo_brain_tissue_segmentation",
                figure_file: str | None = None) -> None:
    """Print Dice per class of the demo bundle's prediction of the test case and write a PNG figure.

    Args:
        bundle_dir: the demo bundle (after training and inference).
        figure_file: the PNG to write; default ``<bundle_dir>/eval/demo_report.png``.
    """
    from pathlib import Path

    from .data.demo import report

    root = Path(bundle_dir)
    figure = figure_file or str(root / "eval" / "demo_report.png")
    scores = report(
        str(root / "eval" / "brain_template_seg.nii.gz"),
        str(root / "data" / "labelsTs" / "brain_template.nii.gz"),
        str(root / "data" / "imagesTs" / "brain_template.nii.gz"),
        figure,
    )
    print("Dice on the test case (undeformed template): " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print(f"figure written: {figure}")
    (root / "eval" / "demo_report.json").write_text(json.dumps(scores, indent=1))


class _DataSet(NamedTuple):
    """How to write a task's fake data set and how to turn its download into a data list."""

    write_fake: Callable[[str, int], object]
    datalist: Callable[[str, str, int], object]


def _data_sets() -> dict[str, _DataSet]:
    """The data keys of :data:`qtunet_monai.tasks.TASKS` (except the demo, which has real data) -> their
    readers; imported on use, so the command line starts fast."""
    from .data.brats import brats_datalist, write_fake_brats
    from .data.btcv import btcv_datalist, write_fake_btcv
    from .data.cityscapes import cityscapes_datalist, write_fake_cityscapes
    from .data.folders import volume_tree_datalist, write_fake_volume_tree
    from .data.msd import MSD_TASKS, msd_datalist, write_fake_msd

    table = {
        "brats21": _DataSet(lambda root, seed: write_fake_brats(root, seed=seed), brats_datalist),
        "btcv": _DataSet(lambda root, seed: write_fake_btcv(root, seed=seed),
                         lambda root, out, seed: btcv_datalist(root, out)),
        "ctssl": _DataSet(lambda root, seed: write_fake_volume_tree(root, "CT", seed=seed),
                          lambda root, out, seed: volume_tree_datalist(root, out)),
        "mrissl": _DataSet(lambda root, seed: write_fake_volume_tree(root, "MR", seed=seed),
                           lambda root, out, seed: volume_tree_datalist(root, out)),
    }
    for key in ("cityscapes", "cityscapescat"):  # same files; the bundle maps the label ids
        table[key] = _DataSet(lambda root, seed: write_fake_cityscapes(root, seed=seed),
                              lambda root, out, seed: cityscapes_datalist(root, out))
    for name in MSD_TASKS:
        table[f"msd_{name}"] = _DataSet(lambda root, seed, name=name: write_fake_msd(root, name, seed=seed),
                                        lambda root, out, seed, name=name: msd_datalist(root, name, out, seed=seed))
    return table


def _data_set(task: str) -> _DataSet:
    from .tasks import get_task

    key = get_task(task).data
    table = _data_sets()
    if key not in table:
        raise ValueError(f"{task!r} has no fake data or data list reader: the demo has real data and its own data "
                         "list (python -m qtunet_monai prepare_demo).")
    return table[key]


def fake_data(task: str, root: str, seed: int = 0) -> None:
    """Write a tiny fake data set in a task's official download layout (right channels, label values,
    file names), so its bundle runs end to end anywhere.

    Args:
        task: brats21, btcv, msd_<name> (brain, heart, liver, hippocampus, prostate, lung, pancreas,
            hepaticvessel, spleen, colon), cityscapes, cityscapescat, ctssl or mrissl.
        root: the folder to write into (then give the same folder to prepare_data).
        seed: random seed.
    """
    folder = _data_set(task).write_fake(root, seed)
    print(f"fake data written: {folder}")


def prepare_data(task: str, root: str, output_file: str, seed: int = 0) -> None:
    """Turn a task's official download into the bundle's data list (training, validation, testing).

    Args:
        task: brats21 (case folders, 834/208/209 split), btcv (RawData, 35/5), msd_<name> (dataset.json,
            MONAI's Decathlon splits), cityscapes or cityscapescat (leftImg8bit + gtFine; train/val/test),
            ctssl or mrissl (every NIfTI file under root, for pre-training).
        root: where the download was extracted.
        output_file: the data list JSON to write, e.g. the bundle's data/datalist.json.
        seed: split seed (BraTS, MSD).
    """
    out = _data_set(task).datalist(root, output_file, seed)
    counts = {k: len(v) for k, v in json.loads(Path(out).read_text()).items()}
    print(f"data list written: {out} {counts}")


def explain(
    bundle_dir: str,
    image: str | None = None,
    voxel: str | tuple | None = None,
    out_dir: str | None = None,
    ablate: str | tuple | None = None,
    split: str = "testing",
    checkpoint: str = "models/model.pt",
    figures_dir: str | None = None,
    label: str | None = None,
    accept_settings: bool = False,
    **overrides,
) -> None:
    """Look inside a trained QT-UNet bundle (see qtunet_monai.explain).

    With ``--image`` and ``--voxel``: per decoder stage, block and head the cross-attention weights of
    the voxel's query, the self-attention maps of every block, attention rollout through the encoder
    (NIfTI in the image's grid and affine, PNG figures), and the mean attention distance in mm per block
    and head (CSV and PNG). With ``--ablate``: Dice on the ``split`` cases as trained and with each listed
    ablation (blocks' attention replaced by the identity/skip), as a table and ``ablation.json``.
    A CCT network (``--skip cct``) also gets its channel attention maps and the attention mass per scale,
    and ``--ablate`` takes ``skip.cct`` (plain skips) and ``skip.gate`` (no CCA gate); a conditional network
    (``--router``) gets its router scores, heavy selections and the heavy share per class.

    Args:
        bundle_dir: the trained bundle.
        image: a NIfTI volume to explain.
        voxel: output voxel ``x,y,z`` (array indices of ``image``) or a box ``x0:x1,y0:y1,z0:z1``.
        out_dir: where the files go; default ``<bundle_dir>/eval/explain``.
        ablate: comma-separated blocks to ablate one at a time, e.g.
            ``decoder.stage1.cross,decoder.stage2.cross``; join with ``+`` to ablate together.
        split: data-list split (with labels) for the ablation Dice.
        checkpoint: the weights, relative to the bundle.
        figures_dir: also copy ``cross_attention.png`` and ``attention_distance.png`` here (e.g. docs/).
        label: a label of ``image`` for the heavy share per class of a conditional network (default: the
            prediction).
        accept_settings: use overrides that contradict the settings stored with the model.
        overrides: the bundle's own keys, as for its commands (``--pixdim "[2.0, 2.0, 2.0]"``, ``--roi_size``,
            ...); by default the settings stored with the model (``models/settings.json``) apply.
    """
    import shutil
    from pathlib import Path

    from .explain import ablation_dice, class_names, explain_image, format_ablation_table, load_bundle_network

    if image is None and ablate is None:
        raise ValueError("give --image and --voxel (attention maps), --ablate (Dice change), or both.")
    out = Path(out_dir) if out_dir else Path(bundle_dir) / "eval" / "explain"
    out.mkdir(parents=True, exist_ok=True)
    if image is not None:
        if voxel is None:
            raise ValueError("--image needs --voxel x,y,z (or a box x0:x1,y0:y1,z0:z1).")
        if not Path(image).is_file():
            raise ValueError(f"image {image} does not exist.")
        network, parser = load_bundle_network(bundle_dir, checkpoint, overrides=overrides,
                                              accept_settings=accept_settings)
        if label is not None and not Path(label).is_file():
            raise ValueError(f"label {label} does not exist.")
        summary = explain_image(network, image, voxel, str(out), parser.get_parsed_content("preprocessing"),
                                device=parser.get_parsed_content("device"), label_file=label,
                                class_names=class_names(parser))
        print(f"attention maps of {summary['voxel']} (predicted class {summary['predicted_class_at_voxel']}) "
              f"written under {out}")
        if figures_dir:
            Path(figures_dir).mkdir(parents=True, exist_ok=True)
            for name in ("cross_attention.png", "attention_distance.png"):
                shutil.copyfile(out / name, Path(figures_dir) / name)
            print(f"figures copied to {figures_dir}")
    if ablate is not None:
        specs = [s.strip() for s in ablate.split(",")] if isinstance(ablate, str) else [str(s) for s in ablate]
        rows = ablation_dice(bundle_dir, specs, split=split, checkpoint=checkpoint, overrides=overrides,
                             accept_settings=accept_settings)
        (out / "ablation.json").write_text(json.dumps(rows, indent=1))
        print(f"Dice on the {len(rows[0]['cases'])} '{split}' case(s) with attention blocks ablated:")
        print(format_ablation_table(rows))


def plan(dataset: str, output: str, modality: str | None = None, gpu_memory_gb: float | None = None,
         max_epochs: int | None = None, overwrite: bool = False, **options) -> None:
    """Configure a bundle for your own data set (nnU-Net's planning step; see qtunet_monai.bundle.plan).

    Reads an MSD or nnU-Net v2 ``dataset.json``, checks every case (each label against its image), takes the
    fingerprint with MONAI's Auto3DSeg DataAnalyzer and writes a bundle whose spacing, intensity normalisation,
    ROI, variant and classes come from it, with a data list in folds, docs and ``plan.json``.

    Args:
        dataset: the data set folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``[, ``imagesTs/``]).
        output: the bundle folder to write, e.g. ``bundles/my_task``.
        modality: CT or MRI (default: CT when every channel is named CT).
        gpu_memory_gb: memory of the GPU you will train on (default: this machine's; 0: CPU).
        max_epochs: training epochs (default 300, or the ``--from`` bundle's).
        overwrite: rewrite the configs of an existing bundle folder.
        options: ``--from <bundle>``: take the training recipe (crops, augmentation, learning rate, epochs,
            preset) of an existing bundle, e.g. ``qtunet_msd_spleen_segmentation``.
    """
    from .bundle.plan import plan as run

    recipe_from = options.pop("from", None)
    if options:
        raise ValueError(f"unknown option(s) {sorted(options)} for plan; see python -m qtunet_monai plan --help.")
    out = run(dataset, output, modality=modality, recipe_from=recipe_from, gpu_memory_gb=gpu_memory_gb,
              max_epochs=max_epochs, overwrite=overwrite)
    record = json.loads((out / "plan.json").read_text())
    settings = record["settings"]
    print(f"bundle written: {out} ({record['training_cases']} training cases in {record['num_folds']} folds, "
          f"{record['test_cases']} test cases); spacing {settings['pixdim']} mm, ROI {settings['roi_size']}, "
          f"QT-UNet-{settings['variant']}, {settings['intensity']['kind']}; why: {out / 'plan.json'}")
    print(f"next: cd {out} && python -m monai.bundle run --config_file configs/train.json")


def auto3dseg_predict(work_dir: str, input_dir: str, output_dir: str, num_fold: int | None = None,
                      ensemble: str = "AlgoEnsembleBestByFold", n_best: int = 2, check_data: bool = True) -> None:
    """Predict a folder of new cases with an Auto3DSeg-trained ensemble, on the CPU, one GPU or several
    (MONAI's EnsembleRunner, called as a finished AutoRunner work folder needs; see qtunet_monai.integrations.auto3dseg_predict).

    Args:
        work_dir: the AutoRunner work folder.
        input_dir: the folder of NIfTI volumes to predict.
        output_dir: where ``<name>_ensemble.nii.gz`` goes (label maps in each input's grid and affine).
        num_fold: folds trained (default: from the work folder).
        ensemble: AlgoEnsembleBestByFold or AlgoEnsembleBestN.
        n_best: models for AlgoEnsembleBestN.
        check_data: read the voxels in the checks (NaN, infinite, extreme values); headers only if False.
    """
    from .integrations.auto3dseg_predict import predict_ensemble

    written = predict_ensemble(work_dir, input_dir, output_dir, num_fold, ensemble, n_best, check_data)
    print(f"{len(written)} prediction(s) written to {output_dir}")


COMMANDS = {"info": info, "table": table, "bench": bench, "prepare_demo": prepare_demo, "demo_report": demo_report,
            "fake_data": fake_data, "prepare_data": prepare_data, "explain": explain,
            "prepare_recon_demo": prepare_recon_demo, "prepare_recon_data": prepare_recon_data,
            "recon_report": recon_report, "plan": plan,
            "auto3dseg_predict": auto3dseg_predict}


def main(argv: list[str] | None = None) -> None:
    """Entry point; bad arguments and data end with a one-line error and exit status 2 (the full traceback
    with ``QTUNET_MONAI_DEBUG=1``)."""
    from .bundle.errors import DEBUG_ENV, reported_cause

    try:
        fire.Fire(COMMANDS, command=argv, name="qtunet_monai")
    except Exception as e:
        # ReportedErrors may arrive wrapped by MONAI's config parser; other errors of what the user gave
        # (values, files, missing extras) are one line too; anything else is a bug: its traceback shows
        reported = reported_cause(e)
        if (reported is None and not isinstance(e, (ValueError, OSError, ImportError))) or \
                os.environ.get(DEBUG_ENV, "").strip() not in ("", "0"):
            raise
        message = str(reported) if reported is not None else " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


__all__ = ["info", "table", "bench", "prepare_demo", "demo_report", "fake_data", "prepare_data", "explain", "plan",
           "auto3dseg_predict",
           "prepare_recon_demo", "prepare_recon_data", "recon_report", "main"]
