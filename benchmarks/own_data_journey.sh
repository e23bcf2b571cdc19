#!/bin/bash
# The own-data journey as a user runs it, timed: plan -> train -> predict a folder (3 commands) on a small
# synthetic CT set in the MSD layout (8 training + 2 test volumes of 48 x 48 x 32 voxels at 0.8 x 0.8 x 5 mm),
# 10 epochs on the CPU. Usage, from the repository root: benchmarks/own_data_journey.sh [work folder]
set -e
PY=${PY:-$(pwd)/.venv/bin/python}
WORK=${1:-/tmp/own_data_journey}
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
$PY -c "from qtunet_monai.data.msd import write_fake_msd; write_fake_msd('raw', 'spleen', num_training=8, num_test=2, shape=(48, 48, 32))" 2>/dev/null
mkdir new && cp raw/Task09_Spleen/imagesTs/*.nii.gz new/
t0=$(date +%s.%N)
$PY -m qtunet_monai plan --dataset raw/Task09_Spleen --output my_spleen --max_epochs 10 2>&1 | grep -v -i warn
t1=$(date +%s.%N)
cd my_spleen
$PY -m monai.bundle run --config_file configs/train.json > ../train.log 2>&1
t2=$(date +%s.%N)
$PY -m monai.bundle run --config_file configs/inference.json --input_dir ../new --output_dir ../pred > ../infer.log 2>&1
t3=$(date +%s.%N)
ls ../pred; grep -o "best.*" ../train.log | tail -2
python3 -c "print('plan %.1f s, train %.1f s, predict %.1f s, total %.1f s' % ($t1-$t0, $t2-$t1, $t3-$t2, $t3-$t0))"
