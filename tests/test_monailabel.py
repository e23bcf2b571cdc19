# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The real MONAI Label server serving the demo bundle, through its REST API.

MONAI Label is heavy and pins its own torch and numpy, so it lives in its own environment (see the
README); the test finds its ``monailabel`` command through ``QTUNET_MONAILABEL_BIN`` (the folder of
that environment's executables) or ``PATH``, and skips when there is none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = os.environ.get("QTUNET_MONAILABEL_BIN") or (str(Path(shutil.which("monailabel")).parent)
                                                   if shutil.which("monailabel") else None)
pytestmark = pytest.mark.skipif(BIN is None or not (Path(BIN) / "monailabel").exists(),
                                reason="MONAI Label is not installed (see README: MONAI Label)")


def _request(url, method="GET", data=None, headers=None, timeout=600):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _multipart(field: str, path: Path) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{path.name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + path.read_bytes() + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server(tmp_path):
    from qtunet_monai import QTUNet
    from qtunet_monai.data.demo import prepare_demo

    pytest.importorskip("nilearn")
    data = tmp_path / "demo"
    prepare_demo(data, num_train=1, num_val=1)
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(data / "imagesTs" / "brain_template.nii.gz", studies / "template.nii.gz")
    shutil.copy(data / "imagesTr" / "brain_000.nii.gz", studies / "case.nii.gz")
    bundle = tmp_path / "qtunet_demo_brain_tissue_segmentation"
    shutil.copytree(REPO / "bundles" / bundle.name, bundle, ignore=shutil.ignore_patterns("data", "models", "eval"))
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(QTUNet(1, 4).state_dict(), bundle / "models" / "model.pt")
    app = tmp_path / "app"
    shutil.copytree(REPO / "monailabel_app", app)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    start = time.perf_counter()
    proc = subprocess.Popen([str(Path(BIN) / "monailabel"), "start_server", "--app", str(app), "--studies",
                             str(studies), "--conf", "models", str(bundle), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while time.perf_counter() - start < 300:
            try:
                if _request(f"{url}/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, "the server exited during start-up"
            time.sleep(1)
        print(f"MONAI Label start-up: {time.perf_counter() - start:.1f} s")
        yield url, bundle, data, studies
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # stop the server by its PID (and its workers)
        proc.wait(timeout=60)


def test_serve_infer_label_and_retrain(server, tmp_path):
    url, bundle, data, studies = server
    status, body = _request(f"{url}/info/")
    info = json.loads(body)
    assert status == 200 and bundle.name in info["models"] and bundle.name in info["trainers"]
    assert info["models"][bundle.name]["labels"] == {"csf": 1, "grey matter": 2, "white matter": 3}

    def infer() -> np.ndarray:
        start = time.perf_counter()
        status, body = _request(f"{url}/infer/{bundle.name}?image=template&output=image", method="POST")
        assert status == 200, body[:500]
        print(f"CPU inference on the demo volume: {time.perf_counter() - start:.1f} s")
        out = tmp_path / f"pred_{uuid.uuid4().hex}.nii.gz"
        out.write_bytes(body)
        prediction, source = nib.load(out), nib.load(studies / "template.nii.gz")
        assert prediction.shape == source.shape
        np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-4)
        return np.asarray(prediction.dataobj)

    before = infer()
    assert set(np.unique(before).tolist()) <= {0, 1, 2, 3}

    body, headers = _multipart("label", data / "labelsTr" / "brain_000.nii.gz")
    status, _ = _request(f"{url}/datastore/label?image=case&tag=final", method="PUT", data=body, headers=headers)
    assert status == 200
    checkpoint = bundle / "models" / "model.pt"
    old = _md5(checkpoint)
    request = json.dumps({"max_epochs": 1, "device": "cpu", "multi_gpu": False}).encode()
    status, body = _request(f"{url}/train/{bundle.name}?run_sync=true", method="POST", data=request,
                            headers={"Content-Type": "application/json"})
    assert status == 200, body[:500]
    assert _md5(checkpoint) != old, "training did not update models/model.pt"
    assert not np.array_equal(infer(), before), "the next inference did not use the retrained model"


def test_an_upload_that_is_not_an_image_is_refused_and_the_server_keeps_serving(server, tmp_path):
    url, bundle, _, studies = server
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is not an image")
    body, headers = _multipart("file", bad)
    status, reply = _request(f"{url}/datastore/?image=bad", method="PUT", data=body, headers=headers)
    assert status == 400 and b"not a readable image" in reply
    assert not list(studies.glob("bad*"))
    assert _request(f"{url}/info/")[0] == 200
    status, _ = _request(f"{url}/infer/{bundle.name}?image=template&output=image", method="POST")
    assert status == 200
