#!/usr/bin/env bash
# Builds the virtual environment of the Keras peer of `grandmother bench --peers`: Keras 2 (tf_keras) on
# TensorFlow for the CPU, in runs/keras-venv (git-ignored). grandmother itself never imports TensorFlow:
# the bench runs scripts/keras_peer.py with this environment's python, as a subprocess that prints JSON.
#
#   scripts/keras_peer.sh [VENV]     (default VENV: runs/keras-venv; PYTHON=python3.X picks the interpreter)
#
# tf_keras declares a dependency on the `tensorflow` package (the CUDA build's name); it is installed with
# --no-deps after tensorflow-cpu, which provides the same `tensorflow` module. About 700 MB on disk.
# Versions: the newest pair that installed on Python 3.11 here; tf_keras X.Y needs TensorFlow X.Y.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The default location is defined once, in grandmother/bench/keras_peer.py (where the bench looks for it).
VENV=${1:-$(sed -n 's/^KERAS_VENV = "\([^"]*\)".*/\1/p' grandmother/bench/keras_peer.py)}
[ -n "$VENV" ] || { echo "keras_peer.sh: no KERAS_VENV in grandmother/bench/keras_peer.py" >&2; exit 1; }
TF_VERSION=2.21.0

"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "tensorflow-cpu==$TF_VERSION"
"$VENV/bin/python" -m pip install -q --no-deps "tf_keras==$TF_VERSION"
"$VENV/bin/python" scripts/keras_peer.py --check
echo "keras peer ready: $VENV (grandmother bench --peers finds it there; GRANDMOTHER_KERAS_PYTHON overrides)"
