# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""CityScapes and CityScapesCat: the official layout, the thesis' class and category mapping
(Table B.1), and fake data.

The downloads ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip`` extract to
``leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png`` (2048 x 1024 RGB) and
``gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`` (label ids 0-33). The data list
points at the label-id files; the bundles map them to training classes with MONAI's
``MapLabelValued`` using :data:`CLASS_MAP` or :data:`CATEGORY_MAP`, where 0 is void (ignored in the
loss and the metrics).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["CLASS_NAMES", "CATEGORY_NAMES", "CLASS_MAP", "CATEGORY_MAP", "MEAN", "STD",
           "write_fake_cityscapes", "cityscapes_datalist"]

#: training classes (index = class id; 0 void).
CLASS_NAMES = ("void", "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
               "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
               "bicycle")
CATEGORY_NAMES = ("void", "flat", "construction", "object", "nature", "sky", "human", "vehicle")
#: thesis Table B.1: label id 0-33 -> class id (0 void).
CLASS_MAP = (0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 5, 0, 0, 0, 6, 0, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 0, 0,
             17, 18, 19)
#: thesis Table B.1: label id 0-33 -> category id (0 void).
CATEGORY_MAP = (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 5, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7)
#: CityScapes' RGB mean and standard deviation (0-1 scale), as the thesis normalised.
MEAN = (0.28689554, 0.32513303, 0.28389177)
STD = (0.18696375, 0.19017339, 0.18720214)


def write_fake_cityscapes(root: str | Path, num_train: int = 4, num_val: int = 2, num_test: int = 1,
                          size: tuple[int, int] = (224, 112), seed: int = 0) -> Path:
    """Write tiny fake street scenes (``size`` = width x height) in the official layout; returns ``root``.

    The label-id images contain road, sidewalk, building, sky, car, person and void ids.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    width, height = size
    root = Path(root)
    splits = ["train"] * num_train + ["val"] * num_val + ["test"] * num_test
    for i, split in enumerate(splits):
        city = {"train": "aachen", "val": "frankfurt", "test": "berlin"}[split]
        stem = f"{city}_{i:06d}_000019"
        ids = np.full((height, width), 23, np.uint8)  # sky
        horizon = int(height * rng.uniform(0.35, 0.5))
        ids[horizon:, :] = 7  # road
        ids[horizon:, : width // 5] = 8  # sidewalk
        ids[int(height * 0.15):horizon, width // 2:] = 11  # building
        x, y = int(rng.integers(width // 4, width // 2)), horizon + 4
        ids[y:y + height // 6, x:x + width // 6] = 26  # car
        ids[y - 8:y + 6, x - 10:x - 5] = 24  # person
        ids[-4:, :] = 1  # ego vehicle (void)
        palette = {23: (70, 130, 180), 7: (128, 64, 128), 8: (244, 35, 232), 11: (70, 70, 70), 26: (0, 0, 142),
                   24: (220, 20, 60), 1: (0, 0, 0)}
        rgb = np.zeros((height, width, 3), np.float32)
        for value, colour in palette.items():
            rgb[ids == value] = colour
        rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
        image_dir = root / "leftImg8bit" / split / city
        label_dir = root / "gtFine" / split / city
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb, "RGB").save(image_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(ids if split != "test" else np.zeros_like(ids), "L").save(label_dir / f"{stem}_gtFine_labelIds.png")
    return root


def cityscapes_datalist(root: str | Path, output_file: str | Path) -> Path:
    """Pair ``leftImg8bit`` images with their ``gtFine`` label-id files and write the bundle data list:
    ``training`` from train, ``validation`` from val (the thesis reported val), ``testing`` the test
    images (their public labels are empty). Paths are absolute."""
    root = Path(root)
    datalist = {}
    for split, key in (("train", "training"), ("val", "validation"), ("test", "testing")):
        images = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
        items = []
        for image in images:
            label = root / "gtFine" / split / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
            if key == "testing":
                items.append({"image": str(image.resolve())})
                continue
            if not label.is_file():
                raise FileNotFoundError(f"{image} has no label: expected {label}")
            items.append({"image": str(image.resolve()), "label": str(label.resolve())})
        datalist[key] = items
    if not datalist["training"]:
        raise FileNotFoundError(f"no leftImg8bit/train/<city>/*_leftImg8bit.png under {root}: download "
                                "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from cityscapes-dataset.com "
                                "and extract both there.")
    out = Path(output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(datalist, indent=1))
    return out
