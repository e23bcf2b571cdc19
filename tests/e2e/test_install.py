# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""A regular (non-editable) install works outside the repository: tools/check_install.py installs a copy
of the sources with pip into a fresh folder and, from another folder with only that one on PYTHONPATH,
imports the installed copy, builds every architecture and trains and runs a copied bundle on fake data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qtunet_monai import ARCHITECTURES

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # pip installs a copy and runs a bundle in a subprocess


def test_non_editable_install_runs_a_bundle_outside_the_repository(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tools" / "check_install.py"), "--work", str(tmp_path)],
                            capture_output=True, text=True, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok: ")]
    assert len(lines) == 3, result.stdout
    assert "qtunet_monai-" in lines[0] and f"built {len(ARCHITECTURES)} architectures" in lines[1]
    bundle = tmp_path / "outside" / "qtunet_msd_spleen_segmentation"
    assert (bundle / "models" / "model.pt").is_file() and list((bundle / "eval").glob("*_seg.nii.gz"))
    assert not (tmp_path / "site" / "tools").exists() and not (tmp_path / "source").exists()
