# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Command line: ``python -m qtunet_monai <command> [--flag value ...]`` (fire).

Commands:
    info   parameters and fvcore GFLOPs of one configuration.
    table  the whole family against the thesis' parameter and FLOP tables.
    bench  speed and memory against MONAI's SwinUNETR, UNETR, SegResNet and UNet.
    prepare_demo  write the demo data set (needs the demo extra: nilearn).
    demo_report   Dice per class and a PNG figure of the demo bundle's test prediction.
    fake_msd      a tiny fake data set in an MSD task's official layout.
    prepare_msd   an MSD task folder -> bundle data list with MONAI's Decathlon splits.
"""

from __future__ import annotations

import json
import sys

import fire

from .benchmark import bench
from .complexity import THESIS_TARGETS, VARIANT_ORDER, complexity_table, count_flops, count_parameters
from .networks import QTUNet, build_architecture


def info(
    variant: str = "tiny",
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    roi: int = 96,
    architecture: str | None = None,
    merge_depth: bool = True,
    decoder: str = "qt",
    flops: bool = True,
) -> None:
    """Print parameters and fvcore GFLOPs as one JSON line (batch 1, training mode, attention matmuls included).

    Args:
        variant: tiny, small or base.
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output classes.
        roi: edge length of the (cubic / square) input.
        architecture: one of the thesis' architectures (QT-UNet, QT-UNet-A, VT-UNet, VT-UNet-A,
            QT-UNet-2D, QT-UNet-2D-A); overrides spatial_dims, merge_depth and decoder.
        merge_depth: merge the depth axis too (QT-UNet) or not (QT-UNet-A).
        decoder: qt, vt or none.
        flops: also count FLOPs (needs fvcore).
    """
    if architecture is not None:
        model = build_architecture(architecture, in_channels, out_channels, variant)
        spatial_dims = model.spatial_dims
    else:
        model = QTUNet(
            in_channels, out_channels, spatial_dims=spatial_dims, variant=variant,
            merge_depth=merge_depth, decoder=decoder,
        )
    shape = (1, in_channels) + (roi,) * spatial_dims
    result = {
        "architecture": architecture or "QTUNet",
        "variant": variant,
        "feature_size": model.feature_size,
        "input": list(shape),
        "params_m": round(count_parameters(model) / 1e6, 3),
    }
    if flops:
        result["gflops"] = round(count_flops(model, shape) / 1e9, 2)
    print(json.dumps(result))


def table(variants: str | list = "tiny,small,base", flops: bool = True, json_file: str | None = None) -> None:
    """Print the family's parameters and GFLOPs next to the thesis' figures as a Markdown table.

    Args:
        variants: comma-separated subset of tiny, small, base.
        flops: count FLOPs too (about a minute per variant on a laptop CPU).
        json_file: also write the rows to this JSON file.
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
    print("\nThesis figures as SPEC.md gives them; QT-UNet-T's printed 6.4 M parameters is a misprint for 6.65 M.")
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


def fake_msd(task: str, root: str, num_training: int = 5, num_test: int = 1, seed: int = 0) -> None:
    """Write a tiny fake data set in the official layout of an MSD task (Task01 ... Task10).

    Args:
        task: brain, heart, liver, hippocampus, prostate, lung, pancreas, hepaticvessel, spleen or colon.
        root: folder in which the TaskNN_Name folder is created.
        num_training: labelled cases.
        num_test: unlabelled test cases.
        seed: random seed.
    """
    from .data.msd import write_fake_msd

    print(f"fake data written: {write_fake_msd(root, task, num_training, num_test, seed=seed)}")


def prepare_msd(task: str, root: str, output_file: str, val_frac: float = 0.2, seed: int = 0) -> None:
    """Turn a downloaded MSD task folder into a bundle data list with MONAI's Decathlon splits.

    Args:
        task: brain, heart, liver, hippocampus, prostate, lung, pancreas, hepaticvessel, spleen or colon.
        root: the folder holding TaskNN_Name (as DecathlonDataset's root_dir).
        output_file: the data list JSON to write (training, validation, testing).
        val_frac: validation fraction (MONAI's default).
        seed: split seed (MONAI's default).
    """
    from .data.msd import msd_datalist

    print(f"data list written: {msd_datalist(root, task, output_file, val_frac, seed)}")


COMMANDS = {"info": info, "table": table, "bench": bench, "prepare_demo": prepare_demo, "demo_report": demo_report,
            "fake_msd": fake_msd, "prepare_msd": prepare_msd}


def main(argv: list[str] | None = None) -> None:
    """Entry point; bad arguments end with a one-line error and exit status 2."""
    try:
        fire.Fire(COMMANDS, command=argv, name="qtunet_monai")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


__all__ = ["info", "table", "bench", "prepare_demo", "demo_report", "fake_msd", "prepare_msd", "main"]
