# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Explain one image with a trained QT-UNet, and measure what ablating attention blocks costs on a
bundle's data: the files behind ``python -m qtunet_monai explain``.

Outputs of :func:`explain_image` (under ``out_dir``):

- ``cross/<block>.nii.gz`` and ``.png``: per decoder cross-attention block, the weights of the chosen
  voxel's (or region's) query token over the same-stage encoder tokens, one volume per head
  (``X, Y, Z, heads``) in the input file's grid and affine; the PNG shows the head mean and each head;
- ``self/<block>.nii.gz`` and ``.png``: the same for every self-attention block;
- ``rollout.nii.gz`` and ``.png``: attention rollout through the encoder from the bottleneck token
  of the voxel down to the input patches;
- ``cross_attention.png``: all decoder cross-attention blocks, head mean, in one figure;
- ``attention_distance.csv`` and ``.png``: mean attention distance in mm per block and head over the
  whole image;
- with a CCT (``skip="cct"``): ``channel_attention.npz`` and ``.png``, the channel x channel maps per
  layer and scale (mean over heads), and ``channel_attention_mass.csv`` and ``.png``, the attention mass
  each scale's channels receive;
- with routers (``router=``): ``routing/<router>.nii.gz`` (router score and heavy selection, two
  channels) and ``routing/<block>.png`` per conditional block, and ``heavy_share.csv`` and ``.png``, the
  heavy share per class (of the label, or of the prediction without one);
- ``summary.json``.

The rollout needs the attention of every encoder block; routed blocks run their attention on the
routed tokens only, so a network with routed encoder blocks gets no rollout.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..bundle.checkpoints import read_checkpoint
from ..bundle.errors import reported_cause
from ..bundle.files import resolve_inside
from .ablation import ablate
from .channels import ChannelAttentionRecorder, attention_mass_table
from .figures import (
    attention_mass_figure,
    channel_map_figure,
    distance_figure,
    heavy_share_figure,
    slice_figure,
)
from .maps import (
    attention_rollout,
    level_token_spacing,
    mean_attention_distance,
    query_attention_map,
    tokens_to_voxels,
    voxels_to_tokens,
)
from .recorder import AttentionRecorder
from .routing import RoutingRecorder, heavy_share_table
from .sites import attention_sites, level_strides

__all__ = [
    "ablation_dice",
    "attention_distance_table",
    "class_names",
    "explain_image",
    "format_ablation_table",
    "load_bundle_network",
    "parse_voxels",
]


def parse_voxels(spec: str | Sequence) -> np.ndarray:
    """``"60,72,40"`` (one voxel) or ``"50:54,60:64,40:41"`` (a box, ends excluded) -> ``(V, 3)`` array indices."""
    parts = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else [str(p).strip() for p in spec]
    ranges = []
    for part in parts:
        try:
            if ":" in part:
                start, stop = (int(v) for v in part.split(":"))
            else:
                start = int(part)
                stop = start + 1
        except ValueError:
            message = f"voxel {spec!r}: each axis must be an integer index or start:stop, got {part!r}."
            raise ValueError(message) from None
        if stop <= start:
            raise ValueError(f"voxel {spec!r}: empty range {part!r}.")
        ranges.append(range(start, stop))
    if len(ranges) != 3:
        raise ValueError(f"voxel {spec!r}: give three axes, e.g. 60,72,40 or 50:54,60:64,40:41.")
    return np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)


def _default_preprocessing():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    return Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])


def _to_network_voxels(voxels: np.ndarray, input_affine: np.ndarray, network_affine: np.ndarray,
                       network_shape: Sequence[int], image_file: str) -> torch.Tensor:
    """Input-file voxel indices -> the nearest voxels of the preprocessed (network) grid."""
    world = input_affine @ np.concatenate([voxels, np.ones((len(voxels), 1))], axis=1).T
    network = np.rint((np.linalg.inv(network_affine) @ world)[:3].T).astype(int)
    inside = np.all((network >= 0) & (network < np.asarray(network_shape)), axis=1)
    if not inside.any():
        raise ValueError(f"voxel(s) {voxels.tolist()[:4]} of {image_file} fall outside the image the network sees "
                         f"(shape {tuple(network_shape)} after preprocessing).")
    return torch.as_tensor(network[inside])


