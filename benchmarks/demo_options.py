# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The demo bundle's training and inference options side by side: one run each, same 30-epoch budget
and seed, all through the bundle's own configs and command-line switches.

    python -m qtunet_monai prepare_demo
    python benchmarks/demo_options.py run                      # every arm, one after the other
    python benchmarks/demo_options.py run --arms default,tta   # some arms (results of others are kept)
    python benchmarks/demo_options.py table                    # the README's table from the results

Arms: ``default`` (the thesis' recipe), ``deep_supervision`` (retrained), ``tta`` and ``keep_largest``
(inference options on the default arm's model, no retraining), ``swinunetr`` and ``segresnet``
(MONAI's baselines, retrained). Each arm predicts the test case with configs/inference.json and
scores it with ``python -m qtunet_monai demo_report`` (Dice per class on the undeformed template).
Results go to benchmarks/results/demo_options.json, written after every arm (a killed run keeps the
finished arms); the README of the demo bundle reports them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"

#: arm -> (overrides of every command, the arm whose model it reuses or None to train its own)
ARMS: dict[str, tuple[list[str], str | None]] = {
    "default": ([], None),
    "deep_supervision": (["--deep_supervision", "True"], None),
    "tta": (["--tta", "True"], "default"),
    "keep_largest": (["--keep_largest", "True"], "default"),
    "segresnet": (["--architecture", "SegResNet"], None),
    "swinunetr": (["--architecture", "SwinUNETR"], None),  # last: several times the others' training time
}


def _bundle(args: list[str], cwd: Path, log: Path) -> float:
    """Run ``python -m monai.bundle run ARGS`` in ``cwd``; returns its wall-clock seconds."""
    start = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n$ python -m monai.bundle run {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], check=False, cwd=cwd, stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode:
        raise RuntimeError(f"{args} failed in {cwd}; see {log}")
    return time.perf_counter() - start


def _run_arm(name: str, work: Path, max_epochs: int) -> dict:
    from qtunet_monai.cli import demo_report

    overrides, reuse = ARMS[name]
    bundle = work / name
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("models", "eval"))
    log = bundle / "run.log"
    result: dict = {"overrides": overrides}
    if reuse is None:
        result["train_s"] = round(_bundle(["--config_file", "configs/train.json", "--max_epochs", str(max_epochs),
                                           *overrides], bundle, log), 1)
    else:
        shutil.copytree(work / reuse / "models", bundle / "models")
        result["model_of"] = reuse
    result["inference_s"] = round(_bundle(["--config_file", "configs/inference.json", *overrides], bundle, log), 1)
    demo_report(str(bundle))
    result["dice"] = json.loads((bundle / "eval" / "demo_report.json").read_text())
    return result


def main(arms: str | tuple = tuple(ARMS), max_epochs: int = 30, work_dir: str = "/tmp/qtunet_demo_options",
         output: str = str(REPO / "benchmarks" / "results" / "demo_options.json")) -> None:
    """Run the ``arms`` (comma-separated names of :data:`ARMS`) in order, one at a time."""
    if not (DEMO / "data" / "datalist.json").is_file():
        raise SystemExit("prepare the demo data first: python -m qtunet_monai prepare_demo")
    names = arms.split(",") if isinstance(arms, str) else list(arms)
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    work, out = Path(work_dir), Path(output)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"max_epochs": max_epochs, "seed": 123, "machine": f"{platform.machine()}, "
                    f"{os.cpu_count()} CPU cores, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}"})
    results.setdefault("arms", {})
    for name in names:
        reuse = ARMS[name][1]
        if reuse and not (work / reuse / "models" / "model.pt").is_file():
            raise SystemExit(f"arm {name!r} reuses the model of {reuse!r}: run that arm first")
        print(f"{name}: running", flush=True)
        results["arms"][name] = _run_arm(name, work, max_epochs)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        arm = results["arms"][name]
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in arm["dice"].items())
              + f"; train {arm.get('train_s', '-')} s, inference {arm['inference_s']} s", flush=True)


LABELS = {"default": "QT-UNet-T, the thesis' recipe (default)", "deep_supervision": "`--deep_supervision True`",
          "tta": "`--tta True` (default model)", "keep_largest": "`--keep_largest True` (default model)",
          "swinunetr": "`--architecture SwinUNETR`", "segresnet": "`--architecture SegResNet`"}


def table(results: str = str(REPO / "benchmarks" / "results" / "demo_options.json")) -> str:
    """The Markdown table of the demo bundle's README from the results file; arms not run say so."""
    data = json.loads(Path(results).read_text()) if Path(results).is_file() else {"arms": {}}
    lines = ["| arm | CSF | grey matter | white matter | mean Dice | training | inference |", "|---|---|---|---|---|---|---|"]
    for name in ARMS:
        arm = data["arms"].get(name)
        if arm is None:
            lines.append(f"| {LABELS[name]} | not run | | | | | |")
            continue
        dice = arm["dice"]
        train = f"{arm['train_s'] / 60:.1f} min" if "train_s" in arm else f"(model of `{arm['model_of']}`)"
        lines.append(f"| {LABELS[name]} | " + " | ".join(f"{dice[k]:.3f}" for k in ("CSF", "grey matter",
                     "white matter", "mean")) + f" | {train} | {arm['inference_s']:.0f} s |")
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire({"run": main, "table": table})
