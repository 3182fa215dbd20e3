#!/usr/bin/env bash
# Scores every kept checkpoint of a learning-curve run (experiments/run.py NAME --step S), one after another;
# rows already in experiments/results/ are kept.
#   bash experiments/score_curve.sh NAME        (rows NAME@IMAGESk in experiments/results/)
set -u
cd "$(dirname "$0")/.."
name=$1
for d in runs/exp/$name/checkpoints/step_*; do
    step=$((10#${d##*_}))
    [ -f "experiments/results/$name@$((step / 10))k.json" ] && continue
    OMP_NUM_THREADS=1 .venv/bin/python experiments/run.py "$name" --step "$step" 2>&1 | tail -1
done