class _InputSpace:
    """The input file's grid, and the way back to it from the network's (preprocessed) grid."""

    def __init__(self, image_file: str, network_image) -> None:
        import nibabel as nib

        try:
            header = nib.load(image_file)
        except Exception as e:
            raise ValueError(f"cannot read {image_file} as NIfTI: {e}") from e
        self.file = image_file
        self.affine = np.asarray(header.affine, dtype=np.float64)
        self.shape = tuple(int(s) for s in header.shape[:3])
        self.spacing = tuple(float(z) for z in header.header.get_zooms()[:3])
        self.network_affine = np.asarray(network_image.affine, dtype=np.float64)
        self.network_image = network_image

    def resample(self, volumes: torch.Tensor, mode: str = "nearest") -> np.ndarray:
        """``(C, *network_shape)`` -> ``(C, *input_shape)`` in the input's grid (zero outside the network's view)."""
        from monai.data import MetaTensor
        from monai.transforms import SpatialResample

        source = MetaTensor(volumes.float().cpu(), affine=torch.as_tensor(self.network_affine))
        out = SpatialResample(mode=mode, padding_mode="zeros")(
            source, dst_affine=torch.as_tensor(self.affine), spatial_size=self.shape
        )
        return np.asarray(out.detach().cpu().numpy(), dtype=np.float32)

    def save(self, array: np.ndarray, path: Path) -> None:
        """``(C, X, Y, Z)`` -> a NIfTI ``(X, Y, Z, C)`` (``(X, Y, Z)`` for one channel) with the input's affine."""
        import nibabel as nib

        data = array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data.astype(np.float32), self.affine), str(path))


def attention_distance_table(model: nn.Module, recorder: AttentionRecorder,
                             voxel_spacing: Sequence[float]) -> list[dict]:
    """Mean attention distance in physical units per recorded block and head, in forward order."""
    rows = []
    for name, capture in recorder.captures.items():
        spacing = level_token_spacing(model, capture.site.level, voxel_spacing)
        for head, value in enumerate(mean_attention_distance(capture, spacing).tolist()):
            rows.append({"block": name, "level": capture.site.level, "head": head, "mean_distance_mm": value})
    return rows


