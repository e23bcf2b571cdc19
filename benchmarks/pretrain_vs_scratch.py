# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""In-task self-supervised pre-training + fine-tuning versus training from scratch on the demo data,
at the same total number of epochs. Both arms run the demo bundle's own configs.

    python benchmarks/pretrain_vs_scratch.py --total_epochs 30 --pretrain_epochs 10

Writes benchmarks/results/pretrain_vs_scratch.json and prints Dice per class of both arms on the
demo's test case.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"


def _bundle(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *cmd], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{cmd} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def _arm(name: str, work: Path, steps: list[list[str]]) -> dict:
    from qtunet_monai.cli import demo_report

    bundle = work / name
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("models", "eval"), dirs_exist_ok=True)
    times = [round(_bundle(step, bundle), 1) for step in steps]
    _bundle(["--config_file", "configs/inference.json"], bundle)
    demo_report(str(bundle))
    return {"phases_s": times, "dice": json.loads((bundle / "eval" / "demo_report.json").read_text())}


def main(total_epochs: int = 30, pretrain_epochs: int = 10, work_dir: str = "/tmp/qtunet_pretrain_vs_scratch",
         output: str = str(REPO / "benchmarks" / "results" / "pretrain_vs_scratch.json")) -> None:
    if not (DEMO / "data" / "datalist.json").is_file():
        raise SystemExit("prepare the demo data first: python -m qtunet_monai prepare_demo")
    work = Path(work_dir)
    shutil.rmtree(work, ignore_errors=True)
    train = ["--config_file", "configs/train.json"]
    results = {
        "total_epochs": total_epochs,
        "pretrain_epochs": pretrain_epochs,
        "scratch": _arm("scratch", work, [train + ["--max_epochs", str(total_epochs)]]),
        "pretrained": _arm("pretrained", work, [
            ["--config_file", "configs/pretrain.json", "--max_epochs", str(pretrain_epochs)],
            train + ["--max_epochs", str(total_epochs - pretrain_epochs), "--finetune", "True",
                     "--finetune_checkpoint", "models/pretrained.pt"],
        ]),
    }
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(results, indent=1))
    for arm in ("scratch", "pretrained"):
        dice = results[arm]["dice"]
        print(f"{arm:>10}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
              + f"  (phases {results[arm]['phases_s']} s)")


if __name__ == "__main__":
    fire.Fire(main)
