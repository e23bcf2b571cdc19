# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Every bundle's metadata.json against MONAI's metadata schema (the one its ``schema`` field names).

The schema is not part of this repository. The test uses a local copy when one is at hand
(``$QTUNET_METADATA_SCHEMA``, or ``../shared/monai/<schema file>`` next to the checkout); with
``QTUNET_ONLINE=1`` MONAI's ``verify_metadata`` downloads it from the URL in metadata.json. Otherwise
the test is skipped, and pytest's skip summary says why and how to run it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from monai.bundle import verify_metadata

REPO = Path(__file__).resolve().parents[2]
BUNDLES = sorted(p for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())


def _local_schema(name: str) -> Path | None:
    candidates = [os.environ.get("QTUNET_METADATA_SCHEMA"), REPO.parent / "shared" / "monai" / name]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


@pytest.mark.parametrize("bundle", BUNDLES, ids=[b.name for b in BUNDLES])
def test_metadata_follows_the_monai_schema(bundle, tmp_path):
    meta_file = bundle / "configs" / "metadata.json"
    url = json.loads(meta_file.read_text())["schema"]
    name = url.rsplit("/", 1)[-1]
    local = _local_schema(name)
    if local is None and os.environ.get("QTUNET_ONLINE") != "1":
        pytest.skip(f"MONAI's metadata schema {name} is not at hand (no $QTUNET_METADATA_SCHEMA, no "
                    f"{REPO.parent / 'shared' / 'monai' / name}); run with QTUNET_ONLINE=1 to let MONAI download "
                    f"it from {url}")
    schema = tmp_path / name  # verify_metadata downloads unless this file exists
    if local is not None:
        shutil.copy(local, schema)
    verify_metadata(meta_file=str(meta_file), filepath=str(schema))  # raises on a schema violation