@torch.no_grad()
def explain_image(
    model: nn.Module,
    image_file: str,
    voxel: str | Sequence,
    out_dir: str,
    preprocessing=None,
    device: str | torch.device = "cpu",
    figures: bool = True,
    label_file: str | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Write attention maps, rollout and attention distance of ``model`` for ``image_file`` (see the module doc).

    Args:
        model: a (trained) 3D :class:`~qtunet_monai.networks.QTUNet`; fused attention works as is.
        image_file: a NIfTI volume.
        voxel: the output voxel (``"x,y,z"`` array indices of the file) or a box (``"x0:x1,y0:y1,z0:z1"``).
        out_dir: where the files go.
        preprocessing: dict transform mapping ``{"image": path}`` to the network's input (a bundle's
            inference preprocessing); default: load and channel-first only.
        device: where to run the network.
        figures: also write the PNG figures.
        label_file: a label of ``image_file`` (same grid) for the heavy share per class of a conditional
            network; default: the network's prediction.
        class_names: names of the classes in the heavy-share table (default ``class {c}``).

    Returns:
        the summary also written to ``summary.json``.
    """
    if getattr(model, "spatial_dims", 3) != 3:
        raise ValueError("explain_image writes NIfTI volumes and needs a 3D network; use the explain.maps functions "
                         "directly for 2D.")
    if getattr(model, "decoder_type", "qt") == "vt":
        raise ValueError("explain_image supports the QT decoder and decoder='none': VT-UNet's blocks call their "
                         "attention through attend() directly, which the explain hooks do not see.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = (preprocessing or _default_preprocessing())({"image": str(image_file)})
    network_image = data["image"]
    space = _InputSpace(str(image_file), network_image)
    network_shape = tuple(network_image.shape[1:])
    query_voxels = _to_network_voxels(parse_voxels(voxel), space.affine, space.network_affine, network_shape,
                                      str(image_file))

    model = model.eval().to(device)
    with AttentionRecorder(model, list(attention_sites(model))) as recorder, \
            ChannelAttentionRecorder(model) as channels, RoutingRecorder(model) as routing:
        logits = model(torch.as_tensor(network_image)[None].float().to(device))
    strides = level_strides(model)

    def query_tokens(capture):
        return voxels_to_tokens(query_voxels.to(device), strides[capture.site.level], capture.geometry.spatial_shape)

    background = np.asarray(_first_channel(image_file), dtype=np.float32)
    center = [int(v) for v in np.median(parse_voxels(voxel), axis=0).round()]
    files = {}
    cross_maps, cross_titles = [], []
    for name, capture in recorder.captures.items():
        token_map = query_attention_map(capture, query_tokens(capture))  # (heads, *tokens)
        volume = space.resample(tokens_to_voxels(token_map, strides[capture.site.level], network_shape))
        folder = "cross" if capture.site.cross else "self"
        path = out / folder / f"{name}.nii.gz"
        space.save(volume, path)
        files[name] = str(path)
        mean = volume.mean(0)
        if capture.site.cross:
            cross_maps.append(mean)
            cross_titles.append(name.replace("decoder.", ""))
        if figures:
            titles = ["mean of heads"] + [f"head {h}" for h in range(volume.shape[0])]
            figure = str(path).replace(".nii.gz", ".png")
            slice_figure(background, [mean, *volume], titles, center, space.spacing, figure)

    encoder = [n for n in attention_sites(model) if n.startswith(("encoder.", "bottleneck."))]
    rollout_volume = None
    if all(n in recorder.captures for n in encoder):  # routed encoder blocks are not recorded
        bottleneck = recorder.captures[[n for n in recorder.captures if n.startswith("bottleneck")][-1]]
        rollout = attention_rollout(model, recorder.captures, query_tokens(bottleneck))  # (1, *stage1 tokens)
        rollout_volume = space.resample(tokens_to_voxels(rollout, strides[0], network_shape))
        space.save(rollout_volume, out / "rollout.nii.gz")

    from monai.data.utils import affine_to_spacing

    network_spacing = [float(s) for s in affine_to_spacing(torch.as_tensor(space.network_affine), r=3)]
    distances = attention_distance_table(model, recorder, network_spacing)
    with open(out / "attention_distance.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["block", "level", "head", "mean_distance_mm"])
        writer.writeheader()
        writer.writerows(distances)
    if figures:
        if rollout_volume is not None:
            slice_figure(background, [rollout_volume[0]], ["rollout (encoder)"], center, space.spacing,
                         str(out / "rollout.png"))
        if cross_maps:
            slice_figure(background, cross_maps, cross_titles, center, space.spacing, str(out / "cross_attention.png"))
        distance_figure(distances, str(out / "attention_distance.png"))

    predicted = logits[0].argmax(0)[tuple(query_voxels[0].tolist())]
    summary = {
        "image": str(image_file),
        "voxel": str(voxel) if isinstance(voxel, str) else ",".join(str(v) for v in voxel),
        "network_voxels": len(query_voxels),
        "network_shape": list(network_shape),
        "network_spacing_mm": network_spacing,
        "predicted_class_at_voxel": int(predicted),
        "maps": files,
        "rollout": None if rollout_volume is None else str(out / "rollout.nii.gz"),
        "attention_distance": str(out / "attention_distance.csv"),
    }
    if channels.active:
        summary.update(_write_channel_attention(channels, out, figures))
    if routing.active:
        labels = logits.argmax(1) if label_file is None else _label_in_network_grid(label_file, space, network_shape)
        summary.update(_write_routing(routing, labels.to(device), strides, space, background, center, out, figures,
                                      class_names, "prediction" if label_file is None else str(label_file)))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _write_channel_attention(channels: ChannelAttentionRecorder, out: Path, figures: bool) -> dict:
    """The CCT's channel maps (``channel_attention.npz``, ``.png``) and attention mass per scale (``.csv``, ``.png``)."""
    maps = channels.maps()
    arrays = {f"{layer}.stage{i + 1}": m.float().numpy() for layer, per_scale in maps.items()
              for i, m in enumerate(per_scale)}
    np.savez(out / "channel_attention.npz", widths=np.asarray(channels.widths), **arrays)
    rows = attention_mass_table(maps, channels.widths)
    with open(out / "channel_attention_mass.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if figures:
        channel_map_figure(maps, channels.widths, str(out / "channel_attention.png"))
        attention_mass_figure(rows, str(out / "channel_attention_mass.png"))
    return {"channel_attention": str(out / "channel_attention.npz"),
            "channel_attention_mass": str(out / "channel_attention_mass.csv")}


def _label_in_network_grid(label_file: str, space: _InputSpace, network_shape: Sequence[int]) -> torch.Tensor:
    """A label of the input file, resampled (nearest) onto the network's grid: ``(1, *network_shape)``."""
    import nibabel as nib
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    try:
        header = nib.load(label_file)
        data = np.asanyarray(header.dataobj)
    except Exception as e:
        raise ValueError(f"cannot read {label_file} as NIfTI: {e}") from e
    if (tuple(data.shape[:3]) != space.shape or data.size != int(np.prod(space.shape))
            or not np.allclose(header.affine, space.affine, atol=1e-4)):
        raise ValueError(f"label {label_file} does not share the grid of {space.file} (shape {tuple(data.shape)} vs "
                         f"{space.shape}, or a different affine).")
    source = MetaTensor(torch.as_tensor(np.asarray(data, dtype=np.float32).reshape(space.shape))[None],
                        affine=torch.as_tensor(space.affine))
    resampled = SpatialResample(mode="nearest", padding_mode="zeros")(
        source, dst_affine=torch.as_tensor(space.network_affine), spatial_size=tuple(network_shape))
    return torch.as_tensor(np.asarray(resampled)).round().long()


def _write_routing(routing: RoutingRecorder, labels: torch.Tensor, strides, space: _InputSpace,
                   background: np.ndarray, center: Sequence[int], out: Path, figures: bool,
                   class_names: Sequence[str] | None, labels_from: str) -> dict:
    """Router scores and heavy selection per router (NIfTI in the input's space, PNG per block) and the
    heavy share per class (``heavy_share.csv``, ``.png``)."""
    network_shape = tuple(labels.shape[1:])
    files: dict[str, str] = {}
    by_block: dict[str, list] = {}
    for name, capture in routing.captures.items():
        stride = strides[capture.level]
        grid = torch.stack([capture.scores[0].float(), capture.selected[0].float()])  # (2, *tokens), first case
        volume = space.resample(tokens_to_voxels(grid, stride, network_shape))
        path = out / "routing" / f"{name}.nii.gz"
        space.save(volume, path)
        files[name] = str(path)
        block = next(b for b in routing.blocks if name.startswith(b + "."))
        by_block.setdefault(block, []).append((name[len(block) + 1:], volume[1]))
    if figures:
        for block, panels in by_block.items():
            titles = [f"heavy: {sub}" for sub, _ in panels]
            slice_figure(background, [v for _, v in panels], titles, center, space.spacing,
                         str(out / "routing" / f"{block}.png"))
    rows = heavy_share_table(routing.captures, labels, strides, class_names)
    for row in rows:
        row["labels"] = labels_from
    with open(out / "heavy_share.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if figures:
        heavy_share_figure(rows, str(out / "heavy_share.png"))
    return {"routing": files, "heavy_share": str(out / "heavy_share.csv")}


def _first_channel(image_file: str) -> np.ndarray:
    import nibabel as nib

    data = np.asanyarray(nib.load(image_file).dataobj)
    return data if data.ndim == 3 else data.reshape(*data.shape[:3], -1)[..., 0]


def _bundle_parser(bundle_dir: str, config: str, ckpt_file: Path | None = None, overrides: dict | None = None):
    """The bundle's ``config`` with the settings stored beside ``ckpt_file`` (as every bundle command) and
    ``overrides`` (the bundle's own keys, e.g. ``pixdim``) applied."""
    from monai.bundle import ConfigParser

    from ..bundle.settings import TRAINED

    root = Path(bundle_dir)
    config_file = root / "configs" / config
    if not config_file.is_file():
        raise ValueError(f"{root} is not a bundle: {config_file} does not exist.")
    parser = ConfigParser()
    parser.read_config(str(config_file))
    meta = root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(root)
    if ckpt_file is not None:
        parser["ckpt_file"] = str(ckpt_file)
    if "settings_file" in parser:  # the model's stored settings apply (train.json reads them only to resume)
        parser["trained"] = TRAINED
    for key, value in (overrides or {}).items():
        if key not in parser:
            raise ValueError(f"--{key}: {config_file} has no such key; give the bundle's own keys (pixdim, roi_size, ...).")
        parser[key] = value
    return parser


def _check_settings(parser, accept: bool) -> None:
    """Stop when the overrides contradict the settings the model was trained with (as the bundle's commands do)."""
    from ..bundle.settings import check_settings

    if "model_settings" in parser:
        check_settings(_parsed(parser, "trained"), _parsed(parser, "model_settings"), accept,
                       _parsed(parser, "settings_file"))


def load_bundle_network(bundle_dir: str, checkpoint: str = "models/model.pt", config: str = "inference.json",
                        overrides: dict | None = None, accept_settings: bool = False):
    """The bundle's network with its trained weights, and the parsed config.

    The settings stored with the model (``settings.json`` beside ``checkpoint``) apply, as in the bundle's
    own commands; ``overrides`` that contradict them stop with the differences listed.

    Args:
        bundle_dir: the bundle folder.
        checkpoint: the weights, relative to the bundle (a plain state dict, as the bundle's training writes).
        config: the config whose ``network_def`` builds the network.
        overrides: config keys to set, as on the bundle's command line (``{"pixdim": [2.0, 2.0, 2.0]}``).
        accept_settings: use overrides that contradict the stored settings (``--accept_settings True``).
    """
    path = resolve_inside(Path(bundle_dir), checkpoint)
    parser = _bundle_parser(bundle_dir, config, path, overrides)
    _check_settings(parser, accept_settings)
    network = _parsed(parser, "network_def")
    if not path.is_file():
        raise ValueError(f"no trained weights at {path}: train the bundle first (see its docs/README.md).")
    state = read_checkpoint(path)  # a CheckpointError (a ValueError) names the file and the reason
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit the network of {bundle_dir}/configs/{config}: {e}") from e
    return network, parser


def class_names(parser) -> list[str]:
    """The bundle's class names, one per output channel: its metadata's ``channel_def`` (``class <i>`` where
    it names none).

    Args:
        parser: the bundle's parsed config, metadata read (as :func:`load_bundle_network` returns it).
    """
    return _class_names(parser, int(_parsed(parser, "num_classes")))


def _class_names(parser, count: int) -> list[str]:
    try:
        channels = parser["_meta_"]["network_data_format"]["outputs"]["pred"]["channel_def"]
        return [str(channels.get(str(i), f"class {i}")) for i in range(count)]
    except (KeyError, TypeError):
        return [f"class {i}" for i in range(count)]


def _parsed(parser, id: str):
    """``parser.get_parsed_content(id)``; a :class:`ReportedError` that MONAI wrapped (a ``DataError`` naming
    a file) is raised as itself."""
    try:
        return parser.get_parsed_content(id)
    except Exception as e:
        reported = reported_cause(e)
        if reported is None or reported is e:
            raise
        raise reported from None


@torch.no_grad()
def ablation_dice(bundle_dir: str, ablations: Sequence[str], split: str = "testing",
                  checkpoint: str = "models/model.pt", device: str | None = None, overrides: dict | None = None,
                  accept_settings: bool = False) -> list[dict]:
    """Dice of a trained bundle on one split of its data list, as trained and with each ablation.

    Uses the bundle's validation pipeline from ``configs/train.json`` (preprocessing, sliding-window
    inferer, post-processing) and MONAI's ``DiceMetric`` without background, in the preprocessed grid.

    Args:
        bundle_dir: the bundle folder (trained: ``models/model.pt``).
        ablations: one entry per evaluation; an entry is a site spec (``decoder.stage2.cross``) or several
            joined by ``+`` (ablated together).
        split: data-list split with labels (``testing`` for the demo, ``validation`` otherwise).
        checkpoint: the weights, relative to the bundle.
        device: default: the bundle's device.
        overrides: config keys to set, as on the bundle's command line; the stored settings apply otherwise.
        accept_settings: use overrides that contradict the stored settings.

    Returns:
        one row per evaluation (the first is the trained network): ``ablation``, ``blocks``, ``split``,
        ``cases`` (the image files scored), ``mean_dice``, ``delta_mean_dice`` and the Dice per class.

    Raises:
        DataError: the split is not in the data list, or its cases fail the bundle's data check.
    """
    from monai.metrics import DiceMetric

    network, parser = load_bundle_network(bundle_dir, checkpoint, config="train.json", overrides=overrides,
                                          accept_settings=accept_settings)
    # set by id: the parser re-resolves the config; editing the parsed dict would leave the validation split
    parser["validate#split"] = split
    run_on = torch.device(device) if device else parser.get_parsed_content("device")
    network = network.eval().to(run_on)
    cases = _parsed(parser, "validate#dataset#data")  # the bundle's own data check of the split
    scored = [c["image"] for c in cases]
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    inferer = parser.get_parsed_content("validate#inferer")
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    prepared = [preprocessing(case) for case in cases]
    names = _class_names(parser, int(parser.get_parsed_content("num_classes")))

    def dice() -> list[float]:
        metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        for item in prepared:
            pred = inferer(item["image"][None].to(run_on), network)[0]
            result = postprocessing({"pred": pred, "label": item["label"].to(run_on)})
            metric(y_pred=result["pred"][None], y=result["label"][None])
        return [float(v) for v in metric.aggregate()]

    rows = []
    for spec in [None, *ablations]:
        if spec is None:
            scores, blocks = dice(), []
        else:
            with ablate(network, [s for s in spec.split("+") if s]) as blocks:
                scores = dice()
        mean = float(np.nanmean(scores))
        row = {"ablation": spec or "none", "blocks": blocks, "split": split, "cases": scored, "mean_dice": mean,
               "delta_mean_dice": mean - rows[0]["mean_dice"] if rows else 0.0}
        row.update({f"dice {name}": s for name, s in zip(names[-len(scores):], scores)})
        rows.append(row)
    return rows


def format_ablation_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`ablation_dice` rows."""
    classes = [k for k in rows[0] if k.startswith("dice ")]
    lines = ["| ablated | mean Dice | change | " + " | ".join(k[5:] for k in classes) + " |",
             "|---|---:|---:|" + "---:|" * len(classes)]
    for row in rows:
        values = " | ".join(f"{row[k]:.3f}" for k in classes)
        lines.append(f"| {row['ablation']} | {row['mean_dice']:.3f} | {row['delta_mean_dice']:+.3f} | {values} |")
    return "\n".join(lines)
