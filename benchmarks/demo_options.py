# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""The demo bundle's accuracy campaign: network options and training recipes side by side, each
trained for the same wall-time budget through the bundle's own configs and command-line switches.

    python -m qtunet_monai prepare_demo
    python benchmarks/demo_options.py run --arms segresnet,default   # arms one after the other
    python benchmarks/demo_options.py run --arms detail --seed 7      # another seed of an arm
    python benchmarks/demo_options.py table                           # the docs' table from the results
    python benchmarks/demo_options.py figure                          # validation Dice against time
    python benchmarks/demo_options.py capacity_sweep --arm router_light --capacities 0.125,0.25,0.5,1.0

Every arm trains with ``--time_budget_min`` set to the budget (default: the wall time of the
``segresnet`` arm's 30 epochs in this campaign, seed 123, so the baseline shipped with the bundle
sets the clock), is scored on the held-out deformed cases during training (validation Dice: what
the configuration is chosen by) and predicts the test case, the undeformed template, with
configs/inference.json (test Dice: the outcome, never used to choose). Arms that reuse another
arm's model (``tta``, ``keep_largest``) change inference only. Results go to
benchmarks/results/demo_options.json after every arm, so a killed run keeps the finished ones.

Run nothing else on the machine meanwhile: two torch jobs on two cores make both several times
slower and the wall times, which set the budget, meaningless.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "bundles" / "qtunet_demo_brain_tissue_segmentation"
RESULTS = REPO / "benchmarks" / "results" / "demo_options.json"
CLASSES = ("CSF", "grey matter", "white matter")

# the thesis' network and recipe for 30 epochs, whatever the bundle's defaults are (the budget's reference)
THESIS = {"preset": "thesis", "max_epochs": 30}
DETAIL = {**THESIS, "detail_widths": [16, 32]}
AUGMENT = {"intensity_augmentation": True, "spatial_augmentation": True}
#: the chosen network (the detail path 12-24) as the campaign runs it: the epochs its time budget fits
CHOSEN = {**THESIS, "detail_widths": [12, 24], "max_epochs": 26}
#: with the AdamW recipe, ``chosen_recipe`` is ``--preset accurate`` (the demo's learning rate 1e-3, doubled)
RECIPE = {"optimizer_name": "AdamW", "weight_decay": 0.05, "warmup_epochs": 3, "learning_rate": 0.002}

#: arm -> (bundle overrides, the arm whose model it reuses or None to train its own, label)
ARMS: dict[str, tuple[dict, str | None, str]] = {
    "segresnet": ({**THESIS, "architecture": "SegResNet"}, None, "SegResNet (MONAI), same recipe"),
    "swinunetr": ({**THESIS, "architecture": "SwinUNETR"}, None, "SwinUNETR (MONAI), same recipe"),
    "default": (THESIS, None, "QT-UNet-T, the thesis' recipe"),
    "deep_supervision": ({**THESIS, "deep_supervision": True}, None, "+ deep supervision"),
    "tta": ({**THESIS, "tta": True}, "default", "+ flip TTA (model of `default`)"),
    "keep_largest": ({**THESIS, "keep_largest": True}, "default", "+ keep largest component (model of `default`)"),
    "patch2": ({**THESIS, "patch_size": 2}, None, "patch size 2"),
    "stages4": ({**THESIS, "num_stages": 4}, None, "4 stages"),
    "small": ({**THESIS, "variant": "small"}, None, "QT-UNet-S (width 72)"),
    "detail": (DETAIL, None, "detail path 16-32"),
    "detail_8_16": ({**THESIS, "detail_widths": [8, 16]}, None, "detail path 8-16"),
    "detail_16": ({**THESIS, "detail_widths": [16]}, None, "detail path 16 (full resolution only)"),
    "detail_ds": ({**DETAIL, "deep_supervision": True}, None, "detail path + deep supervision"),
    "detail_small": ({**DETAIL, "variant": "small"}, None, "detail path, QT-UNet-S"),
    "detail_aug": ({**DETAIL, **AUGMENT}, None, "detail path + intensity/spatial augmentation"),
    "detail_recipe": ({**DETAIL, **RECIPE}, None, "detail path + AdamW, wd 0.05, warm-up 3, lr 2e-3"),
    # the cosine schedule ends within the budget: as many epochs as the arm's measured epoch time fits
    "detail_fit": ({**DETAIL, "max_epochs": 24}, None, "detail path 16-32, 24 epochs (what the budget fits)"),
    "detail_fit_aug": ({**DETAIL, **AUGMENT, "max_epochs": 24}, None,
                       "detail path 16-32, 24 epochs, + intensity/spatial augmentation"),
    "detail_12_24": (CHOSEN, None,
                     "detail path 12-24, 26 epochs (what the budget fits)"),
    "detail_12_24_aug": ({**CHOSEN, **AUGMENT}, None,
                         "detail path 12-24, 26 epochs, + intensity/spatial augmentation"),
    "detail_cct": ({**DETAIL, "skip": "cct", "cct_preset": "lite"}, None, "detail path + CCT lite skips"),
    # UCTransNet's channel-wise skips (seed 001) on the chosen configuration
    "cct_lite": ({**CHOSEN, "skip": "cct", "cct_preset": "lite"}, None, "detail path 12-24 + CCT lite skips"),
    "cct_full": ({**CHOSEN, "skip": "cct", "cct_preset": "full"}, None, "detail path 12-24 + CCT full skips"),
    # the recipe and deep supervision on the chosen configuration
    "chosen_recipe": ({**CHOSEN, **RECIPE}, None, "detail path 12-24 + AdamW, wd 0.05, warm-up 3, lr 2e-3: `--preset accurate`"),
    "chosen_ds": ({**CHOSEN, "deep_supervision": True}, None, "detail path 12-24 + deep supervision"),
    # conditional light/heavy Swin blocks (seed 003) on the chosen configuration; `capacity_sweep` then
    # predicts the test case with its model at other capacities
    "router_light": ({**CHOSEN, "router": "light", "capacity": 0.25}, None,
                     "detail path 12-24 + conditional blocks, light router, capacity 0.25"),
    "accurate": ({"preset": "accurate"}, None, "`--preset accurate` (the bundle's default)"),
}


