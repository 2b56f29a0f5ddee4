#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of about 5 minutes, for the device tool (or any
# CUDA machine): the CUDA tests (tests/e2e/test_gpu.py: fp16 vs fp32, pinned batches, decode
# processes beside a GPU model, Ray actors with --gpus-per-actor), then the ingest and server
# benchmarks on the GPU, and ONNX Runtime's ingest on the same machine's CPUs beside them.
# Writes $OUT/gpu_check.md (a table) and $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_prepare.sh          # here: .whl/ and .gpu-data/ to carry
#   bash benchmarks/gpu_check.sh            # there, in the repository root
#   DEVICE=cpu COUNT=40 bash benchmarks/gpu_check.sh  # a rehearsal without a GPU
#
# The device machine has Python with PyTorch (CUDA) but no package index and no ../shared: the
# other dependencies travel as wheels in .whl/ (installed into /tmp/site first) and the photos
# in .gpu-data/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
DEVICE="${DEVICE:-cuda}"
COUNT="${COUNT:-300}"  # photos per set (fewer for a rehearsal on 2 cores)
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || { echo "installing the carried wheels failed; see $LOG"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
[ -d .gpu-data/imagenet-sample ] && export CLIPSEARCH_BENCH_DATA="$PWD/.gpu-data"
{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
    "$PY" -c 'import os, torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, sees {torch.cuda.device_count()} GPU, {os.cpu_count()} CPUs")'
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

# the tests first: their fixtures write the model checkpoints the encoders load
step "CUDA tests (tests/e2e/test_gpu.py)" 150 "$PY" -m pytest -q -p no:cacheprovider tests/e2e/test_gpu.py -rs
step "ingest benchmark, ViT-B-32, PyTorch on $DEVICE" 100 "$PY" benchmarks/ingest.py --count "$COUNT" --plain 60 \
    --runtimes "torch fp32" --ingest-args "--device $DEVICE"
step "ingest benchmark, ViT-B-32 on ONNX Runtime, the CPUs" 90 "$PY" benchmarks/ingest.py --count "$COUNT" --plain 60 \
    --runtimes "onnx fp32"
step "server benchmark, ViT-B-32, PyTorch on $DEVICE" 75 env CLIPSEARCH_DEVICE="$DEVICE" "$PY" benchmarks/server.py \
    --seconds 5 --runtimes torch
{
    echo
    echo "The benchmarks' own tables:"
    echo
    echo '```'
    grep -E '^(\||ingest:|clipsearch serve)' "$LOG" || true
    echo '```'
} >>"$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
