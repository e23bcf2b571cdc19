# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Try the demo bundle as a new user would, with bad inputs and injected faults, and print the table of
the README's "Reliability" section (Markdown) from what actually happened.

Every case runs the bundle's own commands (``python -m monai.bundle run ...``) on a fresh copy of
``bundles/qtunet_demo_brain_tissue_segmentation`` with the demo data (2 training, 1 validation, 1
test case), damaged or disturbed in one way, and reports the exit status and the last line printed.

    python tools/reliability.py                    # all cases (about half an hour on a 2-core CPU)
    python tools/reliability.py --only nan,kill    # cases whose name contains one of these
    python tools/reliability.py --json_file eval/reliability.json

Full disk and read-only folders are small tmpfs mounts: they need root; without it those rows say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"
TRAIN = ["configs/train.json"]
EVALUATE = ["configs/train.json", "configs/evaluate.json"]
INFER = ["configs/inference.json"]
QUICK = ["--max_epochs", "1", "--val_interval", "1"]


@dataclass
class Outcome:
    returncode: int
    last_line: str
    verdict: str  # what the user got, in words
    ok: bool  # the behaviour the project promises


@dataclass
class Case:
    name: str
    stage: str  # training, inference, fault, checkpoint, concurrent
    what: str
    run: Callable[[Path], Outcome]


# ------------------------------------------------------------------------------------------------ helpers
def _env() -> dict:
    path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _command(configs: list[str], *overrides: str) -> list[str]:
    files = "[" + ",".join(f"'{c}'" for c in configs) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", files, *overrides]


def _bundle_run(bundle: Path, configs: list[str], *overrides: str, timeout: float = 1200):
    return subprocess.run(_command(configs, *overrides), cwd=bundle, capture_output=True, text=True, timeout=timeout,
                          env=_env(), check=False)


def _last_line(done) -> str:
    lines = [line for line in (done.stderr or "").splitlines() + (done.stdout or "").splitlines()[-1:] if line.strip()]
    errors = [line for line in (done.stderr or "").splitlines() if line.strip()]
    return (errors or lines or [""])[-1].strip()


def _short(text: str, bundle: Path) -> str:
    return text.replace(str(bundle.resolve()), "<bundle>").replace(str(bundle), "<bundle>").replace("|", "\\|")


def _stops_naming(bundle: Path, done, file: Path | str) -> Outcome:
    """The run must fail and its last line must name ``file``."""
    last = _last_line(done)
    relative = os.path.relpath(Path(file).resolve(), bundle.resolve())  # as the bundle's config names it
    named = any(name in last for name in (str(Path(file).resolve()), str(file), relative))
    ok = done.returncode != 0 and named
    verdict = "stops, names the file" if ok else ("exit 0" if done.returncode == 0 else "stops, file not named")
    return Outcome(done.returncode, _short(last, bundle), verdict, ok)


def _datalist(bundle: Path) -> dict:
    return json.loads((bundle / "data" / "datalist.json").read_text())


def _case_file(bundle: Path, split: str, key: str = "image", index: int = 0) -> Path:
    return (bundle / "data" / _datalist(bundle)[split][index][key]).resolve()


def _rewrite(path: Path, change: Callable[[np.ndarray], np.ndarray]) -> None:
    image = nib.load(path)
    data = np.asarray(image.dataobj).astype(np.float32)
    nib.save(nib.Nifti1Image(change(data), image.affine), path)


def _set(value: float):
    def change(data):
        data = data.copy()
        index = tuple(s // 2 for s in data.shape)
        data[index] = value
        return data

    return change


# ------------------------------------------------------------------------------------ bad input: training
def _damage(split: str, key: str, damage: Callable[[Path], Path | None], configs=TRAIN, overrides=QUICK):
    def run(bundle: Path) -> Outcome:
        file = _case_file(bundle, split, key)
        named = damage(file)
        named = named if isinstance(named, Path) else file  # a damage may move the file
        return _stops_naming(bundle, _bundle_run(bundle, configs, *overrides), named)

    return run


def _datalist_damage(change: Callable[[Path], None]):
    def run(bundle: Path) -> Outcome:
        path = bundle / "data" / "datalist.json"
        change(path)
        return _stops_naming(bundle, _bundle_run(bundle, TRAIN, *QUICK), path)

    return run


def _empty_training(path: Path) -> None:
    content = json.loads(path.read_text())
    content["training"] = []
    path.write_text(json.dumps(content))


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])


