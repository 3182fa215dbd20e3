#!/usr/bin/env bash
# GPU check: on a bare CUDA machine that has only Python and PyTorch, run the CUDA tests and the paper
# preset's benchmark, and leave one JSON and one log. Under 8 minutes (each part has its own timeout).
#
#   scripts/gpu_check.sh --build-wheelhouse [--python-version 3.X ...]
#       Here, where the package registry is reachable: download wheels of what the check needs beyond
#       PyTorch (numpy, pyyaml, tqdm, pillow, pytest and their dependencies) into ./wheelhouse (git-ignored).
#       Carry ./wheelhouse to the GPU machine with the checkout.
#   scripts/gpu_check.sh [--out DIR]
#       There: install what is missing from ./wheelhouse (pip --no-index, or unzip when pip is absent),
#       run `pytest -m gpu`, then `grandmother bench --preset paper --device cuda --kernel rowshift
#       --kernel tiled --peers --json`. Writes DIR/gpu_check.json and DIR/gpu_check.log (default DIR:
#       gpu_check_out). Exit status 0 only when the tests passed and the benchmark ran.
#   scripts/gpu_check.sh --dry-run [--out DIR]
#       Anywhere, no GPU needed: the same steps with the CUDA parts swapped for CPU-safe ones (collect
#       the GPU tests without running them; bench on the CPU at a tiny size), to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
OUT=gpu_check_out
WHEELS=wheelhouse
MODE=check
PYVERS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) MODE=dry ;;
        --build-wheelhouse) MODE=build ;;
        --out) OUT=$2; shift ;;
        --wheelhouse) WHEELS=$2; shift ;;
        --python-version) PYVERS+=("$2"); shift ;;
        *) echo "gpu_check.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
    shift
done

# What the CUDA tests and the benchmark import beyond PyTorch and the standard library.
NEEDS=(numpy pyyaml tqdm pillow pytest)
MODULES=(numpy yaml tqdm PIL pytest)

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
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
START=$(date +%s)
log "gpu_check ($MODE) in $(pwd), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

# 1. Dependencies: install only what is missing, from the wheelhouse, never from a network.
missing=()
for i in "${!MODULES[@]}"; do
    "$PY" -c "import ${MODULES[$i]}" 2>/dev/null || missing+=("${NEEDS[$i]}")
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
"$PY" - >>"$LOG" 2>&1 <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"device {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1

# 2. The CUDA tests (dry run: collect them only).
export RAY_AUTH_MODE=disabled
if [ "$MODE" = dry ]; then
    TEST_CMD=("$PY" -m pytest -q --collect-only -m gpu tests/test_kernels.py tests/test_model.py)
else
    TEST_CMD=("$PY" -m pytest -q -ra -m gpu tests/test_kernels.py tests/test_model.py)
fi
log "tests: ${TEST_CMD[*]}"
timeout 180 "${TEST_CMD[@]}" >"$OUT/tests.txt" 2>&1
TEST_RC=$?
tail -n 25 "$OUT/tests.txt" >>"$LOG"
log "tests exit status $TEST_RC"

# 3. The benchmark (dry run: the CPU at a tiny size).
if [ "$MODE" = dry ]; then
    BENCH_CMD=("$PY" -m grandmother bench --preset small --device cpu --batch-size 4 --repeats 1 --peers --json
               --kernel rowshift --kernel tiled --set model.image_size=16 --set "model.stages.*.receptive_field=4"
               --set "model.stages.*.maps=2" --set "model.stages.*.pool_size=2" --set "model.stages.*.lcn_size=3")
else
    BENCH_CMD=("$PY" -m grandmother bench --preset paper --device cuda --kernel rowshift --kernel tiled --peers --json)
fi
log "bench: ${BENCH_CMD[*]}"
timeout 270 "${BENCH_CMD[@]}" >"$OUT/bench.json" 2>>"$LOG"
BENCH_RC=$?
log "bench exit status $BENCH_RC"

# 4. One JSON: environment, test summary, the benchmark's own JSON.
"$PY" - "$OUT" "$MODE" "$TEST_RC" "$BENCH_RC" "$START" <<'EOF' >>"$LOG" 2>&1
import json, sys, time
from pathlib import Path
import torch
out, mode, test_rc, bench_rc, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
try:
    bench = json.loads((out / "bench.json").read_text())
except (OSError, ValueError) as e:
    bench = {"error": f"no benchmark JSON ({e})"}
tests = (out / "tests.txt").read_text().strip().splitlines() if (out / "tests.txt").exists() else []
result = {
    "mode": mode, "torch": torch.__version__, "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "tests": {"exit_status": test_rc, "summary": tests[-1] if tests else ""},
    "bench": {"exit_status": bench_rc, **bench},
    "seconds": round(time.time() - start, 1),
}
tmp = out / "gpu_check.json.tmp"
tmp.write_text(json.dumps(result, indent=1))
tmp.replace(out / "gpu_check.json")
print("wrote", out / "gpu_check.json")
EOF
rm -f "$OUT/bench.json" "$OUT/tests.txt"
log "done in $(( $(date +%s) - START )) s: $OUT/gpu_check.json, $LOG"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ]
