#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of at most about 8 minutes, for the device tool
# (or any CUDA machine): the CUDA tests (tests/e2e/test_gpu.py: fp16 vs fp32, pinned batches, decode
# processes beside a GPU model, Ray actors with --gpus-per-actor), then the ingest and server
# benchmarks on the GPU. Writes $OUT/gpu_check.md (a table) and $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, in the repository root
#
# The device machine has Python with PyTorch (CUDA) but no package index: the other
# dependencies travel as wheels in .whl/ (made here by benchmarks/gpu_wheels.sh) and are
# installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "installing the carried wheels failed; see $LOG"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/GPU: /'
    "$PY" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, sees {torch.cuda.device_count()} GPU")'
    echo
    echo "| check | result | seconds |"
    echo "|---|---|---|"
} >"$OUT/gpu_check.md"

step() {  # step NAME TIMEOUT COMMAND...: one row of the table
    local name="$1" limit="$2" started rc
    shift 2
    started=$(date +%s)
    echo "== $name" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local result="passed"
    [ $rc -eq 124 ] && result="timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && result="FAILED (exit $rc)"
    echo "| $name | $result | $(( $(date +%s) - started )) |" >>"$OUT/gpu_check.md"
}

step "CUDA tests (tests/e2e/test_gpu.py)" 240 "$PY" -m pytest -q -p no:cacheprovider tests/e2e/test_gpu.py -rs
step "ingest benchmark, ViT-B-32 on cuda" 150 "$PY" benchmarks/ingest.py --count 300 --plain 60 --runtimes torch \
    --ingest-args "--device cuda"
step "server benchmark, ViT-B-32 on cuda" 120 env CLIPSEARCH_DEVICE=cuda "$PY" benchmarks/server.py --seconds 5 \
    --runtimes torch
{
    echo
    echo "The benchmarks' own tables:"
    echo
    echo '```'
    grep -E '^\|' "$LOG" | grep -v '^| check' || true
    echo '```'
} >>"$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