def _header_only(file: Path) -> Path:
    image = nib.load(file)
    target = file.with_name(file.name.replace(".nii.gz", ".nii"))
    nib.save(image, target)
    target.write_bytes(target.read_bytes()[:352])
    _point_to(file, target)
    return target


def _point_to(old: Path, new: Path) -> None:
    """Replace ``old`` by ``new`` in the bundle's data list (``data/<folder>/<file>``)."""
    data = old.parents[1]
    text = (data / "datalist.json").read_text()
    (data / "datalist.json").write_text(text.replace(f'"{old.relative_to(data)}"', f'"{new.relative_to(data)}"'))


def _two_d(file: Path) -> None:
    image = nib.load(file)
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(data[:, :, data.shape[2] // 2], image.affine), file)


def _five_d(file: Path) -> None:
    image = nib.load(file)
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([np.stack([data, data], -1)] * 2, -1), image.affine), file)


def _two_channels(file: Path) -> None:
    image = nib.load(file)
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), image.affine), file)


def _crop(file: Path) -> None:
    image = nib.load(file)
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:-3], image.affine), file)


def _label_value(file: Path) -> None:
    _rewrite(file, lambda d: np.where(np.arange(d.size).reshape(d.shape) == 0, 7, d).astype(np.uint8))


def _training_cases() -> list[Case]:
    t = "training"
    return [
        Case("empty_list", t, "data list without training cases", _datalist_damage(_empty_training)),
        Case("datalist_missing", t, "data list file missing", _datalist_damage(lambda p: p.unlink())),
        Case("datalist_not_json", t, "data list is not JSON", _datalist_damage(lambda p: p.write_text("{training"))),
        Case("image_missing", t, "image file missing", _damage("training", "image", lambda f: f.unlink())),
        Case("label_missing", t, "label file missing", _damage("training", "label", lambda f: f.unlink())),
        Case("not_nifti", t, "image is a text file", _damage("training", "image", lambda f: f.write_text("no image"))),
        Case("truncated", t, "image .nii.gz truncated to half", _damage("training", "image", _truncate)),
        Case("header_only", t, "NIfTI header without voxels", _damage("training", "image", _header_only)),
        Case("nan", t, "one NaN voxel", _damage("training", "image", lambda f: _rewrite(f, _set(np.nan)))),
        Case("inf", t, "one infinite voxel", _damage("training", "image", lambda f: _rewrite(f, _set(np.inf)))),
        Case("extreme", t, "one voxel of 3e38 (finite)", _damage("training", "image",
                                                                 lambda f: _rewrite(f, _set(3e38)))),
        Case("inf_unchecked", t, "infinite voxel with `--check_data False` (headers only): the loss guard",
             _damage("training", "image", lambda f: _rewrite(f, _set(np.inf)), overrides=[*QUICK, "--check_data",
                                                                                         "False"])),
        Case("two_d", t, "2-D image given to the 3-D bundle", _damage("training", "image", _two_d)),
        Case("five_d", t, "5-D image", _damage("training", "image", _five_d)),
        Case("two_channels", t, "2 channels, the network takes 1", _damage("training", "image", _two_channels)),
        Case("label_shape", t, "label 3 voxels shorter than the image", _damage("training", "label", _crop)),
        Case("label_value", t, "label value 7 (classes 0..3)", _damage("training", "label", _label_value)),
        Case("label_channels", t, "label with 2 channels", _damage("training", "label", _two_channels)),
        Case("validation_nan", t, "NaN in a validation image", _damage("validation", "image",
                                                                       lambda f: _rewrite(f, _set(np.nan)))),
    ]


# ----------------------------------------------------------------------------------- bad input: inference
def _inference_damage(damage: Callable[[Path], Path | None]):
    def run(bundle: Path) -> Outcome:
        _train_model(bundle)
        file = _case_file(bundle, "testing")
        named = damage(file)
        named = named if isinstance(named, Path) else file  # a damage may move the file
        return _stops_naming(bundle, _bundle_run(bundle, INFER), named)

    return run


def _duplicate_names(bundle: Path) -> Outcome:
    _train_model(bundle)
    file = _case_file(bundle, "testing")
    other = bundle / "data" / "other" / file.name
    other.parent.mkdir()
    shutil.copy(file, other)
    datalist = f"[{{'image': '{file}'}}, {{'image': '{other.resolve()}'}}]"
    return _stops_naming(bundle, _bundle_run(bundle, INFER, "--datalist", datalist), other.resolve())


