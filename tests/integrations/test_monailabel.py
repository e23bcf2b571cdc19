# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The real MONAI Label server serving the demo bundle, through its REST API.

MONAI Label is heavy and pins its own torch and numpy, so it lives in its own environment (see the
README); the test finds its ``monailabel`` command through ``QTUNET_MONAILABEL_BIN`` (the folder of
that environment's executables) or ``PATH``, and skips when there is none.
"""

from __future__ import annotations

import gzip
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
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
BIN = os.environ.get("QTUNET_MONAILABEL_BIN") or (str(Path(shutil.which("monailabel")).parent)
                                                   if shutil.which("monailabel") else None)
pytestmark = [pytest.mark.slow,  # a real server in a subprocess
              pytest.mark.skipif(BIN is None or not (Path(BIN) / "monailabel").exists(),
                                 reason="MONAI Label is not installed (see README: MONAI Label)")]


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


def _form(fields: dict) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = "".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
                   for k, v in fields.items()) + f"--{boundary}--\r\n"
    return body.encode(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(app: Path, studies: Path, bundle: Path, host: str, port: int, tmpdir: Path, *conf: str):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmpdir)}
    command = [str(Path(BIN) / "monailabel"), "start_server", "--app", str(app), "--studies", str(studies),
               "--conf", "models", str(bundle), *conf, "--host", host, "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


MAX_UPLOAD_MB = 2


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
    shutil.copytree(REPO / "monailabel_app", app, ignore=shutil.ignore_patterns("logs", "bin", "lib", "model"))
    tmpdir = tmp_path / "server_tmp"  # the server's temp folder: where MONAI Label puts uploads
    tmpdir.mkdir()
    port = _free_port()
    start = time.perf_counter()
    proc = _start(app, studies, bundle, "127.0.0.1", port, tmpdir, "--conf", "max_upload_mb", str(MAX_UPLOAD_MB))
    url = f"http://127.0.0.1:{port}"
    try:
        while time.perf_counter() - start < 300:
            try:
                if _request(f"{url}/info/", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, f"the server exited during start-up:\n{proc.stdout.read()[-3000:]}"
            time.sleep(1)
        print(f"MONAI Label start-up: {time.perf_counter() - start:.1f} s")
        yield SimpleNamespace(url=url, bundle=bundle, data=data, studies=studies, tmpdir=tmpdir, root=tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # stop the server by its PID (and its workers)
        proc.wait(timeout=60)


def _tree(root: Path) -> list[str]:
    """Every file and folder under ``root`` but the server's own (its app folder with logs, its temp folder)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.relative_to(root).parts[0] not in ("app", "server_tmp"))


def _uploads_left(tmpdir: Path) -> list[str]:
    return sorted(p.name for p in tmpdir.iterdir() if p.name.endswith((".nii", ".nii.gz")))


def test_serve_infer_label_and_retrain(server, tmp_path):
    url, bundle, data, studies = server.url, server.bundle, server.data, server.studies
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
    start = time.perf_counter()
    status, body = _request(f"{url}/train/{bundle.name}?run_sync=true", method="POST", data=request,
                            headers={"Content-Type": "application/json"})
    assert status == 200, body[:500]
    print(f"CPU retraining round (1 epoch, 1 labelled image): {time.perf_counter() - start:.1f} s")
    metrics = json.loads(body)
    print(f"retraining round: {metrics}")
    assert metrics["metric_name"] == "val_mean_dice" and metrics["train_images"] == metrics["validation_images"] == 1
    assert "too few to hold any out" in metrics["validation"] and len(metrics["epochs"]) == 1
    assert metrics["previous_metric"] is not None and metrics["epochs"][0]["loss"] > 0
    if metrics["model_replaced"]:  # the new model did better on the labelled image: it is served
        assert metrics["best_metric"] > metrics["previous_metric"]
        assert _md5(checkpoint) != old, "training did not update models/model.pt"
        assert not np.array_equal(infer(), before), "the next inference did not use the retrained model"
    else:  # it did not: the previous model stays
        assert metrics["epochs"][0]["metric"] <= metrics["previous_metric"]
        assert _md5(checkpoint) == old and np.array_equal(infer(), before)


def test_an_upload_that_is_not_an_image_is_refused_and_the_server_keeps_serving(server, tmp_path):
    url, bundle, studies = server.url, server.bundle, server.studies
    bad = tmp_path / "notes.nii.gz"
    bad.write_text("this is not an image")
    body, headers = _multipart("file", bad)
    status, reply = _request(f"{url}/datastore/?image=bad", method="PUT", data=body, headers=headers)
    assert status == 400 and b"unreadable" in reply
    assert not list(studies.glob("bad*"))
    assert _request(f"{url}/info/")[0] == 200
    status, _ = _request(f"{url}/infer/{bundle.name}?image=template&output=image", method="POST")
    assert status == 200


def test_ids_tags_and_paths_outside_the_studies_folder_are_refused(server, tmp_path):
    url, bundle, data, studies = server.url, server.bundle, server.data, server.studies
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(studies / "case.nii.gz", outside / "evil.nii.gz")
    before = _tree(tmp_path)
    image, headers = _multipart("file", data / "imagesTr" / "brain_000.nii.gz")
    label, label_headers = _multipart("label", data / "labelsTr" / "brain_000.nii.gz")
    refused = [
        ("PUT", "/datastore/?image=../outside/evil", image, headers),
        ("PUT", "/datastore/image?image=%2Ftmp%2Fevil", image, headers),
        ("PUT", "/datastore/label?image=case&tag=../../outside", label, label_headers),
        ("PUT", "/datastore/label?image=../outside/evil&tag=final", label, label_headers),
        ("DELETE", "/datastore/?id=../outside/evil", None, {}),
        ("DELETE", "/datastore/label?id=case&tag=../../outside", None, {}),
        ("GET", "/datastore/image?image=../outside/evil", None, {}),
        ("GET", "/datastore/label?label=case&tag=../final", None, {}),
        ("POST", f"/infer/{bundle.name}?image={outside / 'evil.nii.gz'}&output=image", None, {}),
        ("POST", f"/infer/{bundle.name}?image=../../etc/passwd&output=image", None, {}),
        ("POST", f"/train/{bundle.name}?run_sync=true", json.dumps({"model_filename": "../../../evil.pt"}).encode(),
         {"Content-Type": "application/json"}),
    ]
    for method, path, body, extra in refused:
        status, reply = _request(f"{url}{path}", method=method, data=body, headers=extra)
        assert status == 400, f"{method} {path}: {status} {reply[:300]}"
    form, form_headers = _form({"params": json.dumps({"image": str(outside / "evil.nii.gz")})})
    status, reply = _request(f"{url}/infer/{bundle.name}?image=template&output=image", method="POST", data=form,
                             headers=form_headers)
    assert status == 400 and b"not an image id of the datastore" in reply
    assert _tree(tmp_path) == before  # nothing written or deleted, inside the studies folder or outside it
    assert (outside / "evil.nii.gz").is_file()
    assert _uploads_left(server.tmpdir) == []


def test_uploads_are_read_in_full_checked_against_their_image_and_deleted_when_refused(server, tmp_path):
    url, studies = server.url, server.studies
    case = nib.load(studies / "case.nii.gz")
    whole = tmp_path / "whole.nii.gz"
    nib.Nifti1Image(np.asarray(case.dataobj), case.affine).to_filename(whole)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    header_only = tmp_path / "header.nii.gz"
    header_only.write_bytes(gzip.compress(gzip.decompress(whole.read_bytes())[:352]))
    big = tmp_path / "big.nii"
    nib.Nifti1Image(np.random.default_rng(0).random((100, 100, 70)).astype(np.float32), np.eye(4)).to_filename(big)
    assert big.stat().st_size > MAX_UPLOAD_MB * 2**20
    wrong_shape = tmp_path / "wrong_shape.nii.gz"
    nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), case.affine).to_filename(wrong_shape)
    wrong_values = tmp_path / "wrong_values.nii.gz"
    nib.Nifti1Image(np.full(case.shape, 9, np.uint8), case.affine).to_filename(wrong_values)
    uploads = [
        ("/datastore/?image=truncated", "file", truncated, 400, b"unreadable"),
        ("/datastore/?image=header", "file", header_only, 400, b"unreadable"),
        ("/datastore/?image=big", "file", big, 413, b"upload limit"),
        ("/datastore/label?image=case&tag=final", "label", wrong_shape, 400, b"does not match image shape"),
        ("/datastore/label?image=case&tag=final", "label", wrong_values, 400, b"outside the task's classes"),
    ]
    for path, field, file, code, message in uploads:
        body, headers = _multipart(field, file)
        status, reply = _request(f"{url}{path}", method="PUT", data=body, headers=headers)
        assert status == code and message in reply, f"{file.name}: {status} {reply[:300]}"
    assert _uploads_left(server.tmpdir) == [], "refused uploads were left in the server's temp folder"
    assert sorted(p.name for p in studies.iterdir() if p.name.endswith(".nii.gz")) == ["case.nii.gz",
                                                                                        "template.nii.gz"]
    assert not (studies / "labels" / "final").exists() or not list((studies / "labels" / "final").iterdir())

    # a label put into the studies folder by hand bypasses the upload checks: training's data check refuses it
    (studies / "labels" / "final").mkdir(parents=True, exist_ok=True)
    shutil.copy(wrong_values, studies / "labels" / "final" / "case.nii.gz")
    for _ in range(60):  # the datastore notices new files by watching the folder
        if json.loads(_request(f"{url}/datastore/?output=all")[1])["objects"]["case"]["labels"]:
            break
        time.sleep(1)
    request = json.dumps({"max_epochs": 1, "device": "cpu", "multi_gpu": False}).encode()
    status, reply = _request(f"{url}/train/{server.bundle.name}?run_sync=true", method="POST", data=request,
                             headers={"Content-Type": "application/json"})
    assert status == 400 and b"case.nii.gz: label values [9] are outside the task's classes" in reply, reply[:500]


def test_the_server_refuses_to_serve_beyond_loopback_without_authentication(server):
    app = server.root / "app"
    proc = _start(app, server.studies, server.bundle, "0.0.0.0", _free_port(), server.tmpdir)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        pytest.fail("the server started on 0.0.0.0 without authentication")
    assert proc.returncode == 2
    last = output.strip().splitlines()[-1]
    assert last.startswith("qtunet MONAI Label app: refusing to serve on '0.0.0.0' without authentication")
    assert "--host 127.0.0.1" in last and "Traceback" not in output