def _cli(overrides: dict) -> list[str]:
    """Bundle overrides as ``monai.bundle run`` arguments (lists and booleans as JSON/Python literals)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value) if isinstance(value, list)
                 else str(value)]
    return args


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


_COMPLEXITY = """
import json, sys
from monai.bundle import ConfigParser
from qtunet_monai.profiling.complexity import count_flops
parser = ConfigParser()
parser.read_config("configs/train.json")
parser.update(json.loads(sys.argv[1]))
net = parser.get_parsed_content("network_def").eval()
roi = parser.get_parsed_content("roi_size")
print(json.dumps({"params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
                  "gflops": round(count_flops(net, [1, parser.get_parsed_content("in_channels"), *roi]) / 1e9, 2)}))
"""


def _complexity(bundle: Path, overrides: dict) -> dict:
    """Parameters and fvcore GFLOPs (the thesis' counting) of the arm's network at the bundle's ROI."""
    done = subprocess.run([sys.executable, "-c", _COMPLEXITY, json.dumps(overrides)], cwd=bundle, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_arm(name: str, work: Path, seed: int, budget_s: float | None) -> dict:
    from qtunet_monai.cli import demo_report

    overrides, reuse, _ = ARMS[name]
    bundle = work / f"{name}__seed{seed}"
    shutil.rmtree(bundle, ignore_errors=True)
    shutil.copytree(DEMO, bundle, ignore=shutil.ignore_patterns("models", "eval"))
    log = bundle / "run.log"
    result: dict = {"overrides": overrides}
    train_overrides = {**overrides, "seed": seed}
    if budget_s:
        train_overrides["time_budget_min"] = round(budget_s / 60.0, 3)
    if reuse is None:
        result["train_process_s"] = round(_bundle(["--config_file", "configs/train.json", *_cli(train_overrides)],
                                                  bundle, log), 1)
        record = json.loads((bundle / "eval" / "training_time.json").read_text())
        result.update({"train_s": record["wall_s"], "epochs": record["epochs"],
                       "stopped_by_budget": record["stopped_by_budget"], "best_val_dice": record["best_metric"],
                       "best_val_epoch": record["best_metric_epoch"], "validations": record["validations"]})
    else:
        shutil.copytree(work / f"{reuse}__seed{seed}" / "models", bundle / "models")
        result["model_of"] = reuse
    inference = {k: v for k, v in overrides.items() if k not in ("max_epochs", "learning_rate", "weight_decay")}
    result["inference_s"] = round(_bundle(["--config_file", "configs/inference.json", *_cli(inference)], bundle, log),
                                  1)
    demo_report(str(bundle))
    result["test_dice"] = json.loads((bundle / "eval" / "demo_report.json").read_text())
    result.update(_complexity(bundle, {k: v for k, v in inference.items() if k not in ("tta", "keep_largest")}))
    return result


def main(arms: str | tuple = ("segresnet", "default", "detail"), seed: int = 123, budget_s: float | None = None,
         work_dir: str = "/tmp/qtunet_demo_options", output: str = str(RESULTS)) -> None:
    """Run the ``arms`` (comma-separated names of :data:`ARMS`) in order, one at a time, with ``seed``.

    Args:
        budget_s: training wall-time budget of every arm; default the ``segresnet`` arm's training time
            in the results (seed 123), which must then have been run first (without a budget).
    """
    if not (DEMO / "data" / "datalist.json").is_file():
        raise SystemExit("prepare the demo data first: python -m qtunet_monai prepare_demo")
    names = arms.split(",") if isinstance(arms, str) else list(arms)
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    work, out = Path(work_dir), Path(output)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
                               f"{os.environ.get('OMP_NUM_THREADS', 'default')}"})
    results.setdefault("arms", {})
    for name in names:
        reuse = ARMS[name][1]
        if reuse and not (work / f"{reuse}__seed{seed}" / "models" / "model.pt").is_file():
            raise SystemExit(f"arm {name!r} reuses the model of {reuse!r}: run that arm first (seed {seed})")
        budget = budget_s if budget_s is not None else results.get("budget_s")
        if budget is None and name != "segresnet":
            raise SystemExit("no budget yet: run the segresnet arm first, or give --budget_s")
        print(f"{name} (seed {seed}): running, budget {budget} s", flush=True)
        arm = _run_arm(name, work, seed, budget)
        if name == "segresnet" and seed == 123 and budget is None:
            results["budget_s"] = arm["train_s"]  # the clock of every other arm
        results["arms"].setdefault(name, {})[str(seed)] = arm
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"{name} (seed {seed}): " + ", ".join(f"{k} {v:.3f}" for k, v in arm["test_dice"].items())
              + f"; best val {arm.get('best_val_dice', float('nan')):.3f}; train {arm.get('train_s', '-')} s "
              f"({arm.get('epochs', '-')} epochs), {arm['params_m']} M, {arm['gflops']} GFLOPs", flush=True)