def _skip_bad(bundle: Path) -> Outcome:
    _train_model(bundle)
    good = _case_file(bundle, "testing")
    bad = good.with_name("nan_case.nii.gz")
    shutil.copy(good, bad)
    _rewrite(bad, _set(np.nan))
    datalist = f"[{{'image': '{good}'}}, {{'image': '{bad}'}}]"
    done = _bundle_run(bundle, INFER, "--datalist", datalist, "--skip_bad_cases", "True")
    written = sorted(p.name for p in (bundle / "eval").glob("*_seg.nii.gz"))
    log = done.stdout + done.stderr
    ok = done.returncode == 0 and written == [good.name.replace(".nii.gz", "_seg.nii.gz")] and str(bad) in log
    warning = next((line for line in log.splitlines() if str(bad) in line), "")
    return Outcome(done.returncode, _short(warning.strip(), bundle),
                   f"good case predicted, bad one skipped and listed ({written})" if ok else f"written: {written}", ok)


_MODEL_CACHE: dict[str, Path] = {}
_MODEL_LOCK = threading.Lock()


def _train_model(bundle: Path) -> None:
    """A models/model.pt for inference: trained once (1 epoch), then copied."""
    with _MODEL_LOCK:
        _train_model_once(bundle)
    (bundle / "models").mkdir(exist_ok=True)
    shutil.copy(_MODEL_CACHE["model"], bundle / "models" / "model.pt")


def _train_model_once(bundle: Path) -> None:
    if "model" not in _MODEL_CACHE:
        done = _bundle_run(bundle, TRAIN, *QUICK)
        if done.returncode != 0:
            raise RuntimeError(f"training the model for the inference cases failed:\n{done.stderr[-3000:]}")
        cache = Path(tempfile.mkdtemp(prefix="qtunet_reliability_model_")) / "model.pt"
        shutil.copy(bundle / "models" / "model.pt", cache)
        _MODEL_CACHE["model"] = cache
        shutil.rmtree(bundle / "models")
        shutil.rmtree(bundle / "eval", ignore_errors=True)


def _inference_cases() -> list[Case]:
    i = "inference"
    return [
        Case("infer_nan", i, "one NaN voxel", _inference_damage(lambda f: _rewrite(f, _set(np.nan)))),
        Case("infer_inf", i, "one infinite voxel", _inference_damage(lambda f: _rewrite(f, _set(-np.inf)))),
        Case("infer_extreme", i, "one voxel of 3e38", _inference_damage(lambda f: _rewrite(f, _set(3e38)))),
        Case("infer_two_d", i, "2-D image", _inference_damage(_two_d)),
        Case("infer_truncated", i, "truncated .nii.gz", _inference_damage(_truncate)),
        Case("infer_missing", i, "image missing", _inference_damage(lambda f: f.unlink())),
        Case("infer_not_nifti", i, "image is a text file", _inference_damage(lambda f: f.write_text("no image"))),
        Case("infer_two_channels", i, "2 channels", _inference_damage(_two_channels)),
        Case("infer_duplicate_names", i, "`a/case.nii.gz` and `b/case.nii.gz` (same output name)", _duplicate_names),
        Case("infer_skip_bad", i, "a NaN case with `--skip_bad_cases True`", _skip_bad),
    ]


