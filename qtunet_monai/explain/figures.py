# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""PNG figures of attention maps (three orthogonal slices through the chosen voxel, the image
underneath), of the mean attention distance per block and head, of a CCT's channel attention and of
a conditional network's heavy share per class. Needs matplotlib (``[demo]`` extra)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["attention_mass_figure", "channel_map_figure", "distance_figure", "heavy_share_figure", "slice_figure"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # an optional dependency
        raise ImportError("the explain figures need matplotlib: pip install 'qtunet_monai[demo]'.") from e
    return plt


def _slices(volume: np.ndarray, voxel: Sequence[int]) -> list[np.ndarray]:
    """Sagittal, coronal and axial planes through ``voxel`` (array axes 0, 1, 2), rows = the later axis."""
    i, j, k = voxel
    return [volume[i, :, :].T, volume[:, j, :].T, volume[:, :, k].T]


def _marks(voxel: Sequence[int]) -> list[tuple[int, int]]:
    i, j, k = voxel
    return [(j, k), (i, k), (i, j)]


def _aspects(spacing: Sequence[float]) -> list[float]:
    sx, sy, sz = spacing
    return [sz / sy, sz / sx, sy / sx]


def slice_figure(
    image: np.ndarray,
    maps: Sequence[np.ndarray],
    titles: Sequence[str],
    voxel: Sequence[int],
    spacing: Sequence[float],
    path: str,
    panel_inches: float = 1.3,
    dpi: int = 72,
) -> None:
    """One row per map: the map over the image in three orthogonal slices through ``voxel``, which is
    marked with a cross. Each row is scaled to its own maximum (the weights of one query).

    Args:
        image: the input volume ``(X, Y, Z)`` (array axes of the file).
        maps: volumes of the same shape.
        titles: one per row.
        voxel: the marked voxel (array indices).
        spacing: voxel size per axis, for the aspect ratio.
        path: the PNG to write.
    """
    plt = _pyplot()
    rows = len(maps)
    fig, axes = plt.subplots(rows, 3, figsize=(3 * panel_inches, rows * panel_inches + 0.2), squeeze=False)
    image_planes = _slices(image, voxel)
    for row, (volume, title) in enumerate(zip(maps, titles)):
        peak = float(volume.max()) or 1.0
        for col, (plane, base, mark, aspect) in enumerate(
            zip(_slices(volume, voxel), image_planes, _marks(voxel), _aspects(spacing))
        ):
            ax = axes[row, col]
            ax.imshow(base, cmap="gray", origin="lower", aspect=aspect)
            overlay = np.ma.masked_less_equal(plane, 0.02 * peak)
            ax.imshow(overlay, cmap="hot", origin="lower", aspect=aspect, alpha=0.65, vmin=0, vmax=peak)
            ax.plot(*mark, marker="+", color="cyan", markersize=8, markeredgewidth=1.5)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(title, fontsize=7)
    for col, plane in enumerate(("sagittal", "coronal", "axial")):
        axes[0, col].set_title(plane, fontsize=8)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def distance_figure(rows: Sequence[dict], path: str, dpi: int = 72) -> None:
    """Mean attention distance (mm) per block: one dot per head, a bar for the mean over heads.

    Args:
        rows: ``{"block", "head", "mean_distance_mm"}`` dicts in forward order.
        path: the PNG to write.
    """
    plt = _pyplot()
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    colours = {"encoder": "tab:blue", "bottleneck": "tab:purple", "attn": "tab:green", "cross": "tab:red"}

    def colour(block: str) -> str:
        if block.startswith("decoder"):
            return colours[block.rsplit(".", 1)[1]]
        return colours[block.split(".")[0]]

    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for x, block in enumerate(blocks):
        values = [r["mean_distance_mm"] for r in rows if r["block"] == block]
        ax.bar(x, float(np.mean(values)), color=colour(block), alpha=0.35)
        ax.scatter([x] * len(values), values, s=8, color=colour(block))
    ax.set_xticks(range(len(blocks)))
    ax.set_xticklabels([b.replace("decoder.", "dec.").replace("encoder.", "enc.").replace("block", "b")
                        for b in blocks], rotation=70, fontsize=7)
    ax.set_ylabel("mean attention distance (mm)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, alpha=0.6) for c in colours.values()]
    ax.legend(handles, ["encoder", "bottleneck", "decoder self", "decoder cross"], fontsize=7, loc="upper left")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def channel_map_figure(maps: dict, widths: Sequence[int], path: str, dpi: int = 72) -> None:
    """The CCT's channel attention maps: one row per layer, one column per query scale, each map
    ``(C_i, C_S)`` with lines between the key scales' channel blocks.

    Args:
        maps: ``{"layer{l}": [(C_i, C_S) per scale]}`` (:meth:`ChannelAttentionRecorder.maps`).
        widths: ``C_i`` of each scale.
        path: the PNG to write.
    """
    plt = _pyplot()
    layers = list(maps)
    scales = len(widths)
    fig, axes = plt.subplots(len(layers), scales, figsize=(2.6 * scales, 1.6 * len(layers) + 0.4), squeeze=False)
    bounds = np.cumsum(widths)[:-1] - 0.5
    for row, layer in enumerate(layers):
        for col, scale_map in enumerate(maps[layer]):
            ax = axes[row, col]
            ax.imshow(np.asarray(scale_map, dtype=np.float32), cmap="viridis", aspect="auto", interpolation="nearest")
            for bound in bounds:
                ax.axvline(bound, color="white", linewidth=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"queries: stage{col + 1} ({widths[col]} ch.)", fontsize=8)
        axes[row, 0].set_ylabel(layer, fontsize=8)
    for col in range(scales):
        axes[-1, col].set_xlabel("keys: channels of stage 1 | 2 | ...", fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def attention_mass_figure(rows: Sequence[dict], path: str, dpi: int = 72) -> None:
    """The attention mass each scale's channels receive from all queries, per CCT layer (bars), against
    the share of uniform attention (dashed).

    Args:
        rows: :func:`~qtunet_monai.explain.channels.attention_mass_table` rows.
        path: the PNG to write.
    """
    plt = _pyplot()
    stages = [k for k in rows[0] if k.startswith("stage")]
    received = [r for r in rows if r["query"] == "all" and r["layer"] != "uniform"]
    uniform = next(r for r in rows if r["layer"] == "uniform")
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(stages), 2.8))
    width = 0.8 / max(len(received), 1)
    for index, row in enumerate(received):
        xs = np.arange(len(stages)) + (index - (len(received) - 1) / 2) * width
        ax.bar(xs, [row[s] for s in stages], width, label=row["layer"])
    for j, stage in enumerate(stages):
        ax.plot([j - 0.45, j + 0.45], [uniform[stage]] * 2, "k--", linewidth=1)
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages)
    ax.set_ylabel("attention mass received")
    ax.legend(fontsize=7, title="dashed: uniform", title_fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def heavy_share_figure(rows: Sequence[dict], path: str, dpi: int = 72) -> None:
    """Heavy share per class of each router (grouped bars), the capacity marked.

    Args:
        rows: :func:`~qtunet_monai.explain.routing.heavy_share_table` rows.
        path: the PNG to write.
    """
    plt = _pyplot()
    classes = [k for k in rows[0] if k.startswith("share ")]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.28 * len(rows) * max(len(classes), 1) / 2 + 1.5), 3.4))
    width = 0.8 / max(len(classes), 1)
    for index, key in enumerate(classes):
        xs = np.arange(len(rows)) + (index - (len(classes) - 1) / 2) * width
        ax.bar(xs, [r[key] for r in rows], width, label=key[6:])
    ax.scatter(range(len(rows)), [r["capacity"] for r in rows], marker="_", s=80, color="black", label="capacity")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["router"].replace("decoder.", "dec.").replace("encoder.", "enc.").replace("block", "b")
                        for r in rows], rotation=70, fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("heavy share of the class")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
