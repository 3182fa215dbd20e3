#!/usr/bin/env bash
# Runs experiments one after another (one training at a time on the shared machine), then the table.
#   bash experiments/queue.sh NAME [NAME ...]     (logs in runs/logs/NAME.log)
set -u
cd "$(dirname "$0")/.."
mkdir -p runs/logs
for name in "$@"; do
    OMP_NUM_THREADS=1 .venv/bin/python experiments/run.py "$name" > runs/logs/$name.log 2>&1 || echo "$name failed" >> runs/logs/queue.log
    tail -1 runs/logs/$name.log >> runs/logs/queue.log
done