def _capacities(capacities: str | float | tuple) -> list[float]:
    """``--capacities 0.125,0.25`` (fire passes a tuple, a float or a string) as a list of fractions."""
    values = capacities.split(",") if isinstance(capacities, str) else (
        list(capacities) if isinstance(capacities, (list, tuple)) else [capacities])
    try:
        parsed = [float(str(v).strip()) for v in values if str(v).strip()]
    except ValueError:
        parsed = []
    if not parsed or not all(0.0 <= c <= 1.0 for c in parsed):
        raise SystemExit(f"--capacities {capacities!r}: give fractions in [0, 1] separated by commas.")
    return parsed


def capacity_sweep(arm: str = "router_light", capacities: str | tuple = (0.125, 0.25, 0.5, 1.0), seed: int = 123,
                   work_dir: str = "/tmp/qtunet_demo_options", output: str = str(RESULTS)) -> dict:
    """Predict the test case with a conditional arm's trained model at each capacity (the routed share of
    each window's tokens; same weights) and record test Dice per class and inference time under that
    arm's run in the results (``capacity_sweep``).

    Each capacity is one ``configs/train.json`` + ``configs/evaluate.json`` run on the testing split with
    the arm's own overrides and ``--capacity``, writing to ``eval_capacity_<c>/`` of the arm's work
    folder; the Dice is :func:`qtunet_monai.data.demo.report`'s (the arm's ``test_dice``), the time the
    bundle's per-case inference timer (network and sliding window, one pass, the process' first).

    Args:
        arm: a trained arm of :data:`ARMS` with a ``router``.
        capacities: comma-separated fractions in [0, 1].
        seed: the arm's seed.
        work_dir: the campaign's work folder (the arm's model is ``<work_dir>/<arm>__seed<seed>/models``).
        output: the results file; the arm's run of ``seed`` must be in it.
    """
    from qtunet_monai.data.demo import report

    if arm not in ARMS or not ARMS[arm][0].get("router"):
        raise SystemExit(f"arm {arm!r} is not a conditional arm; choose from "
                         f"{[n for n, a in ARMS.items() if a[0].get('router')]}")
    values = _capacities(capacities)
    bundle, out = Path(work_dir) / f"{arm}__seed{seed}", Path(output)
    if not (bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"no trained model in {bundle / 'models'}: run the arm first (run --arms {arm} --seed {seed})")
    results = json.loads(out.read_text()) if out.is_file() else {}
    run = results.get("arms", {}).get(arm, {}).get(str(seed))
    if run is None:
        raise SystemExit(f"{out} has no run of arm {arm!r} with seed {seed}: run the arm first")
    inference = {k: v for k, v in ARMS[arm][0].items() if k not in ("max_epochs", "learning_rate", "weight_decay")}
    configs = "['configs/train.json','configs/evaluate.json']"
    sweep = {}
    for capacity in values:
        eval_dir = bundle / f"eval_capacity_{capacity}"
        shutil.rmtree(eval_dir, ignore_errors=True)
        process_s = _bundle(["--config_file", configs,
                             *_cli({**inference, "capacity": capacity, "output_dir": str(eval_dir)})],
                            bundle, bundle / "capacity_sweep.log")
        rows = (eval_dir / "inference_time_raw.csv").read_text().splitlines()[1:]
        dice = report(str(eval_dir / "brain_template_seg.nii.gz"), str(bundle / "data" / "labelsTs" / "brain_template.nii.gz"),
                      str(bundle / "data" / "imagesTs" / "brain_template.nii.gz"), str(eval_dir / "demo_report.png"))
        sweep[str(capacity)] = {"test_dice": dice, "inference_s": round(sum(float(r.split(",")[1]) for r in rows), 3),
                                "process_s": round(process_s, 1)}
        print(f"{arm} (seed {seed}) capacity {capacity}: " + ", ".join(f"{k} {v:.3f}" for k, v in dice.items())
              + f"; inference {sweep[str(capacity)]['inference_s']} s", flush=True)
    results = json.loads(out.read_text()) if out.is_file() else results  # another arm may have finished meanwhile
    results["arms"][arm][str(seed)]["capacity_sweep"] = sweep
    out.write_text(json.dumps(results, indent=1))
    return sweep


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(results: str = str(RESULTS)) -> str:
    """The Markdown table of the demo bundle's docs: one row per arm, mean ± standard deviation over its seeds."""
    data = json.loads(Path(results).read_text()) if Path(results).is_file() else {"arms": {}}
    header = ("| arm | seeds | CSF | grey matter | white matter | test mean Dice | best validation Dice | training "
              "| epochs | params (M) | GFLOPs |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (_, _, label) in ARMS.items():
        runs = list(data["arms"].get(name, {}).values())
        if not runs:
            continue
        dice = [_mean_spread([r["test_dice"][k] for r in runs]) for k in (*CLASSES, "mean")]
        trained = [r for r in runs if "train_s" in r]
        val = _mean_spread([r["best_val_dice"] for r in trained]) if trained else "-"
        train = f"{statistics.mean(r['train_s'] for r in trained) / 60:.1f} min" if trained else \
            f"(model of `{runs[0]['model_of']}`)"
        epochs = "/".join(str(r["epochs"]) for r in trained) if trained else "-"
        lines.append(f"| `{name}`: {label} | {len(runs)} | " + " | ".join(dice)
                     + f" | {val} | {train} | {epochs} | {runs[0]['params_m']:.2f} | {runs[0]['gflops']:.2f} |")
    sweeps = [(name, seed, run["capacity_sweep"]) for name, runs in data["arms"].items()
              for seed, run in runs.items() if "capacity_sweep" in run]
    if sweeps:  # a second table: a conditional arm's model predicting at other capacities (capacity_sweep)
        lines += ["", "| arm | seed | capacity | CSF | grey matter | white matter | test mean Dice | inference (s) |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, seed, sweep in sweeps:
            trained = ARMS[name][0].get("capacity") if name in ARMS else None
            for capacity, row in sorted(sweep.items(), key=lambda item: float(item[0])):
                mark = " (trained)" if trained is not None and float(capacity) == float(trained) else ""
                lines.append(f"| `{name}` | {seed} | {capacity}{mark} | "
                             + " | ".join(f"{row['test_dice'][k]:.3f}" for k in (*CLASSES, "mean"))
                             + f" | {row['inference_s']:.2f} |")
    return "\n".join(lines)


def figure(results: str = str(RESULTS), output: str = str(DEMO / "docs" / "campaign.png")) -> str:
    """Validation Dice against training time, one line per trained arm (seed 123), the budget marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(results).read_text())
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in data["arms"].items():
        run = runs.get("123")
        if not run or not run.get("validations"):
            continue
        points = run["validations"]
        # the baseline, the thesis' network and the chosen configuration (--preset accurate) stand out
        highlight = {"segresnet": "black", "default": "tab:orange", "chosen_recipe": "tab:red"}
        style = ({"linewidth": 2.5, "color": highlight[name]} if name in highlight
                 else {"linewidth": 1, "alpha": 0.6, "color": plt.cm.tab20(len(ax.lines) % 20)})
        ax.plot([p["seconds"] / 60 for p in points], [p["metric"] for p in points], marker="o", markersize=3,
                label=name, **style)
    if data.get("budget_s"):
        ax.axvline(data["budget_s"] / 60, color="grey", linestyle="--", linewidth=1, label="budget")
    ax.set(xlabel="training wall time (min, 2-core CPU)", ylabel="validation mean Dice (held-out deformed cases)",
           title="Demo campaign: validation Dice during training")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    return output


if __name__ == "__main__":
    fire.Fire({"run": main, "table": table, "figure": figure, "capacity_sweep": capacity_sweep})
