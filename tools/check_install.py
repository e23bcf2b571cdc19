# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Check that a regular (non-editable) install works without the repository.

Builds and installs the package from a copy of its sources into a fresh folder
(``pip install --no-deps --no-build-isolation --target``; the dependencies come from the running
environment), then, in a working directory outside the repository and with only that folder on
``PYTHONPATH``: imports ``qtunet_monai`` (and checks it is the installed copy), builds every
architecture and runs a forward pass, and runs a copied task bundle (``qtunet_msd_spleen_segmentation``)
on fake data: one training epoch with validation, then inference.

Usage, from the repository root::

    python tools/check_install.py [--work /tmp/qtunet_install_check]

Prints one ``ok: ...`` line per step and exits with status 0, or stops at the first failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = "qtunet_msd_spleen_segmentation"
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "qtunet_monai")

# Run with the installed copy: every architecture builds and keeps the input's spatial size.
CHECK_ARCHITECTURES = """
import sys, torch, qtunet_monai
from qtunet_monai import ARCHITECTURES, build_architecture
site = sys.argv[1]
assert qtunet_monai.__file__.startswith(site), f"imported {qtunet_monai.__file__}, not the copy in {site}"
for name in ARCHITECTURES:
    net = build_architecture(name, 1, 2, "tiny").eval()
    shape = (1, 1) + (32,) * net.spatial_dims
    with torch.no_grad():
        out = net(torch.randn(shape))
    assert out.shape == (1, 2) + shape[2:], (name, tuple(out.shape))
print("built", len(ARCHITECTURES), "architectures:", ", ".join(ARCHITECTURES))
"""


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stdout[-3000:]}\n"
                         f"{result.stderr[-3000:]}")
    return result.stdout


def check_install(work: Path) -> None:
    """Install into ``work/site`` and run the checks from ``work/outside``; raises SystemExit on failure."""
    work.mkdir(parents=True, exist_ok=True)
    source, site, outside = work / "source", work / "site", work / "outside"
    for folder in (source, site, outside):
        shutil.rmtree(folder, ignore_errors=True)
    source.mkdir()
    outside.mkdir()
    for name in SOURCES:  # a copy, so the build leaves nothing in the checkout
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target",
          str(site), str(source)], outside, env)
    installed = sorted(p.name for p in site.iterdir())
    if "qtunet_monai" not in installed or "tools" in installed or "tests" in installed:
        raise SystemExit(f"unexpected install contents in {site}: {installed}")
    shutil.rmtree(source)
    print(f"ok: installed into {site}: {', '.join(installed)}")

    env["PYTHONPATH"] = str(site)
    print("ok: " + _run([sys.executable, "-c", CHECK_ARCHITECTURES, str(site)], outside, env).strip())

    bundle = outside / BUNDLE
    shutil.copytree(REPO / "bundles" / BUNDLE, bundle, ignore=shutil.ignore_patterns("data", "models", "eval"))
    cli = [sys.executable, "-m", "qtunet_monai"]
    _run(cli + ["fake_data", "msd_spleen", str(outside / "raw")], outside, env)
    _run(cli + ["prepare_data", "msd_spleen", str(outside / "raw"), "--output_file",
                str(bundle / "data" / "datalist.json")], outside, env)
    small = ["--roi_size", "[32,32,32]"]
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--max_epochs", "1",
          "--val_interval", "1", "--num_workers", "0", "--cache_rate", "0", *small], bundle, env)
    if not (bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"training wrote no {bundle / 'models' / 'model.pt'}")
    _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", *small], bundle, env)
    testing = json.loads((bundle / "data" / "datalist.json").read_text())["testing"]
    predictions = sorted(p.name for p in (bundle / "eval").glob("*_seg.nii.gz"))
    if len(predictions) != len(testing):
        raise SystemExit(f"inference wrote {predictions} for {len(testing)} test case(s)")
    print(f"ok: bundle {BUNDLE} trained one epoch (models/model.pt) and predicted {', '.join(predictions)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="working folder (default: a new temporary folder)")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="qtunet_install_check_"))
    check_install(work.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
