#!/usr/bin/env bash
# GPU check: on a bare CUDA machine that has only Python and PyTorch, run the CUDA tests, the paper
# preset's benchmark and step, and the face recipe trained at 10% faces for a fixed budget then scored
# with the held-out protocol; leave one JSON and one log. Every part has its own timeout.
#
#   scripts/gpu_check.sh --build-wheelhouse [--python-version 3.X ...]
#       Here, where the package registry is reachable: download wheels of what the check needs beyond
#       PyTorch (numpy, pyyaml, tqdm, pillow, pytest, safetensors, scipy and their dependencies) into ./wheelhouse
#       (git-ignored). Carry ./wheelhouse to the GPU machine with the checkout.
#   scripts/gpu_check.sh [--out DIR] [--minutes M] [--parts tests,bench,paper,face]
#       There: install what is missing from ./wheelhouse (pip --no-index, or unzip when pip is absent), then
#       tests  `pytest -m gpu` (180 s)
#       bench  `grandmother bench --preset paper --device cuda --kernel rowshift --kernel tiled --peers --json` (270 s)
#       paper  the paper preset's training step and memory from the bench; where the bench has none (it did
#              not fit, or ran out of time), the paper preset's first n stages for the largest n that fits (240 s)
#       face   scripts/gpu_check.py face: the experiments' 10%-faces recipe (decnorm_fewfaces) trained on the
#              in-package sample for M minutes (default 5) on the GPU, then scored held out (M min + 300 s)
#       Writes DIR/gpu_check.json and DIR/gpu_check.log (default DIR: gpu_check_out; --keep also keeps the
#       face run's data, training run and probe in DIR/face) and prints the
#       headlines: images/s, the fraction of the GPU's matmul rate, the top stage against random weights,
#       the paper step's time and memory. Exit status 0 only when every part asked for ran (tests passed).
#       All four parts take up to about 12 + M minutes: on a lease with a 10-minute command limit, run
#       --parts tests,bench,paper and --parts face as two commands.
#   scripts/gpu_check.sh --dry-run [--out DIR] [--minutes M] [--parts ...]
#       Anywhere, no GPU needed: the same steps with the CUDA parts swapped for CPU-safe ones (collect the
#       GPU tests without running them; bench, paper step and face run on the CPU at a tiny size, the face
#       run on a quarter of the sample for M minutes, default 0.05), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=gpu_check_out
WHEELS=wheelhouse
MODE=check
MINUTES=
KEEP=0
PARTS=tests,bench,paper,face
PYVERS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry ;;
        --build-wheelhouse) MODE=build ;;
        --out) OUT=$2; shift ;;
        --wheelhouse) WHEELS=$2; shift ;;
        --python-version) PYVERS+=("$2"); shift ;;
        --minutes) MINUTES=$2; shift ;;
        --parts) PARTS=$2; shift ;;
        --keep) KEEP=1 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done

# What the CUDA tests, the benchmark and the face run import beyond PyTorch and the standard library.
NEEDS=(numpy pyyaml tqdm pillow pytest safetensors scipy)
MODULES=(numpy yaml tqdm PIL pytest safetensors scipy)
for part in ${PARTS//,/ }; do
    case "$part" in
        tests|bench|paper|face) ;;
        *) echo "gpu_check.sh: --parts: unknown part $part (tests, bench, paper, face)" >&2; exit 2 ;;
    esac
