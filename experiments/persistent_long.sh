#!/usr/bin/env bash
# Long persistent-chain runs of the ebm_plus recipe (3 seeds), for the spike log: spikes.csv (events) and
# diagnostics/diagnostics.csv (E+, E-, gap, gradient norms per step) in logs/persistent_long/<category>-s<seed>.
#   experiments/persistent_long.sh [steps=1500] [size=32] [category=bottle] [root=../shared/data/mvtec_ad]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-1500}; size=${2:-32}; category=${3:-bottle}; root=${4:-../shared/data/mvtec_ad}
for seed in 0 1 2; do
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m ebmad.train experiment=ebm_plus data=mvtec \
    data.root="$(realpath "$root")" data.category="$category" data.image_size="$size" seed="$seed" \
    trainer.max_steps="$steps" logger=csv eval.figures=false \
    hydra.run.dir="logs/persistent_long/${category}-${size}px-s${seed}"
done
