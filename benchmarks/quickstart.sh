#!/usr/bin/env bash
# The README's Quick start on a fresh clone, each step timed: the figures the README quotes.
#
#     bash benchmarks/quickstart.sh [CLONE_DIR] [RESULTS_JSON] [EXTRA_TRAIN_ARGS...]
#
# Clones this repository's HEAD into CLONE_DIR (default: a new temporary folder), runs the README's
# demo steps there one at a time (venv + install, prepare_demo, train, inference, demo_report) and
# writes their wall-clock seconds and the report's test Dice to RESULTS_JSON (default:
# benchmarks/results/quickstart.json in this repository). pip's download cache is whatever the machine
# has; the results file says whether it was warm. Run nothing else meanwhile: the times are the figures.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="${1:-$(mktemp -d)/qtunet_monai}"
results="${2:-$repo/benchmarks/results/quickstart.json}"
shift $(( $# > 2 ? 2 : $# ))
train_args=("$@")
rm -rf "$clone"
git clone --quiet "$repo" "$clone"
cd "$clone"
pip_cache_mb=$(du -sm "$(python3 -m pip cache dir 2>/dev/null || echo /nonexistent)" 2>/dev/null | cut -f1 || echo 0)

declare -A seconds
step() {  # step NAME COMMAND...: run it, record its seconds
  local name=$1; shift
  local start=$SECONDS
  "$@"
  seconds[$name]=$(( SECONDS - start ))
  echo "[quickstart] $name: ${seconds[$name]} s" >&2
}

step install bash -c 'python3 -m venv .venv && .venv/bin/pip install -q "torch==2.13.0" -e ".[demo]"'
step prepare_demo .venv/bin/python -m qtunet_monai prepare_demo
cd bundles/qtunet_demo_brain_tissue_segmentation
step train ../../.venv/bin/python -m monai.bundle run --config_file configs/train.json "${train_args[@]}"
step inference ../../.venv/bin/python -m monai.bundle run --config_file configs/inference.json
step demo_report ../../.venv/bin/python -m qtunet_monai demo_report --bundle_dir .

../../.venv/bin/python - "$results" "$(git -C "$clone" rev-parse HEAD)" "$pip_cache_mb" "${train_args[*]:-}" \
  "${seconds[install]}" "${seconds[prepare_demo]}" "${seconds[train]}" "${seconds[inference]}" \
  "${seconds[demo_report]}" <<'EOF'
import json, os, platform, sys
from pathlib import Path

out, commit, cache_mb, train_args = sys.argv[1:5]
names = ("install", "prepare_demo", "train", "inference", "demo_report")
times = dict(zip(names, map(int, sys.argv[5:10])))
record = {
    "commit": commit,
    "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
    "pip_cache_mb_before": int(cache_mb or 0),
    "train_args": train_args,
    "seconds": times,
    "total_s": sum(times.values()),
    "training_time": json.loads(Path("eval/training_time.json").read_text()),
    "test_dice": json.loads(Path("eval/demo_report.json").read_text()),
}
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps({"seconds": times, "test_dice": record["test_dice"]}))
EOF