done
want() { [[ ",$PARTS," == *",$1,"* ]]; }
[ -n "$MINUTES" ] || { [ "$MODE" = dry ] && MINUTES=0.05 || MINUTES=5; }
if ! [[ "$MINUTES" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || ! awk "BEGIN { exit !($MINUTES > 0) }"; then
    echo "gpu_check.sh: --minutes $MINUTES: must be a number above 0" >&2; exit 2
fi
# The dry run's networks: for the bench and the paper step, the small preset at 16x16 with 4x4 fields and 2
# maps; for the face run (ingest's smallest size is 32: the preset's own input), 2 maps and batches of 20.
TINY=(--set model.image_size=16 --set "model.stages.*.receptive_field=4" --set "model.stages.*.maps=2"
      --set "model.stages.*.pool_size=2" --set "model.stages.*.lcn_size=3")
TINY_FACE=(--set "model.stages.*.maps=2" --set train.batch_size=20)

if [ "$MODE" = build ]; then
    mkdir -p "$WHEELS"
    [ ${#PYVERS[@]} -eq 0 ] && PYVERS=("$($PY -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')")
    for v in "${PYVERS[@]}"; do
        "$PY" -m pip download -q -d "$WHEELS" --only-binary=:all: --python-version "$v" \
            --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
            "${NEEDS[@]}" || { echo "gpu_check.sh: pip download for Python $v failed" >&2; exit 1; }
    done
    echo "wheelhouse: $(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS (Python ${PYVERS[*]})"
    exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: > "$LOG"
rm -f "$OUT/gpu_check.json" "$OUT/bench.json" "$OUT/tests.txt" "$OUT/paper.json" "$OUT/env.json" "$OUT/face/face.json"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
START=$(date +%s)
log "gpu_check ($MODE) in $(pwd), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. Dependencies: install only what is missing, from the wheelhouse, never from a network.
missing=()
FIND='import importlib.util as u, sys; print(*(i for i, m in enumerate(sys.argv[1:]) if u.find_spec(m) is None))'
for i in $("$PY" -c "$FIND" "${MODULES[@]}"); do
    missing+=("${NEEDS[$i]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "missing: ${missing[*]}"
    if [ ! -d "$WHEELS" ]; then
        log "no $WHEELS directory: build it with scripts/gpu_check.sh --build-wheelhouse and carry it along"
    elif "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${missing[@]}" >>"$LOG" 2>&1 \
            || log "pip install from $WHEELS failed (see above)"
    else  # no pip: a wheel is a zip of importable files
        SITE="$OUT/site"
        mkdir -p "$SITE"
        for w in "$WHEELS"/*.whl; do "$PY" -m zipfile -e "$w" "$SITE" >>"$LOG" 2>&1; done
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        log "no pip: unzipped $WHEELS into $SITE"
    fi
fi
"$PY" - "$OUT/env.json" >>"$LOG" 2>&1 <<'EOF'
import json, sys
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
with open(sys.argv[1], "w") as f:  # for the summary
    json.dump({"torch": torch.__version__, "cuda": torch.version.cuda,
               "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}, f)
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1

# 2. The CUDA tests (dry run: collect them only).
export RAY_AUTH_MODE=disabled
TEST_RC=0
if want tests; then
    if [ "$MODE" = dry ]; then
        TEST_CMD=("$PY" -m pytest -q -p no:cacheprovider --collect-only -m gpu tests/test_kernels.py tests/test_model.py)
    else
        TEST_CMD=("$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests/test_kernels.py tests/test_model.py)
    fi
    log "tests: ${TEST_CMD[*]}"
    timeout 180 "${TEST_CMD[@]}" >"$OUT/tests.txt" 2>&1
    TEST_RC=$?
    tail -n 25 "$OUT/tests.txt" >>"$LOG"
    log "tests exit status $TEST_RC"
fi

# 3. The benchmark (dry run: the CPU at a tiny size, the Keras peer off: on CUDA it is skipped anyway).
BENCH_RC=0
if want bench; then
    if [ "$MODE" = dry ]; then
        BENCH_CMD=("$PY" -m grandmother bench --preset small --device cpu --batch-size 4 --repeats 1 --peers --json
                   --kernel rowshift --kernel tiled "${TINY[@]}")
        export GRANDMOTHER_KERAS_PYTHON=none
    else
        BENCH_CMD=("$PY" -m grandmother bench --preset paper --device cuda --kernel rowshift --kernel tiled --peers --json)
    fi
    log "bench: ${BENCH_CMD[*]}"
    timeout 270 "${BENCH_CMD[@]}" >"$OUT/bench.json" 2>>"$LOG"
    BENCH_RC=$?
    log "bench exit status $BENCH_RC"
fi

# 4. The paper preset's step and memory (from the bench; else the largest prefix of its stages that fits).
PAPER_RC=0
if want paper; then
    if [ "$MODE" = dry ]; then
        PAPER_CMD=("$PY" scripts/gpu_check.py paper --bench "$OUT/bench.json" --out "$OUT/paper.json" --device cpu "${TINY[@]}")
    else
        PAPER_CMD=("$PY" scripts/gpu_check.py paper --bench "$OUT/bench.json" --out "$OUT/paper.json" --device cuda)
    fi
    log "paper step: ${PAPER_CMD[*]}"
    timeout 240 "${PAPER_CMD[@]}" >>"$LOG" 2>&1
    PAPER_RC=$?
    log "paper step exit status $PAPER_RC"
fi

# 5. The face recipe at 10% faces for a fixed budget, then the held-out score (one process).
FACE_RC=0
if want face; then
    if [ "$MODE" = dry ]; then
        FACE_CMD=("$PY" scripts/gpu_check.py face --out "$OUT/face" --device cpu --minutes "$MINUTES" --dry-run
                  "${TINY_FACE[@]}")
    else
        FACE_CMD=("$PY" scripts/gpu_check.py face --out "$OUT/face" --device cuda --minutes "$MINUTES")
    fi
    log "face run: ${FACE_CMD[*]}"
    timeout "$(awk "BEGIN { print int($MINUTES * 60 + 300) }")" "${FACE_CMD[@]}" >>"$LOG" 2>&1
    FACE_RC=$?
    log "face run exit status $FACE_RC"
fi

# 6. One JSON: environment, test summary, the benchmark's JSON, the paper step, the face run; the headlines.
"$PY" scripts/gpu_check.py summary "$OUT" --mode "$MODE" --parts "$PARTS" --tests-rc "$TEST_RC" --bench-rc "$BENCH_RC" \
    --start "$START" 2>>"$LOG" | tee -a "$LOG"
rm -f "$OUT/bench.json" "$OUT/tests.txt" "$OUT/paper.json" "$OUT/env.json"
[ "$KEEP" = 1 ] || rm -rf "$OUT/face"  # its data, run and probe (tens of MB); --keep keeps them
log "done in $(( $(date +%s) - START )) s: $OUT/gpu_check.json, $LOG"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$PAPER_RC" -eq 0 ] && [ "$FACE_RC" -eq 0 ]
