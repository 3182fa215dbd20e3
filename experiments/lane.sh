#!/usr/bin/env bash
# Waits for process WAIT_PID (a running lane) to end, then runs the named experiments one after another.
#   bash experiments/lane.sh WAIT_PID NAME [NAME ...]
set -u
cd "$(dirname "$0")/.."
pid=$1; shift
while kill -0 "$pid" 2>/dev/null; do sleep 20; done
exec bash experiments/queue.sh "$@"