# ------------------------------------------------------------------------------------------------- faults
def _poll(condition: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def _kill_during_epoch(bundle: Path) -> Outcome:
    proc = subprocess.Popen(_command(TRAIN, "--max_epochs", "3", "--val_interval", "1"), cwd=bundle, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = bundle / "models" / "resume.pt"
    _poll(resume.exists, 1200, 0.2)
    time.sleep(2.0)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(resume, weights_only=True)
    done = _bundle_run(bundle, TRAIN, "--max_epochs", "3", "--val_interval", "1", "--resume", "True")
    final = torch.load(resume, weights_only=True)
    ok = done.returncode == 0 and final["epoch"] == 3 and final["best_metric_epoch"] >= 1
    return Outcome(done.returncode, _short(_last_line(done), bundle),
                   f"killed after epoch {saved['epoch']}; resumed to epoch {final['epoch']}, best metric "
                   f"{final['best_metric']:.4f} (epoch {final['best_metric_epoch']}) kept", ok)


def _kill_during_write(bundle: Path) -> Outcome:
    models = bundle / "models"
    proc = subprocess.Popen(_command(TRAIN, "--max_epochs", "3", "--val_interval", "10"), cwd=bundle, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def writing() -> bool:
        return models.is_dir() and any(p.name.startswith(".resume.pt.") for p in models.iterdir())

    caught = _poll(writing, 1200)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in models.iterdir() if p.name.endswith(".tmp"))
    readable = not (models / "resume.pt").exists() or bool(torch.load(models / "resume.pt", weights_only=True))
    done = _bundle_run(bundle, TRAIN, "--max_epochs", "1", "--val_interval", "10", "--resume", "True")
    after = sorted(p.name for p in models.iterdir() if p.name.endswith(".tmp"))
    ok = caught and bool(left) and readable and not after and done.returncode == 0
    return Outcome(done.returncode, _short(_last_line(done), bundle),
                   f"killed while writing: {len(left)} temporary left, old resume.pt readable={readable}; next start "
                   f"removed it ({len(after)} left)", ok)


def _mount_tmpfs(folder: Path, options: str) -> str | None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True,
                          check=False)
    return None if done.returncode == 0 else (done.stderr.strip() or "mount failed")


def _full_disk(bundle: Path) -> Outcome:
    folder = bundle / "small_disk"
    refused = _mount_tmpfs(folder, "size=40m")  # model.pt (27 MB) fits, resume.pt (80 MB) does not
    if refused:
        return Outcome(-1, refused, "not run: mounting a tmpfs is not permitted here", True)
    try:
        done = _bundle_run(bundle, TRAIN, *QUICK, "--ckpt_dir", str(folder))
        left = sorted(p.name for p in folder.iterdir())
        outcome = _stops_naming(bundle, done, folder / "resume.pt")
        outcome.verdict += f"; left in the folder: {left}"
        outcome.ok = outcome.ok and not any(name.endswith(".tmp") for name in left)
        return outcome
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def _read_only(configs: list[str], key: str, needs_model: bool):
    def run(bundle: Path) -> Outcome:
        if needs_model:
            _train_model(bundle)
        folder = bundle / "read_only"
        refused = _mount_tmpfs(folder, "ro,size=1m")
        if refused:
            return Outcome(-1, refused, "not run: mounting a tmpfs is not permitted here", True)
        try:
            start = time.time()
            done = _bundle_run(bundle, configs, *QUICK, f"--{key}", str(folder))
            outcome = _stops_naming(bundle, done, folder)
            outcome.verdict += f" after {time.time() - start:.0f} s (start-up)"
            return outcome
        finally:
            subprocess.run(["umount", str(folder)], check=True)

    return run


# ---------------------------------------------------------------------------------- malicious checkpoints
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(configs: list[str], file: str, *overrides: str):
    def run(bundle: Path) -> Outcome:
        marker = bundle / "PAYLOAD_RAN"
        (bundle / "models").mkdir(exist_ok=True)
        torch.save({"model": _Payload(marker)}, bundle / "models" / file)
        done = _bundle_run(bundle, configs, *overrides)
        last = _last_line(done)
        ok = done.returncode != 0 and not marker.exists()
        verdict = ("refused, payload did not run" if ok else
                   "PAYLOAD RAN" if marker.exists() else "exit 0")
        return Outcome(done.returncode, _short(last, bundle), verdict, ok)

    return run


def _checkpoint_cases() -> list[Case]:
    c = "checkpoint"
    return [
        Case("malicious_inference", c, "pickled payload in `models/model.pt`, inference.json",
             _malicious(INFER, "model.pt")),
        Case("malicious_evaluate", c, "pickled payload in `models/model.pt`, evaluate.json",
             _malicious(EVALUATE, "model.pt")),
        Case("malicious_resume", c, "pickled payload in `models/resume.pt`, `--resume True`",
             _malicious(TRAIN, "resume.pt", *QUICK, "--resume", "True")),
        Case("malicious_finetune", c, "pickled payload as `--finetune_checkpoint`",
             _malicious(TRAIN, "pretrained.pt", *QUICK, "--finetune", "True")),
    ]


# ----------------------------------------------------------------------------------------------- concurrent
def _concurrent_training(bundle: Path) -> Outcome:
    procs = [subprocess.Popen(_command(TRAIN, *QUICK), cwd=bundle, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = [p.wait() for p in procs]
    state = torch.load(bundle / "models" / "resume.pt", weights_only=True)
    model = torch.load(bundle / "models" / "model.pt", weights_only=True)
    left = [p.name for p in (bundle / "models").iterdir() if p.name.endswith(".tmp")]
    ok = codes == [0, 0] and state["epoch"] == 1 and any(k.endswith("classifier.weight") for k in model) and not left
    return Outcome(max(codes), "", f"both exit {codes}; resume.pt and model.pt load; temporaries left: {left}", ok)


def _concurrent_inference(bundle: Path) -> Outcome:
    _train_model(bundle)
    procs = [subprocess.Popen(_command(INFER), cwd=bundle, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    codes = [p.wait() for p in procs]
    outputs = sorted((bundle / "eval").glob("*_seg.nii.gz"))
    readable = all(np.asarray(nib.load(p).dataobj).size for p in outputs)
    left = [p.name for p in (bundle / "eval").iterdir() if ".tmp" in p.name]
    ok = codes == [0, 0, 0] and outputs and readable and not left
    return Outcome(max(codes), "", f"3 runs writing the same predictions: exits {codes}, {len(outputs)} "
                                   f"prediction(s) readable={readable}, temporaries left: {left}", ok)


def _fault_cases() -> list[Case]:
    f = "fault"
    return [
        Case("kill_epoch", f, "kill -9 during an epoch, then `--resume True`", _kill_during_epoch),
        Case("kill_write", f, "kill -9 while `resume.pt` is being written, then `--resume True`", _kill_during_write),
        Case("full_disk", f, "checkpoint folder on a 40 MB tmpfs (resume.pt needs 80 MB)", _full_disk),
        Case("read_only_ckpt", f, "`--ckpt_dir` on a read-only tmpfs, training", _read_only(TRAIN, "ckpt_dir", False)),
        Case("read_only_output", f, "`--output_dir` on a read-only tmpfs, inference",
             _read_only(INFER, "output_dir", True)),
        Case("concurrent_training", "concurrent", "two trainings at once in one bundle folder", _concurrent_training),
        Case("concurrent_inference", "concurrent", "three inferences at once writing the same files",
             _concurrent_inference),
    ]


# ------------------------------------------------------------------------------------------------- driver
def all_cases() -> list[Case]:
    return _training_cases() + _inference_cases() + _fault_cases() + _checkpoint_cases()


def _fresh_bundle(work: Path, data: Path, name: str) -> Path:
    root = work / name / BUNDLE.name
    shutil.rmtree(root.parent, ignore_errors=True)
    shutil.copytree(BUNDLE, root, ignore=shutil.ignore_patterns("data", "models", "eval"))
    shutil.copytree(data, root / "data")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(Path(tempfile.gettempdir()) / "qtunet_reliability"))
    parser.add_argument("--only", default="", help="comma-separated parts of case names")
    parser.add_argument("--json_file", default="")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (timing-sensitive cases may differ)")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    data = work / "demo_data"
    if not (data / "datalist.json").is_file():
        from qtunet_monai.data.demo import prepare_demo

        prepare_demo(data, num_train=2, num_val=1)
    wanted = [w for w in args.only.split(",") if w]
    cases = [c for c in all_cases() if not wanted or any(w in c.name for w in wanted)]

    def run(case: Case) -> dict:
        bundle = _fresh_bundle(work, data, case.name)
        start = time.time()
        try:
            outcome = case.run(bundle)
        except Exception as e:  # noqa: BLE001 (a case that could not be run is reported, not hidden)
            outcome = Outcome(-1, f"{type(e).__name__}: {e}".splitlines()[0], "could not run", False)
        print(f"{case.name}: {'ok' if outcome.ok else 'FAIL'} ({time.time() - start:.0f} s)", file=sys.stderr,
              flush=True)
        return {"name": case.name, "stage": case.stage, "what": case.what, **outcome.__dict__,
                "seconds": round(time.time() - start, 1)}

    with ThreadPoolExecutor(args.jobs) as pool:  # each case is its own process tree; threads only wait
        rows = list(pool.map(run, cases))
    print("| | stage | what was tried | exit | last line the user sees | outcome |")
    print("|---|---|---|---:|---|---|")
    for row in rows:
        last = f"`{row['last_line']}`" if row["last_line"] else ""
        print(f"| {'ok' if row['ok'] else '**FAIL**'} | {row['stage']} | {row['what']} | {row['returncode']} | {last} "
              f"| {row['verdict']} |")
    if args.json_file:
        Path(args.json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_file).write_text(json.dumps(rows, indent=1))
    failed = [r["name"] for r in rows if not r["ok"]]
    summary = f"{len(rows) - len(failed)} of {len(rows)} cases behave as promised"
    print(f"\n{summary}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
